"""Operating the flow: retries, failure isolation, caching speed, kill-and-resume, artifacts.

A tiny survey (one single-snap visit, 2x2 detectors of 640x512) keeps each
flow run to a few seconds; all runs share the session's Prefect test server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from singleframe.errors import TransientIOError
from singleframe.io.store import PROVENANCE_SUFFIX, ArtifactStore

pytestmark = pytest.mark.slow

OUTPUTS = ("preliminary_visit_image", "preliminary_visit_image_background", "single_visit_star_unstandardized",
           "single_visit_psf_star", "single_visit_psf_star_footprints", "initial_astrometry_match_detector",
           "initial_photometry_match_detector", "initial_photoCalib_detector")
VISIT = 2
BROKEN = 3


def make_tiny_survey(root: Path) -> ArtifactStore:
    """One single-snap visit on 2x2 detectors of 640x512 (~100 PSF stars each: dense star field)."""
    from singleframe.flows.simulate import write_simulated_survey
    from singleframe.sim.config import SimulationConfig, _demo_visits

    store = ArtifactStore(str(root))
    config = dataclasses.replace(SimulationConfig(), nx=640, ny=512, visits=_demo_visits()[1:],
                                 star_density_per_deg2=3.0e5)
    write_simulated_survey(store, config)
    return store


def _where(detector: int, run: str = "calib") -> dict:
    return {"run": run, "instrument": "SimCam", "visit": VISIT, "detector": detector}


def _data_files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> dict:
    from singleframe.flows.calibrate import CalibrateParams, run_calibration

    root = tmp_path_factory.mktemp("ops")
    store = make_tiny_survey(root)
    params = CalibrateParams(store=str(root), max_workers=2)
    lines: list[tuple[int, int, int]] = []
    t0 = time.perf_counter()
    state = run_calibration(params, progress=lambda *a: lines.append(a))
    first_s = time.perf_counter() - t0
    return {"root": root, "store": store, "params": params, "state": state, "first_s": first_s,
            "progress": lines}


def test_first_run_completes_with_progress_reports(survey: dict) -> None:
    assert survey["state"].is_completed(), survey["state"].message
    assert survey["state"].message == "4 of 4 detectors calibrated, 0 failed"
    # One report per finished detector, counting up to the total.
    assert [done for done, _, _ in survey["progress"]] == [1, 2, 3, 4]
    assert all(total == 4 and failed == 0 for _, total, failed in survey["progress"])


def test_prefect_keeps_no_result_records_in_the_store(survey: dict) -> None:
    # Every file under the store is a dataset, its provenance, or a diagnostic plot and its key:
    # Prefect's own records (none are persisted) never land beside the products.
    for path in _data_files(survey["root"]):
        rel = path.relative_to(survey["root"]).as_posix()
        assert (rel.endswith(PROVENANCE_SUFFIX) or rel.endswith((".fits", ".parquet", ".json", ".png"))
                or "/refcat/" in f"/{rel}"), rel
        assert not rel.endswith(".tmp"), rel


def test_rerun_of_a_finished_visit_recomputes_nothing(survey: dict) -> None:
    from singleframe.flows.calibrate import run_calibration

    before = _data_files(survey["root"])
    t0 = time.perf_counter()
    state = run_calibration(survey["params"])
    rerun_s = time.perf_counter() - t0
    assert state.is_completed()
    # Every dataset and sidecar is byte-for-byte and mtime-for-mtime unchanged: nothing ran again.
    assert _data_files(survey["root"]) == before, "a finished visit must recompute nothing"
    # Times are reported, never asserted (shared, noisy machines): the <= 5 % bar of issue 6 is
    # measured on the demo survey (see README, "Running it like a survey").
    print(f"\nfirst run {survey['first_s']:.2f} s, re-run {rerun_s:.2f} s "
          f"({100 * rerun_s / survey['first_s']:.1f} %)")


def test_a_moved_store_keeps_its_caches_and_a_truncated_output_is_recomputed(
        survey: dict, tmp_path: Path) -> None:
    import shutil

    from singleframe.flows.calibrate import run_calibration

    # A finished store copied elsewhere (moved, mounted at another path, reached through a
    # symlink) is the same store: the caches are keyed on datasets, not on where the root is.
    moved = tmp_path / "moved store"
    shutil.copytree(survey["root"], moved)
    params = survey["params"].model_copy(update={"store": str(moved)})
    before = _data_files(moved)
    state = run_calibration(params)
    assert state.is_completed(), state.message
    assert _data_files(moved) == before, "a moved store must recompute nothing"

    # An output truncated outside the store is not a finished product: its stage and the stages
    # downstream of it run again; the other detectors stay as they are.
    store = ArtifactStore(str(moved))
    image = moved / "calib" / "preliminary_visit_image" / "SimCam" / f"visit-{VISIT}" / "det-000.fits"
    characterized = moved / "calib" / "characterized_image" / "SimCam" / f"visit-{VISIT}" / "det-001.fits"
    for path in (image, characterized):
        with open(path, "r+b") as f:
            f.truncate(100_000)
    untouched = {p: t for p, t in before.items() if "det-002" in p.name or "det-003" in p.name}
    state = run_calibration(params)
    assert state.message == "4 of 4 detectors calibrated, 0 failed"
    for det in range(4):
        for name in OUTPUTS:
            store.get(name, **_where(det))  # every size matches the store's record again
    assert image.stat().st_size > 100_000 and characterized.stat().st_size > 100_000
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched


def test_artifacts_per_visit_table_progress_and_plot_links(survey: dict) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        def latest(key: str):
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert found, f"no artifact {key}"
            return max(found, key=lambda a: a.created)

        table = latest(f"calibration-calib-visit-{VISIT}")
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        assert sorted(r["detector"] for r in rows) == [0, 1, 2, 3]
        assert all(r["status"] == "ok" and r["psfSigma"] > 0 for r in rows)
        progress = latest(f"progress-calib-visit-{VISIT}")
        assert float(progress.data) == pytest.approx(100.0)
        links = latest(f"diagnostics-calib-visit-{VISIT}")
        assert links.data.count(".png)") == 4
    png = survey["root"] / "calib" / "diagnostics" / "SimCam" / f"visit-{VISIT}" / "det-000.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transient_errors_are_retried_and_algorithmic_failures_are_not(
        survey: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from singleframe.flows.calibrate import CalibrateParams, run_calibration

    store: ArtifactStore = survey["store"]
    # Detector 3's raw snap becomes pure noise in a separate input run: PSF fitting must fail.
    raw = store.get("post_isr_image", **{**_where(BROKEN, "raw"), "snap": 0})
    rng = np.random.default_rng(3)
    blank = raw.replace(image=rng.normal(0.0, 30.0, raw.shape).astype(np.float32),
                        variance=np.full(raw.shape, 900.0, np.float32))
    for det, exposure in ((0, store.get("post_isr_image", **{**_where(0, "raw"), "snap": 0})), (BROKEN, blank)):
        store.put("post_isr_image", exposure, **{**_where(det, "faulty_raw"), "snap": 0})

    reads: dict[tuple[str, int], int] = {}
    original = ArtifactStore.get_ref

    def flaky_get_ref(self: ArtifactStore, ref, **kw):
        key = (ref.dataset_type, ref.detector)
        reads[key] = reads.get(key, 0) + 1
        # The first two reads of detector 0's characterized image fail as a network hiccup would.
        if key == ("characterized_image", 0) and reads[key] <= 2:
            raise TransientIOError("injected: connection reset while reading", uri=ref.uri)
        return original(self, ref, **kw)

    monkeypatch.setattr(ArtifactStore, "get_ref", flaky_get_ref)
    params = CalibrateParams(store=str(survey["root"]), input_run="faulty_raw", output_run="faults", max_workers=2)
    state = run_calibration(params)
    assert state.message == "1 of 2 detectors calibrated, 1 failed"
    outcomes = {o["data_id"]["detector"]: o for o in state.result(raise_on_failure=False)}
    assert outcomes[0]["status"] == "ok"
    # Stage correct_apertures read the image twice in vain, then once more successfully.
    assert reads[("characterized_image", 0)] >= 3
    assert outcomes[BROKEN]["status"] == "failed" and outcomes[BROKEN]["stage"] == "characterize"
    # The unprocessable detector's single snap was read exactly once: no retry of a PsfFitError.
    assert reads[("post_isr_image", BROKEN)] == 1
    assert store.exists("detector_failure", **_where(BROKEN, "faults"))


def _check_complete_and_consistent(root: Path, run: str) -> None:
    """Every dataset file has its sidecar, whose checksum matches the bytes; no temporary files."""
    run_root = root / run
    assert not list(run_root.rglob("*.tmp")), "a temporary file was left behind"
    for sidecar in run_root.rglob(f"*{PROVENANCE_SUFFIX}"):
        data = Path(str(sidecar)[: -len(PROVENANCE_SUFFIX)])
        assert data.exists(), sidecar
        record = json.loads(sidecar.read_text())
        assert hashlib.sha256(data.read_bytes()).hexdigest() == record["checksum"], data


def test_killed_worker_then_rerun_completes_without_recomputing_finished_detectors(survey: dict) -> None:
    from prefect.settings import PREFECT_API_URL

    from singleframe.flows.calibrate import CalibrateParams, run_calibration

    root: Path = survey["root"]
    store: ArtifactStore = survey["store"]
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    cmd = [str(Path(sys.executable).with_name("singleframe")), "run", "--store", str(root),
           "--output-run", "killed", "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    def finished_detectors() -> list[int]:
        # The plot's key file is the last thing a detector writes.
        return [d for d in range(4)
                if (root / "killed" / "diagnostics" / "SimCam" / f"visit-{VISIT}" / f"det-{d:03d}.png.key.json").exists()]

    finished: list[int] = []
    try:
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and proc.poll() is None and not finished:
            finished = finished_detectors()
            time.sleep(0.05)
        assert finished, "no detector finished within 120 s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-visit"
    assert len(finished_detectors()) < 4, "the kill came after the last detector"
    done_det = finished[0]
    before = {p: p.stat().st_mtime_ns for p in (root / "killed").rglob(f"*det-{done_det:03d}*")}

    state = run_calibration(CalibrateParams(store=str(root), output_run="killed", max_workers=2))
    assert state.message == "4 of 4 detectors calibrated, 0 failed"
    after = {p: p.stat().st_mtime_ns for p in (root / "killed").rglob(f"*det-{done_det:03d}*")}
    assert after == before, "a detector finished before the kill was computed again"
    _check_complete_and_consistent(root, "killed")
    for det in range(4):
        for name in OUTPUTS:
            store.get(name, **_where(det, "killed"))  # opens: nothing partial or corrupt


def _refcat_table(store: ArtifactStore, name: str):
    from astropy.table import vstack

    from singleframe.io.formats import table_from_parquet_bytes
    from singleframe.io.refcat import read_refcat_info

    info = read_refcat_info(store, name)
    return vstack([table_from_parquet_bytes(store.get_bytes(f"refcats/{name}/nside{info.nside}/{p}.parquet"))
                   for p in info.pixels])


def test_an_input_truncated_outside_the_store_fails_its_detector_on_every_rerun(survey: dict) -> None:
    # Not "8 of 8 calibrated, nothing rewritten" from the earlier bytes: the size on disk is part
    # of the input's version, so the rerun reads it, and the read says what happened.
    from singleframe.flows.calibrate import CalibrateParams, run_calibration

    root: Path = survey["root"]
    store: ArtifactStore = survey["store"]
    store.put("post_isr_image", store.get("post_isr_image", **{**_where(0, "raw"), "snap": 0}),
              **{**_where(0, "tampered_raw"), "snap": 0})
    params = CalibrateParams(store=str(root), input_run="tampered_raw", output_run="tampered", max_workers=1)
    assert run_calibration(params).message == "1 of 1 detectors calibrated, 0 failed"
    path = next((root / "tampered_raw").rglob("snap-0.fits"))
    path.write_bytes(path.read_bytes()[:100_000])
    for _ in range(2):
        state = run_calibration(params)
        assert state.is_failed() and state.message == "0 of 1 detectors calibrated, 1 failed"
        (outcome,) = state.result(raise_on_failure=False)
        assert outcome["stage"] == "characterize" and "changed outside the store" in outcome["message"]
        assert store.exists("detector_failure", **_where(0, "tampered"))


def test_a_reingested_refcat_recomputes_the_calibrations_that_read_it(survey: dict) -> None:
    from singleframe.flows.calibrate import CalibrateParams, run_calibration
    from singleframe.io.refcat import refcat_version, write_refcat

    root: Path = survey["root"]
    store: ArtifactStore = survey["store"]
    table = _refcat_table(store, "refcat")
    write_refcat(store, "refcat_b", table)
    params = CalibrateParams(store=str(root), output_run="recat", refcat="refcat_b", detectors=[0], max_workers=1)
    assert run_calibration(params).message == "1 of 1 detectors calibrated, 0 failed"
    before = _data_files(root / "recat")
    # The same catalogue written again has the same checksum: nothing is recomputed.
    old_version = refcat_version(store, "refcat_b")
    write_refcat(store, "refcat_b", table)
    assert refcat_version(store, "refcat_b") == old_version
    assert run_calibration(params).is_completed() and _data_files(root / "recat") == before
    # A corrected catalogue (here: every tenth star dropped) under the same name recomputes the
    # stages that read it and everything downstream, and nothing upstream.
    write_refcat(store, "refcat_b", table[np.arange(len(table)) % 10 != 0])
    assert refcat_version(store, "refcat_b") != old_version
    assert run_calibration(params).is_completed()
    after = _data_files(root / "recat")
    det = f"visit-{VISIT}/det-000"

    def rewritten(dataset: str) -> bool:
        (path,) = [p for p in before if f"/{dataset}/" in p.as_posix() and det in p.as_posix()
                   and not p.name.endswith(PROVENANCE_SUFFIX)]
        return after[path] != before[path]

    assert not rewritten("characterized_image") and not rewritten("aperture_correction")
    for dataset in ("initial_astrometry_match_detector", "single_visit_psf_star", "initial_photoCalib_detector",
                    "preliminary_visit_image", "single_visit_star_unstandardized"):
        assert rewritten(dataset), dataset


def test_another_refcat_for_a_finished_output_run_is_refused_unless_rerun(survey: dict) -> None:
    # Calibrating a finished run against another catalogue would replace its products, or delete
    # them where the new catalogue does not cover the field: refused, as another config is.
    from singleframe.flows.calibrate import CalibrateParams, run_calibration
    from singleframe.io.refcat import write_refcat

    root: Path = survey["root"]
    store: ArtifactStore = survey["store"]
    write_refcat(store, "refcat_other", _refcat_table(store, "refcat"))
    params = CalibrateParams(store=str(root), output_run="onecat", detectors=[0], max_workers=1)
    assert run_calibration(params).is_completed()
    before = _data_files(root / "onecat")
    state = run_calibration(params.model_copy(update={"refcat": "refcat_other"}))
    assert state.is_failed()
    with pytest.raises(Exception, match="calibrated against reference catalogue 'refcat', not 'refcat_other'.*--rerun"):
        state.result()
    assert _data_files(root / "onecat") == before
    state = run_calibration(params.model_copy(update={"refcat": "refcat_other", "rerun": True}))
    assert state.message == "1 of 1 detectors calibrated, 0 failed"
    assert store.get("calibrate_config", run="onecat", instrument="SimCam")["refcat"] == "refcat_other"


def test_a_missing_refcat_fails_the_run_before_any_detector_starts(survey: dict) -> None:
    from singleframe.flows.calibrate import CalibrateParams, run_calibration

    params = CalibrateParams(store=str(survey["root"]), output_run="norefcat", refcat="no_such_catalogue")
    state = run_calibration(params)
    assert state.is_failed()
    with pytest.raises(Exception, match="reference catalogue 'no_such_catalogue' is not in the store.*ingest-refcat"):
        state.result()
    assert not (survey["root"] / "norefcat").exists()  # not a pixel read, nothing written


def test_a_failed_rerun_removes_the_outputs_it_would_have_replaced(
        survey: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from singleframe.errors import AstrometryError
    from singleframe.flows.calibrate import CalibrateParams, run_calibration
    from singleframe.steps import pipeline

    store: ArtifactStore = survey["store"]
    params = CalibrateParams(store=str(survey["root"]), output_run="stale", detectors=[0, 1], max_workers=1)
    assert run_calibration(params).message == "2 of 2 detectors calibrated, 0 failed"

    def no_astrometry(*args, **kwargs):
        raise AstrometryError("injected: no match")

    monkeypatch.setattr(pipeline, "calibrate_astrometry", no_astrometry)
    # The detector-failure record of detector 1 cannot be written (the store is down for it):
    # the visit still completes, and the outcome says the record is missing.
    original_put = ArtifactStore.put

    def put(self: ArtifactStore, dataset_type: str, obj, **kw):
        if dataset_type == "detector_failure" and kw.get("detector") == 1:
            raise TransientIOError("injected: store unreachable", uri="")
        return original_put(self, dataset_type, obj, **kw)

    monkeypatch.setattr(ArtifactStore, "put", put)
    state = run_calibration(params.model_copy(update={"rerun": True}))
    assert state.message == "0 of 2 detectors calibrated, 2 failed"
    outcomes = {o["data_id"]["detector"]: o for o in state.result(raise_on_failure=False)}
    assert outcomes[0]["stage"] == "calibrate_astrometry" and "record_error" not in outcomes[0]
    assert "TransientIOError" in outcomes[1]["record_error"]
    where = _where(0, "stale")
    assert store.exists("detector_failure", **where)
    # What the stages before astrometry made in this run stays; what astrometry and later stages
    # made in the earlier run is gone, so no stale product sits next to the failure.
    for name in ("characterized_image", "aperture_correction", "single_visit_psf_star_footprints"):
        assert store.exists(name, **where), name
    for name in ("single_visit_psf_star", "initial_astrometry_match_detector", "preliminary_visit_image",
                 "single_visit_star_unstandardized", "initial_photoCalib_detector", "detector_summary"):
        assert not store.exists(name, **where), name


def test_a_bug_is_recorded_with_the_frames_where_it_happened(survey: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # An unexpected error (not a SingleframeError) is a bug: its record must show where it was
    # raised, not only the task machinery around it.
    from singleframe.flows.calibrate import CalibrateParams, run_calibration
    from singleframe.steps import pipeline

    def deep_helper_that_fails():
        raise IndexError("injected: boolean index did not match")

    def buggy_astrometry(*args, **kwargs):
        deep_helper_that_fails()

    monkeypatch.setattr(pipeline, "calibrate_astrometry", buggy_astrometry)
    params = CalibrateParams(store=str(survey["root"]), output_run="bug", detectors=[1], max_workers=1)
    assert run_calibration(params).message == "0 of 1 detectors calibrated, 1 failed"
    record = survey["store"].get("detector_failure", **_where(1, "bug"))
    assert record["expected"] is False and record["failure.type"] == "builtins.IndexError"
    tb = record["traceback"]
    assert "in deep_helper_that_fails" in tb and "in buggy_astrometry" in tb
    assert tb.rstrip().endswith("IndexError: injected: boolean index did not match")


def test_other_code_recomputes_and_a_worker_with_other_code_refuses(
        survey: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from singleframe.flows import calibrate
    from singleframe.flows.calibrate import CalibrateParams, run_calibration

    root: Path = survey["root"]
    store: ArtifactStore = survey["store"]
    params = CalibrateParams(store=str(root), output_run="codever", detectors=[0], max_workers=1)
    assert run_calibration(params).is_completed()
    before = _data_files(root / "codever")
    assert run_calibration(params).is_completed() and _data_files(root / "codever") == before
    # Edited code (another source fingerprint): every stage recomputes, and the run's config
    # record names the new code.
    monkeypatch.setattr(calibrate, "code_fingerprint", lambda: "edited")
    assert run_calibration(params).message == "1 of 1 detectors calibrated, 0 failed"
    after = _data_files(root / "codever")
    products = [p for p in before if "/preliminary_visit_image/" in p.as_posix() or "/characterized_image/" in p.as_posix()]
    assert products and all(after[p] != before[p] for p in products)
    assert "+edited;" in store.get("calibrate_config", run="codever", instrument="SimCam")["code_version"]
    # A worker whose code differs from the flow's (a Dask cluster started before an upgrade)
    # refuses to compute; the detector fails with the reason, and its current products are kept.
    flow_context = calibrate.run_context
    monkeypatch.setattr(calibrate, "run_context",
                        lambda *a: flow_context(*a).model_copy(update={"code_version": "0.0.0+newer"}))
    state = run_calibration(params.model_copy(update={"rerun": True}))
    (outcome,) = state.result(raise_on_failure=False)
    assert outcome["status"] == "failed" and "runs other code than the flow" in outcome["message"]
    assert "restart the workers" in outcome["message"]
    assert _data_files(root / "codever").keys() >= set(products)  # nothing deleted


def test_a_dead_detector_task_is_a_recorded_failure_not_a_failed_flow(
        survey: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from singleframe.flows import calibrate
    from singleframe.flows.calibrate import CalibrateParams, run_calibration

    store: ArtifactStore = survey["store"]
    params = CalibrateParams(store=str(survey["root"]), output_run="dead", detectors=[0, 1], max_workers=1)
    assert run_calibration(params).message == "2 of 2 detectors calibrated, 0 failed"
    original = calibrate.calibrate_detector.fn

    def dies_on_detector_1(ctx, data_id):
        if data_id.detector == 1:
            raise MemoryError("injected: the worker was killed")
        return original(ctx, data_id)

    monkeypatch.setattr(calibrate.calibrate_detector, "fn", dies_on_detector_1)
    state = run_calibration(params.model_copy(update={"rerun": True}))
    assert state.is_failed() and state.message == "1 of 2 detectors calibrated, 1 failed"
    outcomes = {o["data_id"]["detector"]: o for o in state.result(raise_on_failure=False)}
    assert outcomes[1]["stage"] == "orchestration" and outcomes[1]["error"] == "MemoryError"
    # The stage it reached is unknown: its record is written and none of its products is left
    # behind as if current.
    where = _where(1, "dead")
    assert store.get("detector_failure", **where)["stage"] == "orchestration"
    assert not store.exists("characterized_image", **where) and not store.exists("preliminary_visit_image", **where)
    assert store.exists("preliminary_visit_image", **_where(0, "dead"))


def test_a_deployment_run_keeps_max_workers_detectors_in_flight(
        survey: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # A UI or scheduled run calls the flow itself (its decorator's task runner), not run_calibration:
    # the form's max_workers must still bound how many detectors run at once (each holds ~1 GB at 4096²).
    import threading

    from singleframe.flows import calibrate
    from singleframe.flows.calibrate import CalibrateParams

    original = calibrate.calibrate_detector.fn
    lock = threading.Lock()
    running = [0]
    most = [0]

    def counted(ctx, data_id):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.3)  # the finished run's stages are cached: make the detectors overlap if allowed to
            return original(ctx, data_id)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(calibrate.calibrate_detector, "fn", counted)
    for workers in (1, 3):  # the second run finds the first's outputs current: only the sleep is left
        most[0] = 0
        params = CalibrateParams(store=str(survey["root"]), output_run="in-flight", detectors=[0, 1, 2],
                                 max_workers=workers)
        state = calibrate.calibrate_visits(params, return_state=True)
        assert len(state.result(raise_on_failure=False)) == 3
        assert most[0] == workers


def test_a_new_config_reruns_a_whole_output_run_or_none_of_it(survey: dict, tmp_path: Path) -> None:
    # An output run holds one config's products. A --rerun with another config on part of its
    # detectors would leave the others under a record that names the new config: refused before
    # any pixel. Rerunning all of it is fine, and an output the new config switches off is
    # deleted, not left behind as if the new config had made it.
    from singleframe.errors import ConfigError
    from singleframe.flows.calibrate import CalibrateParams, prepare_run, run_calibration

    store: ArtifactStore = survey["store"]
    first = CalibrateParams(store=str(survey["root"]), output_run="reconfigured", detectors=[0, 1], max_workers=2)
    assert run_calibration(first).message == "2 of 2 detectors calibrated, 0 failed"
    assert store.exists("single_visit_psf_star_footprints", **_where(0, "reconfigured"))
    config_file = tmp_path / "no_optional_outputs.yaml"
    config_file.write_text("optional_outputs: []\n")
    partial = first.model_copy(update={"config_file": str(config_file), "rerun": True, "detectors": [0]})
    with pytest.raises(ConfigError, match=r"holds products of 1 detector\(s\) outside this selection \(visit, "
                                          r"detector \(2, 1\)\).*drop --visits/--detectors"):
        prepare_run(partial)
    whole = partial.model_copy(update={"detectors": [0, 1]})
    assert run_calibration(whole).message == "2 of 2 detectors calibrated, 0 failed"
    for det in (0, 1):
        assert not store.exists("single_visit_psf_star_footprints", **_where(det, "reconfigured"))
        assert store.exists("single_visit_psf_star", **_where(det, "reconfigured"))  # a later stage reads it


def test_an_upgrade_that_adds_settings_does_not_refuse_the_runs_it_made(tmp_path: Path) -> None:
    # A config record written before a setting existed reads, with today's defaults, as today's
    # config: no refusal. A setting the user changed is refused, and named.
    from singleframe.errors import ConfigError
    from singleframe.flows.calibrate import RunContext, _check_config_record
    from singleframe.steps.config import load_calibrate_config

    store = ArtifactStore(str(tmp_path / "store"))
    config = load_calibrate_config(None)
    ctx = RunContext(store=store.root, input_run="raw", output_run="calib", refcat="refcat",
                     config=config.to_dict(), config_hash=config.hash, code_version="new")
    old = config.to_dict()
    del old["summary"]["warn_psf_delta_e"]  # as an earlier version wrote it
    record = {"config": old, "config_hash": "0123456789abcdef", "refcat": "refcat", "code_version": "old"}
    store.put("calibrate_config", record, run="calib", instrument="Cam")
    assert _check_config_record(store, ctx, "Cam") is True  # rewritten with the new hash, not refused
    old["astrometry"]["min_matches"] = 7
    store.put("calibrate_config", {**record, "config": old}, run="calib", instrument="Cam")
    with pytest.raises(ConfigError, match=r"they differ in astrometry.min_matches\)"):
        _check_config_record(store, ctx, "Cam")
