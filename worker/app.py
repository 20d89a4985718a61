"""Composition root: builds the parts, runs their loops, and shuts them down in order."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from aiokafka import AIOKafkaProducer, TopicPartition

from worker.config import Settings, redacted
from worker.flow.batching import Batch
from worker.flow.fanout import Routes
from worker.flow.items import Item
from worker.flow.offsets import OffsetTracker
from worker.flow.pipeline import Pipeline, session_of
from worker.flow.routes import Quotas, resolve, route_schemas
from worker.kafka import codecs
from worker.kafka.connection import explain_connection_errors, kafka_security
from worker.kafka.deadletter import DeadLetterWriter
from worker.kafka.source import Source
from worker.kafka.topics import cluster_topics
from worker.observe.health import Watchdog
from worker.observe.metrics import Metrics, MetricsServer
from worker.personalize.sink import Sink

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def describe(error: BaseException, limit: int = 500) -> str:
    """The cause for one log line, "Type: message", bounded: an exception's text can be long."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


GC_YOUNG_THRESHOLD = 10_000
SLOW_START_SECONDS = 3.0
"""A start-up longer than this retried something: its garbage is collected before the freeze."""


def tune_garbage_collector(collect: bool = False) -> None:
    """Full collections of the cyclic GC stalled the loop for 200-270 ms every ~2 s while draining: each
    one scans every object alive, botocore's loaded models and the imported modules included. Freezing
    the start-up objects out of the scans cuts that work by about half. Young collections every
    GC_YOUNG_THRESHOLD allocations instead of 700: each event allocates several containers, so at 700 a
    young collection ran every ~100 events, and every tenth of them an older one. No collection before
    the freeze: start-up runs with collection paused (`cli._pause_collection`), so one here scanned all
    ~80,000 objects for ~1,600 unreachable ones (~55 ms, 0.3 µs per event of a 200k drain); frozen, those
    stay for the process's life, a few hundred KB once. `collect` after a slow start (connections retried:
    their failures' tracebacks hold frames, and frames sockets, which must not be frozen open)."""
    if collect:
        gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def all_or_none(steps: list[Coroutine[Any, Any, None]]) -> None:
    """Run the steps together; the first failure cancels the others (none is left running behind a start-up
    that failed, or was cancelled by a stop) and is raised as itself, for the one error line to name."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise cast(BaseException, task.exception())


class Worker:
    def __init__(self, settings: Settings, *, until_drained: bool = False) -> None:
        self.settings = settings
        self.until_drained = until_drained
        self.metrics = Metrics()
        self.routes = resolve(settings)

        def dead_letter_producer() -> AIOKafkaProducer:
            return AIOKafkaProducer(
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                max_request_size=settings.dead_letter.max_message_bytes,
                **kafka_security(settings.kafka),
            )

        self.schemas, by_format = route_schemas(settings, self.routes, self.metrics)
        # Per route: its sinks (one per destination, each with its own AIMD limiter), dead-letter writer and
        # pipeline; one offset tracker for all, so the one consumer commits every route's partitions.
        tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.sinks: list[Sink] = []
        self.letter_writers: list[DeadLetterWriter] = []
        pipelines: dict[str, Pipeline] = {}
        topics: dict[str, str] = {}
        for route in self.routes:
            labels = self.metrics.route(route.name)
            sinks = {
                destination: Sink(
                    settings.personalize,
                    self.metrics,
                    operation=route.spec,
                    destination=destination,
                    max_rate=route.max_requests_per_second,
                    route=labels,
                    destination_name=name,
                )
                for name, destination in route.destinations
            }
            self.sinks.extend(sinks.values())
            letters = DeadLetterWriter(dead_letter_producer, route.dead_letter_topic, self.metrics)
            self.letter_writers.append(letters)
            first = next(iter(sinks.values()))
            quota = first.limiter if len(sinks) == 1 else Quotas({d: s.limiter for d, s in sinks.items()})
            pipelines[route.name] = Pipeline(
                settings,
                first,
                letters,
                self.metrics,
                quota=quota,
                schemas=by_format.get(route.name) if settings.routes else by_format.get(""),
                route=route,
                tracker=tracker,
                sinks=sinks if route.tracking_id_field else None,
            )
            topics.update(dict.fromkeys(route.topics, route.name))
        self.sink = self.sinks[0]
        # Read at scrape time, not kept per call: calls in flight over every sink; the first (the default
        # route's) limiter for the process-wide rate; the worst windowed throttled share and noise estimate.
        every, default_limiter = list(self.sinks), self.sink.limiter
        self.metrics.in_flight.set_function(lambda: sum(sink.in_flight for sink in every))
        self.metrics.rate_limit.set_function(lambda: default_limiter.rate)
        self.metrics.throttled_share.set_function(lambda: max(sink.limiter.throttled_share for sink in every))
        self.metrics.throttle_noise.set_function(lambda: max(sink.limiter.noise for sink in every))
        self.dead_letters = self.letter_writers[0]
        self.pipeline = Routes(pipelines, topics, tracker)
        self.source = Source(settings, self.pipeline, self.metrics, schemas=self.schemas, topics=list(topics))
        self.source.on_failure = self._fail
        self.server = MetricsServer(self.metrics, self.readiness)
        self.watchdog = Watchdog(self.pipeline, self.metrics, self, settings.worker.stall_timeout_seconds)
        self.stop_requested = asyncio.Event()
        self._failure: str | None = None
        """The first failure, as "Type: message": the process exits 1 and never calls its stop clean."""
        self._closing = False

    def readiness(self) -> tuple[bool, str]:
        if self._failure:
            return False, f"failed, stopping: {self._failure}"
        if self.source.topics.reason:
            return False, self.source.topics.reason
        if not self.source.assigned_once.is_set():
            return False, "waiting for a partition assignment"
        blocked = self.dead_letters_blocked()
        if blocked:
            return False, blocked
        refused = next((sink.refused for sink in self.sinks if sink.refused), None)
        if refused:
            return False, refused
        if self.schemas is not None and self.schemas.blocked_reason:
            return False, self.schemas.blocked_reason
        if self.watchdog.reason:
            return False, self.watchdog.reason
        return True, "ready"

    # --- what the watchdog asks (health.Causes) -------------------------------------------------

    def dead_letters_blocked(self) -> str | None:
        return next((w.blocked_reason for w in self.letter_writers if w.blocked_reason), None)

    def calls_failing(self) -> str | None:
        for sink in self.sinks:
            if sink.refused:
                return sink.refused
        for sink in self.sinks:
            error = sink.last_error  # a code, never the service's message: this reason is served on /readyz
            if error:
                return f"{sink.operation.name} failing: {error}"
        return None

    def is_retrying(self, batch: Batch[Any, Item]) -> bool:
        """Whether the batch's call is being retried: its sink marks the first argument it was delivered
        with (the session; an items/users/actions route's destination; see `Pipeline._deliver`)."""
        first = session_of(batch.key)
        return any(first in sink.retrying for sink in self.sinks)

    def handing_over(self) -> bool:
        return self.source.handing_over

    async def run(self, *, stop_requested_before: Callable[[], bool] = lambda: False) -> int:
        """Run until SIGTERM/SIGINT (or, with `until_drained`, until every assigned partition is done).

        Exit code 0 only when nothing failed; any failure, at start-up or of any loop at any time, gives
        one error line naming the cause, a "stopped" line with clean=false, and exit code 1. A stop asked
        for during start-up ends it at once with exit code 0: nothing was fetched, so nothing is unfinished.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        if stop_requested_before():  # a signal caught before these handlers (see cli._EarlyStop)
            self.stop_requested.set()
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        log.info("starting", extra={"settings": redacted(self.settings)})
        absent = codecs.missing()
        if absent:
            log.warning("compression codecs unavailable", extra={"codecs": absent, "hint": codecs.HINT})
        # Start-up can wait long (an unreachable broker: aiokafka's 40 s per attempt; a group to join): a
        # stop asked for meanwhile must not wait for it.
        starting = asyncio.ensure_future(self._start())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait([starting, stop], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            log.info("stop requested during start-up; stopping")
            await self._close()
            self._log_stopped(clean=True)
            return 0
        error = starting.exception()
        if error is not None:
            self._fail("start-up", error, traceback=False)  # the message says what; a traceback adds nothing
            stop.cancel()
            await asyncio.gather(stop, return_exceptions=True)
            await self._close()
            self._log_stopped(clean=False)
            return 1
        log.info("running", extra={"metrics_port": self.server.port, "until_drained": self.until_drained})
        tasks = [
            self._spawn(self._fetch_loop(), "fetch"),
            self._spawn(self.pipeline.run_dispatcher(), "dispatch"),
            self._spawn(self.pipeline.run_dead_letters(), "dead-letters"),
            self._spawn(self._commit_loop(), "commit"),
            self._spawn(self.source.watch_topics(), "topics"),
        ]
        # A loop that ends sets stop_requested through `_loop_ended`, as a signal or the drained check do.
        await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        await self.shutdown(tasks, stop)
        # Records left unfinished by the drain budget are not lost, only re-read after a restart: exit 0.
        return 1 if self._failure else 0

    async def _start(self) -> None:
        began = time.monotonic()
        await self.server.start(self.settings.metrics.host, self.settings.metrics.port)
        # The sinks (credentials and endpoint, resolved in threads) and the Kafka side (producers, topics, the
        # group join: mostly waiting on the broker) need nothing from each other: together, not one after the
        # other (in the drain benchmark that was ~0.1-0.2 s before the first call).
        await all_or_none([*(sink.start() for sink in self.sinks), self._start_kafka()])
        self.metrics.commit_metadata_limit.set(self.source.metadata_limit)
        tune_garbage_collector(collect=time.monotonic() - began > SLOW_START_SECONDS)

    async def _start_kafka(self) -> None:
        with explain_connection_errors(self.settings.kafka):
            # Together: every route's dead-letter producer (each waits mostly on the broker).
            await asyncio.gather(*(w.start() for w in self.letter_writers))
            # Which source topics exist, before joining the group: a backfill has nothing to drain from a
            # missing one (and must not make the group rebalance for nothing); a service waits for it.
            present = await cluster_topics(await self.dead_letters.kafka_client())
            if self.until_drained:
                self.source.topics.fail_if_missing(present)
            self.source.topics.update(present)
            await self.source.start()

    async def shutdown(self, tasks: list[asyncio.Task[None]], stop: asyncio.Future[Any]) -> bool:
        """Stop taking work, finish what is in hand within the drain budget, commit, close clients.

        Returns whether the stop was clean: everything fetched finished and committed, and nothing failed.
        """
        budget = self.settings.worker.drain_timeout_seconds
        fetch, dispatch, dead_letters, committer, topics = tasks
        self._closing = True  # from here on, loops end because they are told to
        drained = False
        try:
            # 1. Stop fetching: nothing new enters the pipeline from here on. A poll cut short loses nothing:
            #    what it held is not tracked, so no commit passes it, and it is read again after a restart.
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
            # 2. Send every buffered batch now, ignoring linger, and wait (bounded) for the results. Part of
            #    the budget is kept for step 3. With the dispatcher or the dead-letter writer dead, nothing
            #    more would finish: the wait would only burn the budget.
            grace = min(budget / 2, self.settings.personalize.request_timeout_seconds)
            partitions = list(self.source.consumer.assignment())
            settle = 0.0 if dispatch.done() or dead_letters.done() else budget - grace
            drained = await self.pipeline.settle_partitions(partitions, settle)
            # 3. Start no new call, and let those in flight finish: a call cancelled mid-flight may still have
            #    reached Personalize, and its records, uncommitted, would be sent again after the restart.
            dispatch.cancel()
            await asyncio.gather(dispatch, return_exceptions=True)
            finished = await self.pipeline.finish_in_flight(grace)
            if not drained:
                log.warning(
                    "drain budget exhausted; unfinished records will be re-read after restart",
                    extra={"outstanding": self.pipeline.outstanding, "calls_finished": finished},
                )
            await self.pipeline.cancel_in_flight()
            # 4. Commit what is final, also after a failure: the tracker never passes an unfinished record.
            #    aiokafka's stop() does not call on_partitions_revoked: this is it.
            await self.source.commit()
        except Exception as error:
            self._fail("shutdown", error)
        finally:
            # 5. Stop the loops, leave the group, close the clients.
            stop.cancel()
            for task in (dispatch, dead_letters, committer, fetch, topics):
                task.cancel()
            await asyncio.gather(dispatch, dead_letters, committer, fetch, topics, stop, return_exceptions=True)
            await self._close()
        clean = drained and self._failure is None
        self._log_stopped(clean)
        return clean

    async def _close(self) -> None:
        """Close every client, each even if another fails: leaving the group spares the others a wait."""
        closers = [("consumer", self.source.stop)]
        closers += [("dead-letter producer", writer.stop) for writer in self.letter_writers]
        closers += [("sink", sink.close) for sink in self.sinks]
        closers.append(("metrics server", self.server.stop))
        if self.schemas is not None:
            closers.append(("schema registry client", self.schemas.close))
        for name, close in closers:
            try:
                await close()
            except Exception as error:
                log.warning("closing a client failed", extra={"client": name, "error": describe(error)})

    def _log_stopped(self, clean: bool) -> None:
        extra: dict[str, Any] = {"clean": clean, "totals": self.metrics.totals()}
        if self._failure:
            extra["error"] = self._failure
        log.info("stopped", extra=extra)

    def _fail(self, where: str, error: BaseException, *, traceback: bool = True) -> None:
        """Log a failure in its one error line and stop; the first one is the exit's cause."""
        cause = describe(error)
        extra = {"where": where, "error": cause}
        hint = codecs.hint_for(error)
        if hint:
            extra["hint"] = hint
        log.error("worker failed", extra=extra, exc_info=error if traceback and error.__traceback__ else None)
        if self._failure is None:
            self._failure = cause
        self.stop_requested.set()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop may end only when told to: by shutdown's cancel, or (commit) after asking to stop."""
        if task.cancelled():
            if not self._closing:
                self._fail(task.get_name(), asyncio.CancelledError("cancelled by something other than shutdown"))
        elif (error := task.exception()) is not None:
            self._fail(task.get_name(), error)
        elif not self.stop_requested.is_set():
            self._fail(task.get_name(), RuntimeError("returned without being asked to stop"))

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=name)
        task.add_done_callback(self._loop_ended)
        return task

    async def _fetch_loop(self) -> None:
        while True:
            await self.source.fetch_once()

    async def _commit_loop(self) -> None:
        """Commits on an interval; also the stall watchdog and the `until_drained` exit check."""
        interval = self.settings.worker.commit_interval_seconds
        # Draining, look often whether everything is done, so the exit follows the last call closely (a look
        # while records are outstanding is two comparisons; at 0.1 s the exit waited 50 ms on average).
        tick = min(interval, 0.02) if self.until_drained else interval
        last = committed = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            if self.until_drained and self.pipeline.outstanding and time.monotonic() - last < interval:
                continue
            last = time.monotonic()
            # Drained-looking, drained() commits: not twice in a row, but at least once an interval.
            if self.pipeline.outstanding or not self.until_drained or last - committed >= interval:
                await self.source.commit()
                committed = last
            self.watchdog.check(self.source.lag())
            if self.until_drained and await self.source.drained():
                log.info("all assigned partitions drained and committed")
                self.stop_requested.set()
                return
