"""Property-based tests of the wire: every message type round trips through the codec, garbage and
mutated frames only ever raise the codec's ``DecodeError``, and a broker under a barrage of such
frames keeps serving a well-behaved client.

Strategies are derived from the pydantic models themselves (``strategy_for``), and the message
types from ``actors.messages.Message``, so a new message type or field is fuzzed without a change here.
Every run draws the same examples (``derandomize``), so a failure in CI repeats on a laptop.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import os
import re
import time
import tracemalloc
import types
import typing
import uuid
from typing import Annotated, Any, Literal, Union

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, PlainValidator, ValidationError
from pydantic.fields import FieldInfo

import broker as broker_module
from actors import codec, messages
from actors.codec import MAGIC, DecodeError, Envelope
from actors.messages import Error, Heartbeat, Hello, Role, Welcome
from atelier import jobs
from atelier.jobs import Capabilities, JobSpec, Wire
from tests.conftest import broker_thread, eventually, run

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INT64 = (-(2**63), 2**63 - 1)
MSGPACK_INTS = (-(2**63), 2**64 - 1)  # what msgpack can carry at all

# Every message type, from the discriminated union itself: a type added there is fuzzed here too.
MESSAGE_TYPES: dict[str, type[Wire]] = {
    typing.get_args(t.model_fields["kind"].annotation)[0]: t
    for t in typing.get_args(typing.get_args(messages.Message)[0])
}


# --------------------------------------------------------------------------- #
# Strategies from the models


def _constraints(metadata: list[Any]) -> dict[str, Any]:
    """The constraints pydantic keeps as metadata (annotated_types, patterns, the Blob validator)."""
    found: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):  # Annotated[str, Field(...)] nested inside a list or dict
            found.update(_constraints(item.metadata))
            continue
        if isinstance(item, PlainValidator) and item.func is jobs._validate_blob:
            found["blob"] = True
        for key in ("ge", "gt", "le", "lt", "min_length", "max_length", "multiple_of", "pattern"):
            value = getattr(item, key, None)
            if value is not None:
                found[key] = value
    return found


# Small blobs inline, and ones above pyzmq's 64 KiB copy threshold, which arrive as memoryviews.
_BLOBS = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(memoryview),
    st.sampled_from([65_536, 100_003]).map(lambda n: (bytes(range(256)) * (n // 256 + 1))[:n]),
)


def _ints(c: dict[str, Any]) -> st.SearchStrategy[int]:
    low = c["ge"] if "ge" in c else c["gt"] + 1 if "gt" in c else INT64[0]
    high = c["le"] if "le" in c else c["lt"] - 1 if "lt" in c else INT64[1]
    step = c.get("multiple_of")
    if step:
        return st.integers(-(-low // step), high // step).map(lambda k: k * step)
    return st.integers(low, high)


def _floats(c: dict[str, Any]) -> st.SearchStrategy[float]:
    # NaN is a valid float on the wire but never equal to itself, so a round trip cannot compare it.
    return st.floats(min_value=c.get("ge", c.get("gt")), max_value=c.get("le", c.get("lt")),
                     exclude_min="gt" in c, exclude_max="lt" in c, allow_nan=False)


def _strings(c: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = c.get("min_length", 0), c.get("max_length")
    if "pattern" in c:
        # pydantic anchors with ^…$ where $ is the end of the text; hypothesis' fullmatch is the same.
        inner = re.sub(r"^\^|\$$", "", c["pattern"])
        return st.from_regex(inner, fullmatch=True).filter(lambda s: low <= len(s) <= (high or len(s)))
    return st.text(min_size=low, max_size=min(high or 24, max(low, 24)))


def strategy_for(tp: Any, c: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Values of the annotation ``tp`` that its constraints ``c`` allow. Unknown types fail loudly."""
    c = c or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return strategy_for(args[0], {**c, **_constraints(list(tp.__metadata__))})
    if c.get("blob"):
        return _BLOBS
    if origin in (Union, types.UnionType):
        return st.one_of([strategy_for(arm, c) for arm in args])
    if tp is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return model_strategy(tp)
    low, high = c.get("min_length", 0), c.get("max_length", 3)
    if origin is list:
        return st.lists(strategy_for(args[0]), min_size=low, max_size=max(low, min(high, 3)))
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), min_size=low, max_size=min(high, 3))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return _ints(c)
    if tp is float:
        return _floats(c)
    if tp is str:
        return _strings(c)
    raise TypeError(f"no strategy for {tp!r}: teach strategy_for this field type")


def _validated(model: type[BaseModel], fields: dict[str, Any]) -> BaseModel | None:
    try:
        return model.model_validate(fields)
    except ValidationError:  # a model validator (a blank prompt, say) said no: draw again
        return None


@functools.cache
def model_strategy(model: type[BaseModel]) -> st.SearchStrategy[BaseModel]:
    """Valid instances of ``model``: required fields always drawn, the others sometimes left to their defaults."""
    required, optional = {}, {}
    for name, info in model.model_fields.items():
        strategy = strategy_for(info.annotation, _constraints(info.metadata))
        (required if info.is_required() else optional)[name] = strategy
    return (st.fixed_dictionaries(required, optional=optional)
            .map(functools.partial(_validated, model)).filter(lambda m: m is not None))


any_message = st.sampled_from(sorted(MESSAGE_TYPES)).flatmap(lambda kind: model_strategy(MESSAGE_TYPES[kind]))

routes = st.fixed_dictionaries({
    "src": st.text(max_size=16), "dst": st.text(max_size=16), "id": st.integers(*MSGPACK_INTS),
    "corr": st.none() | st.integers(*MSGPACK_INTS)})


def as_bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(f) for f in frames]


# --------------------------------------------------------------------------- #
# Round trips


def _models_in(tp: Any) -> set[type[BaseModel]]:
    """The models an annotation can hold, at any depth (a BatchDone holds JobDone and JobFailed)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {tp}.union(*(_models_in(f.annotation) for f in tp.model_fields.values()))
    return set().union(*(_models_in(arg) for arg in typing.get_args(tp)))


def test_every_kind_of_message_is_decodable():
    # A Wire model with a literal kind that no message can hold could be sent but never decoded.
    with_kind = {cls for cls in vars(messages).values() if isinstance(cls, type) and issubclass(cls, Wire)
                 and typing.get_origin(cls.model_fields.get("kind", FieldInfo()).annotation) is Literal}
    assert with_kind <= _models_in(messages.Message)
    assert len(MESSAGE_TYPES) >= 30


def _head_bytes_and_refs(head: bytes) -> tuple[list[bytes], list[int]]:
    found: list[bytes] = []
    refs: list[int] = []

    def walk(node: Any) -> None:
        if isinstance(node, (bytes, bytearray)):
            found.append(node)
        elif isinstance(node, msgpack.ExtType):
            refs.append(int.from_bytes(node.data, "big"))
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for item in node.values():
                walk(item)

    walk(msgpack.unpackb(head, raw=False, ext_hook=msgpack.ExtType))
    return found, refs


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_every_message_type_round_trips_with_its_blobs_out_of_band(kind, data):
    msg = data.draw(model_strategy(MESSAGE_TYPES[kind]), label="msg")
    route = data.draw(routes, label="route")
    frames = codec.encode(Envelope(msg, **route))
    inline, refs = _head_bytes_and_refs(frames[1])
    assert inline == []  # bytes never sit in the head
    assert sorted(refs) == list(range(len(frames) - 2))  # each blob frame referenced exactly once
    env = codec.decode([zmq.Frame(f) for f in frames])  # as a socket hands them over
    assert type(env.msg) is type(msg) and env.msg == msg
    assert (env.src, env.dst, env.id, env.corr) == (route["src"], route["dst"], route["id"], route["corr"])


# --------------------------------------------------------------------------- #
# Garbage and mutations


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(*MSGPACK_INTS) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=12) | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    | st.dictionaries(st.binary(max_size=4) | st.integers(-3, 3), inner, min_size=1, max_size=2),  # keys not text
    max_leaves=16)


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Every place in a head's tree that a mutation may replace."""
    out = [path]
    if isinstance(node, list):
        for i, item in enumerate(node):
            out += _paths(item, (*path, i))
    elif isinstance(node, dict):
        for key, item in node.items():
            out += _paths(item, (*path, key))
    return out


def _replace(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node[path[0]] = _replace(node[path[0]], path[1:], value)
    return node


_SAME_KIND = {bool: st.booleans(), int: st.integers(*MSGPACK_INTS), float: st.floats(), str: st.text(max_size=40),
              list: st.just([]), dict: st.just({})}


@st.composite
def tree_mutation(draw, frames: list[bytes]) -> list[bytes]:
    """The head re-packed with one part wrong: a node replaced by any msgpack value or by another of
    its own type (past a field's bounds, say), a field added or dropped, or an unknown kind."""
    head = msgpack.unpackb(frames[1], raw=False, ext_hook=msgpack.ExtType)
    paths = _paths(head)
    in_body = [p for p in paths if len(p) > 1 and p[0] == 5]
    # Mostly inside the body: that is where field validation lives, past the head's type checks.
    path = draw(st.sampled_from(in_body if in_body and draw(st.integers(0, 4)) else paths))
    how = draw(st.sampled_from(["replace", "same_kind", "same_kind", "add_field", "drop_field", "unknown_kind"]))
    body = head[5]
    node = head
    for key in path:
        node = node[key]
    if how == "add_field":
        body[draw(st.text(max_size=10))] = draw(msgpack_values)
    elif how == "drop_field" and body:
        del body[draw(st.sampled_from(sorted(body)))]
    elif how == "unknown_kind":
        head[0] = draw(st.text(max_size=12).filter(lambda k: k not in MESSAGE_TYPES))
    elif how == "same_kind" and type(node) in _SAME_KIND:
        head = _replace(head, path, draw(_SAME_KIND[type(node)]))
    else:
        head = _replace(head, path, draw(msgpack_values))
    return [frames[0], msgpack.packb(head, use_bin_type=True), *frames[2:]]


@st.composite
def byte_mutation(draw, frames: list[bytes]) -> list[bytes]:
    """Frames changed as a wire or a hostile peer might: bits flipped, cut, grown, dropped, added, reordered."""
    frames = list(frames)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["flip", "truncate", "extend", "insert", "drop", "duplicate", "add",
                                    "swap", "many"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if how == "flip" and frames and frames[i]:
            at = draw(st.integers(0, len(frames[i]) - 1))
            frames[i] = frames[i][:at] + bytes([frames[i][at] ^ draw(st.integers(1, 255))]) + frames[i][at + 1:]
        elif how == "truncate" and frames:
            frames[i] = frames[i][:draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        elif how == "extend" and frames:
            frames[i] = frames[i] + draw(st.binary(min_size=1, max_size=16))
        elif how == "insert" and frames:
            at = draw(st.integers(0, len(frames[i])))
            frames[i] = frames[i][:at] + draw(st.binary(min_size=1, max_size=8)) + frames[i][at:]
        elif how == "drop" and frames:
            del frames[i]
        elif how == "duplicate" and frames:
            frames.insert(i, frames[i])
        elif how == "add":
            frames.append(draw(st.binary(max_size=16)))
        elif how == "swap" and len(frames) > 1:
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif how == "many":  # past the frame cap
            frames += [b"x"] * draw(st.integers(60, 80))
    return frames


def _head(*parts: bytes) -> list[bytes]:
    return [MAGIC, b"".join(parts)]


_VALID_HEAD = msgpack.packb(["heartbeat", 1, None, "a", "b", {}])
# Frames built by hand for what a generator rarely hits: huge declared lengths (a decoder that
# trusts them allocates gigabytes), deep nesting, non-UTF-8 text, odd extensions, size caps.
CRAFTED: dict[str, list[bytes]] = {
    "no frames": [],
    "magic only": [MAGIC],
    "array32 of 4G items": _head(b"\xdd\xff\xff\xff\xff"),
    "map32 of 4G pairs": _head(b"\xdf\xff\xff\xff\xff"),
    "str32 of 4 GB": _head(b"\x96\xdb\xff\xff\xff\xffabc"),
    "bin32 of 4 GB": _head(b"\x96\xa2ok\x01\xc0\xa1a\xa1b\x81\xa1x\xc6\xff\xff\xff\xff"),
    "ext32 of 4 GB": _head(b"\xc9\xff\xff\xff\xff\x01"),
    "body declares 4G keys": _head(b"\x96\xa2ok\x01\xc0\xa1a\xa1b\xdf\xff\xff\xff\xff"),
    "nested 100k arrays": _head(b"\x91" * 100_000 + b"\xc0"),
    "nested 100k maps": _head(b"\x81\xa1k" * 100_000 + b"\xc0"),
    "nesting in the body": _head(b"\x96\xa6submit\x01\xc0\xa1a\xa1b\x81\xa3job" + b"\x91" * 1000 + b"\xc0"),
    "kind not UTF-8": _head(b"\x96\xa2\xff\xfe\x01\xc0\xa1a\xa1b\x80"),
    "src not UTF-8": _head(b"\x96\xa9heartbeat\x01\xc0\xa2\xc3\x28\xa1b\x80"),
    "body text not UTF-8": _head(b"\x96\xa7goodbye\x01\xc0\xa1a\xa1b\x81\xa6reason\xa3\xed\xa0\x80"),
    "timestamp extension": _head(b"\x96\xd6\xff\x00\x00\x00\x01\x01\xc0\xa1a\xa1b\x80"),
    "bad timestamp extension": _head(b"\x96\xd5\xff\x00\x00\x01\xc0\xa1a\xa1b\x80"),
    "unknown extension": [MAGIC, msgpack.packb(["preview", 1, None, "a", "b", {
        "job_id": "j", "step": 1, "width": 1, "height": 1, "image": msgpack.ExtType(7, b"\x00\x00")}]), b"x"],
    "blob index 65535": [MAGIC, msgpack.packb(["preview", 1, None, "a", "b", {
        "job_id": "j", "step": 1, "width": 1, "height": 1, "image": msgpack.ExtType(1, b"\xff\xff")}]), b"x"],
    "blob ref in the kind": [MAGIC, msgpack.packb([msgpack.ExtType(1, b"\x00\x00"), 1, None, "a", "b", {}]), b"x"],
    "trailing bytes": _head(_VALID_HEAD, b"\x00"),
    "int map key": [MAGIC, msgpack.packb(["heartbeat", 1, None, "a", "b", {1: 2}])],
    "bin where text goes": [MAGIC, msgpack.packb([b"heartbeat", 1, None, "a", "b", {}], use_bin_type=True)],
    "float id": [MAGIC, msgpack.packb(["heartbeat", 1.5, None, "a", "b", {}])],
    "unknown kind": [MAGIC, msgpack.packb(["format_disk", 1, None, "a", "b", {}])],
    "extra field": [MAGIC, msgpack.packb(["ok", 1, None, "a", "b", {"admin": True}])],
    "head too large": _head(b"\xc6" + (codec.MAX_HEAD_BYTES).to_bytes(4, "big") + bytes(codec.MAX_HEAD_BYTES)),
    "too many frames": [MAGIC, _VALID_HEAD] + [b""] * (codec.MAX_FRAMES + 1),
    "bad magic": [b"ATL2", _VALID_HEAD],
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_frames_fail_fast_and_small_with_a_decode_error(name):
    frames = CRAFTED[name]
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(DecodeError) as caught:
            codec.decode(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2.0
    assert peak < 8 << 20, f"{peak:,} bytes allocated decoding {name}"
    assert not str(caught.value).rstrip().endswith(":"), f"the error must say what is wrong: {caught.value}"
    if name in ("head too large", "too many frames"):
        assert caught.value.too_large


def test_an_input_image_over_the_cap_is_refused_naming_the_field():
    image = bytes(jobs.MAX_INPUT_BYTES + 1)
    frames = [MAGIC, msgpack.packb(["submit", 9, None, "cli", "scheduler", {
        "job": {"model": "m", "prompt": "p"}, "inputs": {"image": msgpack.ExtType(1, b"\x00\x00")}}]), image]
    with pytest.raises(DecodeError) as caught:
        codec.decode([zmq.Frame(f, copy=False) for f in frames])
    assert caught.value.field == "inputs.image" and caught.value.id == 9 and caught.value.src == "cli"


def _valid_frames(msg: Wire) -> list[bytes]:
    return as_bytes(codec.encode(Envelope(msg, "fuzz", "scheduler", 1)))


valid_frames = any_message.map(_valid_frames)
plausible_heads = st.tuples(
    st.sampled_from(sorted(MESSAGE_TYPES)) | st.text(max_size=12), msgpack_values, msgpack_values, msgpack_values,
    msgpack_values, st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5),
).map(lambda head: [MAGIC, msgpack.packb(list(head), use_bin_type=True)])

hostile_frames = st.one_of(
    st.lists(st.binary(max_size=48), max_size=6),  # anything at all
    st.lists(st.binary(max_size=48), max_size=3).map(lambda rest: [MAGIC, *rest]),  # right magic, garbage
    msgpack_values.map(lambda value: [MAGIC, msgpack.packb(value, use_bin_type=True)]),  # msgpack, wrong shape
    plausible_heads,  # the right shape, any field of any type
    valid_frames.flatmap(tree_mutation),  # a real message with one part wrong (twice: the richest case)
    valid_frames.flatmap(tree_mutation),
    valid_frames.flatmap(byte_mutation),  # a real message damaged
    st.sampled_from(sorted(CRAFTED)).map(CRAFTED.__getitem__),
)


@settings(FUZZ, max_examples=400)
@given(frames=hostile_frames)
def test_hostile_frames_raise_only_decode_error_and_what_decodes_can_be_sent_again(frames):
    try:
        env = codec.decode([zmq.Frame(f) for f in frames])
    except DecodeError as exc:
        assert str(exc)
        return
    # A mutation can still be a valid message: then it is a whole one, which encodes and decodes alike.
    again = codec.decode([zmq.Frame(f) for f in codec.encode(env)])
    assert type(again.msg) is type(env.msg) and again.msg == env.msg


@settings(FUZZ, max_examples=300)
@given(frames=hostile_frames)
def test_the_brokers_head_reader_raises_only_decode_error(frames):
    # The broker reads heads only (it routes bodies unread), so this path has its own guarantee.
    try:
        head, body = codec.read_head(frames)
    except DecodeError:
        return
    assert isinstance(head.kind, str) and isinstance(head.src, str) and isinstance(body, dict)


# --------------------------------------------------------------------------- #
# The broker under fire


def _barrage(count: int, name: str) -> list[list[bytes]]:
    """``count`` hostile messages, the same every run: mutations of every type, from ``name``,
    addressed to the scheduler, the broker itself, a topic, nobody, and the sender."""
    out: list[list[bytes]] = []
    destinations = st.sampled_from(["scheduler", "broker", "#job/x/progress", "nobody", name])

    @st.composite
    def addressed(draw) -> list[bytes]:
        msg = draw(any_message)
        frames = as_bytes(codec.encode(Envelope(msg, name, draw(destinations), draw(st.integers(1, 2**31)))))
        return draw(st.one_of(st.just(frames), tree_mutation(frames), byte_mutation(frames), hostile_frames))

    @settings(FUZZ, max_examples=count, phases=[Phase.generate])
    @given(frames=addressed())
    def collect(frames):
        out.append(frames)

    collect()
    return [frames for frames in out if frames]  # ZeroMQ has no message of no frames


def _hello(name: str, role: Role = Role.frontend) -> list[bytes]:
    hello = Hello(role=role, incarnation=uuid.uuid4().hex, capabilities=Capabilities(pid=os.getpid()))
    return as_bytes(codec.encode(Envelope(hello, name, "broker", 1)))


def _is_error(frames: list[bytes]) -> bool:
    """A reply from the broker; what came back from the sender's own mutated messages may be garbage."""
    try:
        return isinstance(codec.decode(frames).msg, Error)
    except DecodeError:
        return False


def _broker_pid(log_text: str) -> int:
    found = re.findall(r"started broker \(pid (\d+)\)", log_text)
    assert found, "no broker in the log"
    return int(found[-1])  # the cluster is shared: an earlier test may have restarted it


def test_the_broker_serves_a_valid_client_through_a_barrage(shared_cluster):
    """A registered peer and an anonymous one send a few hundred hostile messages while a client
    keeps submitting noop jobs and asking for the status: every one of its requests succeeds, the
    broker answers the garbage with errors, and no process dies or logs a crash."""
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    barrage: list[list[bytes]] = []
    log_before = shared_cluster.log.read_text(errors="replace")
    broker_pid = _broker_pid(log_before)

    async def fuzz(ctx: zmq.asyncio.Context) -> int:
        registered = ctx.socket(zmq.DEALER)
        registered.setsockopt(zmq.ROUTING_ID, name.encode())
        anonymous = ctx.socket(zmq.DEALER)
        for sock in (registered, anonymous):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(shared_cluster.router)
        await registered.send_multipart(_hello(name))
        assert isinstance(codec.decode(await asyncio.wait_for(registered.recv_multipart(), 10)).msg, Welcome)
        errors = 0
        for i, frames in enumerate(barrage):
            await (anonymous if i % 4 == 3 else registered).send_multipart(frames)
            if i % 20 == 19:
                await asyncio.sleep(0.05)  # let the client's requests interleave with the barrage
            for sock in (registered, anonymous):
                while await sock.poll(0):
                    errors += _is_error(await sock.recv_multipart())
        await asyncio.sleep(0.5)
        for sock in (registered, anonymous):
            while await sock.poll(100):
                errors += _is_error(await sock.recv_multipart())
            sock.close()
        return errors

    async def serve_a_client(started: asyncio.Event, done: asyncio.Event) -> list[str]:
        outcomes = []
        async with shared_cluster.client() as client:
            # A first job before the barrage: the runner's cold start (importing torch) is not what is measured.
            await client.generate(JobSpec(model="noop", prompt="warm up", steps=1, previews=False), timeout=60)
            started.set()
            while True:
                after = done.is_set()  # the last round starts after the barrage has ended
                job = JobSpec(model="noop", prompt="still here", steps=1, previews=False)
                result = await client.generate(job, timeout=30)
                status = await client.status()
                outcomes.append(f"{result.job.state.value}/{len(status.runners)}")
                if after:
                    return outcomes

    async def go():
        ctx = zmq.asyncio.Context()
        started, done = asyncio.Event(), asyncio.Event()
        client_task = asyncio.create_task(serve_a_client(started, done))
        # Drawn while the client warms up: both take seconds, and they use different processes.
        barrage.extend(await asyncio.to_thread(_barrage, 300, name))
        await asyncio.wait_for(started.wait(), 60)
        try:
            errors = await fuzz(ctx)
        finally:
            done.set()
        outcomes = await client_task
        ctx.term()
        return errors, outcomes

    errors, outcomes = run(go(), timeout=90)
    # Every job done, and the one runner is still the only one the scheduler knows.
    assert len(outcomes) >= 3 and set(outcomes) == {"done/1"}, outcomes
    assert errors >= len(barrage) // 4  # the garbage was answered, not swallowed
    os.kill(broker_pid, 0)  # the same broker process, alive
    new = shared_cluster.log.read_text(errors="replace")[len(log_before):]
    assert "started broker" not in new
    assert "failed to handle a message" not in new and "Traceback" not in new, new[-3000:]
    assert not re.search(r"exited with|restarting| joined \(", new), new[-3000:]  # no death, no phantom runner


def _dealer(ctx: zmq.Context, endpoint: str, name: str | None = None, *, reads: bool = True,
            role: Role = Role.frontend) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    if name is not None:
        sock.setsockopt(zmq.ROUTING_ID, name.encode())
    if not reads:  # the smallest queues there are, so that they fill up fast
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 1024)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    if name is not None:
        sock.send_multipart(_hello(name, role))
        if reads:
            assert isinstance(codec.decode(sock.recv_multipart()).msg, Welcome)
    return sock


def test_a_peer_that_never_reads_cannot_stall_the_broker(monkeypatch):
    """Peers that never read fill their queues: one flooding garbage (its error replies pile up),
    one being sent to. The broker must not block on either: it drops replies to the first, tells
    senders to the second that it is busy, and keeps routing for everyone else. (It used to block
    in a send, for good, for every peer.)"""
    monkeypatch.setattr(broker_module, "HWM", 20)  # the real 100 000 takes longer to fill, not differently
    ctx = zmq.Context()
    try:
        with broker_thread(heartbeat_s=5.0) as (b, thread):
            flood = 20_000  # far beyond its queues and the kernel's buffers
            sink = _dealer(ctx, b.router_endpoint, reads=False)
            for _ in range(flood):
                sink.send_multipart([MAGIC, b"\xc1"])
            eventually(lambda: b.stats.rejected >= flood, timeout=30)  # else it stalled

            a = _dealer(ctx, b.router_endpoint, "a")
            deaf = _dealer(ctx, b.router_endpoint, "deaf", reads=False)
            eventually(lambda: b"deaf" in b.peers, timeout=10)
            for i in range(flood):
                a.send_multipart(as_bytes(codec.encode(Envelope(Heartbeat(), "a", "deaf", i))))
            busy = codec.decode(a.recv_multipart()).msg
            assert isinstance(busy, Error) and busy.code.value == "busy" and "deaf" in busy.message

            c = _dealer(ctx, b.router_endpoint, "c")
            c.send_multipart(as_bytes(codec.encode(Envelope(Heartbeat(), "c", "a", 1))))
            while True:  # a's queue holds more busy replies first
                got = codec.decode(a.recv_multipart())
                if got.src == "c":
                    break
            assert isinstance(got.msg, Heartbeat)
            for sock in (sink, a, deaf, c):
                sock.close()
    finally:
        ctx.term()
    assert not thread.is_alive()  # stopped within 30 s, whatever backlog a busy machine still had


def test_only_the_broker_may_announce_peers():
    """PeerUp and PeerDown steer the scheduler (a runner to use, one gone): a peer that sends them
    is refused, and the scheduler never sees them. The barrage above found a phantom runner this way."""
    ctx = zmq.Context()
    try:
        with broker_thread(heartbeat_s=5.0) as (b, _):
            scheduler = _dealer(ctx, b.router_endpoint, "scheduler", role=Role.scheduler)
            liar = _dealer(ctx, b.router_endpoint, "liar")
            up = codec.decode(scheduler.recv_multipart()).msg  # the broker's own word on the newcomer
            assert isinstance(up, messages.PeerUp) and up.name == "liar" and up.role is Role.frontend
            lies = [messages.PeerUp(name="runner-ghost", role=Role.runner, capabilities=Capabilities(pid=2)),
                    messages.PeerDown(name="runner-real", role=Role.runner, reason="made up"),
                    Welcome(heartbeat_s=0.01)]
            for i, lie in enumerate(lies, 1):
                liar.send_multipart(as_bytes(codec.encode(Envelope(lie, "liar", "scheduler", i))))
                refusal = codec.decode(liar.recv_multipart())
                assert isinstance(refusal.msg, Error) and refusal.msg.code.value == "bad_request"
                assert refusal.corr == i and lie.kind in refusal.msg.message
            liar.send_multipart(as_bytes(codec.encode(Envelope(Heartbeat(), "liar", "scheduler", 9))))
            assert isinstance(codec.decode(scheduler.recv_multipart()).msg, Heartbeat)  # nothing came before it
            for sock in (scheduler, liar):
                sock.close()
    finally:
        ctx.term()


@pytest.fixture
def thread_broker():
    with broker_thread(heartbeat_s=2.0) as (b, _):
        yield b


@pytest.mark.parametrize("name", ["broker", "a b", "x" * 129, "ñame", "#job/x/state", "tab\there"])
def test_a_name_that_cannot_be_a_peers_is_refused_at_hello(thread_broker, caplog, name):
    """PeerUp carries the name as a Name: one that is not used to fail there, after the Welcome, with a
    traceback in the broker's log and no word to the schedulers. "broker" would pass for the broker."""
    ctx = zmq.Context()
    try:
        scheduler = _dealer(ctx, thread_broker.router_endpoint, "scheduler", role=Role.scheduler)
        impostor = ctx.socket(zmq.DEALER)
        impostor.setsockopt(zmq.ROUTING_ID, name.encode())
        impostor.setsockopt(zmq.RCVTIMEO, 10_000)
        impostor.setsockopt(zmq.LINGER, 0)
        impostor.connect(thread_broker.router_endpoint)
        impostor.send_multipart(_hello(name))
        refusal = codec.decode(impostor.recv_multipart()).msg
        assert isinstance(refusal, Error) and refusal.code.value == "bad_request" and "name" in refusal.message
        assert name.encode() not in thread_broker.peers
        _dealer(ctx, thread_broker.router_endpoint, "next")
        while True:  # the scheduler hears of the next peer, and of no other before it
            heard = codec.decode(scheduler.recv_multipart()).msg
            if isinstance(heard, messages.PeerUp):
                break
        assert heard.name == "next"
    finally:
        ctx.destroy(linger=0)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_an_actor_takes_a_reply_only_from_whom_it_asked(thread_broker):
    """Message ids are small counters: a peer that guesses one must not answer for another, nor
    make an actor register again by claiming to be the broker's refusal."""
    from actors.actor import Actor

    class Asker(Actor):
        role = Role.frontend

    def status_of(queued: str) -> messages.ClusterStatus:
        return messages.ClusterStatus(runners=[], queued=[queued], counts={})

    async def go():
        ctx = zmq.asyncio.Context()
        peers = {}
        for name in ("slow", "mallory"):
            sock = peers[name] = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, name.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(thread_broker.router_endpoint)
            await sock.send_multipart(_hello(name))
            assert isinstance(codec.decode(await sock.recv_multipart()).msg, Welcome)
        asker = Asker("asker", thread_broker.router_endpoint, heartbeat_s=5.0, context=ctx)
        await asker.start(timeout=10)
        asking = asyncio.create_task(asker.ask("slow", messages.GetStatus(), timeout=10))
        question = codec.decode(await asyncio.wait_for(peers["slow"].recv_multipart(), 10))

        def forged(msg: Wire, corr: int | None) -> list[bytes]:
            return as_bytes(codec.encode(Envelope(msg, "mallory", "asker", 99, corr)))

        # Replies of the type asked for: only who sent them tells the forged one from the real one.
        await peers["mallory"].send_multipart(forged(status_of("forged"), question.id))
        await peers["mallory"].send_multipart(forged(Error(code="not_registered", message="say hello"), None))
        # A request after the forgeries, on the same socket: the asker reads in order, so its answer
        # (an asker handles no GetStatus) means both forgeries were read; it is the first thing back.
        await peers["mallory"].send_multipart(as_bytes(codec.encode(
            Envelope(messages.GetStatus(), "mallory", "asker", 100))))
        round_trip = codec.decode(await asyncio.wait_for(peers["mallory"].recv_multipart(), 10))
        still_waiting, registering = not asking.done(), asker._registering
        await peers["slow"].send_multipart(as_bytes(codec.encode(
            Envelope(status_of("from-slow"), "slow", "asker", 1, question.id))))
        answer = await asking
        await asker.close(drain_timeout=1)
        for sock in peers.values():
            sock.close()
        ctx.term()
        return round_trip, still_waiting, registering, answer

    round_trip, still_waiting, registering, answer = run(go(), timeout=30)
    assert round_trip.src == "asker" and round_trip.corr == 100 and isinstance(round_trip.msg, Error)
    assert still_waiting and registering is None
    assert answer == status_of("from-slow")


def test_what_a_peer_sends_cannot_forge_a_line_in_the_brokers_log(thread_broker, caplog):
    ctx = zmq.Context()
    try:
        peer = _dealer(ctx, thread_broker.router_endpoint)
        peer.send_multipart([MAGIC, msgpack.packb(["ok\n2099-01-01 INFO broker: all is well", 1, None, "a",
                                                   "broker", {}])])
        assert isinstance(codec.decode(peer.recv_multipart()).msg, Error)
    finally:
        ctx.destroy(linger=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "atelier.broker"]
    assert any("all is well" in line for line in lines) and not any("\n" in line for line in lines)
