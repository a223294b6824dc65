"""Background estimation: gradient + stars recovered to a small fraction of the sky noise."""

import numpy as np
import pytest
from astropy.io import fits

from singleframe.background import BackgroundList, BackgroundModel
from singleframe.errors import ConfigError, UnprocessableFrameError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.masks import MaskPlane
from singleframe.steps.background import BackgroundConfig, estimate_background, subtract_background

SKY_SIGMA = 10.0
ORIGIN = (37, 1200)


def _scene(seed=3, ny=700, nx=1100, n_stars=400):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx]
    truth = 500.0 + 0.02 * xx - 0.015 * yy + 5.0 * np.sin(xx / 400.0)
    img = truth + rng.normal(0, SKY_SIGMA, (ny, nx))
    sigma = 1.5
    for x, y, f in zip(rng.uniform(10, nx - 10, n_stars), rng.uniform(10, ny - 10, n_stars),
                       10 ** rng.uniform(3, 6, n_stars), strict=True):
        ix, iy = int(x), int(y)
        sl = np.s_[max(iy - 12, 0): iy + 13, max(ix - 12, 0): ix + 13]
        img[sl] += f / (2 * np.pi * sigma**2) * np.exp(-((xx[sl] - x) ** 2 + (yy[sl] - y) ** 2) / (2 * sigma**2))
    return img.astype(np.float32), truth


def test_gradient_with_stars_recovered():
    img, truth = _scene()
    mask = np.zeros(img.shape, np.uint32)
    res = estimate_background(img, mask, config=BackgroundConfig(bin_size_pix=128), origin=ORIGIN)
    model = res.model.image()
    resid = (model - truth) / SKY_SIGMA
    # Brief: background to < 0.1 sigma of the sky noise. Mean bias is much smaller (mode
    # estimator); the 99th percentile covers bins contaminated by the brightest stars.
    assert abs(resid.mean()) < 0.03
    assert np.percentile(np.abs(resid), 99) < 0.1
    # Clipped std underestimates a Gaussian sigma by ~1-2 % (3-sigma clipping), stars add a little.
    assert res.sky_rms == pytest.approx(SKY_SIGMA, rel=0.05)
    # Parent coordinates: evaluate() at the origin equals image()[0, 0] (float32 rounding).
    assert res.model.evaluate(ORIGIN[0], ORIGIN[1]) == pytest.approx(model[0, 0], abs=1e-3)


def test_masked_region_is_filled_and_detected_pixels_ignored():
    img, truth = _scene(seed=4)
    mask = np.zeros(img.shape, np.uint32)
    # A large "bright object" region with a wrong level, flagged DETECTED, must not bias the model.
    img[200:500, 300:700] += 1000.0
    mask[200:500, 300:700] = MaskPlane.DETECTED
    res = estimate_background(img, mask, origin=ORIGIN)
    assert res.n_bins_filled > 0
    resid = (res.model.image() - truth) / SKY_SIGMA
    # Filled bins interpolate a smooth truth; allow 0.2 sigma inside the former hole.
    assert np.percentile(np.abs(resid), 99) < 0.2


def test_no_usable_pixels_raises_and_names_the_cause():
    img = np.zeros((64, 80), np.float32)
    clear = np.zeros(img.shape, np.uint32)
    # Each cause names itself and its share of the pixels, largest first, so the fix is clear.
    with pytest.raises(UnprocessableFrameError, match=r"100.0 % masked \(.*NO_DATA.*\).*check the mask"):
        estimate_background(img, np.full(img.shape, MaskPlane.NO_DATA, np.uint32))
    with pytest.raises(UnprocessableFrameError, match=r"100.0 % not finite") as err:
        estimate_background(np.full(img.shape, np.nan, np.float32), clear)
    assert err.value.metadata["n_not_finite"] == err.value.metadata["n_sampled"]
    with pytest.raises(UnprocessableFrameError, match=r"100.0 % with a variance .*check the variance plane"):
        estimate_background(img, clear, variance=np.zeros(img.shape, np.float32))
    half = clear.copy()
    half[:, :40] = MaskPlane.BAD
    with pytest.raises(UnprocessableFrameError, match=r"100.0 % with a variance.*; 50.0 % masked"):
        estimate_background(img, half, variance=np.full(img.shape, -1.0, np.float32))


def test_config_validation():
    with pytest.raises(ConfigError):
        BackgroundConfig(median_filter_bins=2).validate()
    with pytest.raises(ConfigError):
        BackgroundConfig(statistic="mean").validate()  # type: ignore[arg-type]


def test_subtract_background_returns_new_exposure_and_appends():
    img, truth = _scene(seed=5, ny=300, nx=420, n_stars=50)
    vi = VisitInfo(1, 30.0, 60000.0, "r", "r", 10.0, -5.0, 0.0)
    exp = Exposure(img, np.zeros(img.shape, np.uint32), np.full(img.shape, SKY_SIGMA**2, np.float32),
                   vi, DetectorInfo(3), origin=ORIGIN)
    before = exp.image.copy()
    sub = subtract_background(exp)
    np.testing.assert_array_equal(exp.image, before)  # input untouched
    assert exp.background is None
    assert len(sub.background) == 1 and sub.exposure.background is sub.background
    # Residual sky after subtraction: zero mean within the noise of the estimate.
    assert abs(np.median(sub.exposure.image)) < 0.1 * SKY_SIGMA
    np.testing.assert_allclose(sub.exposure.image + sub.background.image(), exp.image, atol=1e-3)


def test_model_roundtrip_fits_and_small_grids():
    rng = np.random.default_rng(0)
    for nb in ((1, 1), (1, 3), (2, 2), (4, 5)):
        yc = np.linspace(10.0, 90.0, nb[0]) + 5
        xc = np.linspace(10.0, 140.0, nb[1]) + 7
        m = BackgroundModel(rng.normal(size=nb), xc, yc, (100, 150), (7, 5))
        back = BackgroundList((m,)).to_hdus()
        m2 = BackgroundList.from_hdus(fits.HDUList([fits.PrimaryHDU(), *back])[1:]).components[0]
        # Centres are written with 6 decimals; values exactly.
        np.testing.assert_allclose(m2.image(), m.image(), atol=1e-5)
        ys, xs = np.mgrid[0:100:7, 0:150:11]
        np.testing.assert_allclose(m.evaluate(xs + 7, ys + 5), m.image()[ys, xs], atol=1e-5)


def test_subtract_from_equals_the_model_image_subtracted_band_by_band():
    rng = np.random.default_rng(3)
    img = (1000.0 + rng.normal(0, 10, (300, 170))).astype(np.float32)
    for nb in ((1, 1), (3, 2), (5, 4)):
        yc = np.linspace(20.0, 280.0, nb[0])
        xc = np.linspace(15.0, 155.0, nb[1])
        m = BackgroundModel(1000.0 + rng.normal(0, 5, nb), xc, yc, img.shape, (0, 0))
        want = np.subtract(img, m.image(), dtype=np.float32)
        # Bands of 64 rows (a partial last band): float32 rounding of a ~1000 level (6e-5) at most.
        got = m.subtract_from(img, band_rows=64)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
        # In place into the image itself.
        own = img.copy()
        assert m.subtract_from(own, out=own, band_rows=64) is own
        np.testing.assert_allclose(own, want, rtol=0, atol=2e-4)
    with pytest.raises(ValueError, match="differs from the model"):
        m.subtract_from(img[:10])
    with pytest.raises(ValueError, match="out must be float32"):
        m.subtract_from(img, out=np.zeros(img.shape))


def test_subtract_background_in_place_shares_the_callers_frame():
    img, _ = _scene(seed=6, ny=260, nx=300, n_stars=30)
    exp = Exposure(img, np.zeros(img.shape, np.uint32), np.full(img.shape, SKY_SIGMA**2, np.float32),
                   VisitInfo(1, 30.0, 60000.0, "r", "r", 10.0, -5.0, 0.0), DetectorInfo(3), origin=ORIGIN)
    copied = subtract_background(exp)
    own = exp.replace(image=exp.image.copy())
    pixels = own.image
    inplace = subtract_background(own, overwrite_image=True)
    assert inplace.exposure.image is pixels
    np.testing.assert_array_equal(inplace.exposure.image, copied.exposure.image)
    assert not np.shares_memory(copied.exposure.image, exp.image)  # the default leaves the input alone


def test_background_list_subsampled_image_is_the_image_at_those_pixels():
    rng = np.random.default_rng(4)
    shape, origin = (130, 171), (7, 5)
    parts = tuple(BackgroundModel(rng.normal(size=nb), np.linspace(10.0, 160.0, nb[1]) + origin[0],
                                  np.linspace(10.0, 120.0, nb[0]) + origin[1], shape, origin)
                  for nb in ((3, 4), (1, 1)))
    back = BackgroundList(parts)
    assert back.shape == shape
    for step in (1, 4, 50):
        # image() is float32: its rounding of O(1) values is ~1e-7.
        np.testing.assert_allclose(back.image_subsampled(step), back.image()[::step, ::step], atol=1e-5)
    with pytest.raises(ValueError, match="empty background list"):
        BackgroundList().image_subsampled(2)
