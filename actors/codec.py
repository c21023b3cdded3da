"""Turns messages into ZeroMQ frames and back.

Frames: ``[MAGIC, head, *blobs]``. ``head`` is a msgpack array
``[kind, id, corr, src, dst, body]``; every ``Blob`` field of the body is
replaced by a msgpack extension that names its frame by index, so bytes never
sit inside the head and large ones are never copied (pyzmq's copy threshold is
64 KiB: ``send_multipart(copy=False)`` copies smaller frames, shares larger).

A destination starting with ``#`` is a topic: the broker publishes such a
message on its XPUB instead of routing it. No pickle, anywhere.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
from pydantic import ValidationError

from actors.messages import BROKER as BROKER  # the broker's name, for the peers that address it
from actors.messages import CLUSTER_TOPIC, MESSAGE_ADAPTER
from atelier.jobs import Wire

MAGIC = b"ATL1"
PUBLISH = "#"
SCHEDULER = "scheduler"

BLOB_EXT = 1
MAX_FRAMES = 64
MAX_HEAD_BYTES = 1 << 20  # bodies are small; anything large belongs in a blob


class DecodeError(Exception):
    """The frames are not a valid atelier message. Carries what could be read, for the reply."""

    def __init__(self, message: str, *, src: str | None = None, id: int | None = None,
                 field: str | None = None, too_large: bool = False):
        super().__init__(message)
        self.src = src
        self.id = id
        self.field = field
        self.too_large = too_large


@dataclass(slots=True)
class Envelope:
    msg: Any  # one of the types in actors.messages
    src: str
    dst: str
    id: int
    corr: int | None = None


@dataclass(slots=True)
class Head:
    """The routing part of a message, read without validating the body (what the broker needs)."""

    kind: str
    id: int
    corr: int | None
    src: str
    dst: str
    fields: int = -1  # how many fields the body has (read_route counts them; -1: not counted)


class _BlobRef:
    """What a Blob field serialises to inside the head; msgpack's ``default`` makes it an extension."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _pack_ref(obj: Any) -> msgpack.ExtType:
    if isinstance(obj, _BlobRef):
        return msgpack.ExtType(BLOB_EXT, struct.pack(">H", obj.index))
    raise TypeError(f"cannot put {type(obj).__name__} on the wire")


def encode(env: Envelope) -> list[Any]:
    blobs: list[Any] = []

    def to_frame(value: Any) -> _BlobRef:
        blobs.append(value)
        return _BlobRef(len(blobs) - 1)

    body = env.msg.model_dump(mode="python", exclude={"kind"}, context={"blob": to_frame})
    head = msgpack.packb([env.msg.kind, env.id, env.corr, env.src, env.dst, body], use_bin_type=True,
                         default=_pack_ref)
    return [MAGIC, head, *blobs]


def _check_framing(frames: Sequence[Any]) -> None:
    """The magic frame, a head, and no more blob frames than a message may carry."""
    if len(frames) < 2:
        raise DecodeError(f"expected at least 2 frames, got {len(frames)}")
    if len(frames) > 2 + MAX_FRAMES:
        raise DecodeError(f"too many frames: {len(frames)} (at most {2 + MAX_FRAMES})", too_large=True)
    if _bytes(frames[0]) != MAGIC:
        raise DecodeError("not an atelier frame (bad magic)")


def read_head(frames: Sequence[Any]) -> tuple[Head, list]:
    """Check the framing and unpack the head. Returns the head and the unvalidated body."""
    _check_framing(frames)
    raw_head = frames[1]
    if len(_buffer(raw_head)) > MAX_HEAD_BYTES:
        raise DecodeError(f"head larger than {MAX_HEAD_BYTES} bytes", too_large=True)
    blobs = [_buffer(f) for f in frames[2:]]

    def ext_hook(code: int, data: bytes) -> Any:
        if code != BLOB_EXT or len(data) != 2:
            raise ValueError(f"unknown msgpack extension {code}")
        index = struct.unpack(">H", data)[0]
        if index >= len(blobs):
            raise ValueError(f"blob reference {index} but only {len(blobs)} blob frames")
        return blobs[index]

    try:
        head = msgpack.unpackb(_buffer(raw_head), raw=False, ext_hook=ext_hook, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types for garbage
        # Some carry no text (StackError: nested too deeply): the type then says what went wrong.
        raise DecodeError(f"head is not msgpack: {str(exc) or type(exc).__name__}") from None
    if not (isinstance(head, list) and len(head) == 6):
        raise DecodeError("head must be [kind, id, corr, src, dst, body]")
    kind, msg_id, corr, src, dst, body = head
    if not (isinstance(kind, str) and isinstance(msg_id, int) and isinstance(src, str)
            and isinstance(dst, str) and (corr is None or isinstance(corr, int))):
        raise DecodeError("head fields have the wrong types",
                          src=src if isinstance(src, str) else None,
                          id=msg_id if isinstance(msg_id, int) else None)
    if not isinstance(body, dict):
        raise DecodeError("body must be a map", src=src, id=msg_id)
    return Head(kind, msg_id, corr, src, dst), body


def read_route(frames: Sequence[Any]) -> Head:
    """What the broker needs to route a message: the framing checked and the head's routing fields read,
    the body walked over as well-formed msgpack but not built into objects (that costs 4x as much, and
    the receiver, which decodes and validates every message in full, builds it anyway).

    Trust: the broker vouches for ``src`` (it is the sender's registered name) and, for topics, for the
    publisher's role; never for the body. A body that is not a valid message is refused by the receiver
    (``decode``), which answers the sender with the field that is wrong."""
    _check_framing(frames)
    raw_head = _buffer(frames[1])
    size = len(raw_head)
    if size > MAX_HEAD_BYTES:
        raise DecodeError(f"head larger than {MAX_HEAD_BYTES} bytes", too_large=True)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(size, 1))
    try:
        unpacker.feed(raw_head)
        if unpacker.read_array_header() != 6:
            raise ValueError("not an array of 6")
        kind, msg_id, corr, src, dst = (unpacker.unpack() for _ in range(5))
        fields = unpacker.read_map_header()
        for _ in range(2 * fields):
            unpacker.skip()
        complete = unpacker.tell() == size
    except Exception as exc:  # msgpack raises a zoo of types for garbage
        raise DecodeError(f"head is not [kind, id, corr, src, dst, body] in msgpack: "
                          f"{str(exc) or type(exc).__name__}") from None
    if not complete:
        raise DecodeError("head has bytes after its end")
    if not (isinstance(kind, str) and isinstance(msg_id, int) and isinstance(src, str)
            and isinstance(dst, str) and (corr is None or isinstance(corr, int))):
        raise DecodeError("head fields have the wrong types",
                          src=src if isinstance(src, str) else None,
                          id=msg_id if isinstance(msg_id, int) else None)
    return Head(kind, msg_id, corr, src, dst, fields)


def decode(frames: Sequence[Any]) -> Envelope:
    head, body = read_head(frames)
    body["kind"] = head.kind
    try:
        msg = MESSAGE_ADAPTER.validate_python(body)
    except ValidationError as exc:
        errors = _field_errors(exc, head.kind)
        raise DecodeError("; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in errors[:5]),
                          src=head.src, id=head.id, field=errors[0][0] if errors else None) from None
    return Envelope(msg, head.src, head.dst, head.id, head.corr)


def _field_errors(exc: ValidationError, kind: str) -> list[tuple[str, str]]:
    """(dotted field path, message) pairs, without pydantic's union tag in front."""
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = list(err["loc"])
        if loc and loc[0] == kind:
            loc = loc[1:]
        out.append((".".join(str(p) for p in loc), err["msg"]))
    return out


def topic_of(msg: Wire) -> str:
    """The XPUB topic of an event, as its route declares it; subscribers filter by prefix (``job/<id>/``)."""
    route = getattr(msg, "route", None)
    if route is None or route.topic is None:
        raise TypeError(f"{type(msg).__name__} is not an event")
    if route.topic == CLUSTER_TOPIC:
        return f"{CLUSTER_TOPIC}/{msg.event.value}"  # type: ignore[attr-defined]
    return f"job/{msg.job_id}/{route.topic}"  # type: ignore[attr-defined]  # every other event is a job's


def _buffer(frame: Any) -> Any:
    # zmq.Frame exposes .buffer (a memoryview that keeps the frame alive).
    return frame.buffer if hasattr(frame, "buffer") else frame


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
