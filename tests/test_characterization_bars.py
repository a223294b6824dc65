"""Issue 3 bars for PSF characterisation, through ``characterize`` with the default configuration.

1. Seeing 0.5"-2.5" (FWHM 2.5-12.5 px at 0.2"/px) all converge with one configuration, and the
   fitted PSF size matches the simulator's truth.
2. Bad input (almost no stars, saturated cores, a donut PSF) raises a typed, explained
   :class:`PsfFitError` instead of returning a garbage PSF.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from singleframe.errors import PsfFitError
from singleframe.exposure import Exposure
from singleframe.masks import MaskPlane
from singleframe.sim import benchmark_config, simulate_detector
from singleframe.sim.evaluation import psf_size_error_pct
from singleframe.steps.config import CalibrateImageConfig
from singleframe.steps.pipeline import characterize

NX, NY = 768, 640  # small, non-square detectors (the simulator puts the origin where the camera does)
SKY = 800.0  # counts / pixel (the benchmark sky)


def _sim(seeing: float, seed: int):
    cfg = replace(benchmark_config(NX, "typical", seeing, seed=seed), ny=NY)
    return simulate_detector(cfg, cfg.visits[0], 0)


@pytest.mark.parametrize("seeing", [0.5, 0.8, 1.3, 1.8, 2.5])
def test_default_config_converges_from_half_to_two_and_a_half_arcsec(seeing: float) -> None:
    sim = _sim(seeing, seed=3)
    ch = characterize(sim.snaps, config=CalibrateImageConfig())
    assert ch.exposure.psf is not None
    assert int(ch.psf_stars["calib_psf_used"].sum()) >= 5  # a pixel model, not the Gaussian fallback
    err = psf_size_error_pct(ch.exposure.psf, sim.truth.psf_grid)
    # 40 detectors (seeds 1-8 x these 5 seeings) gave |error| <= 1.34 %; the spread is the statistical
    # noise of 6-40 PSF stars on a 768x640 detector. 2 % leaves room for that noise and is still far
    # below the ~10 % a wrong (e.g. Gaussian-fallback or initial) PSF would show at 2.5".
    assert abs(err) < 2.0, f"seeing {seeing}: PSF size error {err:.2f} %"


# -------------------------------------------------------------------------------------------
# Bad input: synthetic scenes on a simulated detector's exposure (WCS, origin, visit info kept)
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template() -> Exposure:
    return _sim(0.8, seed=5).snaps[0]


def _scene(template: Exposure, kernel, n_stars: int, flux: float, *, seed: int,
           saturation: float = np.inf) -> list[Exposure]:
    """Stars with profile ``kernel(dx, dy)`` (sum 1) on a jittered grid, sky noise, clipped at ``saturation``."""
    rng = np.random.default_rng(seed)
    ny, nx = template.shape
    model = np.zeros((ny, nx))
    side = int(np.ceil(np.sqrt(n_stars)))
    gx, gy = np.meshgrid(np.linspace(60, nx - 60, side), np.linspace(60, ny - 60, side))
    xs = gx.ravel()[:n_stars] + rng.uniform(-10, 10, n_stars)
    ys = gy.ravel()[:n_stars] + rng.uniform(-10, 10, n_stars)
    h = 25
    g = np.arange(-h, h + 1)
    for x, y in zip(xs, ys, strict=True):
        ix, iy = int(round(x)), int(round(y))
        k = kernel(g[None, :] - (x - ix), g[:, None] - (y - iy))
        model[iy - h:iy + h + 1, ix - h:ix + h + 1] += flux * k / k.sum()
    var = SKY + model
    img = SKY + model + rng.normal(size=model.shape) * np.sqrt(var)
    mask = np.zeros(model.shape, np.uint32)
    sat = img >= saturation
    img = np.minimum(img, saturation)
    mask[sat] |= np.uint32(MaskPlane.SAT)
    return [template.replace(image=img.astype(np.float32), variance=var.astype(np.float32), mask=mask, psf=None)]


def _gaussian(sigma: float):
    return lambda dx, dy: np.exp(-0.5 * (dx * dx + dy * dy) / sigma**2)


def test_almost_no_stars_raises_with_counts(template: Exposure) -> None:
    snaps = _scene(template, _gaussian(1.8), 3, 2e5, seed=11)
    with pytest.raises(PsfFitError, match="too few bright stars") as info:
        characterize(snaps, config=CalibrateImageConfig())
    # The counts say what was found (3 stars, need 5) so an operator can tell "empty" from "broken".
    assert info.value.metadata["n_candidates"] == 3 and info.value.metadata["min_stars"] == 5


def test_saturated_cores_raise_instead_of_fitting_clipped_stars(template: Exposure) -> None:
    # Every star is bright enough that its core is clipped at 20000 counts and masked SAT: a flat-topped
    # profile must not become the PSF.
    snaps = _scene(template, _gaussian(1.8), 60, 2e6, seed=12, saturation=20000.0)
    assert np.all(snaps[0].mask.max() & np.uint32(MaskPlane.SAT))
    with pytest.raises(PsfFitError, match="unsaturated|star-like|stellar locus") as info:
        characterize(snaps, config=CalibrateImageConfig())
    assert "min_stars" in info.value.metadata


def _donut(r_ring: float, width: float, blur: float):
    """Defocused annular pupil: a ring with a dark centre (central obscuration), softened by seeing."""
    return lambda dx, dy: (np.exp(-0.5 * ((np.hypot(dx, dy) - r_ring) / width) ** 2)
                           + 1e-3 * np.exp(-0.5 * (dx * dx + dy * dy) / blur**2))


def test_donut_psf_raises_naming_the_central_dip(template: Exposure) -> None:
    snaps = _scene(template, _donut(5.0, 1.5, 2.0), 60, 3e5, seed=13)
    with pytest.raises(PsfFitError) as info:
        characterize(snaps, config=CalibrateImageConfig())
    # A ring has many maxima within the isolation radius: the initial PSF stops first and names donuts.
    # (The pixel-model donut test of fit_psf is exercised directly in tests/test_steps_psf.py.)
    assert "donut" in str(info.value)
    assert info.value.metadata["n_peaks"] > 5 * info.value.metadata["n_candidates"]
