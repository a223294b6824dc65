"""Ingest FITS files as ``post_isr_image`` datasets.

Two layouts are accepted:

(a) our multi-extension layout (``IMAGE``/``MASK``/``VARIANCE``, see
    :mod:`singleframe.io.formats`), from this package or from other software
    that writes Rubin-style files;
(b) a plain FITS image (the first HDU holding a 2-D array) with standard
    keywords:

    ==========================  =============================================
    keyword                     meaning
    ==========================  =============================================
    ``EXPTIME``                 exposure time (s) — required
    ``GAIN``                    gain (e-/count; else the mean of ``GAINA``, ``GAINB``, …) — required
    ``RDNOISE`` / ``READNOIS``  read noise (e-; else the mean of ``RDNOISEA``, …) — required
    ``SATURATE``                saturation level (counts) — required
    ``FILTER``                  physical filter — required (``BAND`` optional)
    ``DATE-OBS`` / ``MJD-OBS``  exposure start (``TIMESYS``, default UTC); a date alone needs
                                ``TIME-OBS``, ``UTC-OBS``, ``UTSTART``, ``UT`` or ``TAIHMS`` — required
    celestial WCS               ``CTYPEi``, ``CRVALi``, ``CRPIXi``, ``CD``/``PC`` — required
    ``VISIT`` / ``EXPID``       visit id (or a numeric ``OBJECT``); optional
    ``DETECTOR`` / ``CCDNUM``   detector id, the first that is an integer (default 0); optional
    ``SNAP`` (configurable)     snap index 0/1; optional
    site keywords               observatory (see :func:`_site`); optional, NaN without
    ==========================  =============================================

Every keyword can be supplied or replaced with ``overrides`` (keyword →
value, applied to every file's header before it is read). Without a
variance plane the variance (counts²) is ``max(image, 0)/gain +
(read_noise/gain)²``, which assumes the image is in counts; pixels at or
above ``SATURATE`` get ``SAT``; NaN pixels get ``NO_DATA`` and are set to 0
with the read-noise variance. Without ``VISIT``/``EXPID`` the visit id is
the number of 10-second intervals from 2000-01-01T00:00 TAI to the exposure
start (unique per exposure, below the 2**29 limit of packed source ids until
the year 2170).

Files that share instrument, visit and detector are the snaps of one visit:
the ``SNAP`` keyword numbers them, otherwise they are ordered by time. A
visit has at most two snaps. A file that cannot be used is reported as an
:class:`~singleframe.errors.IngestError` naming the problem and the override
that fixes it; the other files are still ingested.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import astropy.units as u
import fsspec
import numpy as np
import numpy.typing as npt
from astropy.coordinates import Angle, EarthLocation
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from ..errors import DatasetError, IngestError
from ..exposure import DetectorInfo, Exposure, VisitInfo, zenith_distance_deg
from ..masks import MASK_DTYPE, MaskPlane
from .formats import _long_key, exposure_from_hdulist, read_mask_hdu, wcs_from_header
from .refs import DatasetRef
from .store import ArtifactStore

__all__ = ["IngestReport", "RawFile", "ingest_files", "read_raw_file"]

#: Units accepted for a plain image whose variance must be computed from counts.
_COUNT_UNITS = frozenset({"", "adu", "count", "counts", "ct", "dn", "electron", "electrons", "e-"})

#: Visit ids derived from time count 10-s intervals from this epoch (2000-01-01T00:00 TAI).
_VISIT_EPOCH_MJD = 51544.0
_VISIT_TICK_S = 10.0


@dataclass(frozen=True, eq=False)
class RawFile:
    """One readable input file: its exposure and the snap index its header gave (if any)."""

    path: str
    exposure: Exposure
    snap: int | None
    sha256: str


@dataclass(frozen=True)
class IngestReport:
    """Outcome of :func:`ingest_files`.

    Attributes
    ----------
    refs
        References of the ``post_isr_image`` datasets written, sorted by data id.
    failures
        ``(path, message)`` for each file not ingested; the message says how to fix it.
    """

    refs: tuple[DatasetRef, ...]
    failures: tuple[tuple[str, str], ...]

    @property
    def ok(self) -> bool:
        """True when every file was ingested."""
        return not self.failures


def _override_hint(pairs: Mapping[str, str]) -> str:
    """How to supply keywords: ``--set K=V`` on the command line, ``overrides={...}`` from Python."""

    def arg(k: str, v: str) -> str:
        text = f"{k}={v.strip(chr(39))}"
        return f"'{text}'" if re.search(r"[\s<>]", text) else text

    cli = " ".join(f"--set {arg(k, v)}" for k, v in pairs.items())
    py = ", ".join(f"{k!r}: {v}" for k, v in pairs.items())
    return f"{cli} (overrides={{{py}}} from Python)"


#: Header values observatories write for "not known"; they count as missing keywords.
_PLACEHOLDERS = frozenset({"N/A", "NA", "UNKNOWN", "NONE", "NULL", "-", "?"})


class _Header:
    """A FITS header with overrides applied, and lookups that record what is missing."""

    def __init__(self, header: fits.Header, overrides: Mapping[str, Any], path: str) -> None:
        self.header = header.copy()
        for key, value in overrides.items():
            # A fresh comment: the card's old one (e.g. "degrees W") no longer describes the value.
            self.header[_long_key(str(key).upper())] = (value, "override")
        self.path = path
        #: ``(keywords looked for, keyword to supply, example value)`` of each missing keyword.
        self.missing: list[tuple[str, str, str]] = []

    def first(self, *keys: str) -> Any:
        """Value of the first of ``keys`` that is present and not a placeholder ('N/A', 'UNKNOWN', ...)."""
        for key in keys:
            if key in self.header and self.header[key] is not None:
                text = str(self.header[key]).strip()
                if text and text.upper() not in _PLACEHOLDERS:
                    return self.header[key]
        return None

    def number(self, *keys: str, meaning: str, example: str, required: bool = True,
               default: float = math.nan) -> float:
        value = self.first(*keys)
        if value is None:
            if required:
                self.missing.append((f"{' or '.join(keys)} ({meaning})", keys[0], example))
            return default
        try:
            return float(value)
        except (TypeError, ValueError):
            raise IngestError(self.path, f"keyword {keys[0]} = {value!r} is not a number ({meaning})",
                              f"fix the header or pass {_override_hint({keys[0]: example})}") from None

    def text(self, *keys: str, meaning: str, example: str, required: bool = True) -> str:
        value = self.first(*keys)
        if value is None:
            if required:
                self.missing.append((f"{' or '.join(keys)} ({meaning})", keys[0], example))
            return ""
        return str(value).strip()

    def raise_if_missing(self) -> None:
        if self.missing:
            names = ", ".join(k for k, _, _ in self.missing)
            fix = {key: example for _, key, example in self.missing}
            raise IngestError(self.path, f"missing keyword(s) {names}",
                              f"add them to the header or pass {_override_hint(fix)}")


def _band_from_filter(physical_filter: str) -> str:
    """``r`` from ``r``, ``SDSS r'``, ``r_03`` or ``lsst_r``; otherwise the filter name itself."""
    m = re.match(r"^(?:sdss|lsst|decam|hsc)?[\s_\-]*([ugrizyUBVRIJHK])(?:\b|_|'|$)", physical_filter.strip(),
                 flags=re.IGNORECASE)
    if m:
        letter = m.group(1)
        return letter.lower() if letter.lower() in "ugrizy" else letter
    return physical_filter.strip()


def _instrument_key(name: str) -> str:
    """An instrument name safe as a storage key segment."""
    cleaned = re.sub(r"[^A-Za-z0-9_.+\-]+", "_", name.strip()).strip("_")
    return cleaned or "unknown"


#: Keywords with the time of day that complete a date-only ``DATE-OBS``, and their time scale
#: (None: ``TIMESYS``, default UTC).
_TIME_OF_DAY_KEYS: tuple[tuple[str, str | None], ...] = (
    ("TIME-OBS", None), ("UTC-OBS", "utc"), ("UTSTART", "utc"), ("UT", "utc"), ("TAIHMS", "tai"))


def _mid_exposure_mjd_tai(h: _Header, exposure_time_s: float) -> float:
    scale = str(h.first("TIMESYS") or "utc").strip().lower()
    if scale not in {"utc", "tai", "tt", "tdb", "tcg", "tcb", "ut1", "gps"}:
        raise IngestError(h.path, f"TIMESYS = {scale!r} is not a time scale astropy knows",
                          f"pass {_override_hint({'TIMESYS': 'UTC'})} (or the right scale)")
    half = 0.0 if not math.isfinite(exposure_time_s) else exposure_time_s / 2.0
    try:
        if h.first("MJD-AVG") is not None:
            return float(Time(float(h.first("MJD-AVG")), format="mjd", scale=scale).tai.mjd)
        if h.first("MJD-OBS") is not None:
            start = Time(float(h.first("MJD-OBS")), format="mjd", scale=scale)
        elif h.first("DATE-OBS") is not None:
            date = str(h.first("DATE-OBS")).strip()
            if not re.search(r"\d:\d\d", date):
                # A date alone (pre-1997 convention, or SDSS's TAI date) needs its time of day:
                # midnight would misplace the site's sky by hours and give every frame of the
                # night one visit id.
                for key, key_scale in _TIME_OF_DAY_KEYS:
                    if h.first(key) is not None:
                        date, scale = f"{date}T{str(h.first(key)).strip()}", key_scale or scale
                        break
                else:
                    raise IngestError(
                        h.path, f"DATE-OBS = {date!r} gives the date but not the time of day, and there is no "
                        f"{', '.join(k for k, _ in _TIME_OF_DAY_KEYS)}",
                        f"pass {_override_hint({'MJD-OBS': '<start MJD>'})}, or a DATE-OBS with the time "
                        "('2024-01-31T03:04:05.0')")
            start = Time(date, format="isot" if "T" in date else "iso", scale=scale)
        else:
            h.missing.append(("DATE-OBS or MJD-OBS (exposure start, UTC unless TIMESYS)", "DATE-OBS",
                              "'2024-01-31T03:04:05.0'"))
            return math.nan
    except (TypeError, ValueError) as exc:
        raise IngestError(h.path, f"cannot read the observation time: {exc}",
                          f"pass {_override_hint({'MJD-OBS': '<start MJD>'})} or a valid ISO DATE-OBS") from None
    return float(start.tai.mjd) + half / 86400.0


def _rotation_angle_deg(wcs: WCS) -> float:
    """Position angle (east of north) of the pixel +y axis, from the CD matrix."""
    cd = wcs.celestial.pixel_scale_matrix
    return float(math.degrees(math.atan2(cd[0, 1], cd[1, 1])) % 360.0)


def _visit_from_time(mjd_tai: float, exposure_time_s: float) -> int:
    """Visit id for files without one: 10-s ticks from 2000-01-01 TAI to the exposure start."""
    if not math.isfinite(mjd_tai):
        return 0
    start_s = (mjd_tai - _VISIT_EPOCH_MJD) * 86400.0 - (exposure_time_s / 2.0 if math.isfinite(exposure_time_s) else 0.0)
    # The 1-ms guard keeps a start exactly on a tick from falling into the previous one by round-off.
    return int(math.floor(start_s / _VISIT_TICK_S + 1e-4))


#: Keywords of the observatory's (longitude, latitude, elevation), the FITS standard's first.
_SITE_KEYS = (("OBSGEO-L", "OBSGEO-B", "OBSGEO-H"), ("OBS-LONG", "OBS-LAT", "OBS-ELEV"),
              ("LONGITUD", "LATITUDE", "HEIGHT"), ("SITELONG", "SITELAT", "SITEELEV"),
              ("LONG-OBS", "LAT-OBS", "ALT-OBS"))
_WEST = re.compile(r"\bW(est)?\b|degrees?\s*W\b", re.IGNORECASE)
_EAST = re.compile(r"\bE(ast)?\b|degrees?\s*E\b", re.IGNORECASE)
#: A comment stating a sign convention ("W < 0", "West negative") names a direction without
#: saying which way the value counts: undecided, like no comment.
_SIGN_RULE = re.compile(r"negative|positive|[<>]", re.IGNORECASE)
_UNKNOWN_SITE = (math.nan, math.nan, math.nan)
_SITE_FIX = f"pass {_override_hint({'OBSGEO-L': '<east longitude, deg>', 'OBSGEO-B': '<deg>'})}"


def _angle_deg(value: Any) -> float:
    """Degrees from a number or a sexagesimal text ('111:36.0', '-30 14 40.7')."""
    if isinstance(value, int | float):
        return float(value)
    return float(Angle(str(value).strip(), unit=u.deg).degree)


def _site(h: _Header, ra_deg: float, dec_deg: float, mjd_tai: float, airmass: float) -> tuple[float, float, float]:
    """The observatory's (east longitude, latitude, elevation): degrees, degrees, metres; NaN if unknown.

    The first keyword set of :data:`_SITE_KEYS` present is read, else the geocentric
    ``OBSGEO-X/Y/Z``. Observatories disagree on the sign of longitude (the Bok telescope's
    ``SITELONG`` says "degrees W"; some Mosaic headers give a west-positive ``OBS-LONG`` without
    saying so, others an "east longitude"): ``OBSGEO-L`` is east by the FITS standard; for the
    others a card comment saying west or east decides, and if it says neither (or states a
    sign rule, or the value is an override), the sign whose zenith distance agrees with the
    header's ``AIRMASS`` (east without one).
    """
    for lon_key, lat_key, height_key in _SITE_KEYS:
        lon_value, lat_value = h.first(lon_key), h.first(lat_key)
        if lon_value is None or lat_value is None:
            continue
        try:
            lon, lat = _angle_deg(lon_value), _angle_deg(lat_value)
            height = float(h.first(height_key) or 0.0)
        except (TypeError, ValueError, u.UnitsError):
            raise IngestError(h.path, f"{lon_key}/{lat_key}/{height_key} = {lon_value!r}/{lat_value!r}/"
                              f"{h.first(height_key)!r} is not a site (degrees, degrees, metres)", _SITE_FIX) from None
        if not (-90.0 <= lat <= 90.0 and -360.0 <= lon <= 360.0):
            raise IngestError(h.path, f"{lon_key} = {lon}, {lat_key} = {lat} is not a place on Earth", _SITE_FIX)
        if lon_key == "OBSGEO-L":
            return lon, lat, height
        comment = str(h.header.comments[lon_key]) if lon_key in h.header else ""
        west, east = bool(_WEST.search(comment)), bool(_EAST.search(comment))
        if west != east and not _SIGN_RULE.search(comment):
            return (-lon if west else lon), lat, height
        if math.isfinite(airmass) and airmass >= 1.0:
            zd = math.degrees(math.acos(1.0 / airmass))
            if (abs(zenith_distance_deg(ra_deg, dec_deg, mjd_tai, -lon, lat) - zd)
                    < abs(zenith_distance_deg(ra_deg, dec_deg, mjd_tai, lon, lat) - zd)):
                return -lon, lat, height
        return lon, lat, height
    xyz = [h.first(k) for k in ("OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z")]
    if all(v is not None for v in xyz):
        try:
            geo = EarthLocation.from_geocentric(*(float(v) for v in xyz), unit=u.m).to_geodetic()
        except (TypeError, ValueError):
            return _UNKNOWN_SITE
        return float(geo.lon.degree), float(geo.lat.degree), float(geo.height.to_value(u.m))
    return _UNKNOWN_SITE


def _detector_id(h: _Header) -> int:
    """``DETECTOR``, else ``CCDNUM``, the first that is an integer (DECam's ``DETECTOR`` is a serial); 0 if neither."""
    values = {k: h.first(k) for k in ("DETECTOR", "CCDNUM") if h.first(k) is not None}
    for value in values.values():
        try:
            return int(value)
        except (TypeError, ValueError):
            continue
    if not values:
        return 0
    shown = ", ".join(f"{k} = {v!r}" for k, v in values.items())
    raise IngestError(h.path, f"no integer detector id ({shown})", f"pass {_override_hint({'DETECTOR': '<int>'})}")


def _per_amplifier_mean(h: _Header, key: str, whole: tuple[str, ...]) -> float | None:
    """Mean of ``<key>A``, ``<key>B``, … (DECam's two amplifiers) when none of the ``whole``-detector keys is given."""
    if h.first(*whole) is not None:
        return None
    values = []
    for suffix in "ABCD":
        v = h.first(key + suffix)
        if v is None:
            break
        try:
            values.append(float(v))
        except (TypeError, ValueError):
            return None
    return float(np.mean(values)) if len(values) >= 2 else None


def _infos(h: _Header, *, instrument: str | None, wcs: WCS, shape: tuple[int, int],
           exposure_time_s: float, mjd_tai: float) -> tuple[VisitInfo, DetectorInfo]:
    physical_filter = h.text("FILTER", meaning="physical filter", example="'r'")
    band = h.text("BAND", meaning="band", example="'r'", required=False) or _band_from_filter(physical_filter)
    name = instrument or h.text("INSTRUME", meaning="instrument", example="'mycam'", required=False) or "unknown"
    visit_value = h.first("VISIT", "EXPID")
    if visit_value is None and str(h.first("OBJECT") or "").strip().isdigit():
        visit_value = h.first("OBJECT")
    if visit_value is None:
        visit = _visit_from_time(mjd_tai, exposure_time_s)
    else:
        try:
            visit = int(visit_value)
        except (TypeError, ValueError):
            raise IngestError(h.path, f"VISIT/EXPID = {visit_value!r} is not an integer",
                              f"pass {_override_hint({'VISIT': '<int>'})}") from None
    det_id = _detector_id(h)
    ny, nx = shape
    if h.first("BORE-RA") is not None and h.first("BORE-DEC") is not None:
        bore_ra, bore_dec = float(h.first("BORE-RA")), float(h.first("BORE-DEC"))
    else:
        # No boresight: the detector centre stands in for it (single-detector cameras).
        ra_c, dec_c = wcs.all_pix2world((nx - 1) / 2.0, (ny - 1) / 2.0, 0)
        bore_ra, bore_dec = float(ra_c), float(dec_c)
    rot = h.first("ROTANGLE")
    rotation = float(rot) if rot is not None else _rotation_angle_deg(wcs)
    airmass = h.number("AIRMASS", meaning="airmass", example="1.2", required=False)
    visit_info = VisitInfo(
        visit=visit, exposure_time_s=exposure_time_s, mjd_tai=mjd_tai, band=band, physical_filter=physical_filter,
        boresight_ra_deg=bore_ra, boresight_dec_deg=bore_dec, rotation_angle_deg=rotation, airmass=airmass,
        instrument=_instrument_key(name),
        observatory_lon_lat_height=_site(h, bore_ra, bore_dec, mjd_tai, airmass),
    )
    gain = _per_amplifier_mean(h, "GAIN", ("GAIN",))
    if gain is None:
        gain = h.number("GAIN", meaning="gain, e-/count", example="1.5")
    read_noise = _per_amplifier_mean(h, "RDNOISE", ("RDNOISE", "READNOIS"))
    if read_noise is None:
        read_noise = h.number("RDNOISE", "READNOIS", meaning="read noise, e-", example="5.0")
    saturation = h.number("SATURATE", meaning="saturation level, counts", example="60000")
    detector = DetectorInfo(id=det_id, name=str(h.first("DETNAME", "CCDNAME") or "").strip(),
                            gain_e_per_count=gain, read_noise_e=read_noise, saturation_count=saturation)
    return visit_info, detector


def _noise_model(image: npt.NDArray[np.float32], detector: DetectorInfo
                 ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint32], npt.NDArray[np.float32]]:
    """Image with NaN set to 0, mask (SAT, NO_DATA) and Poisson + read-noise variance in counts²."""
    gain = detector.gain_e_per_count
    read_term = (detector.read_noise_e / gain) ** 2
    no_data = ~np.isfinite(image)
    clean = np.where(no_data, np.float32(0.0), image).astype(np.float32)
    variance = (np.maximum(clean, 0.0) / gain + read_term).astype(np.float32)
    mask = np.zeros(image.shape, dtype=MASK_DTYPE)
    mask[clean >= detector.saturation_count] |= MASK_DTYPE(int(MaskPlane.SAT))
    mask[no_data] |= MASK_DTYPE(int(MaskPlane.NO_DATA))
    return clean, mask, variance


def _apply_overrides_to_exposure(exposure: Exposure, overrides: Mapping[str, Any], instrument: str | None,
                                 path: str) -> Exposure:
    """Overrides for a file in our layout with a lossless ``METADATA`` extension."""
    visit_fields = {"VISIT": ("visit", int), "EXPTIME": ("exposure_time_s", float), "FILTER": ("physical_filter", str),
                    "BAND": ("band", str), "AIRMASS": ("airmass", float), "INSTRUME": ("instrument", str),
                    "BORE-RA": ("boresight_ra_deg", float), "BORE-DEC": ("boresight_dec_deg", float),
                    "ROTANGLE": ("rotation_angle_deg", float)}
    det_fields = {"DETECTOR": ("id", int), "DETNAME": ("name", str), "GAIN": ("gain_e_per_count", float),
                  "RDNOISE": ("read_noise_e", float), "SATURATE": ("saturation_count", float)}
    vi = exposure.visit_info.to_dict()
    det = exposure.detector.to_dict()
    for key, value in overrides.items():
        k = str(key).upper()
        try:
            if k in visit_fields:
                vi[visit_fields[k][0]] = visit_fields[k][1](value)
            elif k in det_fields:
                det[det_fields[k][0]] = det_fields[k][1](value)
        except (TypeError, ValueError):
            raise IngestError(path, f"override {k}={value!r} has the wrong type",
                              f"pass a {visit_fields.get(k, det_fields.get(k, ('', str)))[1].__name__}") from None
    if instrument:
        vi["instrument"] = instrument
    vi["instrument"] = _instrument_key(str(vi["instrument"]))
    return exposure.replace(visit_info=VisitInfo.from_dict(vi), detector=DetectorInfo.from_dict(det))


def _first_image_hdu(hdul: fits.HDUList) -> int | None:
    for i, hdu in enumerate(hdul):
        if isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU) and hdu.header.get("NAXIS", 0) == 2:
            return i
    return None


def read_raw_file(path: str, *, instrument: str | None = None, overrides: Mapping[str, Any] | None = None,
                  snap_keyword: str = "SNAP") -> RawFile:
    """Read one input file into an :class:`Exposure` (see the module docstring for the rules).

    Parameters
    ----------
    path
        Local path or fsspec URL of a FITS file.
    instrument
        Instrument name; defaults to ``INSTRUME`` (else ``unknown``).
    overrides
        Header keyword → value, applied before reading.
    snap_keyword
        Keyword holding the snap index (0 or 1), if the files carry one.

    Raises
    ------
    IngestError
        The file cannot be read or lacks something; the message names the fix.
    """
    overrides = dict(overrides or {})
    try:
        with fsspec.open(str(path), "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        raise IngestError(str(path), f"cannot read the file ({exc})", "check the path and permissions") from None
    try:
        pixels = _decompressed(data)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise IngestError(str(path), f"the file looks gzip/bzip2-compressed but does not decompress ({exc})",
                          "check that it was copied whole") from None
    try:
        with fits.open(io.BytesIO(pixels), memmap=False) as hdul:
            # Cameras write slightly non-standard headers: fix what astropy can, quietly.
            hdul.verify("silentfix+ignore")
            return _read_hdul(hdul, str(path), data, instrument, overrides, snap_keyword)
    except IngestError:
        raise
    except (OSError, ValueError, TypeError, KeyError, DatasetError) as exc:
        raise IngestError(str(path), f"not a usable FITS file ({type(exc).__name__}: {exc})",
                          "check that it is a FITS image with a 2-D array") from None


def _decompressed(data: bytes) -> bytes:
    """The FITS bytes of a whole-file gzip (``.fits.gz``) or bzip2 (``.fits.bz2``) file; others as they are.

    Tile-compressed files (``.fz``) are FITS already and are read by astropy.
    """
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    return data


def _read_hdul(hdul: fits.HDUList, path: str, data: bytes, instrument: str | None,
               overrides: Mapping[str, Any], snap_keyword: str) -> RawFile:
    sha = hashlib.sha256(data).hexdigest()
    names = {str(h.header.get("EXTNAME", "")).upper() for h in hdul[1:]}
    layered = {"IMAGE", "MASK", "VARIANCE"} <= names
    snap_key = _long_key(snap_keyword.upper())
    if layered and "METADATA" in names:
        exposure = _apply_overrides_to_exposure(exposure_from_hdulist(hdul), overrides, instrument, path)
        if exposure.wcs is None:  # calibration needs one to load reference stars: refuse it here
            raise IngestError(path, "no celestial WCS in the IMAGE header (CTYPE1/2, CRVAL1/2, CRPIX1/2, CD or PC)",
                              "solve the field (e.g. astrometry.net) and add its WCS keywords to the IMAGE header")
        h = _Header(hdul[0].header, overrides, path)
        return RawFile(path, exposure, _snap(h, snap_key), sha)
    if layered:
        by_name = {str(hdu.header.get("EXTNAME", "")).upper(): hdu for hdu in hdul[1:]}
        merged = hdul[0].header.copy()
        merged.extend(by_name["IMAGE"].header, update=True, strip=True)
        image = np.asarray(by_name["IMAGE"].data, dtype=np.float32)
        mask = read_mask_hdu(by_name["MASK"])
        variance = np.asarray(by_name["VARIANCE"].data, dtype=np.float32)
    else:
        index = _first_image_hdu(hdul)
        if index is None:
            raise IngestError(path, "no 2-D image in any HDU", "ingest a FITS image (NAXIS = 2)")
        merged = hdul[0].header.copy()
        if index > 0:
            merged.extend(hdul[index].header, update=True, strip=True)
        image = np.asarray(hdul[index].data, dtype=np.float32)
        mask = variance = None
    h = _Header(merged, overrides, path)
    unit = str(h.first("BUNIT") or "").strip().lower()
    if variance is None and unit not in _COUNT_UNITS:
        raise IngestError(path, f"BUNIT = {unit!r}: the variance is computed from counts and this image is not "
                          f"in counts", "convert the image to counts, or pass " + _override_hint({"BUNIT": "'adu'"}) + " if it is")
    exposure_time = h.number("EXPTIME", meaning="exposure time, s", example="30.0")
    mjd_tai = _mid_exposure_mjd_tai(h, exposure_time)
    wcs = wcs_from_header(h.header)
    if wcs is None:
        h.raise_if_missing()  # report missing keywords first: they are the commoner problem
        raise IngestError(path, "no celestial WCS in the header (CTYPE1/2, CRVAL1/2, CRPIX1/2, CD or PC)",
                          "solve the field (e.g. astrometry.net) and add its WCS keywords, or pass them: "
                          + _override_hint({"CTYPE1": "'RA---TAN'", "CTYPE2": "'DEC--TAN'", "CRVAL1": "...", "...": "..."}))
    visit_info, detector = _infos(h, instrument=instrument, wcs=wcs, shape=image.shape,  # type: ignore[arg-type]
                                  exposure_time_s=exposure_time, mjd_tai=mjd_tai)
    h.raise_if_missing()
    if not (detector.gain_e_per_count > 0):
        raise IngestError(path, f"GAIN = {detector.gain_e_per_count} must be positive",
                          f"pass {_override_hint({'GAIN': '<e-/count>'})}")
    if mask is None or variance is None:
        image, mask, variance = _noise_model(image, detector)
    origin = (-int(h.first("LTV1") or 0), -int(h.first("LTV2") or 0))
    metadata: dict[str, Any] = {"ingest.source": path, "ingest.sha256": sha,
                                "ingest.object": str(h.first("OBJECT") or "")}
    seeing = _seeing_fwhm_pix(h, wcs)
    if seeing is not None:
        metadata["seeing_fwhm_pix"] = seeing  # for calibrate's psf_fallback='seeing' on star-less frames
    exposure = Exposure(image=image, mask=mask, variance=variance, visit_info=visit_info, detector=detector,
                        wcs=wcs, origin=origin, metadata=metadata)
    return RawFile(path, exposure, _snap(h, snap_key), sha)


#: Header keywords of the seeing FWHM, in pixels (NOIRLab CP) or arcsec (others), most specific first.
SEEING_KEYS_PIX = ("FWHM",)
SEEING_KEYS_ARCSEC = ("SEEING", "L1FWHM", "FWHM_ARC")


def _seeing_fwhm_pix(h: _Header, wcs: Any) -> float | None:
    """The header's seeing FWHM in pixels (arcsec keywords through the WCS pixel scale), or None."""
    for keys, in_arcsec in ((SEEING_KEYS_PIX, False), (SEEING_KEYS_ARCSEC, True)):
        try:
            v = float(h.first(*keys))
        except (TypeError, ValueError):
            continue
        if not (math.isfinite(v) and v > 0):
            continue
        if not in_arcsec:
            return v
        scale_arcsec = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0
        return v / scale_arcsec if scale_arcsec > 0 else None
    return None


def _snap(h: _Header, snap_key: str) -> int | None:
    key = snap_key.replace("HIERARCH ", "")
    value = h.first(key)
    if value is None:
        return None
    try:
        snap = int(value)
    except (TypeError, ValueError):
        raise IngestError(h.path, f"{key} = {value!r} is not an integer", f"pass {_override_hint({key: '0'})}") from None
    if snap not in (0, 1):
        raise IngestError(h.path, f"{key} = {snap}: a visit has snaps 0 and 1 only",
                          f"pass {_override_hint({key: '0'})} or {key}=1")
    return snap


def _assign_snaps(group: Sequence[RawFile]) -> list[tuple[RawFile, int]]:
    """Snap index for each file of one (instrument, visit, detector); raises IngestError on conflicts."""
    first = group[0]
    vi, det = first.exposure.visit_info, first.exposure.detector
    label = f"visit {vi.visit} detector {det.id} of {vi.instrument}"
    others = ", ".join(r.path for r in group)
    if len(group) > 2:
        raise IngestError(first.path, f"{len(group)} files are {label} ({others}); a visit has at most two snaps",
                          "give the files distinct VISIT values (in the headers or with --set VISIT=<int>) or ingest "
                          "them in separate calls")
    if len(group) == 2:
        a, b = group[0].exposure, group[1].exposure
        if a.shape != b.shape or a.origin != b.origin:
            raise IngestError(first.path, f"the two snaps of {label} ({others}) differ in shape "
                              f"({a.shape} vs {b.shape}) or origin ({a.origin} vs {b.origin})",
                              "these are not snaps of one visit: give them different VISIT values (--set VISIT=<int>)")
        if a.visit_info.band != b.visit_info.band:
            raise IngestError(first.path, f"the two snaps of {label} ({others}) have bands "
                              f"{a.visit_info.band!r} and {b.visit_info.band!r}",
                              "these are not snaps of one visit: give them different VISIT values (--set VISIT=<int>)")
    snaps = [r.snap for r in group]
    if all(s is not None for s in snaps):
        if len(set(snaps)) != len(snaps):
            raise IngestError(first.path, f"files {others} of {label} carry the same snap number {snaps[0]}",
                              "fix the SNAP keywords or pass different VISIT values (--set VISIT=<int>)")
        return [(r, int(r.snap)) for r in group]  # type: ignore[arg-type]
    if len(group) == 2 and any(s is not None for s in snaps):
        raise IngestError(first.path, f"only one of {others} ({label}) has a snap keyword",
                          "set the SNAP keyword on both files or on neither")
    ordered = sorted(group, key=lambda r: (r.exposure.visit_info.mjd_tai, r.path))
    return [(r, i) for i, r in enumerate(ordered)]


def _new_snaps(store: ArtifactStore, assigned: list[tuple[RawFile, int]], *, run: str, instrument: str,
               visit: int, detector: int) -> tuple[list[tuple[RawFile, int]], list[DatasetRef]]:
    """Split ``assigned`` into snaps to write and references to files already stored.

    A file already stored as a snap of this visit (same SHA-256, whatever number this call gave
    it) is not written again: re-ingesting is idempotent and recomputes nothing downstream.
    Another file is refused where its snap number is taken: snaps are numbered by time only among
    the files of one call, so a visit's second snap ingested in a later call without a SNAP
    keyword would otherwise become snap 0 again and silently replace the first.
    """
    where = {"run": run, "instrument": instrument, "visit": visit, "detector": detector}
    stored: dict[int, dict[str, Any]] = {}
    for ref in store.query("post_isr_image", **where):
        snap = int(ref.snap or 0)
        stored[snap] = store.provenance("post_isr_image", **where, snap=snap)
    by_sha = {prov.get("source_sha256"): snap for snap, prov in stored.items()}
    label = f"visit {visit} detector {detector} of {instrument} (run {run!r})"
    new: list[tuple[RawFile, int]] = []
    existing: list[DatasetRef] = []
    for raw, snap in assigned:
        if raw.sha256 in by_sha:
            existing.append(store.ref("post_isr_image", **where, snap=by_sha[raw.sha256]))
        elif snap in stored:
            raise IngestError(raw.path, f"{label} already has snap {snap}, from "
                              f"{stored[snap].get('ingested_from', 'another file')}",
                              "ingest a visit's snaps in one call (they are numbered by time), set their SNAP "
                              "keywords, or delete the stored snap first")
        else:
            new.append((raw, snap))
    return new, existing


def ingest_files(store: ArtifactStore, paths: Iterable[str], *, run: str = "raw", instrument: str | None = None,
                 overrides: Mapping[str, Any] | None = None, snap_keyword: str = "SNAP") -> IngestReport:
    """Read FITS files and store them as ``post_isr_image`` datasets.

    Parameters
    ----------
    store
        Artifact store to write into.
    paths
        Local paths or fsspec URLs.
    run
        Collection to write into.
    instrument
        Instrument name for every file (default: each file's ``INSTRUME``).
    overrides
        Header keyword → value for every file (e.g. ``{"GAIN": 1.6}``).
    snap_keyword
        Header keyword numbering the snaps of a visit.

    Returns
    -------
    IngestReport
        The references written and the files that failed, with the fix for each.
    """
    failures: list[tuple[str, str]] = []
    raws: list[RawFile] = []
    for path in paths:
        try:
            raws.append(read_raw_file(str(path), instrument=instrument, overrides=overrides,
                                      snap_keyword=snap_keyword))
        except IngestError as exc:
            failures.append((exc.path, str(exc)))
    groups: dict[tuple[str, int, int], list[RawFile]] = {}
    for raw in raws:
        vi = raw.exposure.visit_info
        groups.setdefault((vi.instrument, vi.visit, raw.exposure.detector.id), []).append(raw)
    refs: list[DatasetRef] = []
    for (inst, visit, det), group in sorted(groups.items()):
        try:
            assigned = _assign_snaps(group)
        except IngestError as exc:
            failures.extend((r.path, f"{r.path}: {exc.problem}. {exc.fix}") for r in group)
            continue
        try:
            assigned, stored_refs = _new_snaps(store, assigned, run=run, instrument=inst, visit=visit, detector=det)
        except IngestError as exc:
            failures.extend((r.path, str(exc)) for r in group)
            continue
        refs.extend(stored_refs)
        for raw, snap in assigned:
            try:
                refs.append(store.put("post_isr_image", raw.exposure, run=run, instrument=inst, visit=visit,
                                      detector=det, snap=snap,
                                      provenance={"ingested_from": raw.path, "source_sha256": raw.sha256,
                                                  "band": raw.exposure.visit_info.band}))
            except DatasetError as exc:
                failures.append((raw.path, str(exc)))
    return IngestReport(tuple(refs), tuple(failures))
