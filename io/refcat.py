"""Reference catalogues partitioned on the sky by HEALPix pixel.

Layout under a store root::

    refcats/{name}/manifest.json
    refcats/{name}/nside{N}/{pixel}.parquet      (nested HEALPix index, ICRS)

The manifest (written last, so a half-written catalogue is never loaded)
holds the name, ``nside``, bands, columns, number of stars, the pixels
present, the range of catalogue epochs and the largest proper motion, which
widens the cone when positions are moved to another epoch.

Every catalogue holds the columns of the "Reference catalogue table" in
``docs/architecture.md``: ``id``, ``ra``, ``dec`` (deg), ``ra_err``,
``dec_err`` (mas), ``pm_ra`` (mas/yr, includes cos δ), ``pm_dec`` (mas/yr),
``pm_ra_err``, ``pm_dec_err``, ``parallax``, ``parallax_err`` (mas),
``epoch`` (Julian year) and ``<band>_flux``, ``<band>_fluxErr`` (nJy).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import astropy.units as u
import numpy as np
import numpy.typing as npt
from astropy.table import MaskedColumn, Table, vstack
from astropy.time import Time
from astropy_healpix import HEALPix

from ..errors import ConfigError, DatasetError
from ..photo_calib import AB_MAG_OF_ONE_NJY
from .formats import _json_dumps, _json_loads, table_from_parquet_bytes, table_to_parquet_bytes
from .store import ArtifactStore

__all__ = [
    "REFCAT_COLUMNS",
    "RefcatInfo",
    "epoch_year_from_mjd",
    "load_refcat",
    "propagate_positions",
    "read_refcat_info",
    "refcat_from_table",
    "write_refcat",
]

#: Non-flux columns of a reference catalogue, with their units.
REFCAT_COLUMNS: Mapping[str, u.UnitBase | None] = {
    "id": None,
    "ra": u.deg,
    "dec": u.deg,
    "ra_err": u.mas,
    "dec_err": u.mas,
    "pm_ra": u.mas / u.yr,
    "pm_dec": u.mas / u.yr,
    "pm_ra_err": u.mas / u.yr,
    "pm_dec_err": u.mas / u.yr,
    "parallax": u.mas,
    "parallax_err": u.mas,
    "epoch": u.yr,
}

_NJY = u.nJy
_MAS_PER_DEG = 3.6e6


@dataclass(frozen=True)
class RefcatInfo:
    """What :func:`write_refcat` wrote (the content of ``manifest.json``)."""

    name: str
    nside: int
    bands: tuple[str, ...]
    columns: tuple[str, ...]
    n_stars: int
    pixels: tuple[int, ...]
    epoch_min_year: float
    epoch_max_year: float
    max_pm_mas_per_yr: float
    #: SHA-256 of the shards' bytes in pixel order: a re-ingested catalogue with other contents has
    #: another checksum (calibrations keyed on it are recomputed). Empty in manifests written before it.
    checksum: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "nside": self.nside, "bands": list(self.bands), "columns": list(self.columns),
                "n_stars": self.n_stars, "pixels": list(self.pixels), "epoch_min_year": self.epoch_min_year,
                "epoch_max_year": self.epoch_max_year, "max_pm_mas_per_yr": self.max_pm_mas_per_yr,
                "healpix_order": "nested", "frame": "icrs", "checksum": self.checksum}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RefcatInfo:
        return cls(str(d["name"]), int(d["nside"]), tuple(d["bands"]), tuple(d["columns"]), int(d["n_stars"]),
                   tuple(int(p) for p in d["pixels"]), float(d["epoch_min_year"]), float(d["epoch_max_year"]),
                   float(d["max_pm_mas_per_yr"]), str(d.get("checksum", "")))


def epoch_year_from_mjd(mjd: float, *, scale: str = "tai") -> float:
    """Julian year (TT, e.g. 2016.0) of an MJD in time ``scale``, for ``load_refcat(epoch_year=...)``."""
    return float(Time(mjd, format="mjd", scale=scale).tt.jyear)


def _as_store(store_or_root: ArtifactStore | str) -> ArtifactStore:
    return store_or_root if isinstance(store_or_root, ArtifactStore) else ArtifactStore(str(store_or_root))


def _bands_of(table: Table) -> tuple[str, ...]:
    return tuple(c[: -len("_flux")] for c in table.colnames if c.endswith("_flux"))


def _check_name(name: str) -> None:
    if not name or not all(ch.isalnum() or ch in "_-." for ch in name):
        raise ConfigError(f"reference catalogue name {name!r} must be letters, digits and _-. only")


def _standardize(table: Table, name: str) -> Table:
    """Check the required columns, fill optional ones, set units and dtypes."""
    missing = [c for c in ("id", "ra", "dec", "epoch") if c not in table.colnames]
    if missing:
        raise DatasetError(f"reference catalogue {name!r} lacks columns {missing}; build it with "
                           f"refcat_from_table(...) or add them")
    bands = _bands_of(table)
    if not bands:
        raise DatasetError(f"reference catalogue {name!r} has no '<band>_flux' column (nJy)")
    n = len(table)
    out = Table()
    out["id"] = np.asarray(table["id"], dtype=np.int64)
    values = {col: (_values(table[col], unit) if col in table.colnames else np.full(n, np.nan))
              for col, unit in REFCAT_COLUMNS.items() if col != "id"}
    for col, arr in _zero_missing_motions(values).items():
        out[col] = np.asarray(arr, dtype=np.float64)
        out[col].unit = REFCAT_COLUMNS[col]
    for band in bands:
        for suffix in ("_flux", "_fluxErr"):
            col = band + suffix
            values = _values(table[col], _NJY) if col in table.colnames else np.full(n, np.nan)
            out[col] = np.asarray(values, dtype=np.float64)
            out[col].unit = _NJY
    if not np.all(np.isfinite(out["ra"])) or not np.all(np.isfinite(out["dec"])):
        raise DatasetError(f"reference catalogue {name!r} has non-finite ra/dec; drop those rows first")
    if not np.all(np.isfinite(out["epoch"])):
        raise DatasetError(f"reference catalogue {name!r} has non-finite epochs; set epoch (Julian year)")
    return out


def _zero_missing_motions(values: dict[str, npt.NDArray[np.float64]]) -> dict[str, npt.NDArray[np.float64]]:
    """Missing (absent, masked or NaN) motions become 0 with NaN errors, as the loader promises."""
    out = dict(values)
    for col in ("pm_ra", "pm_dec", "parallax"):
        bad = ~np.isfinite(out[col])
        out[col] = np.where(bad, 0.0, out[col])
        out[col + "_err"] = np.where(bad, np.nan, out[col + "_err"])
    return out


def _values(col: Any, unit: u.UnitBase | None) -> npt.NDArray[np.float64]:
    """Column values as float in ``unit`` (unitless columns are taken to be in ``unit``); masked → NaN."""
    data = col.filled(np.nan) if isinstance(col, MaskedColumn) or np.ma.isMaskedArray(col) else col
    src_unit = getattr(col, "unit", None)
    arr = np.asarray(data, dtype=np.float64)
    if unit is None or src_unit is None or src_unit == u.dimensionless_unscaled:
        return arr
    if src_unit == u.yr and unit == u.yr:
        return arr
    return np.asarray((arr * src_unit).to_value(unit), dtype=np.float64)


def write_refcat(store_or_root: ArtifactStore | str, name: str, table: Table, *, nside: int = 32) -> RefcatInfo:
    """Partition a reference catalogue by HEALPix pixel and write it under ``refcats/{name}``.

    Parameters
    ----------
    store_or_root
        Artifact store or its root path/URL.
    name
        Catalogue name (e.g. ``gaia_dr3``).
    table
        Catalogue in the standard columns (see module docstring); optional
        columns that are absent are filled (motions 0, errors NaN).
    nside
        HEALPix resolution (power of two); 32 gives 1.8° pixels.

    Returns
    -------
    RefcatInfo
        The manifest written.

    Notes
    -----
    An existing catalogue of the same name is replaced: its manifest is
    removed first and written last, so readers never load a mix.
    """
    _check_name(name)
    if nside < 1 or nside & (nside - 1):
        raise ConfigError(f"nside must be a power of two, got {nside}")
    store = _as_store(store_or_root)
    std = _standardize(table, name)
    hp = HEALPix(nside=nside, order="nested")
    pix = np.asarray(hp.lonlat_to_healpix(np.asarray(std["ra"]) * u.deg, np.asarray(std["dec"]) * u.deg),
                     dtype=np.int64)
    base = f"refcats/{name}"
    store.delete_path(f"{base}/manifest.json")
    store.delete_path(base, recursive=True)
    order = np.argsort(pix, kind="stable")
    pix_sorted = pix[order]
    pixels, starts = np.unique(pix_sorted, return_index=True)
    bounds = [*starts.tolist(), len(order)]
    digest = hashlib.sha256()
    for k, p in enumerate(pixels.tolist()):
        part = std[order[bounds[k]:bounds[k + 1]]]
        data = table_to_parquet_bytes(part)
        digest.update(f"{p}:{len(data)}:".encode())
        digest.update(data)
        store.put_bytes(f"{base}/nside{nside}/{p}.parquet", data)
    pm = np.hypot(np.asarray(std["pm_ra"]), np.asarray(std["pm_dec"]))
    info = RefcatInfo(
        name=name, nside=nside, bands=_bands_of(std), columns=tuple(std.colnames), n_stars=len(std),
        pixels=tuple(int(p) for p in pixels), epoch_min_year=float(np.min(std["epoch"])) if len(std) else math.nan,
        epoch_max_year=float(np.max(std["epoch"])) if len(std) else math.nan,
        max_pm_mas_per_yr=float(np.nanmax(pm)) if len(std) and np.any(np.isfinite(pm)) else 0.0,
        checksum=digest.hexdigest(),
    )
    store.put_bytes(f"{base}/manifest.json", _json_dumps(info.to_dict(), indent=1).encode())
    return info


def read_refcat_info(store_or_root: ArtifactStore | str, name: str) -> RefcatInfo:
    """The manifest of catalogue ``name``; raises :class:`DatasetNotFoundError` if it was never written."""
    store = _as_store(store_or_root)
    return RefcatInfo.from_dict(_json_loads(store.get_bytes(f"refcats/{name}/manifest.json")))


def refcat_version(store_or_root: ArtifactStore | str, name: str) -> str:
    """A string that changes whenever catalogue ``name`` is re-written with other contents.

    The manifest's ``checksum`` of the shards; for manifests written before it existed, the
    SHA-256 of the manifest itself. Raises :class:`DatasetNotFoundError` if it was never written.
    """
    store = _as_store(store_or_root)
    raw = store.get_bytes(f"refcats/{name}/manifest.json")
    checksum = RefcatInfo.from_dict(_json_loads(raw)).checksum
    return checksum or "manifest:" + hashlib.sha256(raw).hexdigest()


def _unit_vectors(ra_deg: npt.NDArray[np.float64], dec_deg: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def propagate_positions(table: Table, epoch_year: float) -> Table:
    """Move ``ra``/``dec`` to ``epoch_year`` with the proper motions; grow the position errors.

    Notes
    -----
    The motion is applied along the tangent plane at each star and the
    result renormalised onto the sphere, which is exact for a uniform
    space motion to first order and stays well defined at the poles.
    Parallax is not applied (it needs the observer's position). Position
    errors add ``Δt · pm_err`` in quadrature where the motion error is known.
    """
    out = table.copy()
    ra = np.asarray(table["ra"], float)
    dec = np.asarray(table["dec"], float)
    dt = float(epoch_year) - np.asarray(table["epoch"], float)
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    # Local east and north unit vectors at each star.
    east = np.stack([-np.sin(ra_r), np.cos(ra_r), np.zeros_like(ra_r)])
    north = np.stack([-np.sin(dec_r) * np.cos(ra_r), -np.sin(dec_r) * np.sin(ra_r), np.cos(dec_r)])
    d_east = np.radians(np.asarray(table["pm_ra"], float) * dt / _MAS_PER_DEG)
    d_north = np.radians(np.asarray(table["pm_dec"], float) * dt / _MAS_PER_DEG)
    vec = _unit_vectors(ra, dec) + east * d_east + north * d_north
    vec /= np.linalg.norm(vec, axis=0)
    out["ra"] = np.degrees(np.arctan2(vec[1], vec[0])) % 360.0
    # arctan2 rather than arcsin: arcsin loses digits near the poles.
    out["dec"] = np.degrees(np.arctan2(vec[2], np.hypot(vec[0], vec[1])))
    for pos, pm in (("ra_err", "pm_ra_err"), ("dec_err", "pm_dec_err")):
        pm_err = np.asarray(table[pm], float)
        grown = np.hypot(np.asarray(table[pos], float), dt * pm_err)
        out[pos] = np.where(np.isfinite(pm_err), grown, np.asarray(table[pos], float))
    out["epoch"] = np.full(len(out), float(epoch_year))
    for col in ("ra", "dec", "ra_err", "dec_err", "epoch"):
        out[col].unit = REFCAT_COLUMNS[col]
    return out


def _angular_distance_deg(ra_deg: npt.NDArray[np.float64], dec_deg: npt.NDArray[np.float64],
                          ra0_deg: float, dec0_deg: float) -> npt.NDArray[np.float64]:
    """Great-circle distance by the haversine formula (accurate at small separations)."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    ra0, dec0 = math.radians(ra0_deg), math.radians(dec0_deg)
    h = np.sin((dec - dec0) / 2) ** 2 + np.cos(dec) * math.cos(dec0) * np.sin((ra - ra0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def load_refcat(store_or_root: ArtifactStore | str, name: str, *, ra_deg: float, dec_deg: float,
                radius_deg: float, epoch_year: float | None = None) -> Table:
    """Reference stars within ``radius_deg`` of ``(ra_deg, dec_deg)``, optionally moved to ``epoch_year``.

    Parameters
    ----------
    store_or_root
        Artifact store or its root path/URL.
    name
        Catalogue written by :func:`write_refcat`.
    ra_deg, dec_deg, radius_deg
        Search cone (ICRS, degrees), applied to the positions at ``epoch_year``.
    epoch_year
        Julian year to move positions to (see :func:`epoch_year_from_mjd`);
        ``None`` keeps the catalogue epoch.

    Returns
    -------
    Table
        Standard reference columns; ``epoch`` is the epoch of the returned
        positions; ``meta`` records the catalogue name, cone and epoch.
        Only the HEALPix partitions overlapping the cone are read.
    """
    if not (radius_deg > 0 and math.isfinite(radius_deg)):
        raise ConfigError(f"radius_deg must be positive and finite, got {radius_deg}")
    store = _as_store(store_or_root)
    info = read_refcat_info(store, name)
    margin_deg = 0.0
    if epoch_year is not None and info.n_stars:
        # Stars can move into the cone from outside it: widen the pixel search by the largest motion.
        dt = max(abs(epoch_year - info.epoch_min_year), abs(epoch_year - info.epoch_max_year))
        margin_deg = info.max_pm_mas_per_yr * dt / _MAS_PER_DEG
    hp = HEALPix(nside=info.nside, order="nested")
    wanted = np.asarray(hp.cone_search_lonlat(ra_deg * u.deg, dec_deg * u.deg,
                                              min(radius_deg + margin_deg, 180.0) * u.deg), dtype=np.int64)
    present = set(info.pixels)
    parts = [table_from_parquet_bytes(store.get_bytes(f"refcats/{name}/nside{info.nside}/{p}.parquet"))
             for p in sorted(int(p) for p in wanted) if p in present]
    if parts:
        cat = vstack(parts, join_type="exact", metadata_conflicts="silent") if len(parts) > 1 else parts[0]
    else:
        cat = _empty(info)
    if epoch_year is not None and len(cat):
        cat = propagate_positions(cat, float(epoch_year))
    keep = _angular_distance_deg(np.asarray(cat["ra"], float), np.asarray(cat["dec"], float),
                                 ra_deg, dec_deg) <= radius_deg
    out = cat[keep]
    out.meta = {"refcat": name, "ra_deg": float(ra_deg), "dec_deg": float(dec_deg),
                "radius_deg": float(radius_deg), "epoch_year": None if epoch_year is None else float(epoch_year),
                "nside": info.nside, "n_partitions_read": len(parts)}
    return out


def _empty(info: RefcatInfo) -> Table:
    out = Table()
    for col in info.columns:
        out[col] = np.zeros(0, dtype=np.int64 if col == "id" else np.float64)
        out[col].unit = REFCAT_COLUMNS.get(col, _NJY)
    return out


def refcat_from_table(table: Table, *, column_map: Mapping[str, str], bands: Mapping[str, str],
                      mag_columns: bool = True, mag_err_columns: Mapping[str, str] | None = None,
                      epoch_year: float | None = None, flux_unit: str | u.UnitBase | None = None) -> Table:
    """Convert an arbitrary catalogue (e.g. a Gaia export read from FITS/Parquet/CSV/ECSV) to the standard columns.

    Parameters
    ----------
    table
        Source table.
    column_map
        Standard column → source column, for any of ``id``, ``ra``, ``dec``,
        ``ra_err``, ``dec_err``, ``pm_ra``, ``pm_dec``, ``pm_ra_err``,
        ``pm_dec_err``, ``parallax``, ``parallax_err``, ``epoch``. A standard
        column left out is taken from the source column of the same name, if
        any (the names used are in ``meta["column_map"]`` of the result). Source
        columns with units are converted; unitless ones are taken to be in the
        standard units (deg, mas, mas/yr, Julian year). ``ra`` and ``dec`` are required.
    bands
        Band → source column holding its magnitude (or flux).
    mag_columns
        True: the band columns are AB magnitudes (converted with 1 nJy = AB
        31.4; a column whose unit is a flux is refused); False: fluxes,
        converted from the column's unit, or from ``flux_unit`` if it has none.
    mag_err_columns
        Band → source column of the error: in magnitudes when ``mag_columns``,
        else in the flux's unit.
    epoch_year
        Epoch of all positions when ``column_map`` has no ``epoch``.
    flux_unit
        Unit of flux columns without one (e.g. ``"uJy"``). Without it a unitless
        flux column is refused: taking µJy for nJy would shift every zero point by 7.5 mag.

    Returns
    -------
    Table
        Standard reference catalogue; ``id`` is 1..N when not mapped.

    Raises
    ------
    ConfigError
        A mapped column is absent, a required one is unmapped, or no epoch is given.
    """
    unknown = sorted(set(column_map) - set(REFCAT_COLUMNS))
    if unknown:
        raise ConfigError(f"column_map keys {unknown} are not standard columns {sorted(REFCAT_COLUMNS)}")
    column_map = {**_same_name_columns(table, column_map), **column_map}
    for what, mapping in (("column_map (--column)", column_map), ("bands (--band)", bands),
                          ("mag_err_columns (--band-err)", mag_err_columns or {})):
        absent = sorted(v for v in mapping.values() if v not in table.colnames)
        if absent:
            raise ConfigError(f"{what} names columns {absent} absent from the table (it has {table.colnames})")
    for req in ("ra", "dec"):
        if req not in column_map:
            raise ConfigError(f"the table has no column {req!r}: name the one that holds it (--column {req}=COLUMN, "
                              f"column_map={{{req!r}: 'COLUMN'}} from Python); it has {table.colnames}")
    if "epoch" not in column_map and epoch_year is None:
        raise ConfigError("give epoch_year (Julian year of the positions, e.g. 2016.0 for Gaia DR3) or map 'epoch'")
    if not bands:
        raise ConfigError("name at least one band's magnitude or flux column (--band r=COLUMN, "
                          "bands={'r': 'COLUMN'} from Python)")
    if len(table) == 0:
        raise ConfigError("the table has no rows: nothing to write (is it the right file, or the right HDU?)")
    _check_photometry_units(table, bands, mag_err_columns or {}, mag_columns, flux_unit)
    n = len(table)
    out = Table()
    out["id"] = (np.asarray(table[column_map["id"]], dtype=np.int64) if "id" in column_map
                 else np.arange(1, n + 1, dtype=np.int64))
    values: dict[str, npt.NDArray[np.float64]] = {}
    for col, unit in REFCAT_COLUMNS.items():
        if col == "id":
            continue
        if col in column_map:
            src = table[column_map[col]]
            values[col] = _epoch_values(src) if col == "epoch" else _values(src, unit)
            if col == "epoch":
                ep = values[col][np.isfinite(values[col])]
                if ep.size and not (1900.0 <= ep.min() and ep.max() <= 2100.0):
                    raise ConfigError(f"epoch column {column_map['epoch']!r} gives years {ep.min():g} to {ep.max():g}, "
                                      "not Julian years of an observation; give the column a unit (d for MJD) "
                                      "or leave it out and pass epoch_year (--epoch)")
        elif col == "epoch":
            values[col] = np.full(n, float(epoch_year))  # type: ignore[arg-type]
        else:
            values[col] = np.full(n, np.nan)
    for col, arr in _zero_missing_motions(values).items():
        out[col] = np.asarray(arr, dtype=np.float64)
        out[col].unit = REFCAT_COLUMNS[col]
    for band, src_col in bands.items():
        value = _float_filled(table[src_col])
        err = _float_filled(table[mag_err_columns[band]]) if mag_err_columns and band in mag_err_columns \
            else np.full(n, np.nan)
        if mag_columns:
            flux = 10.0 ** (-0.4 * (value - AB_MAG_OF_ONE_NJY))
            flux_err = flux * err * math.log(10.0) / 2.5
        else:
            flux = _flux_values(table[src_col], flux_unit)
            flux_err = (_flux_values(table[mag_err_columns[band]], flux_unit)
                        if mag_err_columns and band in mag_err_columns else np.full(n, np.nan))
        out[f"{band}_flux"] = flux
        out[f"{band}_flux"].unit = _NJY
        out[f"{band}_fluxErr"] = flux_err
        out[f"{band}_fluxErr"].unit = _NJY
    out.meta["column_map"] = dict(column_map)
    return out


def _same_name_columns(table: Table, column_map: Mapping[str, str]) -> dict[str, str]:
    """Standard columns the table has under our names, taken as they are unless mapped.

    Not ``epoch`` (its unit and scale are too often implicit: map it on purpose, or give
    ``epoch_year``) and not an ``id`` that is not integer (the ids are then 1..N).
    """
    out = {}
    for c in REFCAT_COLUMNS:
        if c in column_map or c not in table.colnames or c == "epoch":
            continue
        if c == "id" and not np.issubdtype(np.asarray(table[c]).dtype, np.integer):
            continue
        out[c] = c
    return out


def _has_unit(col: Any) -> bool:
    unit = getattr(col, "unit", None)
    return unit is not None and unit != u.dimensionless_unscaled


def _check_photometry_units(table: Table, bands: Mapping[str, str], errs: Mapping[str, str], mag_columns: bool,
                            flux_unit: str | u.UnitBase | None) -> None:
    """Refuse band columns whose unit contradicts ``mag_columns``, and unitless fluxes without ``flux_unit``."""
    if flux_unit is not None and mag_columns:
        raise ConfigError("flux_unit (--flux-unit) applies to flux columns, but the band columns are read as "
                          "magnitudes (--magnitudes); give one or the other")
    if flux_unit is not None:
        try:
            unit = u.Unit(flux_unit)
        except ValueError as exc:
            raise ConfigError(f"flux_unit {flux_unit!r} is not a unit astropy knows ({exc})") from None
        if not unit.is_equivalent(_NJY):
            raise ConfigError(f"flux_unit {flux_unit!r} is not a flux density unit (nJy, uJy, Jy, ...)")
    for band, name in {**bands, **{f"{b} error": c for b, c in errs.items()}}.items():
        col = table[name]
        unit = getattr(col, "unit", None)
        if isinstance(unit, u.FunctionUnitBase):  # mag(AB) and the like: magnitudes
            if not mag_columns:
                raise ConfigError(f"column {name!r} ({band}) is in {unit}, magnitudes; pass --magnitudes "
                                  "(mag_columns=True)")
            continue
        if mag_columns and _has_unit(col) and unit.is_equivalent(_NJY):
            raise ConfigError(f"column {name!r} ({band}) is in {unit}, a flux, but the band columns are read as AB "
                              "magnitudes; drop --magnitudes (mag_columns=False)")
        if not mag_columns and _has_unit(col) and not unit.is_equivalent(_NJY):
            raise ConfigError(f"column {name!r} ({band}) is in {unit}, not a flux density; give flux columns, or "
                              "magnitude columns with --magnitudes (mag_columns=True)")
        if not mag_columns and not _has_unit(col) and flux_unit is None:
            raise ConfigError(f"flux column {name!r} ({band}) has no unit; say which with --flux-unit (flux_unit=..., "
                              "e.g. 'nJy', 'uJy', 'Jy'): a wrong guess shifts every zero point by magnitudes")


def _flux_values(col: Any, flux_unit: str | u.UnitBase | None) -> npt.NDArray[np.float64]:
    """Flux column values in nJy, from the column's unit or else ``flux_unit``."""
    if _has_unit(col):
        return _values(col, _NJY)
    return _float_filled(col) * float(u.Unit(flux_unit).to(_NJY))


def _float_filled(col: Any) -> npt.NDArray[np.float64]:
    data = col.filled(np.nan) if np.ma.isMaskedArray(col) else col
    return np.asarray(getattr(data, "value", data), dtype=np.float64)


def _epoch_values(col: Any) -> npt.NDArray[np.float64]:
    """Epochs as Julian years; a column in days (unit d) is read as MJD."""
    arr = _float_filled(col)
    unit = getattr(col, "unit", None)
    if unit is not None and unit.is_equivalent(u.day) and unit != u.yr:
        mjd = np.asarray(arr * unit.to(u.day))
        return np.asarray(Time(mjd, format="mjd", scale="tai").tt.jyear, dtype=np.float64)
    return arr
