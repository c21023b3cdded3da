"""The Discord bot through discord.py's own objects, without the network.

Discord is replaced at discord.py's two lowest HTTP seams: ``HTTPClient.request`` (the bot's own
REST calls: login, command registration, channel messages) and the webhook adapter's ``request``
(interaction responses and their edits, through ``async_context``, the seam discord.py itself
offers). ``FakeDiscord`` keeps the messages those calls make and how each looked after every
call, so a test reads what a user would have seen. Interactions arrive as gateway
INTERACTION_CREATE payloads handed to discord.py's ``ConnectionState``, as they come from
Discord; the bot's AtelierClient talks to a real atelier (``atelier up`` on loopback ports).
"""

from __future__ import annotations

import asyncio
import datetime
import io
import itertools
import json
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import discord
import pytest
from discord.webhook.async_ import AsyncWebhookAdapter, async_context
from PIL import Image

from actors.messages import JobEvent, JobResult, Preview, Progress
from atelier.config import Config, DiscordConfig
from atelier.jobs import Artifact, JobInputs, JobRecord, JobSpec, JobState
from atelier.public import scrub
from frontends.client import AtelierClient
from frontends.discord_bot import AtelierBot, Reply, _config_problem, main
from frontends.discord_views import (
    VARIATION_STRENGTH,
    Frame,
    JobDisplay,
    LiveCanvas,
    RateLimiter,
    RetryPolicy,
    access_refusal,
    find_token,
    parse_dotenv,
    render_live,
    status_line,
)
from tests.conftest import Cluster, run
from tests.test_frontends_conditioning import png

pytestmark = pytest.mark.timeout(150)

APP = 1100000000000000001
GUILD = 1200000000000000001
CHANNEL = 1300000000000000001
OTHER_CHANNEL = 1300000000000000002
ROLE = 1500000000000000001
ADA = 1400000000000000001
BOB = 1400000000000000002
FAST = RetryPolicy(edit_delays_s=(0.05, 0.05), post_delays_s=(0.05, 0.05, 0.05), call_timeout_s=5.0)
EXPIRY = datetime.timedelta(minutes=15)


def user_payload(user_id: int, name: str) -> dict:
    return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name.title(),
            "avatar": None, "bot": False}


BOT_USER = {**user_payload(APP, "atelier"), "bot": True}
USERS = {ADA: "ada", BOB: "bob"}


# --------------------------------------------------------------------------- #
# A fake Discord


@dataclass
class Shown:
    """A message as a user saw it right after one call changed it."""

    message_id: int
    how: str  # respond, edit (through the interaction), post / channel-edit (as the bot), followup
    at: float
    content: str
    files: list[tuple[str, bytes]]
    buttons: list[dict]
    ephemeral: bool

    @property
    def labels(self) -> list[str]:
        return [b["label"] for b in self.buttons]


@dataclass
class Message:
    id: int
    channel_id: int
    content: str = ""
    attachments: list[dict] = field(default_factory=list)  # id, filename, data
    components: list[dict] = field(default_factory=list)
    flags: int = 0
    interaction_id: int | None = None
    reference: int | None = None  # the message a post answers
    mentions: list[str] = field(default_factory=list)  # whom it may ping


class FakeResponse(SimpleNamespace):
    """What discord.HTTPException reads from an aiohttp response."""


def _error(status: int, message: str, code: int = 0) -> discord.HTTPException:
    response = FakeResponse(status=status, reason=message)
    cls = discord.DiscordServerError if status >= 500 else discord.HTTPException
    return cls(response, {"message": message, "code": code})


def _read(fp) -> bytes:
    if isinstance(fp, io.BytesIO):
        return fp.getvalue()
    fp.seek(0)
    return fp.read()


class FakeDiscord:
    """Discord's HTTP API as a bot sees it, in memory."""

    def __init__(self):
        self.messages: dict[int, Message] = {}
        self.shown: list[Shown] = []
        self.modals: list[dict] = []
        self.choices: list[list[dict]] = []
        self.commands: list[dict] = []
        self.failures: list[tuple[str, str]] = []  # (method, route) of every call made to fail
        # A test's outage: (method, route template) -> the status to fail it with, or None.
        self.fail: Callable[[str, str], int | None] = lambda method, path: None
        self.expired: set[str] = set()  # interaction tokens that no longer work
        self.interactions: dict[str, dict] = {}  # token -> the interaction's payload
        self.cdn: dict[str, bytes] = {}  # URL -> the file a user attached
        self._original: dict[str, int] = {}  # token -> the message its @original is
        self._ids = itertools.count(1600000000000000001)
        self._changed = asyncio.Event()

    def install(self, client: discord.Client) -> None:
        client.http.request = self.rest  # the instance's own, so every HTTPClient method lands here
        client.http.get_from_cdn = self.download  # what discord.Attachment.read() calls
        async_context.set(_Adapter(self))

    # -- what tests use ---------------------------------------------------- #

    def dispatch(self, client: discord.Client, payload: dict) -> None:
        """Delivers an interaction as the gateway would (INTERACTION_CREATE)."""
        self.interactions[payload["token"]] = payload
        if "message" in payload:
            self._original[payload["token"]] = int(payload["message"]["id"])
        client._connection.parse_interaction_create(payload)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not seen in {timeout} s; shown: {[s.content for s in self.shown[-8:]]}")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def upload(self, filename: str, data: bytes, content_type: str = "image/png") -> dict:
        """A file a user attaches to a command: its attachment object, as a command's resolved data holds it."""
        attachment_id = next(self._ids)
        url = f"https://cdn.discordapp.com/ephemeral-attachments/{APP}/{attachment_id}/{filename}"
        self.cdn[url] = data
        return {"id": str(attachment_id), "filename": filename, "size": len(data), "url": url, "proxy_url": url,
                "content_type": content_type}

    async def download(self, url: str) -> bytes:
        await asyncio.sleep(0)
        if url not in self.cdn:
            raise _error(404, "Not Found", 0)
        return self.cdn[url]

    def history(self, message_id: int) -> list[Shown]:
        return [s for s in self.shown if s.message_id == message_id]

    def latest(self, message_id: int) -> Shown:
        return self.history(message_id)[-1]

    def payload(self, message_id: int) -> dict:
        return self._message_payload(self.messages[message_id])

    def custom_id(self, message_id: int, label: str) -> str:
        return next(b["custom_id"] for b in self.latest(message_id).buttons if b["label"] == label)

    # -- the REST API (HTTPClient.request) ----------------------------------- #

    async def rest(self, route, *, files=None, form=None, **kwargs) -> Any:
        await asyncio.sleep(0)
        method, path = route.method, route.path
        if (status := self.fail(method, path)) is not None:
            self.failures.append((method, path))
            raise _error(status, "Service Unavailable" if status >= 500 else "failed")
        body, new_files = self._body(kwargs.get("json"), form)
        if (method, path) == ("GET", "/users/@me"):
            return BOT_USER
        if (method, path) == ("GET", "/oauth2/applications/@me"):
            return {"id": str(APP), "name": "atelier", "icon": None, "description": "", "bot_public": True,
                    "bot_require_code_grant": False, "owner": user_payload(ADA, "ada"), "verify_key": "0" * 64,
                    "flags": 0, "bot": BOT_USER}
        if method == "PUT" and path.endswith("/commands"):
            self.commands = [{**c, "id": str(next(self._ids)), "application_id": str(APP), "version": "1"}
                             for c in body]
            return self.commands
        if (method, path) == ("POST", "/channels/{channel_id}/messages"):
            message = self._create(int(route.channel_id), body, new_files, how="post")
            return self._message_payload(message)
        if (method, path) == ("PATCH", "/channels/{channel_id}/messages/{message_id}"):
            message = self.messages.get(int(route.url.rsplit("/", 1)[1]))
            if message is None:
                raise _error(404, "Unknown Message", 10008)
            self._edit(message, body, new_files, how="channel-edit")
            return self._message_payload(message)
        raise _error(404, f"the fake has no {method} {path}")

    # -- the webhook API (interactions) --------------------------------------- #

    async def webhook(self, route, payload, multipart) -> Any:
        await asyncio.sleep(0)
        method, path, token = route.method, route.path, route.webhook_token
        if (status := self.fail(method, path)) is not None:
            self.failures.append((method, path))
            raise _error(status, "Service Unavailable" if status >= 500 else "failed")
        interaction = self.interactions[token]
        created = discord.utils.snowflake_time(int(interaction["id"]))
        if token in self.expired or discord.utils.utcnow() > created + EXPIRY:
            self.failures.append((method, path))
            raise _error(401, "Invalid Webhook Token", 50027)
        body, new_files = self._body(payload, multipart)
        channel = int(interaction["channel"]["id"])
        if path == "/interactions/{webhook_id}/{webhook_token}/callback":
            kind, data = body["type"], body.get("data") or {}
            answer: dict = {"id": interaction["id"], "type": interaction["type"]}
            resource: dict = {"type": kind}
            if kind in (4, 5):  # a new message (5: "thinking…" until the first follow-up)
                message = self._create(channel, data, new_files, how="respond", interaction=interaction,
                                       loading=kind == 5)
                self._original[token] = message.id
                answer.update(response_message_id=str(message.id), response_message_loading=kind == 5,
                              response_message_ephemeral=bool(message.flags & 64))
                resource["message"] = self._message_payload(message)
            elif kind == 7:  # the component's message, changed
                self._edit(self.messages[self._original[token]], data, new_files, how="edit")
            elif kind == 8:
                self.choices.append(data["choices"])
            elif kind == 9:
                self.modals.append({**data, "user": int(_user_of(interaction)["id"]),
                                    "message": self._original.get(token)})
            self._changed.set()
            return {"interaction": answer, "resource": resource}
        if path.endswith("/messages/@original"):
            message = self.messages[self._original[token]]
            if method == "PATCH":
                self._edit(message, body, new_files, how="edit")
            return self._message_payload(message)
        if method == "POST" and path == "/webhooks/{webhook_id}/{webhook_token}":
            original = self.messages.get(self._original.get(token, 0))
            if original is not None and original.content == "" and original.flags & 128:  # loading: filled in
                original.flags &= ~128
                self._edit(original, body, new_files, how="followup")
                return self._message_payload(original)
            message = self._create(channel, body, new_files, how="followup", interaction=interaction)
            return self._message_payload(message)
        raise _error(404, f"the fake has no {method} {path}")

    # -- messages -------------------------------------------------------------- #

    @staticmethod
    def _body(payload: dict | None, form) -> tuple[Any, list[tuple[str, bytes]]]:
        if not form:
            return payload if payload is not None else {}, []
        parts = list(form)
        body = json.loads(next(p["value"] for p in parts if p["name"] == "payload_json"))
        files = [(p["filename"], _read(p["value"])) for p in parts if p["name"].startswith("files[")]
        return body, files

    def _create(self, channel: int, data: dict, files: list, *, how: str, interaction: dict | None = None,
                loading: bool = False) -> Message:
        message = Message(id=next(self._ids), channel_id=channel,
                          interaction_id=int(interaction["id"]) if interaction else None)
        message.flags = int(data.get("flags") or 0) | (128 if loading else 0)
        if data.get("message_reference"):
            message.reference = int(data["message_reference"]["message_id"])
        message.mentions = [str(u) for u in (data.get("allowed_mentions") or {}).get("users", [])]
        self.messages[message.id] = message
        self._edit(message, data, files, how=how)
        return message

    def _edit(self, message: Message, data: dict, files: list, *, how: str) -> None:
        if "content" in data:
            message.content = data["content"] or ""
        if "components" in data:
            message.components = data["components"] or []
        if "attachments" in data:
            kept = {str(a["id"]): a for a in message.attachments}
            attachments = []
            for entry in data["attachments"]:
                if str(entry["id"]) in kept:
                    attachments.append(kept[str(entry["id"])])
                else:  # a new file: its id is its index among the uploaded files
                    name, blob = files[int(entry["id"])]
                    attachments.append({"id": next(self._ids), "filename": name, "data": blob})
            message.attachments = attachments
        elif files:
            message.attachments += [{"id": next(self._ids), "filename": n, "data": b} for n, b in files]
        buttons = [{"label": c.get("label"), "custom_id": c.get("custom_id"), "style": c.get("style"),
                    "disabled": c.get("disabled", False)}
                   for row in message.components for c in row.get("components", []) if c.get("type") == 2]
        self.shown.append(Shown(message.id, how, time.monotonic(), message.content,
                                [(a["filename"], a["data"]) for a in message.attachments], buttons,
                                bool(message.flags & 64)))
        self._changed.set()

    def _message_payload(self, message: Message) -> dict:
        return {
            "id": str(message.id), "channel_id": str(message.channel_id), "guild_id": str(GUILD),
            "author": BOT_USER, "content": message.content, "timestamp": discord.utils.utcnow().isoformat(),
            "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
            "mention_roles": [], "embeds": [], "pinned": False, "type": 20 if message.interaction_id else 0,
            "flags": message.flags, "components": message.components, "application_id": str(APP),
            "webhook_id": str(APP) if message.interaction_id else None,
            "attachments": [{"id": str(a["id"]), "filename": a["filename"], "size": len(a["data"]),
                             "url": f"https://cdn.discordapp.com/attachments/{message.channel_id}/{a['id']}/"
                                    f"{a['filename']}",
                             "proxy_url": f"https://media.discordapp.net/attachments/{message.channel_id}/"
                                          f"{a['id']}/{a['filename']}",
                             "content_type": "image/png" if a["filename"].endswith(".png") else "image/jpeg"}
                            for a in message.attachments],
        }


class _Adapter(AsyncWebhookAdapter):
    def __init__(self, fake: FakeDiscord):
        super().__init__()
        self.fake = fake

    async def request(self, route, session=None, *, payload=None, multipart=None, files=None, **kwargs) -> Any:
        return await self.fake.webhook(route, payload, multipart)


def _user_of(interaction: dict) -> dict:
    return interaction["member"]["user"] if "member" in interaction else interaction["user"]


# --------------------------------------------------------------------------- #
# Interactions, as the gateway sends them

_interaction_ids = itertools.count(1)


def _interaction(kind: int, data: dict, *, user: int, channel: int, roles=(ROLE,), age_s: float = 0.0,
                 message: dict | None = None) -> dict:
    created = discord.utils.utcnow() - datetime.timedelta(seconds=age_s)
    # A real snowflake of its creation time: discord.py and the fake both read the token's age from it.
    interaction_id = discord.utils.time_snowflake(created) + next(_interaction_ids)
    payload = {
        "id": str(interaction_id), "application_id": str(APP), "type": kind, "token": f"token-{interaction_id}",
        "version": 1, "guild_id": str(GUILD), "channel_id": str(channel),
        "channel": {"id": str(channel), "type": 0, "guild_id": str(GUILD), "name": "art", "position": 0,
                    "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None,
                    "last_message_id": None, "rate_limit_per_user": 0, "flags": 0},
        "member": {"user": user_payload(user, USERS[user]), "roles": [str(r) for r in roles], "nick": None,
                   "avatar": None, "joined_at": "2024-01-01T00:00:00+00:00", "premium_since": None, "deaf": False,
                   "mute": False, "pending": False, "flags": 0, "permissions": "2251799813685247",
                   "communication_disabled_until": None},
        "app_permissions": "2251799813685247", "locale": "en-US", "guild_locale": "en-US", "entitlements": [],
        "authorizing_integration_owners": {"0": str(GUILD)}, "context": 0, "attachment_size_limit": 10 << 20,
        "data": data,
    }
    if message is not None:
        payload["message"] = message
    return payload


def _options(options: dict, focused: str | None = None) -> list[dict]:
    out = []
    for name, value in options.items():
        # An attachment (a FakeDiscord.upload) is named by its id; the object itself is in the resolved data.
        kind = 11 if isinstance(value, dict) else 4 if isinstance(value, int) else 10 if isinstance(value, float) else 3
        option = {"name": name, "type": kind, "value": value["id"] if isinstance(value, dict) else value}
        if name == focused:
            option["focused"] = True
        out.append(option)
    return out


def slash(name: str, /, *, user: int = ADA, channel: int = CHANNEL, roles=(ROLE,), age_s: float = 0.0,
          **options) -> dict:
    data = {"id": str(APP + 7), "name": name, "type": 1, "guild_id": str(GUILD), "options": _options(options)}
    attachments = {value["id"]: value for value in options.values() if isinstance(value, dict)}
    if attachments:
        data["resolved"] = {"attachments": attachments}
    return _interaction(2, data, user=user, channel=channel, roles=roles, age_s=age_s)


def autocomplete(name: str, focused: str, /, **options) -> dict:
    data = {"id": str(APP + 7), "name": name, "type": 1, "options": _options(options, focused)}
    return _interaction(4, data, user=ADA, channel=CHANNEL)


def press(fake: FakeDiscord, message_id: int, label: str, *, user: int = ADA) -> dict:
    data = {"custom_id": fake.custom_id(message_id, label), "component_type": 2}
    return _interaction(3, data, user=user, channel=CHANNEL, message=fake.payload(message_id))


def submit_box(fake: FakeDiscord, modal: dict, text: str, *, user: int = ADA) -> dict:
    field_id = modal["components"][0]["components"][0]["custom_id"]
    data = {"custom_id": modal["custom_id"],
            "components": [{"type": 1, "components": [{"type": 4, "custom_id": field_id, "value": text}]}]}
    return _interaction(5, data, user=user, channel=CHANNEL, message=fake.payload(modal["message"]))


def guild_create() -> dict:
    """The server as the gateway describes it on connect: its roles, so members' roles resolve."""
    return {"id": str(GUILD), "name": "studio", "icon": None, "owner_id": str(ADA), "region": "eu",
            "afk_channel_id": None, "afk_timeout": 300, "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "features": [], "mfa_level": 0, "application_id": None,
            "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None, "vanity_url_code": None,
            "description": None, "banner": None, "premium_tier": 0, "preferred_locale": "en-US",
            "public_updates_channel_id": None, "nsfw_level": 0, "premium_progress_bar_enabled": False,
            "emojis": [], "stickers": [], "member_count": 2, "large": False, "unavailable": False,
            "members": [], "voice_states": [], "presences": [], "threads": [], "stage_instances": [],
            "guild_scheduled_events": [], "joined_at": "2024-01-01T00:00:00+00:00",
            "roles": [_role(GUILD, "@everyone", 0), _role(ROLE, "artists", 1)],
            "channels": [{"id": str(c), "type": 0, "name": n, "position": i, "permission_overwrites": [],
                          "nsfw": False, "parent_id": None, "topic": None, "last_message_id": None,
                          "rate_limit_per_user": 0, "flags": 0}
                         for i, (c, n) in enumerate(((CHANNEL, "art"), (OTHER_CHANNEL, "general")))]}


def _role(role_id: int, name: str, position: int) -> dict:
    return {"id": str(role_id), "name": name, "color": 0, "hoist": False, "position": position,
            "permissions": "0", "managed": False, "mentionable": False, "flags": 0}


# --------------------------------------------------------------------------- #
# A running atelier, and a bot logged in to the fake Discord


@pytest.fixture
def atelier(shared_cluster):
    """The session's shared atelier: its built-in models, a cost-model one ("cm", tests/catalog.py), one whose
    weights are nowhere ("missing-sd"), and one with ControlNets and an IP-Adapter ("guided-sd")."""
    return shared_cluster


async def tiny_sd_steps(client: AtelierClient, seconds: float, count: int) -> int:
    """Steps that keep a tiny-sd job of ``count`` images running about ``seconds`` on this machine now."""
    spec = JobSpec(model="tiny-sd", prompt="calibration", width=64, height=64, steps=12, count=count)
    await client.submit(spec)
    marks = [(e.step, e.elapsed_s) async for e in client.events(spec.id, timeout=60) if isinstance(e, Progress)]
    (first, start), (last, end) = marks[len(marks) // 2], marks[-1]  # the pace between steps, not the load
    return max(8, min(500, round(seconds * (last - first) / (end - start))))


class Session:
    """A bot logged in to a fake Discord, over a client of the real atelier."""

    def __init__(self, cluster: Cluster | None, settings: DiscordConfig, retry: RetryPolicy = FAST):
        self.cluster = cluster
        self.settings = settings
        self.retry = retry
        self.fake = FakeDiscord()

    async def __aenter__(self) -> "Session":
        self.atelier = AtelierClient(self.cluster.router, self.cluster.pub) if self.cluster else None
        if self.atelier is not None:
            await self.atelier.start(timeout=30)
        self.bot = AtelierBot(self.atelier, self.settings, default_model="tiny-sd", retry=self.retry)
        self.fake.install(self.bot)
        await self.bot.login("fake-token")  # discord.py's own login: GET /users/@me, the app, command sync
        self.bot._connection.parse_guild_create(guild_create())
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.bot.close()
        if self.atelier is not None:
            await self.atelier.close()

    def send(self, payload: dict) -> dict:
        self.fake.dispatch(self.bot, payload)
        return payload

    async def respond(self, payload: dict, timeout: float = 10.0) -> int:
        """Sends an interaction and returns the id of the message it answered with."""
        self.send(payload)
        interaction = int(payload["id"])
        return await self.fake.wait_for(lambda: next(
            (m.id for m in self.fake.messages.values() if m.interaction_id == interaction), None), timeout)


def go(coro, timeout: float = 120.0):
    return run(coro, timeout)


# --------------------------------------------------------------------------- #
# Smoke


def test_models_lists_the_catalog(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            assert {c["name"] for c in s.fake.commands} == {"generate", "live", "models", "queue", "cancel", "train"}
            message = await s.respond(slash("models"))
            return s.fake.latest(message)

    shown = go(scenario())
    assert shown.ephemeral and "**tiny-sd** · sd1 · img2img, txt2img · 64×64" in shown.content
    assert "**tiny-stable-audio** · stable-audio · txt2audio · 4 steps" in shown.content
    assert "missing-sd" in shown.content


# --------------------------------------------------------------------------- #
# What a user sees


def _png(blob: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(blob))
    assert image.format == "PNG"
    return image


def _job_of(shown: Shown) -> str:
    """The job a job message is about, from its Again or Cancel button."""
    custom_id = next(b["custom_id"] for b in shown.buttons if b["label"] in ("Again", "Cancel"))
    return custom_id.split(":")[2]


def _pixels(blob: bytes) -> bytes:
    return Image.open(io.BytesIO(blob)).convert("RGB").tobytes()


def test_generate_streams_progress_then_delivers_the_images_with_buttons(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            steps = await tiny_sd_steps(s.atelier, 2.5, count=2)  # long enough for a few once-a-second edits
            first = await s.respond(slash("generate", prompt="a lighthouse", count=2, width=64, height=64,
                                          steps=steps, seed=7))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(first).content, 90)
            return steps, s.fake.history(first)

    steps, history = go(scenario())
    opened, *edits, final = history
    assert opened.how == "respond" and not opened.ephemeral
    assert opened.content.startswith(f"<@{ADA}> · **«a lighthouse»**")
    assert f"tiny-sd · 64×64 · {steps} steps" in opened.content
    assert opened.labels == ["Cancel"]
    running = [e for e in edits if "running" in e.content]
    assert running and all("%" in e.content and "elapsed" in e.content for e in running)
    assert any("about" in e.content and "left" in e.content for e in edits)  # an ETA
    previews = [e.files[0] for e in edits if e.files]
    assert previews and all(name.endswith(".jpg") and blob[:2] == b"\xff\xd8" for name, blob in previews)
    # At most one change a second, the result included.
    times = [h.at for h in history]
    assert all(b - a >= 0.99 for a, b in zip(times, times[1:], strict=False)), times
    assert final.how == "edit" and "done in" in final.content and "seeds 7, 8" in final.content
    job = _job_of(final)
    assert [name for name, _ in final.files] == [f"atelier-{job}-0.png", f"atelier-{job}-1.png"]
    assert all(_png(blob).size == (64, 64) for _, blob in final.files)
    # No Cancel once it is done: Upscale and Variations per image (U1 U2 on a row, V1 V2 and Again on the next).
    assert final.labels == ["U1", "U2", "V1", "V2", "Again"]
    assert [b["custom_id"] for b in final.buttons[:2]] == [f"atelier:upscale:{job}:{ADA}:{i}" for i in (0, 1)]
    assert all(e.labels == ["Cancel"] for e in edits)


def test_again_is_the_same_job_with_new_seeds_for_whoever_presses_it(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            first = await s.respond(slash("generate", prompt="a harbour", model="cm", count=2, steps=10, seed=7))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(first).content, 30)
            again = await s.respond(press(s.fake, first, "Again", user=BOB))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(again).content, 30)
            records = [await s.atelier.job(_job_of(s.fake.latest(m))) for m in (first, again)]
            return s.fake.latest(first), s.fake.latest(again), records

    first, again, (mine, his) = go(scenario())
    assert "seeds 7, 8" in first.content
    assert again.content.startswith(f"<@{BOB}> · **«a harbour»**") and "cm · 64×64 · 10 steps" in again.content
    assert len(again.files) == 2 and "seeds 7, 8" not in again.content
    assert his.spec.user == f"discord:{BOB}" and mine.spec.user == f"discord:{ADA}"  # each in their own share
    same = ("model", "prompt", "negative_prompt", "width", "height", "steps", "guidance", "count")
    assert {k: getattr(his.spec, k) for k in same} == {k: getattr(mine.spec, k) for k in same}


def test_only_its_owner_may_cancel_a_job(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            message = await s.respond(slash("generate", prompt="a long night", model="cm", steps=500))
            await s.fake.wait_for(lambda: "running" in s.fake.latest(message).content, 30)
            refusal = await s.respond(press(s.fake, message, "Cancel", user=BOB))
            s.send(press(s.fake, message, "Cancel", user=ADA))
            await s.fake.wait_for(lambda: "cancelled" in s.fake.latest(message).content, 30)
            record = await s.atelier.job(_job_of(s.fake.latest(message)))
            return s.fake.latest(refusal), s.fake.latest(message), record

    refusal, final, record = go(scenario())
    assert refusal.ephemeral and refusal.content == f"Only <@{ADA}> can do that to their job."
    assert record.state is JobState.cancelled and record.spec.user == f"discord:{ADA}"
    assert final.files == [] and final.labels == ["Again"]  # no preview of an image that will not be


def test_queue_shows_position_and_eta_and_cancel_takes_the_latest_or_the_named_job(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            first = await s.respond(slash("generate", prompt="first", model="cm", steps=500))
            await s.fake.wait_for(lambda: "running" in s.fake.latest(first).content, 30)
            second = await s.respond(slash("generate", prompt="second", model="cm", steps=499))  # not batched
            await s.fake.wait_for(lambda: "queued" in s.fake.latest(second).content, 30)
            queue = await s.respond(slash("queue"))
            await s.fake.wait_for(lambda: s.fake.latest(queue).content, 10)
            cancel_latest = await s.respond(slash("cancel"))
            await s.fake.wait_for(lambda: s.fake.latest(cancel_latest).content, 10)
            first_job = _job_of(s.fake.latest(first))
            not_yours = await s.respond(slash("cancel", user=BOB, job=first_job))
            named = await s.respond(slash("cancel", job=first_job[:8]))
            await s.fake.wait_for(lambda: s.fake.latest(named).content, 10)
            for message in (first, second):
                await s.fake.wait_for(lambda m=message: "cancelled" in s.fake.latest(m).content, 30)
            return [s.fake.latest(m) for m in (first, second, queue, cancel_latest, not_yours, named)]

    first, second, queue, cancel_latest, not_yours, named = go(scenario())
    first_job, second_job = _job_of(first), _job_of(second)
    assert queue.ephemeral
    lines = queue.content.splitlines()
    assert lines[0].startswith("**Queue:** 1 waiting, 1 running")
    assert any(line.startswith(f"`{first_job[:8]}` «first» — running") and "%" in line for line in lines)
    second_line = next(line for line in lines if line.startswith(f"`{second_job[:8]}`"))
    assert "queued #1" in second_line and "left" in second_line
    assert cancel_latest.ephemeral and cancel_latest.content.startswith(f"Cancelled `{second_job[:8]}`")
    assert not_yours.ephemeral and not_yours.content == "That job isn't yours to cancel."
    assert named.content.startswith(f"Cancelled `{first_job[:8]}`")
    assert "cancelled" in first.content and "cancelled" in second.content


def test_live_shows_the_newest_prompt_and_never_a_replaced_one(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            canvas = await s.respond(slash("live", prompt="a li", model="cm", steps=100))
            await s.fake.wait_for(lambda: "running" in s.fake.latest(canvas).content, 30)
            for text in ("a ligh", "a lighthouse"):  # typed into the box the canvas's button opens
                boxes = len(s.fake.modals)
                s.send(press(s.fake, canvas, "New prompt"))
                await s.fake.wait_for(lambda n=boxes: len(s.fake.modals) > n, 10)
                s.send(submit_box(s.fake, s.fake.modals[-1], text))
            session = s.bot.sessions[(ADA, CHANNEL)]
            await s.fake.wait_for(lambda: len(session.canvas.history) == 3, 10)
            last_job = session.canvas.history[-1][0]
            await s.fake.wait_for(lambda: f"live-{last_job}.png" in [n for n, _ in s.fake.latest(canvas).files], 60)
            records = [await s.atelier.job(job_id) for job_id, _ in session.canvas.history]
            boxes = [m["components"][0]["components"][0].get("value") for m in s.fake.modals]
            # A repeated /live in the same channel: the same session, on a new canvas below.
            moved = await s.respond(slash("live", prompt="a red lighthouse", steps=20))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(moved).content, 60)
            later = await s.atelier.job(session.canvas.history[-1][0])
            s.send(press(s.fake, moved, "Stop"))
            await s.fake.wait_for(lambda: "ended" in s.fake.latest(moved).content, 10)
            return (s.fake.history(canvas), list(session.canvas.history[:3]), records, boxes, later,
                    s.fake.history(moved))

    canvas, history, records, boxes, later, moved = go(scenario())
    jobs = {prompt: job_id for job_id, prompt in history}
    assert [prompt for _, prompt in history] == ["a li", "a ligh", "a lighthouse"]
    assert boxes == ["a li", "a ligh"]  # the box opens holding the last prompt
    for record in records[:2]:
        assert record.state is JobState.cancelled and "superseded" in record.reason
        assert record.spec.session == f"{ADA}:{CHANNEL}" and record.spec.priority.value == "live"
        assert record.spec.user == f"discord:{ADA}"
    assert records[2].state is JobState.done
    # Every picture the canvas showed was of the prompt it named, or labelled as an older finished one.
    for shown in canvas[:-1] if "moved" in canvas[-1].content else canvas:
        named = shown.content.split("«", 1)[1].split("»", 1)[0]
        assert "superseded" not in shown.content and "cancelled" not in shown.content
        for name, _ in shown.files:
            job_id = name.removeprefix("live-").removesuffix(".png").removesuffix("-preview.jpg")
            assert job_id == jobs[named] or "the last finished image" in shown.content, (shown.content, name)
    done = [s for s in canvas if f"live-{jobs['a lighthouse']}.png" in [n for n, _ in s.files]]
    assert done and "«a lighthouse»" in done[0].content and "done in" in done[0].content
    assert _png(done[0].files[0][1]).size == (64, 64)
    # The old canvas says where the session went and keeps no picture; the new one carries on.
    assert "moved to a newer message" in canvas[-1].content and not canvas[-1].files and not canvas[-1].buttons
    assert later.spec.session == f"{ADA}:{CHANNEL}" and later.state is JobState.done
    assert "«a red lighthouse»" in moved[-2].content and moved[-2].labels == ["New prompt", "Stop"]
    assert "Live session ended" in moved[-1].content and moved[-1].labels == ["New prompt"]
    assert moved[-1].files and "the last finished image, of «a red lighthouse»" in moved[-1].content


def test_a_failed_or_refused_job_shows_why(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            broken = await s.respond(slash("generate", prompt="a ruin", model="missing-sd"))
            unknown = await s.respond(slash("generate", prompt="a ruin", model="no-such-model"))
            bad = await s.respond(slash("generate", prompt="a ruin", width=65))
            live = await s.respond(slash("live", prompt="a ruin", model="no-such-model"))
            for message in (broken, unknown, live):
                await s.fake.wait_for(lambda m=message: any(w in s.fake.latest(m).content
                                                             for w in ("failed", "refused")), 60)
            record = await s.atelier.job(_job_of(s.fake.latest(broken)))
            return s.fake.latest(broken), s.fake.latest(unknown), s.fake.latest(bad), s.fake.latest(live), record

    broken, unknown, bad, live, record = go(scenario())
    assert record.state is JobState.failed and record.reason
    # The reason says the weights are missing, not where: not in the record anyone's frontend shows,
    # nor in the channel (L6); the runner's log has the path.
    assert f"failed: {scrub(record.reason)}" in broken.content and broken.labels == ["Again"] and not broken.files
    assert "does not exist on this host" in record.reason
    assert "/nowhere" not in record.reason and "/nowhere" not in broken.content
    assert "refused: model:" in unknown.content and "no-such-model" in unknown.content and not unknown.buttons
    assert bad.ephemeral and bad.content.startswith("Can't submit that: width:") and "multiple of 8" in bad.content
    assert "«a ruin»" in live.content and "refused: model:" in live.content and not live.files


def test_allowlists_rate_limit_and_model_autocomplete(atelier):
    settings = DiscordConfig(guilds=[GUILD], channels=[CHANNEL], roles=[ROLE], rate_per_minute=1)

    async def scenario():
        async with Session(atelier, settings) as s:
            elsewhere = await s.respond(slash("generate", prompt="x", channel=OTHER_CHANNEL))
            no_role = await s.respond(slash("generate", prompt="x", user=BOB, roles=()))
            allowed = await s.respond(slash("generate", prompt="x", model="cm"))
            too_soon = await s.respond(slash("generate", prompt="y", model="cm"))
            s.send(autocomplete("generate", "model", prompt="x", model="tiny"))
            await s.fake.wait_for(lambda: s.fake.choices, 10)
            s.send(autocomplete("live", "model", prompt="x", model="tiny"))
            await s.fake.wait_for(lambda: len(s.fake.choices) == 2, 10)
            await s.fake.wait_for(lambda: "done" in s.fake.latest(allowed).content, 60)
            return [s.fake.latest(m) for m in (elsewhere, no_role, allowed, too_soon)], s.fake.choices

    (elsewhere, no_role, allowed, too_soon), (for_generate, for_live) = go(scenario())
    assert elsewhere.ephemeral and elsewhere.content == "atelier is not enabled in this channel."
    assert no_role.ephemeral and no_role.content == "You need one of the roles allowed to use atelier here."
    assert not allowed.ephemeral and len(allowed.files) == 1
    assert too_soon.ephemeral and too_soon.content.startswith("You have started 1 jobs in the last minute")
    assert "Try again in" in too_soon.content
    # "tiny" among every model's name: /generate offers those that make something from a prompt alone
    # (images, videos, sounds), /live those that make images.
    generate_choices, live_choices = [c["value"] for c in for_generate], [c["value"] for c in for_live]
    assert {"tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-animatediff", "tiny-stable-audio"} <= set(generate_choices)
    assert "tiny-svd" not in generate_choices and "tiny-sd-upscaler" not in generate_choices
    assert {"tiny-sd", "tiny-flux"} <= set(live_choices)
    assert not {"tiny-animatediff", "tiny-stable-audio", "tiny-svd"} & set(live_choices)
    assert all("tiny" in value for value in generate_choices + live_choices)


def test_generate_makes_sounds_and_videos_of_the_models_that_make_them(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            sound = await s.respond(slash("generate", prompt="rain on a tin roof", model="tiny-stable-audio"))
            clip = await s.respond(slash("generate", prompt="a spinning top", model="tiny-animatediff", steps=2))
            needs_image = await s.respond(slash("generate", prompt="x", model="tiny-svd"))
            for message in (sound, clip):
                await s.fake.wait_for(lambda m=message: "done" in s.fake.latest(m).content, 90)
            return [s.fake.latest(m) for m in (sound, clip, needs_image)]

    sound, clip, needs_image = go(scenario())
    [(name, data)] = sound.files
    assert name.endswith(".wav") and data[:4] == b"RIFF"
    assert "×" not in sound.content.splitlines()[1]  # a sound has no size to show
    [(name, data)] = clip.files
    assert name.endswith(".mp4") and data[4:8] == b"ftyp"
    assert needs_image.ephemeral and needs_image.content.startswith("tiny-svd starts from an input (img2vid)")


def test_generate_with_a_control_image_delivers_what_the_controlnet_made(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            edges = s.fake.upload("edges.png", png(1))
            first = await s.respond(slash("generate", prompt="a red cube", model="guided-sd", seed=7,
                                          controlnet="canny", controlnet_scale=0.5, control_image=edges))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(first).content, 90)
            again = await s.respond(press(s.fake, first, "Again", user=BOB))  # reads the attachment anew
            await s.fake.wait_for(lambda: "done" in s.fake.latest(again).content, 90)
            records = [await s.atelier.job(_job_of(s.fake.latest(m))) for m in (first, again)]
            # The same job straight to atelier, with the same image: what the runner makes of it.
            spec = JobSpec(model="guided-sd", prompt="a red cube", seed=7, controlnet="canny", controlnet_scale=0.5)
            await s.atelier.submit(spec, inputs=JobInputs(control_image=png(1)))
            direct = await s.atelier.wait(spec.id, timeout=90)
            return s.fake.latest(first), s.fake.latest(again), records, bytes(direct.outputs[0].data)

    final, again, (mine, his), direct = go(scenario())
    assert "guided-sd · 64×64 · 3 steps · ControlNet canny" in final.content and "seed 7" in final.content
    [(name, data)] = final.files
    image = _png(data)
    assert image.size == (64, 64) and "ControlNet: canny, ControlNet weight: 0.5" in image.info["parameters"]
    assert image.tobytes() == Image.open(io.BytesIO(direct)).tobytes()  # the attachment, and nothing else
    assert mine.spec.inputs == ["control_image"] and mine.spec.user == f"discord:{ADA}"
    assert "ControlNet canny" in again.content and len(again.files) == 1
    assert his.spec.inputs == ["control_image"] and his.spec.controlnet_scale == 0.5 and his.spec.seed != 7


def test_generate_refuses_images_a_model_cannot_take_and_offers_its_controlnets(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            picture, notes = s.fake.upload("edges.png", png(1)), s.fake.upload("notes.txt", b"hi", "text/plain")
            asked = [slash("generate", prompt="x", controlnet="canny", control_image=picture),  # tiny-sd, the default
                     slash("generate", prompt="x", model="guided-sd", control_image=picture),
                     slash("generate", prompt="x", model="tiny-sd", reference_image=picture),
                     slash("generate", prompt="x", model="guided-sd", controlnet="canny", control_image=notes)]
            answers = [s.fake.latest(await s.respond(payload)) for payload in asked]
            for model in ("guided-sd", "tiny-sd"):
                s.send(autocomplete("generate", "controlnet", prompt="x", model=model, controlnet=""))
            await s.fake.wait_for(lambda: len(s.fake.choices) == 2, 10)
            listed = s.fake.latest(await s.respond(slash("models")))
            return answers, s.fake.choices, {**s.bot.jobs, **s.bot.finished}, listed

    answers, (guided, plain), submitted, listed = go(scenario())
    assert all(answer.ephemeral for answer in answers) and not submitted
    assert [answer.content for answer in answers] == [
        "tiny-sd has no ControlNet, so it takes no control_image or controlnet. Models with one: guided-sd.",
        "Choose the controlnet that reads your control_image: guided-sd has canny, depth.",
        "tiny-sd has no IP-Adapter, so it takes no reference_image. Models with one: guided-sd.",
        "control_image: `notes.txt` is not a PNG, JPEG or WebP image."]
    assert [choice["value"] for choice in guided] == ["canny", "depth"] and plain == []
    # /models says which models take them.
    assert "**guided-sd** · sd1 · img2img, txt2img · 64×64 (up to 1024×1024), 3 steps · ControlNets: canny, depth" \
           " · IP-Adapter" in listed.content


def test_upscale_and_variations_of_an_old_card_are_new_jobs_of_that_image(atelier):
    # Two jobs a minute: ada's /generate and her Variations; her Upscale after them is one too many.
    settings = DiscordConfig(upscale_steps=1, rate_per_minute=2)

    async def scenario():
        async with Session(atelier, settings) as s:
            first = await s.respond(slash("generate", prompt="a lighthouse at dusk", count=2, steps=1, seed=11))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(first).content, 60)
            # The card is old: the bot remembers neither the job nor its images (KEEP_FINISHED, the
            # client's results); the buttons name the job, and atelier has its outputs.
            s.bot.finished.clear()
            s.atelier._results.clear()
            up = await s.respond(press(s.fake, first, "U2", user=BOB))
            vary = await s.respond(press(s.fake, first, "V1"))
            for message in (up, vary):
                await s.fake.wait_for(lambda m=message: "done" in s.fake.latest(m).content, 60)
            limited = await s.respond(press(s.fake, first, "U1"))
            # An atelier whose catalog has no upscaler (any more): the button says so.
            s.bot._models = [m for m in await s.bot.models() if "upscale" not in m.kinds]
            no_upscaler = await s.respond(press(s.fake, first, "U1", user=BOB))
            source = await s.atelier.fetch_result(_job_of(s.fake.latest(first)))
            records = [await s.atelier.job(_job_of(s.fake.latest(m))) for m in (up, vary)]
            # The same upscale straight to atelier, of image 2: what the upscaler makes of it.
            direct = JobSpec(kind="upscale", model="tiny-sd-upscaler", prompt="a lighthouse at dusk", width=64,
                             height=64, steps=1, seed=records[0].spec.seed)
            await s.atelier.submit(direct, inputs=JobInputs(image=source.outputs[1].data))
            made = await s.atelier.wait(direct.id, timeout=60)
            rows = [[c["label"] for c in row["components"]] for row in s.fake.messages[first].components]
            return ([s.fake.latest(m) for m in (first, up, vary, limited, no_upscaler)], source, records,
                    bytes(made.outputs[0].data), rows)

    (first, up, vary, limited, no_upscaler), source, (upscaled, varied), direct, rows = go(scenario())
    job = source.job.spec.id
    assert rows == [["U1", "U2"], ["V1", "V2", "Again"]]  # Midjourney's layout, within Discord's 5 a row
    assert upscaled.spec.kind.value == "upscale" and upscaled.spec.model == "tiny-sd-upscaler"
    assert upscaled.spec.inputs == ["image"] and upscaled.spec.steps == 1 and upscaled.spec.user == f"discord:{BOB}"
    assert upscaled.spec.prompt == "a lighthouse at dusk"
    assert up.content.startswith(f"<@{BOB}> · **«a lighthouse at dusk»**")
    assert f"tiny-sd-upscaler · from 64×64 · 1 steps · upscale of image 2 of `{job[:8]}`" in up.content
    [(name, data)] = up.files
    assert _png(data).size == (256, 256)  # 4x the 64 px image
    assert _pixels(data) == _pixels(direct)  # of image 2, and nothing else
    assert up.labels == ["Again"]  # an upscale is not upscaled or varied again
    # Variations: the same prompt, model, size and settings, from image 1 at the documented strength, a new seed.
    spec, was = varied.spec, source.job.spec
    assert spec.kind.value == "img2img" and spec.inputs == ["image"] and spec.strength == VARIATION_STRENGTH
    assert (spec.prompt, spec.model, spec.width, spec.height) == (was.prompt, was.model, was.width, was.height)
    assert spec.seed != was.seed and spec.count == 1 and spec.user == f"discord:{ADA}"
    assert f"tiny-sd · 64×64 · 3 steps · variation of image 1 of `{job[:8]}`, strength 0.35" in vary.content
    assert len(vary.files) == 1 and _png(vary.files[0][1]).size == (64, 64)
    assert vary.labels == ["Upscale", "Variations", "Again"]
    assert limited.ephemeral and limited.content.startswith("You have started 2 jobs in the last minute")
    assert no_upscaler.ephemeral and no_upscaler.content.startswith("atelier has no upscaler: no model of its "
                                                                    "catalog upscales")


def test_generate_from_an_attached_image_is_img2img_at_its_strength(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            photo, notes = s.fake.upload("photo.png", png(3)), s.fake.upload("notes.txt", b"hi", "text/plain")
            edit = await s.respond(slash("generate", prompt="a watercolour harbour", image=photo, strength=0.5,
                                         steps=2))
            asked = [slash("generate", prompt="x", image=notes),
                     slash("generate", prompt="x", model="cm", image=photo),
                     slash("generate", prompt="x", strength=0.5),
                     slash("generate", prompt="x", image=photo, strength=0.0),
                     slash("generate", prompt="x", image=photo, strength=0.2, steps=2)]
            refusals = [s.fake.latest(await s.respond(payload)) for payload in asked]
            big = await s.respond(slash("generate", prompt="a wide bay", width=136, height=136, steps=1))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(edit).content, 60)
            await s.fake.wait_for(lambda: "done" in s.fake.latest(big).content, 60)
            too_big = s.fake.latest(await s.respond(press(s.fake, big, "Upscale")))
            record = await s.atelier.job(_job_of(s.fake.latest(edit)))
            return s.fake.latest(edit), record, refusals, too_big, {**s.bot.jobs, **s.bot.finished}

    edit, record, refusals, too_big, cards = go(scenario())
    # The upscaler takes images up to its limit: a larger one is refused, not shrunk first.
    assert too_big.ephemeral and too_big.content == "That image is 136×136; tiny-sd-upscaler upscales images up " \
                                                    "to 128×128."
    spec = record.spec
    assert spec.kind.value == "img2img" and spec.strength == 0.5 and spec.inputs == ["image"]
    assert (spec.width, spec.height, spec.steps, spec.user) == (64, 64, 2, f"discord:{ADA}")  # the image's size
    assert "tiny-sd · 64×64 · 2 steps · from an image, strength 0.5" in edit.content
    [(name, data)] = edit.files
    assert _png(data).size == (64, 64) and "Denoising strength: 0.5" in _png(data).info["parameters"]
    assert edit.labels == ["Upscale", "Variations", "Again"]
    assert all(refusal.ephemeral for refusal in refusals) and len(cards) == 2 and spec.id in cards
    not_image, no_img2img, *rest = [refusal.content for refusal in refusals]
    assert not_image == "image: `notes.txt` is not a PNG, JPEG or WebP image."
    start = "cm cannot start from an image (it does txt2img), so it takes no image. Models that can: "
    assert no_img2img.startswith(start) and "tiny-sd" in no_img2img[len(start):].rstrip(".").split(", ")
    assert "cm" not in no_img2img[len(start):].rstrip(".").split(", ")
    assert rest == [
        "strength says how far to go from an image: attach one as image.",
        "strength is above 0 (which would keep the image as it is) and at most 1.",
        "strength 0.2 of 2 steps leaves no step to run (steps × strength must be 1 or more): ask for more steps."]


def test_train_follows_the_training_then_attaches_the_lora_that_generate_then_applies(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            first, second = s.fake.upload("one.png", png(11)), s.fake.upload("two.png", png(12))
            training = await s.respond(slash("train", name="cube", prompt="a photo of sks cube", image1=first,
                                             image2=second, model="tiny-sd", steps=3, resolution=64))
            await s.fake.wait_for(lambda: any(w in s.fake.latest(training).content for w in ("done", "failed")), 120)
            s.send(autocomplete("generate", "lora", prompt="x", model="tiny-sd", lora="cu"))
            await s.fake.wait_for(lambda: s.fake.choices, 10)
            made = await s.respond(slash("generate", prompt="a photo of sks cube", lora="cube", lora_scale=0.8,
                                         width=64, height=64, steps=2, seed=3))
            await s.fake.wait_for(lambda: any(w in s.fake.latest(made).content for w in ("done", "failed")), 60)
            record = await s.atelier.job(_job_of(s.fake.latest(made)))
            again = await s.respond(press(s.fake, made, "Again"))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(again).content, 60)
            again_card = {**s.bot.jobs, **s.bot.finished}[_job_of(s.fake.latest(again))]
            return s.fake.history(training), s.fake.choices[0], s.fake.latest(made), record, again_card

    history, choices, made, record, again_card = go(scenario())
    opened, final = history[0], history[-1]
    assert opened.content.startswith(f"<@{ADA}> · training LoRA **cube** · «a photo of sks cube»")
    assert "tiny-sd · 2 images · 3 steps · 64 px" in opened.content and opened.labels == ["Cancel"]
    assert "done in" in final.content and "final loss" in final.content, final.content
    assert "LoRA `cube` is ready: use it with `/generate lora:cube` on tiny-sd." in final.content
    [(name, blob)] = final.files
    header = int.from_bytes(blob[:8], "little")  # a safetensors file: its JSON header's length, then the header
    assert name == "cube.safetensors" and json.loads(blob[8:8 + header]) and not final.buttons
    assert "cube" in [c["value"] for c in choices]
    # atelier's record names the version it resolved "cube" to; Again asks for "cube" (its newest version) again.
    [(resolved, scale)] = record.spec.loras.items()
    assert resolved.startswith("@") and scale == 0.8 and again_card.spec.loras == {"cube": 0.8}
    assert "done in" in made.content and "LoRA cube 0.8" in made.content and len(made.files) == 1


def test_train_refuses_what_it_cannot_train_and_offers_the_models_that_train(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            photo, notes = s.fake.upload("photo.png", png(3)), s.fake.upload("notes.txt", b"hi", "text/plain")
            asked = [slash("train", name="x", image1=notes),
                     slash("train", name="x", image1=photo, image2=notes),
                     slash("train", name="x", image1=photo, model="cm"),
                     slash("train", name="bad name", image1=photo),
                     slash("generate", prompt="x", lora_scale=0.5)]
            refusals = [s.fake.latest(await s.respond(payload)).content for payload in asked]
            s.send(autocomplete("train", "model", name="x", model="tiny"))
            await s.fake.wait_for(lambda: s.fake.choices, 10)
            return refusals, [c["value"] for c in s.fake.choices[0]], s.bot.jobs

    refusals, choices, jobs = go(scenario())
    not_image, second_not_image, cm, bad_name, scale = refusals
    assert not_image == "image1: `notes.txt` is not a PNG, JPEG or WebP image."
    assert second_not_image == "image2: `notes.txt` is not a PNG, JPEG or WebP image."
    assert cm.startswith("cm cannot train a LoRA (it does txt2img). Models that can: ") and "tiny-sd" in cm
    assert bad_name.startswith("Can't submit that: name:")
    assert scale == "lora_scale goes with a lora."
    assert "tiny-sd" in choices and "tiny-stable-audio" not in choices and "cm" not in choices
    assert not jobs


def test_a_training_status_says_step_loss_and_why_it_waits():
    job = JobDisplay(submitted_at=100.0)
    job.apply(Progress(job_id="j", step=40, total=100, elapsed_s=4.0, eta_s=6.0, loss=0.1234), now=104.0)
    assert status_line(job, 104.0) == "running 40% (step 40/100) · loss 0.1234 · 4.0 s elapsed · about 6.0 s left"
    job.apply(JobEvent(job_id="j", state=JobState.queued, attempt=1, position=0,
                       reason="paused at step 40 for an interactive job"), now=105.0)
    assert status_line(job, 105.0).startswith("queued #1 (paused at step 40 for an interactive job) · 5.0 s")
    job.apply(JobEvent(job_id="j", state=JobState.running, attempt=1), now=106.0)
    assert "paused" not in status_line(job, 106.0)


def test_the_upscaler_setting_names_a_catalog_model_that_upscales():
    assert _config_problem(Config(discord=DiscordConfig(upscaler="tiny-sd-upscaler"))) is None
    assert _config_problem(Config(discord=DiscordConfig(upscaler="nope"))).startswith(
        "[discord] upscaler = 'nope' is not in the catalog (tiny-sd, ")
    assert _config_problem(Config(discord=DiscordConfig(upscaler="tiny-sd"))) == (
        "[discord] upscaler = 'tiny-sd' does not upscale (family sd1); models that do: tiny-sd-upscaler")


def test_a_job_outliving_its_interaction_token_still_delivers(atelier):
    async def scenario():
        async with Session(atelier, DiscordConfig()) as s:
            payload = slash("generate", prompt="a slow dawn", model="cm", steps=150)
            message = await s.respond(payload)
            await s.fake.wait_for(lambda: any(h.how == "edit" for h in s.fake.history(message)), 30)
            s.fake.expired.add(payload["token"])  # 15 minutes have passed, as far as Discord is concerned
            await s.fake.wait_for(lambda: "done" in s.fake.latest(message).content, 60)
            return s.fake.history(message), s.fake.failures

    history, failures = go(scenario())
    assert failures == [("PATCH", "/webhooks/{webhook_id}/{webhook_token}/messages/@original")]
    after = history[[h.how for h in history].index("channel-edit"):]
    assert all(h.how == "channel-edit" for h in after)  # as the bot, through its own access to the channel
    assert "done in" in after[-1].content and len(after[-1].files) == 1 and after[-1].files[0][0].endswith(".png")


# --------------------------------------------------------------------------- #
# The pieces, without atelier


def test_a_result_whose_edits_fail_is_retried_then_posted_anew():
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")

    async def scenario():
        async with Session(None, DiscordConfig()) as s:
            interaction = discord.Interaction(data=slash("generate", prompt="x"), state=s.bot._connection)
            s.fake.interactions[interaction.token] = slash("generate", prompt="x") | {"id": str(interaction.id),
                                                                                      "token": interaction.token}
            reply = Reply(s.bot, interaction)
            await reply.open(Frame("queued"))
            posts = itertools.count()

            def outage(method: str, path: str) -> int | None:
                if method == "PATCH":
                    return 503  # Discord cannot edit anything
                if method == "POST" and path == "/channels/{channel_id}/messages" and next(posts) == 0:
                    return 502  # and the first post fails too
                return None

            s.fake.fail = outage
            delivered = await reply.deliver(Frame("done", images=[("a.png", png.getvalue())], notify=ADA))
            return delivered, reply.message_id, s.fake

    delivered, message_id, fake = go(scenario(), 30)
    assert delivered
    edits = [f for f in fake.failures if f[0] == "PATCH"]
    assert len(edits) == 1 + len(FAST.edit_delays_s)
    assert fake.failures[-1] == ("POST", "/channels/{channel_id}/messages")
    opened, posted = fake.shown
    assert opened.how == "respond" and opened.content == "queued"
    assert posted.how == "post" and posted.message_id == message_id != opened.message_id
    assert posted.content == "done" and posted.files == [("a.png", png.getvalue())]
    message = fake.messages[message_id]
    assert message.reference == opened.message_id and message.mentions == [str(ADA)]


def test_the_rate_limit_is_a_sliding_window_per_user():
    limiter = RateLimiter(2, window_s=60)
    assert limiter.try_acquire("ada", 0.0) == 0 and limiter.try_acquire("ada", 10.0) == 0
    assert limiter.try_acquire("ada", 20.0) == pytest.approx(40.0)  # the first start leaves the window at 60
    assert limiter.try_acquire("bob", 20.0) == 0  # others are not held up
    assert limiter.try_acquire("ada", 60.0) == 0
    assert limiter.try_acquire("ada", 65.0) == pytest.approx(5.0)  # refusals do not count


def test_allowlists():
    open_bot = DiscordConfig()
    assert access_refusal(open_bot, guild_id=None, channel_ids=[5], role_ids=[]) is None  # a DM, no lists
    strict = DiscordConfig(guilds=[1], channels=[10], roles=[100, 101])
    ok = dict(guild_id=1, channel_ids=[10], role_ids=[101])
    assert access_refusal(strict, **ok) is None
    assert access_refusal(strict, **{**ok, "channel_ids": [77, 10]}) is None  # a thread of an allowed channel
    assert "server" in access_refusal(strict, **{**ok, "guild_id": 2})
    assert "server" in access_refusal(strict, **{**ok, "guild_id": None})  # DMs are not a listed server
    assert "channel" in access_refusal(strict, **{**ok, "channel_ids": [11]})
    assert "roles" in access_refusal(strict, **{**ok, "role_ids": []})


def test_the_token_comes_from_the_environment_or_dotenv(tmp_path):
    assert parse_dotenv('# c\nexport DISCORD_TOKEN="abc.def"\nOTHER=1 # note\nbroken line\n') == {
        "DISCORD_TOKEN": "abc.def", "OTHER": "1"}
    assert find_token({"DISCORD_TOKEN": " env "}, tmp_path) == "env"
    assert find_token({}, tmp_path) is None
    (tmp_path / ".env").write_text("DISCORD_TOKEN='from-file'\n")
    assert find_token({}, tmp_path) == "from-file"
    assert find_token({"DISCORD_TOKEN": "env"}, tmp_path) == "env"


def test_main_without_a_token_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["--router", "tcp://127.0.0.1:1", "--pub", "tcp://127.0.0.1:2"]) == 2
    assert "DISCORD_TOKEN" in capsys.readouterr().err


def test_a_status_line_says_state_percent_elapsed_and_eta():
    job = JobDisplay(submitted_at=100.0)
    job.apply(JobEvent(job_id="j", state=JobState.queued, position=2, eta_s=12.0), now=101.0)
    assert status_line(job, 101.0) == "queued #3 · 1.0 s elapsed · about 12 s left"
    assert status_line(job, 105.0) == "queued #3 · 5.0 s elapsed · about 8.0 s left"  # the ETA counts down
    job.apply(Progress(job_id="j", step=2, total=4, elapsed_s=1.0, eta_s=1.5), now=110.0)
    job.apply(JobEvent(job_id="j", state=JobState.loading), now=110.1)  # late: states only move forward
    assert status_line(job, 110.5) == "running 50% (step 2/4) · 10 s elapsed · about 1.0 s left"
    job.apply(Preview(job_id="j", step=2, width=8, height=8, image=b"\xff\xd8jpeg"), now=110.6)
    assert job.preview == b"\xff\xd8jpeg"
    record = JobRecord(spec=JobSpec(model="m", prompt="p", id="j"), state=JobState.done, submitted_at=0)
    job.apply(JobResult(job=record), now=112.0)
    assert status_line(job, 200.0) == "done in 12 s"


def test_a_live_canvas_takes_only_the_newest_prompts_events():
    canvas = LiveCanvas(owner=ADA, channel=CHANNEL)
    canvas.submitted("a", "a li", now=0.0)
    canvas.apply("a", Preview(job_id="a", step=1, width=8, height=8, image=b"A"), now=0.5)
    assert render_live(canvas, 1.0).images == [("live-a-preview.jpg", b"A")]
    canvas.submitted("b", "a ligh", now=1.0)
    assert render_live(canvas, 1.0).images == []  # a's preview went with its prompt
    assert not canvas.apply("a", Preview(job_id="a", step=2, width=8, height=8, image=b"A2"), now=1.1)
    done = JobRecord(spec=JobSpec(model="m", prompt="p", id="a"), state=JobState.done, submitted_at=0)
    assert not canvas.apply("a", JobResult(job=done, outputs=[Artifact(media_type="image/png", data=b"PA")]), 1.2)
    frame = render_live(canvas, 1.5)
    assert frame.images == [] and "«a ligh»" in frame.content
    b_done = done.model_copy(update={"spec": JobSpec(model="m", prompt="p", id="b")})
    assert canvas.apply("b", JobResult(job=b_done, outputs=[Artifact(media_type="image/png", data=b"PB")]), 2.0)
    canvas.submitted("c", "a lighthouse", now=3.0)
    frame = render_live(canvas, 3.0)
    # While c renders, b's finished image stays, labelled with its own prompt.
    assert frame.images == [("live-b.png", b"PB")] and "the last finished image, of «a ligh»" in frame.content
