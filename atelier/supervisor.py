"""Starts child processes, restarts the ones that die, and stops them all cleanly.

Used by ``gpu_node.py`` (a node's loader and runners) and by ``atelier up``
(broker, scheduler, node). Children get SIGTERM when the supervisor dies
(PDEATHSIG), so a crashed supervisor leaves no orphans either. A group (a gang's
ranks) lives and dies as one: when one of its children exits, the others are
stopped and the whole group is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from atelier.runtime import READY_PREFIX, Failure, TaskSet, die_with_parent

log = logging.getLogger("atelier.supervisor")


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    # Wait for a line starting with READY_PREFIX on the child's stdout before going on.
    wait_ready: bool = False
    restart: bool = True


@dataclass
class Child:
    spec: ChildSpec
    process: asyncio.subprocess.Process
    started: float = field(default_factory=time.monotonic)
    ready_line: str | None = None
    restarts: int = 0


class ChildExited(Exception):
    """A child ended before saying it was ready; the argument is its exit status."""


class Supervisor:
    def __init__(self, *, grace_s: float = 10.0, max_backoff_s: float = 30.0):
        self.grace_s = grace_s
        self.max_backoff_s = max_backoff_s
        self.children: dict[str, Child] = {}
        self._watchers = TaskSet("supervisor")
        # Readers of children's stdout: they end with it, and must read to the end (a child blocked on
        # a full pipe would not stop).
        self._readers = TaskSet("supervisor")
        self._stopping = False
        self.on_restart: Callable[[Child], None] | None = None

    async def start(self, spec: ChildSpec, ready_timeout: float = 60.0) -> Child:
        child = await self._spawn(spec, ready_timeout)
        self.children[spec.name] = child
        self._watchers.spawn(self._watch(spec.name), f"watch-{spec.name}")
        return child

    async def _spawn(self, spec: ChildSpec, ready_timeout: float) -> Child:
        process = await asyncio.create_subprocess_exec(
            *spec.argv, preexec_fn=die_with_parent,
            stdout=asyncio.subprocess.PIPE if spec.wait_ready else None)
        child = Child(spec, process)
        if spec.wait_ready:
            assert process.stdout is not None
            try:
                child.ready_line = await asyncio.wait_for(self._read_ready(process), ready_timeout)
            except (asyncio.TimeoutError, ChildExited) as exc:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                said = f"it exited with status {exc}" if isinstance(exc, ChildExited) else \
                    f"it did not say it was ready within {ready_timeout:.0f}s"
                raise Failure(f"{spec.name} did not start: {said} (its log, above, says why)") from None
            self._readers.spawn(self._forward(process.stdout), f"forward-{spec.name}")
        log.info("started %s (pid %d)", spec.name, process.pid)
        return child

    @staticmethod
    async def _read_ready(process: asyncio.subprocess.Process) -> str:
        assert process.stdout is not None
        while True:
            line = await process.stdout.readline()
            if not line:
                raise ChildExited(await process.wait())
            text = line.decode(errors="replace").rstrip("\n")
            if text.startswith(READY_PREFIX):
                return text[len(READY_PREFIX):]
            print(text, flush=True)

    @staticmethod
    async def _forward(stream: asyncio.StreamReader) -> None:
        # Keep reading, or a chatty child would block on a full pipe.
        while line := await stream.readline():
            sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()

    async def _watch(self, name: str) -> None:
        backoff = 0.5
        while True:
            child = self.children[name]
            code = await child.process.wait()
            if self._stopping:
                return
            if not child.spec.restart:
                log.error("%s exited with %s; not restarting it", name, code)
                return
            if time.monotonic() - child.started > 60:
                backoff = 0.5  # it ran fine for a while: this is a fresh failure, not a crash loop
            log.warning("%s exited with %s; restarting in %.1fs", name, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            if self._stopping:
                return
            try:
                fresh = await self._spawn(child.spec, ready_timeout=60.0)
            except Exception as exc:
                log.error("could not restart %s: %s", name, exc)
                continue
            fresh.restarts = child.restarts + 1
            self.children[name] = fresh
            if self.on_restart is not None:
                self.on_restart(fresh)

    async def start_group(self, name: str, make: Callable[[], list[ChildSpec]]) -> list[Child]:
        """Starts the children ``make()`` describes (called afresh for every start: a gang takes a new port
        each time) as one group: when any of them exits, the others are stopped (SIGTERM, then SIGKILL after
        the grace period) and ``make()``'s children are all started again, with backoff. ``stop`` stops them
        in the reverse order of ``make()``'s list."""
        children = await self._spawn_group(make())
        self._watchers.spawn(self._watch_group(name, make, children), f"watch-{name}")
        return children

    async def _spawn_group(self, specs: list[ChildSpec]) -> list[Child]:
        children = []
        try:
            for spec in specs:
                child = await self._spawn(spec, ready_timeout=60.0)
                self.children[spec.name] = child
                children.append(child)
        except BaseException:
            await self._stop_children(children)
            raise
        return children

    async def _watch_group(self, name: str, make: Callable[[], list[ChildSpec]], children: list[Child]) -> None:
        backoff = 0.5
        while True:
            started = min(child.started for child in children)
            exits = {asyncio.ensure_future(child.process.wait()): child for child in children}
            try:
                done, _ = await asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in exits:
                    waiting.cancel()
            if self._stopping:
                return
            first = exits[next(iter(done))]
            log.warning("%s of group %s exited with %s; stopping the rest of the group", first.spec.name, name,
                        first.process.returncode)
            await self._stop_children([child for child in children if child is not first])
            if time.monotonic() - started > 60:
                backoff = 0.5  # it ran fine for a while: this is a fresh failure, not a crash loop
            log.warning("restarting group %s in %.1fs", name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            if self._stopping:
                return
            restarts = max(child.restarts for child in children) + 1
            try:
                children = await self._spawn_group(make())
            except Exception as exc:
                log.error("could not restart group %s: %s", name, exc)
                continue
            for child in children:
                child.restarts = restarts
                if self.on_restart is not None:
                    self.on_restart(child)

    async def _stop_children(self, children: Iterable[Child]) -> None:
        """SIGTERM each child still running, in the reverse order, each given the grace period, then SIGKILL."""
        for child in reversed(list(children)):
            if child.process.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
                child.process.send_signal(signal.SIGCONT)  # a stopped one (SIGSTOP, a debugger) hears it too
            try:
                await asyncio.wait_for(child.process.wait(), self.grace_s)
            except asyncio.TimeoutError:
                log.warning("%s did not stop in %.0fs; killing it", child.spec.name, self.grace_s)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()

    async def stop(self) -> None:
        """SIGTERM each child in the reverse order of starting (a part stops before what it needs: runners
        hand their jobs back while the loader and the scheduler are still there), waiting up to the grace
        period for each, then SIGKILL."""
        self._stopping = True
        await self._watchers.cancel_all()
        await self._stop_children(list(self.children.values()))
