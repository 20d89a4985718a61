"""The documents a newcomer reads first stay true: the README's configuration reference and the example
config cover every key of the settings model with its real default; the README's first screen, its
troubleshooting and the changelog exist where the README says."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined

from worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE = (ROOT / "config" / "worker.example.toml").read_text(encoding="utf-8")
UNSET = "—"
REQUIRED = "required"


def model_defaults() -> dict[str, dict[str, Any]]:
    """{section: {key: default}}, with REQUIRED for keys without one; tuples as lists, as TOML reads them."""
    sections: dict[str, dict[str, Any]] = {}
    for section, field in Settings.model_fields.items():
        if section == "routes":  # an array of tables, documented in its own README section, not a key table
            continue
        model = field.annotation
        assert isinstance(model, type)
        keys: dict[str, Any] = {}
        for name, info in model.model_fields.items():
            key = info.alias or name  # the TOML key (mapping.schema is `schema_file` in the model)
            if info.default is PydanticUndefined and info.default_factory is None:
                keys[key] = REQUIRED
            else:
                value = info.get_default(call_default_factory=True)
                keys[key] = list(value) if isinstance(value, tuple) else value
        sections[section] = keys
    # Required unless [[routes]] name their destinations (load_settings says so by this key's name).
    sections["personalize"]["tracking_id"] = REQUIRED
    return sections


def readme_reference() -> dict[str, dict[str, str]]:
    """{section: {key: default cell}} from the README's `#### [section]` tables."""
    reference = README[README.index("## Configuration reference") :]
    reference = reference[: reference.index("\n## ", 1)]
    tables: dict[str, dict[str, str]] = {}
    for section, body in re.findall(r"^#### `\[(\w+)\]`\n(.*?)(?=^#### |\Z)", reference, re.MULTILINE | re.DOTALL):
        rows = re.findall(r"^\| `(\w+)` \| (.+?) \| .+ \|$", body, re.MULTILINE)
        tables[section] = dict(rows)
    return tables


def parse_default(cell: str) -> Any:
    if cell in (UNSET, REQUIRED):
        return None if cell == UNSET else REQUIRED
    assert cell.startswith("`") and cell.endswith("`"), f"default {cell!r} is not a `TOML value`"
    return tomllib.loads(f"v = {cell[1:-1]}")["v"]


def test_readme_reference_lists_every_key_with_its_default() -> None:
    defaults = model_defaults()
    reference = readme_reference()
    assert reference.keys() == defaults.keys(), "one table per section"
    for section, keys in defaults.items():
        assert reference[section].keys() == keys.keys(), f"[{section}] keys differ from worker/config.py"
        for key, default in keys.items():
            documented = parse_default(reference[section][key])
            assert documented == default, f"{section}.{key}: README says {documented!r}, the model {default!r}"


def test_example_config_shows_every_key() -> None:
    """Each key appears set (`key = `) or commented out (`# key = `) in its section of the example."""
    defaults = model_defaults()
    parts = re.split(r"^\[([\w.]+)\]", EXAMPLE, flags=re.MULTILINE)
    text = {name: body for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    text["mapping"] += text.pop("mapping.event_types")  # `event_types` is its own TOML table
    for section, keys in defaults.items():
        for key in keys:
            shown = re.search(rf"^(# )?{key} = ", text[section], re.MULTILINE) or (
                key == "event_types" and "[mapping.event_types]" in EXAMPLE
            )
            assert shown, f"config/worker.example.toml does not show {section}.{key}"
    active = tomllib.loads(EXAMPLE)
    for section, keys in active.items():
        for key, value in keys.items():
            expected = defaults[section][key]
            if (section, key) in {("personalize", "tracking_id"), ("mapping", "properties")}:
                continue  # placeholders for the required key and the example message's properties
            assert value == expected, f"example sets {section}.{key} = {value!r}, the default is {expected!r}"


def test_readme_first_screen_says_what_it_is_and_the_two_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:30])
    assert "Kafka" in first_screen and "Personalize" in first_screen
    for command in ("make demo", "make test", "make test-fast"):
        assert command in first_screen
    assert "Next:" in first_screen


def test_readme_links_resolve_and_sections_exist() -> None:
    headings = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", README, re.M)
    }
    for anchor in re.findall(r"\]\(#([\w-]+)\)", README):
        assert anchor in headings, f"README links to #{anchor}, which is no heading"
    for target in re.findall(r"\]\((?!https?:|#)([^)#]+)", README):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    for section in ("## Troubleshooting", "### Exit codes", "## Configuration reference", "## Performance"):
        assert section in README
    assert "docs/performance.md" in README and (ROOT / "docs" / "performance.md").is_file()


def test_changelog_follows_keep_a_changelog() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "keepachangelog.com" in changelog
    assert re.search(r"^## \[Unreleased\]$", changelog, re.MULTILINE)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert re.search(rf"^## \[{re.escape(version)}\]", changelog, re.MULTILINE)


def test_make_announces_the_system_package_before_installing_it_and_has_a_fast_subset() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile[makefile.index("prometheus-tools:") :]
    announce = recipe.index("echo \"make: installing the Debian package 'prometheus'")
    assert announce < recipe.index("apt-get update")
    fast = re.search(r"^test-fast:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert fast and all(f"not {marker}" in fast[1] for marker in ("chaos", "e2e", "slow"))
    assert "make test-fast" in README
