"""Snap combination: sum of two snaps, cosmic rays found in the difference and repaired."""

import dataclasses

import numpy as np
import pytest

from singleframe.errors import SnapCombineError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.masks import MaskPlane
from singleframe.steps.snap_combination import SnapCombineConfig, combine_snaps

SKY = 200.0
ORIGIN = (64, 2048)


def _snaps(seed=0, ny=180, nx=260, t=(15.0, 15.0)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx]
    rate = np.full((ny, nx), SKY / 15.0)
    for x, y, f in ((50.3, 60.7, 3e5), (150.0, 90.2, 5e4), (200.6, 140.1, 1e6)):
        rate += f / 15.0 / (2 * np.pi * 1.3**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.3**2))
    out = []
    for i, ti in enumerate(t):
        mean = rate * ti
        img = rng.poisson(mean).astype(np.float32)
        vi = VisitInfo(42, ti, 60000.0 + i * 20 / 86400, "r", "r_03", 150.0, 2.0, 0.0)
        mask = np.zeros((ny, nx), np.uint32)
        if i == 1:
            mask[10, 10] = MaskPlane.BAD
        out.append(Exposure(img, mask, mean.astype(np.float32), vi, DetectorInfo(7), origin=ORIGIN))
    return out


def test_single_snap_passthrough():
    a, _ = _snaps()
    res = combine_snaps([a])
    assert res.exposure is a and res.n_snaps == 1 and res.n_cr_pixels_from_difference == 0


def test_sum_without_cosmic_rays():
    a, b = _snaps()
    res = combine_snaps([a, b])
    exp = res.exposure
    # Only pixels flagged as hits may differ from the plain sum; on Poisson stars there are none.
    assert res.n_cr_pixels_from_difference == 0
    np.testing.assert_array_equal(exp.image, a.image + b.image)
    np.testing.assert_array_equal(exp.variance, a.variance + b.variance)
    assert exp.mask[10, 10] == MaskPlane.BAD  # masks OR'ed
    assert exp.visit_info.exposure_time_s == 30.0
    assert exp.visit_info.mjd_tai == pytest.approx(0.5 * (a.visit_info.mjd_tai + b.visit_info.mjd_tai))
    assert exp.visit_info.visit == 42 and exp.origin == ORIGIN


def test_cosmic_ray_in_one_snap_is_found_and_removed():
    a, b = _snaps(seed=1, t=(10.0, 20.0))
    ia = a.image.copy()
    ia[120, 30:34] += 3000.0  # a 4-px track in snap a only, on sky
    ia[61, 51] += 5000.0  # a hit on a bright star's core pixel
    a = a.replace(image=ia)
    res = combine_snaps([a, b])
    cr = (res.exposure.mask & MaskPlane.CR) != 0
    assert np.all(cr[120, 30:34]) and cr[61, 51]
    # The star core itself is not flagged beyond the hit (same PSF in both snaps).
    assert cr[55:68, 44:58].sum() <= 3
    # Repaired: a is replaced by b * (10/20); expected sum = 1.5 b at hit pixels.
    np.testing.assert_allclose(res.exposure.image[120, 30:34], 1.5 * b.image[120, 30:34], rtol=1e-6)
    clean_sum = a.image + b.image
    assert np.all(res.exposure.image[120, 30:34] < clean_sum[120, 30:34] - 2000)
    assert res.n_cr_pixels_from_difference == cr.sum() < 15


def test_mismatches_raise():
    a, b = _snaps()
    small = b.replace(image=b.image[:-1], mask=b.mask[:-1], variance=b.variance[:-1])
    with pytest.raises(SnapCombineError, match=r"snap 0 .* snap 1 .*shape"):
        combine_snaps([a, small])
    other_band = b.replace(visit_info=dataclasses.replace(b.visit_info, band="i"))
    with pytest.raises(SnapCombineError, match="band"):
        combine_snaps([a, other_band])
    with pytest.raises(SnapCombineError, match="3 snaps"):
        combine_snaps([a, b, b])


def test_repair_can_be_disabled():
    a, b = _snaps()
    a = a.replace(image=a.image + np.where(np.arange(a.image.size).reshape(a.shape) == 500, 4000, 0).astype(np.float32))
    res = combine_snaps([a, b], config=SnapCombineConfig(repair_cosmic_rays=False))
    np.testing.assert_array_equal(res.exposure.image, a.image + b.image)
