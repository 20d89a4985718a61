"""botocore's data files parsed with orjson (`limits.FastJSONFileLoader`, issue 13): the same values in the same
order as botocore's own parse, and the client built on it resolves what a plain botocore session resolves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import botocore.exceptions
import botocore.loaders
import pytest

from worker.mapping.limits import LOADER, FastJSONFileLoader, SharedLoader

DATA = Path(botocore.loaders.Loader.BUILTIN_DATA_PATH)


def _start_up_files() -> list[Path]:
    """Every data file a worker's start-up parses (botocore's top-level files and personalize-events' models),
    plus a few large service models for breadth."""
    files = [p for p in DATA.iterdir() if p.is_file() and p.name.endswith((".json", ".json.gz"))]
    for service in ("personalize-events", "personalize", "ec2", "s3"):
        files.extend(p for p in (DATA / service).rglob("*") if p.is_file() and p.name.endswith((".json", ".json.gz")))
    return sorted(files)


@pytest.mark.parametrize("path", _start_up_files(), ids=lambda p: str(p.relative_to(DATA)))
def test_orjson_parses_each_file_as_botocore_does(path: Path) -> None:
    stem = str(path).removesuffix(".gz").removesuffix(".json")
    ours: Any = FastJSONFileLoader().load_file(stem)
    theirs: Any = botocore.loaders.JSONFileLoader().load_file(stem)
    # json.dumps writes keys in insertion order and floats by repr: equal text is equal values, order and types
    assert json.dumps(ours) == json.dumps(theirs)
    assert ours == theirs


def test_a_file_only_pythons_json_reads_is_read_as_botocore_reads_it(tmp_path: Path) -> None:
    """orjson refuses NaN, which Python's json (and so botocore) accepts: such a file, say a model a user put
    under ~/.aws/models, is read by botocore's own parse instead of failing the start-up."""
    (tmp_path / "odd.json").write_text('{"b": NaN, "a": [1, 2.5]}', encoding="utf-8")
    ours: Any = FastJSONFileLoader().load_file(str(tmp_path / "odd"))
    theirs: Any = botocore.loaders.JSONFileLoader().load_file(str(tmp_path / "odd"))
    assert json.dumps(ours) == json.dumps(theirs) == '{"b": NaN, "a": [1, 2.5]}'


def test_the_shared_loader_parses_with_orjson() -> None:
    assert isinstance(LOADER.file_loader, FastJSONFileLoader)
    assert FastJSONFileLoader().load_file(str(DATA / "nonexistent")) is None


MODELS = [
    ("personalize-events", "service-2", None),
    ("personalize-events", "endpoint-rule-set-1", None),
    ("personalize-events", "service-2", "2018-03-22"),
    ("ec2", "paginators-1", None),  # with sdk-extras
    ("s3", "waiters-2", None),
]


@pytest.mark.parametrize(("service", "type_name", "version"), MODELS)
def test_the_shared_loader_loads_what_botocore_loads(service: str, type_name: str, version: str | None) -> None:
    ours = SharedLoader().load_service_model(service, type_name, version)
    theirs = botocore.loaders.Loader().load_service_model(service, type_name, version)
    assert json.dumps(ours) == json.dumps(theirs)


def test_the_shared_loader_lists_no_service_for_a_known_one() -> None:
    loader = SharedLoader()
    listed: list[str] = []
    plain = loader.list_available_services

    def counted(type_name: str) -> list[str]:
        listed.append(type_name)
        services: list[str] = plain(type_name)
        return services

    loader.list_available_services = counted
    loader.load_service_model("personalize-events", "service-2")
    assert listed == []


@pytest.mark.parametrize(
    ("service", "type_name", "version"),
    [
        ("no-such-service", "service-2", None),
        ("personalize-events", "waiters-2", None),
        ("s3", "service-2", "1999-01-01"),
    ],
)
def test_the_shared_loader_fails_as_botocore_does(service: str, type_name: str, version: str | None) -> None:
    errors = []
    for loader in (SharedLoader(), botocore.loaders.Loader()):
        with pytest.raises(botocore.exceptions.BotoCoreError) as caught:
            loader.load_service_model(service, type_name, version)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]


PROBE = """
import json, sys
import botocore.session
from botocore.config import Config
from worker.cli import _load
from worker.personalize.client import _botocore_client
from worker.personalize.proxy import client_options
settings = _load(sys.argv[1]).personalize
client, credentials, ca_bundle = _botocore_client(settings)
plain = botocore.session.Session().create_client(
    "personalize-events", region_name=settings.region, endpoint_url=settings.endpoint_url or None,
    config=Config(retries={"total_max_attempts": 1}, **client_options(settings)),
)
def resolved(c):
    return [c.meta.endpoint_url, c.meta.region_name, c.meta.service_model.signing_name, c.meta.partition]
print(json.dumps([resolved(client), resolved(plain), type(client._loader.file_loader).__name__]))
"""

CONFIG = """
[kafka]
topics = ["clicks"]
[personalize]
tracking_id = "tracker"
{personalize}
[dead_letter]
topic = "clicks.dlq"
"""

CASES = {
    "region": ('region = "eu-west-1"', {}, "https://personalize-events.eu-west-1.amazonaws.com"),
    "china": ('region = "cn-north-1"', {}, "https://personalize-events.cn-north-1.amazonaws.com.cn"),
    "fips": ('region = "us-east-1"', {"AWS_USE_FIPS_ENDPOINT": "true"}, "https://personalize-events-fips."),
    "dualstack": ('region = "us-east-1"', {"AWS_USE_DUALSTACK_ENDPOINT": "true"}, "https://personalize-events."),
    "endpoint_url": ('endpoint_url = "http://127.0.0.1:4566"\nregion = "us-west-2"', {}, "http://127.0.0.1:4566"),
    "env_endpoint": ('region = "us-west-2"', {"AWS_ENDPOINT_URL": "http://127.0.0.1:9999"}, "http://127.0.0.1:9999"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_client_resolves_what_a_plain_botocore_session_resolves(tmp_path: Path, case: str) -> None:
    personalize, extra_env, expected = CASES[case]
    config = tmp_path / "worker.toml"
    config.write_text(CONFIG.format(personalize=personalize), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PW_"))}
    env.update(AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="secret", AWS_CONFIG_FILE=os.devnull)
    env.update(extra_env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    ours, plain, file_loader = json.loads(done.stdout.splitlines()[-1])
    assert file_loader == "FastJSONFileLoader"
    assert ours == plain
    assert ours[0].startswith(expected)
