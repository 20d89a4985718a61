"""The layout shows the architecture, and stays that way: module size, no import cycle, the layer rules.

Every import counts — module-level, under `if TYPE_CHECKING:` and inside functions — because a lazy
import is a cycle all the same, only hidden. An import names the module it reads: `from worker.a import b`
is `worker.a.b` when that is a module, else `worker.a`; a package's `__init__` is not counted as imported by
its submodules (Python runs it first, but nothing in it may depend on them).

The layers, as data flows (see DESIGN.md, "layout"):
- `kafka` (consuming, commits, dead-letter writing) may import the flow; the flow never imports Kafka.
- `mapping` (record -> request member) imports none of flow, kafka, personalize.
- `personalize` (operations, client, rate limit, retry) imports neither kafka nor flow.
- `observe` (metrics, logs, watchdog) imports none of kafka, mapping, flow, personalize, not even for types:
  what it watches reaches it through protocols it declares itself.
- The emulator is a tool beside the product: only the commands that run it (`cli`, `commands/`) import it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "worker"
MAX_LINES = 400
OVERSIZED: dict[str, int] = {}
"""Known exceptions, at most this long; none now (the limiter's noise estimate moved to
worker/personalize/ratenoise.py). An entry may only shrink."""

# (importer's layer, layers it must not import)
FORBIDDEN: dict[str, set[str]] = {
    "flow": {"kafka", "commands", "emulator"},
    "mapping": {"flow", "kafka", "personalize", "commands", "emulator"},
    "personalize": {"kafka", "flow", "commands", "emulator"},
    "observe": {"kafka", "mapping", "flow", "personalize", "commands", "emulator"},
    "kafka": {"commands", "emulator"},
    "config": {"commands", "emulator", "kafka", "flow"},
    "app": {"commands", "emulator"},
    "errors": {"kafka", "mapping", "flow", "personalize", "observe", "commands", "emulator", "config", "app", "cli"},
}
"""Top-level modules are their own layer (`config`, `app`, `errors`; `cli` and `commands` may import anything)."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> Iterator[tuple[str, int]]:
    """Every `worker` module this one imports, anywhere in it, with the line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "worker":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "worker":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno


def graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    found = modules(root)
    known = set(found)
    return {name: dict(imports(path, name, known)) for name, path in found.items()}


def layer(module: str) -> str:
    """`worker.flow.pipeline` -> `flow`; `worker.config.kafka` -> `config`; `worker.app` -> `app`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "worker"


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, {}):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1 or node in edges[node]:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def layer_violations(edges: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for module, targets in sorted(edges.items()):
        forbidden = FORBIDDEN.get(layer(module), set())
        for target, line in sorted(targets.items()):
            if layer(target) in forbidden:
                bad.append(f"{module}:{line} imports {target}")
    return bad


def oversized(root: Path = ROOT, allowed: dict[str, int] | None = None) -> list[str]:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules(root).items()}
    limits = allowed if allowed is not None else {}
    return [f"{name}: {n} lines" for name, n in sorted(sizes.items()) if n > limits.get(name, MAX_LINES)]


def test_no_module_is_over_400_lines() -> None:
    assert oversized(allowed=OVERSIZED) == []


def test_the_known_exceptions_are_still_needed() -> None:
    """An exception that is no longer over the limit goes, so it cannot grow back unnoticed."""
    over = {line.split(":")[0] for line in oversized()}
    assert set(OVERSIZED) <= over


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_layers_import_only_downstream() -> None:
    assert layer_violations(graph()) == []


def test_every_package_says_what_lives_there() -> None:
    """Each folder's `__init__` says what lives there and what it must not know, in a docstring."""
    for init in ROOT.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} has no docstring"


# --- the checks themselves: each must fail on a violation -------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "worker"
    for name, text in {"__init__.py": '"""x"""\n', **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("importer", "statement"),
    [
        ("flow/pipeline.py", "from worker.kafka.deadletter import DeadLetterWriter"),
        ("mapping/mapper.py", "from worker.flow import pipeline"),
        ("mapping/mapper.py", "import worker.personalize.sink"),
        ("mapping/mapper.py", "from worker.kafka.source import Source"),
        ("personalize/sink.py", "from worker.flow.pipeline import Pipeline"),
        ("personalize/sink.py", "from ..kafka import source"),
        ("observe/health.py", "from worker.flow.pipeline import Pipeline"),
        ("observe/health.py", "if TYPE_CHECKING:\n    from worker.mapping.mapper import SessionKey"),
        ("config.py", "def f():\n    from worker.emulator.server import run_emulator"),
        ("kafka/source.py", "from worker import emulator"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path: Path, importer: str, statement: str) -> None:
    files = {
        f"{p}/__init__.py": '"""x"""\n' for p in ("kafka", "flow", "mapping", "personalize", "observe", "emulator")
    }
    files |= {
        "kafka/deadletter.py": "",
        "kafka/source.py": "",
        "flow/pipeline.py": "",
        "mapping/mapper.py": "",
        "personalize/sink.py": "",
        "observe/health.py": "",
        "emulator/server.py": "",
        "config.py": "",
    }
    files[importer] = statement + "\n"
    edges = graph(_tree(tmp_path, files))
    assert len(layer_violations(edges)) == 1, edges


def test_a_cycle_is_caught_even_through_a_lazy_import(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "a.py": "from worker import b\n",
            "b.py": "from worker.c import f\n",
            "c.py": "def f():\n    from worker.a import x\n",
            "d.py": "import worker.a\n",
        },
    )
    assert cycles(graph(root)) == [["worker.a", "worker.b", "worker.c"]]


def test_a_package_init_importing_its_own_module_is_no_cycle(tmp_path: Path) -> None:
    root = _tree(
        tmp_path, {"p/__init__.py": "from worker.p.m import x\n", "p/m.py": "from worker.p.n import y\n", "p/n.py": ""}
    )
    assert cycles(graph(root)) == []


def test_a_long_module_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"big.py": "x = 1\n" * (MAX_LINES + 1), "small.py": "x = 1\n" * MAX_LINES})
    assert oversized(root) == [f"worker.big: {MAX_LINES + 1} lines"]
