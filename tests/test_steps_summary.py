"""Summary statistics on a synthetic exposure with a Gaussian PSF."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from singleframe.background import BackgroundList, BackgroundModel
from singleframe.camera import square_mosaic
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.fields import ChebyshevField
from singleframe.photo_calib import PhotoCalib
from singleframe.psf import GaussianPsf
from singleframe.steps.summary import SUMMARY_FIELDS, SummaryConfig, compute_summary_stats

NY, NX = 400, 600
ORIGIN = (50, 70)
SIGMA = 1.7


def _inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    wcs = square_mosaic("t", n_side=1, nx=NX, ny=NY).initial_wcs(0, 150.0, -30.0, 10.0)
    image = rng.normal(0, 8.0, (NY, NX)).astype(np.float32)
    psf = GaussianPsf(SIGMA)
    visit = VisitInfo(7, 30.0, 60400.1, "r", "r", 150.0, -30.0, 10.0, airmass=1.2)
    exp = Exposure(image, np.zeros((NY, NX), np.uint32), np.full((NY, NX), 64.0, np.float32), visit,
                   DetectorInfo(0, gain_e_per_count=1.5, read_noise_e=6.0), wcs=wcs, psf=psf, origin=ORIGIN,
                   ap_corr={"base_PsfFlux": ChebyshevField(np.array([[0.98, 0.01], [0.0, 0.0]]),
                                                           (ORIGIN[0], ORIGIN[1], ORIGIN[0] + NX - 1, ORIGIN[1] + NY - 1))})
    bkg = BackgroundList((BackgroundModel(np.full((2, 3), 500.0), np.array([150.0, 350.0, 550.0]) + ORIGIN[0],
                                          np.array([100.0, 300.0]) + ORIGIN[1], (NY, NX), ORIGIN),))
    n = 80
    stars = Table()
    stars["base_SdssCentroid_x"] = rng.uniform(0, NX - 1, n) + ORIGIN[0]
    stars["base_SdssCentroid_y"] = rng.uniform(0, NY - 1, n) + ORIGIN[1]
    ixx, iyy, ixy = psf.moments(0, 0)
    stars["ext_shapeHSM_HsmSourceMoments_xx"] = ixx * (1 + rng.normal(0, 0.02, n))
    stars["ext_shapeHSM_HsmSourceMoments_yy"] = iyy * (1 + rng.normal(0, 0.02, n))
    stars["ext_shapeHSM_HsmSourceMoments_xy"] = rng.normal(0, 0.02, n)
    stars["base_PsfFlux_instFlux"] = np.full(n, 1e4)
    stars["base_PsfFlux_instFluxErr"] = np.full(n, 1e2)  # S/N 100: inside 50-1000
    stars["calib_psf_used"] = np.arange(n) % 2 == 0
    matches = Table({"distance_arcsec": rng.rayleigh(0.01, 200)})
    return exp, stars, bkg, matches


def test_summary_fields_finite_and_psf_sigma():
    exp, stars, bkg, matches = _inputs()
    s = compute_summary_stats(exp, stars=stars, psf_stars=stars, background=bkg, astrometry_matches=matches,
                              photo_calib=PhotoCalib(20.0, 0.1))
    assert set(s) == set(SUMMARY_FIELDS)
    for name, value in s.items():
        values = value if isinstance(value, list) else [value]
        assert all(math.isfinite(v) for v in values), name
    # The determinant radius of an exact Gaussian: 0.1 % covers the 3x3 sub-pixel integration of the stamp.
    assert s["psfSigma"] == pytest.approx(SIGMA, rel=1e-3)
    # Pixel integration adds 1/12 px² to the variance of the kernel: area 4 pi (sigma² + 1/12); 0.5 % margin.
    assert s["psfArea"] == pytest.approx(4 * math.pi * (SIGMA**2 + 1 / 12), rel=5e-3)
    assert s["skyBg"] == pytest.approx(500.0)
    assert s["skyNoise"] == pytest.approx(8.0, rel=0.02)  # 240k pixels; clipping bias ~1 %
    assert s["meanVar"] == pytest.approx(64.0)
    assert s["pixelScale"] == pytest.approx(0.2, rel=1e-3)
    assert s["nPsfStar"] == 40
    # Linear ap-corr field 0.98 + 0.01 y': range 0.02 over the grid (grid stops short of the top edge).
    assert 0.015 / SIGMA < s["psfApCorrSigmaScaledDelta"] <= 0.02 / SIGMA
    assert s["psfTraceRadiusDelta"] == pytest.approx(0.0, abs=1e-9)  # constant PSF
    assert s["psfStarDeltaSizeScatter"] < 0.05
    assert 0 < s["zenithDistance"] < 90
    assert s["zeroPoint"] == pytest.approx(PhotoCalib(20.0).zero_point_mag)
    assert s["astromOffsetMean"] == pytest.approx(0.01 * math.sqrt(math.pi / 2), rel=0.15)  # Rayleigh mean
    assert 15 < s["magLim"] < 35
    # Corners in the documented order, on the outer pixel edges (parent coordinates), and the centre.
    x0, y0, x1, y1 = ORIGIN[0] - 0.5, ORIGIN[1] - 0.5, ORIGIN[0] + NX - 0.5, ORIGIN[1] + NY - 0.5
    ra_c, dec_c = exp.pixel_to_sky(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]))
    assert s["raCorners"] == pytest.approx(list(ra_c), abs=1e-12)
    assert s["decCorners"] == pytest.approx(list(dec_c), abs=1e-12)
    ra0, dec0 = exp.pixel_to_sky(ORIGIN[0] + (NX - 1) / 2, ORIGIN[1] + (NY - 1) / 2)
    assert (s["ra"], s["dec"]) == pytest.approx((float(ra0), float(dec0)), abs=1e-12)
    # Rubin's effective-time definitions against the (LSSTCam r-band) fiducials, 30-s exposure.
    cfg = SummaryConfig()
    assert s["effTime"] == pytest.approx(10 ** (0.8 * (s["magLim"] - cfg.fiducial_mag_lim_mag["r"]))
                                         * cfg.fiducial_exp_time_s, rel=1e-12)
    assert s["effTimePsfSigmaScale"] == pytest.approx((SIGMA / cfg.fiducial_psf_sigma_pix["r"]) ** -2, rel=2e-3)
    assert s["effTimeSkyBgScale"] == pytest.approx(cfg.fiducial_sky_count_per_s["r"] / (500.0 / 30.0), rel=1e-12)
    dzp = cfg.fiducial_zero_point_mag["r"] - (s["zeroPoint"] - 2.5 * math.log10(30.0))
    assert s["effTimeZeroPointScale"] == pytest.approx(min(10 ** (-0.8 * dzp), cfg.max_effective_transparency),
                                                       rel=1e-12)


def test_summary_without_calibrations_is_nan():
    exp, stars, bkg, _ = _inputs()
    exp = exp.replace(wcs=None, psf=None)
    s = compute_summary_stats(exp, stars=stars[:0], psf_stars=stars[:0], background=None, astrometry_matches=None,
                              photo_calib=None, config=SummaryConfig())
    for name in ("psfSigma", "ra", "zenithDistance", "zeroPoint", "skyBg", "magLim", "effTime", "astromOffsetMean"):
        assert math.isnan(s[name]), name
    assert math.isfinite(s["skyNoise"])  # the pixels alone still give the noise


def test_zenith_distance_agrees_with_astropy_altaz() -> None:
    import warnings

    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    from singleframe.exposure import VisitInfo
    from singleframe.steps.summary import _zenith_distance

    class _Exp:
        visit_info = VisitInfo(1, 30.0, 60800.1, "r", "r", 150.0, 2.0, 0.0)

    lon, lat, height = _Exp.visit_info.observatory_lon_lat_height
    loc = EarthLocation(lon=lon * u.deg, lat=lat * u.deg, height=height * u.m)
    for ra, dec in [(150.0, 2.0), (10.0, -60.0), (300.0, -30.0), (40.0, 20.0)]:
        with iers.conf.set_temp("auto_download", False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bundled IERS tables only: degraded-accuracy warning
            altaz = SkyCoord(ra * u.deg, dec * u.deg).transform_to(
                AltAz(obstime=Time(60800.1, format="mjd", scale="tai"), location=loc))
        # No nutation/aberration in the fast formula: 0.02 deg is 4x the measured worst case.
        assert _zenith_distance(ra, dec, _Exp()) == pytest.approx(90.0 - altaz.alt.deg, abs=0.02)


def test_max_distance_to_nearest_psf_star_counts_only_the_statistics_stars():
    # Rubin measures maxDistToNearestPsf to the stars of its PSF statistics (used, S/N 50-1000).
    # Used stars in the right half made too bright (S/N 2000) leave that half without any: the
    # last grid column (x = 592) is then >= 292 px from the nearest one; with all 40 stars the
    # largest gap is a corner's, 178 px.
    exp, stars, bkg, matches = _inputs()
    kw = dict(psf_stars=stars, background=bkg, astrometry_matches=matches, photo_calib=PhotoCalib(20.0, 0.1))
    base = compute_summary_stats(exp, stars=stars, **kw)["maxDistToNearestPsf"]
    bright = stars.copy()
    right = np.asarray(bright["base_SdssCentroid_x"]) > ORIGIN[0] + NX / 2
    bright["base_PsfFlux_instFlux"][right] = 2e5  # S/N 2000
    far = compute_summary_stats(exp, stars=bright, **{**kw, "psf_stars": bright})["maxDistToNearestPsf"]
    assert base < 200 and far >= 290


def test_psf_aperture_flux_delta_is_nan_for_a_model_with_negative_flux():
    class Negative(GaussianPsf):
        def images(self, x, y, *, size=None, centered=True):  # a broken model: negative everywhere
            return -super().images(x, y, size=size, centered=centered)

    exp, stars, bkg, matches = _inputs()
    kw = dict(stars=stars, psf_stars=stars, background=bkg, astrometry_matches=matches, photo_calib=PhotoCalib(20.0))
    assert math.isfinite(compute_summary_stats(exp, **kw)["psfApFluxDelta"])
    assert math.isnan(compute_summary_stats(exp.replace(psf=Negative(SIGMA)), **kw)["psfApFluxDelta"])
