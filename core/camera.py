"""Camera geometry: detectors in the focal plane, radial optical distortion, initial WCS.

Conventions
-----------
* Focal-plane coordinates ``(x_fp, y_fp)`` are in millimetres, with the
  optical axis at ``(0, 0)``.
* A detector pixel ``(u, v)`` (0-based array column, row) maps to the focal
  plane by ``fp = centre_mm + R(rotation_deg) @ ((u - cu, v - cv) * pixel_size_mm)``
  where ``(cu, cv)`` is the detector's central pixel.
* The optics map a focal-plane radius ``r`` (mm) to a radius on the
  gnomonic (tangent) plane ``plate_scale * r * (1 + k3 * r**2)`` (arcsec),
  i.e. a cubic radial distortion on top of a TAN projection. A cubic radial term is a cubic polynomial in pixel offsets
  from the optical axis, so each detector's camera WCS is *exactly* a TAN-SIP
  WCS of order 3 with ``CRPIX`` at the optical axis; the inverse SIP is a fit.
* On the sky, the focal-plane +y axis points to position angle
  ``rotation_angle_deg`` east of north; +x points 90° further (west of north
  for a normal, non-mirrored sky image: RA increases to -x at zero rotation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.wcs import WCS

from .errors import ConfigError


@dataclass(frozen=True)
class DetectorGeometry:
    """One detector's place in the focal plane and its electronics."""

    id: int
    name: str
    nx: int
    ny: int
    center_x_mm: float
    center_y_mm: float
    rotation_deg: float = 0.0
    pixel_size_mm: float = 0.01
    gain_e_per_count: float = 1.0
    read_noise_e: float = 5.0
    saturation_count: float = 60000.0

    @property
    def center_pixel(self) -> tuple[float, float]:
        return ((self.nx - 1) / 2.0, (self.ny - 1) / 2.0)

    def pixel_to_focal_plane(self, u: npt.ArrayLike, v: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        cu, cv = self.center_pixel
        du = (np.asarray(u, float) - cu) * self.pixel_size_mm
        dv = (np.asarray(v, float) - cv) * self.pixel_size_mm
        c, s = math.cos(math.radians(self.rotation_deg)), math.sin(math.radians(self.rotation_deg))
        return self.center_x_mm + c * du - s * dv, self.center_y_mm + s * du + c * dv

    def focal_plane_to_pixel(self, x_mm: npt.ArrayLike, y_mm: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        dx = np.asarray(x_mm, float) - self.center_x_mm
        dy = np.asarray(y_mm, float) - self.center_y_mm
        c, s = math.cos(math.radians(self.rotation_deg)), math.sin(math.radians(self.rotation_deg))
        cu, cv = self.center_pixel
        return cu + (c * dx + s * dy) / self.pixel_size_mm, cv + (-s * dx + c * dy) / self.pixel_size_mm


@dataclass(frozen=True)
class Camera:
    """A set of detectors behind optics with a cubic radial distortion."""

    name: str
    plate_scale_arcsec_per_mm: float
    detectors: tuple[DetectorGeometry, ...]
    distortion_k3_per_mm2: float = 0.0
    observatory_lon_lat_height: tuple[float, float, float] = (-70.749417, -30.244639, 2663.0)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = [d.id for d in self.detectors]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"camera {self.name!r} has duplicate detector ids {ids}")
        if not self.plate_scale_arcsec_per_mm > 0:
            raise ConfigError(f"camera {self.name!r}: plate_scale_arcsec_per_mm must be > 0")

    def detector(self, detector_id: int) -> DetectorGeometry:
        for d in self.detectors:
            if d.id == detector_id:
                return d
        raise ConfigError(f"camera {self.name!r} has no detector {detector_id}; it has {[d.id for d in self.detectors]}")

    def pixel_scale_arcsec(self, detector_id: int) -> float:
        """Nominal pixel scale at the detector centre (no distortion)."""
        return self.plate_scale_arcsec_per_mm * self.detector(detector_id).pixel_size_mm

    # -- sky mapping -------------------------------------------------------------------
    def initial_wcs(self, detector_id: int, boresight_ra_deg: float, boresight_dec_deg: float,
                    rotation_angle_deg: float, *, sip_inverse_order: int = 5) -> WCS:
        """TAN-SIP WCS of one detector from the boresight and rotation angle.

        The forward SIP polynomial reproduces the camera's cubic radial
        distortion exactly; the inverse (AP/BP) is a least-squares fit over
        the detector, good to well below a milli-pixel for realistic distortion.
        """
        det = self.detector(detector_id)
        p = det.pixel_size_mm
        # Optical axis in this detector's pixel coordinates (may lie off the detector).
        u_axis, v_axis = det.focal_plane_to_pixel(0.0, 0.0)
        scale_deg_per_mm = self.plate_scale_arcsec_per_mm / 3600.0
        # pixel offset -> focal plane mm (rotation by detector angle, times pixel size)
        c, s = math.cos(math.radians(det.rotation_deg)), math.sin(math.radians(det.rotation_deg))
        r_det = np.array([[c, -s], [s, c]]) * p
        # focal plane mm -> intermediate world coords (deg, xi to the east, eta to the north)
        th = math.radians(rotation_angle_deg)
        # +y_fp points to position angle th (east of north); +x_fp to th - 90 deg (west at th = 0).
        r_sky = np.array([[-math.cos(th), math.sin(th)], [math.sin(th), math.cos(th)]]) * scale_deg_per_mm
        cd = r_sky @ r_det
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.wcs.crval = [boresight_ra_deg, boresight_dec_deg]
        w.wcs.crpix = [u_axis + 1.0, v_axis + 1.0]
        w.wcs.cd = cd
        w.wcs.radesys = "ICRS"
        w.wcs.set()
        # Forward SIP: u' -> u' (1 + k p^2 |u'|^2), exact for the cubic radial term.
        k = self.distortion_k3_per_mm2 * p * p
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[3, 0] = k
        a[1, 2] = k
        b[2, 1] = k
        b[0, 3] = k
        from astropy.wcs import Sip

        ap, bp = _fit_inverse_sip(a, b, det.nx, det.ny, u_axis, v_axis, sip_inverse_order)
        w.sip = Sip(a, b, ap, bp, w.wcs.crpix)
        w.wcs.set()
        return w

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["detectors"] = [asdict(x) for x in self.detectors]
        d["observatory_lon_lat_height"] = list(self.observatory_lon_lat_height)
        d["metadata"] = dict(self.metadata)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Camera:
        try:
            dets = tuple(DetectorGeometry(**x) for x in d["detectors"])
            return cls(
                name=str(d["name"]),
                plate_scale_arcsec_per_mm=float(d["plate_scale_arcsec_per_mm"]),
                detectors=dets,
                distortion_k3_per_mm2=float(d.get("distortion_k3_per_mm2", 0.0)),
                observatory_lon_lat_height=tuple(d.get("observatory_lon_lat_height", (-70.749417, -30.244639, 2663.0))),  # type: ignore[arg-type]
                metadata=dict(d.get("metadata", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"invalid camera description: {exc}. Expected keys name, plate_scale_arcsec_per_mm, detectors[]") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> Camera:
        """Load a camera from a JSON or YAML file."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls.from_dict(data)


def _fit_inverse_sip(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], nx: int, ny: int,
                     u_axis: float, v_axis: float, order: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Least-squares inverse SIP polynomial over the detector (plus a 5 % margin)."""
    uu, vv = np.meshgrid(np.linspace(-0.05 * nx, 1.05 * nx, 41), np.linspace(-0.05 * ny, 1.05 * ny, 41))
    return fit_inverse_sip(a, b, uu.ravel() - u_axis, vv.ravel() - v_axis, order)


def fit_inverse_sip(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], du: npt.NDArray[np.float64],
                    dv: npt.NDArray[np.float64], order: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Inverse SIP coefficients ``(AP, BP)`` of ``order`` fitted at pixel offsets ``(du, dv)`` from CRPIX.

    The forward map is ``f = u + A(u, v)``; the inverse polynomial gives ``u = f + AP(f)``.
    """
    fu = du + sip_polynomial(a, du, dv)
    fv = dv + sip_polynomial(b, du, dv)
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i) if i + j >= 1]
    m = np.column_stack([fu**i * fv**j for i, j in terms])
    # Scale columns for conditioning.
    norms = np.linalg.norm(m, axis=0)
    norms[norms == 0] = 1.0
    cu, *_ = np.linalg.lstsq(m / norms, du - fu, rcond=None)
    cv, *_ = np.linalg.lstsq(m / norms, dv - fv, rcond=None)
    ap = np.zeros((order + 1, order + 1))
    bp = np.zeros((order + 1, order + 1))
    for (i, j), x, y in zip(terms, cu / norms, cv / norms, strict=True):
        ap[i, j] = x
        bp[i, j] = y
    return ap, bp


def sip_polynomial(coeffs: npt.NDArray[np.float64], u: npt.NDArray[np.float64],
                   v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``sum c[i, j] u**i v**j`` over the (triangular) SIP coefficient array."""
    out = np.zeros_like(np.asarray(u, float))
    c = np.asarray(coeffs, float)
    for i in range(c.shape[0]):
        for j in range(c.shape[1] - i):
            if c[i, j] != 0.0:
                out += c[i, j] * u**i * v**j
    return out


def square_mosaic(name: str, *, n_side: int, nx: int, ny: int, pixel_size_mm: float = 0.01,
                  plate_scale_arcsec_per_mm: float = 20.0, gap_mm: float = 1.0,
                  distortion_k3_per_mm2: float = 0.0, gain_e_per_count: float = 1.0,
                  read_noise_e: float = 5.0, saturation_count: float = 60000.0,
                  rotations_deg: Sequence[float] | None = None) -> Camera:
    """A camera of ``n_side × n_side`` identical detectors on a square grid (ids from 0)."""
    dets = []
    pitch_x = nx * pixel_size_mm + gap_mm
    pitch_y = ny * pixel_size_mm + gap_mm
    for j in range(n_side):
        for i in range(n_side):
            idx = j * n_side + i
            dets.append(DetectorGeometry(
                id=idx, name=f"R{j}{i}", nx=nx, ny=ny,
                center_x_mm=(i - (n_side - 1) / 2.0) * pitch_x,
                center_y_mm=(j - (n_side - 1) / 2.0) * pitch_y,
                rotation_deg=float(rotations_deg[idx]) if rotations_deg else 0.0,
                pixel_size_mm=pixel_size_mm, gain_e_per_count=gain_e_per_count,
                read_noise_e=read_noise_e, saturation_count=saturation_count,
            ))
    return Camera(name, plate_scale_arcsec_per_mm, tuple(dets), distortion_k3_per_mm2)
