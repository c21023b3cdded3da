"""A job's sampler and noise schedule: checked against its model's family, and the runner's model switching
to the sampler's diffusers scheduler for the call and back to its own after."""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest

from atelier import samplers
from atelier.families.base import GenerateRequest
from atelier.jobs import ErrorCode, JobSpec
from atelier.scheduling.admission import Refused
from tests.test_policy import make_policy


def test_every_sampler_and_schedule_is_a_diffusers_scheduler_with_those_settings():
    for kind, table in samplers.TABLES.items():
        for name in table:
            for schedule in samplers.schedules_of(name, kind):
                class_name, settings = samplers.scheduler_settings(name, schedule, kind)
                accepted = inspect.signature(getattr(diffusers, class_name).__init__).parameters
                assert set(settings) <= set(accepted), (name, schedule, settings)


@pytest.mark.parametrize("model, changes, field, says", [
    ("tiny-sd", dict(sampler="euler_a", schedule="karras"), "schedule", "euler_a takes default, trailing"),
    ("tiny-sd", dict(schedule="karras"), "schedule", "name the sampler"),
    ("tiny-flux", dict(sampler="dpm++2m"), "sampler", "flux models take euler"),
    ("tiny-stable-audio", dict(kind="txt2audio", sampler="euler"), "sampler", "their own scheduler only"),
])
def test_a_sampler_the_family_cannot_run_is_refused_naming_it(tmp_path, model, changes, field, says):
    policy = make_policy(tmp_path)
    with pytest.raises(Refused) as refused:
        policy.submit(JobSpec(model=model, prompt="p", **changes), "c", 0.0)
    assert refused.value.code is ErrorCode.bad_request and refused.value.field == field
    assert says in refused.value.message


def test_jobs_with_different_samplers_never_share_a_call(tmp_path):
    policy = make_policy(tmp_path)
    plain = policy.submit(JobSpec(model="tiny-sd", prompt="p"), "c", 0.0)
    karras = policy.submit(JobSpec(model="tiny-sd", prompt="p", sampler="dpm++2m", schedule="karras"), "c", 0.0)
    same = policy.submit(JobSpec(model="tiny-sd", prompt="q", sampler="dpm++2m", schedule="karras"), "c", 0.0)
    assert plain.key != karras.key and karras.key == same.key


def _call(sampler=None, schedule=None, steps=3) -> GenerateRequest:
    return GenerateRequest(prompts=("a red cube",), negative_prompts=(None,), seeds=(7,), width=64, height=64,
                           steps=steps, guidance=5.0, sampler=sampler, schedule=schedule)


def test_a_call_runs_with_its_sampler_and_the_next_without_one_gets_the_models_own(tiny_model):
    family, model, _ = tiny_model("tiny-sd")
    own_class = type(model.pipe.scheduler)
    first = np.asarray(model.generate(_call(), lambda *_: None)[0])
    karras = np.asarray(model.generate(_call("dpm++2m", "karras"), lambda *_: None)[0])
    scheduler = model.pipe.scheduler
    assert type(scheduler) is diffusers.DPMSolverMultistepScheduler and scheduler.config.use_karras_sigmas
    assert not np.array_equal(first, karras)  # the sampler changed the picture the same seed makes
    again = np.asarray(model.generate(_call(), lambda *_: None)[0])
    assert type(model.pipe.scheduler) is own_class
    assert np.array_equal(first, again)  # and the model's own scheduler came back as it was


def test_a_flow_matching_model_takes_euler_with_a_karras_schedule(tiny_model):
    _, model, _ = tiny_model("tiny-flux")
    images = model.generate(_call("euler", "karras", steps=2), lambda *_: None)
    assert images[0].size == (64, 64) and model.pipe.scheduler.config.use_karras_sigmas
    model.generate(_call(steps=2), lambda *_: None)
    assert not model.pipe.scheduler.config.get("use_karras_sigmas")
