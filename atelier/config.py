"""atelier's configuration and model catalog (``atelier.toml``), validated by pydantic.

With no file at all, atelier runs its built-in tiny models on this machine: that is
the embedded default a new user starts with.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from atelier.jobs import Name
from atelier.registry import FAMILIES, PARALLEL_DEGREES, PARALLEL_UNOFFERED, FamilyLimits, gang_families
from atelier.tuning import Cache, CompileMode, Offload, Quantize, check_cache, check_gguf_transformer, check_speed

CONFIG_ENV = "ATELIER_CONFIG"
HOME_ENV = "ATELIER_HOME"
# The built-in tiny models' catalog, shipped with the package and read as a user's atelier.toml is.
BUILTIN_CATALOG = Path(__file__).with_name("builtin.toml")
RUN_FOLDER = "run"  # in the home: the broker's default sockets, in a folder only its user may enter


def default_home() -> Path:
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "atelier"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParallelLayout(Strict):
    """How a gang splits one of this model's pipeline calls across its devices (``[models.X.parallel]``).

    A model with a layout runs on a gang of exactly ``size`` devices (and still on single devices); one
    without never runs on a gang. Which family takes which degrees under which backend is its row's
    ``parallel`` table (atelier/registry.py), checked at config load; ``atelier.families.parallel``
    applies it to a loaded model.
    """

    # xfuser: xDiT (CUDA only; the `multigpu` extra). diffusers: diffusers' own context parallelism
    # (ContextParallelConfig), which also runs on the CPU over gloo.
    backend: Literal["xfuser", "diffusers"]
    ulysses_degree: int = Field(default=1, ge=1, le=64)  # sequence parallel, all-to-all over heads
    ring_degree: int = Field(default=1, ge=1, le=64)  # sequence parallel, K/V passed around a ring
    pipefusion_degree: int = Field(default=1, ge=1, le=64)  # xDiT's patch pipeline: stages of layers
    warmup_steps: int = Field(default=1, ge=0, le=100)  # PipeFusion's synchronous steps before it pipelines
    cfg_degree: int = Field(default=1, ge=1, le=2)  # CFG parallel: the two halves of a guided batch
    parallel_vae: bool = False  # xDiT's patch-parallel VAE decode (distvae)

    @property
    def size(self) -> int:
        """Devices (ranks) the layout spans: the product of its degrees."""
        return self.ulysses_degree * self.ring_degree * self.pipefusion_degree * self.cfg_degree

    def describe(self) -> str:
        """The size as its factors, e.g. "ulysses_degree 2 x cfg_degree 2"."""
        parts = [f"{name} {getattr(self, name)}" for name in PARALLEL_DEGREES if getattr(self, name) > 1]
        return " x ".join(parts) or "every degree 1"

    def problem(self, family: str) -> tuple[str, str] | None:
        """Why this layout does not fit ``family`` under its backend, as (the layout's field, the reason;
        "" for the layout as a whole), or None where it fits."""
        spec = FAMILIES[family]
        notes = spec.parallel_notes
        if self.backend not in spec.parallel:
            if not spec.parallel:
                return "", (f"family {family!r} runs on single devices only: no backend splits its pipeline "
                            f"(gangs run {_gang_offer()}); remove its parallel table")
            reason = notes.get((self.backend, "*")) or (f"{self.backend} does not run family {family!r}; it runs "
                                                         f"{', '.join(sorted(gang_families(self.backend)))}")
            return "backend", f"{reason} (family {family!r} takes backend {' or '.join(sorted(spec.parallel))})"
        allowed = spec.parallel[self.backend]
        for name in PARALLEL_DEGREES:
            if getattr(self, name) > 1 and name not in allowed:
                reason = notes.get((self.backend, name)) or notes.get(("*", name)) or PARALLEL_UNOFFERED.get(
                    (self.backend, name)) or f"{self.backend} does not split family {family!r} by {name}"
                return name, f"{reason}; {self.backend} takes {', '.join(sorted(allowed))} for it"
        if self.parallel_vae and (self.backend != "xfuser" or not spec.parallel_vae):
            return "parallel_vae", (f"the parallel VAE is xDiT's (backend = \"xfuser\"), for "
                                    f"{', '.join(sorted(n for n, s in FAMILIES.items() if s.parallel_vae))}")
        return None


def _gang_offer() -> str:
    return "; ".join(f"{backend}: {', '.join(sorted(gang_families(backend)))}" for backend in ("xfuser", "diffusers"))


_LIMIT_FIELDS = ("max_width", "max_height", "default_width", "default_height", "default_steps", "max_steps",
                 "default_guidance", "default_duration_s", "max_duration_s", "default_frames", "max_frames",
                 "default_fps")


@functools.lru_cache(maxsize=1024)
def _limits(family: str, overrides: tuple[tuple[str, Any], ...]) -> FamilyLimits:
    return dataclasses.replace(FAMILIES[family].limits, **dict(overrides))


class ModelEntry(Strict):
    family: str
    # "builtin:<name>" (generated on first use), a diffusers folder, a single .safetensors checkpoint
    # in the original (LDM) layout, or a hub id on an online host.
    source: str
    # For a single-file source: a diffusers folder of the same architecture, whose configs, tokenizers
    # and scheduler build the pipeline (its weights are not read). A single file carries none of them,
    # and diffusers would fetch them from the hub, which atelier never does.
    config: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    options: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    # Overrides of the family's limits and defaults, e.g. a model trained at another size.
    max_width: int | None = Field(default=None, ge=8, multiple_of=8)
    max_height: int | None = Field(default=None, ge=8, multiple_of=8)
    default_width: int | None = Field(default=None, ge=8, multiple_of=8)
    default_height: int | None = Field(default=None, ge=8, multiple_of=8)
    default_steps: int | None = Field(default=None, ge=1, le=500)
    # Steps a job may ask for at most (default: the family's, 150 for most): a 1-step turbo model
    # says 8 here, so that no one spends the GPU's time on 500 steps it does not need.
    max_steps: int | None = Field(default=None, ge=1, le=500)
    default_guidance: float | None = Field(default=None, ge=0, le=50)
    # Sound: a checkpoint's own lengths where they differ from its family's (a shorter-context model).
    default_duration_s: float | None = Field(default=None, gt=0, le=300)
    max_duration_s: float | None = Field(default=None, gt=0, le=300)
    # Video: a checkpoint's own clip length and rate (SVD-XT makes 25 frames, SVD 14).
    default_frames: int | None = Field(default=None, ge=1, le=256)
    max_frames: int | None = Field(default=None, ge=1, le=256)
    default_fps: int | None = Field(default=None, ge=1, le=60)
    # Images in one pipeline call at most (default: the family's, for the runner's device).
    max_batch: int | None = Field(default=None, ge=1, le=1024)
    # LoRAs a job may apply (JobSpec.loras), by name: a .safetensors file or a folder holding one.
    # Names as jobs and /v1/models carry them: checked here, so a bad one fails the config's load
    # rather than every listing of the models.
    loras: dict[Name, str] = Field(default_factory=dict)
    # Speed and memory, for any diffusers family (atelier/tuning.py, atelier/families/accel.py; README
    # "Model families").
    quantize: Quantize | None = None  # the denoiser's weights (torchao)
    compile: bool | CompileMode = False
    offload: Offload | None = None  # weights in RAM, on the GPU only while they run
    cache: Cache | None = None  # reuse work between steps
    cache_threshold: float | None = Field(default=None, gt=0, le=10)  # first_block: change that still skips
    cache_interval: int | None = Field(default=None, ge=1, le=100)  # taylorseer, deepcache: steps per full one
    # ControlNets a job may choose (JobSpec.controlnet), by name: diffusers ControlNetModel folders.
    controlnets: dict[Name, str] = Field(default_factory=dict)
    # An IP-Adapter (a .safetensors file as h94/IP-Adapter ships them) for jobs with an ip_adapter_image,
    # and the CLIP image encoder folder it reads (default: the image_encoder folder beside the file).
    ip_adapter: str | None = None
    ip_adapter_encoder: str | None = None
    # The folder's weight files of this variant (from_pretrained's variant=): "fp16" reads
    # diffusion_pytorch_model.fp16.safetensors where a component has one, in staging too.
    variant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    # An AutoencoderKL folder that replaces the pipeline's VAE (e.g. sdxl-vae-fp16-fix).
    vae: str | None = None
    # An AutoencoderTiny folder (TAESD) that decodes the step previews in place of the linear projection.
    preview_decoder: str | None = None
    # A GGUF file (city96's FLUX.1 and SD3 quantizations: flux1-dev-Q8_0.gguf, …) the transformer is read
    # from, quantized, in place of the folder's; the rest comes from `source` (atelier/families/gguf.py).
    transformer: str | None = None
    # A hub id source's revision: a commit hash (40 hex digits) pins what runs, so that a push to the
    # repository changes nothing here until this line does; a branch or tag name follows it.
    # Default: the repository's main branch.
    revision: str | None = Field(default=None, min_length=1, max_length=100, pattern=r"^[\w.-]+$")
    # Gangs: how one call of this model is split across several devices (ParallelLayout); checked
    # against the family and the node's gangs when the whole config loads (Config._layouts).
    parallel: ParallelLayout | None = None

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown family {value!r}; known: {', '.join(sorted(FAMILIES))}")
        return value

    @model_validator(mode="after")
    def _tuning(self) -> "ModelEntry":
        check_cache(self.cache, self.cache_threshold, self.cache_interval)
        check_gguf_transformer(self.family, self.transformer, self.quantize)
        check_speed(self.quantize, self.offload, self.cache, self.compile)
        if self.offload is not None and self.controlnets:
            # The offload hooks know only the pipeline's own parts: a ControlNet would stay on the CPU.
            raise ValueError(f"offload = {self.offload!r} does not go with controlnets: a ControlNet beside an "
                             "offloaded model is never moved to the GPU; drop one of them")
        limits = self.limits
        if limits.default_steps > limits.max_steps:
            raise ValueError(f"default_steps {limits.default_steps} is above max_steps {limits.max_steps}; "
                             "raise max_steps or lower default_steps")
        return self

    @property
    def limits(self) -> FamilyLimits:
        """The family's limits with this entry's overrides (asked at every submit: made once per set of them)."""
        return _limits(self.family, tuple((k, getattr(self, k)) for k in _LIMIT_FIELDS if getattr(self, k) is not None))


def builtin_models() -> dict[str, ModelEntry]:
    """The built-in tiny models' entries (``BUILTIN_CATALOG``), fresh on every call."""
    return read_config(BUILTIN_CATALOG).models


class BrokerConfig(Strict):
    # Default (empty): ipc://<home>/run/router and .../pub, Unix sockets in a 0700 folder, which other
    # local users cannot reach. tcp://127.0.0.1:PORT serves every local user (and any host, with CURVE).
    router: str = ""
    pub: str = ""
    heartbeat_s: float = Field(default=1.0, gt=0, le=60)
    # CURVE (actors/keys.py): peers prove who they are with key pairs `atelier keys` makes, and the
    # traffic is encrypted. Required to bind anything but loopback.
    curve: bool = False
    keys: str | None = None  # the keys folder (default: <home>/keys)
    peer_key: str = "peer"  # the key pair this host's peers use, in that folder
    # Messages a second one peer may send through the broker, and a burst above that: a flood from
    # one (a bug, an attack) is dropped at the broker rather than crowding out the others.
    peer_rate_per_s: float = Field(default=20_000.0, gt=0)
    peer_burst: int = Field(default=50_000, ge=1)


class SchedulerConfig(Strict):
    # "fair": priorities, fair share between users, batching of compatible jobs from anywhere in
    # the queue, placement by estimated finish time. "fifo": one queue in arrival order, batching
    # only consecutive compatible jobs (how single-queue bots work; kept as a baseline).
    policy: Literal["fair", "fifo"] = "fair"
    max_attempts: int = Field(default=3, ge=1, le=100)
    max_queue: int = Field(default=10_000, ge=1)
    max_queued_per_user: int = Field(default=1_000, ge=1)
    max_running_per_user: int | None = Field(default=None, ge=1)  # jobs in pipeline calls at once
    # Bytes of input images held for jobs not yet ended, per user and in all: beyond them a submit
    # is refused with queue_full and a hint of when to retry, so one person's uploads cannot
    # exhaust the scheduler's memory or disk.
    max_input_bytes_per_user: int = Field(default=512 << 20, ge=0)
    max_input_bytes: int = Field(default=4 << 30, ge=0)
    # An artifact folder with less free space than this takes no more outputs: their jobs go back to
    # the queue (or fail, after max_attempts) with the reason, rather than a half-written file.
    min_free_bytes: int = Field(default=256 << 20, ge=0)
    # Caps every model's batch (images per pipeline call); 1 turns batching off.
    max_batch: int | None = Field(default=None, ge=1)
    # Within that cap, a batch grows only while measured step times show each doubling saving at
    # least this share of the time per image: a model that already fills the device runs alone,
    # and nobody's image waits on a batch that buys nothing.
    batch_min_gain: float = Field(default=0.1, ge=0, le=1)
    # How long a job may wait for companions before a batch smaller than the maximum starts
    # on an idle runner. 0: never wait (batches still form from what queues while runners are busy).
    batch_wait_s: float = Field(default=0.0, ge=0, le=60)
    # Jobs looked at, in queue order, when planning which runner takes what next.
    plan_window: int = Field(default=256, ge=1, le=100_000)
    remember_finished: int = Field(default=10_000, ge=0)
    # The journal (SQLite) every accepted job and transition is written to, so a restarted scheduler
    # queues again what had not ended. Default: journal.sqlite3 beside the artifact folder;
    # ":memory:" keeps nothing across restarts.
    journal: str | None = None
    # Ended jobs stay queryable (state, artifacts) from the journal this long.
    journal_keep_days: float = Field(default=30.0, gt=0)
    # Tell loaders to stage the models of the next queued jobs while the runners are busy.
    preload: bool = True


class StoreConfig(Strict):
    """Where finished outputs (and checkpoints, LoRAs) are kept: the local artifact folder, or an
    S3-compatible bucket. Credentials left out here come from boto3's environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...)."""
    kind: Literal["local", "s3"] = "local"
    endpoint: str | None = None  # e.g. http://127.0.0.1:8333; None: AWS's (or AWS_ENDPOINT_URL)
    bucket: str = ""
    region: str | None = None
    prefix: str = ""  # keys go under this ("atelier/" -> s3://bucket/atelier/...)
    access_key_id: str | None = Field(default=None, repr=False)
    secret_access_key: SecretStr | None = None
    url_expiry_s: int = Field(default=3600, ge=1, le=7 * 86400)  # pre-signed GET URLs' lifetime
    # Retention of job outputs (never checkpoints or LoRAs): older than this go; then the oldest
    # go until the outputs fit in max_bytes. None: keep / no budget.
    max_age_days: float | None = Field(default=None, gt=0)
    max_bytes: int | None = Field(default=None, ge=0)
    sweep_every_s: float = Field(default=300.0, gt=0)
    # A store that keeps failing: the runner holds the batch's outputs and retries; after this long
    # the batch's jobs fail with the reason rather than run for ever.
    patience_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> "StoreConfig":
        if self.kind == "s3" and not self.bucket:
            raise ValueError("[store] kind = \"s3\" needs a bucket")
        return self


# A device's name: "cuda:N"; "cpu"; or "cpu:N", a CPU stand-in for one device (tests, CPU-only boxes:
# torch sees every "cpu:N" as the one CPU).
_DEVICE = r"^(cpu|cuda)(:[0-9]+)?$"
_GANG_DEVICE = r"^(cpu|cuda):[0-9]+$"


class NodeConfig(Strict):
    name: str | None = None  # defaults to the host name
    # Single-device runners. None: every CUDA device, else ["cpu"]; [] none (a node of gangs alone).
    devices: list[str] | None = None
    # Gangs: each a list of 2 or more devices that serve one job together, one process (rank) per
    # device, in rank order, e.g. [["cuda:0", "cuda:1", "cuda:2", "cuda:3"]]. A device also in
    # ``devices`` is shared with its single-device runner (never both busy at once: the scheduler picks
    # by load); one only in a gang is the gang's alone. A device is in one gang at most.
    gangs: list[list[str]] = Field(default_factory=list)
    # Models a runner keeps loaded, at most; 0 unloads the model after every batch.
    resident_models: int = Field(default=2, ge=0)
    # Stage weights in shared memory (the loader); off, every runner reads the disk itself.
    staging: bool = True
    # Fetch a hub id source ("org/name") that the Hugging Face cache lacks. Off, a hub id must be
    # in the cache already (huggingface-cli download); nothing is downloaded behind anyone's back.
    downloads: bool = False
    # Bytes of weights a runner may keep on its device (default: 90% of a GPU, a quarter of the RAM).
    device_budget_bytes: int | None = Field(default=None, ge=0)
    # Bytes of shared memory the loader may hold staged weights in (default: half the RAM).
    stage_budget_bytes: int | None = Field(default=None, ge=0)
    # Watchdog: a runner whose pipeline makes no step for this long (after its model is loaded) is
    # stuck (a hung CUDA call, a deadlock): it hands its jobs back and exits, and its node starts it
    # again. Generous; a compiled model's first step of a batch, which compiles, gets 30 minutes more
    # (actors/runner.py COMPILE_GRACE_S). 0 turns it off.
    step_timeout_s: float = Field(default=600.0, ge=0)

    @field_validator("devices")
    @classmethod
    def _device_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            if not re.match(_DEVICE, name):
                raise ValueError(f"device {name!r}: a device is \"cuda:N\", \"cpu\" or \"cpu:N\"")
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"a device is named twice in {value}")
        return value

    @field_validator("gangs")
    @classmethod
    def _gang_devices(cls, value: list[list[str]]) -> list[list[str]]:
        seen: dict[str, int] = {}
        for index, gang in enumerate(value):
            where = f"gang {index} {gang}"
            if len(gang) < 2:
                raise ValueError(f"{where}: a gang is 2 or more devices (one device is a single runner: "
                                 "list it in devices)")
            for name in gang:
                if not re.match(_GANG_DEVICE, name):
                    raise ValueError(f"{where}: device {name!r}: a gang's devices are \"cuda:N\" or \"cpu:N\"")
                if name in seen:
                    other = "twice in it" if seen[name] == index else f"also in gang {seen[name]}"
                    raise ValueError(f"{where}: device {name!r} is {other}; a device is in one gang at most, once")
                seen[name] = index
        return value


class HttpToken(Strict):
    # SecretStr: a token never shows in a log line or a repr of the config.
    token: SecretStr = Field(min_length=16)
    user: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")
    rate_per_minute: int | None = Field(default=None, ge=1)  # this user's own limit
    # An admin sees and cancels every job, lists the whole queue and the runners' jobs; a user only their own.
    role: Literal["user", "admin"] = "user"
    # priority "live" jumps every other queue: a permission the operator grants (admins always have it).
    live: bool = False


class HttpConfig(Strict):
    enabled: bool = True  # `atelier up` starts it
    host: str = "127.0.0.1"  # anything but loopback needs tokens
    port: int = Field(default=8080, ge=0, le=65535)
    # Bearer tokens, each naming the user its jobs count for. None (loopback only): anyone on this
    # machine may submit, as the user their request names (or "anonymous"), which also names whose
    # rate limit and queue cap apply, and sees every job as an admin does.
    tokens: list[HttpToken] = Field(default_factory=list)
    rate_per_minute: int = Field(default=30, ge=1)  # jobs a user may submit per minute
    live_per_minute: int = Field(default=600, ge=1)  # prompts of live sessions (each replaces the last)
    public_url: str | None = None  # where artifact URLs point (default: the address it listens on)
    # Live sessions a user keeps at once: a new one takes the place of the one used longest ago, and its
    # first prompt counts as an ordinary job (so fresh sessions cannot buy the live rate).
    max_live_sessions: int = Field(default=2, ge=1)
    # Event streams and waiting OpenAI/A1111 calls held open: per user (admins are bound only by the
    # total) and in all.
    max_streams_per_user: int = Field(default=8, ge=1)
    max_streams: int = Field(default=512, ge=1)
    # A poll of a job (GET /v1/jobs/{id}) is answered from the job's events while it was heard of in the last
    # this many seconds (frontends/jobcache.py); 0 asks the scheduler every time.
    poll_cache_s: float = Field(default=2.0, ge=0, le=60)


class DiscordConfig(Strict):
    """The Discord bot (``atelier discord``). Its token is never here: $DISCORD_TOKEN or ./.env."""

    rate_per_minute: int = Field(default=6, ge=1)  # /generate and Again jobs per user
    live_per_minute: int = Field(default=60, ge=1)  # /live prompts per user; each replaces the last
    # Allowlists of ids; empty allows all. A channel allows its threads; a member needs one of the roles.
    guilds: list[int] = Field(default_factory=list)
    channels: list[int] = Field(default_factory=list)
    roles: list[int] = Field(default_factory=list)
    # Admins may see and cancel every job the bot follows; everyone else, only their own.
    admin_roles: list[int] = Field(default_factory=list)
    admin_users: list[int] = Field(default_factory=list)
    default_model: str | None = None  # default: the catalog's default_model
    max_count: int = Field(default=4, ge=1, le=10)  # images per job; a Discord message holds 10
    # The model the Upscale button runs (one whose kinds include upscale; checked against the catalog when
    # the bot starts). Default: the catalog's first such model.
    upscaler: str | None = None
    upscale_steps: int | None = Field(default=None, ge=1, le=500)  # default: the upscaler's own


class Webhook(Strict):
    """One program told of cluster events (``[[events.webhooks]]``): a POST of the event's JSON to ``url``."""

    url: str = Field(pattern=r"^https?://[^\s/?#]+[^\s]*$", max_length=2000)
    # Signs each body (HMAC-SHA256, the X-Atelier-Signature header) so the hook can tell atelier's POSTs
    # from anyone else's. SecretStr: it never shows in a log line or a repr of the config.
    secret: SecretStr | None = None
    # The ClusterEvent kinds it wants (queue_idle, lease_granted, ...; `python -m actors.messages` and the
    # README list them); empty: all. Checked against the kinds when the scheduler starts.
    events: list[str] = Field(default_factory=list, max_length=64)
    timeout_s: float = Field(default=5.0, gt=0, le=60)  # each POST; a slower hook counts as failed
    retries: int = Field(default=3, ge=0, le=10)  # after a failed POST, with backoff (0.5 s, 1 s, 2 s, ...)


class EventsConfig(Strict):
    webhooks: list[Webhook] = Field(default_factory=list, max_length=32)
    # Events waiting per hook: a slow or dead hook loses its oldest beyond this (a log line and the
    # atelier_webhook_dropped counter say so), and never holds up the scheduler or the other hooks.
    queue: int = Field(default=256, ge=1, le=100_000)


class Config(Strict):
    home: Path = Field(default_factory=default_home)
    artifacts: Path | None = None  # defaults to <home>/artifacts
    # The built-in tiny models (and noop) beside the catalog's own: true, false, or, unset, only when
    # the config has no models of its own (so that `atelier up` with no file serves something, and a
    # production catalog does not also offer toy models nobody asked for).
    builtin_models: bool | None = None
    # Default: tiny-sd where the built-ins are in, else the first model of the catalog.
    default_model: str = ""
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    node: NodeConfig = Field(default_factory=NodeConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    discord: DiscordConfig = Field(default_factory=DiscordConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    models: dict[str, ModelEntry] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _default_endpoints(self) -> "Config":
        run = self.home.expanduser() / RUN_FOLDER
        self.broker.router = self.broker.router or f"ipc://{run / 'router'}"
        self.broker.pub = self.broker.pub or f"ipc://{run / 'pub'}"
        return self

    @model_validator(mode="after")
    def _merge_builtins(self) -> "Config":
        if self.builtin_models or (self.builtin_models is None and not self.models):
            self.models = {**builtin_models(), **self.models}
        if not self.default_model and self.models:
            self.default_model = "tiny-sd" if "tiny-sd" in self.models else next(iter(self.models))
        if self.models and self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not in the catalog")
        return self

    @model_validator(mode="after")
    def _layouts(self) -> "Config":
        """Each model's parallel layout against its family and, where [node] gangs says, the gangs' sizes;
        refused naming the field (models.<name>.parallel.<field>)."""
        sizes = sorted({len(gang) for gang in self.node.gangs})
        for name, entry in self.models.items():
            layout = entry.parallel
            if layout is None:
                continue
            where = f"models.{name}.parallel"
            problem = layout.problem(entry.family)
            if problem is not None:
                field, reason = problem
                raise ValueError(f"{where}{'.' + field if field else ''}: {reason}")
            if entry.offload is not None:
                raise ValueError(f"{where}: offload = {entry.offload!r} does not go with a gang (each rank keeps its "
                                 "shard or replica on its device); drop one of them")
            if entry.cache is not None:
                # A step cache decides per rank whether to skip the rest of the step, from that rank's shard
                # of the first block's output: ranks that decide differently wait on each other's
                # collectives forever.
                raise ValueError(f"{where}: cache = {entry.cache!r} does not go with a gang (each rank would decide "
                                 "from its own shard whether to skip a step, and the ranks must agree); drop one "
                                 "of them")
            if layout.size < 2:
                raise ValueError(f"{where}: every degree is 1, which splits nothing; a layout spans 2 or more "
                                 "devices (raise a degree, or remove the table to run on single devices only)")
            if sizes and layout.size not in sizes:
                raise ValueError(f"{where}: its size is {layout.size} ({layout.describe()}), and no gang of "
                                 f"[node] gangs has that many devices (their sizes: "
                                 f"{', '.join(map(str, sizes))}); the product of the degrees must equal a gang's size")
        return self

    @property
    def input_pixel_budget(self) -> int:
        """Pixels an input image may have: four times the catalog's largest output (room for a photo
        that is scaled down), and never less than a 4096x4096 picture (a phone's 12 Mpx photo fits)."""
        largest = max((entry.limits.max_width * entry.limits.max_height for entry in self.models.values()),
                      default=0)
        return max(4 * largest, 4096 * 4096)

    @property
    def artifact_dir(self) -> Path:
        return self.artifacts or self.home / "artifacts"

    @property
    def journal_path(self) -> str:
        return self.scheduler.journal or str(self.artifact_dir.parent / "journal.sqlite3")

    @property
    def model_cache(self) -> Path:
        return self.home / "models"


def config_file(path: str | Path | None = None) -> str | Path | None:
    """The file ``load_config(path)`` reads: ``path``, else ``$ATELIER_CONFIG``, else ``./atelier.toml``
    where there is one; None for the built-in settings."""
    candidate = path or os.environ.get(CONFIG_ENV)
    if candidate is None and Path("atelier.toml").is_file():
        candidate = "atelier.toml"
    return candidate


def load_config(path: str | Path | None = None) -> Config:
    """Reads ``path``, else ``$ATELIER_CONFIG``, else ``./atelier.toml``; built-in defaults if none."""
    candidate = config_file(path)
    if candidate is None:
        return Config()
    return read_config(candidate)


def read_config(path: str | Path) -> Config:
    """The config in the TOML file at ``path``."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return Config.model_validate(data)
