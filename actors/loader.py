"""The loader (one per node): gets a model's weights ready in this host's memory before a runner needs them.

It resolves a catalog entry to a local folder (generating a built-in tiny model
on first use) and stages its safetensors files into a shared-memory segment
(``atelier/staging.py``) that every runner of the node maps: a model switch is
then a memory copy, not a disk read. Segments live within a RAM budget, least
recently used first out; a segment just handed to a runner is leased and never
evicted under it. A folder that cannot be staged (pickle-only weights, say) is
still answered with its path, and the runner reads it from disk.

Staging runs in worker threads, never in the mailbox: one slow model must not
hold back the next request, and two requests for one model share one staging.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import re
import secrets
import socket
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from actors import catalog, keys
from actors.actor import Actor, handles, internal_error
from actors.codec import SCHEDULER, Envelope
from actors.messages import CatalogUpdate, Error, LoaderState, Preload, Release, ReportStaged, Role, Stage, Staged
from atelier import sources, staging
from atelier.config import Config
from atelier.jobs import Capabilities, ErrorCode
from atelier.runtime import process_main, process_parser

log = logging.getLogger("atelier.loader")

LEASE_S = 60.0  # long enough for a runner to map a segment it was just handed


class BudgetError(Exception):
    """A model that cannot fit the staging budget, even with everything else evicted."""


@dataclass
class Holding:
    staged: Staged
    leased_until: float = 0.0


class StagedSet:
    """The segments a loader holds, within a budget in bytes, least recently used first out."""

    def __init__(self, budget: int):
        self.budget = budget
        self.items: OrderedDict[str, Holding] = OrderedDict()

    @property
    def used(self) -> int:
        return sum(h.staged.bytes for h in self.items.values())

    def get(self, model: str, now: float) -> Staged | None:
        holding = self.items.get(model)
        if holding is None:
            return None
        if holding.staged.segment and not Path(holding.staged.segment).exists():
            del self.items[model]  # someone cleaned /dev/shm under us
            return None
        self.items.move_to_end(model)
        holding.leased_until = now + LEASE_S
        return holding.staged

    def make_room(self, model: str, size: int, now: float) -> list[Staged]:
        """Evicts what must go for ``size`` more bytes; returns the evicted. Raises BudgetError."""
        if size > self.budget:
            raise BudgetError(f"model {model} needs {size:,} bytes of staging memory, "
                              f"more than the budget of {self.budget:,} bytes")
        # Choose first, evict after: a request that cannot fit must not cost anyone their segment.
        chosen, freed = [], 0
        for name, holding in self.items.items():
            if self.used - freed + size <= self.budget:
                break
            if holding.leased_until <= now:
                chosen.append(name)
                freed += holding.staged.bytes
        if self.used - freed + size > self.budget:
            raise BudgetError(f"model {model} needs {size:,} bytes of staging memory; {self.used:,} of the "
                              f"{self.budget:,} byte budget are held by models runners are loading now")
        return [self.items.pop(name).staged for name in chosen]

    def release(self, model: str) -> None:
        """The runner that was loading it is done with the segment's name: it may be evicted.
        (A CPU runner keeps its mapping: its memory goes when that runner drops the model.)"""
        holding = self.items.get(model)
        if holding is not None:
            holding.leased_until = 0.0

    def add(self, staged: Staged, now: float) -> None:
        self.items[staged.model] = Holding(staged, leased_until=now + LEASE_S)


def default_budget() -> int:
    """Half the machine's memory: the rest is for the runners' own copies and everything else."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 8 << 30


def stage_budget(configured: int | None, shm_root: Path | None) -> int:
    """The staging budget: the configured one, else ``default_budget``, and never more than the shared-memory
    file system holds (Docker's /dev/shm is 64 MiB unless told otherwise)."""
    budget = configured or default_budget()
    room = staging.shm_bytes(shm_root) if shm_root is not None else None
    if room is not None and room < budget:
        log.warning("staging budget %s bytes is more than %s holds (%s bytes): staging within %s bytes",
                    f"{budget:,}", shm_root, f"{room:,}", f"{room:,}")
        budget = room
    return budget


class Loader(Actor):
    role = Role.loader

    def __init__(self, config: Config, router: str, *, node: str, **kwargs):
        super().__init__(loader_name(node), router, heartbeat_s=config.broker.heartbeat_s, **kwargs)
        self.config = config
        self.node = node
        self.held = StagedSet(stage_budget(config.node.stage_budget_bytes, staging.SHM_ROOT))
        self._staging: dict[str, asyncio.Task[Staged]] = {}
        self._stale: set[str] = set()  # models whose catalog entry changed: their segment goes once unleased
        self._importer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader-import")
        # Segments are named atelier-<node>-<pid>-<model>: the pid tells this loader's own from those
        # of another one on the same host and node name (a second atelier, a test), and from those a
        # killed loader left behind.
        self._node_prefix = "atelier-" + re.sub(r"[^A-Za-z0-9_.-]", "_", node) + "-"
        self._prefix = f"{self._node_prefix}{os.getpid()}-"
        self._runner_prefix = f"runner-{node}-"  # runner.runner_name's, for this node

    def capabilities(self) -> Capabilities:
        return super().capabilities().model_copy(update={"node": self.node})

    async def on_start(self) -> None:
        self._remove_orphans()
        # Have the default model ready before anyone asks: the first job of a fresh install
        # should not wait for it.
        await self._report()
        if self.config.default_model in self.config.models:
            self._start_staging(self.config.default_model).add_done_callback(_log_preload_failure)

    async def on_reconnect(self) -> None:
        # The scheduler forgot what is staged here when we went silent (a partition, a broker restart):
        # tell it again, or it places this node's jobs without affinity and `atelier status` lists no loader.
        await self._report()

    async def _report(self) -> None:
        """Tells the scheduler what is staged here, for routing, preloading and ``atelier status``."""
        await self.send(SCHEDULER, LoaderState(node=self.node, budget_bytes=self.held.budget,
                                               staged={m: h.staged.bytes for m, h in self.held.items.items()}))

    def _refuse(self, env: Envelope, sender_ok: bool, allowed: str) -> Error | None:
        """Stage and Release come from this node's runners, Preload from the scheduler: another peer
        (a frontend, another node's runner) has no business steering this host's memory."""
        if sender_ok:
            return None
        log.warning("refused %s from %r: only %s may send it", env.msg.kind, env.src[:128], allowed)
        return Error(code=ErrorCode.forbidden, message=f"{self.name} takes {env.msg.kind} only from {allowed}")

    @handles(Release)
    async def on_release(self, msg: Release, env: Envelope) -> Error | None:
        if refusal := self._refuse(env, env.src.startswith(self._runner_prefix), f"{self._runner_prefix}*"):
            return refusal
        self.held.release(msg.model)
        if msg.model in self._stale and self._drop_stale():
            await self._report()
        return None

    @handles(ReportStaged)
    async def on_report_staged(self, msg: ReportStaged, env: Envelope) -> Error | None:
        if refusal := self._refuse(env, env.src == SCHEDULER, SCHEDULER):
            return refusal
        await self._report()
        return None

    @handles(Preload)
    async def on_preload(self, msg: Preload, env: Envelope) -> Error | None:
        if refusal := self._refuse(env, env.src == SCHEDULER, SCHEDULER):
            return refusal
        for model in msg.models:
            self._start_staging(model).add_done_callback(_log_preload_failure)
        return None

    @handles(CatalogUpdate)
    async def on_catalog(self, msg: CatalogUpdate, env: Envelope) -> Error | None:
        if refusal := self._refuse(env, env.src == SCHEDULER, SCHEDULER):
            return refusal
        self._stale.update(catalog.take(self.config, msg))
        if self._drop_stale():
            await self._report()
        return None

    def _drop_stale(self, *, model: str | None = None) -> bool:
        """Removes the segments of models whose catalog entry changed, once no runner is mapping them
        (``model``: that one now, whoever maps it: it is about to be staged anew, and a mapping made keeps
        its memory). Whether any went."""
        now, dropped = time.monotonic(), False
        for name in sorted(self._stale):
            holding = self.held.items.get(name)
            if holding is not None and holding.leased_until > now and name != model:
                continue  # a runner is mapping it: it goes at its Release
            self._stale.discard(name)
            if holding is not None:
                del self.held.items[name]
                if holding.staged.segment:
                    Path(holding.staged.segment).unlink(missing_ok=True)
                log.info("dropped staged %s: its catalog entry changed", name)
                dropped = True
        return dropped

    async def on_stop(self) -> None:
        # Runners that mapped a segment keep their memory; the names just go.
        self._remove_segments()

    def _remove_segments(self) -> None:
        if staging.SHM_ROOT is not None:
            for leftover in staging.SHM_ROOT.glob(self._prefix + "*"):
                staging.remove_own(leftover)

    def _remove_orphans(self) -> None:
        """Removes the segments of loaders of this node that are dead (killed before they could).
        Only this user's: /dev/shm is everyone's, and another's file of the same name is not ours to
        remove (nor can we, in a sticky folder: it must not stop the loader from starting)."""
        if staging.SHM_ROOT is None:
            return
        for leftover in staging.SHM_ROOT.glob(self._node_prefix + "*"):
            owner = leftover.name[len(self._node_prefix):].split("-", 1)[0]
            if owner.isdigit() and not _alive(int(owner)):
                staging.remove_own(leftover)

    def _start_staging(self, model: str) -> asyncio.Task[Staged]:
        task = self._staging.get(model)
        if task is None:
            task = self._tasks.spawn(self._stage(model), f"stage-{model}", log_failure=False)  # the askers answer
            self._staging[model] = task
            task.add_done_callback(lambda _: self._staging.pop(model, None))
        return task

    @handles(Stage)
    async def on_stage(self, msg: Stage, env: Envelope) -> Error | None:
        if refusal := self._refuse(env, env.src.startswith(self._runner_prefix), f"{self._runner_prefix}*"):
            return refusal
        self._tasks.spawn(self._answer(env, self._start_staging(msg.model)), "answer-stage")
        return None

    async def _answer(self, env: Envelope, task: asyncio.Task[Staged]) -> None:
        try:
            answer = await asyncio.shield(task)
        except KeyError as exc:
            answer = Error(code=ErrorCode.unknown_model, message=str(exc.args[0]))
        except BudgetError as exc:
            answer = Error(code=ErrorCode.too_large, message=str(exc))
        except sources.ModelSourceError as exc:
            answer = Error(code=ErrorCode.bad_request, message=str(exc))
        except Exception as exc:
            log.exception("staging %s failed", env.msg.model)
            answer = internal_error(self.name, f"staging {env.msg.model}", exc)
        await self.reply(env, answer)

    async def _stage(self, model: str) -> Staged:
        if model in self._stale and self._drop_stale(model=model):
            await self._report()
        held = self.held.get(model, time.monotonic())
        if held is not None:
            return held
        entry = self.config.models.get(model)
        if entry is None:
            raise KeyError(f"unknown model {model!r}")
        # One thread for whatever may import torch or diffusers: their lazy imports are not
        # thread-safe. Copying bytes (below) needs neither and runs beside it.
        path = await asyncio.get_running_loop().run_in_executor(
            self._importer, functools.partial(sources.resolve, downloads=self.config.node.downloads), model,
            entry, self.config.model_cache)
        if path is None:
            return Staged(model=model, path="", bytes=0)  # a family with no weights
        if staging.SHM_ROOT is None or not self.config.node.staging:
            return Staged(model=model, path=str(path), bytes=0)  # runners read it from disk
        try:
            # A GGUF transformer is staged in place of the folder's float one, which is not read (families/gguf.py).
            gguf = sources.transformer_file(entry, self.config.model_cache)
            files = await asyncio.to_thread(staging.plan, path, entry.variant, gguf)
        except staging.StagingError as exc:
            log.warning("not staging %s, runners will read it from disk: %s", model, exc)
            return Staged(model=model, path=str(path), bytes=0)
        size = staging.planned_bytes(files)
        for evicted in self.held.make_room(model, size, time.monotonic()):
            log.info("evicted %s (%d bytes) from staging", evicted.model, evicted.bytes)
            Path(evicted.segment or "").unlink(missing_ok=True)
        # A random part: a name another local user cannot guess cannot be made ready for us to trip on.
        segment = staging.SHM_ROOT / (self._prefix + re.sub(r"[^A-Za-z0-9_.-]", "_", model) + "-"
                                      + secrets.token_hex(8))
        started = time.monotonic()
        try:
            table = await asyncio.to_thread(staging.stage, path, segment, entry.variant, gguf)
        except staging.StagingError as exc:  # no room in /dev/shm (others use it too), a damaged file
            log.warning("not staging %s, runners will read it from disk: %s", model, exc)
            return Staged(model=model, path=str(path), bytes=0)
        staged = Staged(model=model, path=str(path), bytes=staging.segment_bytes(table), segment=str(segment),
                        files=table)
        self.held.add(staged, time.monotonic())
        await self._report()
        log.info("staged %s: %d bytes in %.2fs (%d of %d budget bytes in use)", model, staged.bytes,
                 time.monotonic() - started, self.held.used, self.held.budget)
        return staged


def _log_preload_failure(task: asyncio.Task) -> None:
    # Nobody waits on a preload: a model that cannot be staged now is loaded the slow way later.
    if not task.cancelled() and task.exception() is not None:
        log.warning("preload failed: %s", task.exception())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to clean up after
        return True
    return True


def loader_name(node: str) -> str:
    return f"loader-{node}"


async def serve(args: argparse.Namespace, config: Config, stop: asyncio.Event) -> None:
    await Loader(config, args.router or config.broker.router, node=args.node, keys=keys.for_peer(config)).run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("atelier loader", "Run a node's loader.")
    parser.add_argument("--node", default=socket.gethostname())
    return process_main(parser, serve, argv, log_name=lambda args: loader_name(args.node), loads_models=True)


if __name__ == "__main__":
    raise SystemExit(main())
