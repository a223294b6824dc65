"""Tests of steps/aperture_correction.py on catalogues with a known ratio field."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table, vstack

from singleframe.errors import ApertureCorrectionError, ConfigError
from singleframe.steps.aperture_correction import (
    ApertureCorrectionConfig,
    apply_normalization,
    measure_aperture_correction,
    measure_normalization,
)
from singleframe.steps.measurement import apply_aperture_corrections

BBOX = (1000.0, 2000.0, 1859.0, 2619.0)  # non-square, non-zero origin
NORM = 1.04  # true 12-px aperture / compensated ratio
G_COG = 0.011  # true total / 12-px aperture flux - 1 (the simulated Kolmogorov PSF: 0.008-0.011)
C_ANN = 800.0  # counts of undetected-source light in the 12-25 px annulus (demo detectors: 700-1400)
E_ANN = 900.0  # sky noise (counts) of that annulus


def true_ratio(field: str, x, y):
    """Known calib/flux ratios: linear across the detector (PSF), constant (Gaussian)."""
    xs = (np.asarray(x) - BBOX[0]) / (BBOX[2] - BBOX[0])
    ys = (np.asarray(y) - BBOX[1]) / (BBOX[3] - BBOX[1])
    return 1.05 + 0.03 * xs - 0.02 * ys if field == "base_PsfFlux" else np.full(np.shape(x), 1.12)


def catalog(n: int, seed: int = 0, noise_mag: float = 0.002) -> Table:
    rng = np.random.default_rng(seed)
    x = rng.uniform(BBOX[0], BBOX[2], n)
    y = rng.uniform(BBOX[1], BBOX[3], n)
    ap12 = 10 ** rng.uniform(5, 6, n)  # S/N >> 200 everywhere
    noise = lambda: 10 ** (-0.4 * rng.normal(0, noise_mag, n))  # noqa: E731
    t = Table({"base_SdssCentroid_x": x, "base_SdssCentroid_y": y, "base_SdssCentroid_flag": np.zeros(n, bool),
               "calib_psf_used": np.ones(n, bool)})
    t["base_CircularApertureFlux_12_0_instFlux"] = ap12
    t["base_CircularApertureFlux_12_0_instFluxErr"] = ap12 / 1000
    t["base_CircularApertureFlux_12_0_flag"] = np.zeros(n, bool)
    # Enclosed flux of a power-law wing F(r) = F_inf - A r^-5/3 (the Kolmogorov tail the step
    # extrapolates), plus undetected-source light and sky noise proportional to the annulus area.
    amp = G_COG * ap12 * 12.0 ** (5 / 3)
    frac17 = (17.0**2 - 12.0**2) / (25.0**2 - 12.0**2)
    noise17 = rng.normal(0, E_ANN * np.sqrt(frac17), n)
    t["base_CircularApertureFlux_17_0_instFlux"] = ap12 * (1 + G_COG) - amp * 17.0 ** (-5 / 3) + C_ANN * frac17 + noise17
    t["base_CircularApertureFlux_17_0_instFluxErr"] = np.hypot(ap12 / 1000, E_ANN * np.sqrt(frac17))
    t["base_CircularApertureFlux_17_0_flag"] = np.zeros(n, bool)
    t["base_CircularApertureFlux_25_0_instFlux"] = ap12 * (1 + G_COG) - amp * 25.0 ** (-5 / 3) + C_ANN + noise17 \
        + rng.normal(0, E_ANN * np.sqrt(1 - frac17), n)
    t["base_CircularApertureFlux_25_0_instFluxErr"] = np.hypot(ap12 / 1000, E_ANN)
    t["base_CircularApertureFlux_25_0_flag"] = np.zeros(n, bool)
    t["base_CompensatedTophatFlux_12_instFlux"] = ap12 / NORM * noise()
    t["base_CompensatedTophatFlux_12_instFluxErr"] = ap12 / 1000
    t["base_CompensatedTophatFlux_12_flag"] = np.zeros(n, bool)
    calib = ap12 * (1 + G_COG)  # = normalised (total) compensated flux in expectation
    for name in ("base_PsfFlux", "base_GaussianFlux"):
        t[f"{name}_instFlux"] = calib / true_ratio(name, x, y) * noise()
        t[f"{name}_instFluxErr"] = t[f"{name}_instFlux"] / 1000
        t[f"{name}_flag"] = np.zeros(n, bool)
    return t


def test_recovers_linear_ratio_field_within_3_mmag():
    cat = catalog(60)
    # Outliers (a blended star, a CR-hit aperture) must be clipped, not fitted.
    cat["base_PsfFlux_instFlux"][:3] *= 1.3
    res = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig())
    # 60 stars x 2 mmag noise: 0.3 mmag on the 12-px ratio; the curve of growth adds ~0.5 mmag.
    assert res.normalization == pytest.approx(NORM * (1 + G_COG), rel=1.5e-3)
    assert not res.fallback and res.n_stars >= 55
    assert not np.any(res.used["base_PsfFlux"][:3])
    x, y = cat["base_SdssCentroid_x"], cat["base_SdssCentroid_y"]
    for name in ("base_PsfFlux", "base_GaussianFlux"):
        field = res.ap_corr[name]
        err_mag = 2.5 * np.log10(field.evaluate(x, y) / true_ratio(name, x, y))
        assert np.sqrt(np.mean(err_mag**2)) < 0.003, name  # the brief's 3 mmag bar
        assert field.error == pytest.approx(true_ratio(name, x, y).mean() * 0.0028, rel=0.4)  # ~2√2 mmag scatter
    assert "base_NormalizedCompensatedTophatFlux_instFlux" in res.catalog.colnames
    assert "apcorr_base_PsfFlux_used" in res.catalog.colnames and "apcorr_base_PsfFlux_used" not in cat.colnames
    corrected = apply_aperture_corrections(res.catalog, res.ap_corr)
    calib = corrected["base_NormalizedCompensatedTophatFlux_instFlux"]
    resid = 2.5 * np.log10(corrected["base_PsfFlux_instFlux"][3:] / calib[3:])
    assert abs(np.median(resid)) < 0.001  # corrected PSF fluxes are on the calibration-flux scale


def test_curve_of_growth_extrapolates_away_annulus_contamination():
    cat = catalog(80, seed=11)
    res = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig())
    assert not res.cog_fallback and res.curve_of_growth_n_stars >= 75
    # 80 stars of 1e5-1e6 counts with 900 counts of annulus noise: ~4e-4 on the intercept.
    assert abs(res.curve_of_growth - (1 + G_COG)) < max(3 * res.curve_of_growth_err, 1e-3)
    assert 1e-4 < res.curve_of_growth_err < 2e-3
    # A plain mean of the ratios keeps the C_ANN / f_12 bias (~0.3 %): the extrapolation is needed.
    f12 = np.asarray(cat["base_CircularApertureFlux_12_0_instFlux"])
    plain = np.mean(np.asarray(cat["base_CircularApertureFlux_25_0_instFlux"]) / f12)
    assert plain - (1 + G_COG - G_COG * (12.0 / 25.0) ** (5 / 3)) > 0.002  # vs the true 25-px / 12-px ratio
    assert res.normalization_err >= res.curve_of_growth_err
    assert res.scale_err["base_PsfFlux"] >= res.normalization_err > 0
    # Rubin's behaviour (calibration flux = 12-px aperture flux) is kept with total_aperture=None.
    rubin = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig(total_aperture=None))
    assert rubin.curve_of_growth == 1.0 and rubin.normalization == pytest.approx(NORM, rel=1e-3)


def test_a_curve_of_growth_no_star_measures_is_flagged_and_widens_the_errors():
    cat = catalog(80, seed=11)
    # No star reaches the curve-of-growth S/N: the factor is left out (1.0) and flagged, and its
    # configured error (2 %) enters the normalisation and flux-scale errors instead of nothing.
    res = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig(cog_min_snr=1e9))
    assert res.cog_fallback and res.curve_of_growth == 1.0 and res.curve_of_growth_n_stars == 0
    assert res.curve_of_growth_err == 0.02
    assert res.normalization_err >= 0.02 and res.scale_err["base_PsfFlux"] >= 0.02
    measured = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig())
    assert measured.normalization_err < 0.005  # so the fallback's error is the configured one
    with pytest.raises(ConfigError, match="cog_fallback_err"):
        ApertureCorrectionConfig(cog_fallback_err=-1.0).validate()


def test_missing_total_aperture_is_a_config_error():
    cat = catalog(20, seed=12)
    cat.remove_column("base_CircularApertureFlux_25_0_instFlux")
    with pytest.raises(ConfigError, match="total_aperture"):
        measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig())


def test_three_stars_fall_back_to_flagged_constant():
    cat = catalog(3, seed=4)
    res = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig())
    assert res.fallback
    field = res.ap_corr["base_GaussianFlux"]
    assert field.flagged_fallback and field.order == 0
    assert field.evaluate(1500.0, 2300.0) == pytest.approx(1.12, rel=0.005)  # median of 3 stars, 2 mmag noise


def test_low_snr_normalisation_falls_back_and_no_stars_raise():
    cat = catalog(20, seed=5)
    cat["base_CompensatedTophatFlux_12_instFluxErr"] = cat["base_CompensatedTophatFlux_12_instFlux"] / 150  # S/N 150
    res = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig())
    # 20 stars: ~1 mmag on the 12-px ratio and on the curve of growth each.
    assert res.normalization_snr == 100.0 and res.normalization == pytest.approx(NORM * (1 + G_COG), rel=3e-3)
    none = cat.copy()
    none["calib_psf_used"] = False
    with pytest.raises(ApertureCorrectionError, match="no clean star"):
        measure_aperture_correction(none, bbox=BBOX, config=ApertureCorrectionConfig())
    faint = cat.copy()
    faint["base_PsfFlux_instFluxErr"] = faint["base_PsfFlux_instFlux"]  # S/N 1: below every threshold
    with pytest.raises(ApertureCorrectionError, match="S/N >= 20 ") as info:
        measure_aperture_correction(faint, bbox=BBOX, config=ApertureCorrectionConfig())
    assert info.value.metadata["n_psf_used"] == 20


def test_psf_stars_all_below_snr_200_still_get_fitted_corrections():
    # Rubin's MeasureApCorrError: a short exposure whose PSF stars all have S/N < 200 failed. The
    # thresholds below min_snr are tried in turn: at S/N 120 every star passes 100, enough (>= 8)
    # for a fitted, unflagged field.
    cat = catalog(40, seed=6)
    for name in ("base_PsfFlux", "base_GaussianFlux"):
        cat[f"{name}_instFluxErr"] = cat[f"{name}_instFlux"] / 120
    res = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig())
    assert res.min_snr_used == 100.0 and not res.fallback
    x, y = np.asarray(cat["base_SdssCentroid_x"]), np.asarray(cat["base_SdssCentroid_y"])
    for name in ("base_PsfFlux", "base_GaussianFlux"):
        got = res.ap_corr[name].evaluate(x, y)
        # 40 stars with 2 mmag of ratio noise: the fitted field is within 3 mmag at every star.
        assert np.max(np.abs(2.5 * np.log10(got / true_ratio(name, x, y)))) < 0.003
    # With enough stars at S/N 200 nothing changes: the threshold stays at min_snr.
    assert measure_aperture_correction(catalog(40, seed=6), bbox=BBOX).min_snr_used == 200.0


def test_apply_normalization_is_a_copy():
    cat = catalog(5, seed=6)
    out = apply_normalization(cat, 2.0)
    np.testing.assert_allclose(out["base_NormalizedCompensatedTophatFlux_instFlux"],
                               2.0 * cat["base_CompensatedTophatFlux_12_instFlux"], rtol=1e-12)
    assert "base_NormalizedCompensatedTophatFlux_instFlux" not in cat.colnames


def test_tail_extrapolation_and_star_selection():
    cat = catalog(80, seed=13)
    # Without the wing model the 25-px aperture misses the light beyond it (here 0.46 % of 12 px).
    missing = G_COG * (12.0 / 25.0) ** (5 / 3)
    no_tail = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig(tail_aperture=None))
    assert no_tail.curve_of_growth == pytest.approx(1 + G_COG - missing, abs=1.5e-3)  # ~3 sigma of 4e-4
    # measure_normalization on a selection equals the PSF-star normalisation on the same stars.
    sel = np.arange(80) % 2 == 0
    half = measure_normalization(cat, sel)
    ref = measure_aperture_correction(cat[sel], bbox=BBOX)
    assert half.normalization == pytest.approx(ref.normalization, rel=1e-12)
    assert half.curve_of_growth_n_stars <= 40
    with pytest.raises(ConfigError, match="tail_aperture"):
        ApertureCorrectionConfig(tail_aperture="base_CircularApertureFlux_25_0").validate()
    with pytest.raises(ConfigError, match="stars mask"):
        measure_normalization(cat, sel[:10])


def test_bridge_flux_recovers_psf_field_under_noisy_calibration_flux():
    # A PSF-model size error that varies over the detector biases the PSF flux by a few mmag
    # (quadratic); the calibration flux is noisy (1 %, a 12-px aperture at S/N ~100-200) while
    # the Gaussian (bridge) and PSF fluxes of the same pixels differ by only 1 mmag of noise.
    rng = np.random.default_rng(21)
    n = 150
    cat = catalog(n, seed=21, noise_mag=0.0)
    x, y = np.asarray(cat["base_SdssCentroid_x"]), np.asarray(cat["base_SdssCentroid_y"])
    xs = 2 * (x - BBOX[0]) / (BBOX[2] - BBOX[0]) - 1
    ys = 2 * (y - BBOX[1]) / (BBOX[3] - BBOX[1]) - 1
    psf_frac = 0.99 * (1 + 0.004 * (xs**2 + ys**2) - 0.003 * xs)
    total = np.asarray(cat["base_CircularApertureFlux_12_0_instFlux"]) * (1 + G_COG)
    cat["base_CompensatedTophatFlux_12_instFlux"] = total / NORM / (1 + G_COG) * (1 + rng.normal(0, 0.01, n))
    cat["base_CompensatedTophatFlux_12_instFluxErr"] = 0.01 * total
    cat["base_GaussianFlux_instFlux"] = 0.9 * total * (1 + rng.normal(0, 0.0007, n))
    cat["base_GaussianFlux_instFluxErr"] = 0.0007 * cat["base_GaussianFlux_instFlux"]
    cat["base_PsfFlux_instFlux"] = psf_frac * total * (1 + rng.normal(0, 0.0007, n))
    cat["base_PsfFlux_instFluxErr"] = 0.0007 * cat["base_PsfFlux_instFlux"]  # S/N 1400 >= min_snr
    truth = 1.0 / psf_frac  # the correction bringing the PSF flux to the total flux
    rms = {}
    for bridge in ("base_GaussianFlux", None):
        res = measure_aperture_correction(cat, bbox=BBOX, config=ApertureCorrectionConfig(bridge_flux=bridge))
        corr = res.ap_corr["base_PsfFlux"].evaluate(x, y) * res.normalization / (NORM * (1 + G_COG))
        err = 2500 * np.log10(corr / truth)
        rms[bridge] = float(np.sqrt(np.mean((err - err.mean()) ** 2)))  # the shape; the level is the normalisation's
    # 150 stars: the bridged shape is set by 1-mmag ratios (~0.3 mmag); the direct fit by 10-mmag ones.
    assert rms["base_GaussianFlux"] < 0.6
    assert rms[None] > 2 * rms["base_GaussianFlux"]
    res = measure_aperture_correction(cat, bbox=BBOX)
    assert res.ap_corr["base_GaussianFlux"].order == 0  # flat noisy ratio: BIC keeps a constant
    assert res.ap_corr["base_PsfFlux"].order == 2 and not res.fallback
    assert res.used["base_PsfFlux"].sum() >= 140  # every star with S/N >= bridge_min_snr, few clipped


def test_product_field_is_exact_and_bridge_must_be_a_field():
    from singleframe.fields import ChebyshevField
    from singleframe.steps.aperture_correction import _product_field

    rng = np.random.default_rng(3)
    a = ChebyshevField(np.array([[1.0, 0.2], [-0.3, 0.0]]), BBOX)
    b = ChebyshevField(np.array([[0.9, 0.1, 0.05], [0.02, -0.04, 0.0], [0.03, 0.0, 0.0]]), BBOX)
    x, y = rng.uniform(BBOX[0], BBOX[2], 50), rng.uniform(BBOX[1], BBOX[3], 50)
    np.testing.assert_allclose(_product_field(a, b).evaluate(x, y), a.evaluate(x, y) * b.evaluate(x, y),
                               rtol=1e-12)  # exact identity, rounding only
    with pytest.raises(ConfigError, match="bridge_flux"):
        ApertureCorrectionConfig(fields=("base_PsfFlux",)).validate()


def test_curve_of_growth_leaves_out_stars_with_zeroed_reference_apertures():
    cat = catalog(200, seed=37)
    # Every total aperture holds zeroed neighbour pixels; in 40 % of the stars they reach into the
    # 12-px reference aperture, and those stars lost 0.4 % of their light beyond 12 px (their own
    # wing under the neighbour's footprint, as on the crowded benchmark frames).
    rng = np.random.default_rng(37)
    hit = rng.random(len(cat)) < 0.4
    lost = np.where(hit, 0.004 * np.asarray(cat["base_CircularApertureFlux_12_0_instFlux"]), 0.0)
    for r in ("17_0", "25_0"):
        cat[f"base_CircularApertureFlux_{r}_instFlux"] -= lost
    cat["base_CircularApertureFlux_12_0_flag_neighbours"] = hit
    cat["base_CircularApertureFlux_25_0_flag_neighbours"] = np.ones(len(cat), bool)
    res = measure_normalization(cat, np.ones(len(cat), bool))
    # ~120 clean stars: ~4e-4 on the factor; with the hit stars it would be ~1.6e-3 low.
    assert abs(res.curve_of_growth - (1 + G_COG)) < max(3 * res.curve_of_growth_err, 1e-3)
    assert res.curve_of_growth_n_stars <= int(np.sum(~hit))


def test_curve_of_growth_uses_isolated_stars_when_no_reference_aperture_is_neighbour_free():
    cat = catalog(200, seed=31)
    # Crowded: every aperture has zeroed neighbour pixels; stars with a source within 20 px lost
    # 0.4 % of their light beyond 12 px (their own wing under the neighbour's footprint).
    rng = np.random.default_rng(31)
    cat["base_CircularApertureFlux_12_0_flag_neighbours"] = np.ones(len(cat), bool)
    cat["base_CircularApertureFlux_25_0_flag_neighbours"] = np.ones(len(cat), bool)
    x, y = np.asarray(cat["base_SdssCentroid_x"]), np.asarray(cat["base_SdssCentroid_y"])
    near = rng.random(len(cat)) < 0.6
    ang = rng.uniform(0, 2 * np.pi, near.sum())
    nx, ny = x[near] + 10 * np.cos(ang), y[near] + 10 * np.sin(ang)  # a faint companion at 10 px
    lost = np.where(near, 0.004 * np.asarray(cat["base_CircularApertureFlux_12_0_instFlux"]), 0.0)
    for r in ("17_0", "25_0"):
        cat[f"base_CircularApertureFlux_{r}_instFlux"] -= lost
    comp = Table({c: np.zeros(near.sum(), cat[c].dtype) for c in cat.colnames})
    comp["base_SdssCentroid_x"], comp["base_SdssCentroid_y"] = nx, ny
    full = vstack([cat, comp])
    stars = np.r_[np.ones(len(cat), bool), np.zeros(len(comp), bool)]
    iso = measure_normalization(full, stars)
    every = measure_normalization(full, stars, config=ApertureCorrectionConfig(cog_isolation_pix=0.0))
    # ~80 isolated stars: ~5e-4 on the factor; using all stars keeps ~0.6 x 0.4 % of the loss.
    assert abs(iso.curve_of_growth - (1 + G_COG)) < max(3 * iso.curve_of_growth_err, 1.5e-3)
    assert (1 + G_COG) - every.curve_of_growth > 1.5e-3
    assert iso.curve_of_growth_n_stars < every.curve_of_growth_n_stars
