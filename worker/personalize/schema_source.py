"""`mapping.schema_arn`: the Interactions schema read once at start-up from Personalize (DescribeSchema).

Read before the settings are validated, so an ARN has the same effect as a schema file: properties derived
from it, checked against it at start-up and per record. The control plane is the `personalize` service,
not `personalize-events`: `personalize.control_endpoint_url` points it elsewhere (a VPC endpoint, a test
stub) independently of `endpoint_url`. A failure stops start-up with one line naming the key; AWS's error
message is not repeated (only its code), as everywhere in the worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from pydantic import ValidationError

from worker.config.personalize import SCHEMA_ARN, PersonalizeSettings  # not the package: it imports this module
from worker.errors import ConfigError
from worker.mapping.interactions import remember_schema
from worker.personalize.proxy import client_options

_WHY = {
    "ResourceNotFoundException": "no such schema in Personalize (ResourceNotFoundException)",
    "AccessDeniedException": "access denied: the credentials need personalize:DescribeSchema (AccessDeniedException)",
    "InvalidInputException": "Personalize refused the ARN (InvalidInputException)",
}


def schema_arns(data: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, ARN) of every well-formed `schema_arn` in the raw settings: [mapping] and each route's mapping.
    A malformed one, or one set with `schema`, is left to validation, which names the mistake without a call."""
    routes = data.get("routes")
    tables = [("mapping", data.get("mapping"))]
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        tables.append((f"routes[{i}].mapping", route.get("mapping") if isinstance(route, dict) else None))
    for where, mapping in tables:
        if not isinstance(mapping, dict) or mapping.get("schema"):
            continue
        arn = mapping.get("schema_arn")
        if isinstance(arn, str) and SCHEMA_ARN.fullmatch(arn):
            yield f"{where}.schema_arn", arn


def fetch_schemas(data: dict[str, Any]) -> None:
    """Read each schema the raw settings name by ARN and remember it; ConfigError (one line) if one cannot be."""
    wanted = dict(schema_arns(data))
    if not wanted:
        return
    try:
        personalize = PersonalizeSettings.model_validate(data.get("personalize") or {})
    except ValidationError:
        return  # validation reports the [personalize] problem itself; the schema cannot be read without it
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_fetch_all(wanted, personalize))
        return
    with ThreadPoolExecutor(1) as pool:  # called from a running loop (a test): a loop of its own elsewhere
        pool.submit(asyncio.run, _fetch_all(wanted, personalize)).result()


async def _fetch_all(wanted: dict[str, str], p: PersonalizeSettings) -> None:
    # Imported only when a schema_arn is set: aioboto3 (aiohttp with it) is ~0.3 s of every worker's start.
    import aioboto3
    from aiobotocore.config import AioConfig

    config = AioConfig(
        retries={"mode": "standard", "total_max_attempts": 3},
        connect_timeout=p.request_timeout_seconds,
        read_timeout=p.request_timeout_seconds,
        **client_options(p),
    )
    session = aioboto3.Session()
    endpoint = p.control_endpoint_url or None
    async with session.client("personalize", region_name=p.region, endpoint_url=endpoint, config=config) as client:
        for key, arn in wanted.items():
            remember_schema(arn, await _describe(client, key, arn))


async def _describe(client: Any, key: str, arn: str) -> str:
    try:
        answer = await client.describe_schema(schemaArn=arn)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "error"))
        raise ConfigError(f"{key}: cannot read {arn}: {_WHY.get(code, f'Personalize answered {code}')}") from None
    except NoCredentialsError:
        raise ConfigError(f"{key}: cannot read {arn}: no AWS credentials found") from None
    except BotoCoreError as error:
        raise ConfigError(f"{key}: cannot read {arn}: Personalize unreachable ({type(error).__name__})") from None
    text = (answer.get("schema") or {}).get("schema")
    if not isinstance(text, str):
        raise ConfigError(f"{key}: {arn}: DescribeSchema's answer holds no schema")
    return text
