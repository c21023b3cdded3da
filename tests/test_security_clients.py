"""The security review's findings on the frontends' clients (issue 13): the AtelierClient, the Discord
bot and the CLI, each attack made through the real thing (a shared atelier, discord.py's own objects
over tests/test_discord.py's fake Discord, the ``atelier`` command) and seen to fail, and the
legitimate use seen to still work."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.actor import RemoteError
from actors.messages import GetResult, JobResult, Progress
from atelier.config import DiscordConfig
from atelier.jobs import Artifact, ErrorCode, JobRecord, JobSpec, JobState
from frontends import client as client_module
from frontends.client import RESYNC_BATCH, AtelierClient
from frontends.discord_bot import FILES_REFUSED
from frontends.discord_views import JobCard, JobDisplay, is_admin, render_job, status_line
from tests.conftest import run
from tests.test_discord import (
    ADA,
    BOB,
    CHANNEL,
    GUILD,
    ROLE,
    FakeDiscord,
    Session,
    _error,
    _interaction,
    _job_of,
    _role,
    go,
    press,
    slash,
)

pytestmark = pytest.mark.timeout(180)

ADMINS = 1500000000000000009


# --------------------------------------------------------------------------- #
# H1: a submit never takes over another job's watch


def test_h1_a_submit_reusing_anothers_id_is_refused_and_the_owner_still_gets_events_and_result(shared_cluster):
    """One client serves every user (as the HTTP server's does): Ana submits with the id of Bob's
    running job. She is refused, learns nothing of his job, and Bob's stream and waits carry on."""
    async def scenario():
        async with AtelierClient(shared_cluster.router, shared_cluster.pub) as shared:
            bob = JobSpec(model="cm", prompt="bob's secret prompt", steps=150, user="bob-h1")
            await shared.submit(bob)
            stream = shared.events(bob.id, timeout=60)
            first = await anext(stream)  # Bob is reading his job's events
            waiters = [asyncio.create_task(shared.wait(bob.id, timeout=60)) for _ in range(2)]
            ana = JobSpec(id=bob.id, model="cm", prompt="x", steps=1, user="ana-h1")
            try:
                await shared.submit(ana)
                refusal = None
            except RemoteError as exc:
                refusal = exc.error
            retry = await shared.submit(bob)  # Bob's own retry of his submit is his job, and keeps the watch
            seen = [first] + [event async for event in stream]
            results = await asyncio.gather(*waiters)
            return bob, refusal, retry, seen, results

    bob, refusal, retry, seen, results = run(scenario(), 150)
    assert refusal is not None and refusal.code is ErrorCode.conflict and refusal.field == "id"
    assert "secret" not in refusal.message and "bob" not in refusal.message
    assert retry.spec.id == bob.id and retry.spec.user == "bob-h1"
    assert any(isinstance(event, Progress) for event in seen)
    final = seen[-1]
    assert isinstance(final, JobResult) and final.job.state is JobState.done and final.job.spec.user == "bob-h1"
    assert all(r.job.spec.id == bob.id and r.job.state is JobState.done and r.outputs for r in results)


# --------------------------------------------------------------------------- #
# M7: cached results are bounded by their bytes


def test_m7_the_clients_result_cache_holds_at_most_its_byte_bound_and_serves_the_newest(shared_cluster):
    async def scenario():
        async with AtelierClient(shared_cluster.router, shared_cluster.pub) as client:
            specs = [JobSpec(model="cm", prompt=f"m7 {i}", steps=2, count=2, user="m7") for i in range(6)]
            first = await client.generate(specs[0], timeout=60)
            one = sum(len(a.data) for a in first.outputs)
            client.keep_result_bytes = 2 * one + one // 2  # room for two such results, not three
            for spec in specs[1:]:
                await client.generate(spec, timeout=60)
            kept = [client.result(spec.id) for spec in specs]
            return one, client.keep_result_bytes, kept

    one, bound, kept = run(scenario(), 150)
    assert one > 0
    held = [result for result in kept if result is not None]
    assert sum(len(a.data) for result in held for a in result.outputs) <= bound
    assert len(held) < len(kept) and kept[0] is None  # the oldest went
    newest = kept[-1]
    assert newest is not None and newest.job.state is JobState.done and len(newest.outputs) == 2


def test_m7_the_bot_keeps_no_output_bytes_of_a_delivered_job_and_again_still_works(shared_cluster):
    async def scenario():
        async with Session(shared_cluster, DiscordConfig()) as s:
            first = await s.respond(slash("generate", prompt="m7 harbour", model="cm", count=2, steps=4))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(first).content, 60)
            job = _job_of(s.fake.latest(first))
            await s.fake.wait_for(lambda: job in s.bot.finished, 10)
            card = s.bot.finished[job]
            again = await s.respond(press(s.fake, first, "Again", user=BOB))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(again).content, 60)
            return s.fake.latest(first), card, s.fake.latest(again)

    shown, card, again = go(scenario())
    assert len(shown.files) == 2  # delivered in full
    assert card.result is not None and card.result.job.state is JobState.done
    assert card.result.outputs == [] and card.display.preview is None  # then dropped
    assert len(again.files) == 2 and again.content.startswith(f"<@{BOB}> · **«m7 harbour»**")


# --------------------------------------------------------------------------- #
# L5: a reconnect asks after watched jobs in bounded batches


def test_l5_a_reconnect_asks_for_watched_results_a_bounded_batch_at_a_time(shared_cluster, monkeypatch):
    monkeypatch.setattr(client_module, "RECONNECT_JITTER_S", 0.05)  # the batches, not the pauses, are tested
    watched = 3 * RESYNC_BATCH

    async def scenario():
        async with AtelierClient(shared_cluster.router, shared_cluster.pub) as client:
            in_flight, most, asked = 0, 0, []
            ask = client.ask

            async def counting(to, msg, *args, **kwargs):
                nonlocal in_flight, most
                if not isinstance(msg, GetResult):
                    return await ask(to, msg, *args, **kwargs)
                in_flight += 1
                most = max(most, in_flight)
                asked.append(msg.job_id)
                try:
                    return await ask(to, msg, *args, **kwargs)
                finally:
                    in_flight -= 1

            client.ask = counting
            for index in range(watched):
                client._watch(f"l5-gone-{index}", subscribe=False)  # jobs the scheduler never had
            await client.on_reconnect()
            deadline = time.monotonic() + 60
            while (len(asked) < watched or in_flight) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return most, sorted(asked)

    most, asked = run(scenario(), 90)
    assert asked == sorted(f"l5-gone-{index}" for index in range(watched))  # each asked after once
    assert most <= RESYNC_BATCH


# --------------------------------------------------------------------------- #
# L2: results over Discord's upload limit


class LimitedDiscord(FakeDiscord):
    """The fake Discord, refusing (413, as Discord does) a request whose files together exceed its limit."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.refused_outputs = 0  # refusals of a message carrying a job's outputs (not of a preview)

    def _check(self, method: str, path: str, files: list) -> None:
        if sum(len(data) for _, data in files) > self.limit:
            self.failures.append((method, path))
            self.refused_outputs += any(name.startswith("atelier-") for name, _ in files)
            raise _error(413, "Request entity too large", 40005)

    async def rest(self, route, *, files=None, form=None, **kwargs):
        self._check(route.method, route.path, self._body(kwargs.get("json"), form)[1])
        return await super().rest(route, files=files, form=form, **kwargs)

    async def webhook(self, route, payload, multipart):
        self._check(route.method, route.path, self._body(payload, multipart)[1])
        return await super().webhook(route, payload, multipart)


def test_l2_outputs_over_the_upload_limit_are_linked_and_a_refusal_is_not_retried(shared_cluster):
    async def scenario():
        s = Session(shared_cluster, DiscordConfig())
        s.fake = LimitedDiscord(limit=10 << 20)
        async with s:
            s.bot.public_url = "https://atelier.example/"
            # The interaction says the server takes 100 bytes a message: no output fits, each gets a link.
            small = slash("generate", prompt="l2 linked", model="cm", count=2, steps=2) | {"attachment_size_limit": 100}
            linked = await s.respond(small)
            await s.fake.wait_for(lambda: "done" in s.fake.latest(linked).content, 60)
            # Discord refuses what the interaction said would fit: shown at once without the files.
            s.fake.limit = 100
            refused = await s.respond(slash("generate", prompt="l2 refused", model="cm", count=2, steps=2))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(refused).content, 60)
            return s.fake.latest(linked), s.fake.latest(refused), s.fake.refused_outputs

    linked, refused, refusals = go(scenario())
    job = _job_of(linked)
    assert linked.files == [] and "2 of 2 outputs are too large for Discord here" in linked.content
    assert f"<https://atelier.example/v1/artifacts/{job}-0.png>" in linked.content
    assert f"<https://atelier.example/v1/artifacts/{job}-1.png>" in linked.content
    assert refused.files == [] and FILES_REFUSED in refused.content and "done in" in refused.content
    assert refused.labels == ["U1", "U2", "Again"]  # the images are atelier's still: they can be upscaled
    assert refusals == 1  # the one refusal, not retried for minutes
    for shown in (linked, refused):
        assert "file:" not in shown.content and "/tmp" not in shown.content


def test_l2_the_largest_outputs_are_left_out_first_and_no_server_path_is_shown():
    spec = JobSpec(model="m", prompt="p")
    record = JobRecord(spec=spec, state=JobState.done, submitted_at=0)
    outputs = [Artifact(media_type="image/png", data=b"a" * size, uri=f"file:///home/ops/.cache/atelier/{spec.id}-{i}.png")
               for i, size in enumerate((500, 100, 300))]
    card = JobCard(spec=spec, owner=ADA, display=JobDisplay(submitted_at=0.0), upload_bytes=450,
                   result=JobResult(job=record, outputs=outputs))
    card.display.apply(card.result, 1.0)
    frame = render_job(card, 2.0)
    assert [name for name, _ in frame.images] == [f"atelier-{spec.id}-1.png", f"atelier-{spec.id}-2.png"]
    assert "1 of 3 outputs are too large for Discord here; atelier keeps them" in frame.content
    assert "file:" not in frame.content and "/home" not in frame.content
    failed = JobDisplay(submitted_at=0.0, state=JobState.failed,
                        reason="OSError: [Errno 28] No space left: '/srv/atelier/artifacts/x.png.part'")
    assert "/srv" not in status_line(failed, 1.0) and "No space left" in status_line(failed, 1.0)


# --------------------------------------------------------------------------- #
# /live with what JobSpec refuses


def test_live_prompt_with_a_bad_model_or_a_long_prompt_says_why_and_keeps_the_session(shared_cluster):
    async def scenario():
        async with Session(shared_cluster, DiscordConfig()) as s:
            long = await s.respond(slash("live", prompt="x" * 4001, model="cm"))
            none_yet = dict(s.bot.sessions)
            canvas = await s.respond(slash("live", prompt="a quiet sea", model="cm", steps=4))
            await s.fake.wait_for(lambda: "done" in s.fake.latest(canvas).content, 60)
            bad = await s.respond(slash("live", prompt="a storm", model="not a model!"))
            session = s.bot.sessions[(ADA, CHANNEL)]
            return s.fake.latest(long), none_yet, s.fake.latest(bad), session.model, len(session.canvas.history)

    long, none_yet, bad, model, prompts = go(scenario())
    assert long.ephemeral and long.content.startswith("Can't submit that: prompt:") and "4000" in long.content
    assert none_yet == {}  # no session with a prompt it could never run
    assert bad.ephemeral and bad.content.startswith("Can't submit that: model:")
    assert "went wrong" not in long.content + bad.content
    assert model == "cm" and prompts == 1  # the session goes on with the model it had


# --------------------------------------------------------------------------- #
# Roles


def test_roles_a_user_sees_and_cancels_only_their_own_jobs_an_admin_all(shared_cluster):
    settings = DiscordConfig(admin_roles=[ADMINS])
    admin = (ROLE, ADMINS)

    def complete(user: int, roles) -> dict:
        data = {"id": "1100000000000000008", "name": "cancel", "type": 1,
                "options": [{"name": "job", "type": 3, "value": "", "focused": True}]}
        return _interaction(4, data, user=user, channel=CHANNEL, roles=roles)

    async def scenario():
        async with Session(shared_cluster, settings) as s:
            s.bot._connection.parse_guild_role_create({"guild_id": str(GUILD), "role": _role(ADMINS, "admins", 2)})
            message = await s.respond(slash("generate", prompt="ada's long night", model="cm", steps=500))
            await s.fake.wait_for(lambda: "running" in s.fake.latest(message).content, 30)
            job = _job_of(s.fake.latest(message))
            answers = {}
            answers["queue"] = await s.respond(slash("queue", user=BOB))
            answers["admin queue"] = await s.respond(slash("queue", user=BOB, roles=admin))
            s.send(complete(BOB, (ROLE,)))
            s.send(complete(BOB, admin))
            await s.fake.wait_for(lambda: len(s.fake.choices) == 2, 10)
            answers["prefix"] = await s.respond(slash("cancel", user=BOB, job=job[:6]))
            answers["cancel"] = await s.respond(slash("cancel", user=BOB, job=job))
            answers["button"] = await s.respond(press(s.fake, message, "Cancel", user=BOB))
            for name in ("queue", "admin queue", "prefix", "cancel", "button"):
                await s.fake.wait_for(lambda n=name: s.fake.latest(answers[n]).content, 10)
            still = await s.atelier.job(job)
            answers["admin cancel"] = await s.respond(slash("cancel", user=BOB, roles=admin, job=job))
            await s.fake.wait_for(lambda: "cancelled" in s.fake.latest(message).content, 30)
            shown = {name: s.fake.latest(m).content for name, m in answers.items()}
            return job, shown, s.fake.choices, still, await s.atelier.job(job)

    job, shown, (user_choices, admin_choices), still, record = go(scenario())
    assert job[:8] not in shown["queue"] and "ada's" not in shown["queue"]
    assert shown["queue"].startswith("**Queue:**") and "1 running" in shown["queue"]  # counts are for all
    assert f"`{job[:8]}` <@{ADA}> «ada's long night»" in shown["admin queue"]
    assert [c["value"] for c in user_choices] == [] and [c["value"] for c in admin_choices] == [job]
    assert shown["prefix"] == f"There is no job `{job[:6]}`."  # a prefix tells nothing of others' ids
    assert shown["cancel"] == "That job isn't yours to cancel."
    assert shown["button"] == f"Only <@{ADA}> can do that to their job."
    assert still.state is JobState.running
    assert shown["admin cancel"].startswith(f"Cancelled `{job[:8]}`")
    assert record.state is JobState.cancelled and record.spec.user == f"discord:{ADA}"


def test_roles_the_cli_lists_the_users_own_jobs_unless_asked_for_all(shared_cluster):
    async def submit() -> list[str]:
        async with AtelierClient(shared_cluster.router, shared_cluster.pub) as client:
            # Not batched together (their steps differ): one runs, the others wait, some 30 s in all.
            bob = [JobSpec(model="cm", prompt="bob's night", steps=500 - i, user="bob-cli") for i in range(3)]
            for spec in bob:
                await client.submit(spec, events=False)
            await client.submit(JobSpec(model="cm", prompt="ana's", steps=2, user="ana-cli"), events=False)
            return [spec.id for spec in bob]

    async def cancel(job_ids: list[str]) -> None:
        async with AtelierClient(shared_cluster.router, shared_cluster.pub) as client:
            for job_id in job_ids:
                await client.cancel(job_id)

    bob = run(submit())
    try:
        everyone = shared_cluster.cli("status", "--all")
        ana = shared_cluster.cli("status", "--user", "ana-cli")
        his = shared_cluster.cli("status", "--user", "bob-cli")
    finally:
        run(cancel(bob))
    for done in (ana, everyone, his):
        assert done.returncode == 0, done.stderr
    assert any(job_id in everyone.stdout for job_id in bob) and "jobs of" not in everyone.stdout
    assert not any(job_id in ana.stdout for job_id in bob) and "runner-" in ana.stdout
    assert "jobs of ana-cli" in ana.stdout and "ana's" in ana.stdout
    assert all(job_id in his.stdout for job_id in bob) and "bob's night" in his.stdout


def test_roles_discord_admins_are_named_in_the_config():
    assert DiscordConfig().admin_roles == [] and DiscordConfig().admin_users == []
    settings = DiscordConfig(admin_users=[ADA], admin_roles=[ADMINS])
    assert is_admin(settings, user_id=ADA, role_ids=[])
    assert is_admin(settings, user_id=BOB, role_ids=[ROLE, ADMINS])
    assert not is_admin(settings, user_id=BOB, role_ids=[ROLE])
