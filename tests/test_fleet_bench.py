"""bench/fleet.py in its quick mode: the real broker and scheduler against simulated runners, end to end."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_quick_fleet_bench_prints_its_figures_and_loses_no_job(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "fleet.py"), "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out[-3000:]}\n{done.stderr[-3000:]}"
    last = out.strip().splitlines()[-1]
    found = re.fullmatch(r"RESULT dispatch_ms_64=(\S+) submit_us_4k=(\S+) growth=(\S+)", last)
    assert found, last
    dispatch_ms, submit_us, growth = (float(v) for v in found.groups())
    # Sane: a dispatch cycle costs the scheduler some CPU but far less than a second, a submit far less
    # than 100 ms, and the growth is a finite ratio.
    assert 0 < dispatch_ms < 1000 and 0 < submit_us < 100_000 and math.isfinite(growth) and growth > 0
    assert "PROBLEM" not in out and "starved" not in out
    # Every job a runner ran, ran once; every result came once, for a job that ran; the scheduler's count
    # of jobs by state adds up to the jobs accepted.
    ran = re.findall(r"checked \((fair|fifo)\): \d+ runners: ([\d,]+) jobs ran, none twice; ([\d,]+) results, "
                     r"each once, of jobs that ran; ([\d,]+) accepted, 0 refused", out)
    assert len(ran) == 3, out  # 8 and 64 runners, and the fifo baseline
    assert all(int(n.replace(",", "")) > 0 for _, n, _, _ in ran)  # the probe ran batches in every run
    counted = re.findall(r"checked \(\w+\): [^:]+: ([\d,]+) live \+ ([\d,]+) ended = ([\d,]+) accepted", out)
    assert counted and all(int(a.replace(",", "")) + int(b.replace(",", "")) == int(c.replace(",", ""))
                           for a, b, c in counted)
    assert re.search(r"^\s+8\s+500\s", out, re.M) and re.search(r"^\s+64\s+4,000\s", out, re.M)
