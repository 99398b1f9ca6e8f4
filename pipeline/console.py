"""The last line every command prints: one strict JSON object (what scripts and ``jq`` parse).

Python's ``json`` writes NaN/Infinity, which are not JSON; a missing figure (kNN with no labelled
val split, a metric a stopped trial never reached) is written as null instead."""
from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(x: Any) -> Any:
    """``x`` with every non-finite float (also inside dicts, lists, tuples) replaced by None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def json_line(obj: Any) -> str:
    return json.dumps(finite_or_none(obj), default=str, allow_nan=False)
