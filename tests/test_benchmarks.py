"""Fast tests of the benchmark harness and the peer adapters (no full benchmark run)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS

from singleframe.benchmarks import (
    PEER_TIE_FRACTION,
    ROW_KEYS,
    _load_psf_truth,
    _load_truth,
    _write_truth,
    check_bars,
    compile_package_bytecode,
    format_markdown,
    make_row,
)
from singleframe.errors import ConfigError
from singleframe.peers import (
    PsfexPsf,
    _index_presets,
    peer_available,
    read_ldac,
    refcat_to_ldac_table,
    run_timed,
    wcs_from_scamp_head,
    write_ldac,
)
from singleframe.sim.evaluation import _adaptive_moments, psf_size_error_pct


def _tan_header(nx: int = 300, ny: int = 200) -> fits.Header:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [210.0, -12.0]
    w.wcs.crpix = [150.5, 100.5]
    th = math.radians(5.0)
    s = 0.2 / 3600
    w.wcs.pc = [[-math.cos(th), math.sin(th)], [math.sin(th), math.cos(th)]]
    w.wcs.cdelt = [s, s]
    hdr = w.to_header()
    hdr["NAXIS"], hdr["NAXIS1"], hdr["NAXIS2"] = 2, nx, ny
    return hdr


def test_ldac_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    objects = Table({"X_WORLD": rng.uniform(0, 360, 50), "Y_WORLD": rng.uniform(-90, 90, 50),
                     "MAG": rng.uniform(15, 22, 50).astype(np.float32), "FLAGS": np.arange(50, dtype=np.int16)})
    hdr = _tan_header()
    write_ldac(tmp_path / "x.ldac", objects, image_header=hdr)
    back, back_hdr = read_ldac(tmp_path / "x.ldac")
    for name in objects.colnames:
        np.testing.assert_array_equal(back[name], objects[name])
    assert back_hdr["NAXIS1"] == 300 and back_hdr["CTYPE1"] == "RA---TAN"
    # Float cards go through their 80-character text form: 1e-12 relative is far below any use.
    assert back_hdr["CRVAL2"] == pytest.approx(-12.0, rel=1e-12)
    with fits.open(tmp_path / "x.ldac") as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "LDAC_IMHEAD", "LDAC_OBJECTS"]


def test_refcat_to_ldac_columns():
    refcat = Table({"ra": [10.0, 11.0, 12.0], "dec": [-5.0, -5.1, -5.2], "ra_err": [1.0, 2.0, 3.0],
                    "dec_err": [1.0, 2.0, 3.0], "r_flux": [3631e9 * 10**-8, 0.0, 1000.0],
                    "r_fluxErr": [1.0, 1.0, 10.0]})
    out = refcat_to_ldac_table(refcat, band="r", epoch_year=2026.9)
    assert len(out) == 2  # the zero-flux star has no magnitude and is dropped
    # 3631 Jy × 1e-8 is AB 20 exactly; float32 storage keeps ~1e-6 mag.
    assert out["MAG"][0] == pytest.approx(20.0, abs=1e-5)
    assert out["ERRA_WORLD"][1] == pytest.approx(3.0 / 3.6e6)
    assert np.all(out["OBSDATE"] == 2026.9)


def _scamp_head_text(cd: np.ndarray, pv1: dict[int, float], pv2: dict[int, float]) -> str:
    cards = [fits.Card("CTYPE1", "RA---TAN"), fits.Card("CTYPE2", "DEC--TAN"), fits.Card("CRVAL1", 210.001),
             fits.Card("CRVAL2", -11.999), fits.Card("CRPIX1", 150.5), fits.Card("CRPIX2", 100.5)]
    cards += [fits.Card(f"CD{i + 1}_{j + 1}", float(cd[i, j])) for i in range(2) for j in range(2)]
    cards += [fits.Card(f"PV1_{k}", v) for k, v in pv1.items()] + [fits.Card(f"PV2_{k}", v) for k, v in pv2.items()]
    return "HISTORY   Astrometric solution by SCAMP\n" + "\n".join(c.image for c in cards) + "\nEND\n"


def test_scamp_head_is_read_as_tpv_and_overrides_the_image_pc_matrix(tmp_path):
    s = 0.2 / 3600
    cd = np.array([[-s, 1e-7], [2e-7, s]])
    c3 = 0.2  # deg^-2: cubic term of xi, large enough to move the corners by ~1 mas
    pv1 = {0: 0.0, 1: 1.0, 2: 0.0, 7: c3}
    pv2 = {0: 0.0, 1: 1.0, 2: 0.0}
    head = tmp_path / "frame.head"
    head.write_text(_scamp_head_text(cd, pv1, pv2))
    # The image header carries a different (rotated) PC matrix: it must not survive.
    w = wcs_from_scamp_head(head, image_header=_tan_header())
    px, py = np.array([0.0, 299.0, 37.0]), np.array([0.0, 199.0, 150.0])
    ra, dec = w.all_pix2world(px, py, 0)
    # Expected: intermediate coordinates from CD, the TPV polynomial, then the TAN projection.
    x, y = cd @ np.vstack([px + 1 - 150.5, py + 1 - 100.5])
    xi, eta = x + c3 * x**3, y
    tan = WCS(naxis=2)
    tan.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    tan.wcs.crval = [210.001, -11.999]
    tan.wcs.crpix = [1.0, 1.0]
    tan.wcs.cdelt = [1.0, 1.0]
    era, edec = tan.all_pix2world(xi, eta, 0)
    # 1e-9 deg = 3.6 µas: numerical agreement, far below the mas scale of the benchmark.
    np.testing.assert_allclose(ra, era, atol=1e-9)
    np.testing.assert_allclose(dec, edec, atol=1e-9)
    # The same text given directly (not a path) gives the same WCS.
    w2 = wcs_from_scamp_head(head.read_text(), image_header=_tan_header())
    np.testing.assert_allclose(w2.all_pix2world(px, py, 0), [ra, dec], atol=1e-12)


def _gaussian_stamp(n: int, sigma_pix: float, step: float = 1.0) -> np.ndarray:
    c = (np.arange(n) - n // 2) * step
    g = np.exp(-0.5 * (c / sigma_pix) ** 2)
    img = np.outer(g, g)
    return img / img.sum()


@pytest.mark.parametrize("sampling", [1.0, 0.5])
def test_psfex_adapter_matches_the_gaussian_it_encodes(sampling):
    sigma = 2.1
    n_grid = 41 if sampling == 1.0 else 81
    const = _gaussian_stamp(n_grid, sigma, step=sampling)
    basis = np.stack([const, np.zeros_like(const), np.zeros_like(const)])  # degree 1: 1, x, y
    psf = PsfexPsf(basis=basis, degree=1, zero=(150.0, 100.0), scale=(300.0, 200.0), sampling=sampling)
    img = psf.image(10.0, 20.0, size=31)
    assert img.shape == (31, 31) and img.sum() == pytest.approx(1.0)
    ref = _gaussian_stamp(31, sigma)  # the same Gaussian sampled at our pixel centres
    # Lanczos-3 resampling (PSFEx's own) of a 0.5-px grid: 1e-3 of the peak is interpolation error.
    np.testing.assert_allclose(img, ref, atol=1e-3 * ref.max())
    true_sigma = _adaptive_moments(ref)[0]
    grid = Table({"x": [10.0, 200.0], "y": [20.0, 150.0], "sigma_pix": [true_sigma, true_sigma]})
    # The evaluator's HSM size of the adapter equals that of the stamp to 0.2 % (resampling).
    assert psf_size_error_pct(psf, grid) == pytest.approx(0.0, abs=0.2)
    ixx, iyy, ixy = psf.moments(10.0, 20.0)
    # Unweighted moments of a truncated 41-px stamp: 2 % of sigma² covers the truncation.
    assert ixx == pytest.approx(sigma**2, rel=0.02) and abs(ixy) < 1e-6


def test_psfex_spatial_terms_and_hdu_round_trip():
    const = _gaussian_stamp(25, 2.0)
    slope = _gaussian_stamp(25, 2.5) - const  # the x term widens the PSF to the right
    basis = np.stack([const, slope, np.zeros_like(const)])
    psf = PsfexPsf(basis=basis, degree=1, zero=(101.0, 51.0), scale=(100.0, 50.0), sampling=1.0)
    # Parent x = 100 is X_IMAGE = 101 = POLZERO1: the constant term alone.
    np.testing.assert_allclose(psf.image(100.0, 50.0), const, atol=1e-12)
    assert psf.sigma(200.0, 50.0) > psf.sigma(100.0, 50.0)
    back = PsfexPsf.from_hdus(psf.to_hdus())
    # float32 storage of the basis: 1e-6 relative.
    np.testing.assert_allclose(back.image(180.0, 70.0), psf.image(180.0, 70.0), rtol=1e-5, atol=1e-8)


def test_index_presets_cover_a_tenth_to_the_whole_field():
    presets = _index_presets(13.6)
    quad = [2.0 * math.sqrt(2.0) ** p for p in presets]
    assert presets and min(quad) >= 1.36 and max(quad) <= 13.6


def test_rows_have_the_schema_and_bars_fail_on_regression():
    rows = [make_row("f", "ours", [2.0, 1.0, 3.0], peak_rss_mb=500.0, wcs_rms_mas=2.5, psf_size_err_pct=0.1,
                     cr_completeness_pct=90.0, zp_err_mmag=float("nan")),
            make_row("f", "sex+psfex+scamp", [6.0], peak_rss_mb=600.0, wcs_rms_mas=1.9, psf_size_err_pct=-0.3),
            make_row("f", "physical_limit", [0.5])]
    for r in rows:
        assert set(ROW_KEYS) <= set(r)
    assert rows[0]["wall_s_median"] == 2.0 and rows[0]["wall_s_min"] == 1.0 and rows[0]["n_runs"] == 3
    assert rows[0]["zp_err_mmag"] is None  # NaN becomes null
    assert rows[1]["cr_completeness_pct"] is None  # the chain has no CR step
    json.dumps(rows)
    bars = {b.name: b for b in check_bars(rows)}
    assert bars["WCS rms <= 2 mas"].met is False and bars["WCS rms <= 2 mas"].asserted
    assert bars["WCS rms <= SCAMP"].met is False
    assert bars["|PSF size err| <= PSFEx"].met is True
    assert bars["CR completeness >= 95 %"].met is False
    assert bars["total <= 10x physical limit"].met is True and not bars["total <= 10x physical limit"].asserted
    assert "**NO**" in format_markdown(rows, list(bars.values()), "t")
    with pytest.raises(KeyError):
        make_row("f", "x", [1.0], not_a_key=1.0)


@pytest.mark.skipif(not peer_available("source-extractor"), reason="source-extractor not installed")
def test_sextractor_positions_are_fits_one_based(tmp_path):
    rng = np.random.default_rng(3)
    ny, nx = 120, 160
    image = rng.normal(100.0, 3.0, (ny, nx))
    stars = [(40.0, 30.0), (120.3, 85.6)]
    yy, xx = np.mgrid[0:ny, 0:nx]
    for x, y in stars:
        image += 5000.0 * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 1.8**2)
    hdr = _tan_header(nx, ny)
    hdr["GAIN"], hdr["SATURATE"] = 1.0, 1e6
    fits.PrimaryHDU(image.astype(np.float32), header=hdr).writeto(tmp_path / "img.fits")
    param = tmp_path / "p.param"
    param.write_text("XWIN_IMAGE\nYWIN_IMAGE\nFLUX_AUTO\n")
    run_timed(["source-extractor", "img.fits", "-CATALOG_TYPE", "FITS_LDAC", "-CATALOG_NAME", "img.ldac",
               "-PARAMETERS_NAME", str(param), "-FILTER", "N", "-DETECT_THRESH", "10"], cwd=tmp_path)
    cat, hdr_back = read_ldac(tmp_path / "img.ldac")
    assert len(cat) == 2 and hdr_back["NAXIS1"] == nx
    got = sorted(zip(cat["XWIN_IMAGE"], cat["YWIN_IMAGE"], strict=True))
    for (gx, gy), (x, y) in zip(got, stars, strict=True):
        # Array index x is X_IMAGE = x + 1; S/N ~ 1000 puts windowed centroids within 0.02 px.
        assert gx == pytest.approx(x + 1, abs=0.02) and gy == pytest.approx(y + 1, abs=0.02)


@pytest.mark.skipif(not peer_available("astroscrappy"), reason="astroscrappy not installed")
def test_astroscrappy_wrapper_finds_a_cosmic_ray():
    from singleframe.peers import run_astroscrappy

    rng = np.random.default_rng(4)
    image = rng.normal(500.0, np.sqrt(500.0), (100, 140)).astype(np.float32)
    image[50, 60:64] += 3000.0
    mask, wall = run_astroscrappy(image, gain_e_per_count=1.0, read_noise_e=5.0, saturation_count=60000.0)
    assert mask[50, 60:64].all() and wall >= 0
    assert mask.sum() < 20  # a 4-pixel track, grown by at most a pixel around it


def test_truth_scratch_round_trips_without_pickle(tmp_path):
    import dataclasses

    from singleframe.sim import SimulationConfig, simulate_detector
    from singleframe.sim.evaluation import psf_truth_positions, true_psf_at_stars

    cfg = dataclasses.replace(SimulationConfig(), n_side=1, nx=320, ny=200, cr_density_per_snap_per_mpix=150.0,
                              visits=(SimulationConfig().visits[0],), seed=5)
    truth = simulate_detector(cfg, cfg.visits[0], 0).truth
    x, y = psf_truth_positions(truth.sources, snr_min=20.0, max_stars=5)
    psf_truth = true_psf_at_stars(cfg, cfg.visits[0], 0, x, y)
    _write_truth(tmp_path, truth, psf_truth)
    assert not list(tmp_path.glob("*.pkl"))
    back = _load_truth(tmp_path)
    assert back.shape == truth.shape and back.origin == truth.origin and back.bad_columns == truth.bad_columns
    assert back.calibration_njy_per_count == truth.calibration_njy_per_count
    assert back.sources.meta["bbox"] == truth.sources.meta["bbox"] and len(back.sources) == len(truth.sources)
    for name in ("x", "y", "instflux", "snr", "is_star", "saturated"):
        np.testing.assert_array_equal(np.asarray(back.sources[name]), np.asarray(truth.sources[name]))
    np.testing.assert_array_equal(np.asarray(back.psf_grid["e1"]), np.asarray(truth.psf_grid["e1"]))
    assert all(np.array_equal(a, b) for a, b in zip(back.cr_masks, truth.cr_masks, strict=True))
    # WCS headers go through 80-character cards: 1e-9 px covers the text round trip.
    px = np.array([[0.0, 0.0], [319.0, 199.0]])
    np.testing.assert_allclose(back.wcs.all_world2pix(truth.wcs.all_pix2world(px, 0), 0), px, atol=1e-6)
    got = _load_psf_truth(tmp_path)
    np.testing.assert_array_equal(got.stamps, psf_truth.stamps)
    np.testing.assert_array_equal(got.sigma_pix, psf_truth.sigma_pix)


def _issue3_rows(**ours_overrides):
    good = {"n_pixels": 4096 * 4096, "wcs_rms_mas": 0.5, "psf_size_err_pct": -0.05, "psf_size_scatter_pct": 0.3, "psf_de1_median": 2e-4,
            "psf_de2_median": -1e-4, "apcorr_err_mmag_rms": 2.0, "star_recovered_pct": 99.0,
            "star_contaminant_pct": 1.0, "cr_completeness_pct": 99.0, "cr_star_centre_pct": 0.0}
    good.update(ours_overrides)
    peer = {"psf_size_err_pct": -0.28, "psf_size_scatter_pct": 0.5, "psf_de1_median": -8e-4,
            "psf_de2_median": 1.2e-4}
    return [make_row("f", "ours", [1.0], **good), make_row("f", "sex+psfex+scamp", [3.0], wcs_rms_mas=1.0, **peer),
            make_row("f", "psfex", [1.0], **peer)]


def test_issue3_bars_pass_fail_and_ties():
    bars = {b.name: b for b in check_bars(_issue3_rows())}
    names = ("|median PSF size err| <= 0.2 %", "PSF size scatter <= 1 %", "|median PSF de1| <= 5e-4",
             "|median PSF de2| <= 5e-4", "apcorr error <= 3 mmag rms", "PSF size scatter <= PSFEx",
             "|median PSF de1| <= PSFEx", "|median PSF de2| <= PSFEx", "stars recovered >= 98 %",
             "star contaminants <= 2 %")
    assert all(bars[n].met is True and bars[n].asserted for n in names)
    # |-1e-4| vs |1.2e-4|: better; 1.4e-4 vs 1.2e-4 is a tie within 10 % of the 5e-4 bar (5e-5).
    assert PEER_TIE_FRACTION * 5e-4 == pytest.approx(5e-5)
    assert {b.name: b for b in check_bars(_issue3_rows(psf_de2_median=1.4e-4))}["|median PSF de2| <= PSFEx"].met
    worse = {b.name: b for b in check_bars(_issue3_rows(psf_de2_median=-1.8e-4, psf_size_err_pct=0.25,
                                                        apcorr_err_mmag_rms=3.5, star_recovered_pct=97.0,
                                                        star_contaminant_pct=2.5))}
    for n in ("|median PSF de2| <= PSFEx", "|median PSF size err| <= 0.2 %", "apcorr error <= 3 mmag rms",
              "stars recovered >= 98 %", "star contaminants <= 2 %"):
        assert worse[n].met is False, n
    # A quantity ours did not produce fails; a missing peer leaves the comparison unmeasured.
    missing = {b.name: b for b in check_bars(_issue3_rows(apcorr_err_mmag_rms=None)[:1])}
    assert missing["apcorr error <= 3 mmag rms"].met is False
    assert missing["|median PSF de1| <= PSFEx"].met is None
    # Issue 3 states its bars on 4096² frames: on a CI-sized frame only the PSF size bars are
    # asserted, the others are reported.
    small = {b.name: b for b in check_bars(_issue3_rows(n_pixels=2048 * 2048, star_recovered_pct=97.0))}
    assert small["stars recovered >= 98 %"].met is False and not small["stars recovered >= 98 %"].asserted
    assert not small["|median PSF de1| <= PSFEx"].asserted and not small["apcorr error <= 3 mmag rms"].asserted
    assert small["|median PSF size err| <= 0.2 %"].asserted and small["|PSF size err| <= PSFEx"].asserted
    text = format_markdown(_issue3_rows(), list(bars.values()), "t")
    assert "2.0e-04" in text and "-8.0e-04" in text  # ellipticities are not rounded to 0.00


def test_characterization_time_bar_counts_aperture_corrections_and_is_reported_only():
    rows = _issue3_rows()
    rows[0]["stages_s_median"] = {"characterize": 1.95, "correct_apertures": 0.01, "find_stars": 1.5}
    rows[0]["characterize_steady_s_median"] = 1.7
    bar = {b.name: b for b in check_bars(rows)}["characterization <= 2 s per 4096² detector"]
    assert bar.met is True and not bar.asserted and "1.96 s first detector" in bar.measured
    rows[0]["stages_s_median"]["correct_apertures"] = 0.06  # 2.01 s: over the bar
    assert {b.name: b for b in check_bars(rows)}["characterization <= 2 s per 4096² detector"].met is False
    small = _issue3_rows(n_pixels=2048 * 2048)
    small[0]["stages_s_median"] = {"characterize": 0.5, "correct_apertures": 0.01}
    assert "characterization <= 2 s per 4096² detector" not in {b.name for b in check_bars(small)}


def test_missing_values_of_ours_fail_and_the_time_bar_is_shown_with_and_without_start_up():
    bars = {b.name: b for b in check_bars(_issue3_rows())}
    assert bars["unsaturated stars with a CR-flagged centre <= 0.1 %"].met is True
    assert bars["peak RSS <= 1.5 GB"].met is None  # not measured in these rows: n/a, reported only
    # A WCS, CR completeness or CR-centre figure ours did not produce fails --check; SCAMP's missing
    # WCS leaves the comparison unmeasured.
    missing = {b.name: b for b in check_bars(_issue3_rows(wcs_rms_mas=None, cr_completeness_pct=None,
                                                          cr_star_centre_pct=None))}
    for name in ("WCS rms <= 2 mas", "WCS rms <= SCAMP", "CR completeness >= 95 %",
                 "unsaturated stars with a CR-flagged centre <= 0.1 %"):
        assert missing[name].met is False and missing[name].asserted, name
    rows = _issue3_rows(cr_star_centre_pct=0.2)
    rows[1]["wcs_rms_mas"] = None
    bars = {b.name: b for b in check_bars(rows)}
    assert bars["unsaturated stars with a CR-flagged centre <= 0.1 %"].met is False
    assert bars["WCS rms <= SCAMP"].met is None
    # On the main frame the 0.5x bar is shown per detector in a running worker and with the
    # worker's start-up paid for the one frame (as each peer process pays its own).
    rows = _issue3_rows()
    for r in rows:
        r["frame"] = "4096-typical"
    rows[0].update(wall_s_median=4.0, process_startup_s=1.5, peak_rss_mb=1100.0)
    rows[1]["wall_s_median"] = 9.0
    bars = {b.name: b for b in check_bars(rows)}
    warm = bars["time <= 0.5x SEx+PSFEx+SCAMP, per detector in a running worker"]
    cold = bars["time <= 0.5x SEx+PSFEx+SCAMP, a fresh process for the frame"]
    assert warm.met is True and warm.measured == "0.44x"
    assert cold.met is False and cold.measured == "0.61x (start-up 1.50 s)" and not cold.asserted
    assert bars["peak RSS <= 1.5 GB"].met is True


def test_wcs_bar_is_asserted_where_the_stars_can_resolve_it():
    # With 39 matches of 7 mas residual rms an affine WCS is good to ~2.8 mas: the 2 mas bar is
    # reported there, not asserted; with a floor below the bar it is asserted.
    rows = _issue3_rows(wcs_rms_mas=2.2, wcs_floor_mas=2.8)
    bar = {b.name: b for b in check_bars(rows)}["WCS rms <= 2 mas"]
    assert bar.met is False and not bar.asserted and "floor 2.80" in bar.measured
    bar = {b.name: b for b in check_bars(_issue3_rows(wcs_rms_mas=2.2, wcs_floor_mas=0.5))}["WCS rms <= 2 mas"]
    assert bar.met is False and bar.asserted
    from singleframe.benchmarks import _wcs_floor_mas

    matches = Table({"distance_arcsec": np.full(39, 0.007)})
    assert _wcs_floor_mas(matches) == pytest.approx(7.0 * math.sqrt(6 / 39))  # rms x sqrt(6/N), in mas
    assert _wcs_floor_mas(matches[:6]) is None  # fewer matches than affine terms + 1: no floor


def test_psf_ellipticity_bars_show_our_photon_floor_without_changing_the_verdict():
    # The floor is context for a per-frame comparison at the noise floor, never a pass.
    bars = {b.name: b for b in check_bars(_issue3_rows(psf_de2_median=-3.7e-4, psf_de2_floor=2.3e-4))}
    assert bars["|median PSF de2| <= PSFEx"].met is False
    assert bars["|median PSF de2| <= PSFEx"].measured == "-3.7e-04 vs 1.2e-04 (floor 2.3e-04)"
    assert bars["|median PSF de2| <= 5e-4"].measured == "-3.7e-04 (floor 2.3e-04)"
    assert "floor" not in bars["|median PSF de1| <= PSFEx"].measured  # no floor measured: nothing shown


def test_psf_bench_summary_counts_rms_and_per_frame_wins():
    from singleframe.psf_bench import PsfBenchConfig, summarize

    rows = [{"seed": 1, "ours": {"de1": 3e-4, "de2": -1e-4, "size_err_pct": 0.01},
             "psfex": {"de1": -6e-4, "de2": 0.6e-4, "size_err_pct": -0.2}},
            {"seed": 2, "ours": {"de1": -1e-4, "de2": 2e-4, "size_err_pct": 0.03},
             "psfex": {"de1": 0.4e-4, "de2": 4e-4, "size_err_pct": -0.3}},
            {"seed": 3, "ours": {"de1": 0.0, "de2": float("nan"), "size_err_pct": 0.02}, "psfex": None}]
    s = summarize(rows)
    # rms over the finite per-frame medians: sqrt((9 + 1 + 0) / 3) e-4 for ours' de1, two frames for de2.
    assert s["ours"]["de1"]["rms"] == pytest.approx(math.sqrt(10 / 3) * 1e-4)
    assert s["ours"]["de2"]["n"] == 2 and s["ours"]["de2"]["mean"] == pytest.approx(0.5e-4)
    assert s["psfex"]["size_err_pct"]["rms"] == pytest.approx(math.sqrt((0.04 + 0.09) / 2))
    # Tie 5e-5: frame 1 de1 (3 <= 6.5) and de2 (1 <= 1.1) within; frame 2 de1 (1 > 0.9) not, de2 within.
    assert s["n_paired"] == 2 and s["ours_within"] == {"de1": 1, "de2": 2}
    assert "piff" not in s  # not run: no column
    rows[0]["piff"] = {"de1": 2e-4, "de2": -2e-4, "size_err_pct": 0.02}
    assert summarize(rows)["piff"]["de1"] == {"rms": pytest.approx(2e-4), "mean": pytest.approx(2e-4), "n": 1}
    with pytest.raises(ConfigError):
        PsfBenchConfig(frame="4096-nowhere").validate()
    with pytest.raises(ConfigError):
        PsfBenchConfig(seeds=(5, 5)).validate()



def test_mean_ellipticity_floor_recovers_the_injected_noise():
    from astropy.table import Table

    from singleframe.psf import GaussianPsf
    from singleframe.psf_bench import mean_ellipticity_floor

    # 2000 stars whose moments scatter about a round sigma-2 PSF with e noise 1.7 / (S/N) per
    # component (S/N 50-1000); a fifth are not used. The noise coefficient comes from the median of
    # ~1600 squared normalised residuals (about 3 % relative error on it): 10 % tolerances.
    rng = np.random.default_rng(11)
    n, a = 2000, 1.7
    snr = rng.uniform(50, 1000, n)
    e1, e2 = rng.normal(0, a / snr), rng.normal(0, a / snr)
    t = 8.0  # xx + yy of the sigma-2 PSF
    cat = Table({"calib_psf_used": rng.uniform(size=n) < 0.8, "base_SdssCentroid_x": rng.uniform(0, 4000, n),
                 "base_SdssCentroid_y": rng.uniform(0, 4000, n), "ext_shapeHSM_HsmSourceMoments_xx": t * (1 + e1) / 2,
                 "ext_shapeHSM_HsmSourceMoments_yy": t * (1 - e1) / 2, "ext_shapeHSM_HsmSourceMoments_xy": t * e2 / 2,
                 "base_PsfFlux_instFlux": snr * 10.0, "base_PsfFlux_instFluxErr": np.full(n, 10.0)})
    floor = mean_ellipticity_floor(cat, GaussianPsf(2.0))
    used = np.asarray(cat["calib_psf_used"])
    assert floor["n_stars"] == used.sum()
    expected = a / np.sqrt(np.sum(snr[used] ** 2))
    for comp in ("e1", "e2"):
        assert floor[f"{comp}_noise_coeff"] == pytest.approx(a, rel=0.1)
        assert floor[f"d{comp}_floor"] == pytest.approx(expected, rel=0.1)
    none = mean_ellipticity_floor(cat[:2], GaussianPsf(2.0))
    assert math.isnan(none["de1_floor"]) and math.isnan(none["e2_noise_coeff"])

def test_passing_sigma_reproduces_the_size_test_of_select_stars():
    """``need <= k`` must select exactly what ``select_stars`` selects at ``max_size_excess_sigma=k``."""
    import dataclasses

    from singleframe.selection_bench import passing_sigma
    from singleframe.steps.star_selection import StarSelectorConfig, select_stars

    rng = np.random.default_rng(3)
    n = 400
    snr = rng.uniform(5, 300, n)
    t_psf = rng.uniform(4, 9, n)
    excess = rng.normal(0, 3 / snr) + np.where(rng.random(n) < 0.3, rng.uniform(0, 0.5, n), 0.0)
    excess[:5] = np.nan  # failed moments are never point sources
    cat = Table({"base_PsfFlux_instFlux": snr * 100.0, "base_PsfFlux_instFluxErr": np.full(n, 100.0),
                 "ext_shapeHSM_HsmSourceMoments_xx": t_psf * (1 + excess) / 2,
                 "ext_shapeHSM_HsmSourceMoments_yy": t_psf * (1 + excess) / 2,
                 "ext_shapeHSM_HsmPsfMoments_xx": t_psf / 2, "ext_shapeHSM_HsmPsfMoments_yy": t_psf / 2})
    base = StarSelectorConfig()
    need = passing_sigma(excess, snr, noise_coeff=base.size_noise_coeff, floor_frac=base.min_size_excess_frac)
    no_size = np.asarray(select_stars(cat, config=dataclasses.replace(base, max_size_excess_sigma=None)).selected)
    for k in (0.5, 1.0, 2.0, 3.5, 6.0):
        sel = np.asarray(select_stars(cat, config=dataclasses.replace(base, max_size_excess_sigma=k)).selected)
        assert sel.sum() > 0 and (~sel).sum() > 0  # the cut does something, or the test proves nothing
        np.testing.assert_array_equal(sel, no_size & (need <= k))


def test_oracle_cut_finds_the_clean_solution_and_never_beats_the_best_single_cut_in_one_bin():
    from singleframe.selection_bench import best_binned_cut

    rng = np.random.default_rng(5)
    ks = (0.5, 1.0, 2.0, 3.0, 5.0)
    # Separable by S/N: faint galaxies sit 4 sigma out, bright ones 0.5 sigma (an oracle cuts the
    # faint bin at 3 and keeps the bright bin whole, where galaxies do not exist).
    n_star, n_gal = 1000, 60
    snr = np.concatenate([rng.uniform(10, 100, n_star), rng.uniform(10, 15, n_gal)])
    need = np.concatenate([np.abs(rng.normal(0, 1, n_star)).clip(max=2.9), np.full(n_gal, 4.0)])
    is_star = np.arange(n_star + n_gal) < n_star
    is_cont = ~is_star

    def evaluate(sel):
        return 100.0 * np.sum(sel & is_star) / n_star, 100.0 * np.sum(sel & is_cont) / max(sel.sum(), 1)

    best = best_binned_cut(need, snr, is_star, is_cont, evaluate, sigmas=ks, snr_edges=(15.0,),
                           min_recovered_pct=98.0)
    assert best["recovered_pct"] == 100.0 and best["contaminant_pct"] == 0.0
    assert best["snr_bins"][1] == 15.0 and best["sigmas"][0] == 3.0

    # One bin, overlapping classes: the oracle is the best uniform cut that reaches the recovery.
    need = np.concatenate([np.abs(rng.normal(0, 1, n_star)), np.abs(rng.normal(1.5, 1, n_gal))])
    best = best_binned_cut(need, snr, is_star, is_cont, evaluate, sigmas=ks, snr_edges=(), min_recovered_pct=98.0)
    uniform = [evaluate(need <= k) for k in ks]
    feasible = [c for r, c in uniform if r >= 98.0]
    assert best["contaminant_pct"] == pytest.approx(min(feasible))
    # No threshold reaches an impossible recovery: NaNs, not a wrong answer.
    none = best_binned_cut(need, snr, is_star, is_cont, evaluate, sigmas=(0.1,), snr_edges=(), min_recovered_pct=99.0)
    assert none["sigmas"] is None and math.isnan(none["contaminant_pct"])



def test_oracle_cut_completes_a_step_of_the_envelope_over_the_recovery_target():
    from singleframe.selection_bench import best_binned_cut

    # Two S/N bins whose thresholds 1, 2, 3 keep (stars, contaminants):
    #   faint:  (480, 0), (485, 30), (500, 32)   bright: (490, 0), (495, 20), (500, 21)
    # The Lagrangian envelope goes (970, 0) -> (990, 32) -> (1000, 53): it raises the faint bin
    # first (1.6 contaminants per star against 2.1) and steps over the 98 % target. Raising the
    # bright bin alone reaches it with 21 contaminants: 980 stars, 2.10 % instead of 3.13 %.
    def group(n, need_value, snr_value):
        return np.full(n, need_value), np.full(n, snr_value)

    parts = [(480, 0.5, 12.0, True), (5, 1.5, 12.0, True), (15, 2.5, 12.0, True), (30, 1.5, 12.0, False),
             (2, 2.5, 12.0, False), (490, 0.5, 40.0, True), (5, 1.5, 40.0, True), (5, 2.5, 40.0, True),
             (20, 1.5, 40.0, False), (1, 2.5, 40.0, False)]
    need = np.concatenate([group(n, v, q)[0] for n, v, q, _ in parts])
    snr = np.concatenate([group(n, v, q)[1] for n, v, q, _ in parts])
    is_star = np.concatenate([np.full(n, star) for n, _, _, star in parts])

    def evaluate(sel):
        return 100.0 * np.sum(sel & is_star) / 1000, 100.0 * np.sum(sel & ~is_star) / max(sel.sum(), 1)

    kw = dict(sigmas=(1.0, 2.0, 3.0), snr_edges=(20.0,), min_recovered_pct=98.0)
    envelope_only = best_binned_cut(need, snr, is_star, ~is_star, evaluate, completion_window_pct=0.0, **kw)
    assert envelope_only["contaminant_pct"] == pytest.approx(100 * 32 / 1022)
    best = best_binned_cut(need, snr, is_star, ~is_star, evaluate, **kw)
    assert best["recovered_pct"] == 98.0 and best["contaminant_pct"] == pytest.approx(100 * 21 / 1001)
    assert best["sigmas"] == [1.0, 3.0]
    assert (98.0, round(100 * 21 / 1001, 3)) in best["frontier"]

def test_selection_bench_config_is_validated():
    from singleframe.selection_bench import SelectionBenchConfig

    with pytest.raises(ConfigError, match="unknown frame"):
        SelectionBenchConfig(frame="4096-nowhere").validate()
    with pytest.raises(ConfigError, match="increasing"):
        SelectionBenchConfig(snr_edges=(20.0, 10.0)).validate()


def test_score_cuts_on_a_synthetic_field_counts_kinds_and_bounds_the_configured_cut():
    from singleframe.selection_bench import SelectionBenchConfig, score_cuts
    from singleframe.sim.evaluation import star_recovery
    from singleframe.steps.star_selection import StarSelectorConfig, select_stars

    rng = np.random.default_rng(11)
    n_star, n_gal = 600, 80
    n = n_star + n_gal
    # Truth on a 60-px grid (isolated), stars first; galaxies are 40 % larger than the PSF in T.
    gx, gy = np.meshgrid(np.arange(40, 2000, 60.0), np.arange(40, 2000, 60.0))
    tx, ty = gx.ravel()[:n], gy.ravel()[:n]
    snr = rng.uniform(8, 60, n)
    truth = Table({"x": tx, "y": ty, "instflux": snr * 100.0, "is_star": np.arange(n) < n_star,
                   "saturated": np.zeros(n, bool), "snr": snr}, meta={"bbox": (0, 0, 2047, 2047)})
    excess = rng.normal(0, 2.5 / snr) + np.where(np.arange(n) < n_star, 0.0, 0.4)
    cand = Table({"base_SdssCentroid_x": tx + 0.3, "base_SdssCentroid_y": ty,
                  "base_PsfFlux_instFlux": snr * 100.0, "base_PsfFlux_instFluxErr": np.full(n, 100.0),
                  "ext_shapeHSM_HsmSourceMoments_xx": 3.0 * (1 + excess), "ext_shapeHSM_HsmSourceMoments_yy": 3.0 * (1 + excess),
                  "ext_shapeHSM_HsmPsfMoments_xx": np.full(n, 3.0), "ext_shapeHSM_HsmPsfMoments_yy": np.full(n, 3.0)})
    # Two spurious detections, one 3.5 px off a star (a blend) and one in empty sky.
    extra = cand[:2].copy()
    extra["base_SdssCentroid_x"] = [tx[0] + 3.5, 2030.0]
    extra["base_SdssCentroid_y"] = [ty[0], 2030.0]
    extra["ext_shapeHSM_HsmSourceMoments_xx"] = extra["ext_shapeHSM_HsmSourceMoments_yy"] = [3.0, 3.0]
    cand = vstack([cand, extra])
    cfg = StarSelectorConfig()
    res = score_cuts(cand, truth, psf_fwhm_pix=4.0, star_config=cfg, config=SelectionBenchConfig())
    rows = {(r["cut"], r["sigma"]): r for r in res["rows"]}
    configured = rows[("configured", cfg.max_size_excess_sigma)]
    sel = np.asarray(select_stars(cand, config=cfg).selected, bool)
    assert (configured["recovered_pct"], configured["contaminant_pct"]) == star_recovery(cand[sel], truth,
                                                                                         psf_fwhm_pix=4.0)
    assert rows[("uniform", 3.5)]["contaminant_pct"] == pytest.approx(configured["contaminant_pct"])
    # Without the size test the galaxies above S/N 8 are kept too.
    assert rows[("no size test", None)]["contaminant_pct"] > configured["contaminant_pct"]
    k = res["contaminants"]
    assert k["blend"] == 1 and k["nothing"] == 1 and k["galaxy"] == k["n_contaminants"] - 2
    # The oracle never does worse than the configured cut when that cut reaches the recovery bar.
    o = res["oracle"]
    assert configured["recovered_pct"] >= 98.0
    assert o["contaminant_pct"] <= configured["contaminant_pct"] + 1e-9 and o["recovered_pct"] >= 98.0
    assert res["template_oracle"] is None
    # A template score equal to the size excess' significance gives the same oracle (same flags,
    # S/N cut and size floor); a score that separates the classes exactly gives a clean cut.
    ex = np.r_[excess, 0.0, 0.0]
    cand_snr = np.asarray(cand["base_PsfFlux_instFlux"]) / 100.0
    same = score_cuts(cand, truth, psf_fwhm_pix=4.0, star_config=cfg, config=SelectionBenchConfig(),
                      template=(ex * cand_snr / cfg.size_noise_coeff, ex))["template_oracle"]
    assert (same["recovered_pct"], same["contaminant_pct"]) == (o["recovered_pct"], o["contaminant_pct"])
    # The 30 brightest-looking stars score 100 (a PSF-model size error at high S/N) but stay within the
    # size floor: they must be kept, as the selector keeps them. The spurious detection in empty sky
    # scores 0 but is flagged saturated: the selector's flags must still reject it.
    is_s = np.r_[np.arange(n) < n_star, False, False]
    z_perfect = np.where(is_s, 0.0, 10.0)
    z_perfect[:30] = 100.0
    z_perfect[-1] = 0.0
    flagged = cand.copy()
    flagged["base_PixelFlags_flag_saturated"] = np.arange(len(cand)) == len(cand) - 1
    perfect = score_cuts(flagged, truth, psf_fwhm_pix=4.0, star_config=cfg, config=SelectionBenchConfig(),
                         template=(z_perfect, np.where(is_s, 0.01, 1.0)))["template_oracle"]
    assert perfect["contaminant_pct"] == 0.0 and perfect["recovered_pct"] >= 98.0


def _template_scene(seed: int, blur_frac: float, snr: float, *, neighbours: bool = False):
    """A 12x12 grid of Gaussian sources (PSF sigma 1.8 px, blurred: sigma² x (1 + blur_frac)) at PSF
    S/N ``snr`` in white noise; optionally each with a 10x brighter star 9 px away whose footprint
    (a 7-px disc, 3.9 sigma) is labelled."""
    from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
    from singleframe.psf import GaussianPsf

    sigma, noise, spacing = 1.8, 10.0, 40
    rng = np.random.default_rng(seed)
    g = np.arange(12) * spacing + 40
    shape = (12 * spacing + 40,) * 2
    gy, gx = np.meshgrid(g, g, indexing="ij")
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size)
    flux = snr * noise * math.sqrt(4 * math.pi * sigma**2)
    img = np.zeros(shape)
    labels = np.zeros(shape, np.int32)

    def paste(stamps, xs, ys):
        for st, a, b in zip(stamps, np.round(xs).astype(int), np.round(ys).astype(int), strict=True):
            img[b - 15:b + 16, a - 15:a + 16] += st

    paste(GaussianPsf(sigma * math.sqrt(1 + blur_frac)).images(x, y, size=31, centered=False) * flux, x, y)
    if neighbours:
        nx, ny = x + 9.0, y + 0.3
        paste(GaussianPsf(sigma).images(nx, ny, size=31, centered=False) * 10 * flux, nx, ny)
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        for k, (a, b) in enumerate(zip(nx, ny, strict=True)):
            labels[(xx - a) ** 2 + (yy - b) ** 2 <= 49] = 1000 + k
    img += rng.normal(0, noise, shape)
    exposure = Exposure(img.astype(np.float32), np.zeros(shape, np.uint32), np.full(shape, noise**2, np.float32),
                        VisitInfo(1, 30.0, 60000.0, "r", "r", 10.0, 10.0, 0.0), DetectorInfo(3), psf=GaussianPsf(sigma))
    return exposure, labels, x, y, np.arange(1, x.size + 1)


def test_psf_template_score_is_a_unit_normal_for_point_sources_and_measures_small_blurs():
    from singleframe.selection_bench import psf_template_score

    # Point sources at S/N 20: the score is the fit coefficient over its error, N(0, 1) when the
    # model is right; 144 stars give ±0.08 on the mean and ±0.06 on the sd (1 sigma).
    z, frac = psf_template_score(*_template_scene(1, 0.0, 20.0))
    assert abs(np.mean(z)) < 0.25 and 0.8 < np.std(z) < 1.2
    # Noiseless blur of 5 % of the PSF's sigma²: first order in the blur, so the size is exact up to
    # the second-order term and the 5-point Laplacian's truncation (measured +2.6 %).
    z, frac = psf_template_score(*_template_scene(1, 0.05, 1e9))
    assert np.median(frac) == pytest.approx(0.05, rel=0.05)
    assert np.all(z > 100)
    # A blur of 30 % at S/N 20 is detected on average (expected score ~2.2).
    z, _ = psf_template_score(*_template_scene(1, 0.3, 20.0))
    assert np.mean(z) > 1.5


def test_psf_template_score_leaves_out_neighbour_footprints():
    from singleframe.selection_bench import psf_template_score

    exposure, labels, x, y, own = _template_scene(2, 0.0, 20.0, neighbours=True)
    z, _ = psf_template_score(exposure, labels, x, y, own)
    assert abs(np.mean(z)) < 0.25  # as without neighbours (±0.08)
    # Fitting the neighbour's pixels too reads its light as a blur of every star (measured +3.1).
    z_all, _ = psf_template_score(exposure, np.zeros_like(labels), x, y, own)
    assert np.mean(z_all) > 1.5
    with pytest.raises(ConfigError, match="labels shape"):
        psf_template_score(exposure, labels[:-1], x, y, own)
    with pytest.raises(ConfigError, match="fitted PSF"):
        psf_template_score(exposure.replace(psf=None), labels, x, y, own)


def test_scratch_dir_removes_only_the_directory_it_created(tmp_path):
    from singleframe.benchmarks import scratch_dir

    with scratch_dir(None, "sf-test-") as work:
        (work / "f").write_text("x")
    assert not work.exists()
    with pytest.raises(RuntimeError), scratch_dir(None, "sf-test-") as failed:
        raise RuntimeError("a failed benchmark still cleans up")
    assert not failed.exists()
    with scratch_dir(tmp_path, "sf-test-") as given:
        (given / "f").write_text("x")
    assert given == tmp_path and (tmp_path / "f").exists()


def test_neyman_pearson_bound_is_the_analytic_test_in_one_bin_and_beats_every_pure_choice():
    from scipy.stats import norm

    from singleframe.selection_bench import neyman_pearson_bound

    # One bin, 1000 stars, 20 may be lost: the test has size 2 %, threshold z = 2.054; a galaxy d sigmas
    # away passes with probability Phi(z - d). Exact up to the threshold grid's 0.01 (mixtures interpolate).
    d = np.array([0.0, 2.0, 10.0])
    b = neyman_pearson_bound(d, np.zeros(3, np.int64), np.array([1000]), 20.0)
    z = norm.isf(0.02)
    assert b["galaxies_kept"] == pytest.approx(float(np.sum(norm.cdf(z - d))), abs=2e-3)
    assert b["stars_lost"] == pytest.approx(20.0, abs=1e-9)
    assert b["n_galaxies"] == 3

    # Two bins: compact galaxies among many stars, extended ones among few. The bound is below every
    # pure (one threshold per bin) solution within the budget, by at most the mixing gain.
    rng = np.random.default_rng(5)
    d2 = np.concatenate([rng.uniform(0.5, 2.0, 40), rng.uniform(3.0, 8.0, 40)])
    bins = np.repeat([0, 1], 40)
    stars = np.array([900, 100])
    b2 = neyman_pearson_bound(d2, bins, stars, 15.0)
    grid = np.linspace(-2, 8, 201)
    best = np.inf
    for t0 in grid:
        for t1 in grid:
            lost = stars[0] * norm.sf(t0) + stars[1] * norm.sf(t1)
            if lost <= 15.0:
                best = min(best, norm.cdf(t0 - d2[:40]).sum() + norm.cdf(t1 - d2[40:]).sum())
    assert b2["galaxies_kept"] <= best + 1e-6
    assert b2["galaxies_kept"] >= best - 0.5
    assert b2["stars_lost"] <= 15.0 + 1e-9
    with pytest.raises(ValueError, match="index stars_per_bin"):
        neyman_pearson_bound(d2, bins + 1, stars, 15.0)


def test_information_bound_pools_the_galaxies_and_stars_the_size_test_sees():
    from singleframe.selection_bench import information_bound

    # 100 isolated stars (S/N 20) and 10 galaxies, all passing every cut but the size test, plus one
    # galaxy that another cut rejected. The fake distance puts 5 galaxies at d = 0 (star-like) and 5 far.
    n_star, n_gal = 100, 11
    n = n_star + n_gal
    tx, ty = np.arange(n) * 50.0 + 100.0, np.full(n, 500.0)
    truth = Table({"id": np.arange(n), "x": tx, "y": ty, "instflux": np.full(n, 2000.0),
                   "is_star": np.arange(n) < n_star, "saturated": np.zeros(n, bool), "snr": np.full(n, 20.0)},
                  meta={"bbox": (0, 0, 6000, 1000)})
    cand = Table({"base_SdssCentroid_x": tx + 0.5, "base_SdssCentroid_y": ty})
    pool = np.ones(n, bool)
    pool[-1] = False
    seen = []

    def distance(ids, x, y, flux, var):
        seen.append((np.asarray(ids), np.asarray(var)))
        # The point source fitting a galaxy holds 40 % of its flux: S/N 20 x 0.4 = 8, below every star.
        return np.where(np.arange(len(ids)) < 5, 0.0, 20.0), 0.4 * np.asarray(flux)

    kw = {"selected_without_size": pool, "psf_fwhm_pix": 4.0, "min_recovered_pct": 98.0,
          "sky_variance": np.full(n, 7.0), "n_other_contaminants": 3}
    res = information_bound(cand, truth, snr_edges=(10.0, 30.0), galaxy_distance=distance, **kw)
    np.testing.assert_array_equal(seen[0][0], np.arange(n_star, n_star + 10))
    np.testing.assert_array_equal(seen[0][1], np.full(10, 7.0))
    assert res["n_pool_galaxies"] == 10 and res["n_pool_stars"] == 100
    assert res["star_loss_budget"] == pytest.approx(2.0)  # 100 recovered - 98 % of 100
    # The faintest bin reaches below the first edge: the galaxies share the stars' test. Losing 2 stars
    # of 100 (size 2 %), the 5 star-like galaxies pass with 98 %, the far ones never.
    assert res["galaxies_kept"] == pytest.approx(5 * 0.98, abs=0.01)
    assert res["contaminant_pct_galaxies"] == pytest.approx(100 * 4.9 / 104.9, abs=0.02)
    assert res["contaminant_pct"] == pytest.approx(100 * 7.9 / 107.9, abs=0.02)
    # A bin of their own (S/N 8 < 15 <= the stars' 20) holds no star: every galaxy goes for free.
    res = information_bound(cand, truth, snr_edges=(10.0, 15.0), galaxy_distance=distance, **kw)
    assert res["galaxies_kept"] == pytest.approx(0.0, abs=1e-3)
    assert res["contaminant_pct"] == pytest.approx(100 * 3 / 103, abs=0.01)


def test_results_name_the_commit_they_were_measured_on():
    import re

    from singleframe.benchmarks import _code_version, _machine

    version = _code_version()
    # An editable checkout (tests, CI) reports its commit, "+" when files changed; anything else nothing.
    assert re.fullmatch(r"(, commit [0-9a-f]{4,40}\+?)?", version), version
    assert _machine().endswith(version)


def test_package_bytecode_is_compiled_for_every_subpackage() -> None:
    # The benchmark's fresh workers must import our modules from bytecode, as a wheel install
    # does, even where PYTHONDONTWRITEBYTECODE stops Python from writing it on import.
    import importlib
    import importlib.util
    import os

    dirs = compile_package_bytecode()
    for name in ("singleframe", "singleframe.steps", "singleframe.io", "singleframe.flows"):
        mod_dir = importlib.import_module(name).__path__[0]
        if not os.access(mod_dir, os.W_OK):
            continue  # a read-only install: pip compiled it
        assert mod_dir in dirs
        source = os.path.join(mod_dir, "__init__.py")
        cached = importlib.util.cache_from_source(source)
        assert os.path.exists(cached) and os.path.getmtime(cached) >= os.path.getmtime(source)
