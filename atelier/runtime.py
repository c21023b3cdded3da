"""Process plumbing shared by every atelier process: its main (arguments, config, logging, signals,
exit status), its background tasks, the event loop, parent death."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import inspect
import logging
import os
import re
import signal
import sys
import threading
import tomllib
from typing import Any, Awaitable, Callable, Coroutine

from pydantic import ValidationError

from atelier.config import Config, config_file, load_config

PR_SET_PDEATHSIG = 1
# A child that binds or starts something prints this, then JSON, on stdout when it is ready.
READY_PREFIX = "ATELIER-READY "
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPTED = 128 + signal.SIGINT  # the shell's exit status for Ctrl-C

log = logging.getLogger("atelier.runtime")


class Failure(Exception):
    """An ordinary failure (a port taken, no scheduler answering, a bad config file) rather than a bug:
    its message says what is wrong and what to do. A process's main prints it as one line, with no
    traceback, and exits with ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- #
# a process's main

# serve(args, config, stop): a coroutine function runs on uvloop with ``stop`` an asyncio.Event; a
# plain function (a loop of its own, like the broker's) runs in the main thread with a threading.Event.
Serve = Callable[[argparse.Namespace, Config, Any], Awaitable[int | None] | int | None]


def add_common_options(parser: argparse.ArgumentParser, *, log_level: str = "INFO",
                       router: str | None = "the broker's ROUTER endpoint (default from the config)",
                       pub: str | None = None) -> argparse.ArgumentParser:
    """The options every process takes: --config, --log-level, and --router / --pub where given their help."""
    parser.add_argument("--config", help="atelier.toml (default: $ATELIER_CONFIG, else ./atelier.toml, "
                                         "else built-in settings)")
    parser.add_argument("--log-level", default=log_level)
    if router is not None:
        parser.add_argument("--router", help=router)
    if pub is not None:
        parser.add_argument("--pub", help=pub)
    return parser


def process_parser(prog: str, description: str, **options: Any) -> argparse.ArgumentParser:
    return add_common_options(argparse.ArgumentParser(prog=prog, description=description), **options)


def process_main(parser: argparse.ArgumentParser, serve: Serve, argv: list[str] | None = None, *,
                 log_name: str | Callable[[argparse.Namespace], str | None] | None = None,
                 loads_models: bool = False,
                 other_address: str = "choose another address") -> int:
    """The whole main of an atelier process: parses ``argv``, sets up logging (lines tagged with
    ``log_name``), reads the config, and runs ``serve(args, config, stop)``. SIGINT and SIGTERM only
    set ``stop``; ``serve`` sees it and shuts down in order. Returns the exit status: what ``serve``
    returns (None is 0), or, for an ordinary failure, that failure's, after printing it as one line.
    ``other_address`` finishes the advice for an address already taken ("Stop it, or …")."""
    args = parser.parse_args(argv)
    setup_logging(args.log_level, log_name(args) if callable(log_name) else log_name)
    if loads_models:
        quiet_model_libraries()
    try:
        config = read_config(args.config)
        if inspect.iscoroutinefunction(serve):
            code = run(_serve_until_stopped(serve, args, config))
        else:
            code = _serve_blocking(serve, args, config)
    except KeyboardInterrupt:  # a Ctrl-C before the handlers were in place
        return INTERRUPTED
    except Exception as exc:
        failure = as_failure(exc, other_address)
        if failure is None:
            raise  # a bug: its traceback is what to read
        print(f"{parser.prog}: error: {failure}", file=sys.stderr, flush=True)
        return failure.code
    return code or 0


async def _serve_until_stopped(serve: Serve, args: argparse.Namespace, config: Config) -> int | None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return await serve(args, config, stop)  # type: ignore[misc]


def _serve_blocking(serve: Serve, args: argparse.Namespace, config: Config) -> int | None:
    stop = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    return serve(args, config, stop)  # type: ignore[return-value]


def read_config(path: str | None) -> Config:
    """The config, or a Failure that names the file and what is wrong in it."""
    try:
        return load_config(path)
    except FileNotFoundError as exc:
        raise Failure(f"no config file at {exc.filename}: give the path of an existing atelier.toml to "
                      "--config (or $ATELIER_CONFIG), or leave it out for the built-in settings", 2) from None
    except OSError as exc:
        raise Failure(f"cannot read the config file {exc.filename}: {exc.strerror or exc}", 2) from None
    except tomllib.TOMLDecodeError as exc:
        raise Failure(f"{config_file(path)} is not valid TOML: {exc}", 2) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise Failure(f"{config_file(path)}: {problems}", 2) from None


def as_failure(exc: BaseException, other_address: str = "choose another address") -> Failure | None:
    """``exc`` as an ordinary failure to tell the user about; None for a bug."""
    if isinstance(exc, Failure):
        return exc
    if getattr(exc, "errno", None) == errno.EADDRINUSE:  # OSError, and zmq.ZMQError from a bind
        return Failure(f"{_address_of(exc)} is already in use: another atelier (or another program) "
                       f"listens there. Stop it, or {other_address}")
    return None


def _address_of(exc: BaseException) -> str:
    text = str(exc)
    if found := re.search(r"addr='([^']+)'", text):  # pyzmq's bind
        return found.group(1)
    if found := re.search(r"address \('([^']+)', (\d+)\)", text):  # asyncio's create_server
        return f"{found.group(1)}:{found.group(2)}"
    return f"an address ({text})"


# --------------------------------------------------------------------------- #
# background tasks


class TaskSet:
    """The background tasks of one owner. The event loop keeps only a weak reference to a task, so
    one nobody holds may vanish mid-run: this holds each until it ends, logs its failure (nobody else
    would see it), and cancels those left on stop."""

    def __init__(self, owner: str):
        self.owner = owner
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None, *,
              log_failure: bool = True) -> asyncio.Task:
        """Runs ``coro`` as a task of this set. ``log_failure=False``: whoever awaits it handles its failure."""
        task = asyncio.create_task(coro, name=f"{self.owner}-{name}" if name else None)
        self._tasks.add(task)
        task.add_done_callback(self._ended if log_failure else self._tasks.discard)
        return task

    def _ended(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: task %s failed", self.owner, task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Cancels every task still running (not the one calling this) and waits for them to end."""
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- #
# the rest


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
