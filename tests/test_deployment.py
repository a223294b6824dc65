"""End to end through a real Prefect server: deploy, trigger as the UI's Run button does, watch.

A ``prefect server start`` subprocess on a free 127.0.0.1 port (its own
PREFECT_HOME and SQLite file), the deployments of ``deployments/prefect.yaml``
registered with ``prefect deploy``, and a process worker. A run is created
through the API with :func:`prefect.deployments.run_deployment`, executed by
the worker, and its outputs are checked in the store. Then headless Chromium
loads the UI, saves a screenshot and dumps the DOM. Every process started here
is stopped by its id in ``finally``.

Chromium is Debian's ``chromium`` package; the UI check is skipped when it is
absent (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from singleframe.deployments.serve import (
    SERVER_NICE,
    prefect_env,
    register_deployments,
    start_server,
    start_worker,
    stop,
    wait_healthy,
)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from test_flow_operations import make_tiny_survey

    work = tmp_path_factory.mktemp("deploy")
    make_tiny_survey(work / "store")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(api, PREFECT_HOME=str(work / "prefect_home"), PREFECT_WORKER_QUERY_SECONDS="1",
                      PREFECT_LOGGING_TO_API_ENABLED="true", PREFECT_LOGGING_LEVEL="INFO")
    logs = {name: (work / f"{name}.log").open("wb") for name in ("server", "worker")}
    procs = [start_server(port, env, stdout=logs["server"], stderr=subprocess.STDOUT)]
    try:
        t0 = time.perf_counter()
        wait_healthy(api, timeout_s=90, proc=procs[0])
        startup_s = time.perf_counter() - t0
        register_deployments(env, cwd=work)
        procs.append(start_worker(env, limit=1, cwd=work, stdout=logs["worker"], stderr=subprocess.STDOUT))
        yield {"api": api, "port": port, "work": work, "startup_s": startup_s, "server_pid": procs[0].pid}
    finally:
        stop(procs)
        for f in logs.values():
            f.close()


@pytest.mark.skipif(not hasattr(os, "getpriority") or shutil.which("nice") is None, reason="needs POSIX nice")
def test_the_local_server_runs_below_the_flows(server: dict) -> None:
    # Its bookkeeping must not take CPU from calibrations running on the same cores.
    assert os.getpriority(os.PRIO_PROCESS, server["server_pid"]) == min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                                                          + SERVER_NICE)


@pytest.fixture(scope="module")
def triggered_run(server: dict) -> dict:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["api"]}):
        t0 = time.perf_counter()
        # As the UI's Run button: a flow run of the deployment with the form's parameters, taken by the worker.
        flow_run = run_deployment("calibrate-visits/on-demand", parameters={"params": {"store": str(server["work"] / "store")}},
                                  timeout=240, poll_interval=1)
        wall_s = time.perf_counter() - t0
    return {"flow_run": flow_run, "wall_s": wall_s}


def test_deployment_run_completes_with_all_outputs_in_the_store(server: dict, triggered_run: dict) -> None:
    from test_flow_operations import OUTPUTS

    from singleframe.io.store import ArtifactStore

    flow_run = triggered_run["flow_run"]
    worker_log = (server["work"] / "worker.log").read_text(errors="replace")[-3000:]
    assert flow_run.state is not None and flow_run.state.is_completed(), (flow_run.state, worker_log)
    assert flow_run.state.message == "4 of 4 detectors calibrated, 0 failed"
    assert flow_run.name == "calibrate-calib"
    store = ArtifactStore(str(server["work"] / "store"))
    for det in range(4):
        for name in OUTPUTS:
            assert store.exists(name, run="calib", instrument="SimCam", visit=2, detector=det), (name, det)
    print(f"\nserver healthy after {server['startup_s']:.1f} s; run_deployment to Completed in "
          f"{triggered_run['wall_s']:.1f} s")


def test_both_deployments_are_registered_with_a_nightly_schedule(server: dict) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["api"]}), get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("calibrate-visits/nightly")
        on_demand = client.read_deployment_by_name("calibrate-visits/on-demand")
    assert nightly.entrypoint == on_demand.entrypoint == "singleframe.flows.calibrate:calibrate_visits"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 12 * * *"]
    assert not on_demand.schedules
    # The pydantic parameter model is the UI's form.
    assert "params" in nightly.parameter_openapi_schema["properties"]


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
                  "--virtual-time-budget=20000"]


def test_ui_shows_the_run_in_headless_chromium(server: dict, triggered_run: dict, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt-get install -y chromium)")
    base = f"http://127.0.0.1:{server['port']}"
    shot = tmp_path / "runs.png"
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*common, f"--screenshot={shot}", f"{base}/runs"], check=True, timeout=120,
                   capture_output=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    dom = subprocess.run([*common, "--dump-dom", f"{base}/deployments"], check=True, timeout=120,
                         capture_output=True, text=True).stdout
    # The UI rendered the registered deployments (not just the bare HTML shell).
    assert "on-demand" in dom and "nightly" in dom, dom[-2000:]
    shutil.copy(shot, server["work"] / "ui-runs.png")
