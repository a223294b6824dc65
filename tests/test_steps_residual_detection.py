"""Residual detection: faint stars merged into bright neighbours' footprints are found and measured."""

from __future__ import annotations

import numpy as np
import pytest
from scenes import add_gaussian_star
from scipy.spatial import cKDTree

from singleframe.errors import ConfigError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.psf import FWHM_PER_SIGMA, GaussianPsf
from singleframe.steps.detection import DetectionConfig, detect_sources
from singleframe.steps.measurement import MeasurementConfig, measure_sources
from singleframe.steps.residual_detection import ResidualDetectionConfig, detect_residual_sources

SHAPE = (400, 560)  # non-square
ORIGIN = (1500, 700)  # non-zero parent origin
SKY_VAR = 100.0
SIGMA = 1.8  # FWHM 4.2 px, the benchmark frames' 0.8" at 0.2"/px
BRIGHT_FLUX = 160_000.0  # PSF S/N ~340: a neighbour the residual pass searches around (S/N >= 200)
FAINT_FLUX = 1_600.0  # S/N ~25, 100x fainter


def _exposure(img, var):
    vi = VisitInfo(1, 30.0, 60000.0, "r", "r", 10.0, 10.0, 0.0)
    return Exposure(img.astype(np.float32), np.zeros(img.shape, np.uint32), var.astype(np.float32), vi,
                    DetectorInfo(3), psf=GaussianPsf(SIGMA), origin=ORIGIN)


def _scene(seed, *, companions):
    """Bright stars on a grid, each (optionally) with a 100x fainter companion 1.9-2.5 FWHM away.

    Returns the image with and without the companions (same noise), the bright and the
    companion positions (array coordinates).
    """
    rng = np.random.default_rng(seed)
    gy, gx = np.meshgrid(np.linspace(60, SHAPE[0] - 60, 3), np.linspace(60, SHAPE[1] - 60, 5), indexing="ij")
    bx = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    by = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size)
    dist = rng.uniform(1.9, 2.5, bx.size) * SIGMA * FWHM_PER_SIGMA
    ang = rng.uniform(0, 2 * np.pi, bx.size)
    cx, cy = bx + dist * np.cos(ang), by + dist * np.sin(ang)
    bright = np.zeros(SHAPE)
    for x, y in zip(bx, by, strict=True):
        add_gaussian_star(bright, x, y, BRIGHT_FLUX, SIGMA)
    faint = np.zeros(SHAPE)
    if companions:
        for x, y in zip(cx, cy, strict=True):
            add_gaussian_star(faint, x, y, FAINT_FLUX, SIGMA)
    noise = rng.normal(size=SHAPE)
    var_bright = SKY_VAR + bright
    img_bright = bright + noise * np.sqrt(var_bright)
    var_all = SKY_VAR + bright + faint
    img_all = bright + faint + noise * np.sqrt(var_all)
    return (img_bright, var_bright), (img_all, var_all), (bx, by), (cx, cy)


def _first_pass(img, var, footprint_img):
    """Detections on ``footprint_img`` (where the companions are absent, as if merged by the
    deblender) and the measurement of those detections on ``img``."""
    det = detect_sources(footprint_img[0], footprint_img[1], np.zeros(SHAPE, np.uint32), psf_sigma_pix=SIGMA,
                         config=DetectionConfig(threshold_snr=5.0, peak_threshold_snr=7.0), origin=ORIGIN)
    exp = _exposure(img, var).replace(mask=det.mask)
    cat = measure_sources(exp, det.detections, config=MeasurementConfig()).catalog
    return exp, det.detections, cat


def test_finds_and_measures_companions_merged_into_bright_footprints():
    bright_only, with_companions, (bx, by), (cx, cy) = _scene(3, companions=True)
    exp, dets, cat = _first_pass(*with_companions, bright_only)
    assert len(cat) == bx.size  # the companions are hidden in the bright stars' footprints
    res = detect_residual_sources(exp, cat, dets)
    assert res.n_modelled == bx.size and res.n_searched == bx.size
    x = np.asarray(res.catalog["base_SdssCentroid_x"]) - ORIGIN[0]
    y = np.asarray(res.catalog["base_SdssCentroid_y"]) - ORIGIN[1]
    d, idx = cKDTree(np.c_[cx, cy]).query(np.c_[x, y])
    # Every companion is found once. 0.5 px: the centroid error of a S/N 25 star is ~0.1 px and the
    # subtracted neighbour (exact Gaussian model) leaves only its noise.
    assert len(res.catalog) == cx.size
    assert np.all(d < 0.5) and np.unique(idx).size == cx.size
    # PSF fluxes on the residual: 15 % is 3.5 sigma at S/N 25 (plus the neighbour's flux error
    # spread over the companion's pixels, ~1 %).
    flux = np.asarray(res.catalog["base_PsfFlux_instFlux"], float)
    np.testing.assert_allclose(flux, FAINT_FLUX, rtol=0.15)
    assert not np.any(res.catalog["base_SdssCentroid_flag"])
    # New ids continue after the first pass; parents are the bright stars' labels.
    assert np.all(np.asarray(res.catalog["id"]) > len(cat))
    assert set(np.asarray(res.catalog["parent"]).tolist()) <= set(np.asarray(cat["id"]).tolist())
    assert np.all(np.asarray(res.peaks["peak_snr"]) >= ResidualDetectionConfig().peak_threshold_snr)


def test_adds_nothing_around_isolated_stars():
    bright_only, _, _, _ = _scene(5, companions=False)
    # Add faint isolated stars too (normally detected): the residual pass must not duplicate them.
    rng = np.random.default_rng(6)
    img, var = bright_only[0].copy(), bright_only[1].copy()
    fx, fy = rng.uniform(30, SHAPE[1] - 30, 6), np.full(6, 20.0) + rng.uniform(0, 5, 6)
    clean = np.zeros(SHAPE)
    for x, y in zip(fx, fy, strict=True):
        add_gaussian_star(clean, x, y, FAINT_FLUX, SIGMA)
    img += clean + rng.normal(size=SHAPE) * np.sqrt(clean)
    var += clean
    exp, dets, cat = _first_pass(img, var, (img, var))
    res = detect_residual_sources(exp, cat, dets)
    assert res.n_searched == 15
    assert res.n_new == 0 and len(res.peaks) == 0
    # The empty catalogue keeps the measurement's columns (so it stacks onto the first pass).
    assert set(cat.colnames) <= set(res.catalog.colnames)


def test_empty_catalogue_gives_empty_result():
    img = np.random.default_rng(1).normal(size=SHAPE) * np.sqrt(SKY_VAR)
    var = np.full(SHAPE, SKY_VAR)
    exp, dets, cat = _first_pass(img, var, (img, var))
    res = detect_residual_sources(exp, cat, dets)
    assert res.n_new == 0 and res.n_modelled == 0 and "base_PsfFlux_instFlux" in res.catalog.colnames


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"model_min_snr": 300.0, "search_min_snr": 200.0}, "search_min_snr >= model_min_snr"),
    ({"search_radius_pix": 0.0}, "search_radius_pix"),
    ({"model_error_frac": -0.1}, "model_error_frac"),
    ({"min_separation_sigma": 0.0}, "min_separation_sigma"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ResidualDetectionConfig(**kwargs).validate()


def test_needs_a_psf_and_matching_inputs():
    bright_only, with_companions, _, _ = _scene(3, companions=True)
    exp, dets, cat = _first_pass(*with_companions, bright_only)
    with pytest.raises(ConfigError, match="PSF"):
        detect_residual_sources(exp.replace(psf=None), cat, dets)
    with pytest.raises(ConfigError, match="do not match"):
        detect_residual_sources(exp, cat[:3], dets)
