"""`personalize-worker check`: is this config able to run? Each check says plainly what is wrong."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

import aioboto3
from aiobotocore.config import AioConfig
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from botocore import xform_name
from botocore.exceptions import ClientError, ProxyConnectionError

from worker.config import MappingSettings, Settings
from worker.errors import WorkerError
from worker.flow.routes import resolve
from worker.kafka import codecs
from worker.kafka.connection import explain_connection_errors, kafka_security
from worker.personalize.operations.spec import EVENTS, OperationSpec
from worker.personalize.proxy import Proxy, client_options, resolve_proxy, status_text
from worker.personalize.retry import INVALID_CODES

MAX_BYTES = "max.message.bytes"
DLQ_HEADROOM_BYTES = 16 * 1024
"""Room a dead letter needs above its source record: the dlq.* headers (the reason message alone is up to
2,000 characters, 8 KB as UTF-8; the topic name; numbers) and the record's own framing."""


def _say(ok: bool | None, what: str, detail: str = "") -> bool:
    """One line: ok, FAIL, or (None) WARN, which does not fail the check."""
    mark = "ok  " if ok else "WARN" if ok is None else "FAIL"
    print(f"[{mark}] {what}" + (f": {detail}" if detail else ""), flush=True)
    return ok is not False


def check_codecs() -> bool:
    """A topic written compressed fails the worker's fetch when its codec is missing: fail here first."""
    absent = codecs.missing()
    if absent:
        return _say(False, "compression codecs", f"{', '.join(absent)} unavailable ({codecs.HINT})")
    return _say(True, "compression codecs", ", ".join(codecs.CODECS))


@dataclass(frozen=True)
class Target:
    """What one flow reads and where its dead letters go; `label` prefixes its lines ("" for the single flow)."""

    label: str
    topics: tuple[str, ...]
    dead_letter_topic: str


def targets(settings: Settings) -> list[Target]:
    if not settings.routes:
        return [Target("", settings.kafka.topics, settings.dead_letter.topic)]
    return [Target(f"route {r.name!r}: ", r.topics, r.dead_letter_topic) for r in settings.routes]


@dataclass
class _Cluster:
    """What `check` learns from the cluster; None where the broker would not say (ACLs), with why."""

    topics: set[str]
    partitions: dict[str, int]
    max_message_bytes: dict[str, int]
    broker: dict[str, str] | None
    broker_error: str = ""


async def _configs(admin: AIOKafkaAdminClient, resources: list[ConfigResource]) -> dict[str, dict[str, str]]:
    """name → {config: value} for each resource the broker described (resources it refused are left out)."""
    found: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.to_object()["resources"]:
            if resource["error_code"] == 0:
                entries = resource["config_entries"]
                found[resource["resource_name"]] = {e["config_names"]: e["config_value"] for e in entries}
    return found


async def _describe(admin: AIOKafkaAdminClient, flows: list[Target]) -> _Cluster:
    # list_topics asks for every topic: unlike a request naming one, it never creates a topic.
    topics = set(await admin.list_topics())
    named = dict.fromkeys(t for f in flows for t in (*f.topics, f.dead_letter_topic))
    wanted = [t for t in named if t in topics]
    described = await admin.describe_topics(wanted) if wanted else []
    limits = await _configs(admin, [ConfigResource(ConfigResourceType.TOPIC, t, {MAX_BYTES: None}) for t in wanted])
    cluster = _Cluster(
        topics=topics,
        partitions={d["topic"]: len(d["partitions"]) for d in described},
        max_message_bytes={t: int(c[MAX_BYTES]) for t, c in limits.items() if c.get(MAX_BYTES, "").isdigit()},
        broker=None,
    )
    try:
        brokers = (await admin.describe_cluster())["brokers"]
        broker_id = str(brokers[0]["node_id"])
        keys = {"auto.create.topics.enable": None, "message.max.bytes": None, "num.partitions": None}
        configs = await _configs(admin, [ConfigResource(ConfigResourceType.BROKER, broker_id, keys)])
        cluster.broker = configs.get(broker_id)
        if cluster.broker is None:
            cluster.broker_error = "the broker refused DescribeConfigs"
    except Exception as error:  # an ACL, most likely: say so, and check the rest
        cluster.broker_error = f"{type(error).__name__}: {error}"
    return cluster


async def check_kafka(settings: Settings, timeout: float = 15.0) -> bool:
    where = f"Kafka at {settings.kafka.bootstrap_servers}"
    try:
        admin = AIOKafkaAdminClient(request_timeout_ms=int(timeout * 1000), **kafka_security(settings.kafka))
    except WorkerError as error:  # kafka.ssl_cafile unusable
        return _say(False, where, str(error))
    try:
        with explain_connection_errors(settings.kafka):
            await asyncio.wait_for(admin.start(), timeout)
        flows = targets(settings)
        cluster = await _describe(admin, flows)
    except Exception as error:
        return _say(False, where, f"{type(error).__name__}: {error}")
    finally:
        await admin.close()
    ok = _say(True, where, f"{len(cluster.topics)} topics visible")
    fix = "routes[].topics" if settings.routes else "kafka.topics"
    for flow in flows:
        for topic in flow.topics:
            count = cluster.partitions.get(topic)
            limit = cluster.max_message_bytes.get(topic)
            detail = f"{count} partitions" + (f", {MAX_BYTES} {limit}" if limit else "")
            if not count:
                detail = f"does not exist (the worker never creates source topics: create it, or fix {fix})"
            ok &= _say(bool(count), f"{flow.label}source topic {topic!r}", detail)
        ok &= _check_dead_letter_topic(settings, cluster, flow)
    return ok


def _check_dead_letter_topic(settings: Settings, cluster: _Cluster, flow: Target | None = None) -> bool:
    """Exists, or will be created; and takes the largest source record plus its headers (else that record
    can never be dead-lettered, and its partition stops committing). `flow`: default the first."""
    flow = flow or targets(settings)[0]
    dlq = flow.dead_letter_topic
    bootstrap = settings.kafka.bootstrap_servers.split(",")[0].strip()
    sources = [cluster.max_message_bytes[t] for t in flow.topics if t in cluster.max_message_bytes]
    largest = max(sources, default=0)
    needed = largest + DLQ_HEADROOM_BYTES
    what = f"{flow.label}dead-letter topic {dlq!r}"
    broker = cluster.broker or {}
    auto_create = broker.get("auto.create.topics.enable")
    ok = True
    create = f"kafka-topics.sh --bootstrap-server {bootstrap} --create --topic {dlq}" + (
        f" --config {MAX_BYTES}={needed}" if largest else ""
    )
    if dlq in cluster.topics:
        limit: int | None = cluster.max_message_bytes.get(dlq)
        _say(True, what, f"exists, {cluster.partitions.get(dlq, 0)} partitions")
    else:
        limit = None  # unless the broker creates it: then with its default, message.max.bytes
        if auto_create == "true":
            default = broker.get("message.max.bytes", "")
            limit = int(default) if default.isdigit() else None
            partitions = broker.get("num.partitions", "?")
            detail = "does not exist yet; the broker creates it on the first dead letter with its defaults "
            detail += f"(auto.create.topics.enable=true, num.partitions={partitions}, message.max.bytes={limit})"
            _say(True, what, detail)
        elif auto_create == "false":
            detail = "does not exist, and the broker will not create it (auto.create.topics.enable=false): "
            detail += f"dead letters would block commits until it exists; create it: {create}"
            ok = _say(False, what, detail)
        else:
            why = cluster.broker_error or "auto.create.topics.enable not reported"
            detail = f"does not exist, and whether the broker would create it is unknown ({why}); create it: {create}"
            _say(None, what, detail)
    if not largest:
        if any(t in cluster.topics for t in flow.topics):  # they exist, but their limits went unsaid
            _say(
                None,
                f"{flow.label}dead-letter sizes",
                f"the source topics' {MAX_BYTES} could not be read (DescribeConfigs)",
            )
        return ok
    fix = (
        f"kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {dlq} "
        f"--add-config {MAX_BYTES}={needed}"
        if dlq in cluster.topics
        else f"create it first: {create}"
    )
    if limit is not None:
        ok &= _compare(f"{what} {MAX_BYTES}", limit, largest, fix)
    elif dlq in cluster.topics:
        _say(None, f"{what} {MAX_BYTES}", f"could not be read (DescribeConfigs); it must be at least {needed}")
    producer = settings.dead_letter.max_message_bytes
    ok &= _compare(
        f"{flow.label}dead_letter.max_message_bytes", producer, largest, f"set dead_letter.max_message_bytes = {needed}"
    )
    return ok


def _compare(what: str, limit: int, largest: int, fix: str) -> bool:
    """FAIL below the largest source record (it can never be dead-lettered); WARN without room for headers."""
    needed = largest + DLQ_HEADROOM_BYTES
    numbers = f"{limit} bytes; the largest source topic allows {largest}, a dead letter needs up to {needed}"
    if limit >= needed:
        return _say(True, what, numbers)
    if limit < largest:
        return _say(
            False, what, f"{numbers}: larger records could never be dead-lettered and would block commits; {fix}"
        )
    return _say(None, what, f"{numbers}: the largest records, with their dlq headers, would be refused; {fix}")


def destinations(settings: Settings) -> list[tuple[str, OperationSpec, str]]:
    """(label, operation, tracking id or dataset ARN) for every destination `run` would write to."""
    if not settings.routes:
        assert settings.personalize.tracking_id is not None  # config validation requires it without routes
        return [("", EVENTS, settings.personalize.tracking_id)]
    return [
        (f"route {route.name!r}: ", route.spec, destination)
        for route in resolve(settings)
        for _, destination in route.destinations
    ]


def empty_request(spec: OperationSpec, destination: str) -> dict[str, Any]:
    """The operation's call with no records: refused by validation once authenticated, so nothing is written."""
    request: dict[str, Any] = {spec.destination: destination, spec.list_member: []}
    if "sessionId" in spec.session_members:
        request["sessionId"] = "personalize-worker-check"
    return request


def verdict(spec: OperationSpec, destination: str, error: ClientError, proxy: Proxy | None) -> tuple[bool, str]:
    """(ok, detail) for the error answer to an empty call."""
    code = error.response.get("Error", {}).get("Code", "")
    if code in INVALID_CODES:
        return True, "reachable, credentials accepted"
    if code == "ResourceNotFoundException":
        kind = "tracker" if spec.destination == "trackingId" else "dataset"
        return False, f"{code}: the {kind} {destination!r} does not exist (or is in another region or account)"
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if proxy is not None and not error.response.get("ResponseMetadata", {}).get("RequestId"):
        # Not AWS's answer (no request id) but the proxy's own, in the words `run` uses; its page is not shown.
        return False, f"ProxyError: proxy answered {status_text(status)}"
    return False, f"{code}: {error.response['Error'].get('Message', '')}"


async def check_personalize(settings: Settings) -> bool:
    """An empty record list is refused by validation after authentication: reachability without sending data.
    Through the same proxy `run` uses: both take the client Config's proxy options from worker/personalize/proxy.py."""
    p = settings.personalize
    where = p.endpoint_url or f"AWS {p.region}"
    config = AioConfig(
        retries={"total_max_attempts": 1},
        parameter_validation=False,
        connect_timeout=p.request_timeout_seconds,
        read_timeout=p.request_timeout_seconds,
        **client_options(p),
    )
    proxy: Proxy | None = None
    ok = True
    try:
        async with aioboto3.Session().client(
            "personalize-events", region_name=p.region, endpoint_url=p.endpoint_url or None, config=config
        ) as client:
            proxy = resolve_proxy(client.meta.endpoint_url, client.meta.config)
            if proxy is not None:
                where += f" via proxy {proxy.url}"
            for label, spec, destination in destinations(settings):
                what = (
                    f"{label}Personalize {spec.name} to {destination!r} at {where}"
                    if label
                    else f"Personalize Events at {where}"
                )
                try:
                    await getattr(client, xform_name(spec.name))(**empty_request(spec, destination))
                except ClientError as error:
                    passed, detail = verdict(spec, destination, error, proxy)
                    ok &= _say(passed, what, detail)
                else:
                    _say(True, what, "reachable")
    except ProxyConnectionError as error:
        # Said here, not by botocore: its message masks the proxy URL's credentials unreliably, and
        # aiohttp's error repeats them (URL and Proxy-Authorization).
        inner = error.kwargs.get("error")
        refusal = getattr(inner, "status", None)
        why = f"refused CONNECT: {status_text(refusal)}" if isinstance(refusal, int) else "cannot connect"
        cause = getattr(inner, "os_error", None)
        return _say(False, f"Personalize Events at {where}", f"ProxyError: {why}" + (f": {cause}" if cause else ""))
    except Exception as error:
        return _say(False, f"Personalize Events at {where}", f"{type(error).__name__}: {error}")
    return ok


async def run_checks(settings: Settings) -> int:
    _say(True, "configuration", "valid")
    codecs_ok = check_codecs()
    kafka_ok = await check_kafka(settings)
    personalize_ok = await check_personalize(settings)
    registry_ok = True
    mappings = [r.mapping for r in settings.routes] if settings.routes else [settings.mapping]
    if any(isinstance(m, MappingSettings) and m.format != "json" for m in mappings):
        from worker.commands.registry_check import check_schema_registry

        registry_ok = await check_schema_registry(settings, _say)
    ok = codecs_ok and kafka_ok and personalize_ok and registry_ok
    print("all checks passed" if ok else "some checks failed", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
