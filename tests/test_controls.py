"""An operator's controls on the pure policy core (atelier/scheduling/controls.py): no sockets, the time
passed in by the test."""

from __future__ import annotations

import pytest

from atelier.config import Config
from atelier.jobs import Capabilities, ErrorCode, JobState, Priority
from atelier.scheduling.controls import QUEUE_PAUSED, Controls, model_paused, model_removed
from atelier.scheduling.policy import Announce, Deliver, Policy, Refused
from tests.test_policy import batch_ids, dispatches, finish, job, make_policy


def cpu(node: str = "n1") -> Capabilities:
    return Capabilities(pid=1, node=node, device="cpu", device_name="cpu")


def announced(policy: Policy) -> dict[str, str | None]:
    """Each job announced since last drained, with the reason it was announced with (the last one)."""
    return {e.job.id: e.job.reason for e in policy.drain() if isinstance(e, Announce)}


def test_a_paused_queue_starts_nothing_says_why_and_resumes_in_the_old_order(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", cpu(), 0.0)
    policy.controls.pause(None, policy.config)
    jobs = [policy.submit(job(prompt=f"p{i}", user=u, width=64 + 8 * i), "c", 0.0)
            for i, u in enumerate(["ann", "bob", "cy"])]
    policy.schedule(0.0)
    effects = policy.drain()
    assert not [e for e in effects if not isinstance(e, Announce)]  # nothing dispatched
    assert {e.job.reason for e in effects} == {QUEUE_PAUSED}
    assert all(j.state is JobState.queued and j.reason == QUEUE_PAUSED for j in jobs)
    assert [j.position for j in jobs] == [0, 1, 2]  # their places in line, held
    assert policy.controls.resume(None)
    policy.schedule(1.0)
    effects = policy.drain()
    (started,) = [e for e in effects if not isinstance(e, Announce)]
    assert batch_ids(started) == [jobs[0].id]  # the first submitted starts first
    assert all(j.reason is None for j in jobs)
    finish(policy, started, 2.0)
    policy.schedule(2.0)
    assert batch_ids(dispatches(policy)[0]) == [jobs[1].id]


def test_a_paused_model_waits_while_another_model_runs(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", cpu(), 0.0)
    policy.controls.pause("tiny-sd", policy.config)
    held = policy.submit(job("tiny-sd"), "c", 0.0)
    other = policy.submit(job("tiny-sdxl", user="bob"), "c", 0.0)
    policy.schedule(0.0)
    (started,) = dispatches(policy)
    assert batch_ids(started) == [other.id]
    assert held.state is JobState.queued and held.reason == model_paused("tiny-sd")
    with pytest.raises(Refused) as refused:
        policy.controls.pause("no-such", policy.config)
    assert refused.value.code is ErrorCode.unknown_model and refused.value.field == "model"
    assert not policy.controls.resume("tiny-sdxl")  # not paused: nothing to do
    assert policy.controls.resume("tiny-sd")
    finish(policy, started, 1.0)
    policy.schedule(1.0)
    assert batch_ids(dispatches(policy)[0]) == [held.id]


def test_a_draining_node_finishes_its_batch_takes_nothing_new_and_is_drained_when_idle(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("a1", cpu("a"), 0.0)
    first = policy.submit(job(), "c", 0.0)
    policy.schedule(0.0)
    (running,) = dispatches(policy)
    controls = policy.controls
    assert controls.drain("a", policy.state)
    with pytest.raises(Refused):
        controls.drain("nowhere", policy.state)
    assert controls.node_states(policy.state) == {"a": "draining"}
    assert controls.newly_drained(policy.state) == []
    waiting = policy.submit(job(user="bob"), "c", 0.1)
    policy.schedule(0.1)
    assert dispatches(policy) == []
    assert "node a, drained for maintenance" in waiting.reason  # the only node that runs it
    finish(policy, running, 1.0)
    policy.schedule(1.0)
    assert dispatches(policy) == [] and first.state is JobState.done
    assert controls.node_states(policy.state) == {"a": "drained"}
    assert controls.newly_drained(policy.state) == ["a"]
    assert controls.newly_drained(policy.state) == []  # said once
    policy.runner_up("b1", cpu("b"), 1.5)  # another node: the job runs there
    policy.schedule(1.5)
    (moved,) = dispatches(policy)
    assert moved.batch.runner == "b1" and batch_ids(moved) == [waiting.id]
    assert controls.undrain("a") and not controls.undrain("a")
    assert controls.node_states(policy.state) == {"a": "serving", "b": "serving"}


def test_jobs_moved_to_the_front_start_first_in_the_order_moved_whatever_their_class(tmp_path):
    policy = make_policy(tmp_path)
    live = policy.submit(job(user="ann", priority=Priority.live, width=72), "c", 0.0)
    inter = policy.submit(job(user="bob", width=80), "c", 0.0)
    late = [policy.submit(job(user="cy", priority=Priority.batch, width=88 + 8 * i), "c", 0.0) for i in range(2)]
    policy.controls.to_front(late[1], policy.state)
    policy.controls.to_front(late[0], policy.state)
    assert policy.queued() == [late[1].id, late[0].id, live.id, inter.id]
    assert policy.controls.front(policy.state) == [late[1].id, late[0].id]
    policy.runner_up("r1", cpu(), 0.0)
    policy.schedule(0.0)
    assert batch_ids(dispatches(policy)[0]) == [late[1].id]
    with pytest.raises(Refused) as refused:
        policy.controls.to_front(late[1], policy.state)  # assigned now: not queued
    assert refused.value.code is ErrorCode.conflict and "only a queued job" in refused.value.message


def test_a_priority_change_moves_a_queued_job_into_its_new_class_and_refuses_a_started_one(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", cpu(), 0.0)
    running = policy.submit(job(width=64), "c", 0.0)
    policy.schedule(0.0)
    dispatches(policy)
    a = policy.submit(job(user="bob", width=72), "c", 0.1)
    b = policy.submit(job(user="cy", width=80, priority=Priority.batch), "c", 0.1)
    assert policy.queued() == [a.id, b.id]
    policy.controls.set_priority(b, Priority.live, policy.state)
    assert policy.queued() == [b.id, a.id] and b.spec.priority is Priority.live
    policy.controls.set_priority(b, Priority.batch, policy.state)
    assert policy.queued() == [a.id, b.id]
    with pytest.raises(Refused) as refused:
        policy.controls.set_priority(running, Priority.live, policy.state)
    assert "is assigned: only a queued job" in refused.value.message


def test_a_reload_adds_changes_and_removes_models_failing_only_the_removed_ones_queued_jobs(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", cpu(), 0.0)
    running = policy.submit(job("tiny-sdxl"), "c", 0.0)
    policy.schedule(0.0)
    (batch,) = dispatches(policy)
    queued = policy.submit(job("tiny-sdxl", user="bob"), "c", 0.1)
    kept = policy.submit(job("tiny-sd", user="cy"), "c", 0.1)
    policy.state.runners["r1"].resident["tiny-sd"] = 1
    models = dict(policy.config.models)
    del models["tiny-sdxl"]
    models["tiny-sd"] = models["tiny-sd"].model_copy(update={"default_steps": 3})
    models["extra"] = models["noop"]
    policy.drain()
    change = policy.controls.reload(policy.config, models, "tiny-sd", policy.state, 0.2)
    assert (change.added, change.changed, change.removed) == (["extra"], ["tiny-sd"], ["tiny-sdxl"])
    assert queued.state is JobState.failed and queued.reason == model_removed("tiny-sdxl")
    assert [e.job for e in policy.drain() if isinstance(e, Deliver)] == [queued]
    assert running.state is JobState.assigned and kept.state is JobState.queued  # a running one finishes
    assert "tiny-sd" not in policy.state.runners["r1"].resident  # its copy is the old entry's
    assert "extra" in policy.config.models and "tiny-sdxl" not in policy.config.models
    finish(policy, batch, 1.0, resident={"tiny-sdxl": 1})
    assert running.state is JobState.done
    policy.schedule(1.0)
    assert batch_ids(dispatches(policy)[0]) == [kept.id]


def test_a_job_of_a_removed_model_that_comes_back_to_the_queue_fails_with_the_reason(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", cpu(), 0.0)
    running = policy.submit(job("tiny-sdxl"), "c", 0.0)
    policy.schedule(0.0)
    dispatches(policy)
    models = {k: v for k, v in policy.config.models.items() if k != "tiny-sdxl"}
    policy.controls.reload(policy.config, models, "tiny-sd", policy.state, 0.1)
    policy.runner_down("r1", "killed", 0.5)  # its job goes back to the queue, for a model no longer served
    policy.schedule(0.5)
    assert running.state is JobState.failed and running.reason == model_removed("tiny-sdxl")


def test_the_settings_a_restart_keeps_come_back(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", cpu("a"), 0.0)
    jobs = [policy.submit(job(user=u, width=64 + 8 * i), "c", 0.0) for i, u in enumerate(["ann", "bob", "cy"])]
    controls = policy.controls
    controls.pause(None, policy.config)
    controls.pause("tiny-sd", policy.config)
    controls.drain("a", policy.state)
    controls.to_front(jobs[2], policy.state)
    controls.to_front(jobs[1], policy.state)
    kept = controls.settings(policy.state)
    assert kept == {"paused": True, "paused_models": ["tiny-sd"], "draining": ["a"], "front": [jobs[2].id, jobs[1].id]}
    again = make_policy(tmp_path)
    restored = [again.submit(j.spec, "c", 0.0) for j in jobs]
    again.controls = Controls()
    again.controls.restore(kept, again.state, again.config)
    assert again.queued() == [restored[2].id, restored[1].id, restored[0].id]
    assert again.controls.settings(again.state) == kept


def test_the_fifo_baseline_honours_the_front_lane_too(tmp_path):
    policy = make_policy(tmp_path, policy="fifo")
    jobs = [policy.submit(job(user=u, width=64 + 8 * i), "c", 0.0) for i, u in enumerate(["ann", "bob", "cy"])]
    policy.controls.to_front(jobs[2], policy.state)
    assert policy.queued() == [jobs[2].id, jobs[0].id, jobs[1].id]


def test_config_is_untouched_by_a_refused_pause(tmp_path):
    config = Config.model_validate({"home": str(tmp_path)})
    controls = Controls()
    with pytest.raises(Refused):
        controls.pause("nope", config)
    assert not controls.active
