"""The operator's commands of ``atelier``: pause, resume, drain, undrain, front, priority, reload.

    atelier pause [--model M]          nothing new starts (running batches finish); submits are still taken
    atelier resume [--model M]         starts again what a pause held (no model: the queue and every model)
    atelier drain NODE                 the node's runners finish what they run and take nothing new
    atelier resume --node NODE         the node serves again (also: atelier undrain NODE)
    atelier front JOB                  a queued job starts next, before every other
    atelier priority JOB batch         a queued job's priority (live, interactive, batch)
    atelier reload                     the scheduler reads its config file's models again

Over ZeroMQ the one running the command is the operator, as for ``atelier cancel``. Each failure is one
line that says what is wrong and what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from atelier.config import Config
from atelier.public import scrub

PRIORITIES = ("live", "interactive", "batch")


def add_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The operator's subcommands, on ``atelier``'s parser (``command`` makes one with the common options)."""
    pause = command("pause", "pause the queue, or one model: nothing new starts, running batches finish")
    pause.add_argument("--model", help="only this model's jobs (default: the whole queue)")
    resume = command("resume", "resume the queue (or one model), or a drained node (--node)")
    which = resume.add_mutually_exclusive_group()
    which.add_argument("--model", help="only this model (default: the queue and every paused model)")
    which.add_argument("--node", help="a drained node, which serves again")
    drain = command("drain", "drain a node for maintenance: its runners finish their batches, take nothing new")
    drain.add_argument("node")
    undrain = command("undrain", "a drained node serves again (as resume --node)")
    undrain.add_argument("node")
    front = command("front", "move a queued job to the front: it starts next")
    front.add_argument("job")
    priority = command("priority", "change a queued job's priority")
    priority.add_argument("job")
    priority.add_argument("priority", choices=PRIORITIES)
    command("reload", "reload the catalog: the scheduler reads its config file's models again")


async def _ask(args: argparse.Namespace, config: Config, make: Callable[[], Any], timeout: float = 10.0) -> Any | None:
    """The scheduler's answer to the message ``make`` builds (from the command line, so it may not
    validate), or None once the refusal is printed as one line."""
    from pydantic import ValidationError

    from actors.actor import RemoteError
    from actors.codec import SCHEDULER
    from frontends.cli import _connect, _endpoints, _unroutable

    try:
        msg = make()
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        print(f"error: {'.'.join(map(str, error['loc']))}: {error['msg']}; see atelier {args.command} --help",
              file=sys.stderr)
        return None
    async with _connect(*_endpoints(args, config), config) as client:
        try:
            return await client.ask(SCHEDULER, msg, timeout=timeout)
        except RemoteError as exc:
            if _unroutable(exc):
                raise  # _connect says there is no scheduler
            print(f"error: {scrub(exc.error.message)}", file=sys.stderr)
            return None


async def controls(client: Any) -> Any | None:
    """The operator's controls, for ``atelier status``; None from a scheduler that has none to say."""
    from actors.actor import RemoteError
    from actors.codec import SCHEDULER
    from actors.messages import GetControls

    try:
        return await client.ask(SCHEDULER, GetControls())
    except RemoteError:
        return None


def describe(controls: Any) -> str:
    """The controls in one line: 'queue: paused; paused models: a, b; nodes: n1 draining, n2 serving'."""
    words = ["queue: paused" if controls.paused else "queue: running"]
    if controls.paused_models:
        words.append(f"paused models: {', '.join(controls.paused_models)}")
    if controls.nodes:
        words.append("nodes: " + ", ".join(f"{node} {state}" for node, state in controls.nodes.items()))
    return "; ".join(words)


async def _controls(args: argparse.Namespace, config: Config, make: Callable[[], Any]) -> int:
    answer = await _ask(args, config, make)
    if answer is None:
        return 1
    print(describe(answer))
    return 0


async def _pause(args: argparse.Namespace, config: Config) -> int:
    from actors.messages import PauseQueue

    return await _controls(args, config, lambda: PauseQueue(model=args.model))


async def _resume(args: argparse.Namespace, config: Config) -> int:
    from actors.messages import ResumeNode, ResumeQueue

    return await _controls(args, config,
                          lambda: ResumeNode(node=args.node) if args.node else ResumeQueue(model=args.model))


async def _drain(args: argparse.Namespace, config: Config) -> int:
    from actors.messages import DrainNode

    return await _controls(args, config, lambda: DrainNode(node=args.node))


async def _undrain(args: argparse.Namespace, config: Config) -> int:
    from actors.messages import ResumeNode

    return await _controls(args, config, lambda: ResumeNode(node=args.node))


async def _job(args: argparse.Namespace, config: Config, make: Callable[[], Any], done: str) -> int:
    answer = await _ask(args, config, make)
    if answer is None:
        return 1
    record = answer.job
    place = f", #{record.position + 1} in the queue" if record.position is not None else ""
    print(f"{record.spec.id}: {done} ({record.state.value}{place})")
    return 0


async def _front(args: argparse.Namespace, config: Config) -> int:
    from actors.messages import MoveToFront

    return await _job(args, config, lambda: MoveToFront(job_id=args.job), "moved to the front")


async def _priority(args: argparse.Namespace, config: Config) -> int:
    from actors.messages import SetPriority
    from atelier.jobs import Priority

    return await _job(args, config, lambda: SetPriority(job_id=args.job, priority=Priority(args.priority)),
                      f"priority {args.priority}")


async def _reload(args: argparse.Namespace, config: Config) -> int:
    from actors.messages import ReloadCatalog

    answer = await _ask(args, config, ReloadCatalog, timeout=30.0)
    if answer is None:
        return 1
    print("catalog reloaded: " + "; ".join(f"{what} {', '.join(names) or 'none'}" for what, names in
                                           (("added", answer.added), ("changed", answer.changed),
                                            ("removed", answer.removed))))
    return 0


COMMANDS = {"pause": _pause, "resume": _resume, "drain": _drain, "undrain": _undrain, "front": _front,
            "priority": _priority, "reload": _reload}
