"""The flow on Dask: a LocalCluster of 2 single-threaded worker processes gives the sequential results.

Two small detectors are calibrated twice under the session's Prefect test
server: once on the one-thread runner, once on
:func:`~singleframe.flows.calibrate.make_task_runner` with ``dask_workers=2``
(``processes=True, threads_per_worker=1``), into separate output runs. Every
dataset of every stage must exist for both detectors, and the products must
agree. Skipped when prefect-dask or distributed is not installed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("prefect_dask")
pytest.importorskip("distributed")

from singleframe.flows.stages import STAGES  # noqa: E402
from singleframe.io.store import ArtifactStore  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # Dask's scheduler moves its HTTP server elsewhere when another session holds port 8787.
    pytest.mark.filterwarnings("ignore:Port 8787 is already in use:UserWarning"),
]

DETECTORS = (0, 1)
VISIT = 2


def _where(run: str, detector: int) -> dict:
    return {"run": run, "instrument": "SimCam", "visit": VISIT, "detector": detector}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> dict:
    from singleframe.flows.calibrate import CalibrateParams, make_task_runner, run_calibration
    from singleframe.orchestration_bench import simulate_visit
    from singleframe.sim.config import SimulationConfig, _demo_visits

    root = tmp_path_factory.mktemp("dask")
    # The operations tests' tiny survey (one single-snap visit, 640x512, a dense star field for
    # ~100 PSF stars), of which only the two detectors used here are simulated.
    config = dataclasses.replace(SimulationConfig(), nx=640, ny=512, visits=_demo_visits()[1:],
                                 star_density_per_deg2=3.0e5)
    assert simulate_visit(str(root), config, len(DETECTORS)) == VISIT
    sequential = run_calibration(CalibrateParams(store=str(root), output_run="seq", max_workers=1))
    runner = make_task_runner(dask_workers=2)
    dask = run_calibration(CalibrateParams(store=str(root), output_run="dask"), task_runner=runner)
    return {"root": root, "store": ArtifactStore(str(root)), "seq": sequential, "dask": dask, "runner": runner}


def test_the_runner_is_a_local_cluster_of_two_single_threaded_processes(runs: dict) -> None:
    kwargs = runs["runner"].cluster_kwargs
    assert (kwargs["n_workers"], kwargs["threads_per_worker"], kwargs["processes"]) == (2, 1, True)


def test_both_runs_complete_every_detector(runs: dict) -> None:
    for name in ("seq", "dask"):
        state = runs[name]
        assert state.is_completed(), (name, state.message)
        assert state.message == f"{len(DETECTORS)} of {len(DETECTORS)} detectors calibrated, 0 failed", name


@pytest.mark.parametrize("detector", DETECTORS)
def test_every_stage_output_and_the_plot_exist(runs: dict, detector: int) -> None:
    store: ArtifactStore = runs["store"]
    for name in [n for stage in STAGES for n in stage.outputs]:
        assert store.exists(name, **_where("dask", detector)), name
    png = Path(runs["root"]) / "dask" / "diagnostics" / "SimCam" / f"visit-{VISIT}" / f"det-{detector:03d}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("detector", DETECTORS)
def test_dask_products_match_the_sequential_run(runs: dict, detector: int) -> None:
    store: ArtifactStore = runs["store"]
    seq, dsk = _where("seq", detector), _where("dask", detector)
    # Identical inputs and config: the stages' cache keys agree up to the output run's name.
    assert (store.provenance("characterized_image", **seq)["inputs"][0]["checksum"]
            == store.provenance("characterized_image", **dsk)["inputs"][0]["checksum"])

    # Outputs are not bitwise reproducible across processes (float32 sums round differently,
    # ~1e-7 relative; 2e-5 is the worst seen on PSF fluxes), so values are compared, not checksums.
    # 1e-4 relative is far below any real difference (another detector, config or PSF).
    a = store.get("single_visit_star_unstandardized", **seq)
    b = store.get("single_visit_star_unstandardized", **dsk)
    assert len(a) > 50
    np.testing.assert_array_equal(a["id"], b["id"])
    for col in ("base_PsfFlux_flux", "base_CircularApertureFlux_12_0_flux"):
        np.testing.assert_allclose(np.asarray(b[col]), np.asarray(a[col]), rtol=1e-4, equal_nan=True, err_msg=col)
    # Positions (radians): 1 mas absolute, ~1e-3 of the fit's own error; a relative tolerance on an
    # angle would allow arcseconds.
    for col in ("coord_ra", "coord_dec"):
        np.testing.assert_allclose(np.asarray(b[col]), np.asarray(a[col]), rtol=0, atol=np.radians(1e-3 / 3600),
                                   equal_nan=True, err_msg=col)
    np.testing.assert_array_equal(a["calib_psf_used"], b["calib_psf_used"])

    ca = store.get("initial_photoCalib_detector", **seq)["calibration_njy_per_count"]
    cb = store.get("initial_photoCalib_detector", **dsk)["calibration_njy_per_count"]
    assert cb == pytest.approx(ca, rel=1e-5)  # a zero point from ~100 stars: round-off only

    sa = store.get("detector_summary", **seq)
    sb = store.get("detector_summary", **dsk)
    assert sb["nPsfStar"] == sa["nPsfStar"]
    assert sb["psfSigma"] == pytest.approx(sa["psfSigma"], rel=1e-4)
