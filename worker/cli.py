"""`personalize-worker run | map | check | produce | emulator | demo`: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.errors import ConfigError

if TYPE_CHECKING:
    import asyncio

    from worker.config import Settings

START_UP_GC_PAUSE_SECONDS = 30.0
"""Automatic collection comes back on after this long even if `run` has not finished starting by then."""


def _load(path: str) -> Settings:
    """The settings `run`, `map` and `check` all start from, validated the same way for all three: what
    would stop `run` at start-up stops the other two first."""
    from worker.config import load_settings  # not at the top: `run` imports it with collection paused
    from worker.mapping.mapper import Mapper

    try:
        settings = load_settings(Path(path))
        try:
            Mapper(settings.mapping)  # config validation covers its rules; this keeps it that way
        except (ValueError, AssertionError) as error:
            raise ConfigError(f"invalid configuration:\n  mapping: {error}") from None
    except ConfigError as error:
        print(f"personalize-worker: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


class _EarlyStop:
    """SIGTERM/SIGINT before the worker's loop takes the signals over (imports, building the worker): noted
    and honoured as soon as it runs, the way a later one is, instead of killing the process mid-way."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (Linux, macOS): in the benchmark it cut the worker's CPU per event
    by ~15% (76.5 → 64.9 µs). The standard loop otherwise; behaviour is the same."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _pause_collection() -> tuple[int, int, int]:
    """No automatic collection by the cyclic GC while the worker starts: nearly everything start-up allocates
    lives as long as the process (modules, classes, pydantic's validators, botocore's models), and the ~120
    young collections meanwhile (each tenth an older one) scanned it again and again for nothing: 3.4% of
    start-up's instructions. A young threshold of 0 is CPython's "off"; the end of start-up turns it on again
    (`app.tune_garbage_collector`: the start-up objects frozen, then the run-time thresholds),
    `_resume_collection` if it never gets there."""
    before = gc.get_threshold()
    gc.set_threshold(0, *before[1:])
    return before


def _resume_collection(before: tuple[int, int, int]) -> None:
    """Automatic collection on again if start-up has not turned it on (slower than START_UP_GC_PAUSE_SECONDS:
    a broker or a credential source slow to answer), so memory stays bounded whatever start-up meets."""
    if gc.get_threshold()[0] == 0:
        gc.set_threshold(*before)


def cmd_run(args: argparse.Namespace, collection: tuple[int, int, int] | None = None) -> int:
    """`collection`: the thresholds from before `main` paused collection (paused here when not given)."""
    early = _EarlyStop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, early)
    if collection is None:
        collection = _pause_collection()

    import asyncio
    import logging

    from worker.app import Worker, describe
    from worker.observe import logs

    settings = _load(args.config)
    logs.configure(settings.worker.log_level, settings.worker.log_format)

    async def main() -> int:
        asyncio.get_running_loop().call_later(START_UP_GC_PAUSE_SECONDS, _resume_collection, collection)
        return await Worker(settings, until_drained=args.until_drained).run(
            stop_requested_before=lambda: early.requested
        )

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(main())
    except Exception as error:  # what the worker could not report itself (building it): what, not a traceback
        logging.getLogger("worker.cli").error("worker failed", extra={"where": "start-up", "error": describe(error)})
        return 1


def cmd_map(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings.routes or args.route is not None:
        return _map_route(settings, args)
    if args.topic is not None or settings.mapping.format != "json":
        from worker.commands import replay

        return replay.run(settings, args, sys.stdout)
    from worker.commands.dry_run import dry_run

    return _map_lines(args, lambda lines: dry_run(settings, lines, sys.stdout))


def _map_lines(args: argparse.Namespace, run: Callable[[Iterable[bytes]], dict[str, Any]]) -> int:
    if args.input in (None, "-"):
        summary = run(sys.stdin.buffer)
    else:
        try:
            with open(args.input, "rb") as source:
                summary = run(source)
        except OSError as error:
            print(f"personalize-worker: {args.input}: {error.strerror or error}", file=sys.stderr)
            return 2
    # A sample that would feed the dead-letter topic fails, so a mapping change can be gated in CI.
    return 1 if summary["dead_lettered"] else 0


def _map_route(settings: Settings, args: argparse.Namespace) -> int:
    """`map --route NAME`: one route's dry run; without it on a multi-route config, which routes there are."""
    from worker.commands.route_map import describe_routes, dry_run_route, find
    from worker.config import MappingSettings

    name = args.route if args.route is not None or len(settings.routes) != 1 else settings.routes[0].name
    route = find(settings, name) if name is not None else None
    if route is None:
        said = f"no route named {name!r}" if name is not None else "this config has several routes"
        routes = describe_routes(settings)
        print(f"personalize-worker: {said}; choose one with --route NAME:\n{routes}", file=sys.stderr)
        return 2
    if args.topic is not None or (isinstance(route.mapping, MappingSettings) and route.mapping.format != "json"):
        print(
            "personalize-worker: map --route reads JSON lines (--input or standard input); --topic and the "
            "registry formats are dry-run without routes for now",
            file=sys.stderr,
        )
        return 2
    return _map_lines(args, lambda lines: dry_run_route(route, lines, sys.stdout))


def cmd_check(args: argparse.Namespace) -> int:
    import asyncio

    from worker.commands.check import run_checks

    settings = _load(args.config)
    return asyncio.run(run_checks(settings))


def cmd_produce(args: argparse.Namespace) -> int:
    import asyncio

    from worker.commands.produce import lines_of, produce, sample_of
    from worker.config import KafkaSettings

    settings = _load(args.config) if args.config else None
    kafka = settings.kafka if settings else KafkaSettings()
    if args.bootstrap_servers:
        kafka = kafka.model_copy(update={"bootstrap_servers": args.bootstrap_servers})
    topic = args.topic or kafka.topics[0]
    session_path = settings.mapping.session_id if settings else "session_id"
    try:
        if args.sample is not None:
            sent = asyncio.run(produce(kafka, topic, sample_of(args.sample, args.seed)))
        elif args.input in (None, "-"):
            sent = asyncio.run(produce(kafka, topic, lines_of(sys.stdin.buffer, session_path)))
        else:
            with open(args.input, "rb") as source:
                sent = asyncio.run(produce(kafka, topic, lines_of(source, session_path)))
    except Exception as error:
        print(f"personalize-worker: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"produced {sent} messages to {topic!r} at {kafka.bootstrap_servers}", file=sys.stderr)
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from worker import emulator

    return emulator.serve(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.commands.demo import run_demo

    return run_demo(args)


DESCRIPTION = """\
Streams clickstream from Kafka into Amazon Personalize (PutEvents): every message mapped to an event
with a stable eventId, deduplicated, packed up to 10 events per call by session, sent within the
request quota; bad records go to a dead-letter topic; offsets are committed only for finished records."""

EPILOG = """\
first steps:
  personalize-worker demo                          the whole job on a local broker and emulator
  personalize-worker map --config worker.toml < sample.jsonl    see what each message becomes
  personalize-worker check --config worker.toml    are Kafka and Personalize reachable with it?
  personalize-worker run --config worker.toml      the service

exit codes: 0 done (or stopped by SIGTERM/SIGINT after draining), 1 failed (start-up, a check, a
crashed loop: the message says why), 2 bad configuration or arguments.
settings: config/worker.example.toml documents every key; PW_<SECTION>__<KEY> overrides any of them."""

CONFIG_HELP = "TOML settings file (every key documented in config/worker.example.toml; PW_<SECTION>__<KEY> overrides)"


class _Version(argparse._VersionAction):
    """argparse's `--version`, the version read only when asked for: `run` never needs importlib.metadata before
    its start-up has paused collection (see `main`)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        from worker import __version__

        self.version = f"%(prog)s {__version__}"
        super().__call__(parser, namespace, values, option)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="personalize-worker",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, more: str = "", epilog: str | None = None) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name, help=text, description=text[0].upper() + text[1:] + "." + (" " + more if more else ""), epilog=epilog
        )
        return sub

    run = command(
        "run",
        "consume Kafka and send events to Personalize (the service)",
        "Source topics are never created: a missing one is waited for (/readyz says which), or with "
        "--until-drained is an error.",
        "exit status: 0 stopped on request (SIGTERM/SIGINT, also during start-up) or drained; "
        '1 failed (one "worker failed" log line names the cause); 2 invalid configuration',
    )
    run.add_argument("--config", required=True, help=CONFIG_HELP)
    run.add_argument(
        "--until-drained",
        action="store_true",
        help="exit once every assigned partition is read to its end and committed (backfills, tests)",
    )
    run.set_defaults(handler=cmd_run)

    dry = command(
        "map",
        "dry-run the mapping over JSON lines or framed records: no AWS",
        "For each line, the call it would join or why it would be dead-lettered; then a summary.",
        "exit status: 0 every line maps (or is filtered, or a duplicate); 1 some line would be "
        "dead-lettered; 2 invalid configuration or unreadable input",
    )
    dry.add_argument("--config", required=True, help=CONFIG_HELP)
    dry.add_argument(
        "--route",
        help="with [[routes]]: the route to dry-run (its operation's mapping, batch or coalescing key); "
        "without it, map lists the routes",
    )
    dry.add_argument(
        "--input",
        help="JSON lines; for mapping.format avro/protobuf/json_schema one record value per line in base64 "
        "(or hex, --encoding) (default: standard input)",
    )
    dry.add_argument("--encoding", choices=("base64", "hex"), default="base64", help="of framed records in --input")
    dry.add_argument("--topic", help="read the records from Kafka (kafka.* settings) instead of --input")
    dry.add_argument("--partition", type=int, default=0, help="with --topic: the partition to read")
    dry.add_argument("--offset", type=int, default=0, help="with --topic: the first offset to read")
    dry.add_argument("--count", type=int, default=10, help="with --topic: how many records to read")
    dry.set_defaults(handler=cmd_map)

    check = command(
        "check",
        "validate the config as `run` does and reach Kafka and Personalize with it",
        "Kafka: topics, the dead-letter topic and its size limits, compression codecs; Personalize; the schema "
        "registry when one is configured.",
        "exit status: 0 every check passed (WARN lines included); 1 some check failed; 2 invalid configuration",
    )
    check.add_argument("--config", required=True, help=CONFIG_HELP)
    check.set_defaults(handler=cmd_check)

    produce = command("produce", "put test messages (JSON lines or a sample) on a Kafka topic")
    produce.add_argument("--config", help=CONFIG_HELP + "; its [kafka] connection and mapping.session_id are used")
    produce.add_argument("--bootstrap-servers", help="host:port list (default: the config's, else localhost:9092)")
    produce.add_argument("--topic", help="topic to write (default: the config's first source topic, else clickstream)")
    source = produce.add_mutually_exclusive_group()
    source.add_argument("--input", help="JSON lines file, one message per line (default: standard input)")
    source.add_argument(
        "--sample", type=int, metavar="N", help="instead of input, N records of a synthetic clickstream"
    )
    produce.add_argument("--seed", type=int, default=7, help="seed of the synthetic clickstream (default %(default)s)")
    produce.set_defaults(handler=cmd_produce)

    from worker import emulator

    emu = command("emulator", "the local Personalize Events stand-in (a worker using it needs dummy AWS keys)")
    emulator.add_arguments(emu)
    emu.set_defaults(handler=cmd_emulator)

    demo = command("demo", "the whole job on a local broker and emulator, start to finish")
    demo.add_argument(
        "--records", type=int, default=20_000, help="clickstream records to produce (default %(default)s)"
    )
    demo.add_argument("--partitions", type=int, default=6, help="partitions of the demo topic (default %(default)s)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Collection paused from here, not only from `cmd_run` on: building the parser imports the emulator's
    # options (asyncio, ssl), ~40 young collections of `run`'s start-up (1.3% of its instructions) before.
    # Every other command gets its thresholds back as soon as it is known.
    collection = _pause_collection()
    try:
        args = build_parser().parse_args(argv)
    except BaseException:  # --help, --version, a usage error: exits, but a caller in-process goes on
        _resume_collection(collection)
        raise
    code: int
    if args.handler is cmd_run:
        code = cmd_run(args, collection)
    else:
        _resume_collection(collection)
        code = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
