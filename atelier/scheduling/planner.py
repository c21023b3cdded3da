"""The plan: which queued jobs start now, where, in which batches, and when the rest are expected.

A pure function of the policy's state (``plan``): it reads the queue, the runners and what the
loaders staged, and returns what to start, where each other job stands in line and when it is
expected to end, and what to preload; the policy carries it out. The rules it applies:

- Batching: a job starts together with the queued jobs that can share its pipeline call (the
  same ``BatchKey``), wherever they stand in the queue, up to the model's batch size on that
  runner, and only as far as measured step times show a bigger batch pays. No runner waits for
  a batch to fill unless ``batch_wait_s`` says so.
- Placement: walking the queue in order, each batch goes to the runner where it is expected to
  *finish* first: when that runner is free, plus loading the model there (nothing if resident,
  a memory copy if its node has it staged, a disk read otherwise), plus the run. So a job waits
  for a busy runner that holds its model when loading it elsewhere would take longer, and a
  rare model still gets its turn in queue order.
- Preloading: a batch planned for later on a runner that does not hold its model tells that
  node's loader to stage it now.
- Gangs (a runner over several devices, ``Capabilities.gang`` > 1) take only the models whose
  catalog layout (``parallel``) has exactly their size; a single-device runner takes every model
  (``Runner.takes``). Runners of one node whose devices overlap (a gang and the singles on its
  devices, two gangs that share one) are never busy at once: one is free only when every runner
  sharing a device with it is, and a batch planned on one holds all of them until it ends
  (``State.sharing``; here, ``free_at`` and ``idle`` follow it).
- Gang or singles (the adaptive choice). The same devices serve as singles (throughput) or as a
  gang (latency). Where a batch would finish first on a gang, it takes the gang only if the work
  waiting for those devices finishes no later that way: with ``W`` the job and the plan window's
  other unplanned jobs the gang takes (in queue order, up to ``GANG_ROUNDS`` per single), all of ``W``
  one after another on the gang from when it is free must end no later than ``W`` spread over the
  singles on the gang's devices (each job to the single free first, from when each is free),
  loads and measured run times included. Otherwise the gang is passed over for this job and it
  goes where it finishes first among the rest. So one job at a time (low load) takes the gang,
  a deep queue (more jobs than the gang's speed-up buys back) runs one per device, and the tail
  of a burst, once fewer jobs are left than singles could finish sooner, takes the gang again.
  A model without a layout is never offered a gang. Both sides get measured: a gang not yet
  measured for a model (the singles were) is estimated at the singles' time over its size, the
  ideal speed-up, so that it is tried and then judged by what it measured (where neither was, ties
  go to the gang); and while the singles have not measured the model, two or more such jobs
  waiting for the devices send this one to a single.
- The FIFO baseline (``policy = "fifo"``): the head goes to the runner free first, and a batch
  takes only the consecutive compatible jobs at the head.

At fleet scale (a thousand runners, a hundred thousand queued), a plan does not weigh every runner for
every job: the runner index (index.py) names the few that can be best, and ``exhaustive=True`` weighs
them all (tests/test_fleet_scheduling.py checks both choose alike). A *full* plan covers the window,
at least ``ROUNDS_PLANNED`` jobs per runner, for places, ETAs, preloads and each busy runner's next
batch (``Plan.ahead``); a plan with ``full=False`` stops once every idle runner has its batch. The
policy says when each is due.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from atelier.config import Config
from atelier.jobs import JobSpec
from atelier.registry import FAMILY_LIMITS
from atelier.scheduling.estimates import Estimates
from atelier.scheduling.state import Batch, BatchKey, Job, Runner, State, busy_until, staying

# One message carries at most this many blob frames and this big a head (actors/codec.py's
# MAX_FRAMES and MAX_HEAD_BYTES; a test checks they agree): a batch must fit both in its RunBatch
# and in its BatchDone, or the broker refuses it and no runner ever sees it. Half the head's cap:
# the estimate per job is rough.
MAX_BLOBS = 64
MAX_HEAD_BYTES = (1 << 20) // 2
# The choice between a gang and the singles on its devices weighs the queued jobs of this many rounds
# of the singles (one job per single a round): past a few rounds the answer no longer changes (the
# gang is then worth it only if it is as efficient per device as they are), and a plan's cost stays bounded.
GANG_ROUNDS = 4
# A full plan covers at least this many jobs per runner of the fleet (see ``plan``).
ROUNDS_PLANNED = 2
# Of runners free at the same moment in one of the index's lists (those past their batch's expected end are
# all "free now"), this many are weighed: they finish the job alike, and the tie-break among more of them
# (fewest models held, the name) is not worth weighing hundreds.
TIES_WEIGHED = 8


@dataclass(frozen=True)
class Start:
    """A batch to dispatch now."""

    runner: Runner
    jobs: tuple[Job, ...]
    images: int
    finish: float  # expected end, absolute


@dataclass(frozen=True)
class Place:
    """A queued job's place in line and expected end (None: it cannot be planned yet)."""

    job: Job
    position: int
    finish_at: float | None


@dataclass
class Plan:
    starts: list[Start]
    places: list[Place]
    preloads: dict[str, tuple[str, ...]]  # by node: models its loader is to stage now, in plan order
    wake_at: float | None  # a batch waits for company until then
    planned: list[Job]  # the plan window, in queue order
    next_position: int  # the first position after the window's jobs
    free_at: dict[str, float]  # by runner: when it is expected to be free, once the window has run
    # By busy runner: the batch planned to be its next, which it may take when it is free if no plan is
    # due then (``start_planned``).
    ahead: dict[str, tuple[Job, ...]] = field(default_factory=dict)


class _Board:
    """One plan's view of the runners, made as the plan first looks at each (with a thousand runners a
    plan looks at few): when each is free, the models sure to be on it, whether it may take work, and
    the plain runners the plan has given a batch, listed as the index lists them (index.py)."""

    def __init__(self, state: State, usable: Callable[[Runner], bool], now: float):
        self.state, self.now, self._usable = state, now, usable
        self.free_at: dict[str, float] = {}
        self.holds: dict[str, set[str]] = {}
        self.usable_: dict[str, bool] = {}
        self.moved: set[str] = set()  # plain runners given a batch in this plan: the index's entry is stale
        self.moved_by_kind: dict[object, list[tuple[float, str]]] = {}
        self.moved_holders: dict[tuple[object, str], list[tuple[float, str]]] = {}
        self.moved_staged: dict[tuple[object, str], list[tuple[float, str]]] = {}
        self.moved_cold: dict[tuple[object, str], list[tuple[float, str]]] = {}
        self._staged_of: dict[str, set[str]] = {}  # by moved runner: the models it is listed in moved_staged for
        self._cold_of: dict[str, set[str]] = {}  # and in moved_cold for
        self._cold_models: set[str] = set()  # the models moved_cold is kept for (those the plan asked for)
        self.skip_from: dict[int, int] = {}  # by index list: the start past its moved runners

    def free(self, r: Runner) -> float:
        at = self.free_at.get(r.name)
        if at is None:
            # Free once it and every runner sharing a device with it (usable or not) are.
            at = self.free_at[r.name] = max(self.now, *(busy_until(x) for x in (r, *self.state.sharing(r))))
        return at

    def held(self, r: Runner) -> set[str]:
        held = self.holds.get(r.name)
        if held is None:
            held = self.holds[r.name] = staying(r)
        return held

    def usable(self, r: Runner) -> bool:
        ok = self.usable_.get(r.name)
        if ok is None:
            ok = self.usable_[r.name] = self._usable(r)
        return ok

    def assign(self, r: Runner, model: str, finish: float) -> None:
        """The plan gives the runner a batch of ``model`` ending at ``finish``."""
        self.free(r)
        held = self.held(r)
        if r.name in self.state.index.special:
            self.free_at[r.name] = finish
            held.add(model)
            return
        kind = r.kind
        old = (self.free_at[r.name], r.name)
        if r.name in self.moved:
            _unlist(self.moved_by_kind[kind], old)
            for m in held:
                _unlist(self.moved_holders[(kind, m)], old)
            for m in self._staged_of[r.name]:
                _unlist(self.moved_staged[(kind, m)], old)
            for m in self._cold_of[r.name]:
                _unlist(self.moved_cold[(kind, m)], old)
        self.moved.add(r.name)
        self.free_at[r.name] = finish
        held.add(model)
        new = (finish, r.name)
        bisect.insort(self.moved_by_kind.setdefault(kind, []), new)
        for m in held:
            bisect.insort(self.moved_holders.setdefault((kind, m), []), new)
        on_node = self.state.staged_on(r.node)
        staged = self._staged_of[r.name] = on_node - held
        for m in staged:
            bisect.insort(self.moved_staged.setdefault((kind, m), []), new)
        cold = self._cold_of[r.name] = self._cold_models - held - on_node
        for m in cold:
            bisect.insort(self.moved_cold.setdefault((kind, m), []), new)

    def moved_cold_of(self, kind: object, model: str) -> list[tuple[float, str]]:
        """The moved runners of the kind that neither hold the model nor have it staged, free first."""
        if model not in self._cold_models:
            self._cold_models.add(model)
            for name in self.moved:
                r = self.state.runners[name]
                if model not in self.held(r) and model not in self.state.staged_on(r.node):
                    self._cold_of[name].add(model)
                    bisect.insort(self.moved_cold.setdefault((r.kind, model), []), (self.free_at[name], name))
        return self.moved_cold.get((kind, model), [])

    def in_order(self, listed: list[tuple[float, str]], moved: list[tuple[float, str]]):
        """The runners of an index list and of the plan's moved ones, free first: (free at, name)."""
        runners, now, skip = self.state.runners, self.now, self.moved
        start = self.skip_from.get(id(listed), 0)
        while start < len(listed) and listed[start][1] in skip:
            start += 1  # moved runners stay moved for the rest of the plan
        self.skip_from[id(listed)] = start
        i, j = start, 0
        while i < len(listed) or j < len(moved):
            if j >= len(moved) or (i < len(listed) and max(now, listed[i][0]) <= moved[j][0]):
                busy, name = listed[i]
                i += 1
                if name in skip:
                    continue
                yield max(now, busy), runners[name]
            else:
                yield moved[j][0], runners[moved[j][1]]
                j += 1


def _unlist(entries: list[tuple[float, str]], key: tuple[float, str]) -> None:
    del entries[bisect.bisect_left(entries, key)]


def plan(state: State, config: Config, estimates: Estimates, usable: Callable[[Runner], bool], now: float, *,
         held: frozenset[str] = frozenset(), full: bool = True, exhaustive: bool = False) -> Plan:
    """Plans the first queued jobs (``plan_window`` of them, and a full plan at least ``ROUNDS_PLANNED`` per
    runner) on the runners ``usable`` says may take work; jobs of the ``held`` models (paused by an operator)
    start nowhere. ``full=False`` stops once every idle runner has
    its batch (what is to start now is then known; the places and preloads of the rest wait for a full
    plan). ``exhaustive``: weigh every runner for every job instead of the index's few (the tests' check
    that both choose alike)."""
    settings = config.scheduler
    fair = settings.policy == "fair"
    # A full plan looks at least a few rounds of the fleet ahead: a window smaller than the fleet plans every
    # job on a busy runner holding its model and leaves idle runners idle while the queue is deep.
    window = max(settings.plan_window, ROUNDS_PLANNED * len(state.runners)) if full else settings.plan_window
    order = [state.jobs[e.id] for e in state.queue.order(window)]
    board = _Board(state, usable, now)
    idle = {name for name in state.idle if board.usable(state.runners[name])}
    if not full and not idle:
        return Plan([], [], {}, None, [], 0, {})
    free_at = board.free_at
    runs: dict[tuple, float] = {}  # the gang choice's estimates, once per plan
    able_for: dict[str, list[Runner]] = {}
    specials_for: dict[str, list[Runner]] = {}
    kinds_for: dict[str, list] = {}

    def takes(r: Runner, model: str) -> bool:
        return r.takes(config.models[model]) and model not in r.cannot_hold and board.usable(r)

    def able_of(model: str) -> list[Runner]:
        """Every usable runner that takes the model's batches (once per plan; the gang choice and ``exhaustive``)."""
        able = able_for.get(model)
        if able is None:
            able = able_for[model] = [] if model in held else [r for r in state.runners.values() if takes(r, model)]
        return able

    def candidates(job: Job) -> list[tuple[tuple, Runner]]:
        """The runners among which the job's best one is sure to be (index.py), each usable and taking it,
        with its placement key."""
        model = job.spec.model
        if model in held:
            return []
        if exhaustive:
            return [(_placement(job, r, board, state, estimates, fair, now, idle), r) for r in able_of(model)]
        specials = specials_for.get(model)
        if specials is None:
            specials = specials_for[model] = [r for name in sorted(state.index.special)
                                              if takes(r := state.runners[name], model)]
        kinds = kinds_for.get(model)
        if kinds is None:
            family = config.models[model].family
            kinds = kinds_for[model] = [k for k in state.index.kinds if not k[2] or family in k[2]]
        found = [(_placement(job, r, board, state, estimates, fair, now, idle), r) for r in specials]
        spec = job.spec
        staged_load, disk_load = estimates.load_s(model, "staged"), estimates.load_s(model, "disk")
        best: tuple | None = None  # of the plain runners so far: a gang passed over falls back to them
        for kind in kinds:
            run = estimates.run_s(model, kind[0], width=spec.width, height=spec.height, images=spec.count,
                                  steps=spec.work_steps)
            at_kind = (kind, model)
            # Each list's runners cost the same but for when they are free (index.py): its first usable one
            # and those tied with it are all that can be best.
            for listed, moved, load in (
                    (state.index.holders.get(at_kind, ()), board.moved_holders.get(at_kind, ()), 0.0),
                    (state.index.staged.get(at_kind, ()), board.moved_staged.get(at_kind, ()), staged_load),
                    (state.index.cold_of(kind, model), board.moved_cold_of(kind, model), disk_load)):
                first, weighed = None, 0
                for at, r in board.in_order(listed, moved):
                    if first is not None and (at > first or weighed >= TIES_WEIGHED):
                        break
                    if best is not None and (round(at + load + run, 6) if fair else at) > best[0]:
                        break  # nothing further on can finish first (nor tie)
                    if model in r.cannot_hold or not board.usable(r):
                        continue
                    key = _placement(job, r, board, state, estimates, fair, now, idle)
                    if best is None or key < best:
                        best = key
                    found.append((key, r))
                    first, weighed = at, weighed + 1
        return found

    limit_per_user = settings.max_running_per_user
    running = _running_by_user(state) if limit_per_user else Counter()
    compatible: dict[BatchKey, list[Job]] = defaultdict(list)
    for job in order:
        compatible[job.key].append(job)
    taken: set[str] = set()
    wanted: dict[str, list[str]] = defaultdict(list)  # by node: models to preload, in plan order
    starts: list[Start] = []
    ahead: dict[str, tuple[Job, ...]] = {}
    places: list[Place] = []
    wake_at: float | None = None
    position = 0
    for index, job in enumerate(order):
        if not full and not idle:
            break  # every idle runner has its batch: the rest can start nowhere now
        if job.id in taken:
            continue
        spec = job.spec
        found = candidates(job)
        if not found or (limit_per_user is not None and running[spec.user] >= limit_per_user):
            # Nowhere to run, or its owner has all the jobs running they may: it waits, and
            # holds no runner in the plan; the next event that changes that replans it.
            places.append(Place(job, position, None))
            position += 1
            continue
        while True:
            pick = min(found, key=lambda kr: kr[0])
            runner = pick[1]
            if runner.gang == 1 or len(found) == 1 or _gang_pays(
                    job, runner, order, index + 1, taken, state.sharing(runner), board, runs, able_of, state,
                    config, estimates):
                break
            found.remove(pick)  # the work waiting for its devices is done sooner one job per device
        immediate = runner.name in idle
        peers = compatible[job.key] if fair else order[index:]
        members = _fill(job, runner, peers, taken, running if immediate else None, config, estimates)
        taken.update(m.id for m in members)
        images = sum(m.spec.count for m in members)
        finish = _batch_ends(state, estimates, runner, spec, images, board.free(runner), board.held(runner))
        until = _waits_until(members, images, runner, config, estimates, now) if immediate else None
        if until is not None:
            # Waiting for company: the runner stays free for other work meanwhile.
            wake_at = until if wake_at is None else min(wake_at, until)
            for member in members:
                places.append(Place(member, position, finish + wake_at - now))
                position += 1
            continue
        if immediate:
            starts.append(Start(runner, tuple(members), images, finish))
            idle.discard(runner.name)
            for member in members:
                running[member.spec.user] += 1
        else:
            ahead.setdefault(runner.name, tuple(members))
            for member in members:
                places.append(Place(member, position, finish))
                position += 1
            if spec.model not in board.held(runner) and runner.node is not None:
                wanted[runner.node].append(spec.model)
        board.assign(runner, spec.model, finish)
        for other in state.sharing(runner):
            # Its devices are taken until the batch ends: those sharing them wait as long.
            free_at[other.name] = max(board.free(other), finish)
            idle.discard(other.name)
    preloads = _preloads(state, wanted) if settings.preload else {}
    return Plan(starts, places, preloads, wake_at, order, position, free_at, ahead)


def start_planned(state: State, config: Config, estimates: Estimates, runner: Runner, jobs: tuple[Job, ...],
                  now: float) -> Start | None:
    """The batch a plan had for the runner (``Plan.ahead``), to start now that it is free; None where it
    could take more images than it has (measurements since may have made a bigger batch pay, or jobs that
    could join it have come): a plan then fills it anew."""
    if sum(j.spec.count for j in jobs) < max(_useful_batch(jobs[0], runner, config, estimates), jobs[0].spec.count):
        return None
    images = sum(j.spec.count for j in jobs)
    finish = _batch_ends(state, estimates, runner, jobs[0].spec, images, now, staying(runner))
    return Start(runner, jobs, images, finish)


def _batch_ends(state: State, estimates: Estimates, runner: Runner, spec: JobSpec, images: int, free: float,
                held: set[str]) -> float:
    """When a batch of ``images`` like ``spec`` ends on the runner, started when it is ``free`` holding ``held``."""
    return free + _load_s(spec.model, runner, held, state, estimates) + run_s(
        estimates, spec.model, runner, _proxy(runner, state.sharing(runner)), width=spec.width, height=spec.height,
        images=images, steps=spec.work_steps)


def place_rest(state: State, estimates: Estimates, planned: Plan, usable: list[Runner]) -> list[Place]:
    """Jobs past the plan window, once its starts have left the queue: their place in line, and an
    ETA from the mean rate of the runners (``usable``: those that may take work, none empty)."""
    if len(state.queue) <= len(planned.planned):
        return []
    seen = {j.id for j in planned.planned}
    # When the window has run: the last of the runners to be free, as the plan left them.
    start = max(planned.free_at.get(r.name, max(0.0, busy_until(r))) for r in usable)
    start = max(start, *planned.free_at.values())
    # A gang's devices are the singles' too: the singles alone say how many batches run at once.
    spread = [r for r in usable if r.gang == 1] or usable
    runner = spread[0]
    backlog = 0.0
    position = planned.next_position
    places = []
    for entry in state.queue.order():
        if entry.id in seen:
            continue
        spec = state.jobs[entry.id].spec
        backlog += estimates.run_s(spec.model, runner.device_name, width=spec.width, height=spec.height,
                                   images=spec.count, steps=spec.work_steps)
        places.append(Place(state.jobs[entry.id], position, start + backlog / len(spread)))
        position += 1
    return places


def batch_run_s(state: State, estimates: Estimates, batch: Batch, runner: Runner) -> float:
    """How long the batch runs on the runner, its model loaded."""
    first = state.jobs.get(batch.jobs[0]) if batch.jobs else None
    if first is None:
        return 0.0
    spec = first.spec
    return run_s(estimates, batch.model, runner, _proxy(runner, state.sharing(runner)), width=spec.width,
                 height=spec.height, images=batch.images, steps=spec.work_steps)


def run_s(estimates: Estimates, model: str, runner: Runner, proxy: str | None, *, width: int, height: int,
          images: int, steps: int) -> float:
    """How long a pipeline call runs on the runner, from what its device name measured. A gang that
    never ran the model, where a single on its devices (``proxy``, that single's device name) did, is
    taken to be as fast as that single times its size: the ideal speed-up, optimistic on purpose, so
    that it gets a batch and measures its own."""
    if runner.gang > 1 and proxy is not None and not estimates.measured(model, runner.device_name) \
            and estimates.measured(model, proxy):
        return estimates.run_s(model, proxy, width=width, height=height, images=images, steps=steps) / runner.gang
    return estimates.run_s(model, runner.device_name, width=width, height=height, images=images, steps=steps)


def _placement(job: Job, runner: Runner, board: _Board, state: State, estimates: Estimates, fair: bool,
               now: float, idle: set[str]) -> tuple:
    """Sort key of a runner for a job: the runner free first (FIFO), or where it finishes first (fair).
    A busy runner past its batch's expected end counts as free now, like an idle one: on a tie the idle one
    wins, or a deep queue's jobs all wait for overrunning runners while it stays idle."""
    spec = job.spec
    proxy = _proxy(runner, state.sharing(runner)) if runner.gang > 1 else None
    held, free = board.held(runner), board.free(runner)
    has_model = spec.model in held
    waits = runner.name not in idle or free > now  # not an idle runner taking it now
    if not fair:
        return (free, not has_model, waits, -runner.gang, runner.name)
    finish = free + _load_s(spec.model, runner, held, state, estimates) + run_s(
        estimates, spec.model, runner, proxy, width=spec.width, height=spec.height,
        images=spec.count, steps=spec.work_steps)
    # Ties: the runner that has the model, then an idle one, then a gang over a single (nothing measured
    # yet says which is faster; the gang's devices are the singles' too), then the one holding fewest
    # models (loading there evicts least, and models spread over the devices).
    return (round(finish, 6), not has_model, waits, -runner.gang, len(held), runner.name)


def _gang_pays(job: Job, gang: Runner, order: list[Job], after: int, taken: set[str], sharing: list[Runner],
               board: _Board, runs: dict[tuple, float], able_of: Callable[[str], list[Runner]], state: State,
               config: Config, estimates: Estimates) -> bool:
    """Whether ``job`` is to take the gang (the rule in the module's docstring): the work waiting for
    the gang's devices (the job and the unplanned jobs from ``order[after]`` on that the gang takes, in
    queue order) ends no later all on the gang than spread over the single-device runners on those
    devices. ``runs`` (run times) and ``able_of`` (the usable runners that take a model) are the plan's."""
    singles = [r for r in sharing if r.gang == 1 and r in able_of(job.spec.model)]
    if not singles:
        return True  # a static gang: its devices serve nothing else
    waiting = [job]
    for other in itertools.islice(order, after, None):
        if len(waiting) > GANG_ROUNDS * len(singles):
            break
        if other.id in taken:
            continue
        if gang in able_of(other.spec.model):
            waiting.append(other)
    if len(waiting) > 1 and not any(estimates.measured(job.spec.model, r.device_name) for r in singles):
        return False  # a queue for the devices, and the singles never ran the model: one of them measures it

    def cost(q: Job, runner: Runner, held: set[str]) -> float:
        spec = q.spec
        key = (spec.model, spec.width, spec.height, spec.count, spec.steps, runner.name)
        run = runs.get(key)
        if run is None:
            run = runs[key] = run_s(estimates, spec.model, runner, _proxy(runner, state.sharing(runner)),
                                    width=spec.width, height=spec.height, images=spec.count, steps=spec.work_steps)
        seconds = _load_s(spec.model, runner, held, state, estimates) + run
        held.add(spec.model)
        return seconds

    on_gang, held = board.free(gang), set(board.held(gang))
    for q in waiting:
        on_gang += cost(q, gang, held)
    # Each job to the single free first: a list schedule, as the plan would place them.
    free = [(board.free(r), i, set(board.held(r))) for i, r in enumerate(singles)]
    heapq.heapify(free)
    on_singles = 0.0
    for q in waiting:
        start, i, held = heapq.heappop(free)
        end = start + cost(q, singles[i], held)
        on_singles = max(on_singles, end)
        heapq.heappush(free, (end, i, held))
    return on_gang <= on_singles + 1e-9


def _proxy(runner: Runner, sharing: list[Runner]) -> str | None:
    """For a gang: the device name of a single-device runner on one of its devices, whose measured
    times stand in for the gang's until it has its own (``run_s``)."""
    if runner.gang == 1:
        return None
    return next((r.device_name for r in sharing if r.gang == 1), None)


def _fill(head: Job, runner: Runner, peers: list[Job], taken: set[str], running: Counter | None, config: Config,
          estimates: Estimates) -> list[Job]:
    """The head job and the queued jobs that share its pipeline call, in queue order, up to the
    runner's batch size (a job is never split: one bigger than the batch size runs alone).
    ``running``: per-user running counts to respect, when the batch starts now."""
    settings = config.scheduler
    limit = max(_useful_batch(head, runner, config, estimates), head.spec.count)
    members, images = [head], head.spec.count
    blobs, head_bytes = _blobs(head), _head_bytes(head)
    limit_per_user = settings.max_running_per_user
    added: Counter[str] = Counter({head.spec.user: 1})
    for peer in peers:
        if images >= limit:
            break
        if peer is head or peer.id in taken:
            continue
        if peer.key != head.key:
            if settings.policy == "fair":
                continue
            break  # the FIFO baseline batches only the consecutive run of compatible jobs
        if images + peer.spec.count > limit:
            continue
        if blobs + _blobs(peer) > MAX_BLOBS or head_bytes + _head_bytes(peer) > MAX_HEAD_BYTES:
            continue  # it would not fit in one message: it goes in the next batch
        if running is not None and limit_per_user is not None \
                and running[peer.spec.user] + added[peer.spec.user] >= limit_per_user:
            continue
        members.append(peer)
        images += peer.spec.count
        blobs += _blobs(peer)
        head_bytes += _head_bytes(peer)
        added[peer.spec.user] += 1
    return members


def _blobs(job: Job) -> int:
    """Frames the job takes in its RunBatch (its input images) or in its BatchDone (one per image)."""
    return max(job.spec.count, job.input_count)


def _head_bytes(job: Job) -> int:
    """A generous bound on what the job's spec adds to a message's head: its texts and the rest."""
    spec = job.spec
    return 2048 + 4 * (len(spec.prompt) + len(spec.negative_prompt or "")) + 256 * len(spec.loras)


def _waits_until(members: list[Job], images: int, runner: Runner, config: Config, estimates: Estimates,
                 now: float) -> float | None:
    """With batch_wait_s, a batch short of its size waits that long (from its oldest job) for company."""
    wait = config.scheduler.batch_wait_s
    if not wait or images >= _useful_batch(members[0], runner, config, estimates):
        return None
    until = min(m.submitted_at for m in members) + wait
    return until if until > now else None


def _useful_batch(job: Job, runner: Runner, config: Config, estimates: Estimates) -> int:
    spec = job.spec
    return estimates.useful_batch(spec.model, runner.device_name, spec.width * spec.height,
                                  max_images(config, spec.model, runner), config.scheduler.batch_min_gain)


def max_images(config: Config, model: str, runner: Runner) -> int:
    """The most images of ``model`` one pipeline call on ``runner`` may make."""
    entry = config.models[model]
    limits = FAMILY_LIMITS[entry.family]
    size = entry.max_batch or (limits.max_batch if runner.on_gpu else limits.max_batch_cpu)
    if config.scheduler.max_batch is not None:
        size = min(size, config.scheduler.max_batch)
    return size


def _preloads(state: State, wanted: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """Of the models wanted on each node, those its loader has neither staged nor been asked for."""
    preloads = {}
    for node, models in wanted.items():
        if node not in state.staged:
            continue  # no loader reported on that node: nobody to ask
        asked = state.asked.get(node, set())
        fresh = []
        for model in models:
            if model not in state.staged[node] and model not in asked and model not in fresh:
                fresh.append(model)
        if fresh:
            preloads[node] = tuple(fresh)
    return preloads


def _load_s(model: str, runner: Runner, held: set[str], state: State, estimates: Estimates) -> float:
    """Loading the model on the runner, which holds ``held`` by then."""
    if model in held:
        return 0.0
    node = runner.node
    if node is not None and (model in state.staged.get(node, {}) or model in state.asked.get(node, ())):
        return estimates.load_s(model, "staged")
    return estimates.load_s(model, "disk")


def _running_by_user(state: State) -> Counter[str]:
    return Counter(state.jobs[j].spec.user for b in state.batches.values() for j in b.jobs
                   if j in state.jobs and state.jobs[j].live)
