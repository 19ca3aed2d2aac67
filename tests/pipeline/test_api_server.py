"""The temporary Prefect API server of ``python -m flows`` (flows/api_server.py): started
early, used only when no API is configured, stopped after the last logs, never orphaned."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cmd, subprocess_env, write_params
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_ENABLED,
    temporary_settings,
)

from flows.api_server import TemporaryApiServer


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _server_pids(marker: str) -> list[int]:
    """Pids of ``flows.api_server`` processes whose command line holds ``marker``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flows.api_server" in args and marker.encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ephemeral-home")


def test_a_stage_without_a_server_uses_a_temporary_one_and_leaves_none(tmp_path, prefect_home):
    write_params(tmp_path)
    env = subprocess_env(PREFECT_HOME=str(prefect_home))
    env.pop("PREFECT_API_URL", None)
    proc = run_cmd([sys.executable, "-m", "flows", "data", "-v"], tmp_path, env, timeout=300)
    assert "temporary API server on http://127.0.0.1:" in proc.stdout
    port = proc.stdout.split("temporary API server on http://127.0.0.1:")[1].split("/")[0]
    assert "Error logging to API" not in proc.stdout, proc.stdout[-2000:]
    assert not [pid for pid in _server_pids(port) if _alive(pid)]
    # the run and its logs reached the server before it stopped
    assert not (prefect_home / "prefect.db").exists()  # the server's state: in the project
    with sqlite3.connect(tmp_path / ".prefect" / "prefect.db") as db:
        states = db.execute("SELECT state_type FROM flow_run WHERE name IS NOT NULL AND "
                            "flow_id IN (SELECT id FROM flow WHERE name = 'data')").fetchall()
        logs = db.execute("SELECT count(*) FROM log").fetchone()[0]
    assert ("COMPLETED",) in states and logs > 0


def test_two_commands_at_once_on_a_fresh_prefect_home_both_succeed(tmp_path):
    """Both servers migrate the same new database; one may fail its start-up and is
    restarted on another port (seen: alembic 'expected to match one row')."""
    env = subprocess_env(PREFECT_HOME=str(tmp_path / "fresh-home"))
    env.pop("PREFECT_API_URL", None)
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_params(tmp_path / name)
        procs.append(subprocess.Popen([sys.executable, "-m", "flows", "data"], cwd=tmp_path / name,
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [out[-2000:] for out in outputs]
    assert all((tmp_path / name / "data" / "dataset" / "manifest.json").exists() for name in "ab")


def test_the_server_exits_when_its_command_is_killed(prefect_home):
    script = ("import time\n"
              "from flows.api_server import start_temporary_api_server\n"
              "server = start_temporary_api_server()\n"
              "server.wait_until_ready()\n"
              "print(server.process.pid, flush=True)\n"
              "time.sleep(600)\n")
    env = subprocess_env(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(REPO))
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        assert _alive(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(server_pid), "the temporary server outlived its killed command"
    finally:
        parent.kill()
        parent.stdout.close()


def test_an_api_url_in_the_environment_starts_no_server(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    server = TemporaryApiServer()
    server.start()
    assert server.process is None


@pytest.mark.parametrize("setting", [{PREFECT_API_URL: "http://127.0.0.1:9/api"},
                                     {PREFECT_SERVER_EPHEMERAL_ENABLED: False}],
                         ids=["profile-api-url", "ephemeral-disabled"])
def test_a_configured_api_or_disabled_ephemeral_mode_stops_the_early_server(monkeypatch,
                                                                          setting):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = TemporaryApiServer()
    server.start()
    process = server.process
    assert process is not None
    with temporary_settings(updates=setting):
        server.wait_until_ready()
    assert server.process is None and process.poll() is not None
    assert "PREFECT_API_URL" not in os.environ
