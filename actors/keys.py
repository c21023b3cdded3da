"""CURVE keys: who may talk to the broker, and encryption on the wire between hosts.

With ``[broker] curve = true`` the broker's ROUTER and XPUB sockets are CURVE servers, and a peer
gets in only with a key pair whose public half is in the broker's ``authorized`` folder (ZeroMQ's
ZAP handshake, before a single frame reaches atelier). Traffic is then encrypted too.

``atelier keys`` makes the folder (default ``<home>/keys``)::

    broker.key, broker.key_secret   the broker's pair; every peer needs broker.key
    peer.key, peer.key_secret       a pair for this host's peers (``--name`` makes others)
    authorized/peer.key             the public keys the broker lets in

Across hosts: give each host ``broker.key`` and its own pair (``atelier keys --name gpu-2`` on the
broker's host, then copy ``gpu-2.key*``), and set ``[broker] peer_key = "gpu-2"`` there. The broker
reads ``authorized`` again every few seconds: a key taken out of it is refused from the next
connection on.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth

if TYPE_CHECKING:
    from atelier.config import Config

BROKER_KEY = "broker"
AUTHORIZED = "authorized"


class CurveKeyError(Exception):
    """CURVE is asked for and a key it needs is missing or unreadable; says which and how to make it."""


@dataclass(frozen=True)
class PeerKeys:
    """What a peer's sockets need: its own pair and the broker's public key."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


@dataclass(frozen=True)
class BrokerKeys:
    public: bytes
    secret: bytes
    authorized: Path  # the folder of public keys let in

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def make(folder: Path, name: str = "peer") -> list[Path]:
    """Creates the broker's pair (once) and a pair ``name`` whose public key is authorized; returns
    the files written. An existing pair is kept: making keys again never locks anyone out."""
    if not name or BROKER_KEY == name or "/" in name or name.startswith("."):
        raise ValueError(f"{name!r} cannot name a key pair")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    (folder / AUTHORIZED).mkdir(exist_ok=True, mode=0o700)
    written = []
    for pair in (BROKER_KEY, name):
        if not (folder / f"{pair}.key_secret").exists():
            public, secret = zmq.auth.create_certificates(folder, pair)
            Path(secret).chmod(0o600)
            written += [Path(public), Path(secret)]
    authorized = folder / AUTHORIZED / f"{name}.key"
    if not authorized.exists():
        shutil.copyfile(folder / f"{name}.key", authorized)
        written.append(authorized)
    return written


def folder_of(config: Config) -> Path:
    return Path(config.broker.keys).expanduser() if config.broker.keys else config.home / "keys"


def for_broker(config: Config) -> BrokerKeys | None:
    if not config.broker.curve:
        return None
    folder = folder_of(config)
    public, secret = _pair(folder, BROKER_KEY)
    authorized = folder / AUTHORIZED
    if not authorized.is_dir():
        raise CurveKeyError(f"no {authorized} folder of authorized peer keys: run `atelier keys`")
    return BrokerKeys(public, secret, authorized)


def for_peer(config: Config) -> PeerKeys | None:
    if not config.broker.curve:
        return None
    folder = folder_of(config)
    public, secret = _pair(folder, config.broker.peer_key)
    server = _public(folder / f"{BROKER_KEY}.key")
    return PeerKeys(public, secret, server)


def _pair(folder: Path, name: str) -> tuple[bytes, bytes]:
    path = folder / f"{name}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"CURVE is on ([broker] curve) but the key pair {path} cannot be read ({exc}): "
                        f"run `atelier keys{'' if name in ('peer', BROKER_KEY) else ' --name ' + name}`") from None
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key")
    return public, secret


def _public(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"CURVE is on but the broker's public key {path} cannot be read ({exc}): copy it "
                        "from the broker's host (atelier keys makes it there)") from None
    return public
