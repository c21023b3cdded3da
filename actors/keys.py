"""CURVE keys: who may talk to the broker, under which names and roles, and encryption between hosts.

With ``[broker] curve = true`` the broker's ROUTER and XPUB sockets are CURVE servers, and a peer
gets in only with a key pair whose public half is in the broker's ``authorized`` folder (ZeroMQ's
ZAP handshake, before a single frame reaches atelier). Traffic is then encrypted too.

Each authorized key is also a grant: the roles and names its holder may register with, in the
file's ``metadata`` section (``roles = "loader runner"``, ``names = "loader-gpu1 runner-gpu1-*"``,
shell-style patterns). The broker refuses a Hello its key does not grant. ``atelier keys`` writes
them::

    atelier keys                                   broker.key(+_secret), peer.key(+_secret): the
                                                   host's all-roles pair (every part of `atelier up`)
    atelier keys --role scheduler --name sched     a pair that may only be the scheduler
    atelier keys --role node --name gpu1           the loader and runners of node gpu1 (--node N
                                                   names another node)
    atelier keys --role frontend --name web        HTTP, Discord, the CLI: any name but the scheduler's,
                                                   a loader's or a runner's

Across hosts: give each host ``broker.key`` and its own pair (copy ``gpu1.key*``), and set
``[broker] peer_key = "gpu1"`` there. The shared all-roles ``peer`` pair (and an authorized file
without metadata, from before grants) may still take any name and role: keep it on the broker's host.
The broker reads ``authorized`` again every few seconds: a key taken out of it is refused from then
on, and a peer registered with it is dropped (its next message is refused).
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth
from zmq.utils import z85

if TYPE_CHECKING:
    from atelier.config import Config

BROKER_KEY = "broker"
AUTHORIZED = "authorized"
ANY = "*"
# What ``atelier keys --role`` grants: (roles, names), with {node} filled in.
GRANTS = {
    "all": ((ANY,), (ANY,)),
    "scheduler": (("scheduler",), ("scheduler",)),
    "node": (("loader", "runner"), ("loader-{node}", "runner-{node}-*")),
    "frontend": (("frontend",), (ANY,)),
}


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


@dataclass(frozen=True)
class Grant:
    """What one authorized key may register as."""

    key_name: str  # the file it came from, for the log
    roles: tuple[str, ...]
    names: tuple[str, ...]  # shell-style patterns

    def allows(self, role: str, name: str) -> bool:
        return (ANY in self.roles or role in self.roles) and any(fnmatch.fnmatchcase(name, p) for p in self.names)

    @property
    def unbound(self) -> bool:
        return ANY in self.roles and ANY in self.names


def make(folder: Path, name: str = "peer", role: str | None = None, node: str | None = None) -> list[Path]:
    """Creates the broker's pair (once) and a pair ``name`` whose public key is authorized with the
    grant ``role`` (GRANTS; default "all" for a new pair); returns the files written. An existing pair
    is kept: making keys again never locks anyone out. Given a role, an existing grant is replaced."""
    if not name or BROKER_KEY == name or "/" in name or name.startswith(".") or not name.isprintable():
        raise ValueError(f"{name!r} cannot name a key pair")
    if role is not None and role not in GRANTS:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(GRANTS)}")
    if node is not None and role != "node":
        raise ValueError("--node goes with --role node")
    for path in (folder, folder / AUTHORIZED):
        private_folder(path)
    written = []
    for pair in (BROKER_KEY, name):
        if not (folder / f"{pair}.key_secret").exists():
            written += _create_pair(folder, pair)
    authorized = folder / AUTHORIZED / f"{name}.key"
    if role is not None or not authorized.exists():
        roles, names = GRANTS[role or "all"]
        public, _ = zmq.auth.load_certificate(folder / f"{name}.key")
        metadata = {"roles": " ".join(roles), "names": " ".join(n.format(node=node or name) for n in names)}
        _write_key(authorized, "Public", public, metadata=metadata)
        written.append(authorized)
    return written


class UnsafeFolder(ValueError):
    """A folder atelier would trust (keys, sockets) that another user owns or may write."""


def private_folder(path: Path) -> None:
    """Makes ``path`` (0700) or tightens an existing one of ours to 0700. One that another user owns
    is refused: whoever can write ``authorized`` can let themselves in, and whoever can enter the
    socket folder can connect."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise UnsafeFolder(f"{path} belongs to another user (uid {info.st_uid}): atelier keeps its keys and "
                           "sockets only in folders of the user it runs as")
    if info.st_mode & 0o077:
        path.chmod(0o700)


def check_folder(path: Path) -> None:
    """Refuses (UnsafeFolder) a keys folder another user owns or may write."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise UnsafeFolder(f"{path} belongs to another user (uid {info.st_uid}): the broker trusts no keys "
                           "from it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFolder(f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}), who could "
                           f"authorize themselves: chmod 700 {path}")


def _create_pair(folder: Path, name: str) -> list[Path]:
    public, secret = zmq.curve_keypair()
    public_path, secret_path = folder / f"{name}.key", folder / f"{name}.key_secret"
    _write_key(public_path, "Public", public)
    _write_key(secret_path, "Secret", public, secret)
    return [public_path, secret_path]


def _write_key(path: Path, kind: str, public: bytes, secret: bytes | None = None,
               metadata: dict[str, str] | None = None) -> None:
    """A key file in ZeroMQ's format (zmq.auth reads it). A secret one is 0600 from its first byte."""
    lines = [f"#   ****  Generated on {datetime.datetime.now()} by atelier  ****",
             f"#   ZeroMQ CURVE {kind} Certificate", "", "metadata"]
    lines += [f'    {key} = "{value}"' for key, value in (metadata or {}).items()]
    lines += ["curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    aside = path.with_name(path.name + ".new")
    aside.unlink(missing_ok=True)
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(aside, path)


def read_grant(path: Path) -> tuple[bytes, Grant]:
    """The public key (z85) in an authorized key file and what it grants. ValueError says what is wrong."""
    if path.is_symlink() or not path.is_file():
        raise ValueError("not a regular file")
    if path.stat().st_size > 64 << 10:
        raise ValueError("larger than a key file can be")
    public = None
    metadata: dict[str, str] = {}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if "=" not in text:
            section = text
            continue
        key, _, value = (part.strip() for part in text.partition("="))
        value = value.strip("'\"")
        if section == "curve" and key == "public-key":
            public = value.encode()
        elif section == "metadata":
            metadata[key] = value
    if public is None:
        raise ValueError("no public-key")
    try:
        if len(z85.decode(public)) != 32:
            raise ValueError
    except ValueError:
        raise ValueError("public-key is not a z85 CURVE key (40 characters)") from None
    roles = tuple(metadata.get("roles", ANY).split())
    names = tuple(metadata.get("names", ANY).split())
    if not roles or not names:
        raise ValueError("empty roles or names")
    return public, Grant(path.stem, roles, names)


def read_grants(folder: Path) -> tuple[dict[bytes, Grant], list[str]]:
    """Every valid key in ``folder`` with its grant, and a line for each file refused. One bad file
    costs only itself: the rest, and every removal, take effect."""
    grants: dict[bytes, Grant] = {}
    problems = []
    for path in sorted(folder.glob("*.key")):
        try:
            public, grant = read_grant(path)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        grants[public] = grant
    return grants, problems


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
    for path in (folder, authorized):
        check_folder(path)
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
