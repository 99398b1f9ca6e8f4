"""The autouse guard of tests/conftest.py (nothing left behind for the next test) sees what it
forbids: a non-daemon thread still running is named; one that ends within the grace is not."""
from __future__ import annotations

import threading
import time

from tests.conftest import _leftover_threads


def test_a_lingering_non_daemon_thread_is_named_and_a_finishing_one_is_not():
    before = set(threading.enumerate())
    stop = threading.Event()
    lingering = threading.Thread(target=stop.wait, name="lingering")
    finishing = threading.Thread(target=time.sleep, args=(0.3,), name="finishing")
    daemon = threading.Thread(target=stop.wait, name="daemonic", daemon=True)
    for t in (lingering, finishing, daemon):
        t.start()
    try:
        assert _leftover_threads(before, grace_s=1.0) == ["lingering"]
    finally:
        stop.set()
        lingering.join()
