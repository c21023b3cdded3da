"""The ``atelier`` command: start the system or its parts, and use it from a terminal.

    atelier up                      broker, scheduler and a node on this machine
    atelier generate "a lighthouse" submit over ZeroMQ, show progress, write the images
    atelier status [--user NAME | --all] | models | cancel JOB
    atelier lease cuda:0 8GiB --for 10m   hold GPU memory for another program until Ctrl-C or the time is up
    atelier pause | resume | drain | undrain | front | priority | reload   an operator's controls
    atelier events [--json]         the cluster's events (queue busy/idle, leases, operator actions)
    atelier broker | scheduler | node --router tcp://HOST:5555   each part on its own
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from atelier import topology
from atelier.config import Config
from atelier.public import scrub
from atelier.runtime import INTERRUPTED, READY_PREFIX, Failure, add_common_options, process_main
from atelier.supervisor import Supervisor
from frontends import cli_events, cli_operator

if TYPE_CHECKING:  # the wire types load with the commands that use them
    from atelier.jobs import JobInputs


def _endpoints(args: argparse.Namespace, config: Config) -> tuple[str, str]:
    return args.router or config.broker.router, args.pub or config.broker.pub


# --------------------------------------------------------------------------- #
# atelier up


async def _up(args: argparse.Namespace, config: Config, stop: asyncio.Event) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)  # a message is one line, however narrow the terminal or pipe
    router, pub = _endpoints(args, config)
    http = None if not config.http.enabled or args.http == "off" else (
        args.http or f"{config.http.host}:{config.http.port}")
    place = topology.Place(router=router, pub=pub, config_path=args.config, log_level=args.log_level,
                           journal=args.journal, devices=args.devices.split(",") if args.devices else [],
                           listen=http)
    supervisor = Supervisor()
    try:
        await topology.start(supervisor, topology.UP, place)
        # Ready means every runner this machine was told to start has joined (when the node finds its
        # devices itself, the first one): a user's first status or job then sees them all.
        # A gang is one runner.
        singles = place.devices or config.node.devices
        runners = (len(singles) if singles is not None else 1) + len(config.node.gangs)
        status = await _wait_for_runners(place.router, place.pub, runners, timeout=args.ready_timeout, stop=stop,
                                         config=config)
        if status is not None:
            router, pub = place.router, place.pub
            console.print(f"[bold green]atelier is up[/bold green]\n"
                          f"  broker   {router}  (events on {pub})\n"
                          f"  runners  {', '.join(f'{r.name} ({r.capabilities.device})' for r in status.runners)}\n"
                          f"  models   {', '.join(config.models)}\n"
                          + (f"  web      {place.http_url}  (HTTP API, OpenAI and AUTOMATIC1111 APIs, /metrics)\n"
                             if place.http_url else "") +
                          f"  try:     atelier generate \"a lighthouse\" --router {router} --pub {pub}\n"
                          f"  Ctrl-C stops everything.")
            print(READY_PREFIX + json.dumps({"router": router, "pub": pub, "http": place.http_url}), flush=True)
            await stop.wait()
    finally:
        if supervisor.children:
            console.print("stopping atelier…")
        await supervisor.stop()
    return 0


async def _wait_for_runners(router: str, pub: str, runners: int, *, timeout: float, stop: asyncio.Event,
                            config: Config):
    """Returns the cluster status once ``runners`` runners have registered, None if stopped first."""
    from actors.actor import RemoteError
    from actors.keys import for_peer
    from frontends.client import AtelierClient

    async def poll():
        async with AtelierClient(router, pub, keys=for_peer(config)) as client:
            while not stop.is_set():
                try:
                    status = await client.status()
                    if len(status.runners) >= runners:
                        return status
                except (RemoteError, asyncio.TimeoutError):
                    pass  # the scheduler is still starting
                await asyncio.sleep(0.2)
        return None

    try:
        return await asyncio.wait_for(poll(), timeout)
    except Failure:
        raise
    except TimeoutError:
        raise Failure(f"atelier did not come up: {runners} runner(s) did not join within {timeout:.0f}s (the log "
                      "above may say why; --ready-timeout waits longer)") from None


# --------------------------------------------------------------------------- #
# atelier generate / status / cancel / models


async def _keys(args: argparse.Namespace, config: Config) -> int:
    from actors.keys import AUTHORIZED, folder_of, make, read_grant

    folder = Path(args.dir).expanduser() if args.dir else folder_of(config)
    try:
        written = make(folder, args.name, role=args.role, node=args.node)
        _, grant = read_grant(folder / AUTHORIZED / f"{args.name}.key")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    granted = "any role and name (keep it on this host; --role makes narrower pairs)" if grant.unbound else \
        f"{' or '.join(grant.roles)} named {' or '.join(grant.names)}"
    print(f"{folder}: the broker's pair and {args.name!r}, authorized as {granted}. Turn CURVE on with "
          "[broker] curve = true"
          + (f" and, on the hosts that use this pair, peer_key = {args.name!r}" if args.name != "peer" else "")
          + "; other hosts need broker.key and their own pair.")
    return 0


@contextlib.asynccontextmanager
async def _connect(router: str, pub: str, config: Config, timeout: float = 5.0):
    """A client of the atelier at ``router``; no broker or no scheduler there is a Failure that says so."""
    from actors.actor import RemoteError
    from actors.keys import for_peer
    from frontends.client import AtelierClient

    client = AtelierClient(router, pub, keys=for_peer(config))
    try:
        await client.start(timeout=timeout)  # NoBroker: nothing answers there
    except TimeoutError:
        await client.close(drain_timeout=0)
        raise
    try:
        yield client
    except RemoteError as exc:
        if not _unroutable(exc):
            raise
        raise Failure(f"no scheduler answers at {router}: a broker runs there, but no scheduler has joined it. "
                      f"Start atelier with `atelier up` (or a scheduler with `atelier scheduler --router "
                      f"{router}`), or pass --router to reach another", 3) from None
    except Failure:
        raise
    except TimeoutError:
        raise Failure(f"the scheduler at {router} did not answer in time: it may be overloaded or stuck "
                      "(`atelier status` shows it, its log says why)", 3) from None
    finally:
        await client.close()


def _unroutable(exc) -> bool:
    """A refusal from the broker that no scheduler is there to ask, rather than from the scheduler."""
    from atelier.jobs import ErrorCode

    return exc.error.code is ErrorCode.unroutable


async def _generate(args: argparse.Namespace, config: Config) -> int:
    from rich.console import Console

    from actors.actor import RemoteError
    from atelier.artifacts import extension_for
    from atelier.jobs import JobSpec, JobState

    console = Console(stderr=True, soft_wrap=True)  # a message is one line, however narrow the terminal or pipe
    if (args.mask or args.strength is not None) and not args.image:
        console.print("[red]error:[/red] --mask and --strength go with --image")
        return 2
    try:
        inputs = _inputs(args)
        loras = dict(_lora(text) for text in args.lora)
    except (OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    model = args.model or config.default_model
    router, pub = _endpoints(args, config)
    out_dir = Path(args.output)
    async with _connect(router, pub, config) as client:
        try:
            # A control or reference image steers a job; only --image is one to start from.
            kind = args.kind or await _default_kind(client, model, from_image=args.image is not None)
            spec = JobSpec(model=model, prompt=args.prompt, negative_prompt=args.negative, width=args.width,
                           height=args.height, steps=args.steps, guidance=args.guidance, seed=args.seed,
                           sampler=args.sampler, schedule=args.schedule, count=args.count, user=args.user,
                           priority=args.priority, kind=kind,
                           strength=args.strength, frames=args.frames, fps=args.fps, duration_s=args.duration,
                           loras=loras, output_format=args.format, controlnet=args.controlnet,
                           controlnet_scale=args.controlnet_scale, ip_adapter_scale=args.ip_adapter_scale)
            record = await client.submit(spec, inputs=inputs)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                console.print(f"[red]error:[/red] {'.'.join(map(str, err['loc']))}: {err['msg']}")
            return 2
        except ValueError as exc:  # a kind the model does not do (ValidationError, above, is one too)
            console.print(f"[red]error:[/red] {exc}")
            return 2
        except RemoteError as exc:
            if _unroutable(exc):
                raise  # _connect says there is no scheduler
            console.print(f"[red]error:[/red] {_refusal(exc)}")
            return 2
        result = await _follow(client, console, record, record.spec.steps, args.timeout)
        if result is None:
            return 1
        if result.job.state is not JobState.done:
            console.print(f"[red]job {spec.id} {result.job.state.value}:[/red] {scrub(result.job.reason or '')}")
            return 1
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, artifact in enumerate(result.outputs):
            path = out_dir / f"{spec.id}-{index}{extension_for(artifact.media_type)}"
            path.write_bytes(artifact.data)
            print(path)
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


async def _train(args: argparse.Namespace, config: Config) -> int:
    """Trains a LoRA from a folder of images (each with an optional caption in a .txt file of the same name),
    showing a progress bar with the loss; the LoRA is then the user's, usable with --lora NAME."""
    from rich.console import Console

    from actors.actor import RemoteError
    from atelier.jobs import JobInputs, JobKind, JobSpec, JobState, TrainSpec

    console = Console(stderr=True, soft_wrap=True)
    folder = Path(args.images)
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        console.print(f"[red]error:[/red] --images {folder}: {exc.strerror or exc}")
        return 2
    if not files:
        console.print(f"[red]error:[/red] --images {folder}: no .png, .jpg or .webp files there")
        return 2
    captions = [p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else "" for p in files]
    try:
        train = TrainSpec(name=args.name, captions=captions if any(captions) else [], steps=args.steps,
                          rank=args.rank, alpha=args.alpha, learning_rate=args.learning_rate,
                          resolution=args.resolution, batch_size=args.batch_size,
                          train_text_encoder=args.train_text_encoder, checkpoint_every=args.checkpoint_every,
                          sample_every=args.sample_every, class_prompt=args.class_prompt,
                          class_images=args.class_images)
        spec = JobSpec(kind=JobKind.train, model=args.model or config.default_model, prompt=args.prompt, seed=args.seed,
                       user=args.user, train=train)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            console.print(f"[red]error:[/red] {'.'.join(map(str, err['loc']))}: {err['msg']}")
        return 2
    inputs = JobInputs(train_images=[p.read_bytes() for p in files])
    router, pub = _endpoints(args, config)
    async with _connect(router, pub, config) as client:
        try:
            record = await client.submit(spec, inputs=inputs)
        except RemoteError as exc:
            if _unroutable(exc):
                raise
            console.print(f"[red]error:[/red] {_refusal(exc)}")
            return 2
        result = await _follow(client, console, record, train.steps, args.timeout, loss=True)
        if result is None:
            return 1
        if result.job.state is not JobState.done:
            console.print(f"[red]training {spec.id} {result.job.state.value}:[/red] {scrub(result.job.reason or '')}")
            return 1
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        for artifact, suffix in zip(result.outputs, ("", ".kohya"), strict=False):
            path = out_dir / f"{args.name}{suffix}.safetensors"
            path.write_bytes(artifact.data)
            print(path)
        console.print(f"LoRA {args.name} is ready: atelier generate --model {spec.model} --lora {args.name} …")
    return 0


def _refusal(exc) -> str:
    """A scheduler's refusal in one line; most name their field already ("loras: …"): said once."""
    field = exc.error.field
    named = f"{field}: " if field and not exc.error.message.startswith(f"{field}:") else ""
    return f"{named}{scrub(exc.error.message)}"


async def _follow(client, console, record, total: int | None, timeout: float | None, *, loss: bool = False):
    """The job's progress as a bar (with a training's loss) until its result, which it returns; None where the
    user gave up (a timeout, Ctrl-C), after cancelling the job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from actors.messages import JobEvent, JobResult
    from actors.messages import Progress as StepProgress

    job_id = record.spec.id
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               *([TextColumn("loss {task.fields[loss]}")] if loss else []), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(record.state.value, total=total, loss="-")
        try:
            async for event in client.events(job_id, timeout=timeout):
                if isinstance(event, JobEvent):
                    bar.update(task, description=_describe(event))
                elif isinstance(event, StepProgress):
                    shown = f"{event.loss:.4f}" if event.loss is not None else "-"
                    bar.update(task, completed=event.step, total=event.total, loss=shown)
                elif isinstance(event, JobResult):
                    return event
        except (asyncio.TimeoutError, asyncio.CancelledError, KeyboardInterrupt):
            pass
    await client.cancel(job_id)
    console.print(f"[yellow]gave up waiting; cancelled {job_id}[/yellow]")
    return None


def _inputs(args: argparse.Namespace) -> JobInputs | None:
    """The files --image, --mask, --control-image and --ip-adapter-image name, read; None when there are none."""
    from atelier.jobs import JobInputs

    found = {}
    for name in ("image", "mask", "control_image", "ip_adapter_image"):  # JobInputs' fields, and the options' dests
        path = getattr(args, name)
        if path:
            try:
                found[name] = Path(path).read_bytes()
            except OSError as exc:
                raise OSError(f"--{name.replace('_', '-')} {path}: {exc.strerror or exc}") from None
    return JobInputs(**found) if found else None


async def _default_kind(client, model: str, *, from_image: bool) -> str:
    """What to ask of ``model`` when --kind is not given: an image from a prompt (else a video, else a
    sound); from an --image, an edit (else an upscale, else a video). An unknown model is left to the
    scheduler, whose refusal lists the models there are."""
    from atelier.jobs import JobKind

    info = next((m for m in await client.models() if m.name == model), None)
    if info is None:
        return (JobKind.img2img if from_image else JobKind.txt2img).value
    kind = JobKind.default_for(info.kinds, from_image=from_image)
    if kind is None:
        does = ", ".join(k.value for k in info.kinds)
        raise ValueError(f"{model} does {does}: " + ("it takes no --image" if from_image else "give it an --image"))
    return kind.value


def _lora(text: str) -> tuple[str, float]:
    """--lora NAME or NAME=SCALE (scale 1 when not given)."""
    name, _, scale = text.partition("=")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise ValueError(f"--lora {text}: the scale after '=' is a number, e.g. {name}=0.8") from None


def _describe(event) -> str:
    """A job's state for the progress bar: 'queued #3, about 12 s'."""
    words = event.state.value
    if event.position is not None:
        words += f" #{event.position + 1}"
    if event.eta_s is not None and not event.state.terminal:
        words += f", about {event.eta_s:.0f} s"
    return words


async def _status(args: argparse.Namespace, config: Config) -> int:
    from rich.console import Console
    from rich.table import Table

    async with _connect(*_endpoints(args, config), config) as client:
        status = await client.status()
        mine = [] if args.all else await client.jobs_of(args.user, limit=JOBS_SHOWN)
        controls = await cli_operator.controls(client)
    # Everyone's job ids are for --all: by default a person sees their own jobs and how busy the rest is.
    shown = {record.spec.id for record in mine}
    table = Table(title="runners")
    for column in ("node", "runner", "device", "job", "resident on the device", "budget (leased)"):
        table.add_column(column)
    for runner in sorted(status.runners, key=lambda r: (r.capabilities.node or "", r.name)):
        caps = runner.capabilities
        job = "idle" if not runner.job else runner.job if args.all or runner.job in shown else "busy"
        table.add_row(caps.node or "-", runner.name, caps.device_name or caps.device or "-", job,
                      _sizes(caps.resident), _budget(caps))
    staged = Table(title="staged in shared memory")
    for column in ("node", "models", "used / budget"):
        staged.add_column(column)
    for loader in sorted(status.loaders, key=lambda s: s.node):
        staged.add_row(loader.node, _sizes(loader.staged),
                       f"{_mib(sum(loader.staged.values()))} / {_mib(loader.budget_bytes)}")
    console = Console()
    console.print(table)
    console.print(staged)
    for lease in status.leases:
        console.print(f"lease {lease.id}: {_mib(lease.bytes)} on {lease.device or 'every device'} of {lease.node} "
                      f"for {lease.holder or '?'}, {lease.state}"
                      + (f" until {_clock(lease.expires_at)}" if lease.expires_at else "")
                      + f" ({', '.join(lease.runners)})")
    console.print(f"queue: {status.queued_total} job(s)"
                  + (f" — next: {', '.join(status.queued[:5])}" if args.all and status.queued else ""))
    if controls is not None:
        console.print(f"operator: {cli_operator.describe(controls)}", highlight=False)
    console.print("jobs: " + (", ".join(f"{k} {v}" for k, v in sorted(status.counts.items())) or "none yet"))
    if not args.all:
        jobs = Table(title=f"jobs of {args.user} (newest first; --all for the whole queue)")
        jobs.add_column("job", no_wrap=True)  # an id cut in two cannot be pasted into `atelier cancel`
        for column in ("state", "model", "prompt"):
            jobs.add_column(column)
        for record in mine:
            prompt = " ".join(record.spec.prompt.split())[:60]
            jobs.add_row(record.spec.id, record.state.value, record.spec.model, prompt)
        console.print(jobs if mine else f"{args.user} has no jobs the scheduler remembers")
    return 0


JOBS_SHOWN = 20  # of the user's jobs, newest first


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB"


def _budget(caps) -> str:
    if not caps.full_budget_bytes:
        return "-"
    return _mib(caps.budget_bytes) + (f" ({_mib(caps.leased_bytes)} leased)" if caps.leased_bytes else "")


def _clock(at: float) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(at))


async def _lease(args: argparse.Namespace, config: Config) -> int:
    """Holds a VRAM lease until Ctrl-C or --for is up: a line when granted, a line when given back."""
    import time

    from actors.actor import RemoteError
    from actors.messages import MAX_LEASE_S, MAX_LEASE_WAIT_S
    from atelier.vram import parse_duration, parse_size, size_text

    try:
        size, ttl = parse_size(args.size), parse_duration(args.for_)
        if ttl > MAX_LEASE_S or not 0 < args.wait <= MAX_LEASE_WAIT_S:
            raise ValueError(f"--for is at most {MAX_LEASE_S:.0f} s (a day) and --wait at most "
                             f"{MAX_LEASE_WAIT_S:.0f} s; a lease held longer is taken again")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = None if args.device == "all" else args.device
    async with _connect(*_endpoints(args, config), config) as client:
        try:
            lease = await client.take_lease(device, size, ttl, node=args.node, urgent=args.urgent,
                                            holder=args.holder, wait_s=args.wait)
        except RemoteError as exc:
            if _unroutable(exc):
                raise  # _connect says there is no scheduler
            print(f"error: {_refusal(exc)}", file=sys.stderr)
            return 1
        print(f"lease {lease.id}: {size_text(lease.bytes)} held on {lease.device or 'every device'} of {lease.node} "
              f"until {_clock(lease.expires_at or 0)} ({size_text(lease.freed_bytes)} freed); Ctrl-C gives it back",
              flush=True)
        why = "time is up"
        try:
            await asyncio.sleep(max(0.0, (lease.expires_at or 0) - time.time()))
        except asyncio.CancelledError:
            why = "interrupted"
            raise
        finally:
            with contextlib.suppress(RemoteError, TimeoutError):
                await asyncio.wait_for(client.end_lease(lease.id), 5.0)
            print(f"lease {lease.id}: given back ({why})", flush=True)
    return 0


def _sizes(models: dict[str, int]) -> str:
    return ", ".join(f"{name} ({_mib(size)})" for name, size in models.items()) or "-"


async def _cancel(args: argparse.Namespace, config: Config) -> int:
    from actors.actor import RemoteError

    async with _connect(*_endpoints(args, config), config) as client:
        try:
            record = await client.cancel(args.job)
        except RemoteError as exc:
            if _unroutable(exc):
                raise  # _connect says there is no scheduler
            print(f"error: {scrub(exc.error.message)}", file=sys.stderr)
            return 1
    print(f"{args.job}: {record.state.value}" + (" (stopping at its next step)" if not record.state.terminal
                                                  else ""))
    return 0


async def _models(args: argparse.Namespace, config: Config) -> int:
    async with _connect(*_endpoints(args, config), config) as client:
        models = await client.models()
    for m in models:
        extras = "".join([f"; ControlNets: {', '.join(m.controlnets)}" if m.controlnets else "",
                          "; IP-Adapter" if m.ip_adapter else ""])
        print(f"{m.name:<16} {m.family:<8} default {m.default_width}x{m.default_height}, "
              f"{m.default_steps} steps; max {m.max_width}x{m.max_height}{extras}")
    return 0


# --------------------------------------------------------------------------- #
# parsing


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "anonymous"


def _parser() -> argparse.ArgumentParser:
    from typing import get_args

    from atelier.jobs import JobKind, SamplerName, ScheduleName

    parser = argparse.ArgumentParser(prog="atelier", description="Serve diffusion models to many people at once.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, *, connects: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        return add_common_options(p, log_level="WARNING" if name != "up" else "INFO",
                                  router="the broker's ROUTER endpoint (default from the config)" if connects else None,
                                  pub="the broker's XPUB endpoint (default from the config)" if connects else None)

    up = command("up", "start broker, scheduler and a node on this machine")
    up.add_argument("--devices", help="comma-separated devices for the node (default: every GPU, else cpu)")
    up.add_argument("--ready-timeout", type=float, default=300.0)
    up.add_argument("--http", help="HOST:PORT for the HTTP API and web page (default from the config, "
                                   "127.0.0.1:8080), or off")
    up.add_argument("--journal", help="the scheduler's job journal (default from the config: journal.sqlite3 "
                                      "beside the artifact folder)")

    gen = command("generate", "generate images and write them to a folder")
    gen.add_argument("prompt")
    gen.add_argument("--model")
    gen.add_argument("--negative")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--sampler", choices=list(get_args(SamplerName)),
                     help="the solver (default: the model's own scheduler; families differ in which they take)")
    gen.add_argument("--schedule", choices=list(get_args(ScheduleName)), help="with --sampler: how its noise "
                     "levels are spaced (karras, exponential, beta, trailing)")
    gen.add_argument("--image", help="start from this image (img2img)")
    gen.add_argument("--mask", help="with --image: repaint where this mask is white (inpainting)")
    gen.add_argument("--strength", type=float, help="with --image: how far from it, 0 to 1 (default 0.75)")
    gen.add_argument("--controlnet", metavar="NAME", help="one of the model's ControlNets (atelier models lists "
                                                          "them), to read --control-image")
    gen.add_argument("--control-image", metavar="FILE", help="with --controlnet: the image it reads (edges, "
                                                             "depth, pose…)")
    gen.add_argument("--controlnet-scale", type=float, metavar="SCALE",
                     help="with --controlnet: how strongly it steers, 0 to 2 (default 1)")
    gen.add_argument("--ip-adapter-image", metavar="FILE", help="an image as a prompt, for a model with an "
                                                                "IP-Adapter")
    gen.add_argument("--ip-adapter-scale", type=float, metavar="SCALE",
                     help="with --ip-adapter-image: how strongly it steers, 0 to 2 (default 1)")
    gen.add_argument("--kind", choices=[k.value for k in JobKind if k is not JobKind.train],
                     help="what to make (default: by the model, from the prompt or from --image)")
    gen.add_argument("--frames", type=int, help="video: frames to make")
    gen.add_argument("--fps", type=int, help="video: frames a second in the file")
    gen.add_argument("--duration", type=float, help="audio: seconds to make")
    gen.add_argument("--lora", action="append", default=[], metavar="NAME[=SCALE]",
                     help="apply one of the model's LoRAs, or one you trained (repeatable; scale 1 by default)")
    gen.add_argument("--format", choices=["png", "webp", "mp4", "gif", "wav", "flac"],
                     help="the output files' format (default: png, mp4 or wav, by what the model makes)")
    gen.add_argument("--count", type=int, default=1)
    gen.add_argument("--user", default=_login(), help="whose turn this is in the fair share (default: your login)")
    gen.add_argument("--priority", choices=["live", "interactive", "batch"], default="interactive",
                     help="batch jobs wait for interactive ones (default: interactive)")
    gen.add_argument("-o", "--output", default="out", help="folder for the images (default: ./out)")
    gen.add_argument("--timeout", type=float, default=None, help="give up (and cancel) after this many seconds")

    train = command("train", "train a LoRA on a model from a folder of images; it is then yours: --lora NAME")
    train.add_argument("--images", required=True, metavar="DIR",
                       help="the instance images (.png, .jpg, .webp); a .txt of the same name is its caption")
    train.add_argument("--name", required=True, help="the LoRA's name, as your jobs will choose it")
    train.add_argument("--prompt", default="a photo of sks", help="the instance prompt: the caption of every image "
                                                                   "without a .txt (default: 'a photo of sks')")
    train.add_argument("--model", help="the base model (default: the catalog's default)")
    train.add_argument("--steps", type=int, default=500)
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--resolution", type=int, default=512)
    train.add_argument("--batch-size", type=int, default=1)
    train.add_argument("--train-text-encoder", action="store_true", help="adapters on the text encoder(s) too")
    train.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (a crash "
                                                                         "loses at most this many)")
    train.add_argument("--sample-every", type=int, help="steps between sample images (default: --checkpoint-every)")
    train.add_argument("--class-prompt", help="prior preservation: the class ('a photo of a dog')")
    train.add_argument("--class-images", type=int, default=0, help="with --class-prompt: class images to make")
    train.add_argument("--seed", type=int)
    train.add_argument("--user", default=_login(), help="who owns the LoRA (default: your login)")
    train.add_argument("-o", "--output", default="out", help="folder for the LoRA files (default: ./out)")
    train.add_argument("--timeout", type=float, default=None, help="give up (and cancel) after this many seconds")

    keys = command("keys", "make CURVE key pairs for [broker] curve = true (the broker's, and one for peers)",
                   connects=False)
    keys.add_argument("--name", default="peer", help="the peers' key pair to make and authorize (default: peer)")
    keys.add_argument("--role", choices=["all", "scheduler", "node", "frontend"],
                      help="what the pair may register as: all (any name and role: one host's own peers), the "
                           "scheduler, a node's loader and runners, or a frontend (HTTP, Discord, the CLI). "
                           "Default: all for a new pair; an existing pair keeps its grant unless given")
    keys.add_argument("--node", help="with --role node: the node's name (default: the pair's name)")
    keys.add_argument("--dir", help="the keys folder (default: [broker] keys, else <home>/keys)")

    status = command("status", "show nodes, runners, resident models, the queue and your jobs")
    whose = status.add_mutually_exclusive_group()
    whose.add_argument("--user", default=_login(), help="whose jobs to list (default: your login)")
    whose.add_argument("--all", action="store_true", help="every job id: the queue's and the runners' (the operator's "
                                                          "view), rather than one user's jobs")
    lease = command("lease", "hold GPU memory for another program: atelier evicts models until it is free, and "
                             "takes it back at Ctrl-C or when --for is up")
    lease.add_argument("device", help="a runner's device as `atelier status` shows it (cuda:0, cpu), or all")
    lease.add_argument("size", help="bytes, or with a unit: 8GiB, 512MiB, 10GB")
    lease.add_argument("--for", dest="for_", default="10m", help="at most this long: 600, 90s, 10m, 2h (default 10m)")
    lease.add_argument("--node", help="the node, where the device is on several")
    lease.add_argument("--urgent", action="store_true", help="stop the running batch at its next step (it is "
                                                             "queued again, nothing lost) rather than wait for it")
    lease.add_argument("--holder", default=_login(), help="who holds it, as status shows it (default: your login)")
    lease.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the memory (default 120)")
    command("models", "list the models in the catalog")
    cancel = command("cancel", "cancel a job")
    cancel.add_argument("job")
    cli_operator.add_commands(command)
    cli_events.add_arguments(command("events", cli_events.HELP))

    for name, help_text in (("broker", "run the broker"), ("scheduler", "run the scheduler"),
                            ("node", "run a node (its loader and runners)"),
                            ("http", "run the HTTP API and web page"),
                            ("discord", "run the Discord bot (DISCORD_TOKEN from the environment or ./.env)")):
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The parts parse their own options; hand them everything after the command.
    if argv and argv[0] in ("broker", "scheduler", "node", "http", "discord"):
        if argv[0] == "broker":
            import broker

            return broker.main(argv[1:])
        if argv[0] == "http":
            from frontends import http

            return http.main(argv[1:])
        if argv[0] == "discord":
            try:
                from frontends import discord_bot
            except ImportError:  # the optional extra
                print("error: the Discord bot needs discord.py: pip install 'atelier[discord]'", file=sys.stderr)
                return 2
            return discord_bot.main(argv[1:])
        if argv[0] == "scheduler":
            from actors import scheduler

            return scheduler.main(argv[1:])
        import gpu_node

        return gpu_node.main(argv[1:])
    return process_main(_parser(), _command, argv, log_name=lambda args: "up" if args.command == "up" else None,
                        other_address="choose other ports with --router and --pub (or [broker] router and "
                                      "pub in the config)")


async def _command(args: argparse.Namespace, config: Config, stop: asyncio.Event) -> int:
    if args.command == "up":
        return await _up(args, config, stop)
    # Ctrl-C only set ``stop``: end the command then (cancelled, ``generate`` cancels its job too).
    command = asyncio.create_task(COMMANDS[args.command](args, config))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({command, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if command.done():
        return command.result()
    command.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await command
    return INTERRUPTED


COMMANDS = {"generate": _generate, "train": _train, "status": _status, "cancel": _cancel, "models": _models,
            "keys": _keys, "lease": _lease, "events": cli_events.events, **cli_operator.COMMANDS}


if __name__ == "__main__":
    sys.exit(main())
