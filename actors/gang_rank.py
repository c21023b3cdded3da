"""A gang: one runner across several devices, one process per device (a rank), in one torch.distributed group.

Rank 0 is the runner on the broker (``python -m actors.runner --device cuda:0+cuda:1 --world 2 --port P``):
the scheduler sees one runner. Its worker thread has a ``GangLeader`` for its engine (actors/runner.py
``LocalEngine``): each load, pipeline call and drop is first broadcast to the other ranks over the process
group (``atelier.gang.Channel``), then done on rank 0 as a single runner does it, then every rank agrees on
the outcome. Progress, previews and results come from rank 0 alone.

The other ranks are this module (``python -m actors.gang_rank --gang cuda:0+cuda:1 --rank 1 --world 2
--port P``): no actor, no socket to the broker, only a loop that receives rank 0's command, does it, and
agrees. Staged weights: rank 0 asks the loader, as a runner does, and broadcasts its answer; every rank
maps the same shared segment itself (one copy in host memory) and loads, then applies the model's
parallel layout (``atelier.families.parallel.parallelize``).

A collective that fails (a rank died, or hung past the timeout) ends the rank that sees it, and its node
stops and starts the whole gang again (``Supervisor.start_group``); the batch in hand is handed back.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from actors.messages import BatchItem, Staged
from atelier import gang
from atelier.config import Config, ModelEntry, ParallelLayout
from atelier.families import GenerateRequest, JobCancelled
from atelier.families.loaded import LoadedModel, LoadRequest
from atelier.gang import GangBroken
from atelier.runtime import process_main, process_parser

log = logging.getLogger("atelier.gang")

# The least time a collective waits for a peer before the gang counts as broken: ranks run in lockstep, so
# what one waits is the others' lag (a slower load, a compile), not a step's length.
GANG_TIMEOUT_S = 300.0


def gang_timeout(config: Config) -> float:
    """How long a rank waits in a collective for the others: a hung peer is an error after this."""
    from actors.runner import COMPILE_GRACE_S

    compiles = any(entry.compile and entry.parallel for entry in config.models.values())
    return max(GANG_TIMEOUT_S, config.node.step_timeout_s) + (COMPILE_GRACE_S if compiles else 0.0)


def layout_for(config: Config, model: str, devices: list[str]) -> ParallelLayout:
    """The parallel layout ``model`` runs with on a gang of ``devices``; ValueError if it has none that fits."""
    layout = config.models[model].parallel
    if layout is None or layout.size != len(devices):
        has = "no parallel layout" if layout is None else f"a parallel layout of {layout.size} devices"
        raise ValueError(f"model {model} has {has}: it does not run on the gang {'+'.join(devices)} "
                         f"of {len(devices)}")
    return layout


def start_rank(config: Config, devices: list[str], rank: int, port: int, torch_device: str) -> gang.Channel:
    """What every rank does first: its share of the CPU, the process group. (diffusers' CPU shims are
    ``parallelize``'s, where they are needed.)"""
    import torch

    if torch_device == "cpu":  # the ranks share the cores; each takes its part, not all of them
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // len(devices)))
    gang.join(rank, len(devices), port, gang.backend_for(torch_device), gang_timeout(config))
    return gang.Channel(rank, len(devices))


async def lead(config: Config, device: str, *, world: int | None, port: int | None) -> tuple[str, GangLeader]:
    """Rank 0's start: its torch device and its engine, once the whole gang has joined the process group."""
    from actors.runner import own_gpu

    devices = device.split("+")
    if port is None or world != len(devices) or len(set(devices)) != len(devices):
        raise ValueError(f"--device {device}: a gang needs --world {len(devices)} (its distinct devices) and --port")
    torch_device = own_gpu(devices[0], os.environ)  # first, before torch opens CUDA
    channel = await asyncio.to_thread(start_rank, config, devices, 0, port, torch_device)
    return torch_device, GangLeader(config, devices, torch_device, channel)


class GangLeader:
    """Rank 0's engine (see ``actors.runner.LocalEngine``): each command told to the other ranks, done
    here, then agreed on. Once a collective fails, every later command fails at once: the gang is out
    of step and must start again."""

    def __init__(self, config: Config, devices: list[str], torch_device: str, channel: gang.Channel):
        self.config = config
        self.devices = devices
        self.torch_device = torch_device
        self.channel = channel
        self.broken: str | None = None
        self._told = time.monotonic()  # when the other ranks last heard from rank 0

    @property
    def world(self) -> int:
        return len(self.devices)

    def _gang(self, call: Any, *args: Any) -> Any:
        if self.broken is not None:
            raise GangBroken(self.broken)
        try:
            return call(*args)
        except GangBroken as exc:
            self.broken = str(exc)
            raise

    def _send(self, op: str, **fields: Any) -> None:
        self._gang(self.channel.send, {"op": op, **fields})
        self._told = time.monotonic()

    def _together(self, work: Any) -> Any:
        """``work()`` here while the other ranks do theirs; raises what it raised (every rank failing alike
        is the job's failure: a bad size, say), or GangBroken when only another rank failed."""
        try:
            result = work()
        except GangBroken as exc:
            self.broken = str(exc)
            raise
        except BaseException:
            self._gang(self.channel.agree, False)
            raise
        if not self._gang(self.channel.agree, True):
            self.broken = "another rank of the gang failed where rank 0 did not (its log says why)"
            raise GangBroken(self.broken)
        return result

    def load(self, model: str, family: Any, request: LoadRequest, staged: Staged, owner: str) -> tuple[Any, bool]:
        from actors.runner import load_staged
        from atelier.families.parallel import parallelize

        layout = layout_for(self.config, model, self.devices)
        # The entry rank 0 loads: a catalog reload reaches rank 0 alone (CatalogUpdate), the others load the same.
        self._send("load", model=model, staged=staged.model_dump(), entry=self.config.models[model].model_dump_json())

        def work() -> tuple[Any, bool]:
            loaded, from_staged = load_staged(family, request, staged, owner)
            return parallelize(loaded, layout, rank=0, world=self.world, device=self.torch_device), from_staged

        return self._together(work)

    def generate(self, model: str, loaded: LoadedModel, items: list[BatchItem], request: GenerateRequest,
                 on_step: Any) -> list[Any]:
        from atelier.families.parallel import output_rank

        source = output_rank(layout_for(self.config, model, self.devices), self.world)
        self._send("generate", model=model, items=[item.model_dump() for item in items])
        outputs = self._together(lambda: loaded.generate(request, on_step))
        if source != 0:  # xfuser: another rank holds the real images
            outputs = unpack_outputs(self._gang(self.channel.share, None, source))
        return outputs

    def step(self, cancel: bool) -> bool:
        return self._gang(self.channel.step, cancel)

    def drop(self, models: list[str]) -> None:
        self._send("drop", models=models)
        self._gang(self.channel.agree, True)

    def ping(self, quiet_s: float) -> None:
        """Has every rank answer, unless they heard from rank 0 within ``quiet_s`` (or it is broken: raises)."""
        if self.broken is None and time.monotonic() - self._told < quiet_s:
            return
        self._send("ping")
        self._gang(self.channel.agree, True)

    def close(self) -> None:
        self._send("stop")


class Rank:
    """A rank other than 0: keeps its own copies (or shards) of the gang's models and does what rank 0 says."""

    def __init__(self, config: Config, name: str, devices: list[str], rank: int, torch_device: str,
                 channel: gang.Channel):
        self.config = config
        self.name = name
        self.devices = devices
        self.rank = rank
        self.torch_device = torch_device
        self.channel = channel
        self.models: dict[str, LoadedModel] = {}
        self._handlers = {"load": self._load, "generate": self._generate, "drop": self._drop,
                          "ping": lambda command: self.channel.agree(True)}

    def run(self) -> int:
        """Serves rank 0's commands until it says stop (0) or the gang breaks (``STUCK_EXIT``: start it again)."""
        from actors.runner import STUCK_EXIT

        while True:
            try:
                command = self.channel.receive()
                if command["op"] == "stop":
                    log.info("%s: rank 0 stopped", self.name)
                    return 0
                handler = self._handlers.get(command["op"])
                if handler is None:
                    raise GangBroken(f"rank 0 sent an unknown command {command['op']!r}")
                handler(command)
            except GangBroken as exc:
                log.error("%s: %s: the gang must start again", self.name, exc)
                return STUCK_EXIT

    def _load(self, command: dict[str, Any]) -> None:
        from actors import runner
        from atelier.families.parallel import parallelize

        model = command["model"]
        loaded = problem = None
        try:
            staged = Staged.model_validate(command["staged"])
            if "entry" in command:  # rank 0's, which may be a reloaded catalog's
                self.config.models[model] = ModelEntry.model_validate_json(command["entry"])
            entry = self.config.models[model]
            request = LoadRequest.for_entry(entry, Path(staged.path) if staged.path else None,
                                            device=self.torch_device, model_cache=self.config.model_cache)
            loaded, _ = runner.load_staged(runner.get_family(entry.family), request, staged, self.name)
            loaded = parallelize(loaded, layout_for(self.config, model, self.devices), rank=self.rank,
                                 world=len(self.devices), device=self.torch_device)
        except GangBroken:
            raise
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            loaded = None
        if self.channel.agree(problem is None):
            self.models[model] = loaded
            log.info("%s: loaded %s", self.name, model)
        else:  # some rank failed: none keeps it
            if problem is not None:
                log.warning("%s: loading %s failed: %s", self.name, model, problem)
            loaded = None
            self._free_memory()

    def _generate(self, command: dict[str, Any]) -> None:
        from actors.runner import batch_request, decode_inputs
        from atelier.families.parallel import output_rank

        model = command["model"]
        outputs = problem = None
        try:
            loaded = self.models.get(model)
            if loaded is None:
                raise RuntimeError(f"{model} is not loaded on rank {self.rank}")
            items = [BatchItem.model_validate(item) for item in command["items"]]
            decoded, refused = decode_inputs(items, self.config.input_pixel_budget)
            if refused:
                raise ValueError(f"inputs rank 0 read do not decode here: {refused}")
            outputs = loaded.generate(batch_request(items, decoded), self._on_step)
        except GangBroken:
            raise
        except JobCancelled:
            problem = "cancelled"
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            log.warning("%s: a pipeline call of %s failed: %s", self.name, model, problem)
        ok = self.channel.agree(problem is None)
        source = output_rank(layout_for(self.config, model, self.devices), len(self.devices))
        if ok and source != 0:
            self.channel.share(pack_outputs(outputs) if self.rank == source else None, source)
        outputs = None
        if problem is not None:
            self._free_memory()

    def _on_step(self, step: int, total: int, latents: Any) -> None:
        if self.channel.step():
            raise JobCancelled("cancelled on rank 0")

    def _drop(self, command: dict[str, Any]) -> None:
        from actors.runner import reset_compiled

        dropped = [name for name in command["models"] if self.models.pop(name, None) is not None]
        if dropped:
            log.info("%s: dropped %s", self.name, ", ".join(dropped))
        compiled = {name for name, entry in self.config.models.items() if entry.compile}
        if compiled.intersection(dropped) and not compiled.intersection(self.models):
            reset_compiled()  # as rank 0 does: no compiled model stays, so neither do its caches
        self._free_memory()
        self.channel.agree(True)

    def _free_memory(self) -> None:
        gc.collect()
        if self.torch_device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def pack_outputs(items: list[Any]) -> list[dict[str, Any]]:
    """A pipeline call's outputs as plain data, for the output rank to hand rank 0 (lossless)."""
    from atelier import media

    def image(picture: Any) -> dict[str, Any]:
        return {"mode": picture.mode, "size": list(picture.size), "pixels": picture.tobytes()}

    packed = []
    for item in items:
        if isinstance(item, media.Video):
            packed.append({"video": [image(frame) for frame in item.frames], "fps": item.fps})
        elif hasattr(item, "tobytes") and hasattr(item, "mode"):
            packed.append({"image": image(item)})
        else:
            raise TypeError(f"a gang cannot hand over a {type(item).__name__} output")
    return packed


def unpack_outputs(packed: list[dict[str, Any]]) -> list[Any]:
    from PIL import Image

    from atelier import media

    def image(data: dict[str, Any]) -> Any:
        return Image.frombytes(data["mode"], tuple(data["size"]), data["pixels"])

    return [media.Video(frames=[image(frame) for frame in item["video"]], fps=item["fps"]) if "video" in item
            else image(item["image"]) for item in packed]


# --------------------------------------------------------------------------- #
# the process


def serve(args: argparse.Namespace, config: Config, stop: threading.Event) -> int:
    from actors.runner import STUCK_EXIT, own_gpu, runner_name

    devices = args.gang.split("+")
    if args.world != len(devices) or not 1 <= args.rank < len(devices) or len(set(devices)) != len(devices):
        raise ValueError(f"--gang {args.gang} --rank {args.rank} --world {args.world}: a rank 1 to "
                         f"{len(devices) - 1} of a gang of {len(devices)} distinct devices")
    name = f"{runner_name(args.node, args.gang)}-rank{args.rank}"
    torch_device = own_gpu(devices[args.rank], os.environ)  # first, before torch opens CUDA
    ended: list[int] = []

    def work() -> None:
        from actors.runner import use_device

        try:
            use_device(torch_device)
            channel = start_rank(config, devices, args.rank, args.port, torch_device)
            ended.append(Rank(config, name, devices, args.rank, torch_device, channel).run())
        except Exception:
            log.exception("%s failed", name)
            ended.append(STUCK_EXIT)

    # Collectives block in C, where no signal handler runs: they run on a thread of their own, and a stop
    # (SIGTERM, SIGINT) ends the process at once. A rank holds no job of its own to hand back.
    thread = threading.Thread(target=work, name="gang-rank", daemon=True)
    thread.start()
    while thread.is_alive() and not stop.wait(0.5):
        pass
    return ended[0] if ended else 0


def main(argv: list[str] | None = None) -> int:
    from actors.runner import runner_name

    parser = process_parser("atelier gang rank", "Run a rank other than 0 of a gang (its node starts it).",
                            router=None)
    parser.add_argument("--node", default=socket.gethostname())
    parser.add_argument("--gang", required=True, help="the gang's devices joined by +, e.g. cuda:0+cuda:1")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="the loopback port rank 0's process group forms on")
    code = process_main(parser, serve, argv, loads_models=True,
                        log_name=lambda args: f"{runner_name(args.node, args.gang)}-rank{args.rank}")
    logging.shutdown()
    os._exit(code)  # what may still run is a collective that will never end: do not wait for it


if __name__ == "__main__":
    raise SystemExit(main())
