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
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from atelier.config import Config
from atelier.registry import FAMILY_LIMITS
from atelier.scheduling.estimates import Estimates
from atelier.scheduling.state import Batch, BatchKey, Job, Runner, State

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


def plan(state: State, config: Config, estimates: Estimates, usable: list[Runner], now: float, *,
         held: frozenset[str] = frozenset()) -> Plan:
    """Plans the first ``plan_window`` queued jobs on the ``usable`` runners; jobs of the ``held`` models
    (paused by an operator) start nowhere."""
    settings = config.scheduler
    fair = settings.policy == "fair"
    order = [state.jobs[e.id] for e in state.queue.order(settings.plan_window)]
    free_at: dict[str, float] = {}
    holds: dict[str, set[str]] = {}
    sharing = {r.name: state.sharing(r) for r in usable}
    for r in usable:
        # Free once it and every runner sharing a device with it (usable or not) are.
        free_at[r.name] = max([now, *(_busy_until(x) for x in (r, *sharing[r.name]) if x.batch is not None)])
        holds[r.name] = _staying(r)
    idle = {r.name for r in usable if r.batch is None and all(x.batch is None for x in sharing[r.name])}
    proxies = {r.name: _proxy(r, sharing[r.name]) for r in usable}
    runs: dict[tuple, float] = {}  # the gang choice's estimates, once per plan
    able_for: dict[str, list[Runner]] = {}

    def able_of(model: str) -> list[Runner]:
        """The usable runners that take the model's batches (once per plan)."""
        able = able_for.get(model)
        if able is None:
            entry = config.models[model]
            able = able_for[model] = [] if model in held else [r for r in usable if r.takes(entry)
                                                               and model not in r.cannot_hold]
        return able

    limit_per_user = settings.max_running_per_user
    running = _running_by_user(state) if limit_per_user else Counter()
    compatible: dict[BatchKey, list[Job]] = defaultdict(list)
    for job in order:
        compatible[job.key].append(job)
    taken: set[str] = set()
    wanted: dict[str, list[str]] = defaultdict(list)  # by node: models to preload, in plan order
    starts: list[Start] = []
    places: list[Place] = []
    wake_at: float | None = None
    position = 0
    for index, job in enumerate(order):
        if job.id in taken:
            continue
        spec = job.spec
        able = able_of(spec.model)
        if not able or (limit_per_user is not None and running[spec.user] >= limit_per_user):
            # Nowhere to run, or its owner has all the jobs running they may: it waits, and
            # holds no runner in the plan; the next event that changes that replans it.
            places.append(Place(job, position, None))
            position += 1
            continue
        candidates = list(able)
        while True:
            runner = min(candidates, key=lambda r: _placement(job, r, free_at, holds, state, estimates, proxies,
                                                                fair, now))
            if runner.gang == 1 or len(candidates) == 1 or _gang_pays(
                    job, runner, order, index + 1, taken, sharing[runner.name], free_at, holds, proxies, runs,
                    able_of, state, config, estimates):
                break
            candidates.remove(runner)  # the work waiting for its devices is done sooner one job per device
        immediate = runner.name in idle
        peers = compatible[job.key] if fair else order[index:]
        members = _fill(job, runner, peers, taken, running if immediate else None, config, estimates)
        taken.update(m.id for m in members)
        images = sum(m.spec.count for m in members)
        load = _load_s(spec.model, runner, holds[runner.name], state, estimates)
        finish = free_at[runner.name] + load + run_s(estimates, spec.model, runner, proxies[runner.name],
                                                     width=spec.width, height=spec.height, images=images,
                                                     steps=spec.work_steps)
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
            for member in members:
                places.append(Place(member, position, finish))
                position += 1
            if spec.model not in holds[runner.name] and runner.node is not None:
                wanted[runner.node].append(spec.model)
        free_at[runner.name] = finish
        holds[runner.name].add(spec.model)
        for other in sharing[runner.name]:
            # Its devices are taken until the batch ends: those sharing them wait as long.
            if other.name in free_at:
                free_at[other.name] = max(free_at[other.name], finish)
            idle.discard(other.name)
    preloads = _preloads(state, wanted) if settings.preload else {}
    return Plan(starts, places, preloads, wake_at, order, position, free_at)


def place_rest(state: State, estimates: Estimates, planned: Plan, usable: list[Runner]) -> list[Place]:
    """Jobs past the plan window, once its starts have left the queue: their place in line, and an
    ETA from the mean rate of the runners."""
    if len(state.queue) <= len(planned.planned):
        return []
    seen = {j.id for j in planned.planned}
    start = max(planned.free_at.values())
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


def _placement(job: Job, runner: Runner, free_at: dict[str, float], holds: dict[str, set[str]], state: State,
               estimates: Estimates, proxies: dict[str, str | None], fair: bool, now: float) -> tuple:
    """Sort key of a runner for a job: the runner free first (FIFO), or where it finishes first (fair)."""
    spec = job.spec
    has_model = spec.model in holds[runner.name]
    if not fair:
        return (free_at[runner.name], not has_model, -runner.gang, runner.name)
    finish = free_at[runner.name] + _load_s(spec.model, runner, holds[runner.name], state, estimates) + run_s(
        estimates, spec.model, runner, proxies[runner.name], width=spec.width, height=spec.height,
        images=spec.count, steps=spec.work_steps)
    # Ties: the runner that has the model, then an idle one, then a gang over a single (nothing measured
    # yet says which is faster; the gang's devices are the singles' too), then the one holding fewest
    # models (loading there evicts least, and models spread over the devices).
    return (round(finish, 6), not has_model, free_at[runner.name] > now, -runner.gang, len(holds[runner.name]),
            runner.name)


def _gang_pays(job: Job, gang: Runner, order: list[Job], after: int, taken: set[str], sharing: list[Runner],
               free_at: dict[str, float], holds: dict[str, set[str]], proxies: dict[str, str | None],
               runs: dict[tuple, float], able_of: Callable[[str], list[Runner]], state: State,
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
            run = runs[key] = run_s(estimates, spec.model, runner, proxies[runner.name], width=spec.width,
                                    height=spec.height, images=spec.count, steps=spec.work_steps)
        seconds = _load_s(spec.model, runner, held, state, estimates) + run
        held.add(spec.model)
        return seconds

    on_gang, held = free_at[gang.name], set(holds[gang.name])
    for q in waiting:
        on_gang += cost(q, gang, held)
    # Each job to the single free first: a list schedule, as the plan would place them.
    free = [(free_at[r.name], i, set(holds[r.name])) for i, r in enumerate(singles)]
    heapq.heapify(free)
    on_singles = 0.0
    for q in waiting:
        start, i, held = heapq.heappop(free)
        end = start + cost(q, singles[i], held)
        on_singles = max(on_singles, end)
        heapq.heappush(free, (end, i, held))
    return on_gang <= on_singles + 1e-9


def _busy_until(runner: Runner) -> float:
    """When the batch it has is expected to end."""
    assert runner.batch is not None
    return runner.batch.started + runner.batch.expected_s


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


def _staying(runner: Runner) -> set[str]:
    """Models sure to be on the runner when it is next free. A busy runner loading another
    model may evict what it holds; the one it runs now stays."""
    if runner.batch is None or runner.batch.model in runner.resident:
        return set(runner.resident)
    return {runner.batch.model}


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
