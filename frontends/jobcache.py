"""What the HTTP gateway knows of a job's record from what it already hears, so a poll need not ask.

Polling is how most clients follow a job (``GET /v1/jobs/{id}`` in a loop, A1111's ``/progress``), and
asking the scheduler costs every process on the way (HTTP server, broker, scheduler) a message each way.
The gateway already hears each job it submitted or follows: the ``Accepted`` record, the job's events
(JobEvent, Progress) and, for its own jobs, the JobResult. This cache keeps the record those make, and
says when it may be served in place of an ask:

- a record the scheduler sent (Accepted, a GetJob answer, the JobResult) is exact when it comes;
- a JobEvent that keeps the job's state updates what it carries (position, ETA, runner, attempt, batch);
- a JobEvent that changes the state leaves fields only the scheduler knows (``started_at`` at running,
  ``finished_at`` and the outputs at the end) unknown here: the entry is not served until asked again;
- the ETA is the scheduler's way, seconds from now: the cached one counts down as time passes;
- an entry not heard of for ``fresh_s`` is asked again (events are lossy; a queued job's position moves
  as jobs ahead of it start, and the scheduler announces that only now and then);
- an ended job's record from the scheduler is final: always served, never replaced by an event.

So a poll is answered from here while the job is heard of and exact, and asked otherwise: never with a
state the job has left, never with an ended job's record other than the scheduler's.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from actors.messages import JobEvent, Progress
from atelier.jobs import JobKind, JobRecord, JobState

FRESH_S = 2.0  # how long what was heard of a live job stands without word of it
KEEP = 2000  # entries; the oldest go first


@dataclass(slots=True)
class _Entry:
    record: JobRecord
    at: float  # when ``record`` was exact (its ETA is from then)
    heard: float  # when the job was last heard of (an answer or an event)
    exact: bool = True  # False: a transition changed fields no event carries; ask before serving
    final: bool = False  # the scheduler's record of the job's end: served for good


class JobCache:
    """Job records as last heard, by job id, with the rule for when one may answer a poll."""

    def __init__(self, fresh_s: float = FRESH_S, keep: int = KEEP, clock: Callable[[], float] = time.monotonic):
        self.fresh_s = fresh_s
        self.keep = keep
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.hits = self.misses = 0  # served from here, and asked: for /metrics and the bench

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record if this cache may answer for it now; None: ask the scheduler."""
        entry = self._entries.get(job_id)
        now = self.clock()
        if self.fresh_s <= 0:  # turned off ([http] poll_cache_s = 0): every poll is asked
            self.misses += 1
            return None
        # A training's record also moves with its checkpoints, which no event carries: always asked while it runs.
        if entry is None or not (entry.final or (
                entry.exact and now - entry.heard <= self.fresh_s and entry.record.spec.kind is not JobKind.train)):
            self.misses += 1
            return None
        self.hits += 1
        record = entry.record
        if record.eta_s is not None and not entry.final and now > entry.at:
            # The scheduler's ETA is seconds from when it wrote the record: count it down the same way.
            record = record.model_copy(update={"eta_s": round(max(0.0, record.eta_s - (now - entry.at)), 3)})
        return record

    def learned(self, record: JobRecord, asked_at: float | None = None) -> None:
        """A record the scheduler sent (Accepted, a GetJob answer, a JobResult). ``asked_at``: when the
        question went out; an event heard since is newer than this answer, which then does not replace it
        (but an ended job's record always does)."""
        now = self.clock()
        entry = self._entries.get(record.spec.id)
        if entry is not None:
            if entry.final:
                return  # the scheduler said how it ended: nothing it says later differs
            if asked_at is not None and entry.heard > asked_at and not record.state.terminal:
                entry.exact = False  # crossed with an event: neither is sure to be the latest
                return
        self._entries[record.spec.id] = _Entry(record, at=now, heard=now, final=record.state.terminal)
        self._entries.move_to_end(record.spec.id)
        while len(self._entries) > self.keep:
            self._entries.popitem(last=False)

    def event(self, event: JobEvent | Progress) -> None:
        """A job event heard on the events socket."""
        entry = self._entries.get(event.job_id)
        if entry is None or entry.final:
            return  # never asked about, or final: an event (late, out of order) changes neither
        now = self.clock()
        entry.heard = now
        if isinstance(event, Progress):
            if entry.record.state is not JobState.running:
                entry.exact = False  # it runs, and the event saying so was lost: its started_at is unknown
            return
        if event.state is not entry.record.state:
            # A transition: the record's state is this, but the scheduler also stamped what no event carries.
            entry.record = entry.record.model_copy(update={"state": event.state, "reason": event.reason})
            entry.exact = False
            return
        entry.record = entry.record.model_copy(update={
            "reason": event.reason, "position": event.position, "eta_s": event.eta_s, "runner": event.runner,
            "attempts": event.attempt, "batch_id": event.batch_id})
        entry.at = now

    def forget(self, job_id: str) -> None:
        self._entries.pop(job_id, None)
