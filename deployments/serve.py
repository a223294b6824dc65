"""``singleframe serve``: a local Prefect server on 127.0.0.1, the deployments, and a worker.

Everything runs as child processes of this command and stops with it (Ctrl-C).
For production, run ``prefect server start`` against PostgreSQL instead
(see ``deployments/README.md``) and point workers at it.

The pieces (:func:`start_server`, :func:`register_deployments`,
:func:`start_worker`) are also used by the end-to-end deployment test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

POOL = "singleframe-process"

#: The deployments, as data (entrypoints into the installed package).
PREFECT_YAML = Path(__file__).with_name("prefect.yaml")


def prefect_executable() -> str:
    """The ``prefect`` command of this Python environment."""
    return str(Path(sys.executable).with_name("prefect"))


def prefect_env(api_url: str, **extra: str) -> dict[str, str]:
    """Environment for server, CLI and worker processes: offline, pointed at ``api_url``."""
    return {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1", **extra}


def wait_healthy(api_url: str, timeout_s: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``{api_url}/health`` until it answers 200; raise after ``timeout_s`` or if ``proc`` died."""
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the Prefect server at {api_url} did not become healthy within {timeout_s:.0f} s")


#: Scheduling niceness of the local server (``nice``): below the flow runs on the same machine.
SERVER_NICE = 10


def start_server(port: int, env: Mapping[str, str], *, nice: int = SERVER_NICE, **popen: object) -> subprocess.Popen:
    """Start ``prefect server start`` bound to 127.0.0.1 (not reachable from other hosts).

    The server runs at niceness ``nice`` (0: as this process) where a ``nice`` command exists.
    Its work is bookkeeping that can wait: it records task runs from the events the flows send,
    ~0.5 s of CPU per 4096² detector (8 task runs) on SQLite, and on a machine whose cores all
    calibrate it otherwise takes that time from them. A flow run does not wait for it: task-run
    states reach it as events, and it catches up between detectors and after the run. Measured,
    8 x 4096² detectors on a 2-process Dask cluster, 3 runs each, interleaved with niceness 0:
    27.4 / 28.4 / 26.4 s at 10 against 29.4 / 28.5 / 26.4 s; 30.5 / 29.5 / 29.4 s at 15 against
    31.4 / 30.5 / 30.5 s (a small gain on a noisy VM). A flow on one thread leaves a core free
    and is not affected.
    """
    cmd = [prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    nice_exe = shutil.which("nice") if nice else None
    if nice_exe:
        cmd = [nice_exe, "-n", str(int(nice)), *cmd]
    return subprocess.Popen(cmd, env=dict(env), **popen)  # type: ignore[call-overload]


def register_deployments(env: Mapping[str, str], *, cwd: str | Path | None = None,
                         prefect_file: Path = PREFECT_YAML) -> None:
    """Create the process work pool and register every deployment of ``prefect_file``.

    ``cwd`` is where the worker's flow runs start (the ``{{ $PWD }}`` pull step);
    relative store paths in the parameters resolve against it.
    """
    exe = prefect_executable()
    subprocess.run([exe, "work-pool", "create", POOL, "--type", "process", "--overwrite"], env=dict(env),
                   check=True, cwd=cwd, capture_output=True, timeout=120)
    subprocess.run([exe, "--no-prompt", "deploy", "--prefect-file", str(prefect_file), "--all"], env=dict(env),
                   check=True, cwd=cwd, capture_output=True, timeout=300)


def start_worker(env: Mapping[str, str], *, limit: int = 2, **popen: object) -> subprocess.Popen:
    """Start a process worker on the pool; each flow run is a child process of it."""
    return subprocess.Popen([prefect_executable(), "worker", "start", "--pool", POOL, "--limit", str(limit)],
                            env=dict(env), **popen)  # type: ignore[call-overload]


def stop(procs: list[subprocess.Popen], timeout_s: float = 30.0) -> None:
    """Terminate ``procs`` (newest first) and wait; kill whatever does not stop in time."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout_s)


def _port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (a server left running would answer our health checks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class _Terminated(Exception):
    """SIGTERM (systemd, ``docker stop``): stop the server and worker as Ctrl-C does."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def serve(*, port: int = 4200, worker_limit: int = 2, poll_s: float = 1.0) -> int:
    """Start server, register deployments from deployments/prefect.yaml, start a worker; block.

    Returns 0 when stopped by Ctrl-C or SIGTERM (both stop the server and the worker), 1 when
    the server or the worker died on its own (a supervisor should restart it), 2 when the port
    is taken.
    """
    if not _port_free(port):
        print(f"port {port} on 127.0.0.1 is in use (a Prefect server left running?): stop it, or pass --port",
              file=sys.stderr)
        return 2
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(api)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_server(port, env))
        wait_healthy(api, proc=procs[0])
        register_deployments(env)
        procs.append(start_worker(env, limit=worker_limit))
        print(f"Prefect UI: http://127.0.0.1:{port}  (Ctrl-C stops server and worker)", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(poll_s)
        for name, p in zip(("server", "worker"), procs, strict=False):
            if p.poll() is not None:
                print(f"the Prefect {name} exited with code {p.returncode}; stopping", file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, _Terminated):
        return 0
    except (RuntimeError, subprocess.SubprocessError) as exc:  # server never healthy, deploy failed
        detail = getattr(exc, "stderr", None) or b""
        print(f"could not start: {exc} {detail.decode(errors='replace')[-2000:]}".rstrip(), file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        stop(procs)
        signal.signal(signal.SIGTERM, previous)
