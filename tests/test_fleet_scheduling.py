"""The structures that keep the policy cheap at fleet scale choose exactly what the plain rules choose.

The fair queue's lazy heaps give the order a from-scratch reading of its rules gives; the planner's
runner index (atelier/scheduling/index.py) places every job where weighing every runner places it;
and the index and idle set follow every change to the runners. Each checked over many seeded,
random sequences of the events a fleet sends (bench/fleet_pure.py measures what they save).
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from atelier.config import Config
from atelier.jobs import Capabilities, JobDone, JobFailed, JobSpec, Priority, RunTiming
from atelier.scheduling import planner
from atelier.scheduling.fairqueue import Entry, FairQueue
from atelier.scheduling.policy import Dispatch, Policy

MODELS = ("tiny-sd", "tiny-sdxl", "tiny-sd2", "noop")


class NaiveFairQueue:
    """The fair queue's rules read literally: every decision looks at every user."""

    def __init__(self):
        self.users: dict[tuple[int, str], deque[Entry]] = {}
        self.vtime: dict[tuple[int, str], float] = {}
        self.clock: dict[int, float] = {}

    def push(self, e: Entry, front: bool = False) -> None:
        key = (e.priority, e.user)
        jobs = self.users.setdefault(key, deque())
        if not jobs:
            waiting = [self.vtime[k] for k, q in self.users.items() if q and k[0] == e.priority]
            least = min(waiting) if waiting else self.clock.get(e.priority, 0.0)
            self.vtime[key] = max(self.vtime.get(key, 0.0), least)
        jobs.appendleft(e) if front else jobs.append(e)

    def remove(self, e: Entry) -> None:
        key = (e.priority, e.user)
        self.users[key].remove(e)
        if not self.users[key] and self.vtime[key] <= self.clock.get(e.priority, 0.0):
            del self.users[key], self.vtime[key]

    def take(self, e: Entry) -> None:
        key = (e.priority, e.user)
        self.clock[e.priority] = max(self.clock.get(e.priority, 0.0), self.vtime[key])
        self.vtime[key] += e.cost
        self.remove(e)

    def refund(self, e: Entry) -> None:
        key = (e.priority, e.user)
        if key in self.vtime:
            self.vtime[key] = max(0.0, self.vtime[key] - e.cost)

    def order(self) -> list[str]:
        vtime = dict(self.vtime)
        at = {k: 0 for k in self.users}
        out = []
        for priority in sorted({k[0] for k in self.users}):
            while True:
                ready = [(vtime[k], q[at[k]].seq, k) for k, q in self.users.items()
                         if k[0] == priority and at[k] < len(q)]
                if not ready:
                    break
                _, _, k = min(ready)
                e = self.users[k][at[k]]
                out.append(e.id)
                vtime[k] += e.cost
                at[k] += 1
        return out


@pytest.mark.parametrize("seed", range(20))
def test_the_fair_queues_heaps_give_the_order_its_rules_give(seed):
    rng = random.Random(seed)
    fast, naive = FairQueue(), NaiveFairQueue()
    queued: list[Entry] = []
    seq = 0
    for _ in range(400):
        action = rng.random()
        if action < 0.5 or not queued:
            seq += 1
            e = Entry(f"j{seq}", f"u{rng.randrange(6)}", rng.choice([0, 1, 1, 2]), rng.choice([0.5, 1.0, 3.0]), seq)
            front = rng.random() < 0.1
            fast.push(e, front=front)
            naive.push(e, front)
            queued.append(e)
        elif action < 0.8:
            e = queued.pop(rng.randrange(len(queued)))
            fast.take(e.id)
            naive.take(e)
            if rng.random() < 0.2:  # run and handed back: requeued at the front, refunded
                fast.refund(e)
                naive.refund(e)
                fast.push(e, front=True)
                naive.push(e, True)
                queued.append(e)
        else:
            e = queued.pop(rng.randrange(len(queued)))
            fast.remove(e.id)
            naive.remove(e)
        assert [e.id for e in fast.order()] == naive.order()
        assert [e.id for e in fast.order(5)] == naive.order()[:5]


def _fleet(tmp_path, rng: random.Random, policy: str) -> Policy:
    config = Config.model_validate({"home": str(tmp_path), "scheduler": {"policy": policy, "plan_window": 24}})
    p = Policy(config, new_id=iter(f"b{i}" for i in range(10**6)).__next__, rng=random.Random(1))
    for model in MODELS:
        for name in ("H100", "A10"):
            p.estimates.observe_step(model, name, 64 * 64, 1, rng.uniform(0.01, 0.1))
        p.estimates.observe_load(model, "disk", rng.uniform(1, 5))
        p.estimates.observe_load(model, "staged", rng.uniform(0.1, 1))
    for i in range(10):  # two device kinds over three nodes
        node = f"n{i % 3}"
        p.runner_up(f"r{i}", Capabilities(pid=i + 1, node=node, device=f"cuda:{i}", devices=[f"cuda:{i}"],
                                          device_name="H100" if i % 2 else "A10",
                                          resident={m: 1 for m in rng.sample(MODELS, rng.randrange(3))}), 0.0)
    p.loader_state("n0", {"tiny-sdxl": 1})
    return p


@pytest.mark.parametrize("policy", ["fair", "fifo"])
@pytest.mark.parametrize("seed", range(12))
def test_the_runner_index_places_every_job_where_weighing_every_runner_does(tmp_path, seed, policy):
    rng = random.Random(seed)
    p = _fleet(tmp_path, rng, policy)
    running: dict[str, Dispatch] = {}
    now = 0.0
    for step in range(120):
        now += rng.uniform(0, 0.4)
        roll = rng.random()
        if roll < 0.45:
            p.submit(JobSpec(model=rng.choice(MODELS), prompt=f"p{step}", user=f"u{rng.randrange(5)}", width=64,
                             height=64, steps=4, count=rng.choice([1, 1, 2]),
                             priority=rng.choice(list(Priority))), "c", now)
        elif roll < 0.8 and running:
            d = running.pop(rng.choice(sorted(running)))
            failed = rng.random() < 0.1
            outcomes = [JobFailed(job_id=s.id, reason="oom", retryable=True) if failed
                        else JobDone(job_id=s.id, outputs=[], elapsed_s=1.0) for s, *_ in d.items]
            resident = {d.batch.model: 1, **({rng.choice(MODELS): 1} if rng.random() < 0.3 else {})}
            for job, _ in p.batch_done(d.batch.runner, d.batch.id, outcomes, resident,
                                       RunTiming(images=d.batch.images, steps=4), now):
                p.complete(job, [], (), now)
        elif roll < 0.85:
            name = f"r{rng.randrange(10)}"
            if p.has_runner(name):
                running.pop(name, None)
                p.runner_down(name, "gone", now)
            else:
                i = int(name[1:])
                p.runner_up(name, Capabilities(pid=100 + step, node=f"n{i % 3}", device=f"cuda:{i}",
                                               devices=[f"cuda:{i}"], device_name="H100"), now)
        elif roll < 0.9:
            p.loader_state(f"n{rng.randrange(3)}", {m: 1 for m in rng.sample(MODELS, 2)})
        assert p.state.check_index() == []
        usable = p._usable(now)
        fast = planner.plan(p.state, p.config, p.estimates, usable, now)
        slow = planner.plan(p.state, p.config, p.estimates, usable, now, exhaustive=True)
        assert [(s.runner.name, [j.id for j in s.jobs], s.finish) for s in fast.starts] == \
            [(s.runner.name, [j.id for j in s.jobs], s.finish) for s in slow.starts]
        assert [(pl.job.id, pl.position, pl.finish_at) for pl in fast.places] == \
            [(pl.job.id, pl.position, pl.finish_at) for pl in slow.places]
        assert fast.preloads == slow.preloads
        p.schedule(now)
        for effect in p.drain():
            if isinstance(effect, Dispatch):
                running[effect.batch.runner] = effect
        assert p.state.check_index() == []


def test_between_full_plans_a_free_runner_takes_the_batch_planned_for_it_unless_it_no_longer_holds(tmp_path):
    """Between full plans (at fleet scale, most dispatches), a runner that frees takes the batch the last
    full plan had next for it; a job cancelled since is not started, and a live job submitted since goes
    first all the same."""
    config = Config.model_validate({"home": str(tmp_path), "scheduler": {"max_batch": 1}})
    p = Policy(config, new_id=iter(f"b{i}" for i in range(100)).__next__, cpu_clock=lambda: 0.0)
    for name in ("r1", "r2"):
        p.runner_up(name, Capabilities(pid=1, node="n1", device="cuda:0", device_name="H100",
                                       resident={"tiny-sd": 1}), 0.0)
    p.estimates.observe_step("tiny-sd", "H100", 64 * 64, 1, 0.25)  # a job: 1 s
    jobs = [p.submit(JobSpec(model="tiny-sd", prompt=f"p{i}", user="ann", width=64, height=64, steps=4), "c", 0.0)
            for i in range(5)]
    p.schedule(0.0)
    first = {d.batch.runner: d for d in p.drain() if isinstance(d, Dispatch)}
    assert sorted(first) == ["r1", "r2"]
    p.schedule(1.0)  # a full plan (due): jobs 2 and 3 are planned next on the runners, as each frees
    p.drain()
    ahead = {name: [j.id for j in batch] for name, batch in p._ahead.items()}
    assert sorted(id_ for ids in ahead.values() for id_ in ids) == sorted(j.id for j in jobs[2:4])

    def done(d: Dispatch, now: float) -> None:
        outcomes = [JobDone(job_id=s.id, outputs=[], elapsed_s=1.0) for s, *_ in d.items]
        p.batch_done(d.batch.runner, d.batch.id, outcomes, {"tiny-sd": 1}, RunTiming(images=1, steps=4), now)

    p.cancel(ahead["r2"][0], 1.01)  # what was planned for r2 is gone by the time it is free
    done(first["r1"], 1.02)  # within REPLAN_BUSY_S of the full plan: no new plan is due
    p.schedule(1.02)
    (took,) = [d for d in p.drain() if isinstance(d, Dispatch)]
    assert (took.batch.runner, [s.id for s, *_ in took.items]) == ("r1", ahead["r1"])
    done(first["r2"], 1.03)
    p.schedule(1.03)
    (fell_back,) = [d for d in p.drain() if isinstance(d, Dispatch)]  # its planned job was cancelled: a plan
    assert (fell_back.batch.runner, [s.id for s, *_ in fell_back.items]) == ("r2", [jobs[4].id])

    queued = [p.submit(JobSpec(model="tiny-sd", prompt=f"q{i}", user="ann", width=64, height=64, steps=4), "c", 1.9)
              for i in range(3)]
    p.schedule(2.0)  # due: r1 and r2 have their next batches planned again
    p.drain()
    assert queued[0].id in {j.id for batch in p._ahead.values() for j in batch}
    live = p.submit(JobSpec(model="tiny-sd", prompt="now", user="bob", width=64, height=64, steps=4,
                            priority=Priority.live), "c", 2.01)
    done(took, 2.02)
    p.schedule(2.02)
    (first_free,) = [d for d in p.drain() if isinstance(d, Dispatch)]
    assert [s.id for s, *_ in first_free.items] == [live.id]


def test_a_planned_batch_that_could_now_take_more_is_filled_anew(tmp_path):
    """The batch a full plan had for a runner was sized by what was measured then; the runner's own batch end
    measures a bigger batch's worth, so the planned one (two of three jobs) is not started as it was."""
    config = Config.model_validate({"home": str(tmp_path)})
    p = Policy(config, new_id=iter(f"b{i}" for i in range(100)).__next__, cpu_clock=lambda: 0.0)
    for name, model in (("r1", "tiny-sd"), ("r2", "tiny-sdxl")):
        p.runner_up(name, Capabilities(pid=1, node="n1", device="cuda:0", device_name="H100",
                                       resident={model: 1}), 0.0)
    longs = [p.submit(JobSpec(model=m, prompt="long", user="ann", width=64, height=64, steps=4, count=2), "c", 0.0)
             for m in ("tiny-sd", "tiny-sdxl")]
    p.schedule(0.0)
    first = {d.batch.runner: d for d in p.drain() if isinstance(d, Dispatch)}
    assert set(first) == {"r1", "r2"} and all(j.runner for j in longs)
    queued = [p.submit(JobSpec(model="tiny-sd", prompt=f"a{i}", user="cy", width=64, height=64, steps=4), "c", 0.5)
              for i in range(3)]

    def done(d: Dispatch, now: float) -> None:
        outcomes = [JobDone(job_id=s.id, outputs=[], elapsed_s=1.0) for s, *_ in d.items]
        p.batch_done(d.batch.runner, d.batch.id, outcomes, {d.batch.model: 1},
                     RunTiming(images=2, steps=4, step_s=0.1), now)

    done(first["r2"], 2.0)
    p.schedule(2.0)  # a full plan: r1's next batch planned as two images, all that was worth it so far
    p.drain()
    assert [len(batch) for batch in p._ahead.values()] == [2]
    done(first["r1"], 2.01)  # r1 measures two images: four may pay now
    p.schedule(2.01)
    (batch,) = [d for d in p.drain() if isinstance(d, Dispatch)]
    assert sorted(s.id for s, *_ in batch.items) == sorted(j.id for j in queued)
