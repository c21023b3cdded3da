"""A gang's process group: one process per device, ranks 0 … world-1, joined once for the process's life.

Rank 0 (the runner on the broker) tells the other ranks what to do over the process group itself, never
over ZeroMQ: a command is a msgpack map, broadcast as its length, then its bytes (uint8 tensors; no
pickle, so no rank ever runs what a peer sent). After each command every rank says whether it went well
(``agree``). Each denoising step rank 0 also broadcasts whether to go on (``step``), so a cancel stops every
rank at the same step. A peer that dies makes the next collective raise; one that hangs makes it time out
(``join``'s ``timeout_s``): either way the collective raises ``GangBroken`` rather than waiting forever.

These go over gloo, with tensors in host memory, even in a gang on CUDA (NCCL carries the model's own
collectives): a rank waiting for rank 0's next command then waits in a socket, not in an NCCL kernel
that would spin on its GPU, which a single-device runner may be using meanwhile.
"""

from __future__ import annotations

import datetime
import enum
import logging
import os
from typing import Any

import msgpack

log = logging.getLogger("atelier.gang")

_MAX_COMMAND = 1 << 30  # bytes: a command larger than this is a bug (the inputs of a batch are far smaller)
_control: Any = None  # the gloo group of a gang whose default group is NCCL (None: the default group is gloo)


class GangBroken(RuntimeError):
    """A collective of the gang failed: a peer died, hung past the timeout, or disagreed. The gang is
    no longer in step: its processes must all start again."""


def backend_for(device: str) -> str:
    """The torch.distributed backend of a gang on ``device`` (this process's torch device)."""
    return "nccl" if device.startswith("cuda") else "gloo"


def join(rank: int, world: int, port: int, backend: str, timeout_s: float) -> None:
    """Forms (or finds formed) the default process group of the gang whose rank 0 listens on ``port``
    (loopback: a gang is one host's devices). Every collective afterwards fails after ``timeout_s``."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # What torchrun would have set, for libraries that read it (xfuser): LOCAL_RANK 0, since each rank sees
    # only its own GPU (actors/runner.py own_gpu).
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    global _control
    if backend != "gloo":  # every rank makes it, in the same order: now
        _control = dist.new_group(backend="gloo", timeout=timeout)
    log.info("rank %d of %d formed process group (%s, port %d)", rank, world, backend, port)


def encode(value: Any) -> bytes:
    """msgpack, with enums as their values and memoryviews as bytes (what ``model_dump`` leaves)."""
    return msgpack.packb(value, default=_plain, use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    raise TypeError(f"cannot send {type(value).__name__} to the gang")


class Channel:
    """Rank 0's commands to the other ranks, and the collectives every rank calls in the same order (over
    gloo: the default group on the CPU, a gloo group of the same ranks beside NCCL on CUDA)."""

    def __init__(self, rank: int, world: int):
        self.rank = rank
        self.world = world

    def _collective(self, what: str, call: Any, *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, group=_control, **kwargs)
        except Exception as exc:  # gloo's RuntimeError, NCCL's DistBackendError, a timeout
            raise GangBroken(f"{what} failed on rank {self.rank}: {str(exc)[:300]}") from None

    def _broadcast_bytes(self, data: bytes | None, src: int) -> bytes:
        import torch
        import torch.distributed as dist

        length = torch.tensor([len(data) if self.rank == src and data is not None else 0], dtype=torch.int64)
        self._collective("broadcast", dist.broadcast, length, src)
        size = int(length.item())
        if not 0 <= size <= _MAX_COMMAND:
            raise GangBroken(f"rank {src} sent a message of {size} bytes")
        if self.rank == src:
            buffer = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8) if size else None
        else:
            buffer = torch.empty(size, dtype=torch.uint8)
        if size:
            self._collective("broadcast", dist.broadcast, buffer, src)
        return buffer.numpy().tobytes() if self.rank != src else (data or b"")

    def send(self, command: dict[str, Any]) -> None:
        """Rank 0: hands ``command`` to every other rank (each is waiting in ``receive``)."""
        assert self.rank == 0
        self._broadcast_bytes(encode(command), 0)

    def receive(self) -> dict[str, Any]:
        """A rank other than 0: the next command of rank 0."""
        assert self.rank != 0
        command = decode(self._broadcast_bytes(None, 0))
        if not isinstance(command, dict) or not isinstance(command.get("op"), str):
            raise GangBroken(f"rank 0 sent something that is not a command: {type(command).__name__}")
        return command

    def share(self, value: Any, src: int) -> Any:
        """``value`` (msgpack-encodable) of rank ``src``, on every rank; the others pass None."""
        return decode(self._broadcast_bytes(encode(value) if self.rank == src else None, src))

    def agree(self, ok: bool) -> bool:
        """Whether every rank is ok (a collective: every rank calls it)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        self._collective("agree", dist.all_reduce, flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def step(self, cancel: bool = False) -> bool:
        """Each step, on every rank: rank 0's word on whether to stop here (``cancel``, on rank 0)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if cancel and self.rank == 0 else 0], dtype=torch.int32)
        self._collective("step", dist.broadcast, flag, 0)
        return bool(flag.item())
