"""Presets: conventional mappings shipped as TOML files under config/presets/."""

from __future__ import annotations

from typing import Any


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("presets are not implemented yet")
