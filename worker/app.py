"""Composition root: builds the parts, runs their loops, and shuts them down in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Coroutine
from typing import Any

from aiokafka import AIOKafkaProducer

from worker.batching import Batch
from worker.config import Settings, redacted
from worker.deadletter import DeadLetterWriter
from worker.health import Watchdog
from worker.mapping import SessionKey
from worker.metrics import Metrics, MetricsServer
from worker.pipeline import Item, Pipeline
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
        self.source = Source(settings, self.pipeline, self.metrics)
        self.server = MetricsServer(self.metrics, self.readiness)
        self.watchdog = Watchdog(self.pipeline, self.metrics, self, settings.worker.stall_timeout_seconds)
        self.stop_requested = asyncio.Event()

    def readiness(self) -> tuple[bool, str]:
        if not self.source.assigned_once.is_set():
            return False, "waiting for a partition assignment"
        if self.dead_letters.blocked_reason:
            return False, self.dead_letters.blocked_reason
        if self.watchdog.reason:
            return False, self.watchdog.reason
        return True, "ready"

    # --- what the watchdog asks (health.Causes) -------------------------------------------------

    def dead_letters_blocked(self) -> str | None:
        return self.dead_letters.blocked_reason

    def calls_failing(self) -> str | None:
        error = self.sink.last_error
        return f"PutEvents failing: {error}" if error else None

    def is_retrying(self, batch: Batch[SessionKey, Item]) -> bool:
        return self.sink.last_error is not None

    def handing_over(self) -> bool:
        return self.source.handing_over

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (or, with `until_drained`, until every assigned partition is done)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        log.info("starting", extra={"settings": redacted(self.settings)})
        try:
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
        except BaseException:
            await self._close_after_failed_start()
            raise
        self.metrics.rate_limit.set(self.sink.limiter.rate)
        self.metrics.commit_metadata_limit.set(self.source.metadata_limit)
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

    async def _close_after_failed_start(self) -> None:
        """Leave no client open: their "Unclosed AIOKafkaProducer" errors at exit would bury the one line
        that says why the start failed."""
        for close in (self.source.stop, self.producer.stop, self.sink.close, self.server.stop):
            with contextlib.suppress(Exception):
                await close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coroutine, name=name)

    async def _fetch_loop(self) -> None:
        while True:
            await self.source.fetch_once()

    async def _commit_loop(self) -> None:
        """Commits on an interval; also the stall watchdog and the `until_drained` exit check."""
        interval = self.settings.worker.commit_interval_seconds
        # Draining, look often whether everything is done, so the exit follows the last call closely.
        tick = min(interval, 0.1) if self.until_drained else interval
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            if self.until_drained and self.pipeline.outstanding and time.monotonic() - last < interval:
                continue
            last = time.monotonic()
            await self.source.commit()
            self.watchdog.check(self.source.lag())
            if self.until_drained and await self.source.drained():
                log.info("all assigned partitions drained and committed")
                self.stop_requested.set()
                return
