"""Ray Data decode tasks import pipeline.data.read (and through it the config tree): that must
not import torch, or every decode process pays ~650 MB and 1.5-2 s of start-up."""
import subprocess
import sys


def test_decode_path_does_not_import_torch():
    code = ("import sys, pipeline.data.read, pipeline.config, pipeline.storage; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, "torch was imported on the decode path" + r.stderr
