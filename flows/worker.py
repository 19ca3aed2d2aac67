"""``python -m flows worker --pool adaround``: a Prefect process worker for this project.

``prefect worker start --pool NAME`` creates a pool that does not exist and then waits
on it forever, so a typo in the pool's name looks like a worker with nothing to do. This
command checks first that ``PREFECT_API_URL`` names a server that answers and that the
pool exists there (each failure one ``error: ...`` line, exit 2), then becomes
``prefect worker start`` with this Python (the project's venv runs the flows) in the
params file's directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flows.schedule import require_server
from tasks.params import PreflightError

DEFAULT_POOL = "adaround"  # the work pool of prefect.yaml's deployments


def check_work_pool(pool: str) -> str:
    """The type of work pool ``pool`` on the configured server; ``PreflightError`` when no
    server answers or the pool does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    url = require_server()
    _check_answers(url)
    try:
        with get_client(sync_client=True) as client:
            return client.read_work_pool(pool).type
    except ObjectNotFound:
        raise PreflightError(f"work pool {pool!r} does not exist on the Prefect server {url}: "
                             f"create it with `prefect work-pool create {pool} --type process` "
                             f"(prefect.yaml's deployments use {DEFAULT_POOL!r}), or name an "
                             f"existing one (`prefect work-pool ls`)") from None
    except Exception as err:  # connection refused, timeout, a URL that is not Prefect's
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise PreflightError(f"the Prefect server {url} (PREFECT_API_URL) does not answer: "
                             f"{reason}; start it with `prefect server start` or fix "
                             f"PREFECT_API_URL") from None


def _check_answers(url: str) -> None:
    """``GET <url>/health`` within seconds (Prefect's client would retry for a minute)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except OSError as err:
        reason = " ".join(str(getattr(err, "reason", err)).split()) or type(err).__name__
    raise PreflightError(f"the Prefect server {url} (PREFECT_API_URL) does not answer: "
                         f"{reason}; start it with `prefect server start` or fix "
                         f"PREFECT_API_URL")


def worker_command(pool: str, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, *(extra or [])]


def start_worker(params_file: str, pool: str) -> None:
    """Check the pool, then replace this process with the worker (in the project dir)."""
    check_work_pool(pool)
    os.chdir(Path(params_file).resolve().parent)
    command = worker_command(pool)
    os.execv(command[0], command)
