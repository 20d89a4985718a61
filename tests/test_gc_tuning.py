"""The worker's GC tuning after start-up: start-up objects frozen out of the scans, rarer young collections
(issue 13: ~2 µs of CPU per event while draining). In a subprocess: gc.freeze() and the thresholds would
outlive the test in this one."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
from worker.app import GC_YOUNG_THRESHOLD, tune_garbage_collector
before = gc.get_threshold()
tune_garbage_collector()
after = gc.get_threshold()
assert after == (GC_YOUNG_THRESHOLD, *before[1:]), (before, after)
assert gc.get_freeze_count() > 0
print(after[0])
"""


def test_young_collections_are_rarer_and_start_up_objects_frozen() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 700  # CPython's default, a young collection every ~100 events


SLOW_START = """
import gc, weakref
from worker.app import tune_garbage_collector

class Connection:  # stands for a socket held by a retried connection's traceback cycle
    pass

def garbage():
    gc.set_threshold(0)  # start-up runs with automatic collection paused
    connection = Connection()
    cycle = {"connection": connection}
    cycle["self"] = cycle
    return weakref.ref(connection)

quick = garbage()
tune_garbage_collector(collect=False)
slow = garbage()
tune_garbage_collector(collect=True)
print(quick() is not None, slow() is None)
"""


def test_a_slow_start_up_is_collected_before_the_freeze_a_quick_one_is_not() -> None:
    """A quick start freezes its few unreachable objects (a full collection cost ~55 ms); a slow one retried
    connections, whose tracebacks' cycles hold sockets: those are collected, never frozen open."""
    done = subprocess.run([sys.executable, "-c", SLOW_START], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
