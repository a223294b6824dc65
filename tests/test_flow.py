"""End to end: the Prefect flow on a small simulated survey in a temporary store.

One simulation and one flow run are shared by the tests of this module (the
flow takes ~1 s per small detector plus Prefect's start-up), under the
session's ``prefect_test_harness``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from singleframe.exposure import Exposure
from singleframe.io.store import ArtifactStore
from singleframe.masks import plane_bits

pytestmark = pytest.mark.slow

OUTPUTS = (
    "preliminary_visit_image", "preliminary_visit_image_background", "single_visit_star_unstandardized",
    "single_visit_psf_star", "single_visit_psf_star_footprints", "initial_astrometry_match_detector",
    "initial_photometry_match_detector", "initial_photoCalib_detector",
)
BROKEN_DETECTOR = 3


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> dict:
    from singleframe.flows.calibrate import CalibrateParams, run_calibration
    from singleframe.flows.simulate import write_simulated_survey
    from singleframe.sim.config import SimulationConfig, _demo_visits

    root = tmp_path_factory.mktemp("store")
    store = ArtifactStore(str(root))
    # One two-snap visit on 2x2 detectors of 1024x768: small but with ~150 PSF stars each.
    config = dataclasses.replace(SimulationConfig(), nx=1024, ny=768, visits=_demo_visits()[:1])
    write_simulated_survey(store, config)
    # Detector 3 gets blank snaps (noise only): it must fail alone, with a recorded reason.
    rng = np.random.default_rng(0)
    for snap in (0, 1):
        where = {"run": "raw", "instrument": "SimCam", "visit": 1, "detector": BROKEN_DETECTOR, "snap": snap}
        e: Exposure = store.get("post_isr_image", **where)
        blank = rng.normal(0.0, 20.0, e.shape).astype(np.float32)
        store.put("post_isr_image", e.replace(image=blank, variance=np.full(e.shape, 400.0, np.float32)), **where)
    params = CalibrateParams(store=str(root), max_workers=2)
    state = run_calibration(params)
    return {"root": root, "store": store, "params": params, "state": state}


def _where(detector: int) -> dict:
    return {"run": "calib", "instrument": "SimCam", "visit": 1, "detector": detector}


def test_flow_calibrates_every_other_detector_and_fails_the_run(survey: dict) -> None:
    # The failed detector does not stop the others; the run's state says it is not whole
    # (max_failed_fraction 0), so an alert on failed runs fires.
    state = survey["state"]
    assert state.is_failed()
    assert state.message == "3 of 4 detectors calibrated, 1 failed"
    outcomes = {o["data_id"]["detector"]: o for o in state.result(raise_on_failure=False)}
    assert [o["status"] for d, o in sorted(outcomes.items()) if d != BROKEN_DETECTOR] == ["ok"] * 3
    assert outcomes[BROKEN_DETECTOR]["status"] == "failed"
    assert outcomes[BROKEN_DETECTOR]["stage"] == "characterize"
    failure = survey["store"].get("detector_failure", **_where(BROKEN_DETECTOR))
    assert failure["failure.type"].endswith("PsfFitError")
    assert failure["expected"] is True
    # The record names the input files that could not be processed.
    assert any("post_isr_image" in uri and "det-003" in uri for uri in failure["failure.metadata.input_uris"])
    for det in (0, 1, 2):
        assert outcomes[det]["status"] == "ok", outcomes[det]
        assert not survey["store"].exists("detector_failure", **_where(det))


def test_evaluation_has_a_row_per_detector_of_the_run_and_says_why_one_failed(survey: dict) -> None:
    from singleframe.flows.evaluation import evaluate_run

    rows = {r["detector"]: r for r in evaluate_run(str(survey["root"]))}
    assert sorted(rows) == [0, 1, 2, 3]
    assert rows[BROKEN_DETECTOR]["failure"].startswith("characterize: ")
    # The simulated frames' WCS error is ~1 mas (make demo: 0.4-1.0): 10 mas only tells a real row from
    # an unfitted or missing WCS (arcseconds off).
    assert all("failure" not in rows[d] and rows[d]["wcs_rms_mas"] < 10.0 for d in (0, 1, 2))
    # A run that calibrated none of these detectors has no rows for them (not rows of NaN).
    assert evaluate_run(str(survey["root"]), run="never_run") == []


@pytest.mark.parametrize("detector", [0, 1, 2])
def test_every_output_exists_and_opens_with_astropy(survey: dict, detector: int) -> None:
    store: ArtifactStore = survey["store"]
    for name in OUTPUTS:
        assert store.exists(name, **_where(detector)), name
    root = Path(survey["root"]) / "calib"
    stem = f"SimCam/visit-1/det-{detector:03d}"

    with fits.open(root / "preliminary_visit_image" / f"{stem}.fits") as hdul:
        names = [h.name for h in hdul]
        assert names[:4] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"] and "PSF" in names
        assert hdul["IMAGE"].header["BUNIT"] == "nJy"
        # Mask planes are named by MP_<PLANE> keywords with their bit numbers.
        for plane, bit in plane_bits().items():
            assert hdul["MASK"].header[f"MP_{plane}"] == bit
        # The applied calibration leaves the image with an identity PhotoCalib.
        assert hdul["PRIMARY"].header["PHOTCALIB"] == 1.0
        wcs = WCS(hdul["IMAGE"].header)
        assert wcs.has_celestial and wcs.sip is not None
        ny, nx = hdul["IMAGE"].data.shape
        assert (ny, nx) == (768, 1024)

    stars = Table.read(root / "single_visit_star_unstandardized" / f"{stem}.parquet")
    assert stars["base_PsfFlux_flux"].unit == "nJy"
    assert str(stars["base_PsfFlux_mag"].unit) == "mag"
    assert stars["coord_ra"].unit == "rad"
    assert np.all(np.isfinite(stars["coord_ra"])) and np.all(np.isfinite(stars["coord_dec"]))
    assert set(np.unique(stars["visit"])) == {1} and set(np.unique(stars["detector"])) == {detector}
    # PSF stars propagated to the star catalogue: psf_id refers to ids of single_visit_psf_star.
    psf_stars = Table.read(root / "single_visit_psf_star" / f"{stem}.parquet")
    linked = stars["psf_id"] > 0
    assert linked.sum() >= 0.5 * psf_stars["calib_psf_used"].sum()
    assert set(np.asarray(stars["psf_id"][linked])) <= set(np.asarray(psf_stars["id"]))
    assert np.array_equal(stars["calib_psf_used"][linked],
                          psf_stars["calib_psf_used"][np.searchsorted(psf_stars["id"], stars["psf_id"][linked])])

    spans = Table.read(root / "single_visit_psf_star_footprints" / f"{stem}.parquet")
    assert spans.colnames[:4] == ["id", "y", "x_start", "x_end"]
    assert set(np.unique(spans["id"])) <= set(np.asarray(psf_stars["id"]))

    astrom = Table.read(root / "initial_astrometry_match_detector" / f"{stem}.parquet")
    # ~100 PSF stars per small detector, of which those with S/N >= 40 and a refcat star match.
    assert {"ref_id", "src_id", "distance"} <= set(astrom.colnames) and len(astrom) >= 15
    photom = Table.read(root / "initial_photometry_match_detector" / f"{stem}.parquet")
    assert {"ref_id", "src_id", "src_psf_id", "distance"} <= set(photom.colnames) and len(photom) >= 20
    # Every numeric column of the match tables says its unit, as the catalogues they come from.
    for table in (astrom, photom):
        assert table["src_base_SdssCentroid_x"].unit == "pix" and table["src_base_PsfFlux_instFlux"].unit == "ct"
        assert table["ref_coord_ra"].unit == "rad" and table["distance"].unit == "rad"

    calib = json.loads((root / "initial_photoCalib_detector" / f"{stem}.json").read_text())
    truth = json.loads((Path(survey["root"]) / "raw" / "truth_calib" / f"{stem}.json").read_text())
    # End-to-end sanity only: a few hundred stars give a statistical error of a few mmag; the
    # 2 % bound catches unit or sign errors. The mmag-level accuracy is tested in test_accuracy.py.
    assert calib["calibration_njy_per_count"] == pytest.approx(truth["calibration_njy_per_count"], rel=0.02)

    with fits.open(root / "preliminary_visit_image_background" / f"{stem}.fits") as bg:
        assert any(h.header.get("BUNIT") == "nJy" for h in bg[1:])


def test_image_plus_background_over_calibration_recovers_the_input(survey: dict) -> None:
    store: ArtifactStore = survey["store"]
    image = store.get("preliminary_visit_image", **_where(0))
    background = store.get("preliminary_visit_image_background", **_where(0))
    calib = store.get("initial_photoCalib_detector", **_where(0))["calibration_njy_per_count"]
    raw = [store.get("post_isr_image", **{**_where(0), "run": "raw", "snap": s}) for s in (0, 1)]
    restored = (image.image.astype(np.float64) + background.image()) / calib
    original = raw[0].image.astype(np.float64) + raw[1].image
    good = (image.mask == 0)  # interpolated (CR, defects) pixels differ by design
    # float32 images of ~1e3 counts: agreement to 1e-3 counts is round-off.
    np.testing.assert_allclose(restored[good], original[good], atol=2e-3 * np.abs(original[good]).max() / 1e3)


def test_rerun_recomputes_nothing_and_a_deleted_output_is_rebuilt(survey: dict) -> None:
    from singleframe.flows.calibrate import run_calibration

    root = Path(survey["root"]) / "calib"
    files = sorted(p for p in root.rglob("*") if p.is_file() and "detector_failure" not in str(p))
    before = {p: p.stat().st_mtime_ns for p in files}
    # One of the four detectors fails (again): tolerated up to max_failed_fraction.
    state = run_calibration(survey["params"].model_copy(update={"max_failed_fraction": 0.25}))
    assert state.is_completed() and state.message == "3 of 4 detectors calibrated, 1 failed"
    assert {p: p.stat().st_mtime_ns for p in files} == before, "a finished run must recompute nothing"

    store: ArtifactStore = survey["store"]
    store.delete("initial_photoCalib_detector", **_where(1))
    state = run_calibration(survey["params"])
    assert state.is_failed() and state.message == "3 of 4 detectors calibrated, 1 failed"
    assert store.exists("initial_photoCalib_detector", **_where(1))
    changed = {p for p in files if p.stat().st_mtime_ns != before[p]}
    # Exactly the stage that produces it ran again, and every stage downstream of it (whose input
    # is a new version even if its bytes came out the same); nothing upstream, no other detector.
    from singleframe.flows.stages import STAGES

    rerun = {"calibrate_photometry"}
    for stage in STAGES:  # in processing order: a stage reading a re-produced dataset re-runs
        if any(name in {o for s in STAGES if s.name in rerun for o in s.outputs} for name in stage.inputs):
            rerun.add(stage.name)
    assert rerun == {"calibrate_photometry", "finalize"}
    rewritten = {o for s in STAGES if s.name in rerun for o in s.outputs} | {"diagnostics"}
    stem = "SimCam/visit-1/det-001"
    expected = {p for p in files if p.parent.relative_to(root).parts[0] in rewritten and stem in str(p)}
    assert len(expected) == 2 * (len(rewritten) - 1) + 2  # each dataset and its sidecar; the PNG and its key
    assert changed == expected


def test_switched_off_outputs_are_not_written_unless_a_later_stage_reads_them() -> None:
    from singleframe.flows.stages import STAGE_BY_NAME, persisted_outputs
    from singleframe.steps.config import load_calibrate_config

    none = load_calibrate_config(None, {"optional_outputs": []})
    everything = load_calibrate_config(None)
    char, astrom = STAGE_BY_NAME["characterize"], STAGE_BY_NAME["calibrate_astrometry"]
    # Nothing downstream reads the footprints: switched off, they are not written.
    assert "single_visit_psf_star_footprints" not in persisted_outputs(char, none)
    assert persisted_outputs(char, everything) == char.outputs
    # The PSF stars and matches feed find_stars and finalize: kept as intermediates.
    assert persisted_outputs(astrom, none) == astrom.outputs


def test_a_failed_stage_releases_its_arrays_without_waiting_for_the_garbage_collector(tmp_path: Path) -> None:
    """The exception Prefect keeps must not keep the failed stage's frames and their pixels alive."""
    import gc
    import traceback
    import weakref

    from singleframe.errors import AstrometryError
    from singleframe.flows.calibrate import RunContext, run_stage
    from singleframe.flows.stages import Stage
    from singleframe.ids import DataId
    from singleframe.steps.config import load_calibrate_config

    alive: list[weakref.ref] = []

    def solve(pixels: np.ndarray) -> None:
        votes = np.zeros((1024, 1024))  # a large local of a nested call, as the astrometric vote
        alive.append(weakref.ref(votes))
        try:
            raise ValueError("inner cause")
        except ValueError as cause:
            raise AstrometryError("no astrometric solution") from cause

    def compute(inputs, ctx):
        pixels = np.ones((512, 512), np.float32)
        alive.append(weakref.ref(pixels))
        solve(pixels)

    stage = Stage("calibrate_astrometry", (), ("initial_astrometry_match_detector",), compute, "fails")
    config = load_calibrate_config(None)
    ctx = RunContext(store=str(tmp_path), input_run="raw", output_run="out", refcat="refcat",
                     config=config.to_dict(), config_hash="x")
    gc.disable()  # only reference counting may free the arrays
    try:
        with pytest.raises(AstrometryError) as info:
            run_stage(stage, ctx, DataId("SimCam", 1, 0), refcat_loader=lambda exposure: None)
        assert len(alive) == 2 and all(ref() is None for ref in alive)
        # What the failure record needs survives: type, message, cause and the traceback's lines.
        assert isinstance(info.value.__cause__, ValueError)
        text = "".join(traceback.format_exception(info.value))
        assert "in solve" in text and "no astrometric solution" in text
    finally:
        gc.enable()
