"""Whether the queue is busy (a job waits or runs) or idle, and when that changes.

Another program on the box (a chat bot sharing the GPU) wants one word when atelier starts needing the
device and one when it stops: not every job's transitions. ``QueueActivity`` turns the counts the
scheduler sees after each round of effects into those two words, once per change.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from atelier.scheduling.state import State


@dataclass(frozen=True)
class Activity:
    """What the queue holds now: jobs waiting to start, and jobs on the runners."""

    queued: int
    running: int


def activity(state: State) -> Activity:
    """The queue's jobs now: its length, and the jobs of the batches on the runners (the words said when the
    queue goes busy or idle carry them)."""
    return Activity(queued=len(state.queue), running=sum(1 for _ in _running(state)))


def busy(state: State) -> bool:
    """Whether a job waits or runs: what the scheduler asks after every round of effects, so it stops at
    the first it finds (``activity``'s counts, a walk of every batch, only where the answer changed)."""
    return bool(state.queue) or next(_running(state), None) is not None


def _running(state: State) -> Iterator[str]:
    """The live jobs of the batches on the runners. A job of a running batch counts until it ends, so a
    batch whose last job was cancelled still holds the device until its runner says it stopped."""
    return (job_id for batch in state.batches.values() for job_id in batch.jobs
            if (job := state.jobs.get(job_id)) is not None and job.live)


class QueueActivity:
    """Busy or idle, as last said. A restarted scheduler starts from what it restored (jobs queued again:
    busy), so it says nothing new until the queue actually changes."""

    def __init__(self, busy: bool):
        self.busy = busy

    def observe(self, busy: bool) -> bool | None:
        """True where the queue just went busy, False where it just went idle, None where nothing changed."""
        if busy == self.busy:
            return None
        self.busy = busy
        return self.busy
