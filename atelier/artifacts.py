"""Where finished outputs (and checkpoints, LoRAs) are kept: a local folder (``LocalStore``) or an
S3-compatible bucket (``S3Store``), one interface the scheduler calls (``make_store``).

Every failure is a ``StoreError`` (an OSError) whose message is public: what is wrong, never a secret.
A URI comes back from the journal, so each store acts only on URIs inside itself."""

from __future__ import annotations

import contextlib
import errno
import mimetypes
import os
import re
import shutil
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import quote, unquote, urlparse

from atelier.config import Config, StoreConfig
from atelier.jobs import Artifact

# Keys of objects other than job outputs: checkpoints/<job>/<step>.safetensors, loras/<user>/<name>.safetensors.
_KEY = re.compile(r"^(checkpoints|loras)/[A-Za-z0-9][A-Za-z0-9._-]{0,127}/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
OUTPUTS = "outputs/"  # job outputs' keys in a bucket start with this (retention sweeps only these)


class StoreError(OSError):
    """The store cannot do what was asked; the message is safe to show a user."""


def check_key(key: str) -> str:
    """A key for ``put``: checkpoints/<job>/<file> or loras/<user>/<file>, no ``..``, no other shape."""
    if not _KEY.match(key) or ".." in key:
        raise ValueError(f"bad store key {key!r}: it is checkpoints/<job>/<file> or loras/<user>/<file>")
    return key


_EXTENSIONS = {"image/png": ".png", "image/webp": ".webp", "image/jpeg": ".jpg", "video/mp4": ".mp4",
               "image/gif": ".gif", "audio/wav": ".wav", "audio/flac": ".flac"}


def extension_for(media_type: str) -> str:
    return _EXTENSIONS.get(media_type) or mimetypes.guess_extension(media_type) or ".bin"


def media_type_for(name: str) -> str:
    """The media type of a stored artifact, by its extension (the platform's table may lack .webp)."""
    extension = "." + name.rsplit(".", 1)[-1].lower()
    found = next((media for media, ext in _EXTENSIONS.items() if ext == extension), None)
    return found or mimetypes.guess_type(name)[0] or "application/octet-stream"


class LocalStore:
    """Outputs as files ``<root>/<job id>-<n><ext>``, other objects under ``<root>/<key>``."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0, max_age_days: float | None = None,
                 max_bytes: int | None = None):
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.max_age_days = max_age_days
        self.max_bytes = max_bytes
        for stray in self.root.glob("*.part"):  # half-written by a process that died mid-write
            with contextlib.suppress(OSError):
                stray.unlink()

    def put_all(self, job_id: str, artifacts: Sequence[Artifact]) -> list[str]:
        """Writes each output under ``<root>/<job id>-<n><ext>``; returns their URIs. Raises StoreError
        (ENOSPC where the folder has less than ``min_free_bytes`` to spare), leaving nothing behind."""
        if not artifacts:
            return []
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO, f"the artifact folder is not usable: {exc.strerror}") from None
        needed = sum(len(artifact.data) for artifact in artifacts)
        if free - needed < self.min_free_bytes:
            raise StoreError(errno.ENOSPC, f"{free >> 20} MiB free in the artifact folder, "
                                        f"less than the {self.min_free_bytes >> 20} MiB kept spare")
        return [_write(self.root / f"{job_id}-{index}{extension_for(artifact.media_type)}", artifact.data)
                for index, artifact in enumerate(artifacts)]

    def put(self, key: str, data: bytes, media_type: str = "application/octet-stream") -> str:
        """Writes one object (a checkpoint, a LoRA) under its key; returns its URI."""
        path = self.root / check_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write(path, data)

    def signed_url(self, uri: str) -> str | None:
        return None  # local outputs are served by the artifact route itself

    def sweep(self, now: float | None = None) -> list[str]:
        """Retention of job outputs (the files at the top of the folder; checkpoints and LoRAs live in
        folders below and are never swept): older than max_age_days, then the oldest until the rest fit
        in max_bytes. Returns the URIs deleted."""
        now = time.time() if now is None else now
        if not self.root.is_dir():
            return []
        files = []
        for path in self.root.iterdir():
            if path.is_file() and not path.name.endswith(".part"):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    files.append((st.st_mtime, st.st_size, path))
        doomed = _doomed(files, now, self.max_age_days, self.max_bytes)
        gone = []
        for path in doomed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                gone.append(path.resolve().as_uri())
        return gone

    def delete(self, uris: Sequence[str]) -> int:
        """Removes stored artifacts (their jobs left the journal); returns how many were there."""
        removed = 0
        for uri in uris:
            path = self._path(uri)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def _path(self, uri: str) -> Path | None:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            return None
        path = Path(unquote(parsed.path))
        if not path.resolve().is_relative_to(self.root.resolve()):
            return None  # a URI is data from the journal: never touch anything outside the store
        return path

    def read(self, uri: str) -> bytes | None:
        """A stored artifact's bytes, or None where it is gone (deleted, or not in this store)."""
        path = self._path(uri)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError:
            return None


def _write(path: Path, data: bytes) -> str:
    """Writes a file whole through a .part beside it (readers never see half a file); its URI."""
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(exc.errno or errno.EIO, f"cannot write to the artifact folder: {exc.strerror}") from None
    return path.resolve().as_uri()


def _doomed(objects: list[tuple[float, int, object]], now: float, max_age_days: float | None,
            max_bytes: int | None) -> list:
    """Of (modified, size, handle): the handles retention deletes, the expired then the oldest over budget."""
    objects = sorted(objects, key=lambda o: o[0])
    doomed = []
    if max_age_days is not None:
        before = now - max_age_days * 86400
        doomed = [o for o in objects if o[0] < before]
        objects = [o for o in objects if o[0] >= before]
    if max_bytes is not None:
        total = sum(o[1] for o in objects)
        while objects and total > max_bytes:
            oldest = objects.pop(0)
            total -= oldest[1]
            doomed.append(oldest)
    return [o[2] for o in doomed]


class S3Store:
    """Objects in an S3-compatible bucket: outputs under ``<prefix>outputs/<job id>-<n><ext>``, other
    objects under ``<prefix><key>``; URIs are ``s3://<bucket>/<key>``; users get pre-signed GET URLs."""

    def __init__(self, config: StoreConfig, *, client=None):
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.max_age_days = config.max_age_days
        self.max_bytes = config.max_bytes
        self.client = client or _client(config)

    # -- the interface -- #

    def put_all(self, job_id: str, artifacts: Sequence[Artifact]) -> list[str]:
        """Uploads each output; returns their URIs. On a failure the ones already uploaded are removed."""
        uris: list[str] = []
        try:
            for index, artifact in enumerate(artifacts):
                key = f"{self.prefix}{OUTPUTS}{job_id}-{index}{extension_for(artifact.media_type)}"
                # bytes(): an artifact that came over the wire holds a buffer, which botocore refuses.
                self._call("upload", self.client.put_object, Bucket=self.bucket, Key=key,
                           Body=bytes(artifact.data), ContentType=artifact.media_type)
                uris.append(self._uri(key))
        except StoreError:
            with contextlib.suppress(StoreError):
                self.delete(uris)
            raise
        return uris

    def put(self, key: str, data: bytes, media_type: str = "application/octet-stream") -> str:
        full = self.prefix + check_key(key)
        self._call("upload", self.client.put_object, Bucket=self.bucket, Key=full, Body=bytes(data),
                   ContentType=media_type)
        return self._uri(full)

    def read(self, uri: str) -> bytes | None:
        """An object's bytes, or None where it is gone or not in this bucket; StoreError where S3 fails."""
        key = self._key(uri)
        if key is None:
            return None
        try:
            answer = self._call("download", self.client.get_object, Bucket=self.bucket, Key=key)
        except _Missing:
            return None
        return answer["Body"].read()

    def delete(self, uris: Sequence[str]) -> int:
        keys = [key for uri in uris if (key := self._key(uri)) is not None]
        removed = 0
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = keys[start:start + 1000]
            answer = self._call("delete", self.client.delete_objects, Bucket=self.bucket,
                                Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": False})
            removed += len(answer.get("Deleted", []))
        return removed

    def signed_url(self, uri: str) -> str | None:
        """A pre-signed GET URL for the object, valid url_expiry_s (computed locally: no request)."""
        key = self._key(uri)
        if key is None:
            return None
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                  ExpiresIn=self.config.url_expiry_s)

    def sweep(self, now: float | None = None) -> list[str]:
        """Retention of job outputs (the ``outputs/`` keys only), as LocalStore.sweep."""
        now = time.time() if now is None else now
        if self.max_age_days is None and self.max_bytes is None:
            return []
        objects = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + OUTPUTS))
        while True:
            try:
                page = self._call("list", next, pages)
            except StopIteration:
                break
            except _Missing:
                break
            for obj in page.get("Contents", []):
                objects.append((obj["LastModified"].timestamp(), obj["Size"], obj["Key"]))
        uris = [self._uri(key) for key in _doomed(objects, now, self.max_age_days, self.max_bytes)]
        self.delete(uris)
        return uris

    def check(self) -> None:
        """Raises StoreError where the bucket cannot be reached (startup, health)."""
        self._call("reach", self.client.head_bucket, Bucket=self.bucket)

    # -- helpers -- #

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{quote(key)}"

    def _key(self, uri: str) -> str | None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or parsed.netloc != self.bucket:
            return None
        key = unquote(parsed.path.lstrip("/"))
        if not key.startswith(self.prefix) or ".." in key.split("/"):
            return None  # a URI is data from the journal: only this bucket and prefix
        return key

    def _call(self, what: str, fn, *args, **kwargs):
        import botocore.exceptions as bce

        try:
            return fn(*args, **kwargs)
        except StopIteration:
            raise
        except bce.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound") and what in ("download", "list") and code != "NoSuchBucket":
                raise _Missing() from None
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and what == "reach"):
                raise StoreError(errno.ENOENT, f"S3 bucket {self.bucket!r} does not exist") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StoreError(errno.EACCES, f"S3 refused the {what} ({code}): check the store's "
                                               "credentials and their rights on the bucket") from None
            raise StoreError(errno.EIO, f"S3 {what} failed: {code or 'error'}") from None
        except (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ReadTimeoutError,
                bce.ConnectionClosedError) as exc:
            raise StoreError(errno.EHOSTUNREACH, f"S3 is unreachable: {type(exc).__name__} "
                                                 f"({_endpoint(self.config)})") from None
        except bce.NoCredentialsError:
            raise StoreError(errno.EACCES, "no S3 credentials: set [store] access_key_id and "
                                           "secret_access_key, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
        except bce.BotoCoreError as exc:
            raise StoreError(errno.EIO, f"S3 {what} failed: {type(exc).__name__}") from None


class _Missing(Exception):
    """The object (or listing) is not there: not a store failure."""


def _endpoint(config: StoreConfig) -> str:
    """The endpoint, as far as it is safe to say (no user info, no query)."""
    url = urlparse(config.endpoint or os.environ.get("AWS_ENDPOINT_URL", "") or "https://s3.amazonaws.com")
    return f"{url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}"


def _client(config: StoreConfig):
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError:
        raise StoreError(errno.ENOSYS, "[store] kind = \"s3\" needs boto3: pip install 'atelier[s3]'") from None
    secret = config.secret_access_key.get_secret_value() if config.secret_access_key is not None else None
    # Path-style addressing: S3-compatible servers (SeaweedFS, MinIO) rarely have per-bucket DNS names.
    # Short timeouts and few retries: a failing store is reported soon and retried by the scheduler.
    boto = BotoConfig(signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=5,
                      read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", endpoint_url=config.endpoint or None, region_name=config.region or None,
                        aws_access_key_id=config.access_key_id or None, aws_secret_access_key=secret,
                        config=boto)


def make_store(config: Config) -> LocalStore | S3Store:
    """The store the config asks for."""
    store = config.store
    if store.kind == "s3":
        return S3Store(store)
    return LocalStore(config.artifact_dir, min_free_bytes=config.scheduler.min_free_bytes,
                      max_age_days=store.max_age_days, max_bytes=store.max_bytes)
