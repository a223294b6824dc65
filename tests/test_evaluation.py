"""Evaluation against truth: zero error for perfect inputs, the right numbers for known perturbations."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from singleframe.fields import ChebyshevField
from singleframe.masks import MASK_DTYPE, MaskPlane
from singleframe.psf import GaussianPsf
from singleframe.sim import (
    EVALUATION_KEYS,
    SimulationConfig,
    cr_masked_pct,
    evaluate_detector,
    format_evaluation_table,
    psf_ellipticity_residuals,
    psf_size_error_pct,
    simulate_detector,
    star_recovery,
    wcs_error_mas,
    zero_point_error_mmag,
)
from singleframe.sim.evaluation import (
    PsfTruthAtStars,
    _adaptive_moments,
    aperture_correction_error_mmag,
    cr_flagged_star_centres_pct,
    psf_residuals_at_stars,
    psf_truth_positions,
    true_psf_at_stars,
)

SHAPE = (384, 512)  # (ny, nx): non-square on purpose
ORIGIN = (7, 3)


def _tan_wcs(ra: float = 30.0, dec: float = -20.0) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [256.5, 192.5]
    s = 0.2 / 3600
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    w.wcs.set()
    return w


def test_wcs_error_is_zero_for_the_same_wcs_and_10_mas_for_a_10_mas_shift() -> None:
    true = _tan_wcs()
    assert wcs_error_mas(true, true, SHAPE, origin=ORIGIN) == (0.0, 0.0)
    shifted = copy.deepcopy(true)
    shifted.wcs.crval = [30.0, -20.0 + 10.0 / 3.6e6]
    shifted.wcs.set()
    rms, mx = wcs_error_mas(shifted, true, SHAPE, origin=ORIGIN)
    # A 10 mas shift of the tangent point moves every point of a 100" field by 10 mas to ~1e-6.
    assert rms == pytest.approx(10.0, rel=1e-4) and mx == pytest.approx(10.0, rel=1e-4)


def test_wcs_error_of_a_rotation_grows_to_the_corners() -> None:
    true = _tan_wcs()
    rotated = copy.deepcopy(true)
    a = math.radians(1.0 / 3600)  # 1 arcsec of rotation about the centre
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rotated.wcs.cd = rot @ true.wcs.cd
    rotated.wcs.set()
    rms, mx = wcs_error_mas(rotated, true, SHAPE, n_grid=65)
    # Max at a corner: radius 0.2" × hypot(255.5, 191.5) = 63.9" × 1" in radians = 0.31 mas.
    corner_mas = 0.2 * math.hypot(255.5, 191.5) * a * 1000
    assert mx == pytest.approx(corner_mas, rel=1e-3)
    assert 0.3 * corner_mas < rms < 0.7 * corner_mas


def _grid_from_model(model: GaussianPsf) -> Table:
    """Truth PSF grid measured exactly as the simulator measures it (HSM on the drawn image)."""
    xs, ys = np.meshgrid(np.linspace(20, 500, 5), np.linspace(10, 370, 5))
    mom = np.array([_adaptive_moments(model.image(x, y)) for x, y in zip(xs.ravel(), ys.ravel(), strict=True)])
    return Table({"x": xs.ravel(), "y": ys.ravel(), "sigma_pix": mom[:, 0], "e1": mom[:, 1], "e2": mom[:, 2]})


def test_psf_size_error_zero_for_truth_and_one_percent_for_a_wider_model() -> None:
    grid = _grid_from_model(GaussianPsf(2.0, e1=0.03))
    assert psf_size_error_pct(GaussianPsf(2.0, e1=0.03), grid) == pytest.approx(0.0, abs=1e-9)
    # σ 1 % larger; pixel integration adds 1/12 px² in quadrature, which shrinks the measured
    # change by 1/(1 + 1/(12 σ²)) ≈ 2 % of itself, i.e. to ~0.98 %.
    assert psf_size_error_pct(GaussianPsf(2.02, e1=0.03), grid) == pytest.approx(1.0, abs=0.03)
    res = psf_ellipticity_residuals(GaussianPsf(2.0, e1=0.03), grid)
    assert res.rms == pytest.approx(0.0, abs=1e-9)
    res = psf_ellipticity_residuals(GaussianPsf(2.0, e1=0.03, e2=0.02), grid)
    # An added e2 of 0.02 shows up as de2 ≈ 0.02 (pixelisation dilutes it by ~2 %).
    assert res.rms == pytest.approx(0.02, abs=0.001) and np.all(np.abs(res.de1) < 1e-3)


def test_zero_point_error_sign_and_size() -> None:
    assert zero_point_error_mmag(2.0, 2.0) == 0.0
    # A calibration 10^(0.4·0.01) too large is +10 mmag (fluxes come out too bright).
    assert zero_point_error_mmag(2.0 * 10 ** (0.004), 2.0) == pytest.approx(10.0, abs=1e-9)
    assert zero_point_error_mmag(2.0 / 10 ** (0.004), 2.0) == pytest.approx(-10.0, abs=1e-9)


def _truth_table() -> Table:
    rng = np.random.default_rng(5)
    n = 40
    # Stars on a 60 px grid (isolated), bright; plus galaxies between them.
    gx, gy = np.meshgrid(np.arange(50, 480, 60), np.arange(60, 330, 60))
    xs = gx.ravel()[:n].astype(float) + rng.uniform(-0.5, 0.5, n)
    ys = gy.ravel()[:n].astype(float) + rng.uniform(-0.5, 0.5, n)
    t = Table()
    t["x"] = np.concatenate([xs, xs[:5] + 30.0])
    t["y"] = np.concatenate([ys, ys[:5] + 30.0])
    t["instflux"] = np.concatenate([np.full(n, 1e5), np.full(5, 3e4)])
    t["is_star"] = np.array([True] * n + [False] * 5)
    t["is_galaxy"] = ~t["is_star"]
    t["saturated"] = np.zeros(n + 5, bool)
    t["saturated"][0] = True
    t["snr"] = np.concatenate([np.full(n, 100.0), np.full(5, 50.0)])
    t["snr"][1] = 5.0  # too faint to count
    t.meta["bbox"] = (ORIGIN[0], ORIGIN[1], ORIGIN[0] + SHAPE[1] - 1, ORIGIN[1] + SHAPE[0] - 1)
    return t


def test_star_recovery_counts_eligible_stars_and_contaminants() -> None:
    truth = _truth_table()
    stars = truth[truth["is_star"]]
    eligible = np.ones(len(stars), bool)
    eligible[:2] = False  # saturated, faint
    n_elig = int(eligible.sum())
    sel = Table({"base_SdssCentroid_x": stars["x"] + 1.2, "base_SdssCentroid_y": stars["y"] - 0.9})
    assert star_recovery(sel, truth) == (100.0, 0.0)
    # Drop 4 eligible stars, add 2 galaxies and 1 spurious detection: 7 % of 38 eligible lost.
    gal = truth[~truth["is_star"]][:2]
    sel2 = Table({"x": np.concatenate([stars["x"][6:], gal["x"], [300.0]]),
                  "y": np.concatenate([stars["y"][6:], gal["y"], [41.0]])})
    rec, con = star_recovery(sel2, truth)
    assert rec == pytest.approx(100.0 * (n_elig - 4) / n_elig)
    assert con == pytest.approx(100.0 * 3 / len(sel2))
    # Matches farther than the radius do not count.
    far = Table({"x": stars["x"] + 2.5, "y": stars["y"]})
    assert star_recovery(far, truth) == (0.0, 100.0)
    assert star_recovery(far, truth, match_radius_pix=3.0) == (100.0, 0.0)


def test_cr_masked_pct() -> None:
    truth = np.zeros(SHAPE, bool)
    truth[10, 10:30] = True
    mask = np.zeros(SHAPE, MASK_DTYPE)
    mask[10, 10:20] = MASK_DTYPE(MaskPlane.CR)
    mask[50, 50] = MASK_DTYPE(MaskPlane.CR | MaskPlane.BAD)  # a false positive does not change completeness
    assert cr_masked_pct(mask, truth) == pytest.approx(50.0)
    assert cr_masked_pct(mask, (truth, np.zeros(SHAPE, bool))) == pytest.approx(50.0)
    # With the image, only truth pixels visible above 5σ count: the unmasked half is faint here.
    image = np.zeros(SHAPE)
    image[10, 10:20] = 100.0
    image[10, 20:30] = 3.0
    assert cr_masked_pct(mask, truth, image=image, variance=np.ones(SHAPE)) == pytest.approx(100.0)
    assert math.isnan(cr_masked_pct(mask, np.zeros(SHAPE, bool)))


def test_cr_flagged_star_centres_count_false_positives_on_unsaturated_stars_only() -> None:
    # Parent positions (ORIGIN): mask[y - 3, x - 7]. Stars 0-3 are unsaturated on the image; star 2
    # was hit by a real cosmic ray next to its centre (flagged rightly: left out); star 4 is
    # saturated, star 5 a galaxy, star 6 off the image: none of them counts.
    x = np.array([20.0, 60.0, 100.0, 140.0, 180.0, 220.0, 900.0]) + ORIGIN[0]
    y = np.array([30.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0]) + ORIGIN[1]
    sources = Table({"x": x, "y": y, "is_star": [True, True, True, True, True, False, True],
                     "saturated": [False, False, False, False, True, False, False]})
    truth = np.zeros(SHAPE, bool)
    truth[31, 101] = True  # a real hit 1 px from star 2's centre
    mask = np.zeros(SHAPE, MASK_DTYPE)
    for col in (20, 100, 180, 220):  # star 0 (a false positive), 2, 4 and the galaxy
        mask[30, col] = MASK_DTYPE(MaskPlane.CR)
    # One of the three stars that count (0, 1, 3) is flagged.
    assert cr_flagged_star_centres_pct(mask, sources, truth, origin=ORIGIN) == pytest.approx(100.0 / 3.0)
    assert cr_flagged_star_centres_pct(mask, sources, (truth, truth), origin=ORIGIN) == pytest.approx(100.0 / 3.0)
    mask[30, 20] = 0
    assert cr_flagged_star_centres_pct(mask, sources, truth, origin=ORIGIN) == 0.0
    assert math.isnan(cr_flagged_star_centres_pct(mask, sources[4:], truth, origin=ORIGIN))


@pytest.fixture(scope="module")
def simulated():
    cfg = dataclasses.replace(SimulationConfig(), n_side=1, nx=300, ny=220, cr_density_per_snap_per_mpix=150.0,
                              visits=(SimulationConfig().visits[0],), seed=9)
    return simulate_detector(cfg, cfg.visits[0], 0)


def test_evaluate_detector_perfect_inputs_and_missing_inputs(simulated) -> None:
    t = simulated.truth
    mask = np.zeros(t.shape, MASK_DTYPE)
    mask[t.cr_masks[0] | t.cr_masks[1]] = MASK_DTYPE(MaskPlane.CR)
    stars = t.sources[t.sources["is_star"]]
    row = evaluate_detector(visit=1, detector=0, wcs=t.wcs, psf=None,
                            calibration_njy_per_count=t.calibration_njy_per_count,
                            stars=Table({"x": stars["x"], "y": stars["y"]}), mask=mask, truth=t)
    assert tuple(row) == EVALUATION_KEYS
    assert row["wcs_rms_mas"] == 0.0 and row["wcs_max_mas"] == 0.0 and row["zp_err_mmag"] == 0.0
    assert row["star_recovered_pct"] == 100.0 and row["star_contaminant_pct"] == 0.0
    assert row["cr_masked_pct"] == 100.0
    assert math.isnan(row["psf_size_err_pct"])
    # The header WCS is off by the pointing error (2.5") and a 0.01° rotation.
    hdr = wcs_error_mas(t.header_wcs, t.wcs, t.shape)
    assert 2400.0 < hdr[0] < 4000.0
    empty = evaluate_detector(visit=1, detector=0, wcs=None, psf=None, calibration_njy_per_count=None,
                              stars=None, mask=None, truth=t)
    assert tuple(empty) == EVALUATION_KEYS
    assert all(math.isnan(v) for k, v in empty.items() if k not in ("visit", "detector"))


def test_psf_error_of_a_gaussian_on_simulated_truth(simulated) -> None:
    t = simulated.truth
    # A Gaussian with the true central size: the median size error is the field variation, a few %.
    err = psf_size_error_pct(GaussianPsf(t.psf_sigma_center_pix), t.psf_grid)
    assert abs(err) < 3.0


def test_format_evaluation_table_is_aligned() -> None:
    rows = [{"visit": 1, "detector": 0, "wcs_rms_mas": 12.3456, "wcs_max_mas": 40.0, "zp_err_mmag": -3.2,
             "psf_size_err_pct": float("nan"), "star_recovered_pct": 98.5, "star_contaminant_pct": 0.4,
             "cr_masked_pct": 100.0},
            {"visit": 20000, "detector": 3, "wcs_rms_mas": 1.0, "wcs_max_mas": 2.0, "zp_err_mmag": 0.0,
             "psf_size_err_pct": 0.5, "star_recovered_pct": 100.0, "star_contaminant_pct": 0.0,
             "cr_masked_pct": 99.0}]
    text = format_evaluation_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == list(EVALUATION_KEYS)
    assert "12.35" in lines[2] and "nan" in lines[2] and "20000" in lines[3]
    rows[0]["failure"] = "characterize: only 1 PSF star"  # a failed detector: why, under the table
    assert format_evaluation_table(rows).splitlines()[4] == "visit 1 detector 0: failed in characterize: only 1 PSF star"


def _gaussian_truth(psf: GaussianPsf, x: np.ndarray, y: np.ndarray) -> PsfTruthAtStars:
    """A PsfTruthAtStars whose true PSF is ``psf``, built the way true_psf_at_stars builds it."""
    stamps = psf.images(x, y, size=61, centered=False).astype(np.float32)
    mom = np.array([_adaptive_moments(psf.image(a, b, size=61)) for a, b in zip(x, y, strict=True)])
    return PsfTruthAtStars(x, y, mom[:, 0], mom[:, 1], mom[:, 2], stamps)


def _star_positions(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    # Sub-pixel positions on a non-square detector with a non-zero origin.
    rng = np.random.default_rng(11)
    return (ORIGIN[0] + rng.uniform(30, SHAPE[1] - 30, n), ORIGIN[1] + rng.uniform(30, SHAPE[0] - 30, n))


def test_psf_residuals_at_stars_zero_for_truth_and_known_for_perturbed_models() -> None:
    x, y = _star_positions()
    truth = _gaussian_truth(GaussianPsf(2.0, e1=0.02), x, y)
    res = psf_residuals_at_stars(GaussianPsf(2.0, e1=0.02), truth)
    assert res.n_stars == len(x)
    # Same image, same HSM code: identical to rounding.
    assert abs(res.size_err_median_pct) < 1e-9 and res.size_err_scatter_pct < 1e-9
    assert abs(res.de1_median) < 1e-9 and abs(res.de2_median) < 1e-9
    # Perturbations keep the model axis-aligned, drawn with the same exact pixel integral as the truth.
    res = psf_residuals_at_stars(GaussianPsf(2.02, e1=0.02), truth)
    # σ +1 % shows as ~0.98 % (pixel integration, see the test above); a constant model has no scatter.
    assert res.size_err_median_pct == pytest.approx(1.0, abs=0.03) and res.size_err_scatter_pct < 1e-6
    res = psf_residuals_at_stars(GaussianPsf(2.0, e1=0.021), truth)
    # An added e1 of 1e-3 appears as de1 ≈ 1e-3 (pixelisation dilutes it by ~2 %); e2 is untouched.
    assert res.de1_median == pytest.approx(1e-3, abs=5e-5) and abs(res.de2_median) < 1e-9


def test_aperture_correction_error_of_exact_and_biased_corrections() -> None:
    x, y = _star_positions()
    psf = GaussianPsf(1.8)
    truth = _gaussian_truth(psf, x, y)
    bbox = (ORIGIN[0], ORIGIN[1], ORIGIN[0] + SHAPE[1] - 1, ORIGIN[1] + SHAPE[0] - 1)
    # A Gaussian kernel of 5σ half-width holds all but ~1e-6 of the flux: the exact correction is 1.
    res = aperture_correction_error_mmag(psf, ChebyshevField.constant(1.0, bbox), truth)
    assert res.n_stars == len(x) and res.rms_mmag < 0.01
    # A correction 1 % too large: +10.8 mmag at every star.
    res = aperture_correction_error_mmag(psf, ChebyshevField.constant(1.01, bbox), truth)
    assert res.mean_mmag == pytest.approx(2500 * math.log10(1.01), abs=0.01)
    assert res.rms_mmag == pytest.approx(res.mean_mmag, abs=1e-6)
    # A kernel cut to 7 px misses the wings: the PSF flux is low and a unit correction reads faint.
    cut = aperture_correction_error_mmag(psf, ChebyshevField.constant(1.0, bbox), truth, max_kernel_size_pix=7)
    assert cut.mean_mmag < -5.0


def test_true_psf_at_stars_reproduces_the_truth_grid(simulated) -> None:
    cfg = dataclasses.replace(SimulationConfig(), n_side=1, nx=300, ny=220, cr_density_per_snap_per_mpix=150.0,
                              visits=(SimulationConfig().visits[0],), seed=9)
    grid = simulated.truth.psf_grid
    t = true_psf_at_stars(cfg, cfg.visits[0], 0, np.asarray(grid["x"], float), np.asarray(grid["y"], float))
    # Same PSF field, same whole-pixel stamps, same HSM: equal to float rounding.
    np.testing.assert_allclose(t.sigma_pix, grid["sigma_pix"], rtol=1e-9)
    np.testing.assert_allclose(t.e1, grid["e1"], atol=1e-9)
    assert t.stamps.shape == (len(grid), 61, 61)
    # A stamp holds the fraction of the unit-flux profile inside 61 px: just below 1 (Kolmogorov wings).
    assert np.all((t.stamps.sum(axis=(1, 2)) > 0.99) & (t.stamps.sum(axis=(1, 2)) <= 1.0))


def test_psf_truth_positions_selects_bright_unsaturated_stars_inside() -> None:
    truth = _truth_table()
    x, y = psf_truth_positions(truth, snr_min=50.0, edge_pix=20.0)
    ok = truth["is_star"] & ~truth["saturated"] & (truth["snr"] >= 50.0)
    assert len(x) == int(ok.sum()) == 38  # 40 stars minus the saturated and the faint one
    x2, _ = psf_truth_positions(truth, max_stars=10, seed=3)
    assert len(x2) == 10 and set(x2) <= set(x)


def test_isolation_radius_scales_with_the_seeing():
    # A star with a 12x brighter neighbour 12 px away is isolated at 0.8" seeing (FWHM 4 px:
    # 12 px > 10 px = 2.5 FWHM) but not at 1.3" (FWHM 6.5 px: 2.5 FWHM = 16 px), where the pair
    # merges in the smoothed image; a catalogue holding only the bright star then misses nothing.
    from singleframe.sim.evaluation import star_recovery

    truth = Table({"x": [100.0, 112.0], "y": [100.0, 100.0], "instflux": [400.0, 5000.0],
                   "is_star": [True, True], "saturated": [False, False], "snr": [20.0, 100.0]})
    truth.meta["bbox"] = (0, 0, 300, 300)
    only_bright = Table({"x": [112.0], "y": [100.0]})
    assert star_recovery(only_bright, truth, psf_fwhm_pix=4.0)[0] == 50.0
    assert star_recovery(only_bright, truth, psf_fwhm_pix=6.5)[0] == 100.0


def test_galaxy_point_source_distance_scales_with_flux_noise_and_size() -> None:
    from singleframe.sim.evaluation import galaxy_point_source_distance
    from singleframe.sim.survey import _population

    cfg = dataclasses.replace(SimulationConfig(), n_side=1, nx=300, ny=220, visits=(SimulationConfig().visits[0],),
                              seed=9)
    gals = _population(cfg).galaxies
    hlr = np.asarray(gals["hlr_arcsec"], float)
    # The most compact round-ish galaxy and the largest one, same place and flux.
    small, large = int(np.argmin(hlr + np.asarray(gals["ellipticity"]))), int(np.argmax(hlr))
    ids = np.asarray(gals["id"], np.int64)[[small, small, small, large]]
    d, a = galaxy_point_source_distance(cfg, cfg.visits[0], 0, ids, np.full(4, 150.0), np.full(4, 110.0),
                                        [1000.0, 2000.0, 1000.0, 1000.0], [100.0, 100.0, 400.0, 100.0])
    # d = ||G - aP|| / sigma is linear in the flux and in 1/sigma (exactly: same drawing); the fitted
    # point-source flux a is linear in the flux, blind to the noise, and below the galaxy's.
    assert d[1] == pytest.approx(2 * d[0], rel=1e-12)
    assert d[2] == pytest.approx(d[0] / 2, rel=1e-12)
    assert a[1] == pytest.approx(2 * a[0], rel=1e-12) and a[2] == pytest.approx(a[0], rel=1e-12)
    # The compact galaxy keeps most of its flux in the point-source fit (rho ~ 0.99); the 2" one little.
    assert 800.0 < a[0] < 1000.0 and a[3] < 0.5 * a[0]
    # The compact galaxy (hlr ~0.25") at PSF-fit S/N ~17 (flux 1000, sigma 10 per pixel, 0.8" seeing: an
    # effective area of ~36 px) is separable from a star by ~2 sigma only: its image correlates with the PSF
    # to rho ~ 0.99, d ~ S/N sqrt(1 - rho^2) / rho ~ 2.2. Bounds at half and twice that.
    assert 1.1 < d[0] < 4.4
    # The largest (2") holds the same flux over ~50x the area: its d is small too, but for the opposite
    # reason (faint per pixel), and it is still farther from a star than the compact one.
    assert d[3] > d[0]
    with pytest.raises(ValueError, match="not in the simulated population"):
        galaxy_point_source_distance(cfg, cfg.visits[0], 0, [-1], [150.0], [110.0], [1000.0], [100.0])
