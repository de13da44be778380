"""Quality-target evidence pooled across processes and replicas through one Redis Stream.

Each process holds its calibrators (`router.QualityTargets`). Alone, every replica or worker
would start cold (escalating everything until its own `min_labels`), spend its own shadow
budget, and judge its threshold on its share of the traffic only. With Redis configured,
each process publishes what its calibrators see (a scored request with the probability it
had of a shadow label; a label or a lost one; a request skipped straight to the frontier) and
enters every other process's events into its own calibrators, so all of them estimate from
the whole traffic: one cold start, and a shadow share that follows the whole traffic's rate,
so `shadow_per_minute` holds for the fleet. Events are published in batches off the request
path; a Redis failure only delays the pooling (each process keeps its own evidence), it never
fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from router import QualityCalibrator, QualityTarget, QualityTargets, Scored

log = logging.getLogger("smallfirst.quality")

SpecFor = Callable[[str], QualityTarget | None]  # a policy's current quality target
REMEMBERED = 50_000  # other processes' entries kept for their labels, per process
OUTBOX = 10_000  # events kept for Redis while it is away; older ones are dropped
RETRY_S = 1.0


class QualityPool:
    """A process joining late (or restarted) first reads what the stream still holds, so it
    starts from the fleet's evidence, its own earlier evidence included."""

    def __init__(self, client: Any, key: str, targets: QualityTargets, spec_for: SpecFor,
                 maxlen: int = 50_000, every_s: float = 0.1) -> None:
        self.client, self.key, self.targets, self.spec_for = client, key, targets, spec_for
        self.maxlen, self.every_s = maxlen, every_s
        self.origin = uuid.uuid4().hex[:12]
        self.applied = 0  # other processes' events entered here
        self.dropped = 0  # own events never published (Redis away too long)
        self._outbox: list[dict[str, str]] = []
        self._ids: dict[int, str] = {}  # id(own entry) -> its pooled id
        self._numbers = itertools.count()
        # their pooled id -> the calibrator and entry its label goes to
        self._theirs: OrderedDict[str, tuple[QualityCalibrator, Scored]] = OrderedDict()
        self._last = "0-0"  # everything the stream still holds

    # ---- what this process saw ---------------------------------------------------------

    def entered(self, policy: str, segment: str, entry: Scored) -> None:
        pooled = f"{self.origin}-{next(self._numbers)}"
        self._ids[id(entry)] = pooled
        self._publish({"e": pooled, "p": policy, "s": segment, "c": repr(entry.confidence),
                       "q": repr(entry.probability), "d": repr(entry.difficulty),
                       "t": repr(entry.tried)})

    def skipped(self, policy: str, segment: str, difficulty: float, share: float) -> None:
        self._publish({"skip": "1", "p": policy, "s": segment, "d": repr(difficulty),
                       "t": repr(share)})

    def labelled(self, entry: Scored, shadow: bool, lost: bool) -> None:
        pooled = self._ids.pop(id(entry), None)
        if pooled is not None:
            self._publish({"l": pooled, "small": repr(entry.small), "large": repr(entry.large),
                           "shadow": str(int(shadow)), "lost": str(int(lost))})

    def _publish(self, event: dict[str, str]) -> None:
        self._outbox.append({"o": self.origin, **event})
        while len(self._ids) > REMEMBERED:  # entries whose label never came
            self._ids.pop(next(iter(self._ids)))

    # ---- the exchange ------------------------------------------------------------------

    async def run(self) -> None:
        """Publish this process's events and enter everyone else's, until cancelled.

        A cancellation is not passed on to a Redis command under way: redis-py may never
        finish unwinding a cancelled blocking read, which hung shutdown. The exchange ends on
        its own within the read's block time (or the socket timeout), unawaited."""
        while True:
            exchange = asyncio.ensure_future(self._exchange())
            try:
                await asyncio.shield(exchange)
            except asyncio.CancelledError:
                exchange.add_done_callback(lambda t: t.cancelled() or t.exception())
                raise

    async def _exchange(self) -> None:
        try:
            await self._flush()
            await self._read()
        except Exception as exc:  # Redis away: evidence stays local until it is back
            log.warning("quality pool: %s; retrying in %.0fs", exc, RETRY_S)
            await asyncio.sleep(RETRY_S)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._flush()

    async def _flush(self) -> None:
        events, self._outbox = self._outbox, []
        if not events:
            return
        pipe = self.client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(self.key, event, maxlen=self.maxlen, approximate=True)
        try:
            await pipe.execute()
        except Exception:
            self._outbox[:0] = events  # sent again with the next batch, the newest kept
            excess = len(self._outbox) - OUTBOX
            if excess > 0:
                del self._outbox[:excess]
                self.dropped += excess
            raise

    async def _read(self) -> None:
        block = max(int(self.every_s * 1000), 1)
        replies = await self.client.xread({self.key: self._last}, count=1000, block=block)
        events = []
        for _, messages in replies or []:
            for message_id, fields in messages:
                self._last = message_id
                events.append({_text(k): _text(v) for k, v in fields.items()})
        if events:  # off the loop: a label may trigger a threshold search
            await asyncio.to_thread(self._apply_all, events)

    def _apply_all(self, events: list[dict[str, str]]) -> None:
        for event in events:
            self._apply(event)

    def _apply(self, event: dict[str, str]) -> None:
        if event.get("o") == self.origin:
            return
        if "skip" in event:
            spec = self.spec_for(event["p"])
            if spec is None:
                return
            self.targets.calibrator(event["p"], event["s"], spec).enter_skipped(
                float(event["d"]), float(event["t"]))
        elif "e" in event:
            spec = self.spec_for(event["p"])
            if spec is None:  # no quality target here (yet, or any more)
                return
            calibrator = self.targets.calibrator(event["p"], event["s"], spec)
            difficulty = event.get("d", "None")
            entry = calibrator.enter(float(event["c"]), float(event["q"]),
                                     None if difficulty == "None" else float(difficulty),
                                     float(event.get("t", "1.0")))
            self._theirs[event["e"]] = calibrator, entry
            while len(self._theirs) > REMEMBERED:
                self._theirs.popitem(last=False)
        elif (found := self._theirs.pop(event.get("l", ""), None)) is not None:
            calibrator, entry = found
            calibrator.label(entry, float(event["small"]), float(event["large"]),
                             shadow=event["shadow"] == "1", lost=event["lost"] == "1")
        else:
            return
        self.applied += 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
