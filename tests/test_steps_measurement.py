"""Tests of steps/measurement.py on synthetic scenes with known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table
from scipy import ndimage

from singleframe.errors import ConfigError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.fields import ChebyshevField
from singleframe.footprints import Detections
from singleframe.masks import MaskPlane
from singleframe.psf import GaussianPsf, PsfModel
from singleframe.steps.measurement import (
    MeasurementConfig,
    apply_aperture_corrections,
    measure_aperture_fluxes,
    measure_at_positions,
    measure_sources,
)

SHAPE = (300, 420)  # non-square
ORIGIN = (1500, 700)  # non-zero parent origin
SKY_VAR = 100.0
SIGMA = 2.0


def render(xs, ys, fluxes, psfs, *, shape=SHAPE, origin=ORIGIN, seed=0, noise=True, size=41):
    """Image (counts) with one PSF (or one model per source) per star, Poisson-like Gaussian noise."""
    h = size // 2
    img = np.zeros((shape[0] + 2 * h, shape[1] + 2 * h))  # padded so stamps may leave the image
    for i, (x, y, f) in enumerate(zip(xs, ys, fluxes, strict=True)):
        psf: PsfModel = psfs[i] if isinstance(psfs, list) else psfs
        k = psf.image(x, y, size=size, centered=False)
        cx, cy = int(np.round(x - origin[0])) + h, int(np.round(y - origin[1])) + h
        img[cy - h:cy + h + 1, cx - h:cx + h + 1] += f * k
    img = img[h:h + shape[0], h:h + shape[1]]
    var = SKY_VAR + img
    if noise:
        img = img + np.random.default_rng(seed).normal(size=shape) * np.sqrt(var)
    return img, var


def detect(img, var, origin=ORIGIN, nsigma=6.0):
    """Threshold the smoothed image and label it (a stand-in for the detection step)."""
    sm = ndimage.gaussian_filter(img, 1.5)
    # A sigma=1.5 Gaussian filter scales white noise by 1/(2 sqrt(pi) 1.5) ≈ 0.19.
    lab, n = ndimage.label(sm > nsigma * 0.19 * math.sqrt(SKY_VAR))
    idx = np.arange(1, n + 1)
    peaks = ndimage.maximum_position(img, lab, idx)
    py = np.array([p[0] for p in peaks], int)
    px = np.array([p[1] for p in peaks], int)
    src = Table({"label": idx, "parent_label": np.zeros(n, int), "x_peak": px + origin[0],
                 "y_peak": py + origin[1], "peak_value": img[py, px], "peak_snr": img[py, px] / np.sqrt(var[py, px]),
                 "npix": np.bincount(lab.ravel(), minlength=n + 1)[1:], "deblend_nChild": np.zeros(n, int),
                 "deblend_nPeaks": np.ones(n, int)})
    return Detections(lab.astype(np.int32), src, origin)


def make_exposure(img, var, psf, mask=None, origin=ORIGIN):
    vi = VisitInfo(1, 30.0, 60000.0, "r", "r", 10.0, 10.0, 0.0)
    m = np.zeros(img.shape, np.uint32) if mask is None else mask
    return Exposure(img.astype(np.float32), m, var.astype(np.float32), vi, DetectorInfo(3), psf=psf, origin=origin)


def grid_stars(rng, n_side=(4, 6), margin=40, shape=SHAPE, origin=ORIGIN):
    gy, gx = np.meshgrid(np.linspace(margin, shape[0] - margin, n_side[0]),
                         np.linspace(margin, shape[1] - margin, n_side[1]), indexing="ij")
    xs = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size) + origin[0]
    ys = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size) + origin[1]
    return xs, ys


def match(cat, xs, ys):
    """Row of the catalogue nearest to each true position."""
    d = np.hypot(np.asarray(cat["base_SdssCentroid_x"])[None, :] - xs[:, None],
                 np.asarray(cat["base_SdssCentroid_y"])[None, :] - ys[:, None])
    return np.argmin(d, axis=1)


def snr200_flux(psf, sky_var=SKY_VAR):
    """Flux whose optimal PSF-fit S/N is 200 with sky + source noise: 1/S/N² = 1/(F² sum P²/(sky + F P))."""
    k = psf.image(0.0, 0.0, size=41)
    f = 200.0 * math.sqrt(sky_var * psf.area(0, 0))
    for _ in range(50):
        f = 200.0 / math.sqrt(np.sum(k * k / (sky_var + f * k)))
    return f


def assert_same_catalogue(got, want):
    """Same columns, rows and flags; floating values within 1e-5 relative (NaN where ``want`` has NaN)."""
    assert got.colnames == want.colnames and len(got) == len(want)
    for name in want.colnames:
        a, b = np.asarray(want[name]), np.asarray(got[name])
        if a.dtype == bool or a.dtype.kind in "iu":
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)


@pytest.fixture(scope="module")
def star_scene():
    rng = np.random.default_rng(11)
    psf = GaussianPsf(SIGMA)
    xs, ys = grid_stars(rng)
    flux = np.full(xs.size, snr200_flux(psf))
    img, var = render(xs, ys, flux, psf, seed=12)
    det = detect(img, var)
    exp = make_exposure(img, var, psf)
    res = measure_sources(exp, det)
    return res, xs, ys, flux, exp, det


def test_columns_units_and_counts(star_scene):
    res, xs, *_ = star_scene
    cat = res.catalog
    assert res.n_sources == len(cat) == xs.size
    for name in ("id", "parent", "deblend_nChild", "deblend_nPeaks", "base_SdssCentroid_xErr",
                 "ext_shapeHSM_HsmSourceMoments_xy", "ext_shapeHSM_HsmPsfMoments_xx", "base_PsfFlux_area",
                 "base_PsfFlux_chi2", "base_CircularApertureFlux_3_0_instFlux", "base_CircularApertureFlux_25_0_flag",
                 "base_GaussianFlux_instFluxErr", "base_CompensatedTophatFlux_12_instFlux",
                 "base_NormalizedCompensatedTophatFlux_flag", "base_LocalBackground_instFluxErr",
                 "base_ClassificationSizeExtendedness_value", "base_PixelFlags_flag_suspectCenter", "psf_max_value"):
        assert name in cat.colnames, name
    assert cat["base_SdssCentroid_x"].unit == "pix"
    assert cat["ext_shapeHSM_HsmSourceMoments_xx"].unit == "pix2"
    assert cat["base_PsfFlux_instFlux"].unit == "ct"
    assert cat["base_PixelFlags_flag_edge"].dtype == bool
    assert res.n_flagged_centroid == 0


def test_centroids_moments_and_psf_flux_at_snr_200(star_scene):
    res, xs, ys, flux, *_ = star_scene
    cat = res.catalog[match(res.catalog, xs, ys)]
    dx = np.asarray(cat["base_SdssCentroid_x"]) - xs
    dy = np.asarray(cat["base_SdssCentroid_y"]) - ys
    # Expected noise ~0.014 px per axis at S/N 200 for sigma = 2 px; 0.02 px rms is the brief's bar.
    assert np.sqrt(np.mean(dx**2 + dy**2) / 2) < 0.02
    # The reported errors describe the scatter (pull rms within 40 %: 24 stars, two axes).
    pulls = np.concatenate([dx / cat["base_SdssCentroid_xErr"], dy / cat["base_SdssCentroid_yErr"]])
    assert 0.6 < np.std(pulls) < 1.4
    # Adaptive moments of a pixelised Gaussian are sigma² + 1/12 (pixel response); 1 % bar.
    t_true = 2 * (SIGMA**2 + 1 / 12)
    t = np.asarray(cat["ext_shapeHSM_HsmSourceMoments_xx"] + cat["ext_shapeHSM_HsmSourceMoments_yy"])
    assert np.median(t) == pytest.approx(t_true, rel=0.01)
    # PSF flux with the true PSF: 0.5 % noise per star at S/N 200 -> median within 1 %, all within 4 sigma.
    ratio = np.asarray(cat["base_PsfFlux_instFlux"]) / flux
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(ratio - 1) < 4 * 0.005 * 1.1)
    snr = np.asarray(cat["base_PsfFlux_instFlux"] / cat["base_PsfFlux_instFluxErr"])
    assert np.median(snr) == pytest.approx(200, rel=0.05)  # sky-dominated, so ~ the design S/N
    # The Gaussian flux of a Gaussian star is its flux (noise ~0.5 %).
    assert np.median(np.asarray(cat["base_GaussianFlux_instFlux"]) / flux) == pytest.approx(1.0, abs=0.01)
    # Extendedness of stars is ~0 (size noise at S/N 200 is < 2 %).
    assert np.max(cat["base_ClassificationSizeExtendedness_value"]) < 0.05
    # Local background of a background-subtracted image is ~0 (± 0.5 count at 10-count noise).
    assert abs(np.median(cat["base_LocalBackground_instFlux"])) < 0.5


def test_aperture_fluxes_match_enclosed_flux():
    psf = GaussianPsf(SIGMA)
    rng = np.random.default_rng(3)
    xs, ys = grid_stars(rng, n_side=(2, 3), margin=90)
    flux = np.full(xs.size, 1e5)
    img, var = render(xs, ys, flux, psf, noise=False)
    cat = measure_sources(make_exposure(img, var, psf), detect(img, var)).catalog
    cat = cat[match(cat, xs, ys)]
    # Pixel integration of the star and the uniform-within-pixel overlap of the aperture each
    # convolve with a unit box (variance 1/12 per axis), so the enclosed flux is that of a
    # Gaussian with sigma² + 1/6.
    s2 = SIGMA**2 + 1 / 6
    for r in (3, 6, 9, 12, 17, 25):
        expected = 1 - math.exp(-r * r / (2 * s2))
        got = np.asarray(cat[f"base_CircularApertureFlux_{r}_0_instFlux"]) / flux
        # Noise-free star, exact overlap: 0.5 % covers the sub-pixel phase dependence at r = 3 px (0.3 %).
        np.testing.assert_allclose(got, expected, rtol=5e-3, err_msg=f"radius {r}")
        assert not np.any(cat[f"base_CircularApertureFlux_{r}_0_flag"])
    # The compensated top-hat keeps essentially all the flux of a compact star (annulus ~ 0).
    np.testing.assert_allclose(np.asarray(cat["base_CompensatedTophatFlux_12_instFlux"]) / flux, 1.0, rtol=2e-3)


def test_extended_source_and_pixel_flags():
    psf = GaussianPsf(SIGMA)
    galaxy = GaussianPsf(5.0, e1=0.2)
    xs = np.array([100.3, 200.6, 300.2, 360.0, 5.2]) + ORIGIN[0]
    ys = np.array([100.1, 150.4, 80.7, 220.5, 150.0]) + ORIGIN[1]
    models: list[PsfModel] = [galaxy, psf, psf, psf, psf]
    flux = np.array([2e5, 3e4, 3e4, 3e4, 3e4])
    img, var = render(xs, ys, flux, models, seed=4, size=61)
    mask = np.zeros(SHAPE, np.uint32)
    sx, sy = int(round(xs[2] - ORIGIN[0])), int(round(ys[2] - ORIGIN[1]))
    mask[sy, sx] |= MaskPlane.SAT
    cx, cy = int(round(xs[3] - ORIGIN[0])), int(round(ys[3] - ORIGIN[1]))
    mask[cy + 1, cx] |= MaskPlane.CR
    det = detect(img, var)
    cat = measure_sources(make_exposure(img, var, psf, mask), det).catalog
    cat = cat[match(cat, xs, ys)]
    ext = np.asarray(cat["base_ClassificationSizeExtendedness_value"])
    assert ext[0] > 0.99 and ext[1] < 0.1  # sigma 5 vs 2 px: chi ≈ 14
    assert cat["base_PixelFlags_flag_saturatedCenter"][2] and cat["base_PixelFlags_flag_saturated"][2]
    assert not cat["base_PixelFlags_flag_saturatedCenter"][1]
    assert cat["base_PixelFlags_flag_crCenter"][3] and cat["base_PixelFlags_flag_cr"][3]
    assert not cat["base_PixelFlags_flag_crCenter"][2]
    # The star 5 px from the left edge: apertures off the image and edge flags.
    assert cat["base_PixelFlags_flag_edge"][4] and cat["base_CircularApertureFlux_12_0_flag"][4]
    assert not cat["base_PixelFlags_flag_edge"][1]
    # Saturated pixels are left out of the PSF fit: the flux still comes from the wings (3 %: S/N ~70).
    assert float(cat["base_PsfFlux_instFlux"][2]) == pytest.approx(3e4, rel=0.03)


def test_neighbour_pixels_are_excluded():
    psf = GaussianPsf(SIGMA)
    xs = np.array([200.2, 212.7]) + ORIGIN[0]  # 12.5 px apart, one 10x brighter
    ys = np.array([150.4, 150.1]) + ORIGIN[1]
    flux = np.array([2e4, 2e5])
    img, var = render(xs, ys, flux, psf, noise=False)
    det_img = np.zeros(SHAPE, np.int32)
    # Split the blend down the middle (what a deblender gives each child).
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    blob = img > 5.0
    mid = (xs.mean() - ORIGIN[0])
    det_img[blob & (xx < mid)] = 1
    det_img[blob & (xx >= mid)] = 2
    src = Table({"label": [1, 2], "parent_label": [0, 0], "x_peak": np.round(xs).astype(int),
                 "y_peak": np.round(ys).astype(int), "peak_value": [1.0, 1.0], "peak_snr": [1.0, 1.0],
                 "npix": [1, 1], "deblend_nChild": [0, 0], "deblend_nPeaks": [1, 1]})
    cat = measure_sources(make_exposure(img, var, psf), Detections(det_img, src, ORIGIN)).catalog
    # The faint star's PSF flux is within 5 % despite a 10x brighter neighbour: the neighbour's
    # pixels beyond the split are excluded (its wing inside the faint star's footprint remains).
    assert float(cat["base_PsfFlux_instFlux"][0]) == pytest.approx(2e4, rel=0.05)
    off = measure_sources(make_exposure(img, var, psf), Detections(det_img, src, ORIGIN),
                          config=MeasurementConfig(replace_neighbours=False)).catalog
    assert abs(float(off["base_PsfFlux_instFlux"][0]) - 2e4) > abs(float(cat["base_PsfFlux_instFlux"][0]) - 2e4)


def test_aperture_corrections_applied_and_empty_input(star_scene):
    res, *_, exp, det = star_scene
    bbox = tuple(float(v) for v in exp.bbox)
    field = ChebyshevField.constant(1.1, bbox, error=0.01)
    out = apply_aperture_corrections(res.catalog, {"base_PsfFlux": field})
    np.testing.assert_allclose(out["base_PsfFlux_instFlux"], 1.1 * res.catalog["base_PsfFlux_instFlux"], rtol=1e-12)
    assert np.all(out["base_PsfFlux_apCorr"] == 1.1) and not np.any(out["base_PsfFlux_flag_apCorr"])
    assert "base_PsfFlux_apCorr" not in res.catalog.colnames  # input not mutated
    via = measure_sources(exp, det, ap_corr={"base_GaussianFlux": field}).catalog
    np.testing.assert_allclose(via["base_GaussianFlux_instFlux"], 1.1 * res.catalog["base_GaussianFlux_instFlux"],
                               rtol=1e-12)
    empty = Detections(np.zeros(SHAPE, np.int32), det.sources[:0], ORIGIN)
    e = measure_sources(exp, empty)
    assert e.n_sources == 0 and len(e.catalog) == 0 and "base_PsfFlux_instFlux" in e.catalog.colnames
    sky = measure_at_positions(exp, [ORIGIN[0] + 10.0], [ORIGIN[1] + 10.0])
    assert len(sky) == 1 and sky.colnames == res.catalog.colnames


def test_config_validation():
    with pytest.raises(ConfigError, match="local_background_outer_pix"):
        MeasurementConfig(stamp_size_pix=21, moments_stamp_size_pix=21).validate()
    with pytest.raises(ConfigError, match="unknown mask planes"):
        MeasurementConfig(bad_mask_planes=("NOPE",)).validate()


def test_moment_stamps_grow_with_the_psf():
    # 2.5" seeing at 0.2"/px: sigma 5.3 px. The moments' stamp is 4.5 sigma wide (49 px, wider than
    # the 31-px measurement stamps), so the adaptive moments of a noiseless Gaussian star are
    # sigma² + 1/12 to < 1e-5 (the pixel response); on the former fixed 25-px stamp the weighted
    # profile was cut at 2.3 sigma and the trace came out 2 % small, which this test would catch.
    sigma = 5.3
    psf = GaussianPsf(sigma)
    xs = np.array([ORIGIN[0] + 100.3, ORIGIN[0] + 300.6])
    ys = np.array([ORIGIN[1] + 150.2, ORIGIN[1] + 140.7])
    img, var = render(xs, ys, np.full(2, 1e6), psf, noise=False, size=81)
    det = detect(img, var)
    exp = make_exposure(img, var, psf)
    t_true = 2 * (sigma**2 + 1 / 12)
    for config, rel in ((MeasurementConfig(), 1e-5), (MeasurementConfig(moments_stamp_size_pix=25), 0.01)):
        cat = measure_sources(exp, det, config=config, aperture_fluxes=False).catalog
        cat = cat[match(cat, xs, ys)]
        t = np.asarray(cat["ext_shapeHSM_HsmSourceMoments_xx"] + cat["ext_shapeHSM_HsmSourceMoments_yy"])
        err = np.abs(t / t_true - 1)
        assert np.all(err < rel) if rel < 1e-3 else np.all(err > rel), (config.moments_stamp_size_pix, err)
    with pytest.raises(ConfigError, match="moments_stamp_psf_sigmas"):
        MeasurementConfig(moments_stamp_psf_sigmas=2.0).validate()


def test_faint_sources_with_failed_adaptive_moments_keep_centroid_and_psf_flux():
    # Point sources at PSF S/N 8 on a grid: adaptive moments fail on ~9 % of them (noise drives the
    # size iteration away; ~30 % before the iteration was accelerated). The fixed-weight fallback
    # keeps their centroid and PSF flux; the shape flag stays set and the size columns hold the
    # fallback estimate (PSF-sized on average).
    rng = np.random.default_rng(5)
    gy, gx = np.mgrid[30:SHAPE[0] - 30:40, 30:SHAPE[1] - 30:40]
    xs = gx.ravel() + ORIGIN[0] + rng.uniform(-0.5, 0.5, gx.size)
    ys = gy.ravel() + ORIGIN[1] + rng.uniform(-0.5, 0.5, gx.size)
    n = xs.size
    flux = np.full(n, 8 * math.sqrt(4 * math.pi * SIGMA**2 * SKY_VAR))  # S/N 8 for a Gaussian PSF
    psf = GaussianPsf(SIGMA)
    ix, iy = np.round(xs - ORIGIN[0]).astype(int), np.round(ys - ORIGIN[1]).astype(int)
    lab = np.zeros(SHAPE, np.int32)
    for k in range(n):
        lab[iy[k] - 4:iy[k] + 5, ix[k] - 4:ix[k] + 5] = k + 1
    src = Table({"label": np.arange(1, n + 1), "parent_label": np.zeros(n, int),
                 "x_peak": (ix + ORIGIN[0]).astype(float), "y_peak": (iy + ORIGIN[1]).astype(float),
                 "peak_value": np.zeros(n), "peak_snr": np.full(n, 8.0), "npix": np.full(n, 81),
                 "deblend_nChild": np.zeros(n, int), "deblend_nPeaks": np.ones(n, int)})
    failed, offsets, excess = [], [], []
    for seed in range(3):
        img, var = render(xs, ys, flux, psf, seed=seed)
        cat = measure_sources(make_exposure(img, var, psf), Detections(lab, src, ORIGIN)).catalog
        fb = np.asarray(cat["ext_shapeHSM_HsmSourceMoments_flag"])
        assert not np.any(cat["base_PsfFlux_flag"]) and not np.any(cat["base_SdssCentroid_flag"])
        failed.append(fb.mean())
        offsets += list(np.hypot(cat["base_SdssCentroid_x"] - xs, cat["base_SdssCentroid_y"] - ys)[fb])
        t = np.asarray(cat["ext_shapeHSM_HsmSourceMoments_xx"]) + np.asarray(cat["ext_shapeHSM_HsmSourceMoments_yy"])
        excess += list((t / (2 * SIGMA**2) - 1)[fb])
    assert np.mean(failed) > 0.04  # the fallback is exercised (14 of the 162 sources over the three draws)
    # Centroid noise at S/N 8: ~sqrt(2) sigma / (S/N) x 2 ~ 0.5 px per axis; 2 px would be a failure.
    assert np.sqrt(np.mean(np.square(offsets))) < 1.0 and max(offsets) < 2.0
    # Fallback sizes scatter by ~2.5 / (S/N) ~ 0.3 around the PSF's (median within ~3 sigma / sqrt(60)).
    assert abs(np.median(excess)) < 0.15 and np.all(np.isfinite(excess))


@pytest.mark.parametrize("max_half", [127, 20])
def test_pixel_flags_of_footprints_larger_than_the_stamp(monkeypatch, max_half):
    # A bright galaxy's footprint reaches far beyond the 31-px stamp: flags set at its far end must
    # still be found, from grown stamps (default) or from the whole-image pass (small limit).
    import singleframe.steps.measurement as measurement

    monkeypatch.setattr(measurement, "_MAX_FOOTPRINT_HALF_PIX", max_half)
    psf = GaussianPsf(SIGMA)
    galaxy = GaussianPsf(12.0, e1=0.5)
    xs = np.array([150.2, 330.4]) + ORIGIN[0]
    ys = np.array([150.6, 150.1]) + ORIGIN[1]
    img, var = render(xs, ys, np.array([4e6, 3e4]), [galaxy, psf], seed=5, size=121)
    det = detect(img, var)
    big = det.labels[150, 150]
    far = np.argwhere(det.labels == big)
    # The footprint pixel furthest from the peak column lies outside the 31-px stamp.
    fy, fx = far[np.argmax(np.abs(far[:, 1] - 150))]
    assert abs(fx - 150) > 15
    mask = np.zeros(SHAPE, np.uint32)
    mask[fy, fx] |= MaskPlane.SUSPECT
    cat = measure_sources(make_exposure(img, var, psf, mask), det).catalog
    cat = cat[match(cat, xs, ys)]
    assert cat["base_PixelFlags_flag_suspect"][0] and not cat["base_PixelFlags_flag_suspect"][1]
    assert not cat["base_PixelFlags_flag_suspectCenter"][0]


def test_batches_give_the_same_catalogue(star_scene):
    # Measuring in batches (bounded memory on crowded frames) changes nothing but float32
    # rounding in the stacked fits: same rows, same flags, values within 1e-5 relative.
    res, _, _, _, exp, det = star_scene
    batched = measure_sources(exp, det, config=MeasurementConfig(max_sources_per_batch=5)).catalog
    assert_same_catalogue(batched, res.catalog)
    with pytest.raises(ConfigError, match="max_sources_per_batch"):
        MeasurementConfig(max_sources_per_batch=0).validate()


def test_aperture_fluxes_measured_later_on_a_subset_equal_a_full_measurement(star_scene):
    # The star pass measures apertures on the selected rows only: same columns, same order,
    # and the same values (sep measures each source independently), bit for bit.
    res, _, _, _, exp, det = star_scene
    light = measure_sources(exp, det, aperture_fluxes=False).catalog
    assert not any(c.startswith(("base_CircularApertureFlux", "base_CompensatedTophatFlux")) for c in light.colnames)
    keep = np.arange(len(light)) % 3 != 1
    later = measure_aperture_fluxes(exp, light[keep], det)
    whole = res.catalog[keep]
    assert later.colnames == whole.colnames
    for name in whole.colnames:
        np.testing.assert_array_equal(np.asarray(later[name]), np.asarray(whole[name]), err_msg=name)
        assert getattr(later[name], "unit", None) == getattr(whole[name], "unit", None), name
    with pytest.raises(ConfigError, match="already has aperture columns"):
        measure_aperture_fluxes(exp, res.catalog, det)
    with pytest.raises(ConfigError, match="lacks"):
        measure_aperture_fluxes(exp, light[["id"]], det)


def test_a_warm_started_measurement_equals_a_cold_one(star_scene):
    # The final PSF-star measurement starts from the pass's converged moments: the same fixed
    # point within the adaptive tolerance (1e-6 of the size per step), so every value agrees to
    # 1e-5 relative (the fluxes follow the shape) and every flag is the same.
    res, _, _, _, exp, det = star_scene
    whole = res.catalog
    start = measure_sources(exp, det, aperture_fluxes=False).catalog
    warm = measure_sources(exp, det, start=start).catalog
    assert_same_catalogue(warm, whole)
    with pytest.raises(ConfigError, match="not a measurement of these"):
        measure_sources(exp, det, start=start[1:])
    with pytest.raises(ConfigError, match="lacks"):
        measure_sources(exp, det, start=start[["id"]])


def test_gaussian_flux_is_nan_where_the_shape_failed():
    # A star on a one-pixel ridge (an interpolated column carrying a bright line): its adaptive
    # weight collapses onto the column. Shape and Gaussian flux are flagged and NaN, never a number.
    psf = GaussianPsf(SIGMA)
    img, var = render(np.array([1600.2, 1750.0]), np.array([800.4, 850.0]), np.array([2e5, 2e5]), psf, seed=3)
    img[:, 1600 - ORIGIN[0]] += 5e4 * np.exp(-0.5 * ((np.arange(SHAPE[0]) + ORIGIN[1] - 800.0) / 1.0) ** 2)
    exp = make_exposure(img, var, psf)
    cat = measure_sources(exp, detect(img, var)).catalog
    row = match(cat, np.array([1600.2, 1750.0]), np.array([800.4, 850.0]))
    shape_flag = np.asarray(cat["ext_shapeHSM_HsmSourceMoments_flag"])[row]
    gflux = np.asarray(cat["base_GaussianFlux_instFlux"])[row]
    assert shape_flag.tolist() == [True, False]
    assert np.isnan(gflux[0]) and bool(cat["base_GaussianFlux_flag"][row[0]])
    assert gflux[1] == pytest.approx(2e5, rel=0.05)
