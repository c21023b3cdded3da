"""Ordinary failures, met as a new user meets them: one line that says what is wrong and what to do,
no traceback, and an exit status that is not 0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, broker_thread

pytestmark = pytest.mark.timeout(120)


def atelier(*args: str, home: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frontends.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "ATELIER_HOME": str(home), "PYTHONPATH": str(ROOT)})


def one_clear_line(done: subprocess.CompletedProcess, *said: str) -> str:
    """The output's line that says all of ``said``, after checking that the command failed without a traceback."""
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if all(words in line for words in said)]
    assert lines, output
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_on_a_taken_port_names_the_address_and_the_way_out(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        router = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        done = atelier("up", "--router", router, "--pub", "tcp://127.0.0.1:0", "--http", "off", home=tmp_path)
    line = one_clear_line(done, router, "already in use")
    assert "--router" in line and "[broker] router" in line and "Stop it" in line


def test_the_http_server_on_a_taken_port_names_the_address_and_the_way_out(tmp_path):
    with broker_thread() as (broker, _), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        done = atelier("http", "--router", broker.router_endpoint, "--pub", broker.pub_endpoint, "--listen", listen,
                       home=tmp_path)
    line = one_clear_line(done, listen, "already in use")
    assert "--listen" in line and "[http] port" in line


def test_a_client_command_with_no_broker_says_to_start_atelier(tmp_path):
    router = f"tcp://127.0.0.1:{free_port()}"
    done = atelier("status", "--router", router, "--pub", f"tcp://127.0.0.1:{free_port()}", home=tmp_path)
    line = one_clear_line(done, f"no atelier broker answers at {router}")
    assert "atelier up" in line and "--router" in line


@pytest.mark.parametrize("command", [["status"], ["models"], ["cancel", "some-job"], ["generate", "a lighthouse"]])
def test_a_client_command_with_no_scheduler_says_none_answers(tmp_path, command):
    with broker_thread() as (broker, _):
        router = broker.router_endpoint
        done = atelier(command[0], "--router", router, "--pub", broker.pub_endpoint, *command[1:], home=tmp_path)
    line = one_clear_line(done, f"no scheduler answers at {router}")
    assert "atelier up" in line and "--router" in line


@pytest.mark.parametrize("command", [["status"], ["up", "--http", "off"], ["broker"], ["scheduler"], ["node"]])
def test_a_missing_config_file_is_named(tmp_path, command):
    missing = tmp_path / "nowhere.toml"
    done = atelier(*command, "--config", str(missing), home=tmp_path)
    assert done.returncode == 2
    line = one_clear_line(done, f"no config file at {missing}")
    assert "--config" in line


@pytest.mark.parametrize(("text", "said"), [
    ('default_model = "unclosed\n', "is not valid TOML"),
    ('[broker]\nheartbeat_s = "often"\n', "broker.heartbeat_s: Input should be a valid number"),
])
def test_a_bad_config_file_is_named_with_what_is_wrong(tmp_path, text, said):
    config = tmp_path / "atelier.toml"
    config.write_text(text)
    for command in (["status"], ["up", "--http", "off"], ["broker"]):
        done = atelier(*command, "--config", str(config), home=tmp_path)
        assert done.returncode == 2
        one_clear_line(done, str(config), said)
