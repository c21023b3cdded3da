"""The runner's watchdog: a pipeline that stops making steps costs its job an attempt, not the
runner: the runner hands the job back and exits, its node starts a fresh one, and work goes on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from atelier.jobs import JobSpec, JobState
from tests.conftest import Cluster, run

pytestmark = pytest.mark.timeout(180)


def test_a_stuck_step_restarts_the_runner_and_fails_the_job_that_always_hangs(atelier_home: Path,
                                                                             tmp_path: Path) -> None:
    config = tmp_path / "atelier.toml"
    # The broker's own verdict on a silent peer (three heartbeats) is not what this tests: at 3 s a heartbeat,
    # a loaded machine cannot make it come before the runner's watchdog (1.5 s) and hide the watchdog's reason.
    config.write_text('default_model = "fine"\n'
                      '[broker]\nheartbeat_s = 3.0\n'
                      '[node]\nstep_timeout_s = 1.5\n'
                      '[scheduler]\nmax_attempts = 2\n'
                      '[models.stuck]\nfamily = "noop"\nsource = "builtin:noop"\n'
                      'options = { hang_after_steps = 2 }\n'
                      '[models.fine]\nfamily = "noop"\nsource = "builtin:noop"\n')
    cluster = Cluster(atelier_home, config).start()
    try:
        first_runner = cluster.pid_of(b"actors.runner")

        async def go():
            async with cluster.client() as client:
                stuck = await client.generate(JobSpec(model="stuck", prompt="hangs", width=64, height=64,
                                                      steps=4), timeout=120)
                fine = await client.generate(JobSpec(model="fine", prompt="runs", width=64, height=64, steps=4),
                                             timeout=60)
                return stuck, fine

        stuck, fine = run(go(), timeout=150)
        assert stuck.job.state is JobState.failed and stuck.job.attempts == 2
        assert re.search(r"no progress for \d+s \(a stuck step\): .* was restarted", stuck.job.reason), stuck.job.reason
        assert fine.job.state is JobState.done and fine.outputs, fine.job.reason  # a fresh runner took the next job
        assert cluster.pid_of(b"actors.runner") != first_runner
    finally:
        cluster.stop()
