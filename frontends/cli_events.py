"""``atelier events``: the cluster's events, one line each, as they happen, until Ctrl-C.

    $ atelier events
    14:02:11  queue_busy      queued=1 running=0
    14:02:19  queue_idle      queued=0 running=0
    $ atelier events --json      # the JSON a webhook gets, one object a line: for a script to read

Over ZeroMQ, as the operator (the CLI is, as for ``atelier cancel``). A scheduler that is not there is
one line saying so, not a wait for events that never come.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

from atelier.config import Config

HELP = "print the cluster's events (queue busy and idle, leases, operator actions) as they happen, until Ctrl-C"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object a line, as a webhook gets it: "
                                                            '{"event", "at", "detail"}')


def line_of(event, *, as_json: bool) -> str:
    from actors.webhooks import body_of

    if as_json:
        return body_of(event).decode()
    detail = " ".join(f"{name}={value}" for name, value in event.detail.items())
    return f"{time.strftime('%H:%M:%S', time.localtime(event.at))}  {event.event.value:<16} {detail}".rstrip()


async def events(args: argparse.Namespace, config: Config) -> int:
    from frontends.cli import _connect, _endpoints

    async with _connect(*_endpoints(args, config), config) as client:
        stream = client.cluster_events()
        upcoming = asyncio.ensure_future(anext(stream))  # subscribed before the scheduler is asked
        try:
            await client.status()  # no scheduler: _connect says so, in one line
            print(f"following the cluster's events at {client.router} (Ctrl-C stops)", file=sys.stderr, flush=True)
            while True:
                event = await upcoming
                upcoming = asyncio.ensure_future(anext(stream))
                print(line_of(event, as_json=args.json), flush=True)
        finally:
            upcoming.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await upcoming
            await stream.aclose()
