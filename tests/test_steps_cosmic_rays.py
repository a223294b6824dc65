"""Cosmic rays (PSF-aware sharpness test) and interpolation over masked pixels."""

import math

import numpy as np
import pytest
from scenes import add_gaussian_star
from scipy import ndimage

from singleframe.errors import ConfigError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.masks import MaskPlane
from singleframe.psf import FWHM_PER_SIGMA, GaussianPsf
from singleframe.steps.cosmic_rays import CosmicRayConfig, find_cosmic_rays, repair_cosmic_rays
from singleframe.steps.interpolation import InterpolationConfig, interpolate_masked

SKY = 100.0  # counts per pixel (variance = sky + source, gain 1)


def _scene(fwhm, seed, ny=800, nx=1100, n_stars=200, n_cr=300):
    rng = np.random.default_rng(seed)
    sigma = fwhm / FWHM_PER_SIGMA
    clean = np.zeros((ny, nx))
    xs, ys = rng.uniform(40, nx - 40, n_stars), rng.uniform(40, ny - 40, n_stars)
    # Peak S/N from ~5 to ~2000 (bright, unsaturated): fluxes 10^2.7..10^6.3, scaled by area.
    flux = 10 ** rng.uniform(2.7, 6.3, n_stars) * (sigma / 1.06) ** 2
    for x, y, f in zip(xs, ys, flux, strict=True):
        add_gaussian_star(clean, x, y, f, sigma)
    var = clean + SKY
    img = clean + rng.normal(0, 1, clean.shape) * np.sqrt(var)
    cr = np.zeros((ny, nx))
    for _ in range(n_cr):
        # Tracks 1-12 px long at any angle, peak 8-300 sigma with a ragged profile.
        x0, y0, length, th = rng.uniform(0, nx), rng.uniform(0, ny), rng.uniform(0, 12), rng.uniform(0, np.pi)
        t = np.linspace(0, length, int(length * 3) + 2)
        px = np.round(x0 + t * np.cos(th)).astype(int)
        py = np.round(y0 + t * np.sin(th)).astype(int)
        ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        pix = np.unique(py[ok] * nx + px[ok])
        cr.flat[pix] += rng.uniform(8, 300) * np.sqrt(SKY) * rng.uniform(0.3, 1.0, pix.size)
    return (img + cr).astype(np.float32), var.astype(np.float32), cr, xs, ys, sigma


@pytest.mark.parametrize("fwhm", [2.5, 5.0])
def test_completeness_and_no_star_cores(fwhm):
    img, var, cr, xs, ys, sigma = _scene(fwhm, seed=int(fwhm * 10))
    res = find_cosmic_rays(img, var, np.zeros(img.shape, np.uint32), psf_sigma_pix=sigma)
    truth = cr > 5 * np.sqrt(var)
    # Brief: >= 95 % of injected CR pixels above 5 sigma are caught.
    assert (res.cr_mask & truth).sum() / truth.sum() >= 0.95
    # Star centres not touched by an injected CR must never be flagged (brief: <= 0.1 %; 0 of ~200 here).
    ix, iy = np.round(xs).astype(int), np.round(ys).astype(int)
    touched = np.zeros(xs.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            touched |= cr[iy + dy, ix + dx] > 0
    assert not np.any(res.cr_mask[iy, ix] & ~touched)
    # False pixels are the noise peaks grown next to real hits: a few per cent at most.
    assert (res.cr_mask & (cr == 0)).sum() < 0.05 * res.n_pixels
    assert 0.8 * 300 < res.n_cosmic_rays < 1.2 * 300  # tracks may cross or leave the image
    # Groups are counted from the pixel list, not by labelling the frame: same count.
    assert res.n_cosmic_rays == ndimage.label(res.cr_mask, np.ones((3, 3), bool))[1]
    assert res.n_pixels == res.cr_mask.sum()


def _grid_of_stars(rng, sigma, ny, nx, step, log_flux):
    """Stars on a jittered grid (isolated, so each centre is unambiguous); returns clean image, x, y."""
    clean = np.zeros((ny, nx))
    gy, gx = np.mgrid[15: ny - 15: step, 15: nx - 15: step]
    xs = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    ys = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    for x, y in zip(xs, ys, strict=True):
        add_gaussian_star(clean, x, y, 10 ** rng.uniform(*log_flux), sigma)
    return clean, xs, ys


def test_track_across_faint_star_is_followed():
    # A track crossing a faint star: off the star the strict test finds it; on the star the
    # neighbours hold starlight and only the milder test along CR-free directions follows it.
    rng = np.random.default_rng(11)
    sigma, ny, nx = 1.2, 300, 420
    clean, xs, ys = _grid_of_stars(rng, sigma, ny, nx, 30, (3.4, 3.7))  # peaks ~20-40 sigma of the sky
    bright, _, _ = _grid_of_stars(rng, sigma, ny, nx, 45, (4.5, 5.3))  # bright stars vouch for the PSF
    clean += np.roll(bright, (7, 11), axis=(0, 1))
    var = clean + SKY
    img = clean + rng.normal(0, 1, clean.shape) * np.sqrt(var)
    cr = np.zeros((ny, nx))
    for x, y in zip(xs, ys, strict=True):
        th, half = rng.uniform(0, np.pi), rng.uniform(4, 6)
        t = np.linspace(-half, half, 60)
        pix = np.unique(np.round(y + t * np.sin(th)).astype(int) * nx + np.round(x + t * np.cos(th)).astype(int))
        cr.flat[pix] += rng.uniform(15, 25) * np.sqrt(SKY) * rng.uniform(0.7, 1.0, pix.size)
    img, var = (img + cr).astype(np.float32), var.astype(np.float32)
    res = find_cosmic_rays(img, var, np.zeros(img.shape, np.uint32), psf_sigma_pix=sigma)
    truth = cr > 5 * np.sqrt(var)
    # Measured 0.77 (0.47 with growth into faint, source-free pixels only); 0.1 margin for noise.
    assert (res.cr_mask & truth).sum() / truth.sum() > 0.67
    assert (res.cr_mask & (cr == 0)).sum() < 0.05 * res.n_pixels


@pytest.mark.parametrize(("sigma_true", "sigma_used"), [(0.8, 1.2), (1.0, 1.6)])
def test_star_cores_next_to_hits_with_psf_width_overestimated(sigma_true, sigma_used):
    # Every star has a short hit starting next to its centre pixel. With the PSF width guessed
    # 50-60 % too large, the uncapped milder growth test would flag ~70 % of these centres
    # (measured); capped by the frame's own star peaks it flags none.
    rng = np.random.default_rng(5)
    ny, nx = 360, 500
    clean, xs, ys = _grid_of_stars(rng, sigma_true, ny, nx, 20, (3.5, 5.5))
    var = clean + SKY
    img = clean + rng.normal(0, 1, clean.shape) * np.sqrt(var)
    cx, cy = np.round(xs).astype(int), np.round(ys).astype(int)
    steps = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    for x, y in zip(cx, cy, strict=True):
        dy, dx = steps[rng.integers(8)]
        amp = rng.uniform(10, 100) * np.sqrt(var[y, x])
        for k in range(1, rng.integers(2, 4)):
            img[y + k * dy, x + k * dx] += amp * rng.uniform(0.5, 1.0)
    res = find_cosmic_rays(img.astype(np.float32), var.astype(np.float32), np.zeros(img.shape, np.uint32),
                           psf_sigma_pix=sigma_used)
    assert res.n_pixels > 0.5 * cx.size  # the hits themselves are found
    assert not np.any(res.cr_mask[cy, cx])


def test_saturated_pixels_and_wrong_psf_width_are_not_cosmic_rays():
    img = np.zeros((60, 70), np.float32)
    add_gaussian_star(img, 30.2, 25.7, 5e6, 1.0)
    mask = np.zeros(img.shape, np.uint32)
    mask[img > 6e5] = MaskPlane.SAT
    img[img > 6e5] = 6e5
    var = img + SKY
    # Even a PSF guess 60 % too wide (sigma 1.6 for 1.0) leaves this bright core alone.
    res = find_cosmic_rays(img, var, mask, psf_sigma_pix=1.6)
    assert res.n_pixels == 0


def test_repair_sets_cr_and_interpolates():
    img, var, cr, _, _, sigma = _scene(3.0, seed=7, ny=300, nx=420, n_stars=20, n_cr=40)
    vi = VisitInfo(5, 15.0, 60000.0, "i", "i", 0.0, 0.0, 0.0)
    exp = Exposure(img, np.zeros(img.shape, np.uint32), var, vi, DetectorInfo(1), origin=(11, 2000))
    rep = repair_cosmic_rays(exp, psf_sigma_pix=sigma, interpolate=True)
    crm = (rep.exposure.mask & MaskPlane.CR) != 0
    assert rep.n_pixels == crm.sum() > 0
    assert np.all((rep.exposure.mask[crm] & MaskPlane.INTRP) != 0)
    # Repaired pixels return to the clean scene within the noise (CRs were 8-300 sigma).
    clean = img - cr
    resid = (rep.exposure.image[crm] - clean[crm]) / np.sqrt(var[crm])
    assert np.median(np.abs(resid)) < 2.0
    assert rep.exposure.metadata["cosmic_ray_count"] == rep.n_cosmic_rays
    assert not np.any(exp.mask)  # input untouched
    # In place: the same pixels and bits, in the caller's arrays.
    own = Exposure(img.copy(), np.zeros(img.shape, np.uint32), var, vi, DetectorInfo(1), origin=(11, 2000))
    image_in, mask_in = own.image, own.mask
    rep2 = repair_cosmic_rays(own, psf_sigma_pix=sigma, interpolate=True, overwrite_mask=True, overwrite_image=True)
    assert rep2.exposure.image is image_in and rep2.exposure.mask is mask_in
    np.testing.assert_array_equal(rep2.exposure.image, rep.exposure.image)
    np.testing.assert_array_equal(rep2.exposure.mask, rep.exposure.mask)
    # Without interpolation only the mask is written; a read-only array is copied instead.
    frozen = np.zeros(img.shape, np.uint32)
    frozen.flags.writeable = False
    rep3 = repair_cosmic_rays(Exposure(img, frozen, var, vi, DetectorInfo(1)), psf_sigma_pix=sigma,
                              overwrite_mask=True, overwrite_image=True)
    assert rep3.exposure.mask is not frozen and not np.any(frozen) and rep3.exposure.image is img
    np.testing.assert_array_equal(rep3.exposure.mask & MaskPlane.CR, rep.exposure.mask & MaskPlane.CR)


def test_config_errors():
    with pytest.raises(ConfigError):
        CosmicRayConfig(sharpness_factor=0).validate()
    with pytest.raises(ConfigError, match="grow_sharpness_factor"):
        CosmicRayConfig(sharpness_factor=0.5, grow_sharpness_factor=0.4).validate()
    with pytest.raises(ConfigError, match="grow_star_margin"):
        CosmicRayConfig(grow_star_margin=0.0).validate()
    with pytest.raises(ConfigError):
        find_cosmic_rays(np.zeros((5, 5)), np.ones((5, 5)), np.zeros((5, 5), np.uint32), psf_sigma_pix=0.0)


@pytest.mark.parametrize("sigma", [1.06, 2.5, 4.0])
def test_interpolate_bad_column_through_star(sigma):
    ny, nx = 81, 103  # non-square
    img = np.full((ny, nx), 50.0, np.float32)
    k = GaussianPsf(sigma).image(0.0, 0.0, size=41) * 1e5
    img[20:61, 31:72] += k.astype(np.float32)
    mask = np.zeros((ny, nx), np.uint32)
    mask[:, 51] = MaskPlane.BAD
    res = interpolate_masked(img, mask, planes=MaskPlane.BAD, psf_sigma_pix=sigma)
    peak = img[40, 51] - 50.0
    # Brief: within a few % of truth at the star's peak (PSF-profile fit along the rows).
    assert abs(res.image[40, 51] - img[40, 51]) < 0.03 * peak
    assert np.max(np.abs(res.image[:, 51] - img[:, 51])) < 0.03 * peak
    assert res.n_pixels == ny
    assert np.all(res.mask[:, 51] & MaskPlane.INTRP)
    assert not np.any(mask & MaskPlane.INTRP)  # input untouched


def test_interpolate_overwrite_image_gives_the_same_pixels_in_place_and_leaves_the_mask():
    rng = np.random.default_rng(4)
    img = (100 + rng.normal(0, 1, (60, 70))).astype(np.float32)
    mask = np.zeros(img.shape, np.uint32)
    mask[:, 33] = MaskPlane.BAD
    copied = interpolate_masked(img, mask, planes=MaskPlane.BAD, psf_sigma_pix=1.5)
    before = img.copy()
    own = interpolate_masked(img, mask, planes=MaskPlane.BAD, psf_sigma_pix=1.5, overwrite_image=True)
    assert own.image is img  # no copy: the caller's frame holds the result
    np.testing.assert_array_equal(own.image, copied.image)
    assert not np.array_equal(img, before)
    assert not np.any(mask & MaskPlane.INTRP) and np.all(own.mask[:, 33] & MaskPlane.INTRP)
    # An image it cannot write into (float64, read-only or strided) is copied as without the option.
    wide = np.zeros((60, 140), np.float32)
    wide[:, ::2] = before
    for other in (before.astype(np.float64), wide[:, ::2], np.asfortranarray(before)):
        res = interpolate_masked(other, mask, planes=MaskPlane.BAD, psf_sigma_pix=1.5, overwrite_image=True)
        np.testing.assert_allclose(res.image, copied.image, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(other, before)
    frozen = before.copy()
    frozen.flags.writeable = False
    res = interpolate_masked(frozen, mask, planes=MaskPlane.BAD, psf_sigma_pix=1.5, overwrite_image=True)
    assert res.image is not frozen
    np.testing.assert_array_equal(frozen, before)


def test_interpolate_wide_gap_and_all_finite():
    rng = np.random.default_rng(2)
    img = (100 + rng.normal(0, 1, (120, 90))).astype(np.float32)
    mask = np.zeros(img.shape, np.uint32)
    mask[30:90, 20:70] = MaskPlane.NO_DATA  # 50 px wide: needs the widening passes
    img[30:90, 20:70] = np.nan
    res = interpolate_masked(img, mask, planes=MaskPlane.NO_DATA, psf_sigma_pix=1.5)
    assert np.all(np.isfinite(res.image))
    # A flat sky is filled with its level (mean of many good pixels, noise 1).
    assert np.abs(res.image[30:90, 20:70] - 100).max() < 0.5


def test_repair_keeps_earlier_cosmic_rays_and_interpolates_them():
    rng = np.random.default_rng(8)
    img = (rng.normal(0, 1, (70, 90)) * 10).astype(np.float32)
    mask = np.zeros(img.shape, np.uint32)
    mask[30, 40] = MaskPlane.CR  # found earlier (e.g. from the snap difference)
    img[30, 40] = 1e4
    vi = VisitInfo(5, 15.0, 60000.0, "i", "i", 0.0, 0.0, 0.0)
    exp = Exposure(img, mask, np.full(img.shape, 100.0, np.float32), vi, DetectorInfo(1), origin=(5, 7))
    rep = repair_cosmic_rays(exp, psf_sigma_pix=1.5, interpolate=True)
    assert rep.exposure.mask[30, 40] & MaskPlane.CR and rep.exposure.mask[30, 40] & MaskPlane.INTRP
    assert abs(rep.exposure.image[30, 40]) < 50  # the sky (noise 10), not the hit
    assert img[30, 40] == 1e4 and mask[30, 40] == MaskPlane.CR  # inputs untouched


def _reference_fill(img, bad, sigma_psf, config):
    """Normalised-convolution passes over the whole frame (what the box-local passes must equal)."""
    out, todo = img.copy(), bad.copy()
    sigma = max(sigma_psf, 1.0)
    for _ in range(config.max_iterations):
        if not todo.any():
            break
        sigma *= 2.0
        num = ndimage.gaussian_filter(np.where(todo, np.float32(0), out), sigma, mode="constant")
        den = ndimage.gaussian_filter((~todo).astype(np.float32), sigma, mode="constant")
        fill = todo & (den * 2 * math.pi * sigma**2 >= config.min_weight)
        out[fill] = num[fill] / den[fill]
        todo &= ~fill
    return out


def test_wide_holes_filled_as_full_frame_passes():
    # Holes far wider than the profile window (no fit possible): only the widening passes fill
    # them, inside padded boxes. One hole touches the frame edge, two sit close together.
    rng = np.random.default_rng(4)
    ny, nx = 230, 310
    img = (50 + rng.normal(0, 3, (ny, nx))).astype(np.float32)
    add_gaussian_star(img, 120.3, 60.7, 4e4, 2.0)
    mask = np.zeros((ny, nx), np.uint32)
    for y0, y1, x0, x1 in ((50, 75, 100, 140), (0, 30, 250, 310), (150, 190, 20, 45), (150, 190, 60, 80)):
        mask[y0:y1, x0:x1] = MaskPlane.NO_DATA
    sigma = 1.3
    config = InterpolationConfig()
    res = interpolate_masked(img, mask, planes=MaskPlane.NO_DATA, psf_sigma_pix=sigma, config=config)
    ref = _reference_fill(img, mask != 0, sigma, config)
    # Same filters on the same pixels; only float32 rounding of the box-local sums differs.
    np.testing.assert_allclose(res.image, ref, rtol=1e-5, atol=1e-4)
    assert res.n_pixels == np.count_nonzero(mask)


def test_interpolate_fortran_order_and_non_finite_pixels():
    rng = np.random.default_rng(6)
    img = np.asfortranarray((20 + rng.normal(0, 1, (40, 57))).astype(np.float32))
    img[10, 12] = np.nan  # non-finite pixels are filled whatever their mask bits
    img[25, 30] = np.inf
    mask = np.asfortranarray(np.zeros(img.shape, np.uint32))
    mask[:, 44] = MaskPlane.BAD
    res = interpolate_masked(img, mask, planes=MaskPlane.BAD, psf_sigma_pix=1.2)
    assert np.all(np.isfinite(res.image))
    assert res.n_pixels == 40 + 2
    # Flat sky with unit noise: filled values stay within a few sigma of the level.
    assert np.abs(res.image[[10, 25], [12, 30]] - 20).max() < 3
    assert np.all(res.mask[[10, 25], [12, 30]] & MaskPlane.INTRP)
    assert np.isnan(img[10, 12]) and not np.any(mask & MaskPlane.INTRP)  # inputs untouched
