"""atelier's Discord bot: slash commands that submit to atelier, and replies that follow the job.

    atelier discord [--router tcp://HOST:5555] [--pub tcp://HOST:5556] [--config atelier.toml]

The token comes from ``$DISCORD_TOKEN`` or a ``.env`` file in the working directory; the rest
from the ``[discord]`` table of ``atelier.toml``. Each Discord user is their own atelier user
(``discord:<id>``), so atelier's fair share applies between them.

``/generate`` answers with one message that shows the job's state, percent, elapsed time, ETA
and latest preview, edited at most once a second, then the images, with buttons: Upscale and
Variations per image (U1..Un and V1..Vn for several), Again (new seeds) and, while it runs, Cancel
(its owner's, or an admin's). With an ``image`` attachment it starts from that image (img2img, at
``strength``). For a model with ControlNets it takes a ``control_image`` and the ``controlnet`` that
reads it; for one with an IP-Adapter, a ``reference_image`` (an image as a prompt); each with its scale.
``lora`` (with ``lora_scale``) applies a LoRA: one the member trained, one lent to them, or the catalog's.

``/train`` trains a LoRA of the member's from up to four attachments (more go through the HTTP API or
the CLI); its message is followed as /generate's is, with the loss on its status line, and once done
says how to use it and attaches the diffusers-format file where it fits the upload limit.

Upscale runs the catalog's upscaler (``[discord] upscaler``, else its first model that upscales) on
that image; Variations runs the image's prompt and settings from it at VARIATION_STRENGTH with a new
seed. Each is a new job of whoever presses it, with its own message, as Again is. A button names
its image by job id and index only: the image is read back through the client (its bounded result
cache, else the scheduler's artifact store), so old cards work and no image is kept here.

``/live``: Discord sends no keystrokes, so a prompt arrives whole. A user's live session in a
channel (atelier session ``<user id>:<channel id>``) is fed by ``/live prompt:…`` and by the
"New prompt" button of its canvas, which opens a box holding the last prompt to edit. Each prompt
is a new job of that session at the ``live`` priority, so atelier drops or stops the one it
replaces. The canvas is the message of the latest ``/live``; it shows the newest prompt with its
own preview or image, or else the last finished image labelled with the prompt it was made from,
never a replaced prompt's picture.

Who sees which job: ``/queue``, ``/cancel`` and its autocomplete show and take a member's own jobs
only (the queue's length is everyone's); members with one of ``admin_roles`` or in ``admin_users``
see and cancel every job the bot follows. Outputs go up to the upload limit Discord gives each
interaction, all files together; those left out (the largest first) are linked through the HTTP
API's ``public_url`` where one is set.

The decisions (who may, how often, what a message says and shows) are small pure pieces in
``frontends/discord_views.py``; this module is the discord.py glue that calls them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import random
import re
import sys
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import aiohttp
import discord
from discord import app_commands
from pydantic import ValidationError

from actors.actor import RemoteError
from actors.messages import JobResult, ModelInfo
from atelier.config import Config, DiscordConfig
from atelier.jobs import MAX_TRAIN_IMAGES, JobInputs, JobKind, JobRecord, JobSpec, JobState, Priority, TrainSpec
from atelier.public import scrub
from atelier.runtime import Failure, TaskSet, process_main, process_parser
from frontends.catalog_follow import follow_catalog
from frontends.client import AtelierClient, Event
from frontends.discord_views import (
    IMAGE_OPTIONS,
    TOKEN_ENV,
    UPLOAD_BYTES,
    VARIATION_STRENGTH,
    ButtonSpec,
    Frame,
    JobCard,
    JobDisplay,
    LiveCanvas,
    RateLimiter,
    RetryPolicy,
    access_refusal,
    attachment_refusal,
    conditioning_refusal,
    does,
    find_token,
    image_refusal,
    is_admin,
    moved_frame,
    quote,
    rate_refusal,
    render_job,
    render_live,
    status_line,
    text_kind,
    train_refusal,
    upscaler_of,
    variation_steps,
)

log = logging.getLogger("atelier.discord")

MIN_EDIT_INTERVAL_S = 1.0  # Discord throttles edits; a reply changes at most this often
LIVE_IDLE_S = 15 * 60  # a live session with no new prompt for this long ends
SILENCE_S = 60.0  # no event for this long: ask the scheduler where the job stands
KEEP_FINISHED = 1000  # finished jobs remembered for Again (their spec and attachment references, no outputs)
# Upscale and Variations do not need them: atelier has a finished job's spec and outputs by its id.


# --------------------------------------------------------------------------- #
# discord.py glue: messages


_DISCORD_ERRORS = (discord.HTTPException, aiohttp.ClientError, OSError, asyncio.TimeoutError)
_DEAD_TOKEN_CODES = {50027, 10015}  # invalid webhook token, unknown webhook
_REJECTED = {400, 413}  # Discord refused what a message carries (too large files, say): sending it again is no use
FILES_REFUSED = "-# Discord would not take this message's files, so they are left out."
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_OPTION_OF = {field: option for option, field in IMAGE_OPTIONS.items()}  # JobInputs field -> /generate's option


class AtelierButton(discord.ui.DynamicItem[discord.ui.Button],
                    template=r"atelier:(?P<action>cancel|again|upscale|vary|edit|stop):(?P<ref>[A-Za-z0-9_-]+)"
                             r":(?P<owner>\d+)(?::(?P<index>\d{1,2}))?$"):
    """Every button of the bot: its custom id says all it needs, so buttons keep working after a restart."""

    def __init__(self, spec: ButtonSpec):
        super().__init__(discord.ui.Button(label=spec.label, custom_id=spec.custom_id, row=spec.row,
                                           style=getattr(discord.ButtonStyle, spec.style)))
        self.spec = spec

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match) -> "AtelierButton":
        index = int(match["index"]) if match["index"] is not None else None
        return cls(ButtonSpec(match["action"], match["ref"], int(match["owner"]), item.label or "",
                              item.style.name, index=index))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = interaction.client
        if isinstance(bot, AtelierBot):
            await bot.on_button(interaction, self.spec)


def _view(buttons: list[ButtonSpec]) -> discord.ui.View | None:
    if not buttons:
        return None
    view = discord.ui.View(timeout=None)
    for spec in buttons:
        view.add_item(AtelierButton(spec))
    return view


def _files(images: list[tuple[str, bytes]]) -> list[discord.File]:
    return [discord.File(io.BytesIO(data), filename=name) for name, data in images]


def _images_key(images: list[tuple[str, bytes]]) -> tuple:
    return tuple((name, len(data), zlib.crc32(data)) for name, data in images)


class Reply:
    """The one message that follows a job or a live session.

    It is edited through its interaction's webhook while the token lives (15 minutes), then through
    the bot's own access to the channel. ``deliver`` is for what must not be lost (a result): it
    retries the edit with backoff, then posts the frame as a new message, retrying that too.
    """

    def __init__(self, bot: "AtelierBot", interaction: discord.Interaction, *, message_id: int | None = None):
        self.bot = bot
        self.retry = bot.retry
        self.interaction = interaction
        self.channel_id = interaction.channel_id
        self.message_id = message_id
        self._webhook_dead = False
        self._images_sent: tuple | None = None if message_id is None else ()
        self._warned = False

    async def open(self, frame: Frame) -> None:
        """The interaction's answer: a new message showing ``frame``."""
        kwargs: dict = {"content": frame.content}
        if frame.images:
            kwargs["files"] = _files(frame.images)
        if view := _view(frame.buttons):
            kwargs["view"] = view
        response = await self.interaction.response.send_message(**kwargs)
        self.message_id = response.message_id
        self._images_sent = _images_key(frame.images)

    def adopt(self, interaction: discord.Interaction) -> None:
        """A newer interaction on this message (a button or a box submitted from it): a fresh token to edit with."""
        self.interaction = interaction
        self._webhook_dead = False

    def _webhook_usable(self) -> bool:
        left = (self.interaction.expires_at - discord.utils.utcnow()).total_seconds()
        return not self._webhook_dead and left > self.retry.token_margin_s

    def _kwargs(self, frame: Frame) -> dict:
        kwargs: dict = {"content": frame.content, "view": _view(frame.buttons)}
        if _images_key(frame.images) != self._images_sent:
            kwargs["attachments"] = _files(frame.images)  # leaving them out keeps the message's own
        return kwargs

    async def edit(self, frame: Frame) -> bool:
        """One try at showing ``frame``; False if Discord did not take it."""
        try:
            return await self._edit(frame)
        except _Rejected as exc:
            log.warning("Discord refused an edit of message %s: %s", self.message_id, exc)
            return False

    async def _edit(self, frame: Frame) -> bool:
        """``edit``, raising _Rejected where Discord refused the frame itself."""
        try:
            if self._webhook_usable():
                try:
                    await asyncio.wait_for(self.interaction.edit_original_response(**self._kwargs(frame)),
                                           self.retry.call_timeout_s)
                    self._shown(frame)
                    return True
                except discord.HTTPException as exc:
                    if exc.status != 401 and exc.code not in _DEAD_TOKEN_CODES:
                        raise
                    log.info("the interaction token of message %s no longer works; editing as the bot",
                             self.message_id)
                    self._webhook_dead = True
            if self.message_id is None or self.channel_id is None:
                return False
            message = self.bot.get_partial_messageable(self.channel_id).get_partial_message(self.message_id)
            await asyncio.wait_for(message.edit(**self._kwargs(frame)), self.retry.call_timeout_s)
            self._shown(frame)
            return True
        except discord.HTTPException as exc:
            if exc.status in _REJECTED:
                raise _Rejected(exc.text or exc.status) from None
            self._failed(exc)
            return False
        except _DISCORD_ERRORS as exc:
            self._failed(exc)
            return False

    def _failed(self, exc: Exception) -> None:
        (log.warning if not self._warned else log.debug)("editing message %s failed: %r", self.message_id, exc)
        self._warned = True

    def _shown(self, frame: Frame) -> None:
        self._images_sent = _images_key(frame.images)
        self._warned = False

    async def post(self, frame: Frame) -> bool:
        """One try at showing ``frame`` in a new message, in reply to the old one."""
        if self.channel_id is None:
            return False
        channel = self.bot.get_partial_messageable(self.channel_id)
        kwargs: dict = {"content": frame.content, "files": _files(frame.images)}
        if view := _view(frame.buttons):
            kwargs["view"] = view
        if self.message_id is not None:
            kwargs["reference"] = discord.MessageReference(message_id=self.message_id, channel_id=self.channel_id,
                                                           fail_if_not_exists=False)
        if frame.notify is not None:
            kwargs["allowed_mentions"] = discord.AllowedMentions(users=[discord.Object(frame.notify)])
        try:
            message = await asyncio.wait_for(channel.send(**kwargs), self.retry.call_timeout_s)
        except discord.HTTPException as exc:
            if exc.status in _REJECTED:
                raise _Rejected(exc.text or exc.status) from None
            log.warning("posting to channel %s failed: %r", self.channel_id, exc)
            return False
        except _DISCORD_ERRORS as exc:
            log.warning("posting to channel %s failed: %r", self.channel_id, exc)
            return False
        log.info("message %s could not be edited; posted the result anew as %s", self.message_id, message.id)
        self.message_id = message.id
        self._webhook_dead = True  # the new message is the bot's, not the interaction's
        self._shown(frame)
        return True

    async def deliver(self, frame: Frame) -> bool:
        """Shows ``frame`` whatever it takes: edits with backoff, then new messages with backoff. A frame
        Discord refuses (its files too large, say) is shown at once without its files, saying so."""
        try:
            return await self._deliver(frame)
        except _Rejected as exc:
            log.warning("Discord refused message %s with %d file(s): %s", self.message_id, len(frame.images), exc)
        if frame.images:
            try:
                return await self._deliver(Frame(f"{frame.content}\n{FILES_REFUSED}", [], frame.buttons,
                                                 frame.notify))
            except _Rejected as exc:
                log.warning("Discord refused message %s without its files too: %s", self.message_id, exc)
        log.error("Discord would not show: %s", frame.content[:300])
        return False

    async def _deliver(self, frame: Frame) -> bool:
        if self.message_id is not None:
            for delay in (0.0, *self.retry.edit_delays_s):
                await asyncio.sleep(delay)
                if await self._edit(frame):
                    return True
        for delay in (0.0, *self.retry.post_delays_s):
            await asyncio.sleep(delay)
            if await self.post(frame):
                return True
        log.error("could not reach Discord to show: %s", frame.content[:300])
        return False


class Painter:
    """Keeps a reply showing ``render()``: repaints after a change, at most once per ``interval_s``.

    A change marked ``must_land`` (a result) is delivered, not just tried.
    """

    def __init__(self, reply: Reply, render: Callable[[], Frame], *, interval_s: float = MIN_EDIT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.reply = reply
        self.render = render
        self.interval_s = interval_s
        self.clock = clock
        self._last = clock()  # the reply's first showing counts
        self._changed = asyncio.Event()
        self._must_land = False
        self._closing = False
        self._task = asyncio.create_task(self._loop(), name="discord-painter")

    def touch(self, *, must_land: bool = False) -> None:
        self._must_land |= must_land
        self._changed.set()

    async def finish(self, *, must_land: bool = True) -> None:
        """Shows the current render (delivered, if ``must_land``), then stops."""
        self._closing = True
        self.touch(must_land=must_land)
        await asyncio.shield(self._task)

    def cancel(self) -> None:
        self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await self._changed.wait()
            delay = self._last + self.interval_s - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            self._changed.clear()
            must_land, self._must_land = self._must_land, False
            try:
                frame = self.render()
                if must_land:
                    await self.reply.deliver(frame)
                else:
                    await self.reply.edit(frame)
            except Exception:  # a bug in a render must not stop the reply for good
                log.exception("painting message %s failed", self.reply.message_id)
            self._last = self.clock()
            if self._closing and not self._changed.is_set():
                return


class PromptBox(discord.ui.Modal):
    """The box the canvas's "New prompt" button opens, holding the last prompt to edit."""

    def __init__(self, bot: "AtelierBot", prompt: str | None):
        super().__init__(title="Live prompt", timeout=600)
        self.bot = bot
        self.prompt: discord.ui.TextInput = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, default=prompt, max_length=1000)
        self.add_item(self.prompt)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.bot.live_prompt(interaction, self.prompt.value, from_canvas=True)


# --------------------------------------------------------------------------- #
# discord.py glue: the bot


@dataclass
class LiveSession:
    canvas: LiveCanvas
    model: str
    seed: int  # kept across prompts, so an edit changes the picture, not the whole composition
    steps: int | None
    reply: Reply | None = None
    painter: Painter | None = None
    idle: asyncio.Task | None = None


class AtelierTree(app_commands.CommandTree):
    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        bot = interaction.client
        refusal = bot.refusal(interaction) if isinstance(bot, AtelierBot) else None
        if refusal is None:
            return True
        if interaction.type is discord.InteractionType.application_command:
            await interaction.response.send_message(refusal, ephemeral=True)
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("command %s failed", interaction.command.name if interaction.command else "?",
                  exc_info=getattr(error, "original", error))
        text = "Something went wrong on atelier's side; the log says what."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except _DISCORD_ERRORS:
            pass


class AtelierBot(discord.Client):
    """The Discord bot over one ``AtelierClient``."""

    def __init__(self, atelier: AtelierClient, settings: DiscordConfig, *, default_model: str,
                 retry: RetryPolicy | None = None, sync_commands: bool = True,
                 clock: Callable[[], float] = time.monotonic, public_url: str | None = None, **options):
        # The bot speaks no voice: discord.py's warnings about missing voice libraries are only noise.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        options.setdefault("intents", discord.Intents.default())
        # A prompt may say @everyone; the bot never pings anyone but a result's owner.
        options.setdefault("allowed_mentions", discord.AllowedMentions.none())
        super().__init__(**options)
        self.atelier = atelier
        self.settings = settings
        self.default_model = settings.default_model or default_model
        self.retry = retry or RetryPolicy()
        self.public_url = public_url  # the HTTP API's, for links to outputs too large to upload
        self.sync_commands = sync_commands
        self.clock = clock
        self.tree = AtelierTree(self)
        self.job_rate = RateLimiter(settings.rate_per_minute)
        self.live_rate = RateLimiter(settings.live_per_minute)
        self.jobs: dict[str, JobCard] = {}  # active, by job id
        self.finished: OrderedDict[str, JobCard] = OrderedDict()
        self.sessions: dict[tuple[int, int], LiveSession] = {}
        self._models: list[ModelInfo] = []
        self._models_at = -1e9
        self._tasks = TaskSet("discord")
        self._register_commands()

    # -- lifecycle ----------------------------------------------------------- #

    async def setup_hook(self) -> None:
        self.add_dynamic_items(AtelierButton)
        self._spawn(follow_catalog(self.atelier, None, self._catalog_reloaded), "follow-catalog")
        if not self.sync_commands:
            return
        try:
            if self.settings.guilds:
                for guild_id in self.settings.guilds:  # guild commands show up at once, global ones can lag
                    guild = discord.Object(guild_id)
                    self.tree.copy_global_to(guild=guild)
                    await self.tree.sync(guild=guild)
            else:
                await self.tree.sync()
        except discord.HTTPException as exc:
            log.error("could not register the slash commands with Discord: %s", exc)

    async def on_ready(self) -> None:
        log.info("logged in to Discord as %s (%s)", self.user, self.user.id if self.user else "?")

    async def close(self) -> None:
        undelivered = [job_id for job_id in self.jobs]
        if undelivered:
            # Their results would come back to this process's client, which is going: free the GPUs instead.
            log.warning("stopping: cancelling %d job(s) not yet delivered to Discord: %s", len(undelivered),
                        ", ".join(undelivered))
            await asyncio.gather(*(self._cancel_quietly(job_id) for job_id in undelivered))
        await self._tasks.cancel_all()
        for session in self.sessions.values():
            if session.painter is not None:
                session.painter.cancel()
        await super().close()

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await asyncio.wait_for(self.atelier.cancel(job_id), 2.0)
        except (RemoteError, asyncio.TimeoutError) as exc:
            log.warning("could not cancel job %s: %s", job_id, exc)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        return self._tasks.spawn(coro, name)

    # -- who may ------------------------------------------------------------- #

    def refusal(self, interaction: discord.Interaction) -> str | None:
        channel = interaction.channel
        channels = [c for c in (interaction.channel_id, getattr(channel, "parent_id", None)) if c]
        return access_refusal(self.settings, guild_id=interaction.guild_id, channel_ids=channels,
                              role_ids=_role_ids(interaction))

    def admin(self, interaction: discord.Interaction) -> bool:
        return is_admin(self.settings, user_id=interaction.user.id, role_ids=_role_ids(interaction))

    def _visible(self, interaction: discord.Interaction) -> list[JobCard]:
        """The active jobs this member may see and cancel: their own, or everyone's for an admin."""
        admin = self.admin(interaction)
        return [c for c in self.jobs.values() if admin or c.owner == interaction.user.id]

    def _rate_refusal(self, user_id: int, *, live: bool = False) -> str | None:
        limiter = self.live_rate if live else self.job_rate
        wait = limiter.try_acquire(user_id, self.clock())
        if not wait:
            return None
        return rate_refusal(wait, limiter.limit, "live prompts" if live else "jobs")

    @staticmethod
    async def _say(interaction: discord.Interaction, text: str) -> None:
        """An ephemeral answer, whether or not the interaction was answered already."""
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)

    # -- the catalog ------------------------------------------------------------ #

    def _catalog_reloaded(self, _config) -> None:
        """An operator reloaded the catalog: the next look at it asks the scheduler."""
        self._models_at = -1e9

    async def models(self) -> list[ModelInfo]:
        if self.clock() - self._models_at > 30:
            try:
                self._models = await self.atelier.models()
                self._models_at = self.clock()
                if self.settings.default_model is None:  # the catalog's, which a reload may change
                    self.default_model = next((m.name for m in self._models if m.default), self.default_model)
            except (RemoteError, asyncio.TimeoutError) as exc:
                log.warning("could not read the catalog: %s", exc)
        return self._models

    async def _model(self, name: str) -> ModelInfo | None:
        return next((m for m in await self.models() if m.name == name), None)

    async def _complete_model(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        """/generate offers the models that make something from a prompt; /live, those that make images."""
        needle = current.lower()
        live = interaction.command is not None and interaction.command.name == "live"

        train = interaction.command is not None and interaction.command.name == "train"

        def fits(m: ModelInfo) -> bool:
            if train:
                return JobKind.train in m.kinds
            return JobKind.txt2img in m.kinds if live else text_kind(m) is not None

        return [app_commands.Choice(name=f"{m.name} ({m.family}, {m.default_width}×{m.default_height})"[:100],
                                    value=m.name)
                for m in await self.models() if needle in m.name.lower() and fits(m)][:25]

    async def _complete_controlnet(self, interaction: discord.Interaction,
                                   current: str) -> list[app_commands.Choice[str]]:
        """The ControlNets of the model the command names so far (else the default model's)."""
        model = await self._model(getattr(interaction.namespace, "model", None) or self.default_model)
        needle = current.lower()
        return [app_commands.Choice(name=name[:100], value=name)
                for name in (model.controlnets if model else []) if needle in name.lower()][:25]

    async def _complete_lora(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        """The LoRAs of the model the command names so far (else the default model's): the catalog's, then
        the member's trained ones and those lent to them (``@owner/name``)."""
        name = getattr(interaction.namespace, "model", None) or self.default_model
        model = await self._model(name)
        user = f"discord:{interaction.user.id}"
        try:
            trained = await asyncio.wait_for(self.atelier.loras(user), self.retry.call_timeout_s)
        except (RemoteError, asyncio.TimeoutError) as exc:
            log.warning("could not list the LoRAs of %s: %s", user, exc)
            trained = []
        names = (model.loras + model.user_loras if model else []) + \
            [lo.name if lo.owner == user else f"@{lo.owner}/{lo.name}" for lo in trained if lo.model == name]
        needle = current.lower()
        return [app_commands.Choice(name=n[:100], value=n)
                for n in dict.fromkeys(names) if needle in n.lower()][:25]

    async def _complete_job(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        mine = [c for c in self._visible(interaction) if current in c.spec.id]
        return [app_commands.Choice(name=f"{c.spec.id[:8]} {' '.join(c.spec.prompt.split())}"[:100], value=c.spec.id)
                for c in reversed(mine)][:25]

    # -- commands ------------------------------------------------------------ #

    def _register_commands(self) -> None:
        tree = self.tree

        @tree.command(name="generate", description="Generate images from a prompt")
        @app_commands.describe(prompt="what to draw", negative="what to keep out of it",
                               model="which model (default: the server's)", count="how many images",
                               width="in pixels, a multiple of 8", height="in pixels, a multiple of 8",
                               steps="denoising steps (more: slower, finer)",
                               seed="the same seed and prompt give the same image",
                               image="start from this image (img2img)",
                               strength="how far from the image, above 0 up to 1 (default: atelier's, 0.75)",
                               control_image="an image for the ControlNet to follow (edges, depth, pose…)",
                               controlnet="which of the model's ControlNets reads the control image",
                               controlnet_scale="how strongly the ControlNet steers, 0 to 2 (default 1)",
                               reference_image="an image as a prompt, for a model with an IP-Adapter",
                               reference_scale="how strongly the reference image steers, 0 to 2 (default 1)",
                               lora="a LoRA of the model: one you trained with /train, or the catalog's",
                               lora_scale="how strongly the LoRA applies, 0 to 2 (default 1)")
        @app_commands.autocomplete(model=self._complete_model, controlnet=self._complete_controlnet,
                                   lora=self._complete_lora)
        async def generate(interaction: discord.Interaction, prompt: str, negative: str | None = None,
                           model: str | None = None, count: app_commands.Range[int, 1, 10] = 1,
                           width: Optional[app_commands.Range[int, 8, 8192]] = None,
                           height: Optional[app_commands.Range[int, 8, 8192]] = None,
                           steps: Optional[app_commands.Range[int, 1, 500]] = None,
                           seed: Optional[app_commands.Range[int, 0, 2**53]] = None,
                           image: Optional[discord.Attachment] = None,
                           strength: Optional[app_commands.Range[float, 0.0, 1.0]] = None,
                           control_image: Optional[discord.Attachment] = None, controlnet: str | None = None,
                           controlnet_scale: Optional[app_commands.Range[float, 0.0, 2.0]] = None,
                           reference_image: Optional[discord.Attachment] = None,
                           reference_scale: Optional[app_commands.Range[float, 0.0, 2.0]] = None,
                           lora: str | None = None,
                           lora_scale: Optional[app_commands.Range[float, 0.0, 2.0]] = None) -> None:
            images = {"image": image, "control_image": control_image, "reference_image": reference_image}
            if lora_scale is not None and lora is None:
                await self._say(interaction, "lora_scale goes with a lora.")
                return
            loras = {lora: 1.0 if lora_scale is None else lora_scale} if lora else {}
            await self.generate(interaction, dict(prompt=prompt, negative_prompt=negative, model=model,
                                                  count=count, width=width, height=height, steps=steps, seed=seed,
                                                  strength=strength,
                                                  controlnet=controlnet, controlnet_scale=controlnet_scale,
                                                  ip_adapter_scale=reference_scale, loras=loras),
                                {IMAGE_OPTIONS[option]: a for option, a in images.items() if a is not None})

        @tree.command(name="train", description="Train a LoRA from up to 4 images (more: the HTTP API or CLI)")
        @app_commands.describe(name="the LoRA's name, for /generate lora:NAME",
                               prompt="what the images show, with a rare word for it (default: a photo of sks)",
                               image1="an image of it", image2="another image", image3="another image",
                               image4="another image", model="which model (default: the server's)",
                               steps="training steps (more: slower, closer to the images)",
                               resolution="the side the images are trained at, a multiple of 8 (default 512)")
        @app_commands.autocomplete(model=self._complete_model)
        async def train(interaction: discord.Interaction, name: app_commands.Range[str, 1, 64],
                        image1: discord.Attachment, prompt: str = "a photo of sks",
                        image2: Optional[discord.Attachment] = None, image3: Optional[discord.Attachment] = None,
                        image4: Optional[discord.Attachment] = None, model: str | None = None,
                        steps: app_commands.Range[int, 1, 5000] = 500,
                        resolution: Optional[app_commands.Range[int, 8, 2048]] = None) -> None:
            images = [a for a in (image1, image2, image3, image4) if a is not None]
            await self.train(interaction, name=name, prompt=prompt, images=images, model=model, steps=steps,
                             resolution=resolution)

        @tree.command(name="live", description="Images as you write: each new prompt replaces the last")
        @app_commands.describe(prompt="what to draw; use /live again or the New prompt button to change it",
                               model="which model (default: the server's)",
                               steps="denoising steps (fewer: faster, rougher)")
        @app_commands.autocomplete(model=self._complete_model)
        async def live(interaction: discord.Interaction, prompt: str, model: str | None = None,
                       steps: Optional[app_commands.Range[int, 1, 500]] = None) -> None:
            await self.live_prompt(interaction, prompt, model=model, steps=steps)

        @tree.command(name="models", description="The models atelier serves")
        async def models(interaction: discord.Interaction) -> None:
            catalog = await self.models()
            lines = [f"**{m.name}** · {m.family} · {does(m)} · "
                     + (f"{m.default_width}×{m.default_height} (up to {m.max_width}×{m.max_height}), "
                        if JobKind.txt2audio not in m.kinds else "")
                     + f"{m.default_steps} steps"
                     + (f" · ControlNets: {', '.join(m.controlnets)}" if m.controlnets else "")
                     + (" · IP-Adapter" if m.ip_adapter else "")
                     + (" · *default*" if m.name == self.default_model else "")
                     for m in catalog]
            shown = []  # a message holds 2000 characters at most
            while lines and sum(len(line) + 1 for line in shown) + len(lines[0]) < 1950:
                shown.append(lines.pop(0))
            if lines:
                shown.append(f"… and {len(lines)} more")
            await interaction.response.send_message("\n".join(shown) or "atelier has no models.", ephemeral=True)

        @tree.command(name="queue", description="Where your jobs stand, and how long the queue is")
        async def queue(interaction: discord.Interaction) -> None:
            await self.queue(interaction)

        @tree.command(name="cancel", description="Cancel your job: the latest one, or the one you name")
        @app_commands.describe(job="a job id (default: your latest running or queued job)")
        @app_commands.autocomplete(job=self._complete_job)
        async def cancel(interaction: discord.Interaction, job: str | None = None) -> None:
            await self.cancel(interaction, job)

    # -- /generate, Again ------------------------------------------------------ #

    async def generate(self, interaction: discord.Interaction, params: dict,
                       attachments: dict[str, discord.Attachment] | None = None, *,
                       source: tuple[str, int] | None = None) -> None:
        """``params`` are JobSpec's fields; ``attachments`` the input images, by JobInputs field;
        ``source`` another job's output as the input image (Upscale, Variations)."""
        user = interaction.user.id
        attachments = attachments or {}
        from_image = "image" in attachments or source is not None
        if params.get("count", 1) > self.settings.max_count:
            await self._say(interaction, f"At most {self.settings.max_count} images per job here.")
            return
        if (refusal := self._attachments_refusal(attachments)) is not None:
            await self._say(interaction, refusal)
            return
        strength = params.get("strength")
        if strength is not None and not from_image:
            await self._say(interaction, "strength says how far to go from an image: attach one as image.")
            return
        if strength is not None and not 0 < strength <= 1:
            await self._say(interaction, "strength is above 0 (which would keep the image as it is) and at most 1.")
            return
        catalog = await self.models()
        model = await self._model(params.get("model") or self.default_model)
        upscaler, _ = upscaler_of(catalog, self.settings.upscaler)
        can_upscale = can_vary = False
        if model is not None:
            if params.get("kind") == JobKind.upscale:
                kind = JobKind.upscale
            elif from_image:
                if (refusal := image_refusal(model, catalog)) is not None:
                    await self._say(interaction, refusal)
                    return
                kind = JobKind.img2img
            else:
                kind = text_kind(model)
            if kind is None:
                await self._say(interaction, f"{model.name} starts from an input ({does(model)}); "
                                             "/generate makes things from a prompt alone.")
                return
            steps = params.get("steps") or model.default_steps
            if kind is JobKind.img2img and strength is not None and int(steps * strength) < 1:
                await self._say(interaction, f"strength {strength:g} of {steps} steps leaves no step to run "
                                             "(steps × strength must be 1 or more): ask for more steps.")
                return
            images = model.media == "image" and kind is not JobKind.upscale
            can_upscale, can_vary = images and upscaler is not None, images and JobKind.img2img in model.kinds
            refusal = conditioning_refusal(
                model, await self.models(), controlnet=params.get("controlnet"),
                control_image="control_image" in attachments, controlnet_scale=params.get("controlnet_scale"),
                reference_image="ip_adapter_image" in attachments, reference_scale=params.get("ip_adapter_scale"))
            if refusal is not None:
                await self._say(interaction, refusal)
                return
            params["kind"] = kind
            # The catalog's defaults, written out, so the message says what was made. A job from an image
            # keeps the image's size (the scheduler reads it; the message shows it once submitted).
            if not from_image:
                params["width"] = params.get("width") or model.default_width
                params["height"] = params.get("height") or model.default_height
            params["steps"] = steps
        try:
            spec = JobSpec(**{**params, "model": params.get("model") or self.default_model,
                              "user": f"discord:{user}", "priority": Priority.interactive})
        except ValidationError as exc:
            await self._say(interaction, f"Can't submit that: {_problems(exc)}")
            return
        if (refusal := self._rate_refusal(user)) is not None:
            await self._say(interaction, refusal)
            return
        card = JobCard(spec=spec, owner=user, display=JobDisplay(submitted_at=self.clock()), attachments=attachments,
                       source=source, upload_bytes=_upload_bytes(interaction), can_upscale=can_upscale,
                       can_vary=can_vary)
        await self._start(interaction, card)

    async def _start(self, interaction: discord.Interaction, card: JobCard) -> None:
        """Answers with the job's message, then submits it and follows it to its end (/generate, /train)."""
        reply = Reply(self, interaction)
        await reply.open(self._render(card))  # within Discord's 3 s, before anything that may wait
        self.jobs[card.spec.id] = card
        self._spawn(self._follow(card, reply), f"job-{card.spec.id}")

    @staticmethod
    def _attachments_refusal(attachments: dict[str, discord.Attachment]) -> str | None:
        refusals = (attachment_refusal(_OPTION_OF[field], a.filename, a.content_type, a.size)
                    for field, a in attachments.items())
        return next((refusal for refusal in refusals if refusal is not None), None)

    async def _inputs(self, card: JobCard) -> JobInputs | None:
        """The job's input images: those attached, read from Discord now (after the reply: it may take a
        while), and another job's output, read back from atelier."""
        if not card.attachments and card.source is None and not card.train_images:
            return None
        read: dict = {}
        if card.train_images:
            read["train_images"] = [await self._read(a, f"image{n + 1}", card.spec.id)
                                    for n, a in enumerate(card.train_images)]
        for field, attachment in card.attachments.items():
            read[field] = await self._read(attachment, _OPTION_OF[field], card.spec.id)
        if card.source is not None:
            read["image"] = await self._output(*card.source)
        return JobInputs(**read)

    async def _read(self, attachment: discord.Attachment, option: str, job_id: str) -> bytes:
        try:
            return await asyncio.wait_for(attachment.read(), self.retry.call_timeout_s)
        except _DISCORD_ERRORS as exc:
            log.warning("reading the %s of job %s failed: %r", option, job_id, exc)
            raise _Unreadable(f"could not read the {option} from Discord; attach it again") from None

    async def _output(self, job_id: str, index: int) -> bytes:
        """Image ``index`` of a finished job: from the client's results (bounded by count and bytes), else
        from the scheduler, which reads it back from the artifact store."""
        result = self.atelier.result(job_id)
        if result is None or len(result.outputs) <= index:
            try:
                result = await asyncio.wait_for(self.atelier.fetch_result(job_id), self.retry.call_timeout_s)
            except (RemoteError, asyncio.TimeoutError) as exc:
                log.warning("reading image %d of job %s back failed: %s", index, job_id, exc)
                result = None
        outputs = result.outputs if result is not None else []
        if index >= len(outputs) or not outputs[index].media_type.startswith("image/"):
            raise _Unreadable(f"atelier no longer has image {index + 1} of job `{job_id[:8]}`")
        return bytes(outputs[index].data)

    async def _source_spec(self, job_id: str) -> tuple[JobSpec, JobCard | None] | None:
        """What a finished job of the bot's was: from its card while remembered, else from atelier."""
        card = self.jobs.get(job_id) or self.finished.get(job_id)
        if card is not None:
            return card.spec, card
        if not _JOB_ID.match(job_id):
            return None
        try:
            record = await self.atelier.job(job_id)
        except (RemoteError, asyncio.TimeoutError):
            return None
        # Only the bot's own jobs: a button names a job it showed, never one of another frontend's.
        if not record.spec.user.startswith("discord:") or record.state is not JobState.done:
            return None
        return record.spec, None

    def _render(self, card: JobCard) -> Frame:
        return render_job(card, self.clock(), public_url=self.public_url)

    async def _follow(self, card: JobCard, reply: Reply) -> None:
        spec = card.spec
        painter = Painter(reply, lambda: self._render(card), clock=self.clock)
        try:
            try:
                record = await self.atelier.submit(spec, inputs=await self._inputs(card))
            except _Unreadable as exc:
                card.refused = str(exc)
            except RemoteError as exc:  # the view takes any path out of it
                card.refused = (f"{exc.error.field}: " if exc.error.field else "") + exc.error.message
            except asyncio.TimeoutError:
                card.refused = "atelier did not answer; try again in a moment"
            else:
                # What atelier filled in (a size read from the input image, its default strength, the
                # seed), so the message says what is made.
                filled = {k: getattr(record.spec, k) for k in ("width", "height", "steps", "seed", "strength")
                          if getattr(spec, k) is None and record.spec.id == spec.id}
                card.spec = spec = spec.model_copy(update=filled)

                def on_event(event: Event) -> None:
                    card.display.apply(event, self.clock())
                    painter.touch()

                card.result = await self._watch(spec, on_event)
                card.display.apply(card.result, self.clock())
            await painter.finish()
        finally:
            painter.cancel()
            self._remember(card)

    def _remember(self, card: JobCard) -> None:
        self.jobs.pop(card.spec.id, None)
        card.delivered()
        self.finished[card.spec.id] = card
        while len(self.finished) > KEEP_FINISHED:
            self.finished.popitem(last=False)

    async def _watch(self, spec: JobSpec, on_event: Callable[[Event], None]) -> JobResult:
        """Feeds the job's events to ``on_event`` until its result, which it returns."""
        job_id = spec.id
        while True:
            try:
                async for event in self.atelier.events(job_id, timeout=SILENCE_S):
                    if isinstance(event, JobResult):
                        return event
                    on_event(event)
            except asyncio.TimeoutError:
                try:
                    record = await self.atelier.job(job_id)
                except RemoteError as exc:
                    log.error("atelier no longer knows job %s: %s", job_id, exc)
                    return JobResult(job=JobRecord(spec=spec, state=JobState.failed, submitted_at=time.time(),
                                                   reason="atelier lost this job (was it restarted?)"))
                except asyncio.TimeoutError:
                    continue
                if record.state.terminal:
                    try:
                        return await self.atelier.wait(job_id, timeout=SILENCE_S)
                    except asyncio.TimeoutError:
                        return JobResult(job=record)  # its images went astray; its state did not

    # -- /train ------------------------------------------------------------------ #

    async def train(self, interaction: discord.Interaction, *, name: str, prompt: str,
                    images: list[discord.Attachment], model: str | None, steps: int,
                    resolution: int | None) -> None:
        """A LoRA training of the member's from the attached images; its message follows it as /generate's do."""
        user = interaction.user.id
        refusals = (attachment_refusal(f"image{n + 1}", a.filename, a.content_type, a.size)
                    for n, a in enumerate(images))
        if (refusal := next((r for r in refusals if r is not None), None)) is not None:
            await self._say(interaction, refusal)
            return
        if len(images) > MAX_TRAIN_IMAGES:  # /train offers 4; the bound is atelier's
            await self._say(interaction, f"A training takes at most {MAX_TRAIN_IMAGES} images.")
            return
        name_of_model = model or self.default_model
        info = await self._model(name_of_model)
        if info is None:
            await self._say(interaction, f"atelier has no model `{discord.utils.escape_markdown(name_of_model)}`.")
            return
        if (refusal := train_refusal(info, await self.models())) is not None:
            await self._say(interaction, refusal)
            return
        settings = dict(name=name, steps=steps) | ({"resolution": resolution} if resolution is not None else {})
        try:
            spec = JobSpec(kind=JobKind.train, model=info.name, prompt=prompt, user=f"discord:{user}",
                           train=TrainSpec(**settings))
        except ValidationError as exc:
            await self._say(interaction, f"Can't submit that: {_problems(exc)}")
            return
        if (refusal := self._rate_refusal(user)) is not None:
            await self._say(interaction, refusal)
            return
        card = JobCard(spec=spec, owner=user, display=JobDisplay(submitted_at=self.clock()),
                       train_images=images, upload_bytes=_upload_bytes(interaction))
        await self._start(interaction, card)

    async def again(self, interaction: discord.Interaction, source: JobCard) -> None:
        spec = source.spec
        params = _settings_of(spec) | dict(count=spec.count)
        if spec.kind == JobKind.upscale:
            params["kind"] = JobKind.upscale
        await self.generate(interaction, params, source.attachments, source=source.source)

    async def upscale(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        """Image ``index`` of a finished job, through the catalog's upscaler, as a new job of the presser's."""
        upscaler, refusal = upscaler_of(await self.models(), self.settings.upscaler)
        if refusal is not None:
            await self._say(interaction, refusal)
            return
        found = await self._source_spec(job_id)
        if found is None:
            await self._say(interaction, "atelier no longer remembers that job.")
            return
        spec, _ = found
        if spec.kind == JobKind.upscale:  # its size is its input's: the bot offers no upscale of an upscale
            await self._say(interaction, "That image is an upscale already.")
            return
        # The upscaler works at the input's size: one too large is refused here, not silently shrunk.
        if spec.width and spec.height and (spec.width > upscaler.max_width or spec.height > upscaler.max_height):
            await self._say(interaction, f"That image is {spec.width}×{spec.height}; {upscaler.name} upscales "
                                         f"images up to {upscaler.max_width}×{upscaler.max_height}.")
            return
        params = dict(kind=JobKind.upscale, model=upscaler.name, prompt=spec.prompt,
                      negative_prompt=spec.negative_prompt, width=spec.width, height=spec.height,
                      steps=self.settings.upscale_steps)
        await self.generate(interaction, params, source=(job_id, index))

    async def vary(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        """Image ``index`` of a finished job made again from itself at VARIATION_STRENGTH, with a new seed."""
        found = await self._source_spec(job_id)
        if found is None:
            await self._say(interaction, "atelier no longer remembers that job.")
            return
        spec, card = found
        params = _settings_of(spec) | dict(strength=VARIATION_STRENGTH, steps=variation_steps(spec.steps))
        shown_seed = spec.seed + index if spec.seed is not None else None  # a job's images take seed, seed+1, …
        seed = random.randrange(2**32)
        while seed == shown_seed:
            seed = random.randrange(2**32)
        params["seed"] = seed
        # The ControlNet and reference images go along where the bot still has their attachments;
        # without them (a card it no longer remembers) the variation is of the image and prompt alone.
        attachments = {k: v for k, v in card.attachments.items() if k != "image"} if card is not None else {}
        if "control_image" not in attachments:
            params.update(controlnet=None, controlnet_scale=None)
        if "ip_adapter_image" not in attachments:
            params["ip_adapter_scale"] = None
        await self.generate(interaction, params, attachments, source=(job_id, index))

    # -- /live ------------------------------------------------------------------ #

    async def live_prompt(self, interaction: discord.Interaction, prompt: str, *, model: str | None = None,
                          steps: int | None = None, from_canvas: bool = False) -> None:
        user, channel = interaction.user.id, interaction.channel_id or 0
        if from_canvas and (refusal := self.refusal(interaction)) is not None:
            await self._say(interaction, refusal)
            return
        if not prompt.strip():
            await self._say(interaction, "The prompt is empty.")
            return
        session = self.sessions.get((user, channel))
        if session is not None:
            model, steps = model or session.model, steps or session.steps
        model = model or self.default_model
        seed = session.seed if session else random.randrange(2**32)
        try:
            spec = JobSpec(model=model, prompt=prompt, steps=steps, seed=seed, user=f"discord:{user}",
                           priority=Priority.live, session=f"{user}:{channel}")
        except ValidationError as exc:  # the session, if any, goes on as it was
            await self._say(interaction, f"Can't submit that: {_problems(exc)}")
            return
        if (refusal := self._rate_refusal(user, live=True)) is not None:
            await self._say(interaction, refusal)
            return
        if session is None:
            session = LiveSession(canvas=LiveCanvas(owner=user, channel=channel), model=model, seed=seed, steps=steps)
            self.sessions[(user, channel)] = session
        session.model, session.steps = model, steps
        # Before the submit: from now on the replaced job's events are ignored, whatever their timing.
        session.canvas.submitted(spec.id, prompt, self.clock())
        if session.idle is not None:
            session.idle.cancel()
        await self._show_canvas(session, interaction, from_canvas)
        self._spawn(self._follow_live(session, spec), f"live-{spec.id}")

    async def _show_canvas(self, session: LiveSession, interaction: discord.Interaction, from_canvas: bool) -> None:
        message = interaction.message.id if from_canvas and interaction.message else None
        if session.reply is not None and message is not None and session.reply.message_id == message:
            await interaction.response.defer()  # the canvas itself changes; nothing else to say
            session.reply.adopt(interaction)
            session.painter.touch()
            return
        if session.painter is not None:  # the canvas moves: the old one says so and keeps no picture
            old = session.painter
            old.render = moved_frame
            self._spawn(old.finish(must_land=False), "live-retire")
        if message is not None:
            await interaction.response.defer()
            session.reply = Reply(self, interaction, message_id=message)
            session.painter = Painter(session.reply, lambda: render_live(session.canvas, self.clock()),
                                      clock=self.clock)
            session.painter.touch()
        else:
            session.reply = Reply(self, interaction)
            await session.reply.open(render_live(session.canvas, self.clock()))
            session.painter = Painter(session.reply, lambda: render_live(session.canvas, self.clock()),
                                      clock=self.clock)

    async def _follow_live(self, session: LiveSession, spec: JobSpec) -> None:
        canvas = session.canvas
        self.jobs[spec.id] = card = JobCard(spec=spec, owner=canvas.owner, display=JobDisplay(self.clock()))
        try:
            try:
                await self.atelier.submit(spec)
            except RemoteError as exc:
                canvas.refuse(spec.id, (f"{exc.error.field}: " if exc.error.field else "") + exc.error.message)
                session.painter.touch(must_land=True)
                return
            except asyncio.TimeoutError:
                canvas.refuse(spec.id, "atelier did not answer; try again in a moment")
                session.painter.touch(must_land=True)
                return

            def on_event(event: Event) -> None:
                card.display.apply(event, self.clock())
                if canvas.apply(spec.id, event, self.clock()):
                    session.painter.touch()

            result = await self._watch(spec, on_event)
            card.result = result
            card.display.apply(result, self.clock())
            if canvas.apply(spec.id, result, self.clock()):
                session.painter.touch(must_land=True)  # the newest prompt's image must reach the canvas
                session.idle = self._spawn(self._end_live_later(session), "live-idle")
        finally:
            self._remember(card)

    async def _end_live_later(self, session: LiveSession) -> None:
        await asyncio.sleep(LIVE_IDLE_S)
        await self._end_live(session)

    async def _end_live(self, session: LiveSession) -> None:
        if self.sessions.get((session.canvas.owner, session.canvas.channel)) is session:
            del self.sessions[(session.canvas.owner, session.canvas.channel)]
        session.canvas.ended = True
        if session.canvas.active and session.canvas.job_id:
            try:
                await self.atelier.cancel(session.canvas.job_id)
            except (RemoteError, asyncio.TimeoutError):
                pass
        if session.painter is not None:
            await session.painter.finish(must_land=False)

    # -- buttons ------------------------------------------------------------- #

    async def on_button(self, interaction: discord.Interaction, button: ButtonSpec) -> None:
        if (refusal := self.refusal(interaction)) is not None:
            await self._say(interaction, refusal)
            return
        user = interaction.user.id
        # An admin may stop anyone's job or live session, but edits only their own prompts.
        owner_only = ("edit",) if self.admin(interaction) else ("cancel", "edit", "stop")
        if button.action in owner_only and user != button.owner:
            what = "job" if button.action == "cancel" else "live session"
            await self._say(interaction, f"Only <@{button.owner}> can do that to their {what}.")
            return
        if button.action == "cancel":
            await interaction.response.defer()  # the job's message shows the outcome
            await self._cancel_job(interaction, button.ref)
        elif button.action == "again":
            source = self.jobs.get(button.ref) or self.finished.get(button.ref)
            if source is None:
                await self._say(interaction, "atelier no longer remembers that job.")
                return
            await self.again(interaction, source)
        elif button.action == "upscale":
            await self.upscale(interaction, button.ref, button.index or 0)
        elif button.action == "vary":
            await self.vary(interaction, button.ref, button.index or 0)
        elif button.action == "edit":
            session = self.sessions.get((user, int(button.ref)))
            last = session.canvas.prompt if session else None
            if last is None and interaction.message is not None:
                last = next((p for p in _prompts_in(interaction.message.content)), None)
            await interaction.response.send_modal(PromptBox(self, last))
        elif button.action == "stop":
            await interaction.response.defer()
            session = self.sessions.get((button.owner, int(button.ref)))
            if session is not None:
                await self._end_live(session)

    # -- /queue, /cancel ------------------------------------------------------- #

    async def queue(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        status = await self.atelier.status()
        running = sum(status.counts.get(s, 0) for s in ("assigned", "loading", "running"))
        lines = [f"**Queue:** {status.queued_total} waiting, {running} running."]
        mine = self._visible(interaction)  # counts are everyone's; job ids and prompts only one's own
        admin = self.admin(interaction)
        now = self.clock()
        for card in mine:
            try:
                record = await self.atelier.job(card.spec.id)
            except RemoteError:
                continue
            if record.state is JobState.queued:
                if record.position is not None:
                    card.display.position = record.position
                if record.eta_s is not None:
                    card.display.eta_s, card.display.eta_at = record.eta_s, now
            whose = f"<@{card.owner}> " if admin else ""
            lines.append(f"`{card.spec.id[:8]}` {whose}{quote(card.spec.prompt)} — {status_line(card.display, now)}")
        if not mine:
            lines.append("You have no jobs in atelier right now." if not admin else "The bot follows no job now.")
        await interaction.followup.send("\n".join(lines), ephemeral=True)

    async def cancel(self, interaction: discord.Interaction, job: str | None) -> None:
        user = interaction.user.id
        if job is None:
            mine = [c for c in self.jobs.values() if c.owner == user and c.active]
            if not mine:
                await self._say(interaction, "You have no running or queued job.")
                return
            job_id = max(mine, key=lambda c: c.display.submitted_at).spec.id
        else:
            if not _JOB_ID.match(job):
                await self._say(interaction, f"There is no job `{discord.utils.escape_markdown(job[:64])}`.")
                return
            admin = self.admin(interaction)
            # A prefix names only a job one may cancel: it must not tell whose ids begin how.
            matches = [c.spec.id for c in (*self.jobs.values(), *self.finished.values())
                       if c.spec.id.startswith(job) and (admin or c.owner == user)] or [job]
            job_id = matches[0]
            card = self.jobs.get(job_id) or self.finished.get(job_id)
            owner = card.owner if card else None
            if owner is None:
                try:
                    record = await self.atelier.job(job_id)
                except RemoteError:
                    await self._say(interaction, f"There is no job `{job}`.")
                    return
                owner = int(record.spec.user.removeprefix("discord:")) if record.spec.user.startswith(
                    "discord:") and record.spec.user[8:].isdigit() else None
            if owner != user and not admin:
                await self._say(interaction, "That job isn't yours to cancel.")
                return
        await interaction.response.defer(ephemeral=True, thinking=True)
        text = await self._cancel_job(interaction, job_id)
        await interaction.followup.send(text, ephemeral=True)

    async def _cancel_job(self, interaction: discord.Interaction, job_id: str) -> str:
        try:
            record = await self.atelier.cancel(job_id)
        except RemoteError as exc:
            return f"Could not cancel `{job_id[:8]}`: {scrub(exc.error.message)}"
        if record.state.terminal and record.state is not JobState.cancelled:
            return f"`{job_id[:8]}` had already {record.state.value}."
        return f"Cancelled `{job_id[:8]}`" + ("" if record.state.terminal else " (it stops at its next step).")


class _Unreadable(Exception):
    """An attached image could not be read from Discord."""


class _Rejected(Exception):
    """Discord refused what a message carries (HTTP 400 or 413): the same again would be refused too."""


def _settings_of(spec: JobSpec) -> dict:
    """A job's prompt and settings, for another job like it (Again, Variations): the seed is left out."""
    return dict(prompt=spec.prompt, negative_prompt=spec.negative_prompt, model=spec.model, width=spec.width,
                height=spec.height, steps=spec.steps, guidance=spec.guidance, sampler=spec.sampler,
                schedule=spec.schedule, loras=dict(spec.loras), strength=spec.strength, controlnet=spec.controlnet,
                controlnet_scale=spec.controlnet_scale, ip_adapter_scale=spec.ip_adapter_scale)


def _problems(exc: ValidationError) -> str:
    """What pydantic found wrong, one field after the other, without the values themselves."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))


def _role_ids(interaction: discord.Interaction) -> list[int]:
    return [role.id for role in getattr(interaction.user, "roles", ())]


def _upload_bytes(interaction: discord.Interaction) -> int:
    """What a message answering ``interaction`` may carry in files: the least Discord and the server allow."""
    limits = [getattr(interaction, "filesize_limit", None),
              interaction.guild.filesize_limit if interaction.guild is not None else None]
    return min((limit for limit in limits if limit), default=UPLOAD_BYTES)


def _prompts_in(content: str) -> Iterable[str]:
    """The quoted prompt of a canvas's text, for a canvas whose session ended (its «…»)."""
    start = content.find("«")
    end = content.find("»", start + 1)
    if start != -1 and end != -1:
        yield content[start + 1:end]


# --------------------------------------------------------------------------- #
# The process


def _config_problem(config) -> str | None:
    settings = config.discord
    for key in ("default_model", "upscaler"):
        name = getattr(settings, key)
        if name is not None and config.models and name not in config.models:
            return f"[discord] {key} = {name!r} is not in the catalog ({', '.join(config.models)})"
    name = settings.upscaler
    if name is not None and config.models and JobKind.upscale.value not in config.models[name].limits.kinds:
        upscalers = [n for n, entry in config.models.items() if JobKind.upscale.value in entry.limits.kinds]
        return (f"[discord] upscaler = {name!r} does not upscale (family {config.models[name].family}); "
                f"models that do: {', '.join(upscalers) or 'none in this catalog'}")
    return None


async def _serve(args: argparse.Namespace, config: Config, stop: asyncio.Event) -> int:
    from actors.keys import for_peer

    token = find_token(os.environ, Path.cwd())
    if token is None:
        raise Failure(f"no Discord bot token: set {TOKEN_ENV} in the environment or in a .env file here "
                      "(the README's 'Discord' section says where to get one)", 2)
    if (problem := _config_problem(config)) is not None:
        raise Failure(problem, 2)
    atelier = AtelierClient(args.router or config.broker.router, args.pub or config.broker.pub,
                            keys=for_peer(config))
    try:
        await atelier.start(timeout=30)
    except TimeoutError:  # no broker answered: process_main says so
        await atelier.close(drain_timeout=0)
        raise
    bot = AtelierBot(atelier, config.discord, default_model=config.default_model,
                     public_url=config.http.public_url)
    running = asyncio.create_task(bot.start(token), name="discord-gateway")
    stopping = asyncio.create_task(stop.wait(), name="discord-stop")
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if running.done() and not running.cancelled() and (exc := running.exception()) is not None:
        if isinstance(exc, discord.LoginFailure):
            log.error("Discord refused the token (%s); check DISCORD_TOKEN", exc)
            code = 2
        elif isinstance(exc, (aiohttp.ClientError, OSError)):
            log.error("could not reach Discord: %s", exc)  # once connected, discord.py reconnects by itself
            code = 1
        else:
            log.error("the Discord connection failed", exc_info=exc)
            code = 1
    stopping.cancel()
    await bot.close()
    running.cancel()
    await atelier.close()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("atelier discord", "Serve atelier on Discord.",
                            pub="the broker's XPUB endpoint (default from the config)")
    return process_main(parser, _serve, argv, log_name="discord")


if __name__ == "__main__":
    sys.exit(main())
