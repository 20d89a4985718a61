"""Library log floods are thinned (observe/logs.py): a broker outage must not bury the worker's own alarms."""

from __future__ import annotations

import io
import logging

import orjson

from worker.observe.logs import JsonFormatter, RepeatFilter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _logger(clock: Clock) -> tuple[io.StringIO, logging.Handler]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter(("aiokafka",), every=30.0, clock=clock))
    return out, handler


def test_a_repeated_library_line_shows_once_per_period_with_the_count_held_back() -> None:
    clock = Clock()
    out, handler = _logger(clock)
    log = logging.getLogger("aiokafka.consumer.group_coordinator")
    log.addHandler(handler)
    log.propagate = False
    try:
        for _ in range(300):  # ~10/s for 30 s, as aiokafka does while the broker is down
            log.error("Group Coordinator Request failed: %s", "[Error 7] NodeNotReadyError")
            clock.now += 0.1
        clock.now = 130.5  # the period is over
        log.error("Group Coordinator Request failed: %s", "[Error 7] NodeNotReadyError")
        log.error("Coordinator dead, marking %s", "node 1")  # another line is not held back by the first
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == [
        "Group Coordinator Request failed: [Error 7] NodeNotReadyError",
        "Group Coordinator Request failed: [Error 7] NodeNotReadyError",
        "Coordinator dead, marking node 1",
    ]
    assert "repeated" not in lines[0]
    assert lines[1]["repeated"] == 299


def test_the_workers_own_lines_are_never_held_back() -> None:
    clock = Clock()
    out, handler = _logger(clock)
    log = logging.getLogger("worker.source")
    log.addHandler(handler)
    log.propagate = False
    try:
        for _ in range(5):
            log.warning("partition paused")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert len(out.getvalue().splitlines()) == 5


def test_the_keys_stay_bounded() -> None:
    clock = Clock()
    flt = RepeatFilter(("aiokafka",), clock=clock)
    for n in range(10 * RepeatFilter.MAX_KEYS):
        record = logging.LogRecord("aiokafka", logging.ERROR, "", 0, f"line {n}", None, None)
        assert flt.filter(record)
    assert len(flt._seen) <= RepeatFilter.MAX_KEYS
