"""The protocol as actors/messages.py declares it, against the actors, the broker and the codec that
carry it out: every kind a role receives has exactly one handler there, the broker's tables are the
declarations', and ``ask`` holds a peer to the reply its question declares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import broker
from actors import codec
from actors.actor import Actor, UnexpectedReply, handles
from actors.codec import Envelope
from actors.loader import Loader
from actors.messages import (
    MESSAGES,
    PEERS,
    ClusterEvent,
    ClusterEventKind,
    Error,
    GetStatus,
    Ok,
    Role,
    Route,
    Via,
    kind_of,
    reply_types,
)
from actors.runner import Runner
from actors.scheduler import Scheduler
from frontends.client import AtelierClient
from tests.conftest import broker_thread, run

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
ACTORS = {Role.scheduler: Scheduler, Role.loader: Loader, Role.runner: Runner, Role.frontend: AtelierClient}


def handler_names(actor: type[Actor]) -> dict[type, list[str]]:
    """Message type -> the names of the methods of ``actor`` (an override counted once) that handle it."""
    methods: dict[str, object] = {}
    for klass in reversed(actor.__mro__):
        methods.update(vars(klass))
    found: dict[type, list[str]] = {}
    for name, method in methods.items():
        for message in getattr(method, "__handles__", ()):
            found.setdefault(message, []).append(name)
    return found


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
def test_every_kind_a_role_receives_has_exactly_one_handler_there(role):
    actor = ACTORS[role]
    assert actor.role is role
    declared = {m for m in MESSAGES if m.route.via is Via.handler and role in m.route.to}
    handled = handler_names(actor)
    assert {kind_of(m): names for m, names in handled.items() if len(names) > 1} == {}
    assert sorted(kind_of(m) for m in declared - set(handled)) == [], f"{actor.__name__} does not handle these"
    assert sorted(kind_of(m) for m in set(handled) - declared) == [], f"{role.value} is not declared to get these"
    assert set(actor._handlers) == declared  # the table the mailbox dispatches on


def test_every_ask_is_answered_along_its_route_backwards():
    answers = set()
    for message in MESSAGES:
        assert isinstance(message.route, Route), kind_of(message)
        for reply in reply_types(message):
            answers.add(reply)
            assert reply in MESSAGES, f"{kind_of(message)} is answered by {reply.__name__}, which is not a message"
            assert set(message.route.to) <= set(reply.route.sent_by), kind_of(message)
            assert set(message.route.sent_by) <= set(reply.route.to), kind_of(message)
    # An answer nobody asks for is a message no code waits for; Error may answer anything.
    assert {m for m in MESSAGES if m.route.via is Via.answer} - answers == {Error}


def test_the_brokers_tables_are_the_declarations():
    from_broker_alone = {kind_of(m) for m in MESSAGES if not set(m.route.sent_by) & set(PEERS)}
    assert broker.BROKER_ONLY == from_broker_alone
    # What a peer must never be able to say: the scheduler believes these about who joined and left.
    assert {"peer_up", "peer_down", "welcome"} <= broker.BROKER_ONLY
    events = [m for m in MESSAGES if m.route.topic is not None]
    assert broker.PUBLISHERS == {kind_of(m): (m.route.sent_by[0], m.route.topic) for m in events}
    assert broker.PUBLISHERS["job_event"] == (Role.scheduler, "state")
    assert broker.PUBLISHERS["progress"][0] is broker.PUBLISHERS["preview"][0] is Role.runner


def test_the_codec_puts_each_event_on_its_declared_topic():
    events = [m for m in MESSAGES if m.route.via is Via.event]
    assert {m.route.topic for m in events} == {"state", "progress", "preview", "cluster"}
    for event in events:
        if event is ClusterEvent:
            sample = ClusterEvent(event=ClusterEventKind.lease_granted, at=0.0)
            assert codec.topic_of(sample) == "cluster/lease_granted"
            continue
        sample = event.model_construct(job_id="j7")
        assert codec.topic_of(sample) == f"job/j7/{event.route.topic}"
    with pytest.raises(TypeError, match="GetStatus is not an event"):
        codec.topic_of(GetStatus())


def test_an_event_needs_its_topic_and_one_publisher():
    with pytest.raises(ValueError):
        Route(Role.runner, Role.frontend, Via.event)
    with pytest.raises(ValueError):
        Route((Role.runner, Role.scheduler), Role.frontend, Via.event, topic="progress")
    with pytest.raises(ValueError):
        Route(Role.runner, Role.scheduler, topic="progress")


def test_python_m_actors_messages_prints_the_whole_protocol():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "actors.messages"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split() == ["kind", "from", "to", "via", "reply", "topic"]
    assert set(rows) == {kind_of(m) for m in MESSAGES}
    assert "accepted" in rows["submit"] and "job/<id>/state" in rows["job_event"]


def test_ask_raises_on_a_reply_of_another_type_than_declared():
    class Confused(Actor):
        role = Role.scheduler

        @handles(GetStatus)
        async def on_status(self, msg: GetStatus, env: Envelope) -> Ok:
            return Ok()  # a ClusterStatus is what GetStatus is answered with

    class Asker(Actor):
        role = Role.frontend

    async def go(router: str) -> UnexpectedReply:
        confused = Confused("confused", router, heartbeat_s=5.0)
        asker = Asker("asker", router, heartbeat_s=5.0)
        await confused.start(timeout=10)
        await asker.start(timeout=10)
        try:
            with pytest.raises(UnexpectedReply) as caught:
                await asker.ask("confused", GetStatus(), timeout=10)
            return caught.value
        finally:
            await asker.close(drain_timeout=0)
            await confused.close(drain_timeout=0)

    with broker_thread(heartbeat_s=5.0) as (b, _):
        error = run(go(b.router_endpoint), timeout=30)
    assert str(error) == "confused answered get_status with ok; the protocol answers it with cluster_status"
    assert error.reply == Ok()
