"""A temporary Prefect API server for one command, started before the command's imports.

With no ``PREFECT_API_URL``, Prefect starts a temporary server inside the first flow call
and waits for it: ~4 s of boot plus ~2 s importing the server code into the command's
process, all on the critical path. ``python -m flows`` instead starts the same server
(Prefect's own app under uvicorn, as Prefect's ephemeral mode runs it) as its first step,
so it boots on another core while the command imports torch and loads its inputs; the
flow then finds ``PREFECT_API_URL`` set. A configured API URL (environment or Prefect
profile) is always used instead, and ``PREFECT_SERVER_EPHEMERAL_ENABLED=false`` keeps
Prefect's own behaviour (an error without a server).

The server process exits when the command does, also when the command is SIGKILLed: it
watches its parent and shuts down gracefully once the parent is gone.

    python -m flows.api_server PORT PARENT_PID     # the server process itself
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

START_ATTEMPTS = 3  # a port taken between choosing it and binding it: try another
STOP_TIMEOUT_S = 10.0
STATE_DIR = ".prefect"  # under the project: the temporary server's database
STATE_DB_MAX_BYTES = 64 * 2**20  # a larger database is removed once idle...
STATE_DB_IDLE_S = 600.0  # ...for this long (no command is using it)
DATABASE_URL_KEYS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL",
                     "PREFECT_API_DATABASE_CONNECTION_URL")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryApiServer:
    """``start`` spawns the server and returns at once; ``wait_until_ready`` points this
    process's Prefect at it (or at the API URL the user configured); ``stop`` ends it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self._attempts = 0
        self._set_env = False

    @property
    def is_temporary(self) -> bool:
        """Whether this command's flows talk to the temporary server (no UI, gone after)."""
        return self.process is not None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Spawn the server unless ``PREFECT_API_URL`` is in the environment."""
        if os.environ.get("PREFECT_API_URL"):
            return
        self.port = free_port()
        self._attempts += 1
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.api_server", str(self.port), str(os.getpid())],
            env={**os.environ, **project_database_env(), "PREFECT_UI_ENABLED": "0",
                 "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})

    def wait_until_ready(self) -> None:
        """Use the configured API if there is one; else wait for the health check, then
        set ``PREFECT_API_URL`` for this process (and its children)."""
        if self.process is None:
            return
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        if settings.api.url or not settings.server.ephemeral.enabled:
            self.stop()  # a profile names a server, or the user wants no temporary one
            return
        self._wait_healthy(settings.server.ephemeral.startup_timeout_seconds)
        log.info("Prefect: temporary API server on %s (set PREFECT_API_URL to use a "
                 "running `prefect server start` instead)", self.api_url)
        self._point_prefect_at(self.api_url)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not _healthy(self.api_url):
            if self.process.poll() is not None:  # exited: port taken, or a real failure
                if self._attempts >= START_ATTEMPTS:
                    raise RuntimeError(f"the temporary Prefect server exited with code "
                                       f"{self.process.returncode}; start one with `prefect "
                                       f"server start` and set PREFECT_API_URL")
                self.start()
            elif time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the temporary Prefect server did not answer within "
                                   f"{timeout_s:g} s (PREFECT_SERVER_EPHEMERAL_STARTUP_"
                                   f"TIMEOUT_SECONDS); start one with `prefect server "
                                   f"start` and set PREFECT_API_URL")
            time.sleep(0.05)

    def _point_prefect_at(self, url: str | None) -> None:
        from prefect.context import refresh_global_settings_context

        if url is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = url
        self._set_env = url is not None
        refresh_global_settings_context()

    def stop(self) -> None:
        """End the server (gracefully, then by force) and unset the URL we set."""
        if self._set_env:
            self._point_prefect_at(None)
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def project_state_dir() -> Path:
    """Where the temporary server keeps its database: ``.prefect/`` in the project (the DVC
    root under ``dvc repro``, else the working directory), not the user's home."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()) / STATE_DIR


def project_database_env() -> dict[str, str]:
    """The temporary server's database URL under the project (unless the user set one),
    after removing a database that grew past ``STATE_DB_MAX_BYTES`` and is idle."""
    if any(os.environ.get(key) for key in DATABASE_URL_KEYS):
        return {}
    state = project_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    database = state / "prefect.db"
    prune_idle_database(database)
    return {DATABASE_URL_KEYS[0]: f"sqlite+aiosqlite:///{database}"}


def prune_idle_database(database: Path, max_bytes: int | None = None,
                        idle_s: float = STATE_DB_IDLE_S) -> bool:
    """Delete ``database`` (and its WAL) when it holds more than ``max_bytes`` and nothing
    wrote to it for ``idle_s`` seconds: the temporary server's history has no UI, and a new
    database costs one slower start. Returns whether it was deleted."""
    max_bytes = STATE_DB_MAX_BYTES if max_bytes is None else max_bytes
    files = [database, *(database.with_name(database.name + s) for s in ("-wal", "-shm"))]
    present = [f for f in files if f.exists()]
    if not present:
        return False
    size = sum(f.stat().st_size for f in present)
    idle = time.time() - max(f.stat().st_mtime for f in present)
    if size <= max_bytes or idle < idle_s:
        return False
    for f in present:
        f.unlink(missing_ok=True)
    log.info("removed the temporary Prefect server's database %s (%d bytes)", database, size)
    return True


def _healthy(api_url: str) -> bool:
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    return False


def start_temporary_api_server() -> TemporaryApiServer:
    """A started server (unless ``PREFECT_API_URL`` is set), stopped when this process
    exits: after Prefect has sent its last logs and events, as Prefect's own temporary
    server is. Call ``wait_until_ready`` before the first flow."""
    server = TemporaryApiServer()
    server.start()
    atexit.register(server.stop)
    return server


# --- the server process ----------------------------------------------------------------

def _exit_with_parent(parent_pid: int) -> None:
    """Shut this server down gracefully once ``parent_pid`` is gone (even by SIGKILL)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def serve(port: int, parent_pid: int) -> None:
    """Prefect's API app on loopback, as Prefect's ephemeral mode runs it."""
    import uvicorn

    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                port=port, log_level="error", lifespan="on")


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
