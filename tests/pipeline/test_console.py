"""The commands' last line is strict JSON: a missing figure is null, never NaN/Infinity."""
import json
import math

from pipeline.console import finite_or_none, json_line


def test_non_finite_figures_become_null_at_any_depth():
    obj = {"knn_top1": math.nan, "loss": -1.25, "rows": [{"m": math.inf}, (1, -math.inf)],
           "name": "run", "n": 3, "ok": True, "none": None}
    line = json_line(obj)
    assert json.loads(line) == {"knn_top1": None, "loss": -1.25, "rows": [{"m": None}, [1, None]],
                                "name": "run", "n": 3, "ok": True, "none": None}
    assert "NaN" not in line and "Infinity" not in line
    assert finite_or_none(0.5) == 0.5 and finite_or_none("nan") == "nan"

