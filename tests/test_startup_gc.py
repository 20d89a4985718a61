"""`run` starts with the cyclic GC's automatic collections paused (issue 13: ~170 collections re-scanned the
start-up's long-lived objects, ~3% of its instructions) and turns them on again when start-up ends, or after
START_UP_GC_PAUSE_SECONDS whatever happens. The pure parts in subprocesses (thresholds would outlive the test
in this one); the whole `run` against the real broker and emulator, read through python_gc_* on /metrics."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from tests.kafka_support import create_topic
from tests.stack import WorkerFactory
from tests.test_chaos import log_lines, until
from tests.test_e2e import load, wait_committed
from worker.commands.sample import generate

PAUSED_THEN_TUNED = """
import gc
from worker.app import GC_YOUNG_THRESHOLD, tune_garbage_collector
from worker.cli import _pause_collection, _resume_collection
before = gc.get_threshold()
assert _pause_collection() == before
assert gc.get_threshold() == (0, *before[1:]), gc.get_threshold()
counted = gc.get_stats()[0]["collections"]
junk = []
for _ in range(50_000):  # cycles: with collection on, dozens of young collections
    cell = []
    cell.append(cell)
    junk.append(cell)
del junk, cell
assert gc.get_stats()[0]["collections"] == counted, "collected while paused"
tune_garbage_collector()  # the end of the worker's start-up
_resume_collection(before)  # later, a no-op: start-up's own thresholds stay
assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:]), gc.get_threshold()
"""

PAUSED_THEN_RESUMED = """
import gc
from worker.cli import _pause_collection, _resume_collection
before = gc.get_threshold()
_pause_collection()
_resume_collection(before)  # start-up never got to turn it on
assert gc.get_threshold() == before, gc.get_threshold()
"""


@pytest.mark.parametrize("probe", [PAUSED_THEN_TUNED, PAUSED_THEN_RESUMED], ids=["tuned", "resumed"])
def test_collection_is_paused_then_turned_on_again(probe: str) -> None:
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def young_collections(samples: dict[str, float]) -> float:
    return samples['python_gc_collections_total{generation="0"}']


@pytest.mark.kafka
async def test_run_starts_without_automatic_collections_and_collects_once_running(
    worker_factory: WorkerFactory,
) -> None:
    bootstrap = worker_factory.broker.bootstrap
    topic = await create_topic(bootstrap, f"gc-{uuid.uuid4().hex[:8]}", 2)
    dlq = await create_topic(bootstrap, f"{topic}.dlq", 1)
    group = f"{topic}-group"
    worker = worker_factory(worker_factory.config(topic, dlq, group))
    await until(lambda: log_lines(worker, "running"), 90, "the running line")
    started = young_collections(worker.metrics())
    # ~165 with CPython's default threshold; ~45 paused from cmd_run on; ~20 paused from cli.main on (~10
    # before it: the interpreter, runpy, cli's own imports; then a few since "running").
    assert started < 35, started

    stream = generate(4000, seed=5, duplicate_rate=0.0, malformed_rate=0.0)
    await load(bootstrap, topic, stream)
    await wait_committed(bootstrap, group, topic, timeout=120)
    assert young_collections(worker.metrics()) > started, "automatic collection never came back on"


PAUSED_BEFORE_THE_PARSER = """
import gc, sys
before = gc.get_threshold()
import worker.cli as cli
assert "asyncio" not in sys.modules and "importlib.metadata" not in sys.modules, "imported before main()"
seen = {}
pause = cli._pause_collection
def paused():
    seen["modules"] = set(sys.modules)
    return pause()
cli._pause_collection = paused
def handler(name):
    def record(args, *rest):
        seen[name] = gc.get_threshold()
        return 0
    return record
cli.cmd_map, cli.cmd_run = handler("map"), handler("run")
cli.main(["run", "--config", "x.toml"])  # first: the parser not yet built
assert seen["run"] == (0, *before[1:]), seen["run"]  # run is handed the pause
assert "asyncio" not in seen["modules"] and "importlib.metadata" not in seen["modules"], "imported unpaused"
gc.set_threshold(*before)  # as run's start-up would
cli.main(["map", "--config", "x.toml"])
assert seen["map"] == before, seen["map"]  # every other command runs with its thresholds back
for argv in (["--help"], ["--version"], ["nonsense"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
    assert gc.get_threshold() == before, (argv, gc.get_threshold())
"""


def test_main_pauses_collection_before_building_the_parser() -> None:
    """`run`'s collection is paused before the parser imports the emulator's options (asyncio, ssl) and before
    the version is read (importlib.metadata): ~40 young collections before. Every other command gets its
    thresholds back as soon as the parser has read the command (or exited: --help, --version, an error)."""
    done = subprocess.run(
        [sys.executable, "-c", PAUSED_BEFORE_THE_PARSER], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
