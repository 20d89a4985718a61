"""botocore's personalize-events model is read once per worker start (issue 13): the limits, the operation
specs and the client's botocore session share one data loader and its caches; with `AWS_DATA_PATH` set the
session keeps the loader it builds itself (it searches those paths first). In subprocesses, counting the files
botocore's loader parses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
import botocore.loaders
reads = []
parse = botocore.loaders.JSONFileLoader.load_file
def counted(self, file_path):
    reads.append(file_path)
    return parse(self, file_path)
botocore.loaders.JSONFileLoader.load_file = counted
from worker.cli import _load
from worker.personalize.client import _botocore_client
settings = _load(sys.argv[1])
client, credentials, _ = _botocore_client(settings.personalize)
assert credentials is not None
print(client.meta.endpoint_url, client.meta.region_name, client.meta.service_model.signing_name)
print(sum("personalize-events" in path and path.endswith("service-2") for path in reads))
"""

CONFIG = """
[kafka]
topics = ["clicks"]
[personalize]
tracking_id = "tracker"
region = "eu-west-1"
[dead_letter]
topic = "clicks.dlq"
"""


@pytest.mark.parametrize(("data_path", "reads"), [(None, 1), ("/nonexistent-models", 2)], ids=["shared", "data-path"])
def test_the_service_model_is_read_once_per_start(tmp_path: Path, data_path: str | None, reads: int) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(CONFIG, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PW_"))}
    env.update(AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="secret", AWS_CONFIG_FILE=os.devnull)
    if data_path is not None:
        env["AWS_DATA_PATH"] = data_path
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    endpoint, count = done.stdout.splitlines()
    assert endpoint == "https://personalize-events.eu-west-1.amazonaws.com eu-west-1 personalize"
    assert int(count) == reads
