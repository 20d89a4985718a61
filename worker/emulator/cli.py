"""``personalize-worker emulator`` and ``python -m worker.emulator``: options and ``serve``.

Imports nothing heavy at module level: the worker's own CLI builds this parser for every command, and
the server (aiohttp app, compiled model) loads only when the emulator actually runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from worker.emulator.faults import DOCUMENTED_QUOTAS, parse_groups, parse_quotas

_QUOTA_HELP = ",".join(f"{op}={rate:g}" for op, rate in DOCUMENTED_QUOTAS.items() if rate is not None)


def _ids(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``personalize-worker emulator`` and ``python -m worker.emulator``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8787, help="port; 0 picks a free one (default %(default)s)")
    parser.add_argument("--tracking-ids", default=None, help="comma-separated known trackers (default any)")
    parser.add_argument("--dataset-arns", default=None, help="comma-separated known dataset ARNs (default any)")
    parser.add_argument(
        "--tracker-groups",
        default=None,
        help="TRACKER=GROUP,...: trackers of one dataset group share its quota (default: one group each)",
    )
    parser.add_argument("--access-key", default=None, help="only accept this access key id")
    parser.add_argument("--secret-key", default=None, help="verify SigV4 signatures (and their age) with this secret")
    parser.add_argument(
        "--quota",
        default=None,
        help=f"requests/s per operation and destination, OP=RATE,... (0: unlimited; 'off': none at all); "
        f"unnamed operations keep the documented {_QUOTA_HELP}",
    )
    parser.add_argument(
        "--max-tps", type=float, default=None, help="the PutEvents quota alone (same as --quota events=N)"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added latency per request")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- jitter on the latency")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered 500")
    parser.add_argument("--outage", action="store_true", help="answer every request 503")
    parser.add_argument("--record", default=None, help="append accepted events as ndjson to this file")
    parser.add_argument("--seed", type=int, default=None, help="seed for error injection and jitter")
    parser.add_argument("--tls-cert", default=None, help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--tls-key", default=None, help="its PEM private key (default: in --tls-cert)")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The Emulator's keyword arguments; ValueError for a malformed --quota or --tracker-groups."""
    return {
        "tracking_ids": _ids(args.tracking_ids),
        "dataset_arns": _ids(args.dataset_arns),
        "tracker_groups": parse_groups(args.tracker_groups) if args.tracker_groups else None,
        "access_key": args.access_key,
        "secret_key": args.secret_key,
        "quotas": parse_quotas(args.quota) if args.quota else None,
        "max_tps": args.max_tps,
        "latency_ms": args.latency_ms,
        "jitter_ms": args.jitter_ms,
        "error_rate": args.error_rate,
        "outage": args.outage,
        "record": args.record,
        "seed": args.seed,
    }


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The server side of --tls-cert/--tls-key, or None for plain HTTP."""
    if cert is None:
        if key is not None:
            raise ValueError("--tls-key needs --tls-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def _serve_until_signalled(
    host: str, port: int, options: dict[str, Any], ssl_context: ssl.SSLContext | None = None
) -> None:
    from worker.emulator.server import run_emulator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with run_emulator(host, port, ssl_context, **options) as running:
        # As in the worker: the loaded models and modules out of the cyclic GC's full collections, which
        # otherwise stall every answer for tens of milliseconds and show up as the worker's latency.
        gc.collect()
        gc.freeze()
        scheme = "https" if ssl_context is not None else "http"
        print(f"emulator listening on {scheme}://{host}:{running.port}", flush=True)
        await stop.wait()


def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; the exit code for the CLI."""
    try:
        context = tls_context(args.tls_cert, args.tls_key)
        asyncio.run(_serve_until_signalled(args.host, args.port, options_from_args(args), context))
    except (OSError, ValueError) as error:
        print(f"emulator: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.emulator", description="A local stand-in for Amazon Personalize Events."
    )
    add_arguments(parser)
    return serve(parser.parse_args(argv))
