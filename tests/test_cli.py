"""The command line: every command has --help; bad input gives a typed, explained error."""

from __future__ import annotations

import pytest

from singleframe.cli import build_parser, main

COMMANDS = ["simulate", "ingest", "ingest-refcat", "run", "evaluate", "serve"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: singleframe " + command in capsys.readouterr().out


def test_top_level_help_lists_every_command() -> None:
    text = build_parser().format_help()
    for command in COMMANDS:
        assert command in text


def test_run_with_missing_config_file_is_a_config_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from singleframe.errors import ConfigError
    from singleframe.steps.config import load_calibrate_config

    with pytest.raises(ConfigError, match="does not exist"):
        load_calibrate_config(tmp_path / "nope.yaml")


def test_evaluate_of_a_store_without_outputs_fails_and_says_what_to_run(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # An empty table with exit status 0 would read as "evaluated, nothing wrong".
    assert main(["evaluate", "--store", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no calibrated detectors" in err and "singleframe run --store" in err
    # Calibrated real data has no truth to compare with: said so, not "run it first".
    import numpy as np

    from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
    from singleframe.io.store import ArtifactStore

    image = Exposure(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint32), np.ones((8, 8), np.float32),
                     VisitInfo(42, 15.0, 60000.25, "i", "i", 1.0, 2.0, 3.0), DetectorInfo(7))
    ArtifactStore(str(tmp_path / "real")).put("preliminary_visit_image", image, run="calib", instrument="Cam",
                                              visit=42, detector=7)
    assert main(["evaluate", "--store", str(tmp_path / "real")]) == 1
    err = capsys.readouterr().err
    assert "has 1 calibrated detectors, but run 'raw' holds no simulator truth" in err


@pytest.mark.parametrize(("statuses", "completed", "code"), [
    (["ok", "ok"], True, 0),
    (["ok", "failed"], True, 3),      # partial: scripts and schedulers must see it
    (["failed", "failed"], True, 3),
    ([], False, 1),                   # the flow itself failed
])
def test_run_exit_status_says_whether_every_detector_was_calibrated(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], statuses: list[str],
        completed: bool, code: int) -> None:
    # The flow is replaced by its final state: what is under test is how the command reports it.
    from prefect.states import Completed, Failed

    from singleframe.flows import calibrate

    outcomes = [{"data_id": {"visit": 1, "detector": d}, "status": s, "stage": "calibrate_astrometry",
                 "message": "only 0 matches"} for d, s in enumerate(statuses)]
    if not completed:
        state = Failed(message="flow crashed")
    elif "failed" in statuses:  # the flow's state when a detector failed (max_failed_fraction 0)
        state = Failed(data=outcomes, message="some failed")
    else:
        state = Completed(data=outcomes, message="done")
    monkeypatch.setattr(calibrate, "run_calibration", lambda *a, **k: state)
    monkeypatch.setattr(calibrate, "make_task_runner", lambda **k: None)
    monkeypatch.setattr(calibrate, "prepare_run", lambda params: (None, None, [], []))
    assert main(["run", "--store", "unused", "--quiet"]) == code
    out = capsys.readouterr().out
    assert out.count("failed in calibrate_astrometry") == statuses.count("failed")


def test_run_refuses_in_one_line_what_it_can_tell_before_starting(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # Exit status 2 and a message that says what to do, before Prefect starts: an empty input
    # run, a selection the run does not hold, a missing reference catalogue.
    import dataclasses

    from singleframe.flows.simulate import write_simulated_survey
    from singleframe.io.store import ArtifactStore
    from singleframe.sim.config import SimulationConfig, _demo_visits

    root = str(tmp_path / "store")
    assert main(["run", "--store", root, "--quiet"]) == 2
    assert f"the store {root} does not exist" in capsys.readouterr().err
    (tmp_path / "store").mkdir()
    assert main(["run", "--store", root, "--quiet"]) == 2
    assert "no post_isr_image datasets in run 'raw'" in capsys.readouterr().err
    assert main(["run", "--store", root, "--workers", "0"]) == 2
    assert "invalid option: --workers" in capsys.readouterr().err
    config = dataclasses.replace(SimulationConfig(), nx=200, ny=200, n_side=1, visits=_demo_visits())
    write_simulated_survey(ArtifactStore(root), config)
    assert main(["run", "--store", root, "--visits", "999", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no detector with visits=[999]" in err and "it holds visits 1, 2 and detectors 0" in err
    assert main(["run", "--store", root, "--refcat", "gaia", "--quiet"]) == 2
    assert "reference catalogue 'gaia' is not in the store" in capsys.readouterr().err
    # A catalogue without the images' band: said before any pixel, not after three stages.
    from astropy.table import Table

    from singleframe.flows.calibrate import CalibrateParams, prepare_run
    from singleframe.io.refcat import write_refcat

    def refcat(name: str, band: str) -> None:
        write_refcat(root, name, Table({"id": [1], "ra": [0.0], "dec": [0.0], "epoch": [2016.0],
                                        f"{band}_flux": [1.0], f"{band}_fluxErr": [0.1]}))

    refcat("z_only", "z")  # visit 1 is in r, visit 2 in i: nothing can be calibrated
    assert main(["run", "--store", root, "--refcat", "z_only", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'z_only' has no fluxes in band 'i' (it has ['z']): the 1 detector(s) of visit(s) 2 cannot be" in err
    assert "band 'r'" in err and "--band BAND=COLUMN" in err
    refcat("r_only", "r")  # visit 2 will fail in photometry; visit 1 is calibrated: a note, not a refusal
    (note,) = prepare_run(CalibrateParams(store=root, refcat="r_only"))[3]
    assert "no fluxes in band 'i'" in note and "visit(s) 2 will fail in photometry" in note
    assert not (tmp_path / "store" / "calib").exists()


def test_ingest_refcat_from_a_csv_and_from_the_table_hdu_of_a_fits_file(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    from astropy.io import fits
    from astropy.table import Table

    from singleframe.io.refcat import load_refcat

    store = str(tmp_path / "store")
    Table({"ra": [150.0, 150.01], "dec": [2.0, 2.01], "rf": [1000.0, 2000.0]}).write(tmp_path / "cat.csv")
    args = ["ingest-refcat", str(tmp_path / "cat.csv"), "--store", store, "--band", "r=rf"]
    assert main(args) == 2
    assert "flux column 'rf' (r) has no unit" in capsys.readouterr().err
    assert main([*args, "--flux-unit", "uJy"]) == 0
    assert "columns ra<-ra, dec<-dec" in capsys.readouterr().out
    ref = load_refcat(store, "refcat", ra_deg=150.0, dec_deg=2.0, radius_deg=0.1)
    np.testing.assert_allclose(sorted(ref["r_flux"]), [1e6, 2e6], rtol=1e-12)  # µJy -> nJy
    # A compressed CSV: astropy cannot tell the format from the name; one line says how to name it.
    import gzip

    (tmp_path / "cat.csv.gz").write_bytes(gzip.compress((tmp_path / "cat.csv").read_bytes()))
    gz = ["ingest-refcat", str(tmp_path / "cat.csv.gz"), "--store", store, "--name", "gz", "--band", "r=rf",
          "--flux-unit", "uJy"]
    assert main(gz) == 2
    assert "name it with --format (e.g. ascii.csv" in capsys.readouterr().err
    assert main([*gz, "--format", "ascii.csv"]) == 0
    np.testing.assert_allclose(sorted(load_refcat(store, "gz", ra_deg=150.0, dec_deg=2.0, radius_deg=0.1)["r_flux"]),
                               [1e6, 2e6], rtol=1e-12)
    # An LDAC-like file: the table is in HDU 2, HDU 1 holds something else.
    table = fits.BinTableHDU(Table({"ra": [150.0], "dec": [2.0], "mag": [18.0]}), name="LDAC_OBJECTS")
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({"Field Header Card": ["x" * 10]})), table]).writeto(
        tmp_path / "cat.fits")
    args = ["ingest-refcat", str(tmp_path / "cat.fits"), "--store", store, "--name", "ldac", "--band", "g=mag",
            "--magnitudes"]
    assert main(args) == 2
    assert "absent from the table" in capsys.readouterr().err
    assert main([*args, "--hdu", "2"]) == 0 and main([*args, "--hdu", "LDAC_OBJECTS"]) == 0


def test_serve_refuses_a_port_something_already_listens_on(capsys: pytest.CaptureFixture[str]) -> None:
    # A server left running on the port would answer the health checks: serve would register
    # into it and return at once. It must say so instead, and start nothing.
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [
    ("[1, 2]\n", "holds '\\[1, 2\\]', not a mapping"),
    ("42\n", "holds '42', not a mapping"),
    ("astrometry:\n  max_rms_arcsec: -1\n", "c.yaml: astrometry.max_rms_arcsec"),
])
def test_a_config_file_that_is_not_settings_is_named_in_the_error(tmp_path, text: str, expected: str) -> None:
    from singleframe.errors import ConfigError
    from singleframe.steps.config import load_calibrate_config

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_calibrate_config(tmp_path / "c.yaml")
