"""Dataclasses built while `run` imports its modules (issue 13): each costs ~1 ms of start-up CPU (its methods
generated as source and compiled), a NamedTuple ~0.2 ms. The value records on that path are NamedTuples; the
ones left are listed, and the list may only shrink. In a subprocess: the count needs fresh imports."""

from __future__ import annotations

import subprocess
import sys

ALLOWED = {
    "worker.emulator.faults.FaultConfig",  # mutable at run time; the CLI's parser imports the emulator's options
    "worker.personalize.operations.spec.Member",  # a `count` member: a tuple's own method
    "worker.personalize.operations.spec.OperationSpec",
    "worker.personalize.proxy.Proxy",  # repr=False keeps the proxy's credentials out of its repr
}

PROBE = """
import dataclasses
built = []
process = dataclasses._process_class
def counted(cls, *args, **kwargs):
    if cls.__module__.startswith("worker."):
        built.append(f"{cls.__module__}.{cls.__qualname__}")
    return process(cls, *args, **kwargs)
dataclasses._process_class = counted
from worker.cli import build_parser
build_parser()
import worker.app, worker.personalize.client  # what `run` imports before its first call
print("\\n".join(sorted(built)))
"""


def test_only_the_listed_dataclasses_are_built_on_runs_import_path() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    built = set(done.stdout.split())
    assert built <= ALLOWED, (
        f"new dataclasses on run's import path (a NamedTuple, if it is a value record?): {built - ALLOWED}"
    )
