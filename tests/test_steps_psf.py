"""Tests of steps/psf_determination.py and the pixel PSF model (core/psf.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table
from scipy import ndimage

from singleframe.errors import ConfigError, PsfFitError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.footprints import Detections
from singleframe.psf import GaussianPsf, PixelPsf, adaptive_moments, psf_from_hdus, shift_stamps
from singleframe.steps.measurement import MeasurementConfig, measure_sources
from singleframe.steps.psf_determination import (
    PsfFitConfig,
    PsfStarSelectorConfig,
    fit_psf,
    select_psf_candidates,
)

SHAPE = (620, 860)  # non-square
ORIGIN = (1000, 2000)
SKY_VAR = 100.0


def sigma_at(x, y):
    """True PSF sigma: varies linearly from 1.8 to 2.4 px across the detector in x."""
    return 1.8 + 0.6 * (np.asarray(x) - ORIGIN[0]) / SHAPE[1]


def render(xs, ys, fluxes, kernel_fn, *, seed=0, size=41):
    h = size // 2
    img = np.zeros((SHAPE[0] + 2 * h, SHAPE[1] + 2 * h))
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        k = kernel_fn(x, y, size)
        cx, cy = int(np.round(x - ORIGIN[0])) + h, int(np.round(y - ORIGIN[1])) + h
        img[cy - h:cy + h + 1, cx - h:cx + h + 1] += f * k
    img = img[h:h + SHAPE[0], h:h + SHAPE[1]]
    var = SKY_VAR + img
    return img + np.random.default_rng(seed).normal(size=SHAPE) * np.sqrt(var), var


def detect(img, var):
    # A sigma=1.5 Gaussian filter scales white noise by ≈ 0.19; 6 sigma keeps noise out.
    lab, n = ndimage.label(ndimage.gaussian_filter(img, 1.5) > 6 * 0.19 * math.sqrt(SKY_VAR))
    idx = np.arange(1, n + 1)
    peaks = ndimage.maximum_position(img, lab, idx)
    py = np.array([p[0] for p in peaks], int)
    px = np.array([p[1] for p in peaks], int)
    src = Table({"label": idx, "parent_label": np.zeros(n, int), "x_peak": px + ORIGIN[0], "y_peak": py + ORIGIN[1],
                 "peak_value": img[py, px], "peak_snr": img[py, px] / 10.0, "npix": np.ones(n, int),
                 "deblend_nChild": np.zeros(n, int), "deblend_nPeaks": np.ones(n, int)})
    return Detections(lab.astype(np.int32), src, ORIGIN)


def exposure(img, var, psf):
    vi = VisitInfo(1, 30.0, 60000.0, "r", "r", 10.0, 10.0, 0.0)
    return Exposure(img.astype(np.float32), np.zeros(SHAPE, np.uint32), var.astype(np.float32), vi, DetectorInfo(1),
                    psf=psf, origin=ORIGIN)


def positions(rng, n):
    # Poisson-disc-like: a jittered grid keeps the stars isolated.
    ny = int(math.sqrt(n * SHAPE[0] / SHAPE[1]))
    nx = int(math.ceil(n / ny))
    gy, gx = np.meshgrid(np.linspace(30, SHAPE[0] - 30, ny), np.linspace(30, SHAPE[1] - 30, nx), indexing="ij")
    xs = gx.ravel()[:n] + rng.uniform(-8, 8, n) + ORIGIN[0]
    ys = gy.ravel()[:n] + rng.uniform(-8, 8, n) + ORIGIN[1]
    return xs, ys


def measured_scene(xs, ys, flux, kernel, *, seed):
    """Render the stars, start from a 2.1-px Gaussian PSF, detect and measure: (exposure, catalogue)."""
    img, var = render(xs, ys, flux, kernel, seed=seed)
    exp = exposure(img, var, GaussianPsf(2.1))
    return exp, measure_sources(exp, detect(img, var)).catalog


def gaussian_kernel(x, y, size):
    return GaussianPsf(float(sigma_at(x, y)), e1=0.03, e2=-0.02).image(x, y, size=size, centered=False)


@pytest.fixture(scope="module")
def varying_scene():
    rng = np.random.default_rng(21)
    xs, ys = positions(rng, 110)
    flux = 10 ** rng.uniform(4.3, 5.5, xs.size)
    exp, cat = measured_scene(xs, ys, flux, gaussian_kernel, seed=22)
    sel = select_psf_candidates(cat, config=PsfStarSelectorConfig())
    fit = fit_psf(exp, cat, sel.candidate, config=PsfFitConfig())
    return exp, cat, sel, fit


def test_pixel_psf_reproduces_varying_sizes_at_held_out_positions(varying_scene):
    exp, cat, sel, fit = varying_scene
    assert sel.n_candidates >= 90 and not fit.fallback
    assert fit.n_used >= 70 and fit.n_reserved == int(0.1 * sel.n_candidates)
    assert not np.any(fit.used & fit.reserved)
    assert isinstance(fit.psf, PixelPsf) and fit.spatial_order == 2
    assert 0.8 < fit.chi2 < 1.3  # noise-dominated residuals
    rng = np.random.default_rng(5)
    tx = rng.uniform(40, SHAPE[1] - 40, 40) + ORIGIN[0]
    ty = rng.uniform(40, SHAPE[0] - 40, 40) + ORIGIN[1]
    truth = np.stack([gaussian_kernel(a, b, 41) for a, b in zip(tx, ty, strict=True)])
    am = adaptive_moments(truth, sigma_guess_pix=2.0)
    t_true = am.xx + am.yy
    m = fit.psf.moments_many(tx, ty)
    t_model = m[:, 0] + m[:, 1]
    # Brief: sizes within 0.5 % at held-out positions (median 0.2 % on the stars themselves).
    assert np.median(np.abs(t_model / t_true - 1)) < 0.005
    assert np.max(np.abs(t_model / t_true - 1)) < 0.015  # corners extrapolate the polynomial
    assert abs(fit.size_residual) < 0.002 and abs(fit.reserved_size_residual) < 0.005
    e1 = (m[:, 0] - m[:, 1]) / t_model - (am.xx - am.yy) / t_true
    e2 = 2 * m[:, 2] / t_model - 2 * am.xy / t_true
    assert np.median(np.abs(e1)) < 1.5e-3 and np.median(np.abs(e2)) < 1.5e-3  # ~100 stars at S/N 60-800
    assert fit.fwhm_pix == pytest.approx(2.3548 * math.sqrt(t_true.mean() / 2), rel=0.05)


def test_pixel_psf_moments_of_many_positions_follow_the_exact_ones(varying_scene):
    """Above 100 positions the moments come from splines through 9x9 exact evaluations over the
    bbox, built once per model; positions outside the bbox are evaluated exactly."""
    psf = varying_scene[3].psf
    x0, y0, x1, y1 = psf.bbox
    rng = np.random.default_rng(11)
    xs, ys = rng.uniform(x0, x1, 300), rng.uniform(y0, y1, 300)
    xs[:2], ys[:2] = [x0 - 50.0, x1 + 20.0], [y0 + 5.0, y1 + 30.0]
    exact = psf._exact_moments(xs, ys)
    many = psf.moments_many(xs, ys)
    # The exact moments stop iterating at a 1e-6 relative step, which leaves them ~1e-5 from
    # their fixed point; the spline of this quadratic-in-position model adds less than that.
    np.testing.assert_allclose(many[:, :2], exact[:, :2], rtol=5e-5)
    np.testing.assert_allclose(many[:, 2], exact[:, 2], rtol=0, atol=5e-5 * float(exact[:, :2].max()))
    np.testing.assert_allclose(many[:2], exact[:2], rtol=1e-9)  # outside the bbox: exact
    assert psf._moment_splines() is psf._moment_splines()
    # The moments at one position are cached; arrays still give the first position's.
    assert psf.moments(xs[5], ys[5]) == pytest.approx(tuple(exact[5]), rel=1e-9, abs=1e-12)
    assert psf.moments(xs[5], ys[5]) is psf.moments(xs[5], ys[5])
    assert psf.moments(xs[5:8], ys[5:8]) == pytest.approx(tuple(exact[5]), rel=1e-9, abs=1e-12)


def test_pixel_psf_fits_round_trip_and_shift(varying_scene):
    *_, fit = varying_scene
    back = psf_from_hdus(fit.psf.to_hdus())
    assert isinstance(back, PixelPsf)
    for x, y in ((1100.3, 2100.8), (1700.0, 2500.5)):
        np.testing.assert_array_equal(back.image(x, y, centered=False), fit.psf.image(x, y, centered=False))
        assert back.moments(x, y) == fit.psf.moments(x, y)
    k = fit.psf.image(1400.3, 2300.4, centered=False)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    am = adaptive_moments(k[None], sigma_guess_pix=2.0)
    # The centred=False image is offset by the fractional position (exact Fourier shift).
    assert am.x[0] == pytest.approx(0.3, abs=2e-3) and am.y[0] == pytest.approx(0.4, abs=2e-3)


def test_shift_stamps_is_exact_for_well_sampled_psfs():
    psf = GaussianPsf(1.8)
    d = np.array([-0.5, -0.2, 0.3, 0.5])
    shifted = psf.images(d, -d, size=31, centered=False)
    back = shift_stamps(shifted, -d, d)
    # A phase shift is exact for band-limited images: sigma = 1.8 px is band-limited to ~1e-7.
    np.testing.assert_allclose(back, psf.images(0 * d, 0 * d, size=31), atol=1e-6)


def test_selector_rejects_galaxies_and_cosmic_rays():
    rng = np.random.default_rng(8)
    # 45 unflagged cosmic rays in a tight clump (k-means would split the stars instead), and
    # 40 galaxies spread over larger widths.
    n_star, n_gal, n_cr = 60, 40, 45
    width = np.concatenate([rng.normal(2.0, 0.02, n_star), rng.uniform(2.3, 6.0, n_gal), rng.normal(1.0, 0.01, n_cr)])
    t = 2 * width**2
    n = width.size
    cat = Table({"base_PsfFlux_instFlux": np.full(n, 1e5), "base_PsfFlux_instFluxErr": np.full(n, 100.0),
                 "ext_shapeHSM_HsmSourceMoments_xx": t / 2, "ext_shapeHSM_HsmSourceMoments_yy": t / 2,
                 "base_PixelFlags_flag_edge": np.zeros(n, bool)})
    cat["base_PsfFlux_instFluxErr"][0] = 1e4  # S/N 10: too faint
    sel = select_psf_candidates(cat, config=PsfStarSelectorConfig())
    truth = np.arange(n) < n_star
    truth[0] = False
    assert sel.size_mode_pix == pytest.approx(2.0, abs=0.01)
    assert np.sum(sel.candidate & truth) >= n_star - 3 and np.sum(sel.candidate & ~truth) <= 2
    empty = select_psf_candidates(cat[:0], config=PsfStarSelectorConfig())
    assert empty.n_candidates == 0 and math.isnan(empty.size_mode_pix)


def donut_kernel(x, y, size):
    h = size // 2
    g = np.arange(-h, h + 1, dtype=float)
    r = np.hypot(g[None, :] - (x - np.round(x)), g[:, None] - (y - np.round(y)))
    k = np.exp(-0.5 * ((r - 4.0) / 1.2) ** 2)  # ring of radius 4 px, no central peak
    return k / k.sum()


def test_donut_and_too_few_stars_raise():
    rng = np.random.default_rng(31)
    xs, ys = positions(rng, 40)
    img, var = render(xs, ys, np.full(xs.size, 1e5), donut_kernel, seed=32)
    exp = exposure(img, var, GaussianPsf(3.0))
    # Donut peaks sit on the ring, 4 px from the centre: allow the centroid to travel there.
    cat = measure_sources(exp, detect(img, var), config=MeasurementConfig(max_centroid_shift_pix=6.0)).catalog
    cand = ~np.asarray(cat["base_SdssCentroid_flag"])
    assert cand.sum() >= 8  # enough for a pixel model (min_stars 5)
    with pytest.raises(PsfFitError, match="not a compact profile"):
        fit_psf(exp, cat, cand, config=PsfFitConfig())
    one = np.zeros(len(cat), bool)
    one[np.argmax(cand)] = True
    with pytest.raises(PsfFitError, match="only 1 PSF star") as info:
        fit_psf(exp, cat, one, config=PsfFitConfig())
    assert info.value.metadata["n_candidates"] == 1


def test_few_stars_fall_back_to_gaussian(varying_scene):
    exp, cat, sel, _ = varying_scene
    three = np.zeros(len(cat), bool)
    three[np.nonzero(sel.candidate)[0][:3]] = True
    fit = fit_psf(exp, cat, three, config=PsfFitConfig())
    assert fit.fallback and isinstance(fit.psf, GaussianPsf) and fit.n_used == 3
    # The Gaussian has the three stars' size: the median of their true determinant radii (pixel
    # response removed, as the fallback removes it). The stars have S/N 130-460, so their moment
    # sigmas are known to 0.3-0.9 %; 1.5 % is ~3 sigma, and excludes the 2.1-px starting Gaussian.
    x = np.asarray(cat["base_SdssCentroid_x"])[three]
    y = np.asarray(cat["base_SdssCentroid_y"])[three]
    am = adaptive_moments(np.stack([gaussian_kernel(a, b, 41) for a, b in zip(x, y, strict=True)]),
                          sigma_guess_pix=2.0)
    true_sigma = float(np.median(((am.xx - 1 / 12) * (am.yy - 1 / 12) - am.xy**2) ** 0.25))
    assert fit.psf.sigma(0, 0) == pytest.approx(true_sigma, rel=0.015)
    with pytest.raises(PsfFitError, match="only 3 PSF star"):
        fit_psf(exp, cat, three, config=PsfFitConfig(allow_gaussian_fallback=False))


def test_pixel_psf_offset_images_are_shifted_centred_images(varying_scene):
    # Offset kernels come from the basis spectra (one FFT per basis image); they must equal the
    # Fourier shift of the centred kernel up to float32 FFT rounding (~1e-7 of the peak).
    *_, fit = varying_scene
    x = np.array([1100.3, 1400.7, 1700.45])
    y = np.array([2100.8, 2300.2, 2500.55])
    off = fit.psf.images(x, y, centered=False)
    ref = shift_stamps(fit.psf.images(x, y), x - np.round(x), y - np.round(y))
    ref /= ref.sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(off, ref, atol=1e-6 * off.max())


# --------------------------------------------------------------------------------------
# Ellipticity (issue 3: |median δe| ≤ 5e-4). On the benchmark frames the median ellipticity
# residual is set by photon noise of the PSF stars (about 2 / sqrt(Σ (S/N)²) per component);
# these tests pin down the method itself with stars so bright that noise is negligible, and
# the star ranking that keeps the information of crowded frames.
# --------------------------------------------------------------------------------------
def e_at(x, y):
    """True ellipticity: both components vary linearly across the detector (as in the simulator's field)."""
    u = 2 * (np.asarray(x) - ORIGIN[0]) / SHAPE[1] - 1
    v = 2 * (np.asarray(y) - ORIGIN[1]) / SHAPE[0] - 1
    return 0.03 + 0.02 * u, -0.02 + 0.015 * v


def elliptical_kernel(x, y, size, centered=False):
    e1, e2 = e_at(x, y)
    return GaussianPsf(float(sigma_at(x, y)), e1=float(e1), e2=float(e2)).image(x, y, size=size, centered=centered)


def distortion(xx, yy, xy):
    return (xx - yy) / (xx + yy), 2 * xy / (xx + yy)


@pytest.fixture(scope="module")
def bright_scene():
    rng = np.random.default_rng(41)
    xs, ys = positions(rng, 90)
    # S/N ~ 3e3-1e4 per star: the noise floor of the median δe (~2/sqrt(Σ S/N²) ≈ 3e-5) is far below the checks.
    flux = 10 ** rng.uniform(7.0, 8.0, xs.size)
    exp, cat = measured_scene(xs, ys, flux, elliptical_kernel, seed=42)
    return exp, cat


def _held_out_de(fit, *, seed):
    """Model minus true distortion (de1, de2) at 60 random positions away from the edges."""
    rng = np.random.default_rng(seed)
    tx = rng.uniform(40, SHAPE[1] - 40, 60) + ORIGIN[0]
    ty = rng.uniform(40, SHAPE[0] - 40, 60) + ORIGIN[1]
    truth = np.stack([elliptical_kernel(a, b, 41, centered=True) for a, b in zip(tx, ty, strict=True)])
    t = adaptive_moments(truth, sigma_guess_pix=2.0)
    m = adaptive_moments(fit.psf.images(tx, ty, size=41), sigma_guess_pix=2.0)
    dm, dt = distortion(m.xx, m.yy, m.xy), distortion(t.xx, t.yy, t.xy)
    return dm[0] - dt[0], dm[1] - dt[1]


def test_fit_has_no_ellipticity_bias_at_held_out_positions(bright_scene):
    exp, cat = bright_scene
    snr = np.asarray(cat["base_PsfFlux_instFlux"]) / np.asarray(cat["base_PsfFlux_instFluxErr"])
    cand = np.isfinite(snr) & (snr > 100) & ~np.asarray(cat["base_SdssCentroid_flag"], bool)
    assert cand.sum() >= 80
    fit = fit_psf(exp, cat, cand, config=PsfFitConfig())
    de1, de2 = _held_out_de(fit, seed=6)
    # Noise floor ~3e-5 and the quadratic polynomial follows this smooth field closely: a
    # method bias (shift interpolant, centring, weighting) of the 1e-3 size seen on noisy frames would fail.
    assert abs(np.median(de1)) < 1.5e-4 and abs(np.median(de2)) < 1.5e-4
    assert np.max(np.abs(de1)) < 5e-4 and np.max(np.abs(de2)) < 5e-4  # worst held-out point 2.3e-4 (polynomial)


def test_piff_determiner_fits_the_same_stars_as_well(bright_scene):
    # Piff (psf_fit.determiner = "piff") on the stars our fit kept, stored as our pixel model: held to
    # the same held-out truth as our fit above, and to our fit's size. Both fit a quadratic pixel
    # field to the same S/N ~ 3e3-1e4 stars, so they can differ only by method: the tolerances are
    # those of our own fit (1.5e-4 median) and 0.2 % in size (the bar).
    pytest.importorskip("piff")
    exp, cat = bright_scene
    snr = np.asarray(cat["base_PsfFlux_instFlux"]) / np.asarray(cat["base_PsfFlux_instFluxErr"])
    cand = np.isfinite(snr) & (snr > 100) & ~np.asarray(cat["base_SdssCentroid_flag"], bool)
    # 40 stars (Piff takes ~0.1 s per star here): the floor of the median δe rises to ~5e-5.
    ours = fit_psf(exp, cat, cand, config=PsfFitConfig(max_stars=40))
    piff_fit = fit_psf(exp, cat, cand, config=PsfFitConfig(max_stars=40, determiner="piff"))
    assert isinstance(piff_fit.psf, PixelPsf) and piff_fit.spatial_order == ours.spatial_order == 2
    # Piff replaces the model fit only: the same stars are used and reserved.
    assert np.array_equal(piff_fit.used, ours.used) and np.array_equal(piff_fit.reserved, ours.reserved)
    # Its chi² is Piff's own (reduced, per star): at S/N ~ 1e4 both models sit above the photon noise
    # (Piff's 34 here, ours 9.6 before clipping the wings it misses), so only its presence and sign are
    # checked.
    assert piff_fit.n_used >= 30 and np.isfinite(piff_fit.chi2) and piff_fit.chi2 > 1
    de1, de2 = _held_out_de(piff_fit, seed=6)
    assert abs(np.median(de1)) < 1.5e-4 and abs(np.median(de2)) < 1.5e-4
    xs, ys = np.array([300.0, 700.0]) + ORIGIN[0], np.array([250.0, 650.0]) + ORIGIN[1]
    np.testing.assert_allclose(piff_fit.psf.sigma(xs, ys), ours.psf.sigma(xs, ys), rtol=2e-3)


def test_piff_determiner_is_refused_without_piff(monkeypatch):
    # Validated before any pixel is touched, with the install command in the message.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "piff" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'singleframe\[piff\]'"):
        PsfFitConfig(determiner="piff").validate()
    with pytest.raises(ConfigError, match="determiner must be"):
        PsfFitConfig(determiner="psfex").validate()  # type: ignore[arg-type]


def test_max_stars_keeps_the_brightest_candidates(bright_scene):
    exp, cat = bright_scene
    snr = np.asarray(cat["base_PsfFlux_instFlux"]) / np.asarray(cat["base_PsfFlux_instFluxErr"])
    cand = np.isfinite(snr) & (snr > 100) & ~np.asarray(cat["base_SdssCentroid_flag"], bool)
    fit = fit_psf(exp, cat, cand, config=PsfFitConfig(max_stars=30, n_reject_iterations=0))
    pool = cand & ~fit.reserved  # the reserve is drawn first, at random, from all candidates
    assert fit.n_used == 30
    assert np.min(snr[fit.used]) >= np.sort(snr[pool])[-30]
    assert fit.n_reserved == int(0.1 * cand.sum())


def test_neighbour_pixels_are_clipped_not_the_star_or_its_wings():
    # _clip_neighbours on one star: model = 1000-count Gaussian (sigma 2 px) on unit noise. A neighbour
    # bump 7 px out (beyond 2 sigma of the centre; 20-count peak, ~10^3 x the star's light there) is
    # clipped and grown by a pixel. Not clipped: the same bump 2 px out (the core), a 30 % excess on the
    # wing at 4.5-5.5 px (a model short of a bright star's wing: 7-24 sigma, but under half the star's
    # light there) and a negative bump 7 px out on the other side.
    from singleframe.steps.psf_determination import _clip_neighbours

    g = np.arange(25) - 12
    r = np.hypot(g[:, None], g[None, :])
    model = (1000.0 * np.exp(-r ** 2 / 8.0))[None]
    weights = np.ones((1, 25, 25))

    def bump(dx):
        return 20.0 * np.exp(-((g[None, :] - dx) ** 2 + g[:, None] ** 2) / 2.0)

    ring = np.abs(r - 5.0) < 0.5
    resid = (bump(7) + bump(2) - bump(-7) + np.where(ring, 0.3 * model[0], 0.0))[None]
    new, n = _clip_neighbours(resid, model, weights, 2.0, PsfFitConfig())
    clipped = new[0] == 0
    assert clipped[12, 19] and clipped[12, 17]  # the neighbour's peak, and its >5-sigma edge grown by a pixel
    assert n == clipped.sum() and 5 <= n <= 25
    assert not clipped[(r <= 4.0) | (ring & (g[None, :] < 3))].any()  # the core, the wing (away from the bump)
    assert not clipped[:, :12].any()  # the negative bump
    assert _clip_neighbours(resid, model, weights, 2.0, PsfFitConfig(clip_neighbour_sigma=50.0))[1] == 0
    with pytest.raises(ConfigError):
        PsfFitConfig(clip_min_excess_frac=-1.0).validate()


@pytest.fixture(scope="module")
def blended_scene():
    """Isolated elliptical stars at S/N ~ 150-430, eight of them with a faint companion 3 px away in x."""
    rng = np.random.default_rng(61)
    xs, ys = positions(rng, 110)
    flux = 10 ** rng.uniform(4.5, 5.3, xs.size)
    blended = np.zeros(xs.size, bool)
    blended[rng.choice(xs.size, 8, replace=False)] = True
    # 6 % of the star's flux 3 px away: δe1 ≈ +0.05 (> 5 sigma of a star's shape noise, ~1.5 / (S/N)) but
    # a reduced-chi² excess of only ~0.1-0.3 over the stamp, below min_reject_reduced_chi2 = 1.5.
    cx, cy, cf = xs[blended] + 3.0, ys[blended], 0.06 * flux[blended]
    exp, cat = measured_scene(np.r_[xs, cx], np.r_[ys, cy], np.r_[flux, cf], elliptical_kernel, seed=62)
    # Row of each true star (the companions merge into their star's detection).
    cx_cat, cy_cat = np.asarray(cat["base_SdssCentroid_x"]), np.asarray(cat["base_SdssCentroid_y"])
    d = np.hypot(cx_cat[:, None] - xs[None], cy_cat[:, None] - ys[None])
    row_blended = blended[np.argmin(d, axis=1)] & (np.min(d, axis=1) < 2.0)
    snr = np.asarray(cat["base_PsfFlux_instFlux"]) / np.asarray(cat["base_PsfFlux_instFluxErr"])
    cand = np.isfinite(snr) & (snr > 100) & ~np.asarray(cat["base_SdssCentroid_flag"], bool)
    return exp, cat, cand, row_blended


def _median_de(fit):
    de1, de2 = _held_out_de(fit, seed=7)
    return np.median(de1), np.median(de2)


def test_shape_rejection_drops_blended_stars_only(blended_scene):
    exp, cat, cand, row_blended = blended_scene
    fit_chi2 = fit_psf(exp, cat, cand, config=PsfFitConfig(shape_reject_sigma=math.inf, reserve_fraction=0.0))
    fit = fit_psf(exp, cat, cand, config=PsfFitConfig(reserve_fraction=0.0))
    in_fit = cand & row_blended
    assert in_fit.sum() >= 6
    # The stamp chi² alone keeps the blends (and rejects no clean star: it once padded the cut to 10 %).
    assert np.all(fit_chi2.used[in_fit]) and fit_chi2.n_rejected == 0
    # The shape test rejects them all; at 4 sigma on ~100 stars x 3 moments, at most ~1 clean star goes too.
    assert not np.any(fit.used[in_fit])
    assert in_fit.sum() <= fit.n_rejected <= in_fit.sum() + 2
    de1_chi2, _ = _median_de(fit_chi2)
    de1, de2 = _median_de(fit)
    # The blends pull the median e1 by +2.4e-3 (measured); without them the residual is at the noise
    # floor (~1.5 / sqrt(Σ S/N²) ≈ 5e-4 here; measured 2e-4 and 4e-4).
    assert de1_chi2 > 1e-3
    assert abs(de1) < 6e-4 and abs(de2) < 6e-4


def test_shape_rejection_config_is_validated():
    with pytest.raises(ConfigError, match="shape_reject_sigma"):
        PsfFitConfig(shape_reject_sigma=0.0).validate()
    with pytest.raises(ConfigError, match="min_shape_reject_stars"):
        PsfFitConfig(min_shape_reject_stars=2).validate()
    PsfFitConfig(shape_reject_sigma=math.inf).validate()  # inf: the test is off


def test_accelerated_adaptive_moments_reach_the_plain_fixed_point_in_fewer_steps():
    # 400 faint (S/N ~15) core+wing profiles at random sub-pixel centres: the plain iteration
    # converges linearly (factor ~0.5-0.6 per step) on such noisy, non-Gaussian stamps.
    rng = np.random.default_rng(3)
    n, size, sigma = 400, 25, 1.8
    g = np.arange(size) - size // 2
    gx, gy = np.meshgrid(g, g)
    dx, dy = rng.uniform(-0.5, 0.5, (2, n))
    r2 = (gx[None] - dx[:, None, None]) ** 2 + (gy[None] - dy[:, None, None]) ** 2
    prof = np.exp(-0.5 * r2 / sigma**2) + 0.1 * np.exp(-0.5 * r2 / (2.5 * sigma) ** 2)
    prof /= prof.sum(axis=(1, 2), keepdims=True)
    stamps = 15 * math.sqrt(4 * math.pi * sigma**2) * prof + rng.normal(0.0, 1.0, prof.shape)
    var = np.ones_like(stamps)

    def run(accelerate, max_iterations):
        return adaptive_moments(stamps, variance=var, sigma_guess_pix=2.0, max_iterations=max_iterations,
                                accelerate=accelerate)

    plain, fast = run(False, 200), run(True, 200)
    assert plain.converged.all() and fast.converged.all()
    assert fast.n_iterations < plain.n_iterations  # measured 58 against 71 for the slowest stamp
    # Both stop within the tolerance (1e-6 of the trace per step) of one fixed point; a linear
    # iteration with factor 0.6 stops up to tol / (1 - 0.6) away, so 2e-5 leaves a margin of 8.
    trace = plain.xx + plain.yy
    for k in ("xx", "yy", "xy"):
        np.testing.assert_array_less(np.abs(getattr(fast, k) - getattr(plain, k)) / trace, 2e-5)
    np.testing.assert_array_less(np.abs(fast.x - plain.x), 2e-5)
    np.testing.assert_array_less(np.abs(fast.y - plain.y), 2e-5)
    # Within 12 steps the extrapolation converges twice as many stamps (measured 198 against 89).
    assert run(True, 12).converged.sum() > 1.6 * run(False, 12).converged.sum()


def test_adaptive_moments_warm_start_reaches_the_same_fixed_point_and_a_collapsed_shape_fails():
    from singleframe.psf import MIN_ADAPTIVE_MOMENT_PIX2

    rng = np.random.default_rng(21)
    n = 60
    sig = rng.uniform(1.5, 3.0, n)
    q = rng.uniform(0.7, 1.0, n)
    x0, y0 = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    gy, gx = np.mgrid[-12:13, -12:13]
    dx, dy = gx[None] - x0[:, None, None], gy[None] - y0[:, None, None]
    img = 1e4 * np.exp(-0.5 * (dx**2 / sig[:, None, None] ** 2 + dy**2 / (q * sig)[:, None, None] ** 2))
    img = img + rng.normal(size=img.shape) * 3.0  # S/N ~ 100-300
    cold = adaptive_moments(img, sigma_guess_pix=2.0, variance=np.full(img.shape, 9.0))
    assert cold.converged.all()
    warm = adaptive_moments(img, sigma_guess_pix=2.0, variance=np.full(img.shape, 9.0), x_guess=cold.x,
                            y_guess=cold.y, shape_guess=(cold.xx, cold.yy, cold.xy))
    # Both stop within the tolerance (1e-6 of the trace per step) of one fixed point: with the
    # linear convergence rate of ~0.5 the remaining distance is at most about one more step.
    trace = cold.xx + cold.yy
    for a, b in ((warm.xx, cold.xx), (warm.yy, cold.yy), (warm.xy, cold.xy)):
        assert np.max(np.abs(a - b) / trace) < 5e-6
    assert np.max(np.abs(warm.x - cold.x)) < 5e-6 and np.max(np.abs(warm.y - cold.y)) < 5e-6
    np.testing.assert_allclose(warm.flux, cold.flux, rtol=1e-5)
    assert warm.converged.all() and warm.n_iterations <= 2 and warm.n_iterations < cold.n_iterations
    # Invalid guesses (NaN, not positive definite) start from sigma_guess_pix instead.
    bad = (np.full(n, np.nan), cold.yy, cold.xy)
    again = adaptive_moments(img, sigma_guess_pix=2.0, shape_guess=bad)
    np.testing.assert_allclose(again.xx, cold.xx, rtol=5e-6)

    # A one-pixel-wide ridge (a star on an interpolated column): the weight collapses onto it
    # along x, which is no measurement; the round star beside it converges normally.
    ridge = np.zeros((2, 25, 25))
    ridge[0, :, 12] = 1e4 * np.exp(-0.5 * (np.arange(25) - 12) ** 2 / 4.0)
    ridge[1] = 1e4 * np.exp(-0.5 * (gx**2 + gy**2) / 4.0)
    ridge += rng.normal(size=ridge.shape)  # S/N ~ 1e4: noise alone, no exact zero moment
    am = adaptive_moments(ridge, sigma_guess_pix=2.0)
    assert not am.converged[0] and am.converged[1]
    assert am.xx[1] == pytest.approx(4.0, rel=1e-3) and am.xx[1] > MIN_ADAPTIVE_MOMENT_PIX2
