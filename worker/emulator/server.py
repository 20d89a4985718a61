"""The emulated endpoint: one aiohttp route per modeled operation, the request path (auth, faults,
quotas, validation, registry), and the ``/_emulator/*`` endpoints to inspect and steer it."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from aiohttp import web

from worker.emulator.faults import FaultConfig, QuotaBuckets, Rejection, quota_group, unknown_destination
from worker.emulator.model import Operation, compiled_model, format_problems, oversized_events
from worker.emulator.records import CallLog, Stats, Tallies
from worker.emulator.sigv4 import SigV4Verifier
from worker.mapping.limits import MAX_EVENT_BYTES

ACCESS_DENIED = (
    "User: arn:aws:sts::123456789012:assumed-role/personalize-worker/i-0123456789abcdef0 is not authorized to "
    "perform: personalize:{operation} on resource: arn:aws:personalize:us-east-1:123456789012:event-tracker/emulated"
)
PROXY_413 = b"<html><head><title>413 Request Entity Too Large</title></head><body>nginx</body></html>"
THROTTLED: Rejection = (400, "ThrottlingException", "Rate exceeded")
INTERNAL_FAILURE: Rejection = (500, "InternalFailure", "The request processing has failed because of an unknown error.")


def _parse(body: bytes) -> dict[str, Any] | Rejection:
    try:
        doc = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return 400, "SerializationException", "The request body is not valid JSON."
    if type(doc) is not dict:
        return 400, "SerializationException", "The request body must be a JSON object."
    return doc


class Emulator:
    """Configuration, state and the aiohttp application of one emulated Personalize Events endpoint."""

    def __init__(
        self,
        *,
        tracking_ids: Sequence[str] | None = None,
        dataset_arns: Sequence[str] | None = None,
        tracker_groups: Mapping[str, str] | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        quotas: Mapping[str, float | None] | None = None,
        max_tps: float | None = None,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        error_rate: float = 0.0,
        outage: bool = False,
        record: str | Path | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``quotas`` and ``max_tps`` override the documented quotas (``max_tps``: PutEvents only); left
        out, the documented ones apply. ``clock`` drives the quota buckets: tests freeze or step it."""
        self.model = compiled_model()
        self.config = FaultConfig()
        self.buckets = QuotaBuckets(clock)
        initial: dict[str, Any] = {
            "latency_ms": latency_ms,
            "jitter_ms": jitter_ms,
            "error_rate": error_rate,
            "outage": outage,
            "tracking_ids": None if tracking_ids is None else list(tracking_ids),
            "dataset_arns": None if dataset_arns is None else list(dataset_arns),
            "tracker_groups": None if tracker_groups is None else dict(tracker_groups),
        }
        if quotas is not None:
            initial["quotas"] = dict(quotas)
        if max_tps is not None:
            initial["max_tps"] = max_tps
        self.configure(**initial)
        self.auth = SigV4Verifier(self.model.signing_name, access_key, secret_key)
        self.record_path = Path(record) if record is not None else None
        self._record: IO[bytes] | None = None
        self._rng = random.Random(seed)
        self._request_prefix = str(uuid.uuid4())[:24]
        self._request_counter = 0
        self.reset()

    # ---- state

    def reset(self) -> None:
        """Forget everything received and refill every quota (the configuration stays)."""
        self.stats = Stats()
        self.tallies = Tallies()
        self.rejected: Counter[str] = Counter()
        self.events_per_call: Counter[int] = Counter()
        self.event_ids: set[str] = set()
        self.logs = {op.name: CallLog(op) for op in self.model.operations}
        self.buckets.forget()

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change faults, quotas or the registry at run time; returns the resulting configuration.
        A changed quota or tracker grouping starts its buckets afresh, full."""
        changed = self.config.update(changes)
        if "tracker_groups" in changes:
            changed |= {op.key for op in self.model.operations if op.tracked}
        if changed:
            self.buckets.forget(changed)
        return asdict(self.config)

    def snapshot(self) -> dict[str, Any]:
        """Counters for tests and humans: what was accepted, refused and throttled, in total, per
        operation and per destination (tracker or dataset)."""
        counts = {op.key: self.logs[op.name].records for op in self.model.operations}
        counts.pop("events", None)
        return {
            **asdict(self.stats),
            **counts,
            "unique_event_ids": len(self.event_ids),
            "rejected": dict(self.rejected),
            "events_per_call": {str(size): n for size, n in sorted(self.events_per_call.items())},
            "calls_by_operation": {name: len(log.calls) for name, log in self.logs.items()},
            **self.tallies.snapshot(),
        }

    def log_for(self, slug: str) -> CallLog | None:
        return next((log for log in self.logs.values() if log.operation.slug == slug), None)

    def events(self, since: int = 0) -> Iterator[dict[str, Any]]:
        """Accepted PutEvents events as dicts, for in-process tests."""
        log = self.log_for("events")
        assert log is not None
        return (orjson.loads(line) for line in log.lines(since))

    def close(self) -> None:
        if self._record is not None:
            self._record.close()
            self._record = None

    # ---- request path

    def _next_request_id(self) -> str:
        self._request_counter += 1
        return f"{self._request_prefix}{self._request_counter:012x}"

    def _inject_fault(self, operation: Operation, destination: str | None) -> Rejection | None:
        config = self.config
        if config.access_denied:
            return 403, "AccessDeniedException", ACCESS_DENIED.format(operation=operation.name)
        if config.outage:
            return 503, "ServiceUnavailable", "Service Unavailable"
        rate = config.quotas.get(operation.key)
        if rate is not None:
            group = quota_group(operation.tracked, destination or "", config)
            if not self.buckets.take(operation.key, group, rate):
                return self._throttled(operation, destination)
        if config.throttle_rate > 0 and self._rng.random() < config.throttle_rate:
            return self._throttled(operation, destination)
        if config.error_rate > 0 and self._rng.random() < config.error_rate:
            return INTERNAL_FAILURE
        return None

    def _throttled(self, operation: Operation, destination: str | None) -> Rejection:
        self.stats.throttled += 1
        self.tallies.throttled(operation.name, destination)
        return THROTTLED

    async def _delay(self) -> None:
        config = self.config
        if config.latency_ms <= 0 and config.jitter_ms <= 0:
            return
        delay = config.latency_ms + self._rng.uniform(-config.jitter_ms, config.jitter_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)

    def _check(
        self, operation: Operation, body: bytes, doc: dict[str, Any], destination: str | None
    ) -> Rejection | None:
        """Why a well-formed request is refused, if it is: the model's constraints and the 10 KB event quota
        (one message, as AWS lists every violation), then the registry, then the per-item faults."""
        problems = operation.validate(doc)
        events = doc.get("eventList") if operation.records_member == "eventList" else None
        if len(body) > MAX_EVENT_BYTES and type(events) is list:
            problems = [*(problems or []), *oversized_events(events)] or None
        if problems:
            return 400, "InvalidInputException", format_problems(problems)
        assert destination is not None  # required and a string, or validation would have failed
        missing = unknown_destination(operation.tracked, destination, self.config)
        if missing is not None:
            return missing
        if events is None:
            return None
        rejected_items = self.config.reject_item_ids
        if rejected_items:
            for index, event in enumerate(events, start=1):
                if event.get("itemId") in rejected_items:
                    return (
                        400,
                        "InvalidInputException",
                        (
                            f"1 validation error detected: Value at 'eventList.{index}.member.itemId' "
                            "failed to satisfy constraint: item is not accepted by this event tracker"
                        ),
                    )
        failing_items = self.config.fail_item_ids
        if failing_items and any(event.get("itemId") in failing_items for event in events):
            return INTERNAL_FAILURE
        return None

    def _accept(
        self, operation: Operation, body: bytes, doc: dict[str, Any], request_id: str, destination: str | None
    ) -> None:
        log = self.logs[operation.name]
        records = doc[operation.records_member]
        received_at = time.time()
        log.add(body, len(records), request_id, received_at)
        self.tallies.accepted(operation.name, destination, len(records))
        if operation.records_member == "eventList":
            self._count_events(records)
        if self.record_path is not None and operation.slug == "events":
            self._write_record(log, doc, request_id, received_at)

    def _count_events(self, events: list[dict[str, Any]]) -> None:
        stats, seen = self.stats, self.event_ids
        stats.calls += 1
        stats.events += len(events)
        stats.max_events_per_call = max(stats.max_events_per_call, len(events))
        self.events_per_call[len(events)] += 1
        for event in events:
            event_id = event.get("eventId")
            if event_id is None:
                stats.events_without_id += 1
            elif event_id in seen:
                stats.duplicate_events += 1
            else:
                seen.add(event_id)

    def _write_record(self, log: CallLog, doc: dict[str, Any], request_id: str, received_at: float) -> None:
        if self._record is None:
            assert self.record_path is not None
            self._record = self.record_path.open("ab")
        option = orjson.OPT_APPEND_NEWLINE
        self._record.write(b"".join(orjson.dumps(r, option=option) for r in log.expand(doc, request_id, received_at)))
        self._record.flush()

    def _reject(self, request_id: str, rejection: Rejection) -> web.Response:
        status, error_type, message = rejection
        self.rejected[error_type] += 1
        return web.Response(
            status=status,
            body=orjson.dumps({"message": message}),
            content_type="application/json",
            headers={"x-amzn-ErrorType": error_type, "x-amzn-RequestId": request_id},
        )

    async def handle(self, request: web.Request, operation: Operation) -> web.Response:
        """A proxy's size limit, auth, then faults in the documented order (access denied, outage, quota,
        random throttle, error, latency), then parsing, validation, the registry and the per-item faults.
        The body is parsed before the faults only to find the destination whose quota applies."""
        self.stats.requests += 1
        request_id = self._next_request_id()
        body = await request.read()
        limit = self.config.max_body_bytes
        if limit is not None and len(body) > limit:
            self.rejected["413"] += 1
            return web.Response(status=413, body=PROXY_413, content_type="text/html")
        refused = self.auth.check(request, body, time.time() + self.config.clock_skew_seconds)
        if refused is not None:
            return self._reject(request_id, refused)
        doc = _parse(body)
        named = doc.get(operation.destination_member) if isinstance(doc, dict) else None
        destination = named if type(named) is str else None
        refused = self._inject_fault(operation, destination)
        if refused is not None:
            return self._reject(request_id, refused)
        await self._delay()
        if isinstance(doc, tuple):
            return self._reject(request_id, doc)
        refused = self._check(operation, body, doc, destination)
        if refused is not None:
            return self._reject(request_id, refused)
        self._accept(operation, body, doc, request_id, destination)
        return web.Response(status=200, headers={"x-amzn-RequestId": request_id})

    # ---- inspection endpoints

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.snapshot())

    async def _get_config(self, request: web.Request) -> web.Response:
        return _json_response(asdict(self.config))

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if type(changes) is not dict:
                raise ValueError("expected a JSON object")
            return _json_response(self.configure(**changes))
        except (ValueError, orjson.JSONDecodeError) as error:
            return _json_response({"message": str(error)}, status=400)

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response(self.snapshot())

    async def _get_records(self, request: web.Request) -> web.StreamResponse:
        log = self.log_for(request.match_info["kind"])
        if log is None:
            raise web.HTTPNotFound()
        try:
            since = max(int(request.query.get("since", "0")), 0)
        except ValueError as error:
            raise web.HTTPBadRequest(text="since must be an integer") from error
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        chunk: list[bytes] = []
        for line in log.lines(since):
            chunk.append(line)
            if len(chunk) >= 2000:
                await response.write(b"".join(chunk))
                chunk.clear()
        if chunk:
            await response.write(b"".join(chunk))
        await response.write_eof()
        return response

    def make_app(self) -> web.Application:
        """Routes derived from the model: one POST route per operation plus ``/_emulator/*``."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        for operation in self.model.operations:
            app.router.add_post(operation.uri, self._route(operation))
        app.router.add_get("/_emulator/stats", self._get_stats)
        app.router.add_get("/_emulator/config", self._get_config)
        app.router.add_post("/_emulator/config", self._post_config)
        app.router.add_post("/_emulator/reset", self._post_reset)
        app.router.add_get("/_emulator/{kind}", self._get_records)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def _route(self, operation: Operation) -> Callable[[web.Request], Any]:
        async def route(request: web.Request) -> web.Response:
            return await self.handle(request, operation)

        return route

    async def _on_cleanup(self, app: web.Application) -> None:
        self.close()


def _json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


@dataclass(frozen=True)
class RunningEmulator:
    url: str
    host: str
    port: int
    emulator: Emulator


@contextlib.asynccontextmanager
async def run_emulator(
    host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None, **options: Any
) -> AsyncIterator[RunningEmulator]:
    """Serve an emulator in the current event loop (port 0 picks a free port) until the block exits;
    over TLS (https://) with `ssl_context`."""
    emulator = Emulator(**options)
    runner = web.AppRunner(emulator.make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        reachable = "127.0.0.1" if host in ("", "0.0.0.0") else host
        scheme = "https" if ssl_context is not None else "http"
        yield RunningEmulator(f"{scheme}://{reachable}:{bound_port}", host, bound_port, emulator)
    finally:
        await runner.cleanup()
        emulator.close()
