"""The in-memory exposure: pixels, mask, variance and everything attached to them."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .masks import MASK_DTYPE
from .photo_calib import PhotoCalib

if TYPE_CHECKING:
    from astropy.wcs import WCS

    from .background import BackgroundList
    from .fields import ChebyshevField
    from .psf import PsfModel

#: Rubin's summit: the simulator's site, and the default of :class:`VisitInfo`. Ingest does not
#: assume it: a file that names no site gets NaN (no zenith distance unless it gives AIRMASS).
DEFAULT_OBSERVATORY = (-70.749417, -30.244639, 2663.0)


def zenith_distance_deg(ra_deg: float, dec_deg: float, mjd_tai: float, lon_deg: float, lat_deg: float) -> float:
    """Geometric zenith distance (deg) of (ra, dec) at TAI MJD ``mjd_tai`` from east longitude ``lon_deg``.

    Computed from the Greenwich mean sidereal time (UT1 ~ UTC = TAI - leap seconds) with first-order
    precession from J2000 to the date, without nutation, aberration or refraction: within
    ~0.01 deg of astropy's AltAz. That is ample for a summary statistic and costs
    microseconds, where an astropy AltAz transform reads the IERS tables (~2 s on first use).
    NaN if any input is not finite.
    """
    if not all(math.isfinite(v) for v in (ra_deg, dec_deg, mjd_tai, lon_deg, lat_deg)):
        return float("nan")
    import erfa

    y, mo, dy, frac = erfa.jd2cal(2400000.5, mjd_tai)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # erfa warns about dates beyond its leap-second table
        tai_minus_utc_s = float(erfa.dat(int(y), int(mo), int(dy), float(frac)))
    d = mjd_tai - tai_minus_utc_s / 86400.0 - 51544.5  # UT days from J2000.0
    years = d / 365.25
    a, dd = math.radians(ra_deg), math.radians(dec_deg)
    # First-order precession: m = 3.075 s/yr, n = 1.336 s/yr = 20.04 arcsec/yr.
    ra = ra_deg + years * (3.075 + 1.336 * math.sin(a) * math.tan(dd)) * 15.0 / 3600.0
    dec = dec_deg + years * 20.04 * math.cos(a) / 3600.0
    gmst_deg = (280.46061837 + 360.98564736629 * d) % 360.0
    hour_angle = math.radians((gmst_deg + lon_deg - ra) % 360.0)
    phi, delta = math.radians(lat_deg), math.radians(dec)
    cos_zd = math.sin(phi) * math.sin(delta) + math.cos(phi) * math.cos(delta) * math.cos(hour_angle)
    return float(math.degrees(math.acos(max(-1.0, min(1.0, cos_zd)))))


@dataclass(frozen=True)
class VisitInfo:
    """What was observed, when and how.

    ``mjd_tai`` is the exposure mid-point (MJD, TAI). Angles are degrees.
    """

    visit: int
    exposure_time_s: float
    mjd_tai: float
    band: str
    physical_filter: str
    boresight_ra_deg: float
    boresight_dec_deg: float
    rotation_angle_deg: float
    airmass: float = float("nan")
    instrument: str = "unknown"
    observatory_lon_lat_height: tuple[float, float, float] = DEFAULT_OBSERVATORY

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["observatory_lon_lat_height"] = list(self.observatory_lon_lat_height)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VisitInfo:
        kw = dict(d)
        kw["observatory_lon_lat_height"] = tuple(kw.get("observatory_lon_lat_height", DEFAULT_OBSERVATORY))
        return cls(**kw)


@dataclass(frozen=True)
class DetectorInfo:
    """Electronic properties of the detector that produced the pixels."""

    id: int
    name: str = ""
    gain_e_per_count: float = 1.0
    read_noise_e: float = 0.0
    saturation_count: float = float("inf")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DetectorInfo:
        return cls(**dict(d))


def writable_in_place(a: Any, dtype: Any) -> bool:
    """Whether a step asked to overwrite its input (``overwrite_image`` / ``overwrite_mask``) may write
    into ``a``: a writable, C-contiguous numpy array of ``dtype``. Anything else is copied."""
    return bool(isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable)


def _frozen_mapping(m: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(m or {}))


@dataclass(frozen=True, eq=False)
class Exposure:
    """An image with its mask, variance and calibrations.

    Pixel arrays are indexed ``[row, column]`` = ``[y, x]``. Catalogue
    positions are in *parent* coordinates: the pixel at array index
    ``[0, 0]`` has centre ``(x, y) = origin``; integer positions are pixel
    centres (0-based, as in numpy and sep). Use :meth:`pixel_to_sky` and
    :meth:`sky_to_pixel`, which apply the origin, rather than the WCS directly.

    Steps never modify an exposure in place: they return a new one with
    :meth:`replace`.
    """

    image: npt.NDArray[np.float32]
    mask: npt.NDArray[np.uint32]
    variance: npt.NDArray[np.float32]
    visit_info: VisitInfo
    detector: DetectorInfo
    wcs: WCS | None = None
    psf: PsfModel | None = None
    photo_calib: PhotoCalib | None = None
    ap_corr: Mapping[str, ChebyshevField] = field(default_factory=dict)
    background: BackgroundList | None = None
    origin: tuple[int, int] = (0, 0)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    summary: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = self.image.shape
        if self.image.ndim != 2:
            raise ValueError(f"image must be 2-D, got shape {shape}")
        if self.mask.shape != shape or self.variance.shape != shape:
            raise ValueError(
                f"image {shape}, mask {self.mask.shape} and variance {self.variance.shape} must have one shape"
            )
        object.__setattr__(self, "image", np.asarray(self.image, dtype=np.float32))
        object.__setattr__(self, "variance", np.asarray(self.variance, dtype=np.float32))
        object.__setattr__(self, "mask", np.asarray(self.mask, dtype=MASK_DTYPE))
        object.__setattr__(self, "metadata", _frozen_mapping(self.metadata))
        object.__setattr__(self, "summary", _frozen_mapping(self.summary))
        object.__setattr__(self, "ap_corr", _frozen_mapping(self.ap_corr))
        object.__setattr__(self, "origin", (int(self.origin[0]), int(self.origin[1])))

    # -- geometry -----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return (int(self.image.shape[0]), int(self.image.shape[1]))

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x_min, y_min, x_max, y_max)`` in parent coordinates, inclusive."""
        x0, y0 = self.origin
        return (x0, y0, x0 + self.shape[1] - 1, y0 + self.shape[0] - 1)

    @property
    def center_pix(self) -> tuple[float, float]:
        """Centre of the image in parent coordinates."""
        x0, y0 = self.origin
        return (x0 + (self.shape[1] - 1) / 2.0, y0 + (self.shape[0] - 1) / 2.0)

    def pixel_to_sky(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Parent pixel coordinates to (RA, Dec) in degrees."""
        if self.wcs is None:
            raise ValueError("exposure has no WCS; run astrometry first")
        x0, y0 = self.origin
        ra, dec = self.wcs.all_pix2world(np.asarray(x, float) - x0, np.asarray(y, float) - y0, 0)
        return np.asarray(ra, float), np.asarray(dec, float)

    def sky_to_pixel(self, ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(RA, Dec) in degrees to parent pixel coordinates."""
        if self.wcs is None:
            raise ValueError("exposure has no WCS; run astrometry first")
        x0, y0 = self.origin
        x, y = self.wcs.all_world2pix(np.asarray(ra_deg, float), np.asarray(dec_deg, float), 0,
                                      tolerance=1e-8, maxiter=50, quiet=True)
        return np.asarray(x, float) + x0, np.asarray(y, float) + y0

    def replace(self, **changes: Any) -> Exposure:
        """Return a copy with ``changes`` applied (arrays are shared unless replaced)."""
        return dataclasses.replace(self, **changes)

    def with_metadata(self, **items: Any) -> Exposure:
        return self.replace(metadata={**self.metadata, **items})
