"""The broker's own ceiling, and whether previews delay what must not wait.

The real ``broker.Broker`` runs in a process of its own with 1,000 peers registered (idle frontends in
another process, each heartbeating as every actor does). Then:

1. ceiling    senders (runner peers, a process of their own) route small messages to one frontend as
              fast as they can: messages per second the broker routes, measured where they arrive.
2. previews   a runner publishes results' companions at a steady pace: a routed "result" and a
              published Progress every 5 ms, timed from send to arrival, first alone, then with
              previews of ``--jobs`` running jobs at 10 a second each (``--preview-bytes`` each) on the
              same broker, read by a frontend that follows those jobs. Side by side: p50/p99 of each.

    python bench/broker_ceiling.py [--peers 1000] [--jobs 100] [--seconds 5]

The last line printed is machine-readable: ``RESULT routed_per_s=... result_p50_ms=... ...``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root

import zmq  # noqa: E402

from actors import codec  # noqa: E402
from actors.codec import Envelope  # noqa: E402
from actors.messages import Heartbeat, Hello, Preview, Progress, Role, Welcome  # noqa: E402
from atelier.jobs import Capabilities  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _broker(conn, stop, previews_last: bool) -> None:
    import broker as broker_module

    b = broker_module.Broker("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", heartbeat_s=1.0,
                             rate_per_s=1e9, burst=10**9,  # the bench measures the broker, not its throttle
                             previews_last=previews_last)
    conn.send((b.router_endpoint, b.pub_endpoint))
    b.serve(until=stop)
    conn.send(b.stats.routed + b.stats.published)


def _peer(ctx: zmq.Context, router: str, name: str, role: Role) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().hex.encode())
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(router)
    hello = Hello(role=role, incarnation=uuid.uuid4().hex, capabilities=Capabilities(pid=os.getpid()))
    sock.send_multipart(codec.encode(Envelope(hello, name, codec.BROKER, 1)))
    return sock


def _beat(sock: zmq.Socket, name: str) -> None:
    """A heartbeat: a peer that only receives is otherwise silent, and dead to the broker after 3 s."""
    sock.send_multipart(codec.encode(Envelope(Heartbeat(), name, codec.BROKER, 2)))


def _welcomed(sock: zmq.Socket) -> None:
    while True:
        if isinstance(codec.decode(sock.recv_multipart()).msg, Welcome):
            return


def _idle_peers(router: str, count: int, ready, stop) -> None:
    """``count`` registered frontends that do nothing but stay alive (a heartbeat a second, as actors do)."""
    ctx = zmq.Context()
    socks = [_peer(ctx, router, f"idle-{i:05d}", Role.frontend) for i in range(count)]
    for sock in socks:
        _welcomed(sock)
    ready.set()
    beat = [codec.encode(Envelope(Heartbeat(), f"idle-{i:05d}", codec.BROKER, 2)) for i in range(count)]
    # One a second each, spread over the second: actors heartbeat on timers of their own, not in step.
    gap = 1.0 / max(count, 1)
    while not stop.is_set():
        start = time.monotonic()
        for i, (sock, frames) in enumerate(zip(socks, beat, strict=True)):
            sock.send_multipart(frames)
            while sock.poll(0):
                sock.recv_multipart()
            ahead = start + (i + 1) * gap - time.monotonic()
            if ahead > 0.002:
                time.sleep(ahead)
            if stop.is_set():
                break
    for sock in socks:
        sock.close()
    ctx.term()


def _blaster(router: str, index: int, dst: str, count: int, ready, go) -> None:
    ctx = zmq.Context()
    name = f"runner-blast-{index}"
    sock = _peer(ctx, router, name, Role.runner)
    _welcomed(sock)
    frames = codec.encode(Envelope(Progress(job_id="j" * 32, step=1, total=2, elapsed_s=0.0, eta_s=None),
                                   name, dst, 3))
    ready.set()
    go.wait(60)
    for _ in range(count):
        sock.send_multipart(frames, copy=False)
    sock.setsockopt(zmq.LINGER, 30_000)  # the last ones leave before the socket closes
    sock.close()
    ctx.term()


def _previewer(router: str, pub: str, jobs: int, size: int, ready, stop) -> None:
    """A runner publishing previews of ``jobs`` running jobs at 10 a second each, and a frontend that follows
    those jobs' events (as the HTTP gateway follows its own): what previews cost a broker that carries them."""
    ctx = zmq.Context()
    sock = _peer(ctx, router, "runner-previews", Role.runner)
    _welcomed(sock)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(pub)
    ids = [f"p{i:031d}" for i in range(jobs)]
    for job_id in ids:
        sub.setsockopt_string(zmq.SUBSCRIBE, f"job/{job_id}/")
    image = os.urandom(size)
    frames = [codec.encode(Envelope(Preview(job_id=job_id, step=1, width=256, height=256, image=image),
                                    "runner-previews", f"#job/{job_id}/preview", 4)) for job_id in ids]
    time.sleep(0.5)  # subscriptions reach the XPUB
    ready.set()
    interval = 0.1 / max(jobs, 1)  # 10 a second per job, spread evenly
    next_at = time.perf_counter()
    i = 0
    while not stop.is_set():
        now = time.perf_counter()
        if now >= next_at:
            sock.send_multipart(frames[i % jobs], copy=False)
            i += 1
            next_at += interval
        while sub.poll(0):
            sub.recv_multipart()
        if next_at - time.perf_counter() > 0.001:
            time.sleep(0.0005)
    sock.close()
    sub.close()
    ctx.term()


def ceiling(mp, router: str, senders: int, per_sender: int) -> float:
    ctx = zmq.Context()
    recv = _peer(ctx, router, "client-ceiling", Role.frontend)
    _welcomed(recv)
    ready = [mp.Event() for _ in range(senders)]
    go = mp.Event()
    procs = [mp.Process(target=_blaster, args=(router, i, "client-ceiling", per_sender, ready[i], go), daemon=True)
             for i in range(senders)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    while not all(event.is_set() for event in ready):
        if time.monotonic() > deadline:
            raise RuntimeError("a sender did not register")
        _beat(recv, "client-ceiling")
        time.sleep(0.2)
    go.set()
    beat_at = time.monotonic()
    total = senders * per_sender
    got = 0
    first = last = 0.0
    recv.setsockopt(zmq.RCVTIMEO, 10_000)
    while got < total:
        try:
            frames = recv.recv_multipart(copy=False)
        except zmq.Again:
            break  # some were lost (the broker drops a message it cannot route at once): count what came
        if time.monotonic() - beat_at > 0.5:
            _beat(recv, "client-ceiling")
            beat_at = time.monotonic()
        if codec.read_route(frames).src.startswith("runner-blast"):
            last = time.perf_counter()
            if got == 0:
                first = last
            got += 1
    for p in procs:
        p.join(10)
    recv.close()
    ctx.term()
    return (got - 1) / max(last - first, 1e-9)


def latencies(router: str, pub: str, seconds: float) -> tuple[list[float], list[float]]:
    """(routed result latencies, published progress latencies) in ms, one of each every 5 ms."""
    ctx = zmq.Context()
    runner = _peer(ctx, router, "runner-timed", Role.runner)
    client = _peer(ctx, router, "client-timed", Role.frontend)
    _welcomed(runner)
    _welcomed(client)
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub)
    sub.setsockopt_string(zmq.SUBSCRIBE, "job/timed/")
    time.sleep(0.5)
    poller = zmq.Poller()
    poller.register(client, zmq.POLLIN)
    poller.register(sub, zmq.POLLIN)
    routed: list[float] = []
    published: list[float] = []
    end = time.perf_counter() + seconds
    next_at = beat_at = time.perf_counter()
    while time.perf_counter() < end:
        now = time.perf_counter()
        if now - beat_at > 0.5:
            _beat(client, "client-timed")
            beat_at = now
        if now >= next_at:
            stamp = Progress(job_id="timed", step=1, total=2, elapsed_s=now, eta_s=None)
            runner.send_multipart(codec.encode(Envelope(stamp, "runner-timed", "client-timed", 5)))
            runner.send_multipart(codec.encode(Envelope(stamp, "runner-timed", "#job/timed/progress", 6)))
            next_at += 0.005
        for sock, _ in poller.poll(max(0.0, (next_at - time.perf_counter()) * 1000)):
            frames = sock.recv_multipart()
            if sock is sub:
                frames = frames[1:]
            env = codec.decode(frames)
            if isinstance(env.msg, Progress):
                (published if sock is sub else routed).append((time.perf_counter() - env.msg.elapsed_s) * 1000)
    for sock in (runner, client, sub):
        sock.close(linger=0)
    ctx.term()
    return routed, published


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def run_broker(mp, args: argparse.Namespace, previews_last: bool, with_ceiling: bool):
    """One broker with its registered peers: (routed/s, broker CPU share, latencies alone, broker CPU share
    with previews, latencies with previews)."""
    parent, child = mp.Pipe()
    stop_broker = mp.Event()
    proc = mp.Process(target=_broker, args=(child, stop_broker, previews_last), daemon=True)
    proc.start()
    router, pub = parent.recv()
    stop_idle, idle_ready = mp.Event(), mp.Event()
    idle = mp.Process(target=_idle_peers, args=(router, args.peers - 5, idle_ready, stop_idle), daemon=True)
    idle.start()
    if not idle_ready.wait(300):
        raise RuntimeError("the idle peers did not register")
    try:
        routed_per_s = ceiling_cpu = float("nan")
        if with_ceiling:
            cpu0 = _cpu_seconds(proc.pid)
            t0 = time.perf_counter()
            routed_per_s = ceiling(mp, router, args.senders, args.messages // args.senders)
            ceiling_cpu = (_cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
        alone = latencies(router, pub, args.seconds)
        stop_prev, prev_ready = mp.Event(), mp.Event()
        prev = mp.Process(target=_previewer, args=(router, pub, args.jobs, args.preview_bytes, prev_ready, stop_prev),
                          daemon=True)
        prev.start()
        if not prev_ready.wait(60):
            raise RuntimeError("the preview publisher did not start")
        cpu1 = _cpu_seconds(proc.pid)
        t1 = time.perf_counter()
        loaded = latencies(router, pub, args.seconds)
        loaded_cpu = (_cpu_seconds(proc.pid) - cpu1) / (time.perf_counter() - t1)
        stop_prev.set()
        prev.join(10)
    finally:
        stop_idle.set()
        idle.join(30)
        stop_broker.set()
        proc.join(30)
        for p in (idle, proc):
            if p.is_alive():
                p.kill()
    return routed_per_s, ceiling_cpu, alone, loaded_cpu, loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000, help="peers registered (default 1000)")
    parser.add_argument("--senders", type=int, default=2, help="sender processes in the ceiling run")
    parser.add_argument("--messages", type=int, default=100_000, help="messages routed in the ceiling run")
    parser.add_argument("--jobs", type=int, default=100, help="running jobs whose previews flow (10/s each)")
    parser.add_argument("--preview-bytes", type=int, default=16_384, help="one preview image (a 256px JPEG)")
    parser.add_argument("--seconds", type=float, default=5.0, help="each latency run")
    args = parser.parse_args(argv)

    mp = multiprocessing.get_context("spawn")
    runs = {}
    for previews_last in (False, True):  # the broker as it was (previews in arrival order), and as it is
        runs[previews_last] = run_broker(mp, args, previews_last, with_ceiling=previews_last)
    routed_per_s, ceiling_cpu, alone, loaded_cpu, _ = runs[True]
    before, after = runs[False][4], runs[True][4]

    print(f"broker ceiling: {args.peers} peers registered, on {os.cpu_count()} CPUs")
    print(f"  routed (peer -> peer, {args.senders} senders)  {routed_per_s:>10,.0f} msgs/s  "
          f"broker at {ceiling_cpu:.0%} of a CPU: {routed_per_s / max(ceiling_cpu, 1e-9):,.0f} msgs per CPU-second")
    print(f"  latency, one of each every 5 ms, p50 / p99 ms: alone; with {args.jobs} jobs' previews "
          f"({args.jobs * 10}/s x {args.preview_bytes // 1024} KiB) in arrival order (before); previews last (now)")
    for name, i in (("routed result", 0), ("published progress", 1)):
        a, b, c = alone[i], before[i], after[i]
        print(f"  {name:<20}  {pct(a, .5):6.2f} / {pct(a, .99):6.2f}   {pct(b, .5):6.2f} / {pct(b, .99):6.2f}"
              f"   {pct(c, .5):6.2f} / {pct(c, .99):6.2f}   (n={len(a)}, {len(b)}, {len(c)})")
    print(f"  broker at {loaded_cpu:.0%} of a CPU with the previews")
    print(f"RESULT routed_per_s={routed_per_s:.0f} routed_per_cpu_s={routed_per_s / max(ceiling_cpu, 1e-9):.0f} "
          f"peers={args.peers} result_p50_ms={pct(alone[0], .5):.3f} result_p99_ms={pct(alone[0], .99):.3f} "
          f"result_p50_ms_previews_before={pct(before[0], .5):.3f} "
          f"result_p99_ms_previews_before={pct(before[0], .99):.3f} "
          f"result_p50_ms_previews={pct(after[0], .5):.3f} result_p99_ms_previews={pct(after[0], .99):.3f} "
          f"progress_p99_ms_previews_before={pct(before[1], .99):.3f} "
          f"progress_p99_ms_previews={pct(after[1], .99):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
