"""Presets: the conventional mapping of a well-known event stream, shipped as TOML under config/presets/.

A preset is a readable file holding one `[mapping]` table, so a user can read what it does, copy it
and edit it. `[mapping] preset = "segment"` (or the path of such a file) fills every key the user's
own `[mapping]` leaves out; the keys the user sets win. Resolved once, when the settings are read.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any, Final

NAMES: Final = ("segment", "rudderstack", "snowplow", "cloudevents")
_SHIPPED: Final = (
    Path(__file__).resolve().parents[2] / "config" / "presets",  # a source checkout or editable install
    Path(sys.prefix) / "share" / "personalize-worker" / "presets",  # installed from the wheel (data-files)
)


def preset_path(name: str) -> Path:
    """Where a preset's file is: a shipped name, or a path to a TOML file of the same shape."""
    if name in NAMES:
        for folder in _SHIPPED:
            candidate = folder / f"{name}.toml"
            if candidate.is_file():
                return candidate
        raise ValueError(f"preset {name!r}: its file is not installed (looked in {', '.join(map(str, _SHIPPED))})")
    if not name.endswith(".toml"):
        raise ValueError(f"{name!r} is not a preset ({' | '.join(NAMES)}) nor the path of a .toml preset file")
    return Path(name)


def load_preset(name: str) -> dict[str, Any]:
    """The preset's `[mapping]` table; ValueError says what is wrong with the file."""
    path = preset_path(name)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"preset file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"preset file {str(path)!r} cannot be read ({type(error).__name__})") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"preset file {str(path)!r} is not valid TOML ({error})") from None
    table = document.get("mapping")
    if not isinstance(table, dict) or set(document) != {"mapping"}:
        raise ValueError(f"preset file {str(path)!r} must hold one [mapping] table and nothing else")
    if "preset" in table:
        raise ValueError(f"preset file {str(path)!r}: a preset cannot name another preset")
    return table


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """The user's `[mapping]` over the preset's: keys set by the user win, whole (tables are not merged)."""
    preset = load_preset(str(data["preset"]))
    return {**preset, **data}
