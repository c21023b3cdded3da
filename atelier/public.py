"""What atelier may say to the people it serves: text with the server's own paths taken out.

A job's failure reason or a refusal can carry what a server saw (a model's folder, a file it could not
read); a channel, a web page or a terminal of someone else must not learn how the host is laid out.
The runner scrubs the reasons it gives (its log keeps them whole) and the frontends scrub what they
show, so a reason from anywhere is safe to show.
"""

from __future__ import annotations

import re

HIDDEN = "…"
# file: URIs, home-relative paths, and absolute paths of at least two parts (so "/live" and "1/4" stay).
_PATHS = re.compile(r"file:\S+|~/\S+|(?<![\w.:/~])/(?:[\w.@+,=-]+/)+[\w.@+,=-]*")


def scrub(text: str) -> str:
    """``text`` with every path and file URI in it replaced by an ellipsis."""
    return _PATHS.sub(HIDDEN, text)
