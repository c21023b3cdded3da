"""Each scheduling rule on the pure policy core: no sockets, the time passed in by the test."""

from __future__ import annotations

import pytest

from atelier.config import Config
from atelier.jobs import Capabilities, ErrorCode, JobDone, JobFailed, JobSpec, JobState, Priority, RunTiming
from atelier.scheduling.estimates import Estimates
from atelier.scheduling.fairqueue import Entry, FairQueue
from atelier.scheduling.policy import Announce, Deliver, Dispatch, Policy, PreloadModels, Refused, StopRunning


def make_policy(tmp_path, **scheduler) -> Policy:
    config = Config.model_validate({"home": str(tmp_path), "scheduler": scheduler})
    ids = iter(f"b{i}" for i in range(10_000))
    return Policy(config, new_id=lambda: next(ids))


def gpu(name: str, node: str = "n1", resident: dict[str, int] | None = None) -> Capabilities:
    return Capabilities(pid=1, node=node, device="cuda:0", device_name="H100", resident=resident or {})


def job(model: str = "tiny-sd", user: str = "ann", **kw) -> JobSpec:
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    kw.setdefault("steps", 4)
    return JobSpec(model=model, prompt=kw.pop("prompt", "p"), user=user, **kw)


def batching_pays(policy: Policy, model: str = "tiny-sd", pixels: int = 64 * 64, device: str = "H100") -> None:
    """Measurements that show batches of up to 4 images are far cheaper per image than one alone."""
    policy.estimates.observe_step(model, device, pixels, 1, 0.1)
    policy.estimates.observe_step(model, device, pixels, 4, 0.12)


def dispatches(policy: Policy) -> list[Dispatch]:
    return [e for e in policy.drain() if isinstance(e, Dispatch)]


def batch_ids(d: Dispatch) -> list[str]:
    return [spec.id for spec, *_ in d.items]


def finish(policy: Policy, d: Dispatch, now: float, *, resident: dict[str, int] | None = None,
           step_s: float | None = None) -> None:
    outcomes = [JobDone(job_id=spec.id, outputs=[], elapsed_s=1.0) for spec, *_ in d.items]
    images = sum(spec.count for spec, *_ in d.items)
    timing = RunTiming(images=images, steps=d.items[0][0].steps, step_s=step_s)
    done = policy.batch_done(d.batch.runner, d.batch.id, outcomes, resident or {d.batch.model: 1}, timing, now)
    for j, _ in done:
        policy.complete(j, [], (), now)


# --------------------------------------------------------------------------- #
# Batching


def test_jobs_that_queue_while_the_runner_is_busy_run_as_one_batch_each_with_its_seed(tmp_path):
    policy = make_policy(tmp_path)
    batching_pays(policy)
    policy.runner_up("r1", gpu("r1"), 0.0)
    first = policy.submit(job(seed=1), "c", 0.0)
    policy.schedule(0.0)
    (running,) = dispatches(policy)
    assert batch_ids(running) == [first.id]  # an idle runner does not wait for company

    same = [policy.submit(job(prompt=f"p{i}", seed=10 + i, user=u), "c", 0.1)
            for i, u in enumerate(["ann", "bob", "cy"])]
    other_size = policy.submit(job(width=128, seed=20), "c", 0.1)
    policy.schedule(0.1)
    assert dispatches(policy) == []  # the runner is busy
    finish(policy, running, 1.0)
    policy.schedule(1.0)
    (batch,) = dispatches(policy)
    assert batch_ids(batch) == [j.id for j in same]  # three users, one pipeline call
    assert [spec.seed for spec, *_ in batch.items] == [10, 11, 12]
    assert other_size.state is JobState.queued  # a different size cannot share the call
    assert all(j.batch_id == batch.batch.id for j in same)


def test_a_batch_stops_at_the_models_size_and_a_big_job_runs_alone(tmp_path):
    policy = make_policy(tmp_path)  # sd1 on a GPU: 8 images per call
    batching_pays(policy, device="cuda:0")
    policy.runner_up("r1", Capabilities(pid=1, node="n1", device="cuda:0", resident={}), 0.0)
    policy.runner_up("r2", Capabilities(pid=2, node="n1", device="cpu", resident={}), 0.0)
    policy.runner_draining("r2")  # only r1, to see one runner's batches
    jobs = [policy.submit(job(count=3, prompt=f"p{i}"), "c", 0.0) for i in range(4)]
    policy.schedule(0.0)
    (first,) = dispatches(policy)
    assert batch_ids(first) == [jobs[0].id, jobs[1].id]  # 6 images; a third job would make 9

    big = make_policy(tmp_path, max_batch=2)
    big.runner_up("r1", gpu("r1"), 0.0)
    lone = big.submit(job(count=4), "c", 0.0)
    big.submit(job(count=1), "c", 0.0)
    big.schedule(0.0)
    (alone,) = dispatches(big)
    assert batch_ids(alone) == [lone.id]  # never split; runs alone with all its images


def test_a_batch_grows_only_as_far_as_measured_step_times_show_it_pays(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", gpu("r1"), 0.0)
    policy.runner_draining("r1")
    for i in range(8):
        policy.submit(job(prompt=f"p{i}"), "c", 0.0)
    policy.state.runners["r1"].draining = False

    def next_batch_size(now: float) -> int:
        policy.schedule(now)
        (d,) = dispatches(policy)
        finish(policy, d, now + 0.5, step_s=None)
        return len(d.items)

    assert next_batch_size(0.0) == 2  # nothing measured yet: it tries 2
    # Measured: 2 images take hardly longer than 1, so it tries 4; 4 take twice 2, so it stays at 2.
    policy.estimates.observe_step("tiny-sd", "H100", 64 * 64, 1, 0.10)
    policy.estimates.observe_step("tiny-sd", "H100", 64 * 64, 2, 0.11)
    assert next_batch_size(1.0) == 4
    policy.estimates.observe_step("tiny-sd", "H100", 64 * 64, 4, 0.22)
    assert next_batch_size(2.0) == 2


def test_batch_wait_holds_a_short_batch_for_company_then_starts_it(tmp_path):
    policy = make_policy(tmp_path, batch_wait_s=0.5)
    batching_pays(policy)
    policy.runner_up("r1", gpu("r1"), 0.0)
    a = policy.submit(job(seed=1), "c", 0.0)
    policy.schedule(0.0)
    assert dispatches(policy) == [] and policy.wake_at == pytest.approx(0.5)
    b = policy.submit(job(seed=2, prompt="other"), "c", 0.2)
    policy.schedule(0.2)
    assert dispatches(policy) == []
    policy.schedule(0.5)
    (batch,) = dispatches(policy)
    assert batch_ids(batch) == [a.id, b.id]


# --------------------------------------------------------------------------- #
# Placement, affinity, preloading


def test_a_job_goes_to_the_runner_that_holds_its_model(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", gpu("r1", resident={"tiny-sdxl": 1}), 0.0)
    policy.runner_up("r2", gpu("r2", resident={"tiny-sd": 1}), 0.0)
    policy.submit(job("tiny-sd"), "c", 0.0)
    policy.schedule(0.0)
    (d,) = dispatches(policy)
    assert d.batch.runner == "r2"


def test_a_job_waits_for_a_busy_runner_with_its_model_when_loading_elsewhere_is_slower(tmp_path):
    policy = make_policy(tmp_path, max_batch=1)
    # 512x512, 4 steps at 1 s a step: 4 s a job.
    policy.estimates = Estimates(prior_step_s=1.0, prior_load_s={"disk": 30.0, "staged": 0.5})
    policy.runner_up("r1", gpu("r1", node="n1", resident={"tiny-sd": 1}), 0.0)
    policy.runner_up("r2", gpu("r2", node="n2"), 0.0)
    policy.loader_state("n1", {})
    policy.loader_state("n2", {})
    big = dict(width=512, height=512)
    policy.submit(job(**big), "c", 0.0)
    policy.schedule(0.0)
    (first,) = dispatches(policy)
    assert first.batch.runner == "r1"

    waiting = policy.submit(job(prompt="next", **big), "c", 0.1)
    policy.schedule(0.1)
    assert dispatches(policy) == []  # r2 is idle, but a 30 s load is worse than waiting 4 s for r1
    assert waiting.position == 0 and waiting.finish_at == pytest.approx(8.0)

    # Staged on r2's node, the switch costs 0.5 s and r2 takes the job at once.
    policy.loader_state("n2", {"tiny-sd": 10})
    policy.schedule(0.2)
    (second,) = dispatches(policy)
    assert second.batch.runner == "r2" and batch_ids(second) == [waiting.id]
    assert waiting.finish_at == pytest.approx(0.2 + 0.5 + 4.0)


def test_a_popular_model_spreads_to_a_second_runner_only_once_its_queue_is_longer_than_a_load(tmp_path):
    def started_with(jobs: int) -> tuple[list[tuple[str, str]], list]:
        policy = make_policy(tmp_path, max_batch=1)
        # 512x512, 4 steps at 1 s a step: 4 s a job; loading the model on the second runner: 10 s.
        policy.estimates = Estimates(prior_step_s=1.0, prior_load_s={"disk": 10.0, "staged": 10.0})
        policy.runner_up("r1", gpu("r1", resident={"tiny-sd": 1}), 0.0)
        policy.runner_up("r2", gpu("r2"), 0.0)
        specs = [policy.submit(job(prompt=f"p{i}", width=512, height=512), "c", 0.0) for i in range(jobs)]
        policy.schedule(0.0)
        started = [(d.batch.runner, specs.index(policy.job(batch_ids(d)[0]))) for d in dispatches(policy)]
        return started, specs

    few, _ = started_with(3)
    assert few == [("r1", 0)]  # r1 finishes all three (12 s) before r2 could finish one (14 s)
    many, specs = started_with(6)
    assert many == [("r1", 0), ("r2", 3)]  # the fourth would end at 16 s on r1, 14 s on r2
    assert [specs[i].position for i in (1, 2, 4, 5)] == [0, 1, 2, 3]


def test_the_next_batches_models_are_preloaded_on_the_node_that_will_run_them(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", gpu("r1", node="n1", resident={"tiny-sd": 1}), 0.0)
    policy.loader_state("n1", {"noop": 0})
    policy.submit(job("tiny-sd"), "c", 0.0)
    policy.submit(job("tiny-sdxl"), "c", 0.0)
    policy.submit(job("noop"), "c", 0.0)
    policy.schedule(0.0)
    effects = policy.drain()
    preloads = [e for e in effects if isinstance(e, PreloadModels)]
    assert preloads == [PreloadModels("n1", ("tiny-sdxl",))]  # noop is staged; tiny-sd is resident
    policy.schedule(0.1)
    assert not [e for e in policy.drain() if isinstance(e, PreloadModels)]  # asked once
    policy.loader_state("n1", {"noop": 0, "tiny-sdxl": 5})
    policy.schedule(0.2)
    assert not [e for e in policy.drain() if isinstance(e, PreloadModels)]


def test_a_rare_model_is_placed_in_its_turn_and_never_left_behind(tmp_path):
    policy = make_policy(tmp_path, max_batch=1)
    policy.runner_up("r1", gpu("r1", resident={"tiny-sd": 1}), 0.0)
    for i in range(3):
        policy.submit(job(prompt=f"p{i}", user="ann"), "c", 0.0)
    rare = policy.submit(job("tiny-sdxl", user="bob"), "c", 0.0)
    for i in range(3):
        policy.submit(job(prompt=f"q{i}", user="ann"), "c", 0.0)
    started, now = [], 0.0
    policy.schedule(now)
    while True:
        batches = dispatches(policy)
        if not batches:
            break
        started += [batch_ids(d) for d in batches]
        now += 1
        for d in batches:
            finish(policy, d, now)
        policy.schedule(now)
    assert len(started) == 7
    assert started[1] == [rare.id]  # bob's turn comes after ann's first job, though it costs a load


# --------------------------------------------------------------------------- #
# Fair share, priorities, limits


def test_a_burst_does_not_hold_back_another_users_single_job(tmp_path):
    policy = make_policy(tmp_path, max_batch=1)
    policy.runner_up("r1", gpu("r1"), 0.0)
    burst = [policy.submit(job(prompt=f"b{i}", user="ann"), "c", 0.0) for i in range(100)]
    single = policy.submit(job(prompt="mine", user="bob"), "c", 0.1)
    policy.schedule(0.1)
    (first,) = dispatches(policy)
    assert batch_ids(first) == [burst[0].id]
    assert single.position == 0  # next, not 100th
    finish(policy, first, 1.0)
    policy.schedule(1.0)
    (second,) = dispatches(policy)
    assert batch_ids(second) == [single.id]


def test_users_take_turns_and_coming_back_banks_no_credit():
    queue = FairQueue()
    for i in range(3):
        queue.push(Entry(f"a{i}", "ann", 1, cost=1.0, seq=i))
    for i in range(3):
        queue.push(Entry(f"b{i}", "bob", 1, cost=1.0, seq=10 + i))
    assert [e.id for e in queue.order()] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    for e in queue.order()[:4]:
        queue.take(e.id)
    # Cy was away while ann and bob each ran two jobs: she starts level with them, not ahead by two.
    for i in range(3):
        queue.push(Entry(f"c{i}", "cy", 1, cost=1.0, seq=20 + i))
    assert [e.id for e in queue.order()] == ["a2", "b2", "c0", "c1", "c2"]
    # Cost is work: a job four times bigger takes four turns' share.
    fair = FairQueue()
    fair.push(Entry("big", "ann", 1, cost=4.0, seq=0))
    fair.push(Entry("big2", "ann", 1, cost=4.0, seq=1))
    for i in range(5):
        fair.push(Entry(f"s{i}", "bob", 1, cost=1.0, seq=10 + i))
    assert [e.id for e in fair.order()] == ["big", "s0", "s1", "s2", "s3", "big2", "s4"]


def test_live_goes_before_interactive_before_batch(tmp_path):
    policy = make_policy(tmp_path, max_batch=1)
    low = policy.submit(job(priority=Priority.batch, prompt="low"), "c", 0.0)
    mid = policy.submit(job(priority=Priority.interactive, prompt="mid"), "c", 0.0)
    top = policy.submit(job(priority=Priority.live, prompt="top"), "c", 0.0)
    assert policy.queued() == [top.id, mid.id, low.id]


def test_per_user_limits_and_a_bounded_queue_refuse_with_a_retry_hint(tmp_path):
    policy = make_policy(tmp_path, max_queue=5, max_queued_per_user=3)
    for i in range(3):
        policy.submit(job(prompt=f"a{i}"), "c", 0.0)
    with pytest.raises(Refused) as mine:
        policy.submit(job(prompt="a4"), "c", 0.0)
    assert mine.value.code is ErrorCode.queue_full and mine.value.field == "user"
    assert "ann has 3 jobs queued" in mine.value.message and mine.value.retry_after_s >= 1
    policy.submit(job(user="bob"), "c", 0.0)
    policy.submit(job(user="cy"), "c", 0.0)
    with pytest.raises(Refused) as full:
        policy.submit(job(user="dan"), "c", 0.0)
    assert full.value.code is ErrorCode.queue_full and "queue is full (5 jobs)" in full.value.message
    assert full.value.retry_after_s is not None


def test_a_user_at_the_running_limit_waits_while_others_start(tmp_path):
    policy = make_policy(tmp_path, max_running_per_user=1)
    policy.runner_up("r1", gpu("r1"), 0.0)
    policy.runner_up("r2", gpu("r2"), 0.0)
    policy.runner_up("r3", gpu("r3"), 0.0)
    a1 = policy.submit(job(seed=1, prompt="a1"), "c", 0.0)
    policy.submit(job(seed=2, prompt="a2", width=128), "c", 0.0)  # not batchable with a1
    policy.submit(job(seed=3, prompt="a3"), "c", 0.0)  # batchable, but ann may run one job at once
    b1 = policy.submit(job(user="bob", width=128), "c", 0.0)
    policy.schedule(0.0)
    started = sorted(sorted(batch_ids(d)) for d in dispatches(policy))
    assert started == sorted([[a1.id], [b1.id]])


# --------------------------------------------------------------------------- #
# Live sessions


def test_a_newer_prompt_replaces_the_queued_one_and_stops_the_running_one(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", gpu("r1"), 0.0)
    live = dict(session="s1", priority=Priority.live)
    first = policy.submit(job(prompt="a", **live), "c", 0.0)
    policy.schedule(0.0)
    (running,) = dispatches(policy)

    second = policy.submit(job(prompt="a l", **live), "c", 0.1)
    policy.schedule(0.1)
    effects = policy.drain()
    assert StopRunning("r1", first.id, f"superseded by a newer prompt (job {second.id})") in effects
    third = policy.submit(job(prompt="a li", **live), "c", 0.2)
    policy.schedule(0.2)
    effects = policy.drain()
    # The queued one is replaced at once: the session keeps one pending job.
    assert [e.job.id for e in effects if isinstance(e, Deliver)] == [second.id]
    assert second.state is JobState.cancelled and "superseded" in second.reason
    assert policy.queued() == [third.id]

    # The stopped job's images came back anyway (it finished before the stop): not delivered as done.
    finish(policy, running, 0.3)
    assert first.state is JobState.cancelled and "superseded" in first.reason
    policy.schedule(0.3)
    (next_batch,) = dispatches(policy)
    assert batch_ids(next_batch) == [third.id]
    finish(policy, next_batch, 0.5)
    assert third.state is JobState.done


def test_another_users_session_of_the_same_name_is_left_alone(tmp_path):
    policy = make_policy(tmp_path)
    a = policy.submit(job(session="s1", user="ann"), "c", 0.0)
    policy.submit(job(session="s1", user="bob"), "c", 0.0)
    assert a.state is JobState.queued


def test_cancelling_one_job_of_a_batch_ends_it_at_once_and_the_rest_go_on(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", gpu("r1"), 0.0)
    a = policy.submit(job(prompt="a"), "c", 0.0)
    b = policy.submit(job(prompt="b"), "c", 0.0)
    policy.schedule(0.0)
    (batch,) = dispatches(policy)
    assert batch_ids(batch) == [a.id, b.id]
    policy.cancel(a.id, 0.1)
    effects = policy.drain()
    assert StopRunning("r1", a.id, "cancelled") in effects
    assert a.state is JobState.cancelled
    policy.cancel(b.id, 0.2)  # the last of its batch: the runner's report ends it
    assert b.state is JobState.assigned
    outcomes = [JobFailed(job_id=a.id, reason="cancelled", cancelled=True),
                JobFailed(job_id=b.id, reason="cancelled", cancelled=True)]
    policy.batch_done("r1", batch.batch.id, outcomes, {}, RunTiming(), 0.3)
    assert b.state is JobState.cancelled


# --------------------------------------------------------------------------- #
# Positions, ETAs, retries, the FIFO baseline


def test_queued_jobs_get_positions_and_etas_from_measured_step_times(tmp_path):
    policy = make_policy(tmp_path, max_batch=1)
    policy.runner_up("r1", gpu("r1"), 0.0)
    policy.submit(job(), "c", 0.0)
    policy.schedule(0.0)
    (first,) = dispatches(policy)
    finish(policy, first, 1.0, step_s=0.5)  # 4 steps of 0.5 s: 2 s a job
    queued = [policy.submit(job(prompt=f"p{i}"), "c", 1.0) for i in range(3)]
    policy.schedule(1.0)
    dispatches(policy)
    assert [j.position for j in queued[1:]] == [0, 1]
    etas = [j.record(1.0).eta_s for j in queued]
    assert etas == pytest.approx([2.0, 4.0, 6.0])
    announced = [e for e in policy.drain() if isinstance(e, Announce)]
    assert announced == []  # already drained with the dispatches
    policy.submit(job(prompt="late"), "c", 1.5)
    policy.schedule(1.5)
    fresh = [e.job for e in policy.drain() if isinstance(e, Announce)]
    assert len(fresh) == 1 and fresh[0].position == 2


def test_a_dead_runners_jobs_go_back_to_the_front_and_fail_after_three_attempts(tmp_path):
    policy = make_policy(tmp_path)
    victim = policy.submit(job(seed=5), "c", 0.0)
    later = policy.submit(job(user="bob", width=128), "c", 0.0)
    for attempt in range(1, 4):
        policy.runner_up("r1", gpu("r1"), attempt)
        policy.schedule(attempt)
        (d,) = dispatches(policy)
        assert batch_ids(d) == [victim.id] and d.items[0][1] == attempt
        policy.runner_down("r1", "silent", attempt + 0.5)
    assert victim.state is JobState.failed and "gave up after 3 attempts" in victim.reason
    assert later.state is JobState.queued


def test_the_fifo_baseline_keeps_arrival_order_and_batches_only_consecutive_jobs(tmp_path):
    policy = make_policy(tmp_path, policy="fifo")
    policy.runner_up("r1", gpu("r1"), 0.0)
    policy.runner_draining("r1")
    a = [policy.submit(job(prompt=f"a{i}", user="ann"), "c", 0.0) for i in range(2)]
    x = policy.submit(job("tiny-sdxl", user="bob", priority=Priority.live), "c", 0.0)
    b = policy.submit(job(prompt="b", user="bob"), "c", 0.0)
    assert policy.queued() == [a[0].id, a[1].id, x.id, b.id]  # no priorities, no turns
    policy.state.runners["r1"].draining = False
    policy.schedule(0.0)
    (d,) = dispatches(policy)
    assert batch_ids(d) == [a[0].id, a[1].id]  # b is compatible but not consecutive


def test_estimates_learn_batch_scaling_and_scale_by_work():
    estimates = Estimates(prior_step_s=0.05)
    assert estimates.step_s("m", "gpu", 512 * 512, 2) == pytest.approx(0.1)  # the prior, by work
    estimates.observe_step("m", "gpu", 512 * 512, 1, 0.02)
    estimates.observe_step("m", "gpu", 512 * 512, 4, 0.05)
    assert estimates.step_s("m", "gpu", 512 * 512, 8) == pytest.approx(0.09)  # 0.01 s + 0.01 s per image
    # An unseen size: from the pair nearest in work (one 1024x1024 image is four 512x512 ones).
    assert estimates.step_s("m", "gpu", 1024 * 1024, 1) == pytest.approx(0.05)
    assert estimates.step_s("m", "gpu", 1024 * 1024, 2) == pytest.approx(0.1)
    assert estimates.step_s("other", "gpu", 512 * 512, 1) == pytest.approx((0.02 + 0.05 / 4) / 2)
    estimates.observe_load("m", "disk", 4.0)
    estimates.observe_load("m", "disk", 2.0)
    assert estimates.load_s("m", "disk") == pytest.approx(3.0)
    assert estimates.load_s("m", "staged") == estimates.prior_load_s["staged"]


# --------------------------------------------------------------------------- #
# Admission: what each model takes


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("changes, inputs, field", [
    (dict(kind="img2img"), {}, "image"),  # img2img needs its source
    (dict(kind="img2vid"), {"image": True}, "kind"),  # tiny-sd makes no video
    (dict(), {"mask": True}, "mask"),  # a mask means nothing to txt2img
    (dict(strength=0.5), {}, "strength"),  # nor does a strength
    (dict(frames=8), {}, "frames"),  # an image model makes no frames
    (dict(duration_s=2.0), {}, "duration_s"),
    (dict(output_format="mp4"), {}, "output_format"),
    (dict(kind="img2img"), {"image": b"not an image"}, "image"),
])
def test_admission_refuses_what_the_model_cannot_take_naming_the_field(tmp_path, changes, inputs, field):
    from atelier.jobs import JobInputs

    policy = make_policy(tmp_path)
    blobs = {name: (_png(64, 64) if value is True else value) for name, value in inputs.items()}
    with pytest.raises(Refused) as refused:
        policy.submit(job(**changes), "c", 0.0, JobInputs(**blobs) if blobs else None)
    assert refused.value.field == field, refused.value.message
    assert refused.value.code is ErrorCode.bad_request


def test_admission_fills_in_what_a_job_left_open(tmp_path):
    from atelier.jobs import JobInputs

    policy = make_policy(tmp_path)
    plain = policy.submit(job(), "c", 0.0)
    assert plain.spec.output_format == "png" and plain.spec.strength is None and plain.spec.inputs == []
    # A job that starts from an image keeps its size (in steps of 8, within the model's limits) …
    edited = policy.submit(JobSpec(model="tiny-sd", prompt="p", kind="img2img"), "c", 0.0,
                           JobInputs(image=_png(100, 77), mask=_png(100, 77)))
    assert (edited.spec.width, edited.spec.height) == (96, 72)
    assert edited.spec.strength == 0.75 and edited.spec.inputs == ["image", "mask"]
    huge = policy.submit(JobSpec(model="tiny-sd", prompt="p", kind="img2img", strength=0.3), "c", 0.0,
                         JobInputs(image=_png(2000, 64)))
    assert (huge.spec.width, huge.spec.height) == (512, 64) and huge.spec.strength == 0.3
    # … and jobs with and without a mask do not share a pipeline call.
    assert edited.key != huge.key
    assert policy.submit(job(output_format="webp"), "c", 0.0).spec.output_format == "webp"


def test_a_withdrawn_submit_leaves_no_trace(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", gpu("r1"), 0.0)
    kept = policy.submit(job(prompt="kept"), "c", 0.0)
    taken_back = policy.submit(job(prompt="taken back"), "c", 0.0, idempotency_key="k1")
    policy.withdraw(taken_back.id)
    assert policy.find(taken_back.id) is None and policy.queued() == [kept.id]
    policy.schedule(0.0)
    effects = policy.drain()
    assert all(getattr(e, "job", None) is not taken_back for e in effects)
    assert [batch_ids(d) for d in effects if isinstance(d, Dispatch)] == [[kept.id]]
    assert policy.status().counts == {"assigned": 1}  # neither queued nor counted as cancelled
    again = policy.submit(job(prompt="taken back"), "c", 0.1, idempotency_key="k1")
    assert again is not taken_back and again.state is JobState.queued  # the key is free again
    with pytest.raises(ValueError):
        policy.withdraw(kept.id)  # announced already: only a cancel takes it back now


def test_a_record_is_a_snapshot_that_later_transitions_leave_alone(tmp_path):
    from pydantic import ValidationError

    policy = make_policy(tmp_path)
    policy.runner_up("r1", gpu("r1"), 0.0)
    queued = policy.submit(job(), "c", 0.0)
    before = queued.record(0.0)
    assert queued.record(0.0) == before  # reading it changes nothing
    policy.schedule(0.0)
    assert before.state is JobState.queued and queued.record(0.5).state is JobState.assigned
    with pytest.raises(ValidationError):
        before.state = JobState.done  # wire records are frozen


def test_an_idle_runner_takes_the_next_job_rather_than_leave_it_to_a_busy_one_past_its_estimate(tmp_path):
    # A busy runner whose batch overran its estimate looks free now to the plan, like an idle one. On a tie
    # the idle one must win: else, once the overrunning runners outnumber the plan window's batches of its
    # model (1,000 runners, a window of 256 jobs), every one of them was placed on a runner still busy,
    # and the idle one (later in name order) got nothing until the queue ran dry. A window of one job
    # here stands for that.
    for policy_name in ("fair", "fifo"):
        policy = make_policy(tmp_path, policy=policy_name, max_batch=1, plan_window=1)
        policy.runner_up("r1", gpu("r1", resident={"tiny-sd": 1}), 0.0)
        policy.runner_up("r2", gpu("r2", resident={"tiny-sd": 1}), 0.0)
        for i in range(6):
            policy.submit(job(prompt=f"p{i}", seed=i), "c", 0.0)
        policy.schedule(0.0)
        policy.schedule(0.0)  # the window takes one job a plan
        started = {d.batch.runner: d for d in dispatches(policy)}
        assert set(started) == {"r1", "r2"}
        finish(policy, started["r2"], 100.0, step_s=0.01)  # r1's batch runs far past what was expected of it
        policy.schedule(100.0)
        (next_batch,) = dispatches(policy)
        assert next_batch.batch.runner == "r2", policy_name
