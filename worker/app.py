"""Composition root: builds the parts, runs their loops, and shuts them down in order."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Coroutine
from typing import Any

from aiokafka import AIOKafkaProducer

from worker.config import Settings, redacted
from worker.deadletter import DeadLetterWriter
from worker.metrics import Metrics, MetricsServer
from worker.pipeline import Pipeline
from worker.sink import Sink
from worker.source import Source, explain_connection_errors, kafka_security

log = logging.getLogger(__name__)


def tune_garbage_collector() -> None:
    """Full collections of the cyclic GC stalled the loop for 200-270 ms every ~2 s while draining: each
    one scans every object alive, botocore's loaded models and the imported modules included. Freezing
    the start-up objects out of the scans cuts that work by about half. (Rarer young collections cut it
    further but let the peak RSS of a 1M-record drain grow past 400 MB, so the thresholds stay.)"""
    gc.collect()
    gc.freeze()


class Worker:
    def __init__(self, settings: Settings, *, until_drained: bool = False) -> None:
        self.settings = settings
        self.until_drained = until_drained
        self.metrics = Metrics()
        self.sink = Sink(settings.personalize, self.metrics)
        self.producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_request_size=settings.dead_letter.max_message_bytes,
            **kafka_security(settings.kafka),
        )
        self.dead_letters = DeadLetterWriter(self.producer, settings.dead_letter.topic, self.metrics)
        self.pipeline = Pipeline(settings, self.sink, self.dead_letters, self.metrics, quota=self.sink.limiter)
        limiter = self.sink.limiter
        # Read at scrape time: the rate moves between throttles too (probing, windows judged on successes).
        self.metrics.rate_limit.set_function(lambda: limiter.rate)
        self.metrics.throttled_share.set_function(lambda: limiter.throttled_share)
        self.metrics.throttle_noise.set_function(lambda: limiter.noise)
        self.source = Source(settings, self.pipeline, self.metrics)
        self.server = MetricsServer(self.metrics, self.readiness)
        self.stop_requested = asyncio.Event()
        self._stalled_reason: str | None = None

    def readiness(self) -> tuple[bool, str]:
        if not self.source.assigned_once.is_set():
            return False, "waiting for a partition assignment"
        if self.dead_letters.blocked_reason:
            return False, self.dead_letters.blocked_reason
        if self._stalled_reason:
            return False, self._stalled_reason
        return True, "ready"

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (or, with `until_drained`, until every assigned partition is done)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        log.info("starting", extra={"settings": redacted(self.settings)})
        await self.server.start(self.settings.metrics.host, self.settings.metrics.port)
        await self.sink.start()
        with explain_connection_errors(self.settings.kafka):
            # Together: each waits mostly on the broker (the consumer on joining its group).
            producing = asyncio.ensure_future(self.producer.start())
            try:
                await self.source.start()
            except BaseException:
                producing.cancel()
                await asyncio.gather(producing, return_exceptions=True)
                raise
            await producing
        tune_garbage_collector()
        log.info("running", extra={"metrics_port": self.server.port, "until_drained": self.until_drained})
        tasks = [
            self._spawn(self._fetch_loop(), "fetch"),
            self._spawn(self.pipeline.run_dispatcher(), "dispatch"),
            self._spawn(self.pipeline.run_dead_letters(), "dead-letters"),
            self._spawn(self._commit_loop(), "commit"),
        ]
        stop = asyncio.ensure_future(self.stop_requested.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in done if t is not stop and (t.cancelled() or t.exception() is not None)]
        for task in crashed:
            log.error("a worker loop stopped unexpectedly", exc_info=task.exception())
        await self.shutdown(tasks, stop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # Records left unfinished by the drain budget are not lost, only re-read after a restart.
        return 1 if crashed else 0

    async def shutdown(self, tasks: list[asyncio.Task[None]], stop: asyncio.Future[Any]) -> bool:
        """Stop taking work, finish what is in hand within the drain budget, commit, close clients."""
        budget = self.settings.worker.drain_timeout_seconds
        # 1. Stop fetching: nothing new enters the pipeline from here on. A poll cut short loses nothing:
        #    what it held is not tracked, so no commit passes it, and it is read again after a restart.
        fetch, dispatch, dead_letters, committer = tasks
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        # 2. Send every buffered batch now, ignoring linger, and wait (bounded) for the results. Part of
        #    the budget is kept for step 3.
        grace = min(budget / 2, self.settings.personalize.request_timeout_seconds)
        partitions = list(self.source.consumer.assignment())
        clean = await self.pipeline.settle_partitions(partitions, budget - grace)
        # 3. Start no new call, and let those in flight finish: a call cancelled mid-flight may still have
        #    reached Personalize, and its records, uncommitted, would be sent again after the restart.
        dispatch.cancel()
        await asyncio.gather(dispatch, return_exceptions=True)
        finished = await self.pipeline.finish_in_flight(grace)
        if not clean:
            log.warning(
                "drain budget exhausted; unfinished records will be re-read after restart",
                extra={"outstanding": self.pipeline.outstanding, "calls_finished": finished},
            )
        await self.pipeline.cancel_in_flight()
        # 4. Commit what is final. aiokafka's stop() does not call on_partitions_revoked: this is it.
        await self.source.commit()
        # 5. Stop the loops, leave the group, close the clients.
        stop.cancel()
        for task in (dispatch, dead_letters, committer, fetch):
            task.cancel()
        await asyncio.gather(dispatch, dead_letters, committer, fetch, stop, return_exceptions=True)
        await self.source.stop()
        await self.producer.stop()
        await self.sink.close()
        await self.server.stop()
        log.info("stopped", extra={"clean": clean, "totals": self.metrics.totals()})
        return clean

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coroutine, name=name)

    async def _fetch_loop(self) -> None:
        while True:
            await self.source.fetch_once()

    async def _commit_loop(self) -> None:
        """Commits on an interval; also the stall watchdog and the `until_drained` exit check."""
        interval = self.settings.worker.commit_interval_seconds
        stall_after = self.settings.worker.stall_timeout_seconds
        # Draining, look often whether everything is done, so the exit follows the last call closely.
        tick = min(interval, 0.1) if self.until_drained else interval
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            if self.until_drained and self.pipeline.outstanding and time.monotonic() - last < interval:
                continue
            last = time.monotonic()
            await self.source.commit()
            lag = self.source.lag()
            idle = time.monotonic() - self.source.last_progress
            stalled = lag > 0 and idle > stall_after
            if stalled and self._stalled_reason is None:
                why = self._why_stalled()
                self._stalled_reason = f"stalled: {lag} records behind and no progress for {idle:.0f}s: {why}"
                log.error("stall detected", extra={"lag": lag, "idle_seconds": round(idle), "why": why})
            elif not stalled and self._stalled_reason is not None:
                log.info("progress resumed")
                self._stalled_reason = None
            self.metrics.stalled.set(int(stalled))
            if self.until_drained and await self.source.drained():
                log.info("all assigned partitions drained and committed")
                self.stop_requested.set()
                return

    def _why_stalled(self) -> str:
        if self.dead_letters.blocked_reason:
            return self.dead_letters.blocked_reason
        if self.sink.last_error:
            return f"PutEvents failing: {self.sink.last_error}"
        return "nothing fetched and no offsets committed"
