"""Issue 13, the drain from process start to exit: what a `run --until-drained` spends before its first
call and after its last one. Pure units with fakes where the logic is ours; a real interpreter for imports."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiokafka.structs import TopicPartition
from botocore.credentials import Credentials

from tests.stack import WorkerFactory
from tests.test_chaos import until
from tests.test_pipeline import FakeConsumer, Letters, records
from worker.app import all_or_none
from worker.config import Settings
from worker.flow.pipeline import Pipeline
from worker.kafka.source import Source
from worker.observe.metrics import Metrics
from worker.personalize.client import PutEventsClient, in_daemon_thread
from worker.personalize.http import Response
from worker.personalize.ratelimit import RateLimiter
from worker.personalize.retry import Rejection


class InstantSink:
    async def deliver(self, session_id: str, user_id: str | None, events: list[str], sent_at: float) -> list[Rejection]:
        return []


@dataclass
class EndsConsumer(FakeConsumer):
    """A consumer read to `positions`, whose latest fetch answers gave `stable` as each partition's end."""

    positions: dict[TopicPartition, int] = field(default_factory=dict)
    stable: dict[TopicPartition, int | None] = field(default_factory=dict)
    asked_for_ends: int = 0

    def last_stable_offset(self, tp: TopicPartition) -> int | None:
        return self.stable.get(tp)

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.asked_for_ends += 1
        return {tp: self.positions[tp] for tp in partitions}


async def drained_source(stable: dict[TopicPartition, int | None]) -> tuple[Source, EndsConsumer]:
    """A source whose two partitions were read to the end and every record sent."""
    settings = Settings.model_validate({"personalize": {"tracking_id": "t"}, "batching": {"linger_ms": 0}})
    metrics = Metrics()
    pipeline = Pipeline(settings, InstantSink(), Letters(), metrics, quota=RateLimiter(1000))
    source = Source(settings, pipeline, metrics)
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    consumer = EndsConsumer({tp0, tp1}, positions={tp0: 3, tp1: 2}, stable=stable)
    await source.consumer.stop()  # never started: closed only so it warns of nothing
    source.consumer = consumer
    await source.on_partitions_assigned([tp0, tp1])
    pipeline.ingest(tp0, records(0, 3))
    pipeline.ingest(tp1, records(1, 2))
    dispatcher = asyncio.create_task(pipeline.run_dispatcher())
    try:
        for _ in range(500):
            if not pipeline.outstanding:
                break
            await asyncio.sleep(0.01)
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
    assert not pipeline.outstanding
    return source, consumer


async def test_drained_takes_the_ends_from_the_fetch_answers_without_asking_the_broker() -> None:
    """Asking (ListOffsets) queues behind the long-poll fetch on the broker's connection: 0.25-0.5 s at
    every drained exit, measured. The fetch answers already said where each partition ends."""
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    source, consumer = await drained_source({tp0: 3, tp1: 2})
    assert await source.drained()
    assert consumer.asked_for_ends == 0
    assert consumer.commits[-1] == {tp0: 3, tp1: 2}


async def test_drained_asks_the_broker_while_a_partition_end_is_unknown() -> None:
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    source, consumer = await drained_source({tp0: 3, tp1: None})  # tp1 not fetched yet
    assert await source.drained()
    assert consumer.asked_for_ends == 1


async def test_drained_asks_the_broker_when_a_fetch_answer_gave_no_stable_offset() -> None:
    """A fetch answer's last stable offset is -1 when the broker does not know it (aiokafka: always so under
    read_uncommitted; Kafka-compatible brokers): taken as an end, every position is past it and the worker
    exited 'drained' at its first check with nothing read."""
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    source, consumer = await drained_source({tp0: 3, tp1: -1})
    consumer.positions[tp1] = 0  # nothing of tp1 read yet; the broker says it ends at 2
    consumer_ends = {tp0: 3, tp1: 2}

    async def end_offsets(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        consumer.asked_for_ends += 1
        return {tp: consumer_ends[tp] for tp in partitions}

    consumer.end_offsets = end_offsets  # type: ignore[method-assign]
    assert not await source.drained()
    assert consumer.asked_for_ends == 1


async def test_drained_is_false_while_the_fetched_end_is_ahead() -> None:
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    source, consumer = await drained_source({tp0: 3, tp1: 5})  # tp1 has records not read yet
    assert not await source.drained()
    assert consumer.asked_for_ends == 0


async def test_start_steps_run_together() -> None:
    """Each step waits for the other: run one after the other, they would never finish."""
    a, b = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        a.set()
        await b.wait()

    async def second() -> None:
        b.set()
        await a.wait()

    await asyncio.wait_for(all_or_none([first(), second()]), 5)


async def test_a_failing_start_step_cancels_the_others_and_is_raised_as_itself() -> None:
    cancelled = asyncio.Event()

    async def joins_forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("no AWS credentials found")

    with pytest.raises(RuntimeError, match="no AWS credentials found"):
        await asyncio.wait_for(all_or_none([joins_forever(), fails()]), 5)
    assert cancelled.is_set()


def test_a_worker_start_imports_no_aiohttp_or_aioboto3(tmp_path: Path) -> None:
    """aiohttp (its connector builds SSL contexts at import) with aioboto3/aiobotocore were ~0.7 s of CPU
    before every worker's first call; botocore alone resolves the credentials and the endpoint."""
    config = tmp_path / "w.toml"
    config.write_text(
        textwrap.dedent(
            """
            [kafka]
            bootstrap_servers = "localhost:9"
            topics = ["t"]
            group_id = "g"
            [personalize]
            tracking_id = "trk"
            endpoint_url = "http://127.0.0.1:9"
            [dead_letter]
            topic = "t.dlq"
            """
        ),
        encoding="utf-8",
    )
    program = textwrap.dedent(
        f"""
        import asyncio, sys
        from worker.cli import _load
        from worker.app import Worker
        from worker.personalize.client import _botocore_client

        settings = _load({str(config)!r})

        async def build() -> None:
            worker = Worker(settings, until_drained=True)
            _botocore_client(settings.personalize)
            await worker.source.consumer.stop()

        asyncio.run(build())
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("aiohttp", "aioboto3", "aiobotocore"))
        print(",".join(heavy))
        """
    )
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == ""


@pytest.mark.kafka
async def test_sigterm_while_the_credential_chain_hangs_exits_at_once(worker_factory: WorkerFactory) -> None:
    """The credential chain runs in a thread beside the Kafka start; an instance-metadata endpoint that never
    answers holds it for botocore's timeouts (here 2 x 20 s). A stop meanwhile exits without waiting for it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {
            "AWS_ACCESS_KEY_ID": "",  # empty: botocore's environment provider finds nothing
            "AWS_SECRET_ACCESS_KEY": "",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "AWS_METADATA_SERVICE_TIMEOUT": "20",
            "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "1",
        }
        worker = worker_factory(worker_factory.config("t", "t.dlq", "g"), env=env)
        await until(lambda: '"msg":"starting"' in worker.log_text(), 60, "the starting line")
        await asyncio.sleep(2.0)  # the Kafka side has started meanwhile; the credentials have not
        assert worker.running
        worker.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        code = await worker.await_exit(60)
        elapsed = time.monotonic() - stopped_at
    assert code == 0
    assert elapsed < 10, f"took {elapsed:.1f}s after SIGTERM: the exit waited for the credential thread"
    assert "stop requested during start-up; stopping" in worker.log_text()


class SlowRefreshing:
    """botocore's RefreshableCredentials as the sink sees it: due for a refresh that blocks (STS, IMDS)."""

    def __init__(self) -> None:
        self.refreshes = 0
        self.due = True

    def refresh_needed(self) -> bool:
        return self.due

    def get_frozen_credentials(self) -> Any:
        self.refreshes += 1
        time.sleep(0.5)
        self.due = False
        return Credentials("AKID", "secret").get_frozen_credentials()


class OkHttp:
    async def post(self, headers: list[tuple[str, str]], body: bytes) -> Response:
        return Response(200, {}, b"")


async def test_a_blocking_credential_refresh_runs_once_off_the_loop() -> None:
    client = PutEventsClient(Settings.model_validate({"personalize": {"tracking_id": "t"}}).personalize)
    credentials = SlowRefreshing()
    client._credentials, client._refreshable = credentials, True
    client._http = cast(Any, OkHttp())
    client.url, client.region, client._signer_name = "http://127.0.0.1:1/events", "us-east-1", "personalize"
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(ticker())
    try:
        await asyncio.wait_for(asyncio.gather(*(client.put_events(b"{}") for _ in range(20))), 10)
    finally:
        beat.cancel()
    assert credentials.refreshes == 1, "one refresh for the calls that found it due together"
    assert ticks >= 10, "the loop went on while botocore refreshed"


class AdvisedRefreshHangs:
    """botocore's RefreshableCredentials 15 to 10 minutes before expiry, once `advised`: a refresh is advised,
    not mandatory (botocore signs with the current ones meanwhile), and it hangs (STS unreachable)."""

    def __init__(self) -> None:
        self.advised = False
        self.release = threading.Event()
        self.current = Credentials("AKID", "secret").get_frozen_credentials()

    def refresh_needed(self, refresh_in: float | None = None) -> bool:
        return self.advised and refresh_in is None  # the advisory window's, not the mandatory one's

    def get_frozen_credentials(self) -> Any:
        if self.advised:
            self.release.wait(30)
        return self.current


async def test_an_advised_refresh_that_hangs_holds_no_call() -> None:
    """Waiting for an advised refresh held every PutEvents call for as long as STS took to fail, while the
    credentials in hand had 10 more minutes: the calls go on with them, as botocore's own do."""
    client = PutEventsClient(Settings.model_validate({"personalize": {"tracking_id": "t"}}).personalize)
    credentials = AdvisedRefreshHangs()
    client._credentials, client._refreshable = credentials, True
    client._http = cast(Any, OkHttp())
    client.url, client.region, client._signer_name = "http://127.0.0.1:1/events", "us-east-1", "personalize"
    await client.put_events(b"{}")  # signed with the current credentials
    credentials.advised = True
    try:
        await asyncio.wait_for(asyncio.gather(*(client.put_events(b"{}") for _ in range(5))), 10)
    finally:
        credentials.release.set()
    assert client._refreshing is not None
    await asyncio.wait_for(client._refreshing, 10)  # the refresh went on in its thread meanwhile


async def test_a_credential_chain_that_exits_its_thread_is_an_error_not_a_wait() -> None:
    """A SystemExit ends a thread silently: the await (and with it every call sharing a refresh) waited
    forever. It comes back as an error the sink classifies and retries."""

    def exits() -> None:
        raise SystemExit(1)

    with pytest.raises(RuntimeError, match="SystemExit"):
        await asyncio.wait_for(in_daemon_thread(exits), 5)
