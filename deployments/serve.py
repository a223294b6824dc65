"""``singleframe serve``: a local Prefect server on 127.0.0.1, the deployments, and a worker.

Everything runs as child processes of this command and stops with it (Ctrl-C).
For production, run ``prefect server start`` against PostgreSQL instead
(``PREFECT_API_DATABASE_CONNECTION_URL``) and point workers at it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

POOL = "singleframe-process"


def _wait_healthy(url: str, timeout_s: float = 90.0) -> None:
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"the Prefect server at {url} did not become healthy within {timeout_s:.0f} s")


def serve(*, port: int = 4200) -> int:
    """Start server, register deployments from deployments/prefect.yaml, start a worker; block."""
    prefect = str(Path(sys.executable).with_name("prefect"))
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    yaml_path = Path(__file__).with_name("prefect.yaml")
    procs = [subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env)]
    try:
        _wait_healthy(api)
        subprocess.run([prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"], env=env, check=True)
        subprocess.run([prefect, "--no-prompt", "deploy", "--prefect-file", str(yaml_path), "--all"],
                       env=env, check=True)
        procs.append(subprocess.Popen([prefect, "worker", "start", "--pool", POOL, "--limit", "2"], env=env))
        print(f"Prefect UI: http://127.0.0.1:{port}  (Ctrl-C stops server and worker)", flush=True)
        procs[0].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    return 0
