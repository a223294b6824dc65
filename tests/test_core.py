"""Core data model: camera WCS, footprints, photometric calibration, configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from singleframe.camera import square_mosaic
from singleframe.configuration import config_from_dict, config_hash
from singleframe.errors import ConfigError
from singleframe.fields import ChebyshevField
from singleframe.footprints import labels_to_spans, spans_to_labels
from singleframe.photo_calib import PhotoCalib, ab_mag_to_njy, njy_to_ab_mag
from singleframe.psf import GaussianPsf, distortion, psf_from_hdus


def test_camera_wcs_reproduces_radial_distortion_exactly() -> None:
    k3 = 2e-6  # per mm^2: ~0.3 % at 40 mm, several pixels at the corners
    cam = square_mosaic("t", n_side=3, nx=1000, ny=700, distortion_k3_per_mm2=k3)
    det = cam.detector(5)
    wcs = cam.initial_wcs(5, 30.0, -20.0, 12.0)
    u = np.array([0.0, 999.0, 500.0, 10.0])
    v = np.array([0.0, 699.0, 350.0, 690.0])
    x_mm, y_mm = det.pixel_to_focal_plane(u, v)
    r = np.hypot(x_mm, y_mm)
    tan_plane_arcsec = cam.plate_scale_arcsec_per_mm * r * (1 + k3 * r**2)
    theta_arcsec = np.degrees(np.arctan(np.radians(tan_plane_arcsec / 3600))) * 3600
    ra, dec = wcs.all_pix2world(u, v, 0)
    from astropy.coordinates import SkyCoord

    sep = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(30.0, -20.0, unit="deg")).arcsec
    # The SIP forward polynomial is exact for a cubic radial term; 1e-6 arcsec is float round-off.
    np.testing.assert_allclose(sep, theta_arcsec, atol=1e-6)
    # The inverse SIP is a fit: it must return the pixels to well under a milli-pixel.
    back = np.array(wcs.all_world2pix(ra, dec, 0))
    np.testing.assert_allclose(back, np.array([u, v]), atol=1e-4)


def test_camera_rotation_angle_is_position_angle_of_focal_plane_y() -> None:
    cam = square_mosaic("t", n_side=1, nx=101, ny=101)
    for rot in (0.0, 30.0, -75.0):
        wcs = cam.initial_wcs(0, 100.0, 10.0, rot)
        from astropy.coordinates import SkyCoord

        c0 = SkyCoord(*wcs.all_pix2world(50.0, 50.0, 0), unit="deg")
        c1 = SkyCoord(*wcs.all_pix2world(50.0, 90.0, 0), unit="deg")
        assert c0.position_angle(c1).deg % 360 == pytest.approx(rot % 360, abs=1e-6)


def test_spans_round_trip_with_origin() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random((41, 57)) > 0.5) * rng.integers(1, 7, (41, 57))
    ids = np.arange(101, 107, dtype=np.int64)
    spans = labels_to_spans(labels, ids, origin=(5, 4))
    assert spans["y"].min() >= 4 and spans["x_start"].min() >= 5
    assert np.all(spans["x_end"] >= spans["x_start"])
    np.testing.assert_array_equal(spans_to_labels(spans, labels.shape, (5, 4), ids=ids), labels)


def test_photo_calib_zero_point_and_magnitudes() -> None:
    pc = PhotoCalib.from_zero_point(27.0, 0.01)
    # 1 count has magnitude ZP by definition.
    assert float(njy_to_ab_mag(pc.instflux_to_njy(1.0))) == pytest.approx(27.0, abs=1e-12)
    assert pc.zero_point_err_mag == pytest.approx(0.01, rel=1e-12)
    assert float(ab_mag_to_njy(31.4)) == pytest.approx(1.0, rel=2e-4)  # 31.4 is rounded AB(1 nJy)
    assert PhotoCalib.from_dict(pc.to_dict()) == pc


def test_gaussian_psf_moments_area_and_fits_round_trip() -> None:
    psf = GaussianPsf(2.0)
    k = psf.image(10.3, 20.7, centered=False)
    assert k.sum() == pytest.approx(1.0)
    yy, xx = np.mgrid[: k.shape[0], : k.shape[1]] - k.shape[0] // 2
    # centroid follows the sub-pixel offset (pixel-integrated Gaussian keeps the first moment)
    assert (k * xx).sum() == pytest.approx(0.3, abs=1e-3)
    assert (k * yy).sum() == pytest.approx(-0.3, abs=1e-3)
    assert psf.sigma(0, 0) == pytest.approx(2.0)
    # Effective area of a Gaussian is 4 pi sigma^2; pixelisation adds ~1/12 px^2 per axis.
    assert psf.area(0, 0) == pytest.approx(4 * math.pi * (4 + 1 / 12), rel=5e-3)
    back = psf_from_hdus(psf.to_hdus())
    assert back == psf



def test_distortion_of_a_sheared_gaussian_is_its_ellipticity() -> None:
    # A Gaussian built with distortion (e1, e2) has moments xx, yy, xy that give them back
    # (exactly, up to float rounding); round and degenerate cases follow the formula.
    xx, yy, xy = GaussianPsf(2.0, e1=0.2, e2=-0.1).moments(0.0, 0.0)
    e1, e2 = distortion(xx, yy, xy)
    assert float(e1) == pytest.approx(0.2, abs=1e-12) and float(e2) == pytest.approx(-0.1, abs=1e-12)
    e1, e2 = distortion([4.0, 3.0], [4.0, 1.0], [0.0, 1.0])
    np.testing.assert_allclose(e1, [0.0, 0.5])
    np.testing.assert_allclose(e2, [0.0, 0.5])

def test_chebyshev_field_fit_recovers_plane() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.uniform(5, 205, 200), rng.uniform(4, 184, 200)
    z = 1.0 + 1e-3 * x - 2e-3 * y
    f = ChebyshevField.fit(x, y, z, order=1, bbox=(5, 4, 205, 184))
    np.testing.assert_allclose(f.evaluate(x, y), z, atol=1e-12)
    assert ChebyshevField.from_dict(f.to_dict()).evaluate(50, 60) == pytest.approx(float(f.evaluate(50, 60)))


@dataclass(frozen=True)
class Inner:
    radius_pix: float = 3.0


@dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    n_iter: int = 2


def test_config_rejects_unknown_keys_and_wrong_types() -> None:
    assert config_from_dict(Outer, {"inner": {"radius_pix": 5}}).inner.radius_pix == 5.0
    with pytest.raises(ConfigError, match="unknown config key.*radius_px.*valid keys"):
        config_from_dict(Outer, {"inner": {"radius_px": 5}})
    with pytest.raises(ConfigError, match="n_iter must be an integer"):
        config_from_dict(Outer, {"n_iter": "two"})
    assert config_hash(Outer()) != config_hash(Outer(n_iter=3))


def test_stamps_equal_clipped_fancy_indexing_inside_and_across_edges() -> None:
    from singleframe.stamps import Stamps

    rng = np.random.default_rng(3)
    ny, nx, half = 40, 57, 4
    plane = rng.normal(size=(ny, nx)).astype(np.float32)
    strided = np.asfortranarray(plane)  # any layout of the same plane cuts the same stamps
    ix = np.array([20, 0, nx - 1, 2, 30, -3, nx + 2, 10], np.int64)  # interior, edges, centres off the image
    iy = np.array([15, 20, 5, ny - 1, 0, -2, ny + 1, 3], np.int64)
    st = Stamps((ny, nx), ix, iy, half)
    off = np.arange(-half, half + 1)
    rows, cols = iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]
    ref = plane[np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)]
    assert np.array_equal(st.cut(plane), ref) and np.array_equal(st.cut(strided), ref)
    assert np.array_equal(st.inside, (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx))
    assert st.interior.tolist() == [True, False, False, False, False, False, False, False]
    empty = Stamps((ny, nx), ix[:0], iy[:0], half)
    assert empty.cut(plane).shape == (0, 2 * half + 1, 2 * half + 1)
