"""Where finished outputs are kept: a local folder for now (S3-compatible stores come later)."""

from __future__ import annotations

import contextlib
import errno
import mimetypes
import os
import shutil
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlparse

from atelier.jobs import Artifact

_EXTENSIONS = {"image/png": ".png", "image/webp": ".webp", "image/jpeg": ".jpg", "video/mp4": ".mp4",
               "image/gif": ".gif", "audio/wav": ".wav", "audio/flac": ".flac"}


def extension_for(media_type: str) -> str:
    return _EXTENSIONS.get(media_type) or mimetypes.guess_extension(media_type) or ".bin"


def media_type_for(name: str) -> str:
    """The media type of a stored artifact, by its extension (the platform's table may lack .webp)."""
    extension = "." + name.rsplit(".", 1)[-1].lower()
    found = next((media for media, ext in _EXTENSIONS.items() if ext == extension), None)
    return found or mimetypes.guess_type(name)[0] or "application/octet-stream"


class ArtifactStore:
    def __init__(self, root: Path, *, min_free_bytes: int = 0):
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        for stray in self.root.glob("*.part"):  # half-written by a process that died mid-write
            with contextlib.suppress(OSError):
                stray.unlink()

    def put_all(self, job_id: str, artifacts: Sequence[Artifact]) -> list[str]:
        """Writes each output under ``<root>/<job id>-<n><ext>``; returns their URIs. Raises OSError
        (ENOSPC where the folder has less than ``min_free_bytes`` to spare), leaving nothing behind."""
        if not artifacts:
            return []
        self.root.mkdir(parents=True, exist_ok=True)
        needed = sum(len(artifact.data) for artifact in artifacts)
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise OSError(errno.ENOSPC, f"{free >> 20} MiB free in the artifact folder, "
                                        f"less than the {self.min_free_bytes >> 20} MiB kept spare")
        uris = []
        for index, artifact in enumerate(artifacts):
            path = self.root / f"{job_id}-{index}{extension_for(artifact.media_type)}"
            tmp = path.with_suffix(path.suffix + ".part")
            try:
                with open(tmp, "wb") as f:
                    f.write(artifact.data)
                os.replace(tmp, path)  # readers never see half a file
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            uris.append(path.resolve().as_uri())
        return uris

    def put(self, key: str, data: bytes, media_type: str = "application/octet-stream") -> str:
        """Writes one object (a checkpoint, a LoRA) under ``<root>/<key>``; returns its URI."""
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"artifact key {key!r}: a relative path without . or .. parts")
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return path.resolve().as_uri()

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
