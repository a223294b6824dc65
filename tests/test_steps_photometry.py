"""Photometric zero point, its error, colour term; calibration of catalogues and pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from singleframe.background import BackgroundList, BackgroundModel
from singleframe.errors import ConfigError, PhotometryError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.photo_calib import AB_MAG_OF_ONE_NJY, PhotoCalib
from singleframe.steps.calibration import calibrate_catalog, calibrate_exposure
from singleframe.steps.photometry import PhotometryConfig, fit_photometry

ZP_TRUE = 28.3  # mag of one count
FLUX = "base_PsfFlux"  # the default calibration flux (aperture-corrected to total)


def _scene(seed: int, n: int = 300, *, colour_term: float = 0.0, sky_noise: float = 30.0):
    """Stars and references with a known zero point; instrumental fluxes carry Poisson + sky noise."""
    rng = np.random.default_rng(seed)
    ra = 150.0 + rng.uniform(-0.1, 0.1, n)
    dec = -30.0 + rng.uniform(-0.1, 0.1, n)
    # r <= 19.5: S/N >= 50 with this noise (the default photometry.min_snr).
    r_mag = rng.uniform(15.0, 19.5, n)
    g_mag = r_mag + rng.uniform(0.2, 1.5, n)
    colour = g_mag - r_mag
    # ref = inst + ZP + k (g - r) ; the zero point applies at the median colour of the stars.
    inst_true = 10 ** (-0.4 * (r_mag - ZP_TRUE - colour_term * (colour - np.median(colour))))
    err = np.sqrt(inst_true + sky_noise**2)
    inst = inst_true + rng.normal(0, 1, n) * err
    stars = Table()
    stars["id"] = np.arange(1, n + 1, dtype=np.int64)
    stars["coord_ra"] = np.radians(ra + rng.normal(0, 0.02, n) / 3600)  # 20 mas astrometric noise
    stars["coord_dec"] = np.radians(dec + rng.normal(0, 0.02, n) / 3600)
    stars[f"{FLUX}_instFlux"] = inst
    stars[f"{FLUX}_instFluxErr"] = err
    stars["sky_source"] = np.zeros(n, bool)
    stars["psf_id"] = np.where(np.arange(n) % 3 == 0, np.arange(n) + 100, 0)
    ref = Table()
    ref["id"] = np.arange(n, dtype=np.int64) + 5000
    ref["ra"], ref["dec"] = ra, dec
    ref["r_flux"] = 10 ** (-0.4 * (r_mag - AB_MAG_OF_ONE_NJY))
    ref["r_fluxErr"] = np.zeros(n)  # noiseless references: the errors are the instrumental ones
    ref["g_flux"] = 10 ** (-0.4 * (g_mag - AB_MAG_OF_ONE_NJY))
    ref["g_fluxErr"] = np.zeros(n)
    return stars, ref


def test_recovers_zero_point_within_error():
    stars, ref = _scene(1)
    res = fit_photometry(stars, ref, band="r")
    # 3 sigma: a single realisation of an unbiased estimate with a correct error.
    assert abs(res.zero_point_mag - ZP_TRUE) < 3 * res.zero_point_err_mag
    assert res.zero_point_err_mag < 0.01  # 270 stars at S/N 50-2000
    assert res.photo_calib.zero_point_mag == pytest.approx(res.zero_point_mag, abs=1e-9)
    assert res.n_matches > 250  # 10 % reserved, a few clipped
    assert res.reserved.sum() == pytest.approx(30, abs=1)
    assert not np.any(res.used & res.reserved)
    assert res.colour_term is None and not res.colour_term_used
    assert math.isfinite(res.reserved_rms_mag)
    for col in ("ref_id", "ref_coord_ra", "ref_r_flux", "src_id", "src_psf_id", "src_coord_ra", "distance"):
        assert col in res.matches.colnames
    assert len(res.matches) == len(stars)


def test_pull_distribution():
    pulls = []
    for seed in range(50):
        stars, ref = _scene(100 + seed)
        res = fit_photometry(stars, ref, band="r")
        pulls.append((res.zero_point_mag - ZP_TRUE) / res.zero_point_err_mag)
    pulls = np.asarray(pulls)
    # With 50 realisations the sample std of a unit normal is 1 +- 0.1; 0.8-1.25 is the brief's band.
    assert 0.8 <= np.std(pulls) <= 1.25
    assert abs(np.mean(pulls)) < 0.5  # mean of 50 unit normals: +-0.14 (1 sigma)


def test_intrinsic_scatter_enters_error():
    stars, ref = _scene(2)
    rng = np.random.default_rng(9)
    # 0.05 mag of extra scatter not described by the errors.
    stars[f"{FLUX}_instFlux"] = stars[f"{FLUX}_instFlux"] * 10 ** (-0.4 * rng.normal(0, 0.05, len(stars)))
    res = fit_photometry(stars, ref, band="r")
    assert res.intrinsic_scatter_mag == pytest.approx(0.05, abs=0.015)  # ~270 stars: ~10 % precision
    assert abs(res.zero_point_mag - ZP_TRUE) < 3 * res.zero_point_err_mag
    assert res.zero_point_err_mag > 0.05 / math.sqrt(res.n_matches) * 0.9  # at least the scatter term


def test_scale_error_adds_in_quadrature_and_faint_stars_are_cut():
    stars, ref = _scene(7)
    base = fit_photometry(stars, ref, band="r")
    with_scale = fit_photometry(stars, ref, band="r", scale_err_mag=0.002)
    assert with_scale.zero_point_mag == pytest.approx(base.zero_point_mag, abs=1e-12)  # error only
    assert with_scale.zero_point_err_mag == pytest.approx(math.hypot(base.zero_point_err_mag, 0.002), rel=1e-9)
    with pytest.raises(ConfigError):
        fit_photometry(stars, ref, band="r", scale_err_mag=-1.0)
    # Stars below the default S/N 50 are not used: their flux-selected fluxes are biased bright.
    faint = stars.copy()
    faint[f"{FLUX}_instFluxErr"][:50] = faint[f"{FLUX}_instFlux"][:50] / 20.0
    res = fit_photometry(faint, ref, band="r")
    assert not np.any(res.used[:50]) and not np.any(res.reserved[:50])


def test_outliers_are_clipped():
    stars, ref = _scene(3)
    stars[f"{FLUX}_instFlux"][:20] *= 5.0  # 20 blended / variable stars, 1.7 mag off
    res = fit_photometry(stars, ref, band="r")
    assert not np.any(res.used[:20])
    assert abs(res.zero_point_mag - ZP_TRUE) < 3 * res.zero_point_err_mag


def test_colour_term():
    stars, ref = _scene(4, colour_term=0.08)
    res = fit_photometry(stars, ref, band="r", config=PhotometryConfig(colour_band_pair=("g", "r")))
    assert res.colour_term_used
    # Colour baseline 1.3 mag with ~0.01 mag errors per star: the slope is good to ~0.005.
    assert res.colour_term == pytest.approx(0.08, abs=0.015)
    assert abs(res.zero_point_mag - ZP_TRUE) < 0.01


def test_too_few_matches_raises():
    stars, ref = _scene(5, n=4)
    with pytest.raises(PhotometryError) as info:
        fit_photometry(stars, ref, band="r")
    assert info.value.metadata["n_stars"] == 4


def test_calibrate_catalog():
    cat = Table({"a_instFlux": [100.0, -1.0], "a_instFluxErr": [10.0, 1.0], "b_instFlux": [5.0, 6.0]})
    pc = PhotoCalib(2.0, 0.02)
    out = calibrate_catalog(cat, pc)
    np.testing.assert_allclose(out["a_flux"], [200.0, -2.0])
    # Error: sqrt((10*2)^2 + (100*0.02)^2).
    assert out["a_fluxErr"][0] == pytest.approx(math.hypot(20.0, 2.0))
    assert out["a_mag"][0] == pytest.approx(AB_MAG_OF_ONE_NJY - 2.5 * math.log10(200.0))
    assert math.isnan(out["a_mag"][1])  # negative flux has no magnitude
    assert np.all(np.isnan(out["b_fluxErr"]))  # no instFluxErr column
    assert str(out["a_flux"].unit) == "nJy"
    assert "a_flux" not in cat.colnames


def test_calibrate_exposure_round_trip():
    rng = np.random.default_rng(6)
    ny, nx, origin = 60, 80, (100, 200)
    image = rng.normal(0, 5, (ny, nx)).astype(np.float32)
    bkg = BackgroundList((BackgroundModel(rng.uniform(90, 110, (3, 4)), np.linspace(110, 270, 4),
                                          np.linspace(210, 250, 3), (ny, nx), origin),))
    exp = Exposure(image, np.zeros((ny, nx), np.uint32), np.full((ny, nx), 25.0, np.float32),
                   VisitInfo(1, 30.0, 60000.0, "r", "r", 150.0, -30.0, 0.0), DetectorInfo(0), origin=origin)
    pc = PhotoCalib(3.7, 0.037)
    cal = calibrate_exposure(exp, pc, background=bkg)
    assert cal.exposure.metadata["BUNIT"] == "nJy"
    assert cal.background.unit == "nJy"
    assert cal.exposure.photo_calib.calibration_njy_per_count == 1.0
    assert cal.exposure.photo_calib.calibration_err_njy_per_count == pytest.approx(0.01)
    np.testing.assert_allclose(cal.exposure.variance, 25.0 * 3.7**2, rtol=1e-6)  # float32
    restored = (cal.exposure.image.astype(float) + cal.background.image()) / 3.7
    # float32 storage of values ~100: relative 1e-7 x 100 -> 1e-5 absolute, 1e-4 for margin.
    np.testing.assert_allclose(restored, image + bkg.image(), rtol=0, atol=1e-4)
    assert exp.photo_calib is None  # input untouched
