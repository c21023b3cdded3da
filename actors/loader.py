"""The loader (one per node): gets a model's weights ready on this host before a runner needs them.

Today it resolves a catalog entry to a local folder (generating a built-in tiny
model on first use) and reads the files through once, so that the runner's
``from_pretrained`` is served from the page cache. Staging into shared, pinned
memory replaces the read-through in the residency work.

Staging runs in worker threads, never in the mailbox: one slow model must not
hold back the next request, and two requests for one model share one staging.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket

from actors.actor import Actor, handles, run_actor
from actors.codec import Envelope
from actors.messages import Capabilities, Error, ErrorCode, Role, Stage, Staged
from atelier import sources
from atelier.config import Config, load_config

log = logging.getLogger("atelier.loader")


class Loader(Actor):
    role = Role.loader

    def __init__(self, config: Config, router: str, *, node: str, **kwargs):
        super().__init__(loader_name(node), router, heartbeat_s=config.broker.heartbeat_s, **kwargs)
        self.config = config
        self.node = node
        self._staging: dict[str, asyncio.Task[Staged]] = {}

    def capabilities(self) -> Capabilities:
        caps = super().capabilities()
        caps.node = self.node
        return caps

    async def on_start(self) -> None:
        # Have the default model ready before anyone asks: the first job of a fresh install
        # should not wait for it.
        if self.config.default_model in self.config.models:
            self._start_staging(self.config.default_model)

    def _start_staging(self, model: str) -> asyncio.Task[Staged]:
        task = self._staging.get(model)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.create_task(self._stage(model))
            self._staging[model] = task
        return task

    @handles(Stage)
    async def on_stage(self, msg: Stage, env: Envelope) -> None:
        asyncio.create_task(self._answer(env, self._start_staging(msg.model)))

    async def _answer(self, env: Envelope, task: asyncio.Task[Staged]) -> None:
        try:
            answer = await asyncio.shield(task)
        except Exception as exc:
            answer = Error(code=ErrorCode.unknown_model if isinstance(exc, KeyError) else ErrorCode.internal,
                           message=str(exc) if isinstance(exc, sources.ModelSourceError)
                           else f"{type(exc).__name__}: {exc}")
        await self.reply(env, answer)

    async def _stage(self, model: str) -> Staged:
        entry = self.config.models.get(model)
        if entry is None:
            raise KeyError(f"unknown model {model!r}")
        path = await asyncio.to_thread(sources.resolve, model, entry, self.config.model_cache)
        size = await asyncio.to_thread(sources.read_through, path)
        log.info("staged %s (%d bytes) from %s", model, size, path)
        return Staged(model=model, path=str(path) if path else "", bytes=size)


def loader_name(node: str) -> str:
    return f"loader-{node}"


def main(argv: list[str] | None = None) -> int:
    from atelier.runtime import quiet_model_libraries, setup_logging

    parser = argparse.ArgumentParser(prog="atelier loader", description="Run a node's loader.")
    parser.add_argument("--config")
    parser.add_argument("--router")
    parser.add_argument("--node", default=socket.gethostname())
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, f"loader-{args.node}")
    quiet_model_libraries()
    config = load_config(args.config)
    run_actor(Loader(config, args.router or config.broker.router, node=args.node))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
