"""``make bench-orchestration``: the run-like-a-survey bars of issue 6, measured.

A visit of ``--detectors`` simulated detectors of ``--size``² pixels is written
to a scratch store with the project's simulator, a real ``prefect server
start`` (SQLite, its own temporary ``PREFECT_HOME``) is started on a free
127.0.0.1 port, and every timed run is a fresh subprocess with
``OMP_NUM_THREADS=1`` and ``PREFECT_API_URL`` pointed at that server:

(a) **orchestration overhead** — :func:`~singleframe.flows.calibrate.calibrate_visits`
    on a one-thread runner against the same work without Prefect (the flow's
    own :func:`~singleframe.flows.calibrate.run_stage` for every stage plus the
    diagnostic plot, called in a plain loop). Bar: ≤ 10 % of the direct time.
(b) **Dask throughput** — the flow on a ``DaskTaskRunner`` with a LocalCluster
    of 2 single-threaded processes (:func:`~singleframe.flows.calibrate.make_task_runner`)
    against the one-thread flow of (a). Bar: ≥ 1.7×. Both are timed as whole
    commands (interpreter start, imports, the cluster's start-up and exit), as a
    user would time them; the time from the flow's call on is reported too. So
    is the machine's ceiling in the same hour: the stages of (a)'s direct loop in
    one process, and in 2 plain processes side by side on half the detectors each.
(c) **re-run** — the finished run of (a) run again: no file may be rewritten
    and it must take ≤ 5 % of the first run. Then one dataset
    (``--delete-dataset``, default ``star_catalog``) of one detector is deleted
    and the flow run again: exactly its producing stage and the stages
    downstream of it must run (stages are read off the rewritten files).
(d) **flow-process memory** — the one-thread flow on ``--memory-detectors``
    (default 10 and 100) small detectors: peak RSS of the flow process (which
    does the compute; Dask is not involved) must agree within ±10 %. The same
    work without Prefect on the large count shows which growth is whose.

Results are written as Markdown and JSON to
``benchmarks/results/orchestration-<stamp>.{md,json}`` and
``orchestration-latest.{md,json}``. Times are reported, never asserted: the
exit status is 0 unless a run fails.

    python -m singleframe.orchestration_bench                 # 20 x 4096², 10/100 x 512²
    python -m singleframe.orchestration_bench --quick         # 4 x 1024², 4/16 x 256² smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Bars of issue 6 (do not loosen them).
OVERHEAD_BAR_PCT = 10.0
DASK_SPEEDUP_BAR = 1.7
RERUN_RATIO_BAR_PCT = 5.0
MEMORY_FLAT_BAR_PCT = 10.0

#: Environment of every timed subprocess: one thread everywhere, offline Prefect.
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "NUMEXPR_NUM_THREADS": "1"}
_INSTRUMENT = "SimCam"
_INPUT_RUN = "raw"
_REFCAT = "refcat"
#: Small detectors get a denser star field: with 300 stars 1 in 4 of 512² detectors had too few
#: bright stars for the astrometric fit, with 1200 none of 12 failed (4096² ones hold ~8000 anyway).
_MIN_STARS_PER_DETECTOR = 1200


@dataclass(frozen=True)
class OrchestrationBenchConfig:
    """What to simulate and run.

    Attributes
    ----------
    detectors
        Detectors of the visit of bars (a)-(c).
    size_pix
        Their width and height (pixels).
    memory_detectors
        The two detector counts of bar (d).
    memory_size_pix
        Width and height of the detectors of bar (d).
    dask_workers
        Worker processes of the LocalCluster of bar (b).
    repeat
        Timed runs of the direct loop, the one-thread flow and the Dask flow (interleaved; medians).
    delete_dataset
        The dataset deleted from one detector in bar (c).
    bars
        Which bars to measure (``"a"``, ``"b"``, ``"c"``, ``"d"``).
    seed
        Simulation seed.
    """

    detectors: int = 20
    size_pix: int = 4096
    memory_detectors: tuple[int, int] = (10, 100)
    memory_size_pix: int = 512
    dask_workers: int = 2
    repeat: int = 1
    delete_dataset: str = "star_catalog"
    bars: tuple[str, ...] = ("a", "b", "c", "d")
    seed: int = 7

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a configuration that cannot be run."""
        if self.detectors < 1 or min(self.memory_detectors) < 1:
            raise ConfigError(f"detector counts must be >= 1, got {self.detectors} and {self.memory_detectors}")
        if len(self.memory_detectors) != 2 or self.memory_detectors[0] >= self.memory_detectors[1]:
            raise ConfigError(f"memory_detectors must be (small, large) with small < large, got {self.memory_detectors}")
        if min(self.size_pix, self.memory_size_pix) < 128:
            raise ConfigError(f"detectors must be >= 128 px on a side to hold PSF stars, got "
                              f"{self.size_pix} and {self.memory_size_pix}")
        if self.dask_workers < 1 or self.repeat < 1:
            raise ConfigError(f"dask_workers and repeat must be >= 1, got {self.dask_workers} and {self.repeat}")
        unknown = set(self.bars) - {"a", "b", "c", "d"}
        if unknown or not self.bars:
            raise ConfigError(f"bars must be a non-empty subset of a, b, c, d; got {self.bars}")
        from .flows.stages import STAGES

        produced = {name for s in STAGES for name in s.outputs}
        if self.delete_dataset not in produced:
            raise ConfigError(f"delete_dataset {self.delete_dataset!r} is not written by a stage; choose one of "
                              f"{sorted(produced)}")


#: ``--quick``: small enough for a smoke run on a busy 2-core machine (a few minutes).
QUICK = OrchestrationBenchConfig(detectors=4, size_pix=1024, memory_detectors=(4, 16), memory_size_pix=512)


@dataclass(frozen=True)
class BarResult:
    """One bar: what was measured against which threshold.

    Attributes
    ----------
    bar
        Short name, starting with the bar's letter.
    measured
        The measured value, formatted.
    threshold
        The threshold, formatted.
    met
        Whether the bar is met (``None`` when it could not be measured).
    value
        The measured number (``None`` when not measured).
    notes
        How it was measured (run times, counts).
    """

    bar: str
    measured: str
    threshold: str
    met: bool | None
    value: float | None
    notes: str = ""


@dataclass(frozen=True)
class OrchestrationBenchResult:
    """All bars plus the raw per-run records.

    Attributes
    ----------
    bars
        One :class:`BarResult` per measured bar.
    runs
        Raw records (wall times, peak RSS, statuses) keyed by run name.
    config
        The configuration that was run.
    machine
        Machine description.
    total_s
        Wall time of the whole benchmark.
    """

    bars: tuple[BarResult, ...]
    runs: dict[str, Any] = field(default_factory=dict)
    config: OrchestrationBenchConfig = field(default_factory=OrchestrationBenchConfig)
    machine: str = ""
    total_s: float = 0.0


# --------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------
def survey_config(n_detectors: int, size_pix: int, *, seed: int = 7) -> Any:
    """One single-snap visit on a square mosaic that holds ``n_detectors`` detectors of ``size_pix``².

    The typical benchmark field (:func:`singleframe.sim.benchmark_config`), with two
    adjustments so that any mosaic calibrates like the benchmark frame: the radial
    distortion is scaled to move the mosaic's corners by the same ~2 px, and small
    detectors get a denser star field so each holds >= 1200 stars.
    """
    from .sim.config import benchmark_config

    base = benchmark_config(size_pix, "typical", seed=seed)
    n_side = math.isqrt(n_detectors - 1) + 1
    pitch_mm = size_pix * base.pixel_size_mm + base.gap_mm
    corner_mm = n_side * pitch_mm / math.sqrt(2.0)
    single_corner_mm = size_pix * base.pixel_size_mm / math.sqrt(2.0)
    area_deg2 = (size_pix * base.pixel_scale_arcsec / 3600.0) ** 2
    config = dataclasses.replace(
        base, n_side=n_side,
        distortion_k3_per_mm2=base.distortion_k3_per_mm2 * (single_corner_mm / corner_mm) ** 3,
        star_density_per_deg2=max(base.star_density_per_deg2, _MIN_STARS_PER_DETECTOR / area_deg2),
    )
    config.validate()
    return config


def simulate_visit(root: str, config: Any, n_detectors: int, *,
                   progress: Callable[[str], None] | None = None) -> int:
    """Write the camera, the reference catalogue and the post-ISR images of the first ``n_detectors`` detectors.

    Parameters
    ----------
    root
        Artifact store root.
    config
        A :class:`~singleframe.sim.SimulationConfig`; only its first visit is simulated.
    n_detectors
        How many detectors of the mosaic to simulate (in id order).
    progress
        Receives one line per simulated detector.

    Returns
    -------
    int
        The visit id.

    Notes
    -----
    Only the inputs the flow reads are written (no truth datasets), so a mosaic
    larger than ``n_detectors`` costs nothing extra.
    """
    from .io.refcat import write_refcat
    from .io.store import ArtifactStore
    from .sim.survey import make_camera, make_reference_catalog, simulate_detector

    config.validate()
    camera = make_camera(config)
    if not 1 <= n_detectors <= len(camera.detectors):
        raise ConfigError(f"n_detectors must lie in 1..{len(camera.detectors)} for this camera, got {n_detectors}")
    store = ArtifactStore(root)
    store.put("camera", camera.to_dict(), run=_INPUT_RUN, instrument=config.instrument)
    refcat = make_reference_catalog(config)
    write_refcat(store.root, _REFCAT, refcat)
    visit = config.visits[0]
    for det in camera.detectors[:n_detectors]:
        sim = simulate_detector(config, visit, det.id, refcat=refcat)
        for snap, exposure in enumerate(sim.snaps):
            store.put("post_isr_image", exposure, run=_INPUT_RUN, instrument=config.instrument,
                      visit=visit.visit, detector=det.id, snap=snap)
        if progress:
            progress(f"simulated detector {det.id} ({det.nx}x{det.ny}, {len(sim.truth.sources)} sources)")
    return visit.visit


# --------------------------------------------------------------------------------------
# Workers (each a fresh subprocess)
# --------------------------------------------------------------------------------------
class _RssSampler:
    """Samples this process's resident set size from /proc every ``interval_s`` (Linux)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.max_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_mb() -> float | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: only the peak from getrusage is reported
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = self.current_mb()
            if rss is not None:
                self.max_mb = max(self.max_mb, rss)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _peak_rss_mb() -> float:
    # ru_maxrss of this process alone (Dask workers are children and are not counted); KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker_direct(spec: dict[str, Any]) -> dict[str, Any]:
    """The flow's work without Prefect: every stage via ``run_stage``, then the plot, detector by detector."""
    from .flows.calibrate import CalibrateParams, discover_data_ids, run_context, run_stage
    from .flows.diagnostics import plot_detector_diagnostics
    from .flows.stages import STAGES
    from .io.store import ArtifactStore
    from .steps.config import load_calibrate_config

    statuses: dict[int, str] = {}
    rss_per_detector: list[float | None] = []
    done_s: list[float] = []
    with _RssSampler() as sampler:
        rss_start = _RssSampler.current_mb()
        t0 = time.perf_counter()
        config = load_calibrate_config(None)
        store = ArtifactStore(spec["store"])
        params = CalibrateParams(store=spec["store"], output_run=spec["output_run"], detectors=spec["detectors"])
        ctx = run_context(params, config, store)
        for data_id in discover_data_ids(store, params):
            try:
                for stage in STAGES:
                    run_stage(stage, ctx, data_id)
            except Exception as exc:  # the flow records such a failure and goes on; so does this loop
                statuses[data_id.detector] = f"failed: {type(exc).__name__}"
            else:
                plot_detector_diagnostics(store, run=ctx.output_run, data_id=data_id)
                store.get("detector_summary", run=ctx.output_run, instrument=data_id.instrument,
                          visit=data_id.visit, detector=data_id.detector)
                statuses[data_id.detector] = "ok"
            done_s.append(time.perf_counter() - t0)
            rss_per_detector.append(_RssSampler.current_mb())
        wall_s = time.perf_counter() - t0
    return {"wall_s": wall_s, "peak_rss_mb": _peak_rss_mb(), "sampled_peak_rss_mb": sampler.max_mb,
            "rss_start_mb": rss_start, "rss_per_detector_mb": rss_per_detector, "detector_done_s": done_s,
            "statuses": statuses}


def _worker_flow(spec: dict[str, Any]) -> dict[str, Any]:
    """One flow run of ``calibrate_visits`` against the server in ``PREFECT_API_URL``."""
    if spec.get("dask_workers"):  # as ``singleframe run --dask-workers`` does, before Prefect is imported
        from .runtime import start_worker_forkserver

        start_worker_forkserver()
    from .flows.calibrate import CalibrateParams, make_task_runner, run_calibration

    params = CalibrateParams(store=spec["store"], output_run=spec["output_run"], detectors=spec["detectors"],
                             max_workers=1)
    runner = make_task_runner(max_workers=1, dask_workers=spec.get("dask_workers"))
    rss_per_detector: list[float | None] = []
    done_s: list[float] = []

    def progress(done: int, total: int, failed: int) -> None:
        done_s.append(time.perf_counter() - t0)
        rss_per_detector.append(_RssSampler.current_mb())

    with _RssSampler() as sampler:
        rss_start = _RssSampler.current_mb()
        t0 = time.perf_counter()
        state = run_calibration(params, task_runner=runner, progress=progress)
        wall_s = time.perf_counter() - t0
    try:  # a run with failed detectors is Failed but holds every outcome
        outcomes = state.result(raise_on_failure=False)
    except Exception:
        outcomes = []
    statuses = {int(o["data_id"]["detector"]): ("ok" if o["status"] == "ok" else f"failed: {o.get('error')}")
                for o in (outcomes if isinstance(outcomes, list) else [])}
    return {"wall_s": wall_s, "peak_rss_mb": _peak_rss_mb(), "sampled_peak_rss_mb": sampler.max_mb,
            "rss_start_mb": rss_start, "rss_end_mb": _RssSampler.current_mb(),
            "rss_per_detector_mb": rss_per_detector, "detector_done_s": done_s, "state": state.name, "message": state.message,
            "statuses": statuses}


def _worker_simulate(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    config = survey_config(spec["detectors"], spec["size_pix"], seed=spec["seed"])
    visit = simulate_visit(spec["store"], config, spec["detectors"], progress=lambda msg: print(msg, flush=True))
    return {"wall_s": time.perf_counter() - t0, "visit": visit}


_WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "direct": _worker_direct, "flow": _worker_flow, "simulate": _worker_simulate}


# --------------------------------------------------------------------------------------
# Orchestrator: server, subprocesses, bars
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api_count(api_url: str, what: str) -> int | None:
    """Number of ``task_runs`` or ``flow_runs`` the server has recorded (None if it does not answer)."""
    req = urllib.request.Request(f"{api_url}/{what}/count", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(json.loads(resp.read()))
    except (OSError, ValueError):
        return None


def _wait_server_idle(api_url: str, timeout_s: float = 120.0) -> float:
    """Wait until the server's task-run count stops growing, so a backlog does not slow the next run."""
    t0 = time.perf_counter()
    last = _api_count(api_url, "task_runs")
    while time.perf_counter() - t0 < timeout_s:
        time.sleep(1.0)
        now = _api_count(api_url, "task_runs")
        if now == last:
            break
        last = now
    return time.perf_counter() - t0


class _Bench:
    """Runs the subprocesses of one benchmark in a scratch directory."""

    def __init__(self, work: Path, env: dict[str, str], log: Callable[[str], None]) -> None:
        self.work = work
        self.env = env
        self.log = log
        self.n = 0

    def spawn(self, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Run one worker subprocess of ``kind`` and return its record."""
        return self.spawn_together(kind, [spec])[0]

    def spawn_together(self, kind: str, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run one worker subprocess of ``kind`` per spec, all at once, and return their records.

        Each record gets ``process_wall_s``: from the start of all the commands to the end of
        its own (interpreter start, imports and exit included, as a user would time it).
        """
        t0 = time.perf_counter()
        started = []
        for spec in specs:
            self.n += 1
            out_json = self.work / f"run-{self.n:02d}-{kind}.json"
            log_path = self.work / f"run-{self.n:02d}-{kind}.log"
            log_fh = log_path.open("wb")
            proc = subprocess.Popen([sys.executable, "-m", "singleframe.orchestration_bench", "--worker", kind,
                                     json.dumps(spec), str(out_json)], env=self.env, stdout=log_fh,
                                    stderr=subprocess.STDOUT)
            started.append((proc, out_json, log_path, log_fh))
        ended: list[float | None] = [None] * len(started)
        while None in ended:  # the end of each, not just of the last
            for k, (proc, *_) in enumerate(started):
                if ended[k] is None and proc.poll() is not None:
                    ended[k] = time.perf_counter() - t0
            time.sleep(0.02)
        for *_, log_fh in started:
            log_fh.close()
        records = []
        for (proc, out_json, log_path, _), end_s in zip(started, ended, strict=True):
            if proc.returncode != 0:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{kind} run failed (exit {proc.returncode}); log {log_path}:\n{tail}")
            record: dict[str, Any] = json.loads(out_json.read_text())
            record["process_wall_s"] = end_s
            if kind == "flow" and record["state"] != "Completed":
                raise RuntimeError(f"flow run ended {record['state']}: {record['message']} (log {log_path})")
            records.append(record)
        return records


def _file_times(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _stages_of(paths: Sequence[str]) -> list[str]:
    """The stages whose outputs are among ``paths`` (store-relative paths under one run)."""
    from .flows.stages import STAGES

    producer = {name: s.name for s in STAGES for name in s.outputs}
    producer["diagnostics"] = "plot_diagnostics"
    names = {p.split("/", 1)[0] for p in paths}
    order = [s.name for s in STAGES] + ["plot_diagnostics"]
    return [s for s in order if s in {producer.get(n, n) for n in names}]


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _ok(record: dict[str, Any]) -> int:
    return sum(v == "ok" for v in record["statuses"].values())


def _pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def _steady_rate(done_s: Sequence[float], skip: int) -> float | None:
    """Detectors per second after the first ``skip`` finished (start-up excluded); None if too few."""
    if len(done_s) <= skip:
        return None
    dt = done_s[-1] - done_s[skip - 1]
    return (len(done_s) - skip) / dt if dt > 0 else None


def _timeline(record: dict[str, Any]) -> str:
    done = record.get("detector_done_s") or []
    if not done:
        return "no detector finished"
    per = f", then {(done[-1] - done[0]) / (len(done) - 1):.2f} s per detector" if len(done) > 1 else ""
    return f"first detector done after {done[0]:.2f} s{per}"


def _measure_visit(bench: _Bench, config: OrchestrationBenchConfig, api: str,
                   runs: dict[str, Any]) -> list[BarResult]:
    """Bars (a), (b), (c) on one simulated visit."""
    store_root = bench.work / "visit"
    sim = bench.spawn("simulate", {"store": str(store_root), "detectors": config.detectors,
                                   "size_pix": config.size_pix, "seed": config.seed})
    bench.log(f"simulated {config.detectors} x {config.size_pix}² in {sim['wall_s']:.1f} s")
    runs["simulate_visit"] = sim
    detectors = None  # every simulated detector
    base = {"store": str(store_root), "detectors": detectors}
    direct, flow, dask, plain = [], [], [], []
    rerun_bars: list[BarResult] = []
    for i in range(config.repeat):
        if "a" in config.bars:
            rec = bench.spawn("direct", {**base, "output_run": f"direct{i}"})
            direct.append(rec)
            bench.log(f"direct #{i}: {rec['wall_s']:.1f} s, {_ok(rec)} ok")
            shutil.rmtree(store_root / f"direct{i}", ignore_errors=True)
        _wait_server_idle(api)
        rec = bench.spawn("flow", {**base, "output_run": f"flow{i}"})
        flow.append(rec)
        bench.log(f"flow (1 thread) #{i}: {rec['wall_s']:.1f} s ({rec['process_wall_s']:.1f} s as a command), "
                  f"{rec['message']}")
        if i == 0 and "c" in config.bars:
            # Right after the first run, so no code or config change can come in between.
            rerun_bars = _measure_rerun(bench, config, api, store_root, f"flow{i}", rec, runs)
        shutil.rmtree(store_root / f"flow{i}", ignore_errors=True)
        if "b" in config.bars:
            _wait_server_idle(api)
            rec = bench.spawn("flow", {**base, "output_run": f"dask{i}", "dask_workers": config.dask_workers})
            dask.append(rec)
            bench.log(f"flow (Dask {config.dask_workers} processes) #{i}: {rec['wall_s']:.1f} s "
                      f"({rec['process_wall_s']:.1f} s as a command), {rec['message']}")
            shutil.rmtree(store_root / f"dask{i}", ignore_errors=True)
            # What the machine gives two processes this hour: the same stages without Prefect or
            # Dask, in one process, then in two side by side on half the detectors each.
            if "a" in config.bars:
                one = direct[-1]
            else:
                one = bench.spawn("direct", {**base, "output_run": f"solo{i}"})
                shutil.rmtree(store_root / f"solo{i}", ignore_errors=True)
            ids = sorted(int(d) for d in one["statuses"])
            shares = [ids[k::config.dask_workers] for k in range(config.dask_workers)]
            together = bench.spawn_together("direct", [{**base, "detectors": share, "output_run": f"side{i}-{k}"}
                                                       for k, share in enumerate(shares)])
            for k in range(config.dask_workers):
                shutil.rmtree(store_root / f"side{i}-{k}", ignore_errors=True)
            plain.append({"one": one, "side_by_side": together})
            bench.log(f"plain processes #{i}: one {one['process_wall_s']:.1f} s, {config.dask_workers} side by side "
                      f"{max(r['process_wall_s'] for r in together):.1f} s")
    runs.update({"direct": direct, "flow_1_thread": flow, "flow_dask": dask, "plain_processes": plain})
    n = config.detectors
    bars: list[BarResult] = []
    flow_s = _median([r["wall_s"] for r in flow])
    if direct:
        direct_s = _median([r["wall_s"] for r in direct])
        overhead = _pct(flow_s, direct_s)
        note = (f"flow {flow_s:.1f} s vs direct {direct_s:.1f} s (median of {config.repeat}); "
                f"{min(_ok(r) for r in flow)}/{n} and {min(_ok(r) for r in direct)}/{n} detectors ok")
        bars.append(BarResult(f"(a) orchestration overhead, {n} x {config.size_pix}², 1 thread",
                              f"{overhead:.1f} %", f"<= {OVERHEAD_BAR_PCT:.0f} %",
                              overhead <= OVERHEAD_BAR_PCT, overhead, note))
    if dask:
        dask_s, flow_cmd_s = (_median([r["process_wall_s"] for r in rs]) for rs in (dask, flow))
        speedup = flow_cmd_s / dask_s
        in_flow = flow_s / _median([r["wall_s"] for r in dask])
        serial_rate = _steady_rate(flow[0]["detector_done_s"], 1)
        dask_rate = _steady_rate(dask[0]["detector_done_s"], config.dask_workers)
        steady = (f"steady state (after the first detector per process) {dask_rate / serial_rate:.2f}x"
                  if serial_rate and dask_rate else "too few detectors for a steady-state rate")
        ceiling = ""
        if plain:
            one_s = _median([p["one"]["process_wall_s"] for p in plain])
            side_s = _median([max(r["process_wall_s"] for r in p["side_by_side"]) for p in plain])
            ceiling = (f"; the machine's ceiling: the same stages without Prefect or Dask take {side_s:.1f} s in "
                       f"{config.dask_workers} plain processes side by side against {one_s:.1f} s in one, "
                       f"{one_s / side_s:.2f}x, of which Dask reaches {100 * speedup * side_s / one_s:.0f} %")
        bars.append(BarResult(f"(b) Dask {config.dask_workers}-process throughput vs 1 process",
                              f"{speedup:.2f}x", f">= {DASK_SPEEDUP_BAR}x", speedup >= DASK_SPEEDUP_BAR, speedup,
                              f"Dask {dask_s:.1f} s vs 1-thread flow {flow_cmd_s:.1f} s, whole commands, medians "
                              f"(from the flow's call on: {in_flow:.2f}x){ceiling}; {steady}; Dask "
                              f"{_timeline(dask[0])}; 1 thread {_timeline(flow[0])}; "
                              f"{min(_ok(r) for r in dask)}/{n} detectors ok"))
    if direct and "rerun" in runs:
        # A re-run where every stage is cached is nearly all orchestration (Prefect's fixed cost and
        # per-task cost, plus the store's cache checks): a noise-robust estimate of the overhead.
        cached_s = runs["rerun"]["wall_s"]
        bars[0] = dataclasses.replace(bars[0], notes=f"{bars[0].notes}; all-cached re-run {cached_s:.2f} s = "
                                      f"{100 * cached_s / direct_s:.1f} % of direct")
    return bars + rerun_bars


def _measure_rerun(bench: _Bench, config: OrchestrationBenchConfig, api: str, store_root: Path, run: str,
                   first: dict[str, Any], runs: dict[str, Any]) -> list[BarResult]:
    """Bar (c): a finished run recomputes nothing; a deleted dataset re-runs only its producing stage."""
    from .flows.stages import STAGES
    from .io.store import ArtifactStore

    out = store_root / run
    before = _file_times(out)
    _wait_server_idle(api)
    rerun = bench.spawn("flow", {"store": str(store_root), "output_run": run, "detectors": None})
    after = _file_times(out)
    rewritten = sorted(p for p in after if after[p] != before.get(p))
    ratio = 100.0 * rerun["wall_s"] / first["wall_s"]
    bench.log(f"re-run: {rerun['wall_s']:.2f} s ({ratio:.1f} % of the first run), {len(rewritten)} files rewritten")
    bars = [
        BarResult("(c) re-run of a finished visit / first run", f"{ratio:.1f} %", f"<= {RERUN_RATIO_BAR_PCT:.0f} %",
                  ratio <= RERUN_RATIO_BAR_PCT, ratio,
                  f"re-run {rerun['wall_s']:.2f} s vs first {first['wall_s']:.1f} s; re-run {_timeline(rerun)}"),
        BarResult("(c) files rewritten by the re-run", str(len(rewritten)), "0", not rewritten,
                  float(len(rewritten)), ", ".join(rewritten[:5])),
    ]
    # One detector loses one dataset: its producing stage and every stage downstream of it must run
    # again (cache keys hold input versions: a re-produced input is new even if byte-identical).
    detector = min(int(d) for d, status in rerun["statuses"].items() if status == "ok")
    where = {"run": run, "instrument": _INSTRUMENT, "visit": runs["simulate_visit"]["visit"], "detector": detector}
    store = ArtifactStore(str(store_root))
    old_checksum = store.ref(config.delete_dataset, **where).checksum
    store.delete(config.delete_dataset, **where)
    producer = next(s.name for s in STAGES if config.delete_dataset in s.outputs)
    before = _file_times(out)
    _wait_server_idle(api)
    again = bench.spawn("flow", {"store": str(store_root), "output_run": run, "detectors": None})
    after = _file_times(out)
    rewritten = sorted(p for p in after if after[p] != before.get(p))
    ran = _stages_of(rewritten)
    identical = store.ref(config.delete_dataset, **where).checksum == old_checksum
    expected = {producer, *_downstream(producer)}
    bench.log(f"after deleting {config.delete_dataset} of detector {detector}: {again['wall_s']:.2f} s, "
              f"stages that ran: {ran}; recomputed dataset byte-identical: {identical}")
    runs.update({"rerun": rerun, "rerun_after_delete": {**again, "stages_ran": ran, "rewritten": rewritten,
                                                        "byte_identical": identical}})
    bars.append(BarResult(
        f"(c) delete {config.delete_dataset} of detector {detector}: stages that ran", ", ".join(ran) or "none",
        ", ".join(sorted(expected)), set(ran) == expected, None,
        f"{again['wall_s']:.2f} s; {len(rewritten)} files rewritten; recomputed {config.delete_dataset} "
        f"{'byte-identical' if identical else 'NOT byte-identical to the deleted one'}"))
    return bars


def _downstream(stage_name: str) -> list[str]:
    """Stages that read (directly or through others) an output of ``stage_name``, and the plot."""
    from .flows.stages import STAGES

    produced = set(next(s.outputs for s in STAGES if s.name == stage_name))
    found: list[str] = []
    for s in STAGES:  # STAGES is in dependency order
        if produced & set(s.inputs) and s.name != stage_name:
            found.append(s.name)
            produced |= set(s.outputs)
    return [*found, "plot_diagnostics"]


def _measure_memory(bench: _Bench, config: OrchestrationBenchConfig, api: str,
                    runs: dict[str, Any]) -> list[BarResult]:
    """Bar (d): peak RSS of the flow process on the small and the large run."""
    small, large = config.memory_detectors
    store_root = bench.work / "memory"
    sim = bench.spawn("simulate", {"store": str(store_root), "detectors": large,
                                   "size_pix": config.memory_size_pix, "seed": config.seed})
    bench.log(f"simulated {large} x {config.memory_size_pix}² in {sim['wall_s']:.1f} s")
    records = {}
    for n in (small, large):
        _wait_server_idle(api)
        # The first ``n`` detectors of the same store: the small run is a subset of the large one.
        rec = bench.spawn("flow", {"store": str(store_root), "output_run": f"mem{n}", "detectors": list(range(n))})
        records[n] = rec
        bench.log(f"memory run, {n} detectors: {rec['wall_s']:.1f} s, peak RSS {rec['peak_rss_mb']:.0f} MB, "
                  f"{rec['message']}")
        shutil.rmtree(store_root / f"mem{n}", ignore_errors=True)
    # The same work without Prefect tells which part of any growth is the orchestration's.
    direct = bench.spawn("direct", {"store": str(store_root), "output_run": "memdirect", "detectors": list(range(large))})
    bench.log(f"memory run without Prefect, {large} detectors: {direct['wall_s']:.1f} s, "
              f"peak RSS {direct['peak_rss_mb']:.0f} MB")
    runs["memory"] = {**{str(k): v for k, v in records.items()}, f"direct{large}": direct}
    a, b = records[small]["peak_rss_mb"], records[large]["peak_rss_mb"]
    growth = _pct(b, a)
    return [BarResult(f"(d) flow-process peak RSS, {small} -> {large} x {config.memory_size_pix}²",
                      f"{growth:+.1f} %", f"within +/-{MEMORY_FLAT_BAR_PCT:.0f} %",
                      abs(growth) <= MEMORY_FLAT_BAR_PCT, growth,
                      f"{a:.0f} -> {b:.0f} MB; {_rss_drift('flow', records[large])}; "
                      f"{_rss_drift('without Prefect', direct)} (peak {direct['peak_rss_mb']:.0f} MB); "
                      f"{_ok(records[large])}/{large} detectors ok")]


def _rss_drift(label: str, record: dict[str, Any]) -> str:
    """RSS after the first detector, after the middle one and after the last one."""
    rss = [r for r in record.get("rss_per_detector_mb") or [] if r is not None]
    if len(rss) < 2:
        return f"{label}: no per-detector RSS"
    mid = len(rss) // 2
    slope = (rss[-1] - rss[mid]) / (len(rss) - 1 - mid)
    return (f"{label} RSS after detector 1/{mid + 1}/{len(rss)}: {rss[0]:.0f}/{rss[mid]:.0f}/{rss[-1]:.0f} MB "
            f"({slope:+.2f} MB/detector over the second half)")


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.node()}"


def run_orchestration_bench(config: OrchestrationBenchConfig, *, work_dir: str | Path | None = None,
                            log: Callable[[str], None] = print) -> OrchestrationBenchResult:
    """Simulate, start a local Prefect server, measure the selected bars, stop the server.

    Parameters
    ----------
    config
        What to simulate and which bars to measure.
    work_dir
        Scratch directory (created; default: a new temporary directory). The caller removes it.
    log
        Receives one line per finished run.

    Returns
    -------
    OrchestrationBenchResult
        The bars and the raw records of every run.

    Raises
    ------
    ConfigError
        If ``config`` is invalid.
    RuntimeError
        If the server does not start or a run fails.
    """
    from .deployments.serve import prefect_env, start_server, stop, wait_healthy

    config.validate()
    t_start = time.perf_counter()
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="sf-orch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(api, PREFECT_HOME=str(work / "prefect_home"), **_ONE_THREAD)
    env.pop("PREFECT_API_KEY", None)
    runs: dict[str, Any] = {}
    bars: list[BarResult] = []
    with (work / "server.log").open("wb") as server_log:
        # Its own session: the server's uvicorn children are stopped with it.
        server = start_server(port, env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t0 = time.perf_counter()
            wait_healthy(api, timeout_s=240, proc=server)
            log(f"Prefect server healthy on {api} after {time.perf_counter() - t0:.1f} s")
            bench = _Bench(work, env, log)
            if {"a", "b", "c"} & set(config.bars):
                bars += _measure_visit(bench, config, api, runs)
            if "d" in config.bars:
                bars += _measure_memory(bench, config, api, runs)
            runs["server"] = {"task_runs": _api_count(api, "task_runs"), "flow_runs": _api_count(api, "flow_runs")}
        finally:
            stop([server])
    return OrchestrationBenchResult(tuple(bars), runs, config, _machine(), time.perf_counter() - t_start)


def format_markdown(result: OrchestrationBenchResult) -> str:
    """The bars as a Markdown table, with the run notes."""
    c = result.config
    lines = [f"singleframe orchestration benchmark (issue 6): {c.detectors} x {c.size_pix}² visit, memory runs "
             f"{c.memory_detectors[0]}/{c.memory_detectors[1]} x {c.memory_size_pix}², {c.repeat} repeat(s), "
             f"OMP_NUM_THREADS=1, local Prefect server (SQLite) ({result.machine}), total {result.total_s:.0f} s",
             "", "| bar | measured | threshold | met |", "|---|---|---|---|"]
    for b in result.bars:
        met = "n/a" if b.met is None else ("yes" if b.met else "**NO**")
        lines.append(f"| {b.bar} | {b.measured} | {b.threshold} | {met} |")
    lines += ["", "Notes:", ""] + [f"- {b.bar}: {b.notes}" for b in result.bars if b.notes]
    server = result.runs.get("server")
    if server:
        lines.append(f"- server recorded {server['task_runs']} task runs in {server['flow_runs']} flow runs")
    return "\n".join(lines) + "\n"


def write_results(result: OrchestrationBenchResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``orchestration-<stamp>.{md,json}`` and ``orchestration-latest.{md,json}``; return the stamped pair."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    payload = {"machine": result.machine, "total_s": result.total_s, "config": dataclasses.asdict(result.config),
               "bars": [dataclasses.asdict(b) for b in result.bars], "runs": result.runs}
    text, md = json.dumps(payload, indent=1), format_markdown(result)
    paths = (out / f"orchestration-{stamp}.md", out / f"orchestration-{stamp}.json")
    paths[0].write_text(md)
    paths[1].write_text(text)
    (out / "orchestration-latest.md").write_text(md)
    (out / "orchestration-latest.json").write_text(text)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m singleframe.orchestration_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", type=int, default=None, help="detectors of the visit of bars a-c (default 20)")
    parser.add_argument("--size", type=int, default=None, help="their width and height in pixels (default 4096)")
    parser.add_argument("--memory-detectors", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="detector counts of bar d (default 10 100)")
    parser.add_argument("--memory-size", type=int, default=None, help="detector size of bar d (default 512)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK.detectors} x {QUICK.size_pix}², memory "
                             f"{QUICK.memory_detectors[0]}/{QUICK.memory_detectors[1]} x {QUICK.memory_size_pix}²")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of direct / flow / Dask (medians)")
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument("--delete-dataset", default="star_catalog", help="dataset deleted in bar c")
    parser.add_argument("--bars", default="abcd", help="bars to measure, e.g. 'ac' (default abcd)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, spec, out_json = args.worker
        Path(out_json).write_text(json.dumps(_WORKERS[kind](json.loads(spec))))
        return 0
    base = QUICK if args.quick else OrchestrationBenchConfig()
    overrides = {"detectors": args.detectors, "size_pix": args.size, "memory_size_pix": args.memory_size,
                 "memory_detectors": tuple(args.memory_detectors) if args.memory_detectors else None}
    config = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None},
                                 repeat=args.repeat, dask_workers=args.dask_workers,
                                 delete_dataset=args.delete_dataset, bars=tuple(sorted(set(args.bars))))
    try:
        config.validate()
    except ConfigError as exc:
        parser.error(str(exc))
    from .benchmarks import compile_package_bytecode

    compile_package_bytecode()  # each timed run is a fresh process: imports, not compilation
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="sf-orch-bench-"))
    try:
        result = run_orchestration_bench(config, work_dir=work, log=lambda msg: print(msg, flush=True))
    finally:
        if args.keep:
            print(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    md_path, _ = write_results(result, args.out)
    print(format_markdown(result))
    print(f"wrote {md_path} and {md_path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
