"""Training jobs on the pure policy core: admission, batch priority, making way for waiting jobs,
checkpoints, the fair share's charge, and users' trained LoRAs resolved by name."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from atelier.jobs import JobDone, JobFailed, JobInputs, JobKind, JobSpec, JobState, LoraInfo, Priority, TrainSpec
from atelier.scheduling.policy import Dispatch, Refused, StopRunning
from tests.test_policy import dispatches, gpu, job, make_policy


def _png(side: int = 32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (120, 40, 200)).save(out, format="PNG")
    return out.getvalue()


IMAGES = JobInputs(train_images=[_png(), _png()])


def training(user: str = "ann", model: str = "tiny-sd", **settings) -> JobSpec:
    settings.setdefault("steps", 100)
    return JobSpec(kind=JobKind.train, model=model, prompt="a photo of sks cube", user=user,
                   train=TrainSpec(name=settings.pop("name", "cube"), resolution=64, **settings))


def _refusal(policy, spec: JobSpec, inputs: JobInputs | None = IMAGES) -> Refused:
    with pytest.raises(Refused) as refused:
        policy.submit(spec, "c", 0.0, inputs)
    return refused.value


def test_a_training_is_checked_at_admission_and_queued_as_batch_work_alone(tmp_path):
    policy = make_policy(tmp_path)
    assert _refusal(policy, training(), None).field == "train_images"
    assert _refusal(policy, training(captions=["a", "b", "c"])).field == "train.captions"
    assert _refusal(policy, training(class_images=4)).field == "train.class_prompt"
    assert "does not do train" in _refusal(policy, training(model="tiny-sd3")).message  # SD3: no trainer
    assert _refusal(policy, training(), JobInputs(train_images=[_png()], image=_png())).field == "image"
    assert _refusal(policy, JobSpec(kind=JobKind.train, model="tiny-sd", prompt="p"), IMAGES).field == "train"
    assert _refusal(policy, job(), IMAGES).field == "train_images"  # a generation takes no instance images
    broken = JobInputs(train_images=[_png(), b"\x89PNG\r\n\x1a\n not really"])
    assert _refusal(policy, training(), broken).field == "train_images/1"

    first = policy.submit(training().model_copy(update={"priority": Priority.interactive}), "c", 0.0, IMAGES)
    second = policy.submit(training(name="other"), "c", 0.0, IMAGES)
    assert first.spec.priority is Priority.batch  # whatever was asked
    assert (first.spec.width, first.spec.height) == (64, 64)
    policy.runner_up("r1", gpu("r1"), 0.0)
    policy.runner_up("r2", gpu("r2"), 0.0)
    policy.schedule(0.0)
    assert sorted(len(d.items) for d in dispatches(policy)) == [1, 1]  # never two trainings in one call
    assert first.key != second.key


def _running_training(policy) -> tuple[Dispatch, object]:
    policy.runner_up("r1", gpu("r1"), 0.0)
    train = policy.submit(training(steps=100), "c", 0.0, IMAGES)
    policy.schedule(0.0)
    (dispatch,) = dispatches(policy)
    policy.batch_update("r1", dispatch.batch.id, JobState.running, 0.1)
    policy.drain()
    return dispatch, train


def test_an_interactive_job_waiting_asks_the_training_to_make_way_and_the_training_resumes_after(tmp_path):
    policy = make_policy(tmp_path)
    dispatch, train = _running_training(policy)
    policy.submit(job(user="bob", width=128, priority=Priority.batch), "c", 1.0)
    policy.schedule(1.0)
    assert not [e for e in policy.drain() if isinstance(e, StopRunning)]  # batch work waits its turn

    waiting = policy.submit(job(user="cy"), "c", 2.0)
    policy.schedule(2.0)
    (pause,) = [e for e in policy.drain() if isinstance(e, StopRunning)]
    assert pause.pause and pause.job_id == train.id and waiting.id in pause.reason
    policy.schedule(2.1)
    assert not [e for e in policy.drain() if isinstance(e, StopRunning)]  # asked once

    # It checkpointed at step 30 on its way out.
    assert policy.checkpointed("r1", train.id, "file:///c/30", 30) is None
    cost = train.entry.cost
    policy.batch_done("r1", dispatch.batch.id, [JobFailed(job_id=train.id, reason="paused at step 30", yielded=True,
                                                         retryable=True)], {}, _timing(), 3.0)
    # Queued again, no attempt counted; its owner keeps the charge for the 30 steps it ran, and its next
    # start is charged for the 70 left.
    assert train.state is JobState.queued and train.attempts == 0 and train.entry.cost == pytest.approx(cost * 0.7)
    policy.schedule(3.0)
    (first,) = dispatches(policy)
    assert [spec.id for spec, *_ in first.items] == [waiting.id]  # the waiting job takes the device
    policy.batch_done("r1", first.batch.id, [JobDone(job_id=waiting.id, outputs=[], elapsed_s=0.1)], {}, _timing(),
                      4.0)
    policy.schedule(4.0)
    (then,) = dispatches(policy)  # bob's batch job: bob has had none of the batch share yet, ann 30 steps
    assert then.items[0][0].user == "bob"
    policy.batch_done("r1", then.batch.id, [JobDone(job_id=then.items[0][0].id, outputs=[], elapsed_s=0.1)], {},
                      _timing(), 5.0)
    policy.schedule(5.0)
    (resumed,) = dispatches(policy)
    assert resumed.items[0][0].id == train.id and resumed.items[0][3] == "file:///c/30"  # with its checkpoint
    assert train.attempts == 1


def _timing():
    from atelier.jobs import RunTiming

    return RunTiming(images=1)


def test_checkpoints_are_kept_newest_only_and_only_from_the_runner_that_has_the_job(tmp_path):
    policy = make_policy(tmp_path)
    _, train = _running_training(policy)
    assert policy.checkpointed("r1", train.id, "file:///c/10", 10) is None
    assert policy.checkpointed("r1", train.id, "file:///c/20", 20) == "file:///c/10"  # the older: delete it
    assert policy.checkpointed("r2", train.id, "file:///x/30", 30) == "file:///x/30"  # not r2's: ignored
    assert policy.checkpointed("r1", train.id, "file:///c/15", 15) == "file:///c/15"  # older than what it has
    record = train.record(0.0)
    assert (record.checkpoint, record.trained_steps) == ("file:///c/20", 20)


def _lora(owner: str, name: str, model: str = "tiny-sd", version: str = "0123456789abcdef", **kw) -> LoraInfo:
    return LoraInfo(name=name, owner=owner, model=model, version=version, job_id="j1", created_at=0.0, **kw)


def test_a_trained_lora_is_its_owners_by_name_and_others_only_when_shared(tmp_path):
    policy = make_policy(tmp_path)
    policy.loras.put(_lora("ann", "cube"))
    mine = policy.submit(job(user="ann", loras={"cube": 0.8}), "c", 0.0)
    assert mine.spec.loras == {"@0123456789abcdef": 0.8}  # resolved to its unique reference
    refused = _refusal(policy, job(user="bob", loras={"@ann/cube": 1.0}), None)
    missing = _refusal(policy, job(user="bob", loras={"@ann/nothing": 1.0}), None)
    # Someone else's unshared LoRA is refused as one that does not exist: nothing said of it.
    assert refused.field == "loras" and refused.message.replace("@ann/cube", "X") == \
        missing.message.replace("@ann/nothing", "X")
    assert "@0123456789abcdef" in _refusal(policy, job(user="bob", loras={"@0123456789abcdef": 1.0}), None).message

    policy.loras.put(_lora("ann", "cube", shared_with=["bob"]))
    lent = policy.submit(job(user="bob", loras={"@ann/cube": 1.0}), "c", 0.0)
    assert lent.spec.loras == {"@0123456789abcdef": 1.0}
    assert "trained on tiny-sd" in _refusal(policy, job(model="tiny-sdxl", user="ann", loras={"cube": 1}), None).message

    policy.loras.put(_lora("ann", "cube", version="fedcba9876543210"))  # trained again: a new version
    assert policy.loras.by_ref("@0123456789abcdef") is None
    again = policy.submit(job(user="ann", loras={"cube": 1.0}), "c", 0.0)
    assert again.spec.loras == {"@fedcba9876543210": 1.0} and again.key != mine.key
