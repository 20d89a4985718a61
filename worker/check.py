"""`personalize-worker check`: is this config able to run? Each check says plainly what is wrong."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aioboto3
from aiobotocore.config import AioConfig
from aiokafka.admin import AIOKafkaAdminClient
from botocore.exceptions import ClientError, ProxyConnectionError

from worker import codecs
from worker.config import Settings
from worker.proxy import Proxy, client_options, resolve_proxy, status_text
from worker.retry import INVALID_CODES
from worker.source import explain_connection_errors, kafka_security


def _say(ok: bool, what: str, detail: str = "") -> bool:
    mark = "ok  " if ok else "FAIL"
    print(f"[{mark}] {what}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def check_codecs() -> bool:
    """A topic written compressed fails the worker's fetch when its codec is missing: fail here first."""
    absent = codecs.missing()
    if absent:
        return _say(False, "compression codecs", f"{', '.join(absent)} unavailable ({codecs.HINT})")
    return _say(True, "compression codecs", ", ".join(codecs.CODECS))


async def check_kafka(settings: Settings, timeout: float = 15.0) -> bool:
    admin = AIOKafkaAdminClient(request_timeout_ms=int(timeout * 1000), **kafka_security(settings.kafka))
    where = f"Kafka at {settings.kafka.bootstrap_servers}"
    try:
        with explain_connection_errors(settings.kafka):
            await asyncio.wait_for(admin.start(), timeout)
        topics = set(await admin.list_topics())
        wanted = [t for t in (*settings.kafka.topics, settings.dead_letter.topic) if t in topics]
        described = await admin.describe_topics(wanted) if wanted else []
    except Exception as error:
        return _say(False, where, f"{type(error).__name__}: {error}")
    finally:
        await admin.close()
    partitions = {d["topic"]: len(d["partitions"]) for d in described}
    ok = _say(True, where, f"{len(topics)} topics visible")
    for topic in settings.kafka.topics:
        count = partitions.get(topic)
        ok &= _say(bool(count), f"source topic {topic!r}", f"{count} partitions" if count else "does not exist")
    dlq = settings.dead_letter.topic
    detail = "exists" if dlq in topics else "does not exist yet (fine only if the broker auto-creates topics)"
    _say(True, f"dead-letter topic {dlq!r}", detail)
    return ok


async def check_personalize(settings: Settings) -> bool:
    """An empty eventList is refused by validation after authentication: reachability without sending data.
    Through the same proxy `run` uses: both take the client Config's proxy options from worker/proxy.py."""
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
    try:
        async with aioboto3.Session().client(
            "personalize-events", region_name=p.region, endpoint_url=p.endpoint_url or None, config=config
        ) as client:
            proxy = resolve_proxy(client.meta.endpoint_url, client.meta.config)
            if proxy is not None:
                where += f" via proxy {proxy.url}"
            request: dict[str, Any] = {
                "trackingId": p.tracking_id,
                "sessionId": "personalize-worker-check",
                "eventList": [],
            }
            await client.put_events(**request)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in INVALID_CODES:
            return _say(True, f"Personalize Events at {where}", "reachable, credentials accepted")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if proxy is not None and not error.response.get("ResponseMetadata", {}).get("RequestId"):
            # Not AWS's answer (no request id) but the proxy's own, in the words `run` uses; its page is not shown.
            return _say(False, f"Personalize Events at {where}", f"ProxyError: proxy answered {status_text(status)}")
        return _say(False, f"Personalize Events at {where}", f"{code}: {error.response['Error'].get('Message', '')}")
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
    return _say(True, f"Personalize Events at {where}", "reachable")


async def run_checks(settings: Settings) -> int:
    _say(True, "configuration", "valid")
    codecs_ok = check_codecs()
    kafka_ok = await check_kafka(settings)
    personalize_ok = await check_personalize(settings)
    ok = codecs_ok and kafka_ok and personalize_ok
    print("all checks passed" if ok else "some checks failed", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
