"""Jobs through process deaths: every accepted job ends, and each shows once.

It starts atelier as a user does (``atelier up``: broker, scheduler, a node with its loader and
runner, the HTTP frontend) and four client processes that submit jobs of the ``noop`` model
(atelier's own paths, no diffusion) at a steady pace and wait for their results. Meanwhile a
seeded schedule SIGKILLs one process at a time (every role at least once: broker, scheduler,
loader, runner, node, HTTP frontend, and a client) at a random moment; ``atelier up`` and the
node start their parts again, and this script starts a killed client again.

A client is what a frontend must be for this to hold: it submits with an idempotency key (a
retry after a timeout or a restart never makes a second job), notes what it submitted and what
it has shown in its own file (a frontend's state, kept across its restarts), and shows a result
only once. The system's side: the journal keeps accepted jobs through a scheduler's death, the
runner keeps a result until the scheduler has it, and clients ask again for results they missed.

After each kill a probe job (live priority, so it does not wait behind the queue) measures how
long until the system serves again: ``recover_s``.

    python bench/chaos.py [--jobs 200] [--clients 4] [--seed 7] [--kills 10]

Last line: ``RESULT accepted=… done=… failed=… lost=… duplicated=… recover_p95_s=…``.
lost: accepted and never shown; duplicated: shown as final more than once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root
sys.path.insert(0, str(REPO / "bench"))

from overhead import System, percentile  # noqa: E402

from actors.actor import RemoteError  # noqa: E402
from atelier.jobs import ErrorCode, JobSpec, JobState, Priority  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402

ROLES = {  # a role, and the module its process runs (`python -m ...`)
    "broker": "broker", "scheduler": "actors.scheduler", "loader": "actors.loader", "runner": "actors.runner",
    "node": "gpu_node", "http": "frontends.http", "client": None,
}
STEPS, STEP_S = 4, 0.05  # a job: 0.2 s of "work" on the runner
CONFIG = f"""\
default_model = "noop"
[models.noop]
family = "noop"
source = "builtin:noop"
options = {{ step_s = {STEP_S} }}
[node]
resident_models = 1
[scheduler]
max_attempts = 5
"""


# --------------------------------------------------------------------------- #
# a client process


def read_state(path: Path) -> tuple[dict[str, str], dict[str, list[dict]], dict[str, str]]:
    """What a client noted: key -> job id, job id -> each time it was shown, key -> refusal."""
    submitted: dict[str, str] = {}
    shown: dict[str, list[dict]] = collections.defaultdict(list)
    refused: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                note = json.loads(line)
            except ValueError:
                continue  # half a line: the process died writing it
            if "submitted" in note:
                submitted[note["submitted"]] = note["job"]
            elif "shown" in note:
                shown[note["shown"]].append(note)
            elif "refused" in note:
                refused[note["refused"]] = note["reason"]
    return submitted, shown, refused


async def client_main(index: int, jobs: int, pace_s: float, router: str, pub: str, state_path: Path) -> None:
    submitted, shown, refused = read_state(state_path)
    notes = open(state_path, "a")

    def note(**fields) -> None:
        notes.write(json.dumps(fields) + "\n")
        notes.flush()  # in the OS's hands: a SIGKILL of this process loses none of it

    async with AtelierClient(router, pub, heartbeat_s=0.5) as client:
        async def one(n: int) -> None:
            key = f"client{index}-job{n}"
            if key in refused:
                return
            job_id = submitted.get(key)
            while job_id is None:
                spec = JobSpec(model="noop", prompt=f"chaos {key}", user=f"user{index}", steps=STEPS, width=64,
                               height=64, seed=n)
                try:
                    record = await client.submit(spec, timeout=2.0, attempts=1, events=False, idempotency_key=key)
                except asyncio.TimeoutError:
                    continue  # the broker or the scheduler is restarting: the same key again
                except RemoteError as exc:
                    if exc.error.code in (ErrorCode.unroutable, ErrorCode.not_registered, ErrorCode.busy):
                        await asyncio.sleep(0.2)
                        continue
                    if exc.error.code is ErrorCode.queue_full:
                        await asyncio.sleep(exc.error.retry_after_s or 1.0)
                        continue
                    note(refused=key, reason=str(exc))
                    return
                job_id = record.spec.id
                note(submitted=key, job=job_id)
            if job_id in shown:
                return  # shown before this process was killed: never again
            while True:
                try:
                    result = await client.wait(job_id, timeout=20)
                    break
                except asyncio.TimeoutError:
                    with contextlib.suppress(RemoteError, asyncio.TimeoutError):
                        if await client.fetch_result(job_id) is not None:
                            continue
            note(shown=job_id, key=key, state=result.job.state.value, reason=result.job.reason, t=time.time())

        tasks = []
        for n in range(jobs):
            tasks.append(asyncio.create_task(one(n)))
            await asyncio.sleep(pace_s)
        await asyncio.gather(*tasks)


# --------------------------------------------------------------------------- #
# the run


class Clients:
    """The client processes, each with its state file; a killed one is started again."""

    def __init__(self, count: int, jobs: int, pace_s: float, system: System, folder: Path):
        self.count, self.jobs, self.pace_s, self.system, self.folder = count, jobs, pace_s, system, folder
        self.procs: dict[int, subprocess.Popen] = {}

    def state(self, index: int) -> Path:
        return self.folder / f"client-{index}.jsonl"

    def start(self, index: int) -> None:
        self.procs[index] = subprocess.Popen(
            [sys.executable, __file__, "--client", str(index), "--jobs", str(self.jobs), "--pace", str(self.pace_s),
             "--router", self.system.router, "--pub", self.system.pub, "--state", str(self.state(index))],
            cwd=REPO, stderr=open(self.folder / f"client-{index}.log", "a"))

    def kill(self, rng: random.Random) -> int:
        index = rng.choice(sorted(i for i, p in self.procs.items() if p.poll() is None) or sorted(self.procs))
        self.procs[index].kill()
        self.procs[index].wait()
        self.start(index)
        return index

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs.values())


def pid_of(system: System, module: str) -> int | None:
    for pid in system.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in argv:
            return pid
    return None


async def probe(client: AtelierClient, name: str, timeout: float = 120.0) -> float:
    """Seconds until a live-priority job submitted now is done: the system serves again."""
    started = time.monotonic()
    spec = JobSpec(model="noop", prompt=f"probe {name}", user="probe", steps=1, width=64, height=64,
                   priority=Priority.live)
    while time.monotonic() - started < timeout:
        try:
            record = await client.submit(spec, timeout=2.0, attempts=1, events=False, idempotency_key=spec.id)
            result = await client.wait(record.spec.id, timeout=max(1.0, timeout - (time.monotonic() - started)))
            if result.job.state is JobState.done:
                return time.monotonic() - started
            spec = spec.model_copy(update={"id": JobSpec.model_fields["id"].default_factory()})  # failed: anew
        except (asyncio.TimeoutError, RemoteError):
            await asyncio.sleep(0.1)
    return float("inf")


async def chaos(system: System, clients: Clients, rng: random.Random, kills: int) -> list[tuple[str, float]]:
    roles = list(ROLES)
    rng.shuffle(roles)
    schedule = roles + [rng.choice(list(ROLES)) for _ in range(max(0, kills - len(roles)))]
    recovered: list[tuple[str, float]] = []
    async with AtelierClient(system.router, system.pub, heartbeat_s=0.5) as client:
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        for role in schedule:
            if role == "client":
                killed = f"client {clients.kill(rng)}"
            else:
                pid = pid_of(system, ROLES[role])
                if pid is None:
                    print(f"  {role}: not running now (restarting?); skipped")
                    continue
                os.kill(pid, signal.SIGKILL)
                killed = f"{role} (pid {pid})"
            took = await probe(client, f"after {role} {len(recovered)}")
            recovered.append((role, took))
            print(f"  killed {killed:<24} serving again after {took:.2f}s")
            await asyncio.sleep(rng.uniform(0.5, 3.0))
    return recovered


def tally(clients: Clients) -> dict:
    accepted: dict[str, str] = {}
    shown: dict[str, list[dict]] = collections.defaultdict(list)
    refused: dict[str, str] = {}
    for index in range(clients.count):
        s, w, r = read_state(clients.state(index))
        accepted.update(s)
        refused.update(r)
        for job_id, notes in w.items():
            shown[job_id] += notes
    finals = {job_id: notes[0] for job_id, notes in shown.items()}
    failed = {job_id: note for job_id, note in finals.items() if note["state"] != "done"}
    return {
        "accepted": len(accepted), "refused": len(refused),
        "done": sum(1 for note in finals.values() if note["state"] == "done"), "failed": len(failed),
        "failed_without_reason": sum(1 for note in failed.values() if not note.get("reason")),
        "lost": sorted(set(accepted.values()) - set(finals)),
        "duplicated": sorted(job_id for job_id, notes in shown.items() if len(notes) > 1),
        "reasons": collections.Counter(note.get("reason") or "" for note in failed.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs in all, shared by the clients")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--kills", type=int, default=10, help="kills in all (every role at least once)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pace", type=float, default=1.0, help="seconds between one client's submits")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds the clients get after the chaos")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, client notes)")
    # A client process (started by the run itself).
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--router", help=argparse.SUPPRESS)
    parser.add_argument("--pub", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        asyncio.run(client_main(args.client, args.jobs, args.pace, args.router, args.pub, Path(args.state)))
        return 0

    folder = Path(tempfile.mkdtemp(prefix="atelier-chaos-"))
    (folder / "atelier.toml").write_text(CONFIG)
    system = System(folder / "home", folder / "up.log", config=folder / "atelier.toml", log_level="INFO",
                    http="127.0.0.1:0")
    rng = random.Random(args.seed)
    per_client = args.jobs // args.clients
    print(f"chaos: {args.clients} clients x {per_client} jobs (noop, {STEPS} steps of {STEP_S}s), "
          f"{args.kills} kills, seed {args.seed}; folder {folder}")
    system.start(timeout=120)
    clients = Clients(args.clients, per_client, args.pace, system, folder)
    try:
        for index in range(args.clients):
            clients.start(index)
        started = time.monotonic()
        recovered = asyncio.run(chaos(system, clients, rng, args.kills))
        deadline = time.monotonic() + args.deadline
        while clients.running() and time.monotonic() < deadline:
            time.sleep(0.5)
        stuck = [i for i, p in clients.procs.items() if p.poll() is None]
        for index in stuck:
            clients.procs[index].kill()
        elapsed = time.monotonic() - started
    finally:
        leftovers = system.stop()
    figures = tally(clients)
    roles = collections.Counter(role for role, _ in recovered)
    times = [took for _, took in recovered]
    p95 = percentile(times, 0.95) if times else float("nan")
    print(f"  ran {elapsed:.0f}s; kills by role: {dict(sorted(roles.items()))}")
    print(f"  accepted {figures['accepted']}, done {figures['done']}, failed {figures['failed']} "
          f"({figures['failed_without_reason']} without a reason), refused {figures['refused']}")
    for reason, count in figures["reasons"].most_common():
        print(f"    failed x{count}: {reason}")
    if figures["lost"]:
        print(f"  LOST: {figures['lost'][:10]}{' …' if len(figures['lost']) > 10 else ''}")
    if figures["duplicated"]:
        print(f"  SHOWN TWICE: {figures['duplicated'][:10]}")
    if stuck:
        print(f"  clients still waiting at the deadline: {stuck}")
    for problem in leftovers:
        print(f"  {problem}")
    if args.keep or figures["lost"] or figures["duplicated"]:
        print(f"  kept {folder}")
    else:
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    print(f"RESULT accepted={figures['accepted']} done={figures['done']} failed={figures['failed']} "
          f"lost={len(figures['lost'])} duplicated={len(figures['duplicated'])} recover_p95_s={p95:.2f}")
    return 0 if not figures["lost"] and not figures["duplicated"] and not figures["failed_without_reason"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
