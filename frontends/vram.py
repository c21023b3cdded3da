"""Borrowing GPU memory from atelier, for another program on the box (a chat bot, a notebook, a training).

    from frontends.vram import hold_vram

    with hold_vram("cuda:0", "8GiB", for_s=600, holder="my-bot") as lease:
        ...  # atelier keeps at least 8 GiB of cuda:0 free for this block
    # given back here (also if this process dies: atelier sees it go)

``hold_vram`` is for plain synchronous programs: the client runs on a thread of its own. An asyncio program
uses ``vram_lease`` (``async with vram_lease(...) as lease``) in its own loop. Both wait until the memory is
free (the runners on the device finish their batch, or, ``urgent``, hand it back at its next step, then
evict models), and raise ``LeaseRefused`` with atelier's reason when it cannot be had. Sizes are bytes or
text ("8GiB", "512MiB", "10GB"); the endpoints and keys come from atelier's config as for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from actors.actor import RemoteError
from atelier.config import Config, load_config
from atelier.jobs import Lease
from atelier.vram import parse_duration, parse_size

__all__ = ["LeaseRefused", "hold_vram", "vram_lease"]

START_TIMEOUT_S = 10.0


class LeaseRefused(RuntimeError):
    """atelier did not grant the lease (the reason says why), or no atelier answers."""


@contextlib.asynccontextmanager
async def vram_lease(device: str | None, size: int | str, *, for_s: float | str = 600.0, node: str | None = None,
                     urgent: bool = False, holder: str = "", wait_s: float = 120.0, router: str | None = None,
                     pub: str | None = None, config: Config | None = None) -> AsyncIterator[Lease]:
    """Holds a VRAM lease for the ``async with`` block: the granted ``Lease`` (what was freed, when it expires)."""
    from actors.keys import for_peer
    from frontends.client import AtelierClient

    config = config or load_config()
    client = AtelierClient(router or config.broker.router, pub or config.broker.pub, keys=for_peer(config))
    try:
        await client.start(timeout=START_TIMEOUT_S)
    except Exception as exc:
        await client.close(drain_timeout=0)
        raise LeaseRefused(f"no atelier answers at {client.router}: {exc}") from None
    try:
        try:
            lease = await client.take_lease(device, parse_size(size), parse_duration(for_s), node=node, urgent=urgent,
                                            holder=holder, wait_s=wait_s)
        except RemoteError as exc:
            raise LeaseRefused(exc.error.message) from None
        except asyncio.TimeoutError:
            raise LeaseRefused(f"the scheduler did not answer within {wait_s:.0f} s") from None
        try:
            yield lease
        finally:
            with contextlib.suppress(RemoteError, asyncio.TimeoutError):  # ended already: expired, say
                await client.end_lease(lease.id)
    finally:
        await client.close()


@contextlib.contextmanager
def hold_vram(device: str | None, size: int | str, *, for_s: float | str = 600.0, node: str | None = None,
              urgent: bool = False, holder: str = "", wait_s: float = 120.0, router: str | None = None,
              pub: str | None = None, config: Config | None = None) -> Iterator[Lease]:
    """``vram_lease`` for a synchronous program: the client runs on a thread with its own event loop, which
    keeps the lease alive (heartbeats) while the block runs, and gives it back when the block ends."""
    held: dict[str, Any] = {}  # the lease, or the error; the loop and the event that ends the block
    ready, done = threading.Event(), threading.Event()

    async def hold() -> None:
        held["loop"], held["release"] = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with vram_lease(device, size, for_s=for_s, node=node, urgent=urgent, holder=holder, wait_s=wait_s,
                                  router=router, pub=pub, config=config) as lease:
                held["lease"] = lease
                ready.set()
                await held["release"].wait()
        except BaseException as exc:  # handed to the caller's thread
            held["error"] = exc
        finally:
            ready.set()

    def run() -> None:
        try:
            asyncio.run(hold())
        finally:
            done.set()

    threading.Thread(target=run, name="atelier-vram-lease", daemon=True).start()
    if not ready.wait(timeout=wait_s + START_TIMEOUT_S + 30):
        raise LeaseRefused(f"no answer from atelier within {wait_s:.0f} s")
    try:
        if "error" in held:
            raise held["error"]
        yield held["lease"]
    finally:
        if not done.is_set():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile (the lease was refused)
                held["loop"].call_soon_threadsafe(held["release"].set)
        done.wait(timeout=30)
