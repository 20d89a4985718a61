"""`run`, `map` and `check` agree: each refuses the same configurations the same way, before touching Kafka or
AWS, with exit code 2 and a message naming the key or the file; never a traceback. Through the CLI in a
subprocess, as a user meets it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack import AWS_ENV, write_config

COMMANDS = ("run", "map", "check")


def cli(*args: str, stdin: bytes = b"", prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "worker.cli", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=120,
        env={**AWS_ENV, "PATH": "/usr/bin:/bin"},
        check=False,
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal of a bad configuration: exit 2, nothing on stdout, no traceback or warning on stderr."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr, result.stderr
    assert result.stderr.startswith("personalize-worker: "), result.stderr
    return result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_two_properties_with_one_key_are_refused_by_all_three(command: str, tmp_path: Path) -> None:
    """`map` used to crash with a traceback here and `run` to fail only at start-up; `check` passed."""
    config = write_config(
        tmp_path / "w.toml",
        {
            "kafka": {"bootstrap_servers": "127.0.0.1:1"},  # never reached: the config is refused first
            "personalize": {"tracking_id": "t"},
            "mapping": {"properties": ["a.page_category", "b.page_category"]},
        },
    )
    message = refused(cli(command, "--config", str(config)))
    assert "mapping.properties: 'a.page_category' and 'b.page_category' both become property 'pageCategory'" in (
        message
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_a_directory_as_config_is_one_line_naming_it(command: str, tmp_path: Path) -> None:
    message = refused(cli(command, "--config", str(tmp_path)))
    assert message == f"personalize-worker: {tmp_path}: is a directory, not a config file\n"


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes('[personalize]\ntracking_id = "caf\u00e9"\n'.encode("latin-1"))
    for command in COMMANDS:
        message = refused(cli(command, "--config", str(config)))
        assert message == f"personalize-worker: {config}: not UTF-8 text (byte 32 cannot be decoded); TOML is UTF-8\n"


def test_an_unreadable_config_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "w.toml", {"personalize": {"tracking_id": "t"}})
    config.chmod(0)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root reads any file: drop the capabilities that let it
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        prefix = (setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--")
    for command in COMMANDS:
        message = refused(cli(command, "--config", str(config), prefix=prefix))
        assert message == f"personalize-worker: {config}: permission denied (the worker cannot read it)\n"


def test_map_exits_1_when_a_line_would_be_dead_lettered(tmp_path: Path) -> None:
    config = write_config(tmp_path / "w.toml", {"personalize": {"tracking_id": "t"}})
    good = b'{"session_id": "s", "event_type": "click", "timestamp": 1790000000}\n'
    assert cli("map", "--config", str(config), stdin=good * 3).returncode == 0
    duplicates = good * 2  # a duplicate is not a dead letter
    assert cli("map", "--config", str(config), stdin=duplicates).returncode == 0
    result = cli("map", "--config", str(config), stdin=good + b"not json\n")
    assert result.returncode == 1, result.stderr
    assert '"dead_lettered":1' in result.stdout
    help_text = " ".join(cli("map", "--help").stdout.split())
    assert "1 some line would be dead-lettered" in help_text


def test_run_help_documents_the_exit_codes() -> None:
    help_text = " ".join(cli("run", "--help").stdout.split())
    assert "0 stopped on request (SIGTERM/SIGINT, also during start-up) or drained" in help_text
    assert "never created" in help_text
