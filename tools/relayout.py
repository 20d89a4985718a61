"""Issue 13's move: the flat `worker/` modules into folders that show the data flow, and every reference after them.

Run from the repository root: `python tools/relayout.py`. It `git mv`s each old module that still exists and
rewrites `worker.X` module names and `worker/X.py` paths in the code, tests, build, deploy and docs. It is
idempotent, so after merging a branch that still edits the old flat paths, move that branch's changes over
(git's rename detection usually does) and run it again to fix the references the branch added.
"""

from __future__ import annotations

import io
import itertools
import re
import subprocess
import sys
import tokenize
from pathlib import Path

MOVES: dict[str, str] = {
    # The Kafka side: consuming, committing, dead-letter writing, the connection and its security.
    "source": "kafka.source",
    "deadletter": "kafka.deadletter",
    "connection": "kafka.connection",
    "msk": "kafka.msk",
    "topics": "kafka.topics",
    "positions": "kafka.positions",
    "codecs": "kafka.codecs",
    # Record -> request member: decoding, expressions, the mapper, presets, schemas.
    "mapping": "mapping.mapper",
    "expressions": "mapping.expressions",
    "values": "mapping.values",
    "interactions": "mapping.interactions",
    "presets": "mapping.presets",
    "layouts": "mapping.layouts",
    "snowplow": "mapping.snowplow",
    "avro": "mapping.avro",
    "protobuf": "mapping.protobuf",
    "schemas": "mapping.schemas",
    "registry": "mapping.registry",
    "limits": "mapping.limits",
    # The record lifecycle, generic over operations.
    "pipeline": "flow.pipeline",
    "offsets": "flow.offsets",
    "batching": "flow.batching",
    "dedup": "flow.dedup",
    "coalescing": "flow.coalescing",
    "destinations": "flow.destinations",
    "routes": "flow.routes",
    # The Personalize side.
    "operations": "personalize.operations",
    "sink": "personalize.sink",
    "http": "personalize.http",
    "proxy": "personalize.proxy",
    "ratelimit": "personalize.ratelimit",
    "ratetally": "personalize.ratetally",
    "retry": "personalize.retry",
    "schema_source": "personalize.schema_source",
    # Watching it run.
    "metrics": "observe.metrics",
    "logs": "observe.logs",
    "health": "observe.health",
    # Commands that are not the service.
    "check": "commands.check",
    "demo": "commands.demo",
    "sample": "commands.sample",
    "produce": "commands.produce",
    "replay": "commands.replay",
    "route_map": "commands.route_map",
    "registry_check": "commands.registry_check",
}
# Later steps split and add modules; the rewrite must leave their names alone when it runs again.
NEW_SUBMODULES = {
    "mapping": {
        "mapper",
        "expressions",
        "values",
        "interactions",
        "presets",
        "layouts",
        "snowplow",
        "avro",
        "protobuf",
        "schemas",
        "registry",
        "limits",
        "settings",
    }
}
PACKAGES = {
    "kafka": "The Kafka side: consuming, the one place that commits, the dead-letter writer, security.\n\n"
    "Imports the flow (the ordered finalizer, the dead-letter record); the flow never imports this.",
    "mapping": "A Kafka record -> a request member: decoding (json/avro/protobuf), expressions, the mapper.\n\n"
    "Knows nothing of the flow, Kafka consuming or calling Personalize.",
    "flow": "The record lifecycle, generic over operations: intake, batching, dedup, coalescing, offsets, delivery.\n\n"
    "Knows nothing of Kafka clients: the source feeds it and commits what it finalizes.",
    "personalize": "The Personalize side: operations, the lean HTTP client and signing, rate limit, retry.\n\n"
    "Knows nothing of Kafka or the flow: it sends requests and says how each ended.",
    "observe": "Watching it run: metrics, logs, the stall watchdog.\n\n"
    "Knows no layer's internals: what it watches comes in through small protocols.",
    "commands": "The commands that are not the service: check, demo, map dry runs, replay, produce, sample.\n\n"
    "The service never imports these.",
}
SCANNED = ("worker", "tests", "tools", "Makefile", "pyproject.toml", "deploy", "config", ".ci", "docs", "README.md")
SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".cfg", ".txt", ".sh", ".json", ""}


def move(root: Path) -> None:
    """`git mv` what is still at its old place, and give each new folder its `__init__.py`."""
    for package, doc in PACKAGES.items():
        folder = root / "worker" / package
        folder.mkdir(exist_ok=True)
        init = folder / "__init__.py"
        if not init.exists() and not (root / "worker" / f"{package}.py").exists():
            init.write_text(f'"""{doc}\n"""\n')
    for old, new in MOVES.items():
        src = root / "worker" / f"{old}.py"
        if old == "operations":
            src = root / "worker" / "operations"
        if not src.exists():
            continue
        dst = root / "worker" / (new.replace(".", "/") + ("" if src.is_dir() else ".py"))
        if old == "mapping":
            tmp = root / "worker" / "_mapping_tmp.py"
            subprocess.run(["git", "mv", str(src), str(tmp)], check=True)
            (root / "worker" / "mapping").mkdir(exist_ok=True)
            subprocess.run(["git", "mv", str(tmp), str(dst)], check=True)
            init = root / "worker" / "mapping" / "__init__.py"
            init.write_text(f'"""{PACKAGES["mapping"]}\n"""\n')
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "mv", str(src), str(dst)], check=True)


_NAMES = "|".join(sorted(MOVES, key=len, reverse=True))
_DOTTED = re.compile(rf"(?<![\w.])worker\.({_NAMES})(?![\w])(\.\w+| import \w+)?")
_FROM = re.compile(rf"\bfrom worker import ({_NAMES})\b(?!\.)")
_PATH = re.compile(rf"(?<![\w./])worker/({_NAMES})(\.py|/)")


# Modules whose logger keeps its pre-move name: a string that is exactly that name is a logger's, left alone.
LOGGERS = {"pipeline", "health", "sink", "ratelimit", "schemas", "connection", "source", "topics", "deadletter"}


def _dotted(match: re.Match[str]) -> str:
    old, rest = match.group(1), match.group(2) or ""
    text = match.string
    quoted = match.start() > 0 and text[match.start() - 1] in "\"'" and text[match.end() : match.end() + 1] in "\"'"
    if old in LOGGERS and not rest and quoted:
        return match.group(0)
    if rest.removeprefix(" import ").removeprefix(".") in NEW_SUBMODULES.get(old, ()):  # already the new layout
        return match.group(0)
    return f"worker.{MOVES[old]}{rest}"


def _from(match: re.Match[str]) -> str:
    package, _, name = MOVES[match.group(1)].rpartition(".")
    return f"from worker.{package} import {name}"


def _path(match: re.Match[str]) -> str:
    old, tail = match.group(1), match.group(2)
    if old in NEW_SUBMODULES and tail == "/":
        return match.group(0)
    return "worker/" + MOVES[old].replace(".", "/") + tail


# Logger names keep their pre-move spelling (log filters and alerts match them): lines naming one are left alone.
_LOGGER = re.compile(r"getLogger\(|logger=|\.name == ")
_IMPORT_LINE = re.compile(r"\s*(from|import) worker\b")


def _code_refs(text: str) -> set[tuple[int, int]]:
    """Where `worker.` is code, not text: there it may be a variable named `worker` (a test's Worker object)."""
    refs: set[tuple[int, int]] = set()
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return refs
    for token, after in itertools.pairwise(tokens):
        if token.type == tokenize.NAME and token.string == "worker" and after.string == ".":
            refs.add((token.start[0] - 1, token.start[1]))
    return refs


def rewrite(text: str, python: bool = False) -> str:
    # In Python, code outside imports names the module only where the file imports it as `import worker.x`.
    skip = _code_refs(text) if python and not re.search(r"^\s*import worker\.", text, re.M) else set()
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if _LOGGER.search(line):
            continue
        if _IMPORT_LINE.match(line) or not any(row == i for row, _ in skip):
            lines[i] = _PATH.sub(_path, _DOTTED.sub(_dotted, _FROM.sub(_from, line)))
            continue
        cols = {col for row, col in skip if row == i}

        def dotted(match: re.Match[str], cols: set[int] = cols) -> str:
            return match.group(0) if match.start() in cols else _dotted(match)

        lines[i] = _PATH.sub(_path, _DOTTED.sub(dotted, line))
    return "".join(lines)


def files(root: Path) -> list[Path]:
    out: list[Path] = []
    for name in SCANNED:
        path = root / name
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out.extend(
                p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
            )
    return [p for p in out if p.name != "relayout.py"]


def main() -> int:
    root = Path.cwd()
    if not (root / "worker").is_dir():
        sys.exit("run from the repository root")
    move(root)
    # Whatever the mapping package holds now is the new layout, modules added after this script too.
    NEW_SUBMODULES["mapping"] |= {path.stem for path in (root / "worker" / "mapping").glob("*.py")}
    changed = 0
    for path in files(root):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        new = rewrite(text, python=path.suffix == ".py")
        if new != text:
            path.write_text(new)
            changed += 1
    print(f"relayout: {changed} files rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
