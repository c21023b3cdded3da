"""What the Discord bot decides and shows, apart from Discord itself.

Pure pieces: the token and its .env file, who may use the bot where, how often, and what a
job's message or a live session's canvas says and shows. ``frontends/discord_bot.py`` is the
discord.py glue that calls them; tests call them directly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import discord

from actors.messages import JobEvent, JobResult, ModelInfo, Preview, Progress
from atelier.artifacts import extension_for
from atelier.config import DiscordConfig
from atelier.jobs import MAX_INPUT_BYTES, JobKind, JobSpec, JobState
from atelier.public import scrub
from frontends.client import Event

TOKEN_ENV = "DISCORD_TOKEN"
PROMPT_SHOWN = 300  # characters of a prompt a message quotes
UPLOAD_BYTES = 10 << 20  # what a message may carry where Discord says no other limit (no server's)
# How far a Variation departs from its image: low enough that it keeps the composition and colours, high
# enough that the details change (A1111's "subtle variation" range; Midjourney's are of this order).
VARIATION_STRENGTH = 0.35
BUTTONS_PER_ROW = 5  # Discord's limit; a message has 5 rows


def parse_dotenv(text: str) -> dict[str, str]:
    """``KEY=value`` lines, as a ``.env`` file holds them (comments, ``export``, quotes)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values


def find_token(environ: Mapping[str, str], cwd: Path) -> str | None:
    """The bot token: the environment first, else ``.env`` in the working directory."""
    token = environ.get(TOKEN_ENV, "").strip()
    if not token and (cwd / ".env").is_file():
        token = parse_dotenv((cwd / ".env").read_text(encoding="utf-8")).get(TOKEN_ENV, "").strip()
    return token or None


def access_refusal(settings: DiscordConfig, *, guild_id: int | None, channel_ids: Iterable[int],
                   role_ids: Iterable[int]) -> str | None:
    """Why this place or person may not use the bot, or None if they may.

    ``channel_ids`` are the channel and, in a thread, its parent: allowing a channel allows its threads.
    An empty allowlist allows everyone; one that is set refuses direct messages (no server, no roles).
    """
    if settings.guilds and guild_id not in settings.guilds:
        return "atelier is not enabled in this server."
    if settings.channels and not set(channel_ids) & set(settings.channels):
        return "atelier is not enabled in this channel."
    if settings.roles and not set(role_ids) & set(settings.roles):
        return "You need one of the roles allowed to use atelier here."
    return None


def is_admin(settings: DiscordConfig, *, user_id: int, role_ids: Iterable[int]) -> bool:
    """Whether this member may see and cancel everyone's jobs."""
    return user_id in settings.admin_users or bool(set(role_ids) & set(settings.admin_roles))


class RateLimiter:
    """At most ``limit`` starts per key within any ``window_s`` seconds (a sliding window)."""

    def __init__(self, limit: int, window_s: float = 60.0):
        self.limit = limit
        self.window_s = window_s
        self._starts: dict[Hashable, deque[float]] = {}

    def try_acquire(self, key: Hashable, now: float) -> float:
        """Counts a start and returns 0, or counts nothing and returns the seconds until one is allowed."""
        starts = self._starts.setdefault(key, deque())
        while starts and starts[0] <= now - self.window_s:
            starts.popleft()
        if len(starts) >= self.limit:
            return starts[0] + self.window_s - now
        starts.append(now)
        return 0.0


def rate_refusal(wait_s: float, limit: int, what: str) -> str:
    return (f"You have started {limit} {what} in the last minute, the most allowed here. "
            f"Try again in {max(1, round(wait_s))} s.")


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def quote(prompt: str) -> str:
    text = " ".join(prompt.split())
    if len(text) > PROMPT_SHOWN:
        text = text[:PROMPT_SHOWN - 1] + "…"
    return f"«{discord.utils.escape_markdown(discord.utils.escape_mentions(text))}»"


_RANK = {JobState.queued: 0, JobState.assigned: 1, JobState.loading: 2, JobState.running: 3}


@dataclass
class JobDisplay:
    """What a reply shows about one job, built from its events (the time is passed in)."""

    submitted_at: float
    state: JobState = JobState.queued
    attempt: int = 0
    position: int | None = None
    eta_s: float | None = None
    eta_at: float = 0.0  # when eta_s was said: it counts down from there
    step: int = 0
    total: int | None = None
    preview: bytes | None = None
    preview_step: int = 0
    reason: str | None = None
    finished_at: float | None = None
    loss: float | None = None  # a training's, at its latest step

    def apply(self, event: Event, now: float) -> None:
        if isinstance(event, JobResult):
            self.state, self.reason, self.finished_at = event.job.state, event.job.reason, now
        elif self.state.terminal:
            return  # the result is the last word; a straggling event does not undo it
        elif isinstance(event, JobEvent):
            # States come from the scheduler and steps from the runner, so they may cross: a state
            # only moves forward, unless the job was requeued (a higher attempt) or it ended.
            if event.state.terminal or event.attempt > self.attempt or \
                    _RANK[event.state] >= _RANK.get(self.state, 0):
                self.state, self.attempt = event.state, max(self.attempt, event.attempt)
                if event.state is not JobState.running:
                    self.step = 0
            self.position = event.position if self.state is JobState.queued else None
            if event.eta_s is not None:
                self.eta_s, self.eta_at = event.eta_s, now
            if event.reason or not event.state.terminal:
                # A queued job says why it waits ("paused at step N ..." of a training that yielded) until
                # its next state, which says its own reason or none.
                self.reason = event.reason
            if event.state.terminal:
                self.finished_at = now
        elif isinstance(event, Progress):
            self.state, self.position = JobState.running, None
            self.step, self.total = event.step, event.total
            if event.loss is not None:
                self.loss = event.loss
            if event.eta_s is not None:
                self.eta_s, self.eta_at = event.eta_s, now
        elif isinstance(event, Preview):
            self.preview, self.preview_step = bytes(event.image), event.step

    def percent(self) -> int:
        if self.state is JobState.done:
            return 100
        return int(100 * self.step / self.total) if self.total else 0

    def eta_left(self, now: float) -> float | None:
        if self.eta_s is None or self.state.terminal:
            return None
        return max(0.0, self.eta_s - (now - self.eta_at))


def status_line(job: JobDisplay, now: float) -> str:
    """'queued #3 · 2.0 s elapsed · about 12 s left', 'running 50% (step 2/4) · …', 'done in 3.1 s'."""
    elapsed = (job.finished_at if job.finished_at is not None else now) - job.submitted_at
    if job.state is JobState.done:
        return f"done in {duration(elapsed)}"
    if job.state is JobState.failed:
        return f"failed: {scrub(job.reason or 'no reason given')}"
    if job.state is JobState.cancelled:
        return "cancelled" + (f": {scrub(job.reason)}" if job.reason else "")
    if job.state is JobState.queued:
        words = "queued" + (f" #{job.position + 1}" if job.position is not None else "") + \
            (f" ({scrub(job.reason)})" if job.reason else "")
    elif job.state is JobState.running:
        words = f"running {job.percent()}%" + (f" (step {job.step}/{job.total})" if job.total else "") + \
            (f" · loss {job.loss:.4f}" if job.loss is not None else "")
    else:
        words = "loading the model"
    parts = [words, f"{duration(elapsed)} elapsed"]
    left = job.eta_left(now)
    if left is not None:
        parts.append(f"about {duration(left)} left")
    return " · ".join(parts)


@dataclass(frozen=True)
class ButtonSpec:
    """One button: what it does (``action``), to which job or channel (``ref``) and for whom (``owner``)."""

    action: str  # cancel, again, upscale, vary (a job); edit, stop (a live session; ref is its channel)
    ref: str
    owner: int
    label: str
    style: str = "secondary"  # a discord.ButtonStyle name
    index: int | None = None  # upscale, vary: which of the job's outputs
    row: int | None = None  # where it goes in the message's rows (None: after the others)

    @property
    def custom_id(self) -> str:
        # The output's index is in the id itself, so a button of an old card (or from before a restart)
        # still names its image: the bot reads it back from atelier by job id.
        tail = "" if self.index is None else f":{self.index}"
        return f"atelier:{self.action}:{self.ref}:{self.owner}{tail}"


@dataclass
class Frame:
    """Everything one message shows: its text, its images (file name, bytes) and its buttons."""

    content: str
    images: list[tuple[str, bytes]] = field(default_factory=list)
    buttons: list[ButtonSpec] = field(default_factory=list)
    notify: int | None = None  # a user to ping when this is posted as a new message


@dataclass
class JobCard:
    """A job of the bot's and what its message shows."""

    spec: JobSpec
    owner: int
    display: JobDisplay
    refused: str | None = None  # the scheduler's refusal of the submit
    result: JobResult | None = None
    # Its input images (JobInputs field -> the Discord attachment), read when it is submitted: Again reads
    # them anew rather than the bot keeping every finished job's images in memory.
    attachments: dict[str, discord.Attachment] = field(default_factory=dict)
    # The input image that is another job's output (Upscale, Variations): (that job's id, output index).
    # Only the reference is kept; the bytes are read back from atelier when the job is submitted.
    source: tuple[str, int] | None = None
    upload_bytes: int = UPLOAD_BYTES  # what its message may carry in files, all together
    # Which buttons its finished images get: decided from the catalog when it is made.
    can_upscale: bool = False
    can_vary: bool = False
    # A training's instance images (/train's image1..image4), read when it is submitted.
    train_images: list[discord.Attachment] = field(default_factory=list)

    def delivered(self) -> None:
        """Keeps only what Again and /cancel need: the outputs and the preview were shown already."""
        if self.result is not None and self.result.outputs:
            self.result = self.result.model_copy(update={"outputs": []})
        self.display.preview = None

    @property
    def active(self) -> bool:
        return self.refused is None and self.result is None and not self.display.state.terminal


# /generate's image options, and the JobInputs field each one fills.
IMAGE_OPTIONS = {"image": "image", "control_image": "control_image", "reference_image": "ip_adapter_image"}
IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def _having(catalog: Iterable[ModelInfo], has) -> str:
    return ", ".join(m.name for m in catalog if has(m)) or "none here"


def conditioning_refusal(model: ModelInfo, catalog: Iterable[ModelInfo], *, controlnet: str | None,
                         control_image: bool, controlnet_scale: float | None, reference_image: bool,
                         reference_scale: float | None) -> str | None:
    """Why /generate's ControlNet and reference-image options do not fit ``model``, or None if they do."""
    names = ", ".join(model.controlnets)
    if (controlnet is not None or control_image) and not model.controlnets:
        return (f"{model.name} has no ControlNet, so it takes no control_image or controlnet. "
                f"Models with one: {_having(catalog, lambda m: m.controlnets)}.")
    if controlnet is not None and controlnet not in model.controlnets:
        return f"{model.name} has no ControlNet `{controlnet}`; it has: {names}."
    if control_image and controlnet is None:
        return f"Choose the controlnet that reads your control_image: {model.name} has {names}."
    if controlnet is not None and not control_image:
        return f"The controlnet `{controlnet}` reads a control_image: attach one."
    if controlnet_scale is not None and controlnet is None:
        return "controlnet_scale goes with a controlnet and its control_image."
    if reference_image and not model.ip_adapter:
        return (f"{model.name} has no IP-Adapter, so it takes no reference_image. "
                f"Models with one: {_having(catalog, lambda m: m.ip_adapter)}.")
    if reference_scale is not None and not reference_image:
        return "reference_scale goes with a reference_image."
    return None


def attachment_refusal(option: str, filename: str, content_type: str | None, size: int,
                       max_bytes: int = MAX_INPUT_BYTES) -> str | None:
    """Why an attached file cannot be a job's input image, or None if it can."""
    # Discord says what a file is; where it does not, the name's ending is all there is to go by.
    media = (content_type or "").split(";")[0].strip().lower()
    image = media in IMAGE_TYPES if media else filename.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
    if not image:
        return f"{option}: `{discord.utils.escape_markdown(filename[:100])}` is not a PNG, JPEG or WebP image."
    if size > max_bytes:
        return f"{option}: {size / 2**20:.1f} MiB is too large; an input image may have {max_bytes >> 20} MiB at most."
    return None


def does(model: ModelInfo) -> str:
    """What the bot can ask of a model, for its messages ("img2img, txt2img"): a training is not one of them."""
    return ", ".join(kind.value for kind in model.kinds if kind is not JobKind.train)


def train_refusal(model: ModelInfo, catalog: Iterable[ModelInfo]) -> str | None:
    """Why /train cannot train a LoRA of ``model``, or None if it can."""
    if JobKind.train in model.kinds:
        return None
    return (f"{model.name} cannot train a LoRA (it does {does(model)}). "
            f"Models that can: {_having(catalog, lambda m: JobKind.train in m.kinds)}.")


def text_kind(model: ModelInfo) -> JobKind | None:
    """What /generate asks of ``model``: an image, else a video, else a sound; None when it needs an input."""
    return JobKind.default_for(model.kinds, from_image=False)


def image_refusal(model: ModelInfo, catalog: Iterable[ModelInfo]) -> str | None:
    """Why ``model`` cannot start from an attached image (img2img), or None if it can."""
    if JobKind.img2img in model.kinds:
        return None
    return (f"{model.name} cannot start from an image (it does {does(model)}), so it takes no image. "
            f"Models that can: {_having(catalog, lambda m: JobKind.img2img in m.kinds)}.")


def upscaler_of(catalog: list[ModelInfo], named: str | None) -> tuple[ModelInfo | None, str | None]:
    """The model the Upscale button runs, or why there is none: the one ``[discord] upscaler`` names,
    else the catalog's first that upscales."""
    if named is not None:
        model = next((m for m in catalog if m.name == named), None)
        if model is None:
            return None, f"The upscaler `{named}` ([discord] upscaler) is not in atelier's catalog now."
        if JobKind.upscale not in model.kinds:
            return None, f"The upscaler `{named}` ([discord] upscaler) does not upscale ({does(model)})."
        return model, None
    model = next((m for m in catalog if JobKind.upscale in m.kinds), None)
    if model is None:
        return None, ("atelier has no upscaler: no model of its catalog upscales (an sd-upscaler model, "
                      "such as stabilityai/stable-diffusion-x4-upscaler, does).")
    return model, None


def variation_steps(steps: int | None) -> int | None:
    """A Variation's steps: its image's, and at least enough that one denoising step runs at
    VARIATION_STRENGTH (an image-to-image job runs int(steps x strength) of them)."""
    return None if steps is None else max(steps, math.ceil(1 / VARIATION_STRENGTH))


def result_buttons(card: JobCard, images: int) -> list[ButtonSpec]:
    """A finished job's buttons: Upscale and Variations per image (one row of U1..U5 each, like
    Midjourney's; "Upscale" and "Variations" for a single image), then Again. At most 10 images make
    2 rows of U, 2 of V and Again: Discord's 5 rows."""
    spec = card.spec
    buttons: list[ButtonSpec] = []
    row = 0
    for action, word, letter, offered in (("upscale", "Upscale", "U", card.can_upscale),
                                          ("vary", "Variations", "V", card.can_vary)):
        if not offered or not images:
            continue
        for index in range(images):
            label = word if images == 1 else f"{letter}{index + 1}"
            buttons.append(ButtonSpec(action, spec.id, card.owner, label, index=index,
                                      row=row + index // BUTTONS_PER_ROW))
        row += math.ceil(images / BUTTONS_PER_ROW)
    last = [b for b in buttons if b.row == row - 1]
    again_row = None if not buttons else row - 1 if len(last) < BUTTONS_PER_ROW else row
    buttons.append(ButtonSpec("again", spec.id, card.owner, "Again", "primary", row=again_row))
    return buttons


def _fitting(sizes: list[int], budget: int) -> set[int]:
    """The indexes of the files that fit in ``budget`` together, leaving out the largest first."""
    kept: set[int] = set()
    for index in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        if sizes[index] > budget:
            break
        kept.add(index)
        budget -= sizes[index]
    return kept


def render_job(card: JobCard, now: float, *, public_url: str | None = None) -> Frame:
    if card.spec.kind == JobKind.train:
        return render_training(card, now, public_url=public_url)
    spec, job = card.spec, card.display
    # A sound's width and height are only its family's placeholders.
    size = f" · {spec.width}×{spec.height}" if spec.width and spec.height and spec.kind != JobKind.txt2audio else ""
    steps = f" · {spec.steps} steps" if spec.steps else ""
    shaped = (f" · ControlNet {spec.controlnet}" if spec.controlnet else "") + \
        (" · reference image" if "ip_adapter_image" in card.attachments else "")
    source = f"image {card.source[1] + 1} of `{card.source[0][:8]}`" if card.source else "an image"
    if spec.kind == JobKind.upscale:  # its size is its input's; what it makes is larger by the model's factor
        size = size.replace(" · ", " · from ", 1)
        shaped = f" · upscale of {source}"
    elif spec.kind == JobKind.img2img:
        strength = f", strength {spec.strength:g}" if spec.strength is not None else ""
        shaped = (f" · variation of {source}" if card.source else " · from an image") + strength + shaped
    loras = "".join(f" · LoRA {name}" + (f" {scale:g}" if scale != 1 else "") for name, scale in spec.loras.items())
    lines = [f"<@{card.owner}> · **{quote(spec.prompt)}**", f"-# {spec.model}{size}{steps}{shaped}{loras}"]
    if card.refused is not None:
        return Frame("\n".join(lines + [f"refused: {scrub(card.refused)}"]), notify=card.owner)
    images: list[tuple[str, bytes]] = []
    buttons: list[ButtonSpec] = []
    status = status_line(job, now)
    if card.result is not None and card.result.job.state is JobState.done:
        outputs = card.result.outputs
        seeds = [a.seed for a in outputs if a.seed is not None]
        if seeds:
            status += " · seed" + ("s " if len(seeds) > 1 else " ") + ", ".join(map(str, seeds))
        names = [f"{spec.id}-{index}{extension_for(a.media_type)}" for index, a in enumerate(outputs)]
        kept = _fitting([len(a.data) for a in outputs], card.upload_bytes)
        images = [(f"atelier-{names[i]}", bytes(outputs[i].data)) for i in range(len(outputs)) if i in kept]
        left_out = [i for i in range(len(outputs)) if i not in kept]
        if left_out:
            status += (f"\n{len(left_out)} of {len(outputs)} outputs are too large for Discord here; "
                       + (" ".join(f"<{public_url.rstrip('/')}/v1/artifacts/{names[i]}>" for i in left_out)
                          if public_url else "atelier keeps them"))
        pictures = len(outputs) if outputs and all(a.media_type.startswith("image/") for a in outputs) else 0
        buttons = result_buttons(card, pictures)
    elif job.state.terminal:
        buttons.append(ButtonSpec("again", spec.id, card.owner, "Again"))
    else:
        if job.preview:
            images.append((f"preview-{spec.id}.jpg", job.preview))
        buttons.append(ButtonSpec("cancel", spec.id, card.owner, "Cancel", "danger"))
    return Frame("\n".join(lines + [status]), images, buttons, notify=card.owner)


def render_training(card: JobCard, now: float, *, public_url: str | None = None) -> Frame:
    """A LoRA training's message: its state with step, loss and ETA; once done, how to use the LoRA and
    its file (the diffusers-format one, the first output) where it fits Discord's upload limit."""
    spec, job, train = card.spec, card.display, card.spec.train
    name = train.name if train is not None else "?"
    settings = f"{train.steps} steps · {train.resolution} px" if train is not None else ""
    lines = [f"<@{card.owner}> · training LoRA **{discord.utils.escape_markdown(name)}** · {quote(spec.prompt)}",
             f"-# {spec.model} · {len(card.train_images)} images · {settings}"]
    if card.refused is not None:
        return Frame("\n".join(lines + [f"refused: {scrub(card.refused)}"]), notify=card.owner)
    status = status_line(job, now)
    if job.state is JobState.done and job.loss is not None:
        status += f" · final loss {job.loss:.4f}"
    images: list[tuple[str, bytes]] = []
    buttons: list[ButtonSpec] = []
    if card.result is not None and card.result.job.state is JobState.done:
        status += f"\nLoRA `{name}` is ready: use it with `/generate lora:{name}` on {spec.model}."
        outputs = card.result.outputs
        if outputs and len(outputs[0].data) <= card.upload_bytes:
            images = [(f"{name}.safetensors", bytes(outputs[0].data))]
        elif outputs:
            link = f"{spec.id}-0{extension_for(outputs[0].media_type)}"
            status += ("\nIts file is too large for Discord here: "
                       + (f"<{public_url.rstrip('/')}/v1/artifacts/{link}>" if public_url else "atelier keeps it."))
    elif not job.state.terminal:
        buttons.append(ButtonSpec("cancel", spec.id, card.owner, "Cancel", "danger"))
    return Frame("\n".join(lines + [status]), images, buttons, notify=card.owner)


@dataclass
class LiveCanvas:
    """What a live session's message shows: the newest prompt, and only pictures that are its own
    or that finished (labelled with their prompt): a replaced prompt's events never reach it."""

    owner: int
    channel: int
    prompt: str | None = None
    job_id: str | None = None
    job: JobDisplay | None = None
    refused: str | None = None
    finished: tuple[str, str, bytes] | None = None  # the last finished image: job id, prompt, PNG
    ended: bool = False
    history: list[tuple[str, str]] = field(default_factory=list)  # (job id, prompt) of every prompt

    def submitted(self, job_id: str, prompt: str, now: float) -> None:
        self.prompt, self.job_id, self.refused, self.ended = prompt, job_id, None, False
        self.job = JobDisplay(submitted_at=now)
        self.history.append((job_id, prompt))

    def refuse(self, job_id: str, reason: str) -> None:
        if job_id == self.job_id:
            self.refused = reason

    def apply(self, job_id: str, event: Event, now: float) -> bool:
        """Takes an event of one of the session's jobs; False (and nothing changes) unless it is the newest's."""
        if job_id != self.job_id or self.job is None:
            return False
        self.job.apply(event, now)
        if isinstance(event, JobResult) and event.job.state is JobState.done and event.outputs:
            self.finished = (job_id, self.prompt or "", bytes(event.outputs[0].data))
        return True

    @property
    def active(self) -> bool:
        return self.job is not None and self.refused is None and not self.job.state.terminal


def render_live(canvas: LiveCanvas, now: float) -> Frame:
    mention = f"<@{canvas.owner}>"
    ref = str(canvas.channel)
    if canvas.ended:
        lines = [f"⚪ **Live session ended** · {mention}"]
        buttons = [ButtonSpec("edit", ref, canvas.owner, "New prompt", "primary")]
    else:
        lines = [f"🔴 **Live** · {mention} · {quote(canvas.prompt or '')}"]
        buttons = [ButtonSpec("edit", ref, canvas.owner, "New prompt", "primary"),
                   ButtonSpec("stop", ref, canvas.owner, "Stop", "danger")]
        if canvas.refused is not None:
            lines.append(f"refused: {scrub(canvas.refused)}")
        elif canvas.job is not None:
            lines.append(status_line(canvas.job, now))
    images: list[tuple[str, bytes]] = []
    job = canvas.job
    if not canvas.ended and job is not None and job.preview and not job.state.terminal and canvas.refused is None:
        images = [(f"live-{canvas.job_id}-preview.jpg", job.preview)]
    elif canvas.finished is not None:
        job_id, prompt, png = canvas.finished
        images = [(f"live-{job_id}.png", png)]
        if job_id != canvas.job_id or canvas.ended:
            lines.append(f"-# the last finished image, of {quote(prompt)}")
    return Frame("\n".join(lines), images, buttons)


def moved_frame() -> Frame:
    return Frame("*This live canvas moved to a newer message below.*")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a result tries to reach Discord: edits first, then new messages (about 10 minutes)."""

    edit_delays_s: tuple[float, ...] = (1.0, 2.0, 4.0)
    post_delays_s: tuple[float, ...] = (2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
    call_timeout_s: float = 30.0
    # An interaction's token lives 15 minutes; stop using it this long before, so no edit races its end.
    token_margin_s: float = 10.0
