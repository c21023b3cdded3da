"""Gangs on the pure policy core: which runner takes what, devices shared between a gang and the
singles on them, and the choice between the two by load (atelier/scheduling/planner.py)."""

from __future__ import annotations

from atelier.config import Config, ModelEntry
from atelier.jobs import Capabilities, JobDone, JobSpec, JobState, RunTiming
from atelier.scheduling.policy import Dispatch, Policy
from atelier.scheduling.state import Runner

DEVICES = ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
PAIR = ["cuda:4", "cuda:5"]  # a second gang, of two, for the model whose layout is 2
GANG = "runner-n1-cuda0+cuda1+cuda2+cuda3"
SINGLES = [f"runner-n1-cuda{i}" for i in range(4)]
PIXELS = 1024 * 1024
STEPS = 28
# xDiT's FLUX.1-dev figures, 1024x1024, 28 steps, compiled: one H100 4.30 s, Ulysses-4 on four 1.63 s.
SINGLE_S, GANG_S = 4.30, 1.63


def make_policy(tmp_path, **scheduler) -> Policy:
    config = Config.model_validate({
        "home": str(tmp_path), "scheduler": scheduler,
        "node": {"devices": [*DEVICES, *PAIR], "gangs": [DEVICES, PAIR]},
        "models": {
            "fx": {"family": "flux", "source": "builtin:tiny-flux",
                   "parallel": {"backend": "xfuser", "ulysses_degree": 4}},
            "fx2": {"family": "flux", "source": "builtin:tiny-flux",
                    "parallel": {"backend": "xfuser", "ulysses_degree": 2}},
            "sd": {"family": "sd1", "source": "builtin:tiny-sd"},
        }})
    ids = iter(f"b{i}" for i in range(10_000))
    return Policy(config, new_id=lambda: next(ids))


def single(i: int, resident: dict[str, int] | None = None) -> Capabilities:
    return Capabilities(pid=10 + i, node="n1", device=f"cuda:{i}", device_name="H100", devices=[f"cuda:{i}"],
                        resident=resident or {})


def gang(devices: list[str] = DEVICES, resident: dict[str, int] | None = None) -> Capabilities:
    return Capabilities(pid=99, node="n1", device="+".join(devices), device_name=f"{len(devices)}x H100",
                        devices=list(devices), gang=len(devices), resident=resident or {})


def adaptive(policy: Policy, *, measured: bool = True) -> None:
    """Four singles and a gang over the same four devices, all holding FLUX, its times measured on both."""
    for i in range(4):
        policy.runner_up(SINGLES[i], single(i, {"fx": 1}), 0.0)
    policy.runner_up(GANG, gang(resident={"fx": 1}), 0.0)
    if measured:
        for device, seconds in (("H100", SINGLE_S), ("4x H100", GANG_S)):
            step = seconds / STEPS
            policy.estimates.observe_step("fx", device, PIXELS, 1, step)
            policy.estimates.observe_step("fx", device, PIXELS, 2, 2 * 0.975 * step)  # batching buys little


def job(model: str = "fx", **kw) -> JobSpec:
    side = 1024 if model.startswith("fx") else 64
    return JobSpec(model=model, prompt=kw.pop("prompt", "p"), user=kw.pop("user", "ann"), width=side, height=side,
                   steps=STEPS if model.startswith("fx") else 4, **kw)


def dispatches(policy: Policy) -> list[Dispatch]:
    return [e for e in policy.drain() if isinstance(e, Dispatch)]


def finish(policy: Policy, d: Dispatch, now: float) -> None:
    outcomes = [JobDone(job_id=spec.id, outputs=[], elapsed_s=1.0) for spec, *_ in d.items]
    timing = RunTiming(images=len(d.items), steps=d.items[0][0].steps)
    for j, _ in policy.batch_done(d.batch.runner, d.batch.id, outcomes, {d.batch.model: 1}, timing, now):
        policy.complete(j, [], (), now)


# --------------------------------------------------------------------------- #


def test_a_gang_takes_only_the_models_whose_layout_is_its_size_and_a_single_takes_all():
    def entry(**parallel) -> ModelEntry:
        return ModelEntry.model_validate({"family": "flux", "source": "x",
                                          **({"parallel": {"backend": "xfuser", **parallel}} if parallel else {})})

    four, two = Runner("g4", gang()), Runner("g2", gang(DEVICES[:2]))
    one = Runner("s", single(0))
    plain, by4, by2 = entry(), entry(ulysses_degree=4), entry(ulysses_degree=2, ring_degree=1)
    assert [four.takes(e) for e in (plain, by4, by2)] == [False, True, False]
    assert [two.takes(e) for e in (plain, by4, by2)] == [False, False, True]
    assert [one.takes(e) for e in (plain, by4, by2)] == [True, True, True]
    assert four.shares_device(two) and four.shares_device(one) and two.shares_device(one)
    assert not Runner("s1", single(1)).shares_device(Runner("s2", single(2)))
    elsewhere = Runner("x", gang().model_copy(update={"node": "n2"}))
    assert not four.shares_device(elsewhere)  # the same names on another node are other devices


def test_a_model_without_a_layout_never_goes_to_a_gang(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up(GANG, gang(), 0.0)
    plain = policy.submit(job("sd"), "c", 0.0)
    wrong_size = policy.submit(job("fx2"), "c", 0.0)
    policy.schedule(0.0)
    assert dispatches(policy) == []  # the idle gang takes neither
    assert plain.state is JobState.queued and plain.finish_at is None
    assert wrong_size.state is JobState.queued

    policy.runner_up(SINGLES[0], single(0), 1.0)
    policy.schedule(1.0)
    (d,) = dispatches(policy)
    assert d.batch.runner == SINGLES[0]  # a single runs it


def test_runners_sharing_a_device_never_both_get_a_batch_in_one_plan(tmp_path):
    policy = make_policy(tmp_path)
    adaptive(policy, measured=False)
    policy.runner_up("runner-n1-cuda4", single(4), 0.0)
    policy.runner_up("runner-n1-cuda4+cuda5", gang(PAIR), 0.0)
    for i in range(6):
        policy.submit(job("fx" if i % 2 else "sd", prompt=f"p{i}"), "c", 0.0)
        policy.submit(job("fx2", prompt=f"q{i}"), "c", 0.0)
    policy.schedule(0.0)
    busy = [policy.state.runners[d.batch.runner] for d in dispatches(policy)]
    assert busy
    for a in busy:
        assert not any(a.shares_device(b) for b in busy)

    # While one runs, every runner sharing a device with it waits, whatever is queued.
    policy.submit(job("fx", prompt="late"), "c", 0.1)
    policy.schedule(0.1, whole_queue=True)
    for d in dispatches(policy):
        assert not any(policy.state.runners[d.batch.runner].shares_device(b) for b in busy)


def test_a_single_at_work_keeps_the_gang_over_its_device_busy(tmp_path):
    policy = make_policy(tmp_path)
    adaptive(policy)
    policy.runner_draining(SINGLES[1])
    policy.runner_draining(SINGLES[2])
    policy.runner_draining(SINGLES[3])
    first = policy.submit(job("sd"), "c", 0.0)
    policy.schedule(0.0)
    (d,) = dispatches(policy)
    assert d.batch.runner == SINGLES[0]
    # A FLUX job now: the gang would be ~2.6x faster, but cuda:0 is taken until the single's batch ends.
    fx = policy.submit(job("fx"), "c", 0.1)
    policy.schedule(0.1)
    assert dispatches(policy) == []
    assert fx.finish_at is not None and fx.finish_at >= first.finish_at
    finish(policy, d, 0.5)
    policy.schedule(0.5)
    (d,) = dispatches(policy)
    assert d.batch.runner == GANG and [spec.id for spec, *_ in d.items] == [fx.id]


def test_at_low_load_a_gang_capable_job_takes_the_idle_gang(tmp_path):
    policy = make_policy(tmp_path)
    adaptive(policy)
    for n in range(3):  # one at a time, each after the last has ended
        one = policy.submit(job("fx", prompt=f"p{n}"), "c", 10.0 * n)
        policy.schedule(10.0 * n)
        (d,) = dispatches(policy)
        assert d.batch.runner == GANG
        assert abs(one.finish_at - (10.0 * n + GANG_S)) < 0.01
        finish(policy, d, 10.0 * n + GANG_S)
    # And a job without a layout, at the same low load, takes a single.
    policy.submit(job("sd"), "c", 40.0)
    policy.schedule(40.0)
    (d,) = dispatches(policy)
    assert d.batch.runner in SINGLES


def test_with_a_deep_queue_the_four_singles_each_get_one(tmp_path):
    policy = make_policy(tmp_path)
    adaptive(policy)
    jobs = [policy.submit(job("fx", prompt=f"p{i}", seed=i), "c", 0.0) for i in range(12)]
    policy.schedule(0.0)
    ds = dispatches(policy)
    assert sorted(d.batch.runner for d in ds) == SINGLES
    assert all(len(d.items) == 1 for d in ds)
    queued = [j for j in jobs if j.state is JobState.queued]
    assert len(queued) == 8
    # Planned on the singles too, two more rounds of four: about 3 x 4.30 s for the last.
    assert max(j.finish_at for j in queued) < 3 * SINGLE_S + 0.1


def test_the_tail_of_a_burst_takes_the_gang_once_the_singles_are_free(tmp_path):
    policy = make_policy(tmp_path)
    adaptive(policy)
    jobs = [policy.submit(job("fx", prompt=f"p{i}", seed=i), "c", 0.0) for i in range(6)]
    policy.schedule(0.0)
    first = dispatches(policy)
    assert sorted(d.batch.runner for d in first) == SINGLES
    # Two left for after the first round: both on the gang (1.63 s each) end before one more round of singles.
    tail = [j for j in jobs if j.state is JobState.queued]
    assert len(tail) == 2 and max(j.finish_at for j in tail) < SINGLE_S + 2 * GANG_S + 0.1
    for d in first:
        finish(policy, d, SINGLE_S)
    policy.schedule(SINGLE_S)
    (d,) = dispatches(policy)
    assert d.batch.runner == GANG


def test_a_gang_not_yet_measured_is_tried_and_then_judged_by_its_own_times(tmp_path):
    policy = make_policy(tmp_path)
    adaptive(policy, measured=False)
    policy.estimates.observe_step("fx", "H100", PIXELS, 1, SINGLE_S / STEPS)  # the singles ran FLUX; the gang never
    policy.submit(job("fx"), "c", 0.0)
    policy.schedule(0.0)
    (d,) = dispatches(policy)
    assert d.batch.runner == GANG  # at the ideal speed-up, it finishes first
    # It measured slower than one device: the next FLUX job, at the same low load, takes a single.
    outcomes = [JobDone(job_id=spec.id, outputs=[], elapsed_s=1.0) for spec, *_ in d.items]
    policy.batch_done(GANG, d.batch.id, outcomes, {"fx": 1},
                      RunTiming(images=1, steps=STEPS, step_s=1.5 * SINGLE_S / STEPS), SINGLE_S)
    policy.submit(job("fx", prompt="again"), "c", 10.0)
    policy.schedule(10.0)
    (d,) = dispatches(policy)
    assert d.batch.runner in SINGLES


def test_singles_not_yet_measured_get_a_job_once_two_wait_even_where_the_gang_looks_faster(tmp_path):
    policy = make_policy(tmp_path)
    adaptive(policy, measured=False)
    policy.estimates.observe_step("fx", "4x H100", PIXELS, 1, GANG_S / STEPS)  # only the gang ran FLUX
    policy.submit(job("fx"), "c", 0.0)
    policy.schedule(0.0)
    (d,) = dispatches(policy)
    assert d.batch.runner == GANG  # alone: the gang
    finish(policy, d, GANG_S)
    for i in range(2):
        policy.submit(job("fx", prompt=f"p{i}"), "c", 10.0)
    policy.schedule(10.0)
    (d,) = dispatches(policy)
    assert d.batch.runner in SINGLES  # two waiting: a single measures FLUX (as a batch of both: never measured)


# --------------------------------------------------------------------------- #
# The cost model on a gang


def test_a_cost_model_on_a_gang_sleeps_the_profiles_gang_costs_and_refuses_a_size_it_lacks(tmp_path):
    import tomllib
    from pathlib import Path

    import pytest

    from atelier.config import ParallelLayout
    from atelier.families import get_family
    from atelier.families.costmodel import write_model
    from atelier.families.loaded import LoadRequest

    profile = tomllib.loads((Path(__file__).parents[1] / "bench" / "profiles" / "h100-flux-gang.toml").read_text())
    folder = write_model(tmp_path / "flux", profile["models"]["flux-compiled"], time_scale=0.001)
    family = get_family("costmodel")

    def loaded():
        return family.load(LoadRequest(folder, weights={"stand_in": {}}))

    one = loaded().pipe
    four = family.parallelize(loaded(), ParallelLayout(backend="diffusers", ulysses_degree=4), rank=1, world=4,
                              device="cpu").pipe
    # xDiT's FLUX.1-dev, 1024px, 28 steps, compiled: 4.30 s on one H100, 1.63 s on four (Ulysses-4).
    assert [round(c.seconds_per_step(PIXELS, 1) * STEPS * 1000, 2) for c in (one, four)] == [SINGLE_S, GANG_S]
    with pytest.raises(ValueError, match="no costs for a gang of 3"):
        family.parallelize(loaded(), ParallelLayout(backend="diffusers", ulysses_degree=3), rank=0, world=3,
                           device="cpu")
