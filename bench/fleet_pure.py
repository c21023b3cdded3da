"""The scheduling policy's own cost at fleet scale: the pure core (atelier/scheduling), no processes.

What one scheduler spends deciding, measured where nothing else runs: the ``Policy`` the scheduler
actor drives, fed the events a fleet sends it, with the clock passed in. Six models of SD-like cost,
users submitting a mix of them at two sizes, runners of one GPU each spread over up to 100 nodes
(ten per node past that), each holding one or two models. Measured:

- a *dispatch cycle*: every runner busy and the queue deep, the batch due first ends
  (``batch_done``) and the next one is placed (``schedule``): the policy's CPU per dispatched batch,
  counting all it spent (the full plans that come due now and then, the wake-ups), the figure in the
  RESULT line; and the median and p95 of one batch end's;
- what the placement still guarantees at that size: the share of runners idle while the queue is
  deep, images per batch, and the share of batches whose model was already on their runner;
- a *submit*: one job queued into a deep queue while every runner is busy (``submit`` and the
  ``schedule`` the actor calls after it), with the plans the submits' announcements need
  amortised over them;
- the refresh (``refresh``: every queued job's place and ETA, once a second) at each size.

Side by side in one run: the same cycles under the FIFO baseline (``policy = "fifo"``), and the raw
limit, a bare ``heapq`` pop and push over as many runners (what choosing "the runner free first"
costs with nothing else decided).

    python bench/fleet_pure.py [--runners 8,64,256,1000] [--queued 1000,10000,100000] [--users 1000]

Last line: ``RESULT dispatch_ms_1000=… submit_us_100k=… growth=…``, where ``growth`` is how much
faster than the logarithm the cost grows: the dispatch cycle's cost from the fewest runners to the
most, over the ratio of their logarithms (1.0: it grows like log n; below 1, slower).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root

from atelier.config import Config  # noqa: E402
from atelier.jobs import Capabilities, JobDone, JobSpec, RunTiming  # noqa: E402
from atelier.scheduling.policy import Dispatch, Policy  # noqa: E402

MODELS = ("tiny-sd", "tiny-sdxl", "tiny-pixart-alpha", "tiny-pixart-sigma", "tiny-sd2", "tiny-hunyuan-dit")
SIZES = ((512, 512), (256, 256))
STEP_S = {"tiny-sd": 0.02, "tiny-sdxl": 0.05, "tiny-pixart-alpha": 0.04, "tiny-pixart-sigma": 0.045,
          "tiny-sd2": 0.025, "tiny-hunyuan-dit": 0.06}  # seconds per step of one 512² image on "H100"
PER_NODE = 10


def make_policy(home: Path, runners: int, queued: int, users: int, policy: str) -> Policy:
    config = Config.model_validate({"home": str(home), "scheduler": {
        "policy": policy, "max_queue": queued + 10_000, "max_queued_per_user": queued + 10_000}})
    ids = (f"b{i}" for i in itertools.count())
    p = Policy(config, new_id=lambda: next(ids), rng=random.Random(1))
    for model, step in STEP_S.items():
        for w, h in SIZES:
            scale = w * h / (512 * 512)
            p.estimates.observe_step(model, "H100", w * h, 1, step * scale)
            p.estimates.observe_step(model, "H100", w * h, 4, step * scale * 2.5)
        p.estimates.observe_load(model, "disk", 6.0)
        p.estimates.observe_load(model, "staged", 1.5)
    nodes = max(1, min(100, runners // PER_NODE))
    for i in range(runners):
        node = f"n{i % nodes}"
        resident = {MODELS[i % len(MODELS)]: 1, MODELS[(i + 1) % len(MODELS)]: 1}
        caps = Capabilities(pid=i + 1, node=node, device=f"cuda:{i // nodes}", device_name="H100",
                            devices=[f"cuda:{i // nodes}"], resident=resident)
        p.runner_up(f"r{i}", caps, 0.0)
    for n in range(nodes):
        p.loader_state(f"n{n}", {m: 1 for m in MODELS[:3]})
    rng = random.Random(7)
    for i in range(queued):
        p.submit(_spec(rng, i, users), "c", 0.0)
    p.drain()
    return p


def _spec(rng: random.Random, i: int, users: int) -> JobSpec:
    w, h = SIZES[rng.random() < 0.2]
    return JobSpec(model=rng.choice(MODELS), prompt=f"p{i}", user=f"u{rng.randrange(users)}", width=w, height=h,
                   steps=30, seed=i)


def _finish(p: Policy, d: Dispatch, now: float) -> None:
    outcomes = [JobDone(job_id=spec.id, outputs=[], elapsed_s=1.0) for spec, *_ in d.items]
    timing = RunTiming(images=sum(spec.count for spec, *_ in d.items), steps=30)
    for job, _ in p.batch_done(d.batch.runner, d.batch.id, outcomes, {d.batch.model: 1}, timing, now):
        p.complete(job, [], (), now)


class Fleet:
    """The runners' side, simulated: each batch ends within ±20% of what the policy expected (no two runners
    keep in step, as real ones do not), and each ended batch's jobs are replaced by as many new submits. The
    policy's wake-ups (``wake_at``: a plan put off) are kept as the scheduler actor keeps them."""

    def __init__(self, p: Policy, users: int):
        self.p, self.users, self.now = p, users, 0.0
        self.rng = random.Random(11)
        self.ends: list[tuple[float, str]] = []  # (when it ends, runner)
        self.running: dict[str, Dispatch] = {}
        self.submitted = 0
        self.cpu = 0.0  # the policy's CPU seconds in batch_done and schedule, wake-ups included
        self.dispatched = self.images = self.warm = 0  # batches, their images, those whose model was resident
        self.idle_samples: list[float] = []  # the share of runners idle, at each batch end (the queue is deep)
        p.schedule(self.now)
        self._started(p.drain())

    def _started(self, effects) -> None:
        for e in effects:
            if isinstance(e, Dispatch):
                self.running[e.batch.runner] = e
                self.dispatched += 1
                self.images += e.batch.images
                self.warm += e.batch.model in self.p.state.runners[e.batch.runner].resident
                heapq.heappush(self.ends, (self.now + e.batch.expected_s * self.rng.uniform(0.8, 1.2), e.batch.runner))

    def cycle(self) -> float:
        """The next batch end (with any wake-up due before it): CPU seconds of ``batch_done`` and ``schedule``."""
        spent = 0.0
        while self.p.wake_at is not None and (not self.ends or self.p.wake_at <= self.ends[0][0]):
            self.now = max(self.now, self.p.wake_at)
            t0 = time.process_time()
            self.p.schedule(self.now)
            effects = self.p.drain()
            spent += time.process_time() - t0
            self._started(effects)
        end, runner = heapq.heappop(self.ends)
        self.now = max(self.now, end)
        d = self.running.pop(runner)
        t0 = time.process_time()
        _finish(self.p, d, self.now)
        self.p.schedule(self.now)
        effects = self.p.drain()
        spent += time.process_time() - t0
        self.idle_samples.append(len(self.p.state.idle) / len(self.p.state.runners))
        self._started(effects)
        for _ in d.items:
            self.submit()
        self.p.drain()
        self.cpu += spent
        return spent

    def submit(self) -> None:
        self.submitted += 1
        self.p.submit(_spec(self.rng, 10**7 + self.submitted, self.users), "c", self.now)


def cycles(p: Policy, count: int, users: int) -> tuple[tuple[float, float, float], Fleet]:
    """Dispatch cycles at a steady state (after as many cycles as there are runners, up to 500, have mixed
    their ends). Returns the policy's CPU seconds per dispatched batch (everything it spent, full plans and
    wake-ups included), the median and the p95 of a batch end's, and the fleet."""
    fleet = Fleet(p, users)
    for _ in range(min(500, len(p.state.runners))):
        fleet.cycle()
    fleet.cpu = fleet.dispatched = fleet.images = fleet.warm = 0
    fleet.idle_samples.clear()
    samples = sorted(fleet.cycle() for _ in range(count))
    per_batch = fleet.cpu / max(1, fleet.dispatched)
    return (per_batch, statistics.median(samples), samples[int(len(samples) * 0.95)]), fleet


def submits(fleet: Fleet, count: int) -> float:
    """CPU seconds per submit into the deep queue, every runner busy, with the schedule each is followed by
    and the plans their announcements wait for (one every REPLAN_BUSY_S), a thousand submits a second."""
    p = fleet.p
    t0 = time.process_time()
    for _ in range(count):
        fleet.now += 0.001
        fleet.submit()
        p.schedule(fleet.now)
        p.drain()
    return (time.process_time() - t0) / count


def refresh_s(p: Policy) -> float:
    t0 = time.process_time()
    p.refresh(200.0)
    p.drain()
    return time.process_time() - t0


def raw_limit(runners: int, count: int) -> float:
    """The least any placement costs: pop the runner free first off a heap, push it back later."""
    heap = [(random.random(), i) for i in range(runners)]
    heapq.heapify(heap)
    t0 = time.process_time()
    for _ in range(count):
        t, i = heapq.heappop(heap)
        heapq.heappush(heap, (t + 1.0, i))
    return (time.process_time() - t0) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runners", default="8,64,256,1000")
    parser.add_argument("--queued", default="1000,10000,100000")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--submits", type=int, default=2000)
    args = parser.parse_args(argv)
    fleet = [int(n) for n in args.runners.split(",")]
    depths = [int(n) for n in args.queued.split(",")]
    gc.freeze()  # the setup's objects are not what a cycle costs
    home = Path(tempfile.mkdtemp(prefix="atelier-fleet-"))
    print(f"dispatch cycle, {depths[-1]} queued from {args.users} users, CPU ms per batch "
          "(all / median / p95 of a batch end), and for fair: idle runners, images a batch, model resident:")
    print(f"{'runners':>8} {'fair':>24} {'fifo':>24} {'raw heap':>10} {'refresh ms':>11} {'idle':>6} "
          f"{'images':>6} {'warm':>5}")
    dispatch = {}
    for runners in fleet:
        row = {}
        for policy in ("fair", "fifo"):
            p = make_policy(home, runners, depths[-1], args.users, policy)
            row[policy], fleet_run = cycles(p, args.cycles, args.users)
            if policy == "fair":
                refresh = refresh_s(p)
                idle = statistics.fmean(fleet_run.idle_samples)
                images = fleet_run.images / max(1, fleet_run.dispatched)
                warm = fleet_run.warm / max(1, fleet_run.dispatched)
            del p
            gc.collect()
        dispatch[runners] = row["fair"][0]
        raw = raw_limit(runners, 10_000)
        fair, fifo = (" / ".join(f"{x * 1e3:.3f}" for x in row[k]) for k in ("fair", "fifo"))
        print(f"{runners:>8} {fair:>24} {fifo:>24} {raw * 1e3:>10.4f} {refresh * 1e3:>11.1f} {idle:>6.1%} "
              f"{images:>6.2f} {warm:>5.0%}")
    print(f"\nsubmit, {fleet[-1]} runners busy, CPU µs per submit:")
    submit = {}
    for queued in depths:
        p = make_policy(home, fleet[-1], queued, args.users, "fair")
        submit[queued] = submits(cycles(p, 10, args.users)[1], args.submits)
        print(f"{queued:>8} queued {submit[queued] * 1e6:>9.1f}")
        del p
        gc.collect()
    lo, hi = fleet[0], fleet[-1]
    growth = (dispatch[hi] / dispatch[lo]) / (math.log(hi) / math.log(lo))
    qlo, qhi = depths[0], depths[-1]
    submit_growth = (submit[qhi] / submit[qlo]) / (math.log(qhi) / math.log(qlo))
    print(f"\ngrowth over log: dispatch {growth:.2f} ({lo}→{hi} runners), "
          f"submit {submit_growth:.2f} ({qlo}→{qhi} queued)")
    print(f"RESULT dispatch_ms_1000={dispatch[hi] * 1e3:.3f} submit_us_100k={submit[qhi] * 1e6:.1f} "
          f"growth={max(growth, submit_growth):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
