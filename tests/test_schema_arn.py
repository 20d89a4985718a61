"""`mapping.schema_arn`: the Interactions schema read at start-up through Personalize's DescribeSchema, by a
real aioboto3 client against a local stub speaking the service's protocol (JSON 1.1, X-Amz-Target)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.stack import AWS_ENV
from tests.test_interactions import INTERACTIONS
from worker.config import load_settings
from worker.errors import ConfigError
from worker.mapping.mapper import InvalidRecord, Mapper

ARN = "arn:aws:personalize:us-east-1:123456789012:schema/shop-interactions"
MISSING = "arn:aws:personalize:us-east-1:123456789012:schema/gone"
DENIED = "arn:aws:personalize:us-east-1:123456789012:schema/private"


class Stub:
    """DescribeSchema as Personalize answers it; records what each request carried."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.requests.append((dict(request.headers), body))
        if request.headers.get("X-Amz-Target") != "AmazonPersonalize.DescribeSchema":
            return self._error(400, "UnknownOperationException")
        if body.get("schemaArn") == ARN:
            schema = {"name": "shop-interactions", "schemaArn": ARN, "schema": orjson.dumps(INTERACTIONS).decode()}
            return web.Response(body=orjson.dumps({"schema": schema}), content_type="application/x-amz-json-1.1")
        if body.get("schemaArn") == DENIED:
            return self._error(400, "AccessDeniedException", "User: arn:aws:iam::123456789012:user/secret-name")
        return self._error(400, "ResourceNotFoundException", f"Could not find schema {body.get('schemaArn')}")

    @staticmethod
    def _error(status: int, code: str, message: str = "") -> web.Response:
        body = orjson.dumps({"__type": f"com.amazonaws.personalize#{code}", "message": message})
        return web.Response(status=status, body=body, content_type="application/x-amz-json-1.1")


@pytest.fixture
async def stub(unused_tcp_port: int) -> AsyncIterator[Stub]:
    stub = Stub()
    app = web.Application()
    app.router.add_post("/", stub.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    stub.url = f"http://127.0.0.1:{unused_tcp_port}"
    yield stub
    await runner.cleanup()


def write_config(tmp_path: Path, stub: Stub, **mapping: Any) -> Path:
    lines = ["[personalize]", 'tracking_id = "t"', f'control_endpoint_url = "{stub.url}"', "[mapping]"]
    lines += [f"{key} = {orjson.dumps(value).decode()}" for key, value in mapping.items()]
    path = tmp_path / "worker.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)


async def test_schema_arn_acts_as_the_schema_file(stub: Stub, tmp_path: Path) -> None:
    settings = await asyncio.to_thread(load_settings, write_config(tmp_path, stub, schema_arn=ARN))
    headers, body = stub.requests[0]
    assert body == {"schemaArn": ARN} and len(stub.requests) == 1
    assert headers["Content-Type"] == "application/x-amz-json-1.1"
    assert "/us-east-1/personalize/aws4_request" in headers["Authorization"]  # signed for the control plane
    file = tmp_path / "interactions.avsc"
    file.write_bytes(orjson.dumps(INTERACTIONS))
    from_file = load_settings(write_config(tmp_path, stub, schema=str(file)))
    assert settings.mapping.properties == from_file.mapping.properties
    assert "numRatings" in settings.mapping.properties
    mapper = Mapper(settings.mapping)
    record = {"event_type": "click", "session_id": "s", "timestamp": 1717171717, "num_ratings": "3"}
    with pytest.raises(InvalidRecord) as info:
        mapper.map(orjson.dumps(record))
    assert "is a string, not int (NUM_RATINGS in the schema)" in str(info.value)


async def test_a_property_the_schema_lacks_stops_start_up(stub: Stub, tmp_path: Path) -> None:
    path = write_config(tmp_path, stub, schema_arn=ARN, properties=["ctx.colour"])
    with pytest.raises(ConfigError, match=f"properties.colour \\(ctx.colour\\): not a field of {ARN}"):
        await asyncio.to_thread(load_settings, path)


@pytest.mark.parametrize(
    ("arn", "why"),
    [
        (MISSING, "no such schema in Personalize (ResourceNotFoundException)"),
        (DENIED, "access denied: the credentials need personalize:DescribeSchema (AccessDeniedException)"),
    ],
)
async def test_an_unreadable_schema_is_one_line_naming_the_key(stub: Stub, tmp_path: Path, arn: str, why: str) -> None:
    path = write_config(tmp_path, stub, schema_arn=arn)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker.cli", "run", "--config", str(path)],
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **AWS_ENV},
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert lines == [f"personalize-worker: mapping.schema_arn: cannot read {arn}: {why}"]
    assert b"secret-name" not in result.stderr + result.stdout  # AWS's message is not echoed


def test_schema_and_schema_arn_are_one_or_the_other(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(f'[personalize]\ntracking_id = "t"\n[mapping]\nschema = "x.avsc"\nschema_arn = "{ARN}"\n')
    with pytest.raises(ConfigError, match=r"set mapping.schema \(a file\) or mapping.schema_arn"):
        load_settings(path)


def test_a_malformed_arn_is_refused_before_any_call(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text('[personalize]\ntracking_id = "t"\ncontrol_endpoint_url = "http://127.0.0.1:9"\n')
    path.write_text(path.read_text() + '[mapping]\nschema_arn = "arn:aws:s3:::bucket/schema.json"\n')
    with pytest.raises(ConfigError, match=r"schema_arn.*is not a schema ARN"):
        load_settings(path)


async def test_map_shows_each_lines_schema_mismatch_with_its_key_and_why(stub: Stub, tmp_path: Path) -> None:
    import io

    from worker.commands.dry_run import dry_run

    settings = await asyncio.to_thread(load_settings, write_config(tmp_path, stub, schema_arn=ARN))
    base = {"event_type": "click", "session_id": "s", "timestamp": 1717171717}
    lines = [orjson.dumps({**base, **extra}) for extra in ({"num_ratings": "3"}, {"is_promo": 1}, {"price": 2.5})]
    out = io.StringIO()
    dry_run(settings, lines, out)
    entries = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [e["dead_letter"]["message"] for e in entries[:2]] == [
        "properties.numRatings: '3' at not_null(num_ratings, numRatings) is a string, not int"
        " (NUM_RATINGS in the schema)",
        "properties.isPromo: 1 at not_null(is_promo, isPromo) is an integer, not boolean (IS_PROMO in the schema)",
    ]
    assert entries[2]["event"]["properties"] == '{"price":2.5}'
