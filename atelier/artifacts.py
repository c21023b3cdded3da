"""Where finished outputs are kept: a local folder for now (S3-compatible stores come later)."""

from __future__ import annotations

import mimetypes
import os
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
    def __init__(self, root: Path):
        self.root = Path(root)

    def put_all(self, job_id: str, artifacts: Sequence[Artifact]) -> list[str]:
        """Writes each output under ``<root>/<job id>-<n><ext>``; returns their URIs."""
        if not artifacts:
            return []
        self.root.mkdir(parents=True, exist_ok=True)
        uris = []
        for index, artifact in enumerate(artifacts):
            path = self.root / f"{job_id}-{index}{extension_for(artifact.media_type)}"
            tmp = path.with_suffix(path.suffix + ".part")
            with open(tmp, "wb") as f:
                f.write(artifact.data)
            os.replace(tmp, path)  # readers never see half a file
            uris.append(path.resolve().as_uri())
        return uris

    def read(self, uri: str) -> bytes | None:
        """A stored artifact's bytes, or None where it is gone (deleted, or not in this store)."""
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            return None
        path = Path(unquote(parsed.path))
        if not path.resolve().is_relative_to(self.root.resolve()):
            return None  # a URI is data from the journal: never read outside the store
        try:
            return path.read_bytes()
        except OSError:
            return None
