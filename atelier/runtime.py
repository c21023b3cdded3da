"""Process plumbing shared by every atelier process: event loop, logging, parent death."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from typing import Any, Coroutine

PR_SET_PDEATHSIG = 1
# A child that binds or starts something prints this, then JSON, on stdout when it is ready.
READY_PREFIX = "ATELIER-READY "


def setup_logging(level: str | int = "INFO", name: str | None = None) -> None:
    prefix = f"{name} " if name else ""
    logging.basicConfig(
        level=level if isinstance(level, int) else getattr(logging, str(level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        stream=sys.stderr,
    )


def quiet_model_libraries() -> None:
    """Model libraries draw progress bars while loading; in a server they only bury the logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # torchao, imported by transformers wherever it is installed, warns at import that its CUDA kernels
    # do not load on a CPU host: true, and nothing to act on.
    logging.getLogger("torchao").setLevel(logging.ERROR)


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Runs ``main`` on uvloop where it is installed (it is a hard dependency; the fallback is for odd platforms)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)


def die_with_parent() -> None:
    """Asks the kernel to SIGTERM this process when its parent dies (Linux), so no child is orphaned.

    Used as ``preexec_fn`` of supervised children; elsewhere it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
