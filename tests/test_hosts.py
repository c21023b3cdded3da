"""atelier across separate hosts: the broker and scheduler on one, a node on each of two others, a client on
a fourth, each a network namespace with its own address on one switch (tests/netns.py), CURVE on, every
key made with `atelier keys` and bound to its role. Started once for the module, the way the README's
"A node on another machine" says to; then faults between the hosts, mid-job: a node's cable pulled for
20 s, 30% of its packets lost, a node host gone for good. What is asserted is what the client sees: each
job ends done, its result arrives once, its attempts count what ran.

The client runs in this process, on a thread that lives in the client host's namespace (netns.HostLoop);
every other part is its own process, started on its host with `ip netns exec`. Skipped, with the reason,
only where namespaces cannot be made (not root, no `ip`): `make test` installs iproute2 where it is missing.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from actors import keys
from actors.actor import RemoteError, handles
from actors.messages import JobEvent, JobResult, Preview, Progress
from atelier.config import read_config
from atelier.jobs import JobSpec, JobState
from frontends.client import AtelierClient
from tests import netns
from tests.catalog import CM_PROFILE
from tests.conftest import READY, ROOT

UNAVAILABLE = netns.unavailable()
pytestmark = [pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""), pytest.mark.timeout(240)]

BROKER_ADDRESS = "10.77.0.1"
ROUTER = f"tcp://{BROKER_ADDRESS}:5555"
PUB = f"tcp://{BROKER_ADDRESS}:5556"
NODES = {"gpu1": 11, "gpu2": 12}  # node name (and host) -> the last byte of its address
LINK_DOWN_S = 20.0
# The "slow" model sleeps its steps (the cost-model family): a job of SLOW_STEPS lasts about 8 s on any
# machine, long enough that a fault lands mid-job and the other node redoes it well within a test.
STEP_S = 0.5
SLOW_STEPS = 16


def _catalog(slow: Path, default: str) -> str:
    # The default model is the one a node gets ready as it starts (its loader stages it, its runner imports
    # the family). gpu1's is tiny-sd, so the first test's job finds it ready there (placement follows what
    # is staged) and its build and torch import overlap the start; gpu2's, the torch-free cost model, so only
    # one process imports torch and diffusers (most of a minute each, on two busy cores).
    return (f'default_model = "{default}"\n'
            f'[models.tiny-sd]\nfamily = "sd1"\nsource = "builtin:tiny-sd"\ndefault_width = 64\ndefault_height = 64\n'
            'default_steps = 4\n'
            f'[models.slow]\nfamily = "costmodel"\nsource = "{slow}"\ndefault_width = 64\ndefault_height = 64\n'
            f"default_steps = {SLOW_STEPS}\n")


def _broker_section(keys: Path, peer_key: str, *, pub: bool = True) -> str:
    return (f'[broker]\nrouter = "{ROUTER}"\n' + (f'pub = "{PUB}"\n' if pub else "")
            + f'curve = true\nkeys = "{keys}"\npeer_key = "{peer_key}"\n')


def _atelier(*args: str) -> list[str]:
    return [sys.executable, "-m", "frontends.cli", *args]


@dataclass
class Story:
    """What the client saw of one job: its events in order, ending with its result."""

    job_id: str
    events: list = field(default_factory=list)
    running: asyncio.Event = field(default_factory=asyncio.Event)  # a step was reported while running
    task: asyncio.Task | None = None

    def runners(self) -> list[str]:
        return [e.runner for e in self.events if isinstance(e, JobEvent) and e.state is JobState.running]

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


class Fleet:
    """The hosts and what runs on them, and the client on its host with what it was sent."""

    def __init__(self, switch: netns.Switch, folder: Path, home: Path):
        self.switch, self.folder, self.home = switch, folder, home
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.broker = switch.host("broker", 1)
        self.nodes = {name: switch.host(name, last) for name, last in NODES.items()}
        self.client_host = switch.host("client", 21)
        self.configs: dict[str, Path] = {}
        self._make_keys_and_configs()
        self.loop: netns.HostLoop | None = None
        self.client = None

    def _make_keys_and_configs(self) -> None:
        """As the README says: every pair made on the broker's host with `atelier keys`, then each host
        given broker.key and its own pair, and nothing else (the authorized folder stays with the broker)."""
        from atelier.families.costmodel import write_model

        slow = write_model(self.folder / "slow", {**CM_PROFILE, "step_s": {"64": [STEP_S] * 4}})
        catalog = _catalog(slow, "slow")
        made = self.folder / "broker" / "keys"
        for args in (("--role", "scheduler", "--name", "sched"), ("--role", "node", "--name", "gpu1"),
                     ("--role", "node", "--name", "gpu2"), ("--role", "frontend", "--name", "laptop")):
            done = subprocess.run(_atelier("keys", "--dir", str(made), *args), cwd=ROOT, env=self.env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        for role in ("broker", *NODES, "client"):
            (self.folder / role / "home").mkdir(parents=True, exist_ok=True)
        self.configs["broker"] = self._config("broker", catalog + _broker_section(made, "sched"))
        for name in NODES:
            keys = self._copy_keys(made, name, name)
            self.configs[name] = self._config(name, _catalog(slow, "tiny-sd" if name == "gpu1" else "slow")
                                              + _broker_section(keys, name, pub=False)
                                              + f'[node]\nname = "{name}"\ndevices = ["cpu"]\n')
        keys = self._copy_keys(made, "client", "laptop")
        self.configs["client"] = self._config("client", _broker_section(keys, "laptop"))

    def _copy_keys(self, made: Path, host: str, pair: str) -> Path:
        keys = self.folder / host / "keys"
        keys.mkdir(mode=0o700)
        for name in ("broker.key", f"{pair}.key", f"{pair}.key_secret"):
            shutil.copy2(made / name, keys / name)
        return keys

    def _config(self, host: str, text: str) -> Path:
        path = self.folder / host / "atelier.toml"
        path.write_text(text)
        return path

    def host_env(self, host: str) -> dict[str, str]:
        # The nodes' home is the session's model cache: tiny-sd is built once for the whole run (by the
        # first loader to need it, if no other test has), as a real node keeps its models on its own disk.
        home = self.home if host in NODES else self.folder / host / "home"
        return {**self.env, "ATELIER_HOME": str(home)}

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    # -- starting ------------------------------------------------------------- #

    def start(self) -> None:
        """The broker (bound to its host's own address, read back from its ready line), the scheduler,
        then a node on each node host, as `atelier broker`, `atelier scheduler`, `atelier node`. The broker's
        host lets in what the README's firewall does: 5555 from the nodes and the client, 5556 from the client."""
        self.firewalled = self.broker.firewall({5555: [h.address for h in (*self.nodes.values(), self.client_host)],
                                                5556: [self.client_host.address]})
        broker = self.broker.start(_atelier("broker", "--config", str(self.configs["broker"])),
                                   env=self.host_env("broker"), log=self.log("broker"), stdout=subprocess.PIPE,
                                   text=True)
        line = broker.stdout.readline() if broker.stdout else ""
        assert line.startswith(READY), f"the broker did not start:\n{self.log('broker').read_text()[-3000:]}"
        self.bound = line[len(READY):]
        self.broker.start(_atelier("scheduler", "--config", str(self.configs["broker"]),
                                   "--journal", str(self.folder / "broker" / "journal.sqlite3")),
                          env=self.host_env("broker"), log=self.log("scheduler"))
        for name, host in self.nodes.items():
            host.start(_atelier("node", "--router", ROUTER, "--config", str(self.configs[name])),
                       env=self.host_env(name), log=self.log(name))
        self.loop = netns.HostLoop(self.client_host)
        self.client = self.loop.run(self._connect(), 60)
        self.wait_for(lambda s: {f"runner-{n}-cpu" for n in NODES} <= {r.name for r in s.runners}
                      and set(NODES) <= {loader.node for loader in s.loaders}, timeout=120)

    async def _connect(self):
        client = DeliveryCounter(ROUTER, PUB, keys=keys.for_peer(read_config(self.configs["client"])),
                                 name="laptop-client")
        await client.start(timeout=30)
        return client

    def stop(self) -> None:
        if self.loop is not None:
            if self.client is not None:
                try:
                    self.loop.run(self.client.close(drain_timeout=1), 15)
                except Exception:  # the hosts go regardless
                    pass
            self.loop.close()
        for host in [*self.nodes.values(), self.broker]:
            host.stop()
        # A node killed with its host leaves its staged weights in /dev/shm (a loader removes those of dead
        # loaders of its own node as it starts, and these nodes never start again).
        for name in NODES:
            for segment in Path("/dev/shm").glob(f"atelier-{name}-*"):
                pid = segment.name.split("-")[2]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    segment.unlink(missing_ok=True)

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-5000:]}"
                         for path in sorted(self.folder.glob("*.log")))

    # -- the client's side ------------------------------------------------------ #

    def status(self):
        return self.loop.run(self.client.status(), 15)

    def wait_for(self, predicate, timeout: float):
        """The cluster's status once ``predicate`` holds of it (asked every 0.2 s); AssertionError after ``timeout``."""
        async def poll():
            while True:
                try:
                    status = await self.client.status()
                    if predicate(status):
                        return status
                except (asyncio.TimeoutError, RemoteError):
                    pass
                await asyncio.sleep(0.2)

        try:
            return self.loop.run(poll(), timeout)
        except TimeoutError:
            raise AssertionError(f"not seen within {timeout:.0f}s\n{self.logs()}") from None

    def submit(self, spec) -> Story:
        async def go() -> Story:
            story = Story(spec.id)
            await self.client.submit(spec)
            story.task = asyncio.create_task(self._follow(story))
            return story

        return self.loop.run(go(), 30)

    async def _follow(self, story: Story):
        running = False
        async for event in self.client.events(story.job_id):
            story.events.append(event)
            if isinstance(event, JobEvent):
                running = event.state is JobState.running
            elif isinstance(event, Progress) and running:
                story.running.set()
            elif isinstance(event, JobResult):
                return event

    def running_on(self, story: Story, timeout: float = 60) -> str:
        """The runner ``story``'s job is making steps on, once it is (mid-job)."""
        try:
            self.loop.run(story.running.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"job {story.job_id} did not start within {timeout:.0f}s\n{self.logs()}") from None
        return story.runners()[-1]

    def result(self, story: Story, timeout: float = 90):
        async def go():
            return await asyncio.shield(story.task)

        try:
            return self.loop.run(go(), timeout)
        except TimeoutError:
            raise AssertionError(f"job {story.job_id} had no result within {timeout:.0f}s\n{self.logs()}") from None

    def explain(self, story: Story) -> str:
        """What the client saw of the job, and the hosts' logs: the message of an assertion about it."""
        seen = [(type(e).__name__, getattr(e, "state", None), getattr(e, "runner", None), getattr(e, "attempt", None))
                for e in story.events if not isinstance(e, (Progress, Preview))]
        return f"job {story.job_id}: {seen}\n{self.logs()}"

    def job(self, job_id: str):
        return self.loop.run(self.client.job(job_id), 15)

    def node_of(self, runner: str) -> netns.Host:
        return self.nodes[runner.removeprefix("runner-").rpartition("-")[0]]


class DeliveryCounter(AtelierClient):
    """The client, counting each JobResult the scheduler sends it (a fetch it asked for itself is not one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delivered: Counter[str] = Counter()

    @handles(JobResult)
    async def on_result(self, msg: JobResult, env) -> None:
        if env is not None:
            self.delivered[msg.job.spec.id] += 1
        await super().on_result(msg, env)


@pytest.fixture(scope="module")
def fleet(atelier_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """The hosts, made and started once for the module; deleted, with every process on them, however it ends.
    Their logs stay in the module's temporary folder (pytest keeps the last few)."""
    with netns.switch() as switch:
        made = Fleet(switch, tmp_path_factory.mktemp("hosts"), atelier_home)
        try:
            made.start()
            yield made
        finally:
            made.stop()


def _slow(prompt: str, steps: int = SLOW_STEPS):
    return JobSpec(model="slow", prompt=prompt, user="laptop", steps=steps, seed=1)


def _both_nodes_serve(fleet: Fleet, prompt: str) -> list[Story]:
    """Two short jobs at once (their steps differ: not one batch) run one on each node."""
    stories = [fleet.submit(_slow(prompt, steps=3)), fleet.submit(_slow(prompt, steps=4))]
    results = [fleet.result(s, timeout=60) for s in stories]
    assert all(r.job.state is JobState.done for r in results), fleet.explain(stories[0])
    assert {r.job.runner for r in results} == {f"runner-{n}-cpu" for n in NODES}, fleet.explain(stories[0])
    return stories


def _once(fleet: Fleet, *stories: Story) -> None:
    """Each job's result came once: on the wire (what the scheduler sent) and in the client's stream."""
    for story in stories:
        assert fleet.client.delivered[story.job_id] == 1, (story.job_id, fleet.client.delivered)
        assert len(story.of(JobResult)) == 1


def test_a_job_from_the_client_host_runs_on_a_node_host_with_progress_and_previews(fleet):
    assert f'"router": "{ROUTER}"' in fleet.bound  # the host's own address, not loopback, not 0.0.0.0
    story = fleet.submit(JobSpec(model="tiny-sd", prompt="a lighthouse across the wire", user="laptop", steps=6,
                                 seed=3))
    result = fleet.result(story)
    assert isinstance(result, JobResult) and result.job.state is JobState.done, result.job.reason
    assert result.job.runner in {f"runner-{n}-cpu" for n in NODES}
    image = Image.open(io.BytesIO(result.outputs[0].data))
    assert image.format == "PNG" and image.size == (64, 64)
    steps = [e.step for e in story.of(Progress)]
    assert steps == sorted(steps) and steps[-1] == 6
    previews = story.of(Preview)
    assert previews and bytes(previews[0].image[:2]) == b"\xff\xd8"  # JPEG frames from the node's host
    _once(fleet, story)

    # `atelier status` on the client's host, as the README has it: both nodes joined.
    shown = fleet.client_host.run(_atelier("status", "--config", str(fleet.configs["client"])),
                                  env=fleet.host_env("client"), timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "runner-gpu1-cpu" in shown.stdout and "runner-gpu2-cpu" in shown.stdout


def test_a_node_cut_off_for_20s_rejoins_and_nothing_is_lost_or_delivered_twice(fleet):
    story = fleet.submit(_slow("cut off"))
    first = fleet.running_on(story)
    cut = fleet.node_of(first)
    cut.cable(False)
    pulled = time.monotonic()
    try:
        result = fleet.result(story, timeout=LINK_DOWN_S + 40)
        # The fault lasts its 20 s whatever the job did meanwhile: the node's own report, made during the
        # partition, comes when the cable is back.
        time.sleep(max(0.0, LINK_DOWN_S - (time.monotonic() - pulled)))
    finally:
        cut.cable(True)
    assert result.job.state is JobState.done, fleet.explain(story)
    # Given up on, then run on the other node: two attempts.
    assert result.job.runner != first and result.job.attempts == 2, fleet.explain(story)
    assert story.runners()[0] == first and story.runners()[-1] == result.job.runner

    # It rejoins: its runner and loader are back, idle (its batch of the job reconciled away).
    fleet.wait_for(lambda s: any(r.name == first and r.job is None for r in s.runners)
                   and cut.role in {loader.node for loader in s.loaders}, timeout=60)
    # Both nodes take work again: two jobs at once (steps differ: not one batch) run one on each.
    again = _both_nodes_serve(fleet, "after the partition")
    # The cut node's late word on the first job changed nothing: it stays done, once, by the other node.
    record = fleet.job(story.job_id)
    assert record.state is JobState.done and record.runner == result.job.runner and record.attempts == 2
    _once(fleet, story, *again)


def test_jobs_complete_through_30_percent_packet_loss(fleet):
    resent = sum(host.tcp_resent() for host in fleet.nodes.values())
    try:
        for host in fleet.nodes.values():
            host.lose(30)
    except netns.LossUnavailable as exc:
        pytest.skip(str(exc))
    try:
        stories = [fleet.submit(_slow(f"through the noise {i}", steps=6 + i)) for i in range(4)]
        results = [fleet.result(s, timeout=120) for s in stories]
    finally:
        for host in fleet.nodes.values():
            host.lossless()
    assert sum(host.tcp_resent() for host in fleet.nodes.values()) > resent  # the loss was real: TCP sent again
    for story, result in zip(stories, results, strict=True):
        assert result.job.state is JobState.done, fleet.explain(story)
        assert story.of(Progress)  # events are lossy by design, but TCP carries them through 30% loss
    # Once the loss ends, both nodes serve at once (a connection still backed off would show here).
    _once(fleet, *stories, *_both_nodes_serve(fleet, "after the loss"))


def test_a_node_host_that_is_gone_has_its_job_run_on_the_other(fleet):
    # Half a slow job: the host goes after its first step, and the other node's run of it is what the test waits.
    story = fleet.submit(_slow("the host goes", steps=SLOW_STEPS // 2))
    first = fleet.running_on(story)
    gone = fleet.node_of(first)
    gone.delete()  # every process on it killed, then its namespace (and its cable) deleted
    result = fleet.result(story, timeout=60)
    assert result.job.state is JobState.done, fleet.explain(story)
    assert result.job.runner != first and result.job.attempts == 2, fleet.explain(story)
    status = fleet.wait_for(lambda s: first not in {r.name for r in s.runners}, timeout=30)
    assert gone.role not in {loader.node for loader in status.loaders}
    _once(fleet, story)
