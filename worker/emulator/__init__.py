"""The local Personalize Events stand-in: REST-JSON, SigV4, model validation, quotas, faults, inspection.
A tool beside the product: the worker never imports it (only its CLI builds the ``emulator`` subcommand)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.emulator.cli import add_arguments, main, serve

if TYPE_CHECKING:
    from worker.emulator.server import Emulator, RunningEmulator, run_emulator

__all__ = ["Emulator", "RunningEmulator", "add_arguments", "main", "run_emulator", "serve"]

_SERVER_NAMES = frozenset({"Emulator", "RunningEmulator", "run_emulator"})


def __getattr__(name: str) -> Any:
    """The server's names load on first use, so building the worker's CLI parser stays light."""
    if name in _SERVER_NAMES:
        from worker.emulator import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
