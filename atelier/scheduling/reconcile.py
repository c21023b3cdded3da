"""What a runner says it runs, against what the policy gave it.

The two can differ: a RunBatch lost with a broker that died, a runner given up on that comes
back still working, a report from a runner whose jobs went elsewhere meanwhile, a scheduler
restarted while runners were busy. The rules here settle each case so that no job runs twice
when once will do, none is lost, and no attempt is counted for a run that never started:

- A runner that (re)registers or answers ``GetRunnerState`` is believed about what it runs: a
  batch of ours it does not have goes back to the queue uncounted (``lost_batch``); one it
  runs that we do not know of is taken back (``reclaim``) rather than run again elsewhere.
- Words from a runner about a job that is no longer its own are ignored (``State.job_on``),
  except a done job that was queued again meanwhile and that nobody else has started: its
  images are the ones a second run would make (the same seeds), so they are taken (``adopt``).
- A runner that dies gives its jobs back to the front of their owners' queues, up to
  ``max_attempts``; then they fail with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from atelier.jobs import Capabilities, JobDone, JobFailed, JobState
from atelier.scheduling.state import Announce, Batch, Job, Runner, State, StopRunning

# How long a runner a dispatch found unreachable gets no batch: about the broker's three heartbeats
# in which a dead one is declared down, or a restarted one joins again. Replans (once a second) then
# try it again.
UNREACHABLE_PAUSE_S = 3.0


def runner_up(state: State, name: str, caps: Capabilities, now: float, new_id: Callable[[], str]) -> None:
    known = state.runners.get(name)
    if known is not None:
        # It registered again (the broker restarted) and says what it runs now.
        _reconcile(state, known, caps, now, new_id)
        return
    runner = Runner(name, caps, dict(caps.resident))
    state.add_runner(runner)
    if caps.active_jobs:
        reclaim(state, runner, caps.active_batch or new_id(), caps.active_jobs, now)


def runner_state(state: State, name: str, caps: Capabilities, asked_during: str | None, now: float,
                 new_id: Callable[[], str]) -> None:
    """What a runner said it runs, asked when it joined (``asked_during``: the batch it had here
    then). An answer overtaken by a newer batch is out of date and changes nothing."""
    runner = state.runners.get(name)
    if runner is not None and (runner.batch.id if runner.batch else None) == asked_during:
        _reconcile(state, runner, caps, now, new_id)


def runner_down(state: State, name: str, reason: str, now: float) -> None:
    runner = state.remove_runner(name)
    if runner is None or runner.batch is None:
        return
    batch = state.batches.pop(runner.batch.id, None)
    _give_back(state, batch, name, f"runner {name} died while running this job ({reason})", now)


def dispatch_refused(state: State, runner: str, batch_id: str, reason: str, now: float, *,
                     unreachable: bool) -> None:
    """A RunBatch that never reached its runner: the runner is free of it. ``unreachable`` (the
    runner is gone or its queue full, the broker says): nothing of the jobs' doing, so they go back
    with no attempt counted and the runner gets none for a moment (a restarted runner joins again
    within it). Any other refusal (too large, undecodable) is the batch's own: the attempt counts, so
    one that repeats ends in a failure with the reason rather than a loop."""
    batch = state.batches.pop(batch_id, None)
    r = state.runners.get(runner)
    if r is not None and r.batch is not None and r.batch.id == batch_id:
        state.set_batch(r, None)
    if unreachable and r is not None:
        r.unreachable_until = now + UNREACHABLE_PAUSE_S
    _give_back(state, batch, runner, f"the batch could not be sent to {runner}: {reason}", now,
               started=not unreachable)


def _give_back(state: State, batch: Batch | None, runner: str, why: str, now: float, *,
               started: bool = True) -> None:
    """The jobs of a batch that will not end on its runner go back to the front of the queue, up to
    ``max_attempts``; a stopping one ends cancelled. ``started=False``: the runner never had them, so
    the attempt counted at dispatch is taken back."""
    for job_id in batch.jobs if batch else ():
        job = state.job_on(job_id, runner)
        if job is None:
            continue
        if job.stopping:
            state.finish(job, JobState.cancelled, job.stop_reason, now)
        elif started and job.attempts >= state.settings.max_attempts:
            state.finish(job, JobState.failed, f"{why}; gave up after {job.attempts} attempts", now)
        else:
            state.requeue(job, why, started=started)


def batch_done(state: State, runner: str, batch_id: str, outcomes: Iterable[JobDone | JobFailed],
               resident: dict[str, int], now: float, *, refused: bool,
               active: tuple[str, list[str]] | None) -> list[tuple[Job, JobDone]]:
    """Frees the runner and settles every job of the batch; returns the done ones (see Policy.batch_done)."""
    r = state.runners.get(runner)
    batch = state.batches.pop(batch_id, None)
    if r is not None:
        if r.batch is not None and r.batch.id == batch_id:
            r.batch = None
        state.set_resident(r, resident)
    done: list[tuple[Job, JobDone]] = []
    reported = set()
    for outcome in outcomes:
        reported.add(outcome.job_id)
        job = state.job_on(outcome.job_id, runner)
        if job is None and isinstance(outcome, JobDone):
            job = _adopt(state, outcome.job_id, runner)
        if job is None:
            continue
        if job.superseded_by is not None:
            state.finish(job, JobState.cancelled, job.stop_reason, now)
        elif isinstance(outcome, JobDone):
            done.append((job, outcome))
        elif outcome.cancelled or job.cancel_requested:
            state.finish(job, JobState.cancelled, outcome.reason, now)
        elif outcome.yielded:
            state.pause(job, outcome.reason)
        elif refused:
            state.requeue(job, outcome.reason, started=False)
        elif outcome.retryable and job.attempts < state.settings.max_attempts:
            state.requeue(job, outcome.reason)
        else:
            state.finish(job, JobState.failed, outcome.reason, now)
    for job_id in batch.jobs if batch else ():
        job = state.job_on(job_id, runner) if job_id not in reported else None
        if job is not None:  # the runner said nothing of it: it is not done, so it runs again
            state.requeue(job, f"runner {runner} reported no outcome for it")
    if active is not None and r is not None and r.batch is None:
        reclaim(state, r, active[0], active[1], now)
    return done


def reclaim(state: State, runner: Runner, batch_id: str, job_ids: list[str], now: float) -> None:
    """A runner we had given up on came back still working: let it finish rather than run the jobs twice."""
    mine = []
    for job_id in job_ids:
        job = state.jobs.get(job_id)
        if job is not None and job.live and job.runner in (None, runner.name):
            mine.append(job)
        else:
            state.effects.append(StopRunning(runner.name, job_id, "the job was reassigned"))
    # Busy until it reports, even with nothing of ours in hand: a new batch would be refused.
    batch = Batch(batch_id, runner.name, mine[0].spec.model if mine else "", [j.id for j in mine],
                  sum(j.spec.count for j in mine), now, 0.0)
    state.batches[batch_id] = batch
    for job in mine:
        if job.state is JobState.queued:
            state.queue.take(job.id)
        state.set_running(job, runner.name, batch_id, JobState.running)
        state.effects.append(Announce(job))
    state.set_batch(runner, batch)


def _reconcile(state: State, runner: Runner, caps: Capabilities, now: float, new_id: Callable[[], str]) -> None:
    state.set_capabilities(runner, caps)
    if runner.batch is not None and runner.batch.id != caps.active_batch:
        _lost_batch(state, runner, caps, now)
    elif runner.batch is None and caps.active_jobs:
        reclaim(state, runner, caps.active_batch or new_id(), caps.active_jobs, now)


def _lost_batch(state: State, runner: Runner, caps: Capabilities, now: float) -> None:
    """The runner is not running the batch it was given: the RunBatch was lost with a broker that
    died, or the batch ended and its report is still on its way (a done outcome is then taken
    by ``_adopt``). Its jobs go back to the queue, no attempt counted: none was started here."""
    batch = state.batches.pop(runner.batch.id, None) if runner.batch else None
    state.set_batch(runner, None)
    for job_id in batch.jobs if batch else ():
        job = state.job_on(job_id, runner.name)
        if job is None:
            continue
        if job.stopping:
            state.effects.append(StopRunning(runner.name, job_id, job.stop_reason))
            continue
        state.requeue(job, f"runner {runner.name} did not have it after reconnecting", started=False)
    if caps.active_batch and caps.active_batch not in state.batches:
        reclaim(state, runner, caps.active_batch, caps.active_jobs, now)


def _adopt(state: State, job_id: str, runner: str) -> Job | None:
    """A job that was queued again while a runner still had it (the scheduler restarted, or gave
    the runner up too early), and that nobody else has started: the images it reports done are
    the ones a second run would make (the same seeds), so they are taken rather than made again."""
    job = state.jobs.get(job_id)
    if job is None or job.state is not JobState.queued or job.runner is not None:
        return None
    state.queue.take(job.id)
    state.set_running(job, runner, job.batch_id or "", JobState.running)
    return job
