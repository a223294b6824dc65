"""Bytes to objects and back: FITS, Parquet and JSON, with astropy and pyarrow only (no pickle).

One :class:`StorageFormat` per storage kind of :mod:`singleframe.io.datasets`:

``exposure``
    Multi-extension FITS in Rubin's layout: an empty PRIMARY HDU carrying the
    visit and detector keywords, then ``IMAGE`` (float32), ``MASK`` (int32,
    ``MP_<PLANE>`` keywords give each plane's bit) and ``VARIANCE``
    (float32), each with the TAN-SIP WCS; the PSF's own extensions
    (``SFPART = 'PSF'``); ``APCORR`` (binary table: field name and JSON of
    :meth:`ChebyshevField.to_dict`); the background (``SFPART =
    'BACKGROUND'``) when attached; and ``METADATA``, a binary table of JSON
    strings that restores the visit info, detector, photometric calibration,
    metadata and summary *losslessly* (header keywords cannot hold NaN, long
    keys or full double precision; they are written for people and other
    tools, and read only when ``METADATA`` is absent).
``background``
    FITS: PRIMARY (``BUNIT``) + one ``BKGDnn`` image per component.
``catalog``
    Parquet in astropy's own layout (``table_meta_yaml`` and
    ``table::len::<col>`` schema metadata), so units, descriptions, table
    meta and masked columns survive, and ``astropy.table.Table.read`` reads
    the file (astropy's reader needs pandas; ours does not).
``json``
    UTF-8 JSON with sorted keys. JSON has no NaN or infinity: non-finite
    floats are written as the *strings* ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"`` and turned back into floats on reading (so a genuine
    string with one of those values also comes back as a float). numpy
    scalars and arrays become numbers and lists; tuples become lists.
    Objects with a ``to_dict()`` method (e.g. ``PhotoCalib``) are written as
    that dict and read back as a dict.
``image``
    FITS primary array; the numpy dtype is restored (booleans are stored as
    uint8 with ``SFDTYPE = 'bool'``).
"""

from __future__ import annotations

import functools
import io
import json
import math
import textwrap
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Column, MaskedColumn, Table
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning

from .. import __version__
from ..background import BackgroundList
from ..errors import DatasetError
from ..exposure import DetectorInfo, Exposure, VisitInfo
from ..fields import ChebyshevField
from ..masks import MASK_DTYPE, plane_bits
from ..photo_calib import PhotoCalib
from ..psf import psf_from_hdus

__all__ = [
    "BytesLike",
    "FORMATS",
    "StorageFormat",
    "background_from_fits_bytes",
    "background_to_fits_bytes",
    "dict_from_json_bytes",
    "dict_to_json_bytes",
    "exposure_from_fits_bytes",
    "exposure_from_hdulist",
    "exposure_to_fits_bytes",
    "exposure_to_hdulist",
    "exposure_unit",
    "get_format",
    "image_from_fits_bytes",
    "image_to_fits_bytes",
    "read_mask_hdu",
    "table_from_parquet_bytes",
    "table_to_parquet_bytes",
    "wcs_from_header",
]

_NONFINITE_TO_STR = {math.inf: "Infinity", -math.inf: "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# ======================================================================================
# JSON
# ======================================================================================
def _to_jsonable(obj: Any) -> Any:
    """Plain JSON types, with non-finite floats as strings (see module docstring)."""
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else _NONFINITE_TO_STR[value]
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_to_jsonable(v) for v in obj.tolist()]
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return _to_jsonable(to_dict())
    raise TypeError(f"cannot write {type(obj).__name__} as JSON; convert it to numbers, strings, lists or dicts")


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, str):
        return _STR_TO_NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def _json_dumps(obj: Any, *, indent: int | None = None) -> str:
    # allow_nan=False guarantees strict JSON that any parser reads.
    return json.dumps(_to_jsonable(obj), sort_keys=True, indent=indent, allow_nan=False)


def _json_loads(text: str | bytes) -> Any:
    return _from_jsonable(json.loads(text))


def dict_to_json_bytes(obj: Mapping[str, Any] | Any) -> bytes:
    """Serialise a dict (or an object with ``to_dict()``) to UTF-8 JSON, sorted keys, NaN as ``"NaN"``."""
    if not isinstance(obj, Mapping) and not callable(getattr(obj, "to_dict", None)):
        raise TypeError(f"json datasets hold a dict, got {type(obj).__name__}")
    return _json_dumps(obj, indent=1).encode("utf-8")


def dict_from_json_bytes(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`dict_to_json_bytes` (``"NaN"``/``"Infinity"`` strings become floats)."""
    value = _json_loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, found {type(value).__name__}")
    return value


# ======================================================================================
# Parquet
# ======================================================================================
def table_to_parquet_bytes(table: Table) -> bytes:
    """Serialise an astropy table to Parquet in astropy's layout (units and meta kept).

    Notes
    -----
    This mirrors ``astropy.io.misc.parquet.write_table_parquet`` but writes
    to memory, which the store needs for atomic writes and object stores.
    """
    from astropy.table import meta, serialize
    from astropy.utils.data_info import serialize_context_as

    if not isinstance(table, Table):
        raise TypeError(f"catalog datasets hold an astropy Table, got {type(table).__name__}")
    with serialize_context_as("parquet"):
        encoded = serialize.represent_mixins_as_columns(table)
    metadata = {"table_meta_yaml": "\n".join(meta.get_yaml_from_table(encoded))}
    arrays = []
    fields = []
    for name in encoded.colnames:
        col = np.asarray(encoded[name])
        dt = col.dtype
        if dt.kind == "U":
            metadata[f"table::len::{name}"] = str(dt.itemsize // 4)
        elif dt.kind == "S":
            metadata[f"table::len::{name}"] = str(dt.itemsize)
        if dt.kind == "O":
            raise TypeError(f"column {name!r} holds Python objects; Parquet needs fixed numeric or string types")
        if col.ndim > 1:
            # Fixed-size lists, as astropy writes multidimensional columns.
            size = int(np.prod(col.shape[1:]))
            arrow_type = pa.list_(pa.from_numpy_dtype(dt.base.type), size)
            arr = pa.FixedSizeListArray.from_arrays(_numpy_to_arrow(col.reshape(len(col), size).ravel()), size)
        else:
            arrow_type = pa.from_numpy_dtype(dt.type)
            arr = _numpy_to_arrow(col)
        fields.append(pa.field(name, arrow_type))
        arrays.append(arr)
    schema = pa.schema(fields, metadata={k.encode(): v.encode() for k, v in metadata.items()})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), sink, version="2.4")
    return bytes(sink.getvalue().to_pybytes())


#: Arrow types of the little-endian numpy dtypes they share a memory layout with.
_ARROW_OF_NUMPY = {np.dtype(f"<{kind}{size}"): arrow for kind, size, arrow in (
    ("i", 1, pa.int8()), ("i", 2, pa.int16()), ("i", 4, pa.int32()), ("i", 8, pa.int64()),
    ("u", 1, pa.uint8()), ("u", 2, pa.uint16()), ("u", 4, pa.uint32()), ("u", 8, pa.uint64()),
    ("f", 2, pa.float16()), ("f", 4, pa.float32()), ("f", 8, pa.float64()))}
_NUMPY_OF_ARROW = {arrow: dtype for dtype, arrow in _ARROW_OF_NUMPY.items()}


def _numpy_to_arrow(values: npt.NDArray[Any]) -> pa.Array:
    """A 1-D numeric, boolean or fixed-width string numpy array as an Arrow array, built from buffers.

    ``pa.array`` asks pandas whether its input is a pandas object, which imports pandas
    (0.2-0.3 s) at the first catalogue a process writes; the buffer route does not.
    Fixed-width strings become UTF-8 (``U``) or binary (``S``) arrays. Other dtypes go
    through ``pa.array``.
    """
    if values.dtype.kind in "US":
        items = [v.encode("utf-8") for v in values.tolist()] if values.dtype.kind == "U" else values.tolist()
        ends = np.cumsum(np.fromiter(map(len, items), np.int64, len(items)))
        if ends.size and ends[-1] > np.iinfo(np.int32).max:  # beyond 32-bit offsets: let pyarrow choose
            return pa.array(values)
        offsets = np.zeros(len(items) + 1, np.int32)
        offsets[1:] = ends
        return pa.Array.from_buffers(pa.string() if values.dtype.kind == "U" else pa.binary(), len(items),
                                     [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(items))])
    if values.dtype == np.bool_:
        bits = np.packbits(np.ascontiguousarray(values), bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    little = values.dtype.newbyteorder("<") if values.dtype.byteorder != "|" else values.dtype
    arrow_type = _ARROW_OF_NUMPY.get(little)
    if arrow_type is None:
        return pa.array(values)
    data = np.ascontiguousarray(values, dtype=little)
    return pa.Array.from_buffers(arrow_type, len(data), [None, pa.py_buffer(data)])


def _arrow_to_numpy(arr: pa.Array) -> npt.NDArray[Any]:
    """Inverse of :func:`_numpy_to_arrow` (a writable copy; null slots keep whatever the buffer holds).

    ``Array.to_numpy`` imports pandas at its first call; numeric and boolean arrays are read
    from their buffers instead. Other types go through ``to_numpy``.
    """
    t = arr.type
    start, stop = arr.offset, arr.offset + len(arr)
    if pa.types.is_boolean(t):
        packed = np.frombuffer(arr.buffers()[1], np.uint8)
        return np.unpackbits(packed, count=stop, bitorder="little")[start:].astype(bool)
    dtype = _NUMPY_OF_ARROW.get(t)
    if dtype is None:
        return np.asarray(arr.to_numpy(zero_copy_only=False))
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=stop)[start:].astype(dtype.newbyteorder("="))


def _arrow_column_to_numpy(chunked: pa.ChunkedArray, strlen: int | None) -> npt.NDArray[Any] | np.ma.MaskedArray:
    arr = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
    t = arr.type
    mask = _arrow_to_numpy(arr.is_null()) if arr.null_count else None
    if pa.types.is_fixed_size_list(t):
        values = _arrow_to_numpy(arr.flatten())
        out: npt.NDArray[Any] = values.reshape(len(arr), t.list_size)
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        # Python objects, not to_numpy or fill_null: both import pandas (0.2-0.3 s).
        kind = "U" if pa.types.is_string(t) or pa.types.is_large_string(t) else "S"
        empty = "" if kind == "U" else b""
        objs = [empty if v is None else v for v in arr.to_pylist()]
        n = strlen if strlen is not None else max((len(v) for v in objs), default=1)
        out = np.array(objs, dtype=f"{kind}{max(n, 1)}")
    else:
        out = _arrow_to_numpy(arr)
    if mask is not None:
        return np.ma.MaskedArray(out, mask=mask)
    return out


@functools.cache
def _libyaml_table_loader() -> Any:
    """astropy's table-header YAML loader on libyaml's parser, or None (then astropy's own parser is used).

    astropy parses the header with PyYAML's pure-Python scanner: 0.2 s for the header of a
    148-column catalogue, twenty times the Parquet read itself. The constructors (units,
    arrays, ``!!omap`` as an ordered dict) are astropy's; only the parsing moves to C. None
    without libyaml, or if astropy no longer has its ``!!omap`` constructor.
    """
    import yaml
    from astropy.io.misc.yaml import AstropyLoader
    from astropy.table import meta as table_meta

    construct_omap = getattr(table_meta, "_construct_odict", None)
    if not getattr(yaml, "__with_libyaml__", False) or construct_omap is None:
        return None

    class TableCLoader(yaml.CSafeLoader):
        yaml_constructors = {**yaml.CSafeLoader.yaml_constructors, **AstropyLoader.yaml_constructors}
        yaml_multi_constructors = {**yaml.CSafeLoader.yaml_multi_constructors,
                                   **AstropyLoader.yaml_multi_constructors}

    TableCLoader.add_constructor("tag:yaml.org,2002:omap", construct_omap)
    return TableCLoader


def _table_header_from_yaml(text: str) -> dict[str, Any]:
    """The header dict of astropy's ``get_header_from_yaml``, parsed by libyaml when it is there."""
    loader = _libyaml_table_loader()
    if loader is None:
        from astropy.table import meta as table_meta

        return dict(table_meta.get_header_from_yaml(text.split("\n")))
    import yaml

    return dict(yaml.load(textwrap.dedent(text), Loader=loader))  # noqa: S506 - a safe loader


def table_from_parquet_bytes(data: bytes) -> Table:
    """Inverse of :func:`table_to_parquet_bytes`; also reads plain Parquet written by other tools."""
    from astropy.table import serialize

    # ParquetFile reads one file without pyarrow.dataset (whose import pulls in pandas: 0.25 s
    # at the first read of a process).
    pa_table = pq.ParquetFile(pa.BufferReader(data)).read()
    md = {k.decode(): v.decode() for k, v in (pa_table.schema.metadata or {}).items()}
    header: dict[str, Any] = {}
    if "table_meta_yaml" in md:
        header = _table_header_from_yaml(md["table_meta_yaml"])
    out = Table(meta=header.get("meta", {}))
    for name in pa_table.column_names:
        strlen = int(md[f"table::len::{name}"]) if f"table::len::{name}" in md else None
        values = _arrow_column_to_numpy(pa_table.column(name), strlen)
        col_cls = MaskedColumn if isinstance(values, np.ma.MaskedArray) else Column
        out.add_column(col_cls(values, name=name))
    for col_info in header.get("datatype", []):
        name = col_info["name"]
        if name in out.colnames:
            for attr in ("unit", "description", "format", "meta"):
                if attr in col_info:
                    setattr(out[name], attr, col_info[attr])
    if "__serialized_columns__" in out.meta:
        # Rebuild masked columns and mixins (e.g. 'a' from 'a' + 'a.mask') as astropy does.
        out = serialize._construct_mixins_from_columns(out)
    return out


# ======================================================================================
# Plain images
# ======================================================================================
def image_to_fits_bytes(array: npt.ArrayLike, header: Mapping[str, Any] | None = None) -> BytesLike:
    """A numpy image as the primary array of a FITS file; the dtype is recorded in ``SFDTYPE``."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"image datasets hold a numpy array, got {type(array).__name__}")
    arr = np.asarray(array)
    hdr = fits.Header()
    for key, value in (header or {}).items():
        hdr[key] = value
    hdr["SFDTYPE"] = (arr.dtype.name, "numpy dtype of the stored array")
    data = arr.astype(np.uint8) if arr.dtype == np.bool_ else arr
    return _hdul_bytes(fits.HDUList([fits.PrimaryHDU(data=data, header=hdr)]))


def image_from_fits_bytes(data: bytes) -> npt.NDArray[Any]:
    """Inverse of :func:`image_to_fits_bytes`."""
    with fits.open(io.BytesIO(data), memmap=False) as hdul:
        hdu = hdul[0]
        arr = np.array(hdu.data)
        dtype = str(hdu.header.get("SFDTYPE", arr.dtype.name))
    return arr.astype(np.dtype(dtype), copy=False)


# ======================================================================================
# Background
# ======================================================================================
def background_to_fits_bytes(background: BackgroundList) -> BytesLike:
    """A background list as FITS: PRIMARY with ``BUNIT`` and one ``BKGDnn`` image per component."""
    if not isinstance(background, BackgroundList):
        raise TypeError(f"background datasets hold a BackgroundList, got {type(background).__name__}")
    primary = fits.PrimaryHDU()
    primary.header["BUNIT"] = background.unit
    primary.header["NBKGD"] = (len(background), "number of background components")
    return _hdul_bytes(fits.HDUList([primary, *background.to_hdus()]))


def background_from_fits_bytes(data: bytes) -> BackgroundList:
    """Inverse of :func:`background_to_fits_bytes`."""
    with fits.open(io.BytesIO(data), memmap=False) as hdul:
        unit = str(hdul[0].header.get("BUNIT", "count"))
        comps = BackgroundList.from_hdus(list(hdul[1:])).components
    return BackgroundList(comps, unit)


# ======================================================================================
# Exposure
# ======================================================================================
#: What the writers return: ``bytes``, or a buffer that hashlib, files and ``bytes()`` take as it is.
BytesLike = bytes | bytearray

#: BITPIX of the numpy dtypes whose pixels are written without scaling (FITS 4.0 §4.4.1.1).
_BITPIX = {np.dtype(np.uint8): 8, np.dtype(np.int16): 16, np.dtype(np.int32): 32, np.dtype(np.int64): 64,
           np.dtype(np.float32): -32, np.dtype(np.float64): -64}
_FITS_BLOCK = 2880


def _plain_pixels(hdu: Any) -> npt.NDArray[Any] | None:
    """The pixels of an image HDU that FITS stores as they are (no BZERO/BSCALE), else ``None``."""
    if not isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU) or not isinstance(hdu.data, np.ndarray):
        return None
    hdr = hdu.header
    data = hdu.data
    bitpix = _BITPIX.get(data.dtype.newbyteorder("="))
    if (bitpix is None or hdr.get("BITPIX") != bitpix
            or float(hdr.get("BZERO", 0.0)) != 0.0 or float(hdr.get("BSCALE", 1.0)) != 1.0):
        return None
    return data


def _padded(n_bytes: int) -> int:
    return -(-n_bytes // _FITS_BLOCK) * _FITS_BLOCK


def _astropy_bytes(hdul: fits.HDUList) -> bytes:
    buf = io.BytesIO()
    hdul.writeto(buf, checksum=False)
    return buf.getvalue()


def _astropy_hdu_bytes(hdu: Any) -> bytes:
    """One extension HDU as astropy writes it, cut out of a file with an empty primary HDU."""
    primary = fits.PrimaryHDU()
    return _astropy_bytes(fits.HDUList([primary, hdu]))[len(primary.header.tostring()):]


def _hdul_bytes(hdul: fits.HDUList) -> BytesLike:
    """The FITS file of ``hdul``, byte for byte as :meth:`astropy.io.fits.HDUList.writeto` writes it.

    astropy byte-swaps the pixels of an image in place, writes them into a growing buffer and
    swaps them back: for the 201 MB of a 4096² exposure 0.21-0.24 s, as much as the rest of
    the outputs together. Here the headers and the small HDUs (tables) still come from astropy,
    and each plain image (no BZERO/BSCALE) is converted to big-endian once, straight into a
    ``bytearray`` of the file's final size (its zeros are the padding; ``bytes`` would cost a
    copy). The whole write of a 4096² calibration's outputs in a fresh benchmark process went
    from 0.51 to 0.46 s (3 interleaved runs each). An uninitialised numpy buffer is faster in a
    warm loop but slower there (0.70-1.06 s): numpy asks the kernel for transparent huge pages,
    whose first touch is expensive on this VM. The same bytes as astropy's:
    ``tests/test_io_formats.py``.
    """
    if len(hdul) == 0 or (hdul[0].data is not None and _plain_pixels(hdul[0]) is None):
        return _astropy_bytes(hdul)
    hdul.update_extend()  # EXTEND in the primary header, as writeto does
    parts: list[tuple[bytes, npt.NDArray[Any] | None]] = []
    for i, hdu in enumerate(hdul):
        pixels = _plain_pixels(hdu)
        if pixels is not None:
            hdu.update_header()  # BITPIX and NAXISn from the data, as writeto does
        if pixels is not None or i == 0:
            parts.append((hdu.header.tostring().encode("ascii"), pixels))
        else:
            parts.append((_astropy_hdu_bytes(hdu), None))
    size = sum(len(head) + (0 if px is None else _padded(px.nbytes)) for head, px in parts)
    out = bytearray(size)
    offset = 0
    for head, pixels in parts:
        out[offset:offset + len(head)] = head
        offset += len(head)
        if pixels is not None:
            view = np.ndarray(pixels.shape, dtype=pixels.dtype.newbyteorder(">"), buffer=out, offset=offset)
            view[...] = pixels
            offset += _padded(pixels.nbytes)
    return out


def _long_key(key: str) -> str:
    """Keywords longer than eight characters as explicit HIERARCH cards (Rubin writes MP_DETECTED so)."""
    return f"HIERARCH {key}" if len(key) > 8 else key


def _set(hdr: fits.Header, key: str, value: Any, comment: str = "") -> None:
    """Set a keyword unless the value cannot be represented in a header (None, NaN, inf)."""
    if value is None:
        return
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return
    # Header cards are for people; the METADATA table keeps everything losslessly. A card that
    # does not fit in 80 characters loses its comment, and then is left out.
    for text in (comment, ""):
        with warnings.catch_warnings():
            warnings.simplefilter("error", fits.verify.VerifyWarning)
            try:
                card = fits.Card(key, value, text)
                card.image  # noqa: B018 - formatting the card is the check
            except (fits.verify.VerifyWarning, ValueError):
                continue
        hdr.append(card, end=True) if key not in hdr else hdr.set(key, value, text)
        return


def exposure_unit(exposure: Exposure) -> str:
    """Pixel unit of ``exposure``: ``metadata['BUNIT']``, else its background's unit, else ``count``."""
    unit = exposure.metadata.get("BUNIT")
    if unit:
        return str(unit)
    if exposure.background is not None:
        return exposure.background.unit
    return "count"


def _primary_header(exposure: Exposure) -> fits.Header:
    vi, det = exposure.visit_info, exposure.detector
    hdr = fits.Header()
    _set(hdr, "INSTRUME", vi.instrument, "instrument")
    lon, lat, height = vi.observatory_lon_lat_height
    _set(hdr, "OBS-LONG", float(lon), "[deg] observatory east longitude")
    _set(hdr, "OBS-LAT", float(lat), "[deg] observatory latitude")
    _set(hdr, "OBS-ELEV", float(height), "[m] observatory elevation")
    _set(hdr, "VISIT", int(vi.visit), "visit id")
    _set(hdr, "EXPTIME", float(vi.exposure_time_s), "[s] exposure time")
    hdr["TIMESYS"] = ("TAI", "time scale of MJD-* and DATE-* keywords")
    if math.isfinite(vi.mjd_tai):
        start = vi.mjd_tai - vi.exposure_time_s / 2.0 / 86400.0
        _set(hdr, "MJD-OBS", float(start), "[d] exposure start (TAI)")
        _set(hdr, "MJD-AVG", float(vi.mjd_tai), "[d] exposure mid-point (TAI)")
        _set(hdr, "DATE-OBS", Time(start, format="mjd", scale="tai").isot, "exposure start (TAI)")
        _set(hdr, "DATE-AVG", Time(vi.mjd_tai, format="mjd", scale="tai").isot, "exposure mid-point (TAI)")
    _set(hdr, "BAND", vi.band, "abstract filter (band)")
    _set(hdr, "FILTER", vi.physical_filter, "physical filter")
    _set(hdr, "BORE-RA", float(vi.boresight_ra_deg), "[deg] boresight right ascension")
    _set(hdr, "BORE-DEC", float(vi.boresight_dec_deg), "[deg] boresight declination")
    _set(hdr, "ROTANGLE", float(vi.rotation_angle_deg), "[deg] position angle of focal-plane +y, E of N")
    _set(hdr, "AIRMASS", float(vi.airmass), "airmass at mid-exposure")
    _set(hdr, "DETECTOR", int(det.id), "detector id")
    _set(hdr, "DETNAME", det.name, "detector name")
    _set(hdr, "GAIN", float(det.gain_e_per_count), "[e-/count] gain")
    _set(hdr, "RDNOISE", float(det.read_noise_e), "[e-] read noise")
    _set(hdr, "SATURATE", float(det.saturation_count), "[count] saturation level")
    hdr["BUNIT"] = (exposure_unit(exposure), "pixel unit")
    if exposure.photo_calib is not None:
        # PHOTCALIB has nine characters: an explicit HIERARCH card avoids astropy's warning.
        _set(hdr, "HIERARCH PHOTCALIB", float(exposure.photo_calib.calibration_njy_per_count),
             "[nJy/count] calibration")
        _set(hdr, "PHOTCERR", float(exposure.photo_calib.calibration_err_njy_per_count), "[nJy/count] its error")
    if "PSF_FALLBACK" in exposure.metadata:
        # Also in METADATA; a header card so that a plain FITS reader sees the PSF is not fitted.
        _set(hdr, "HIERARCH PSF_FALLBACK", str(exposure.metadata["PSF_FALLBACK"]),
             "PSF is a Gaussian fallback (seeing/moments)")
    if exposure.metadata.get("quality.warnings"):
        # The texts are in METADATA; the card tells a plain FITS reader to look.
        _set(hdr, "QAWARN", len(exposure.metadata["quality.warnings"]), "quality warnings, see METADATA")
    _origin_keys(hdr, exposure.origin)
    hdr["SFVERS"] = (__version__, "singleframe version that wrote the file")
    return hdr


def _origin_keys(hdr: fits.Header, origin: tuple[int, int]) -> None:
    x0, y0 = origin
    # IRAF/Rubin convention: physical (parent) = array + (-LTV).
    hdr["LTV1"] = (-int(x0), "minus the parent x of the first pixel")
    hdr["LTV2"] = (-int(y0), "minus the parent y of the first pixel")


def _image_header(exposure: Exposure, extname: str, wcs_header: fits.Header | None) -> fits.Header:
    """EXTNAME/EXTTYPE, the WCS (``wcs_header``: the exposure's, made once per file) and the origin."""
    hdr = fits.Header()
    hdr["EXTNAME"] = extname
    hdr["EXTTYPE"] = extname
    if wcs_header is not None:
        hdr.extend(wcs_header, update=True)
    _origin_keys(hdr, exposure.origin)
    return hdr


def _json_table_hdu(extname: str, rows: Mapping[str, Any], part: str) -> fits.BinTableHDU:
    names = list(rows)
    texts = [_json_dumps(rows[n]) for n in names]
    hdu = fits.BinTableHDU(Table({"name": np.array(names, dtype="U"), "json": np.array(texts, dtype="U")}))
    hdu.header["EXTNAME"] = extname
    hdu.header["SFPART"] = part
    return hdu


def _json_table_rows(hdu: fits.BinTableHDU) -> dict[str, Any]:
    return {str(n): _json_loads(str(t)) for n, t in zip(hdu.data["name"], hdu.data["json"], strict=True)}


def exposure_to_hdulist(exposure: Exposure) -> fits.HDUList:
    """The FITS layout described in the module docstring."""
    if not isinstance(exposure, Exposure):
        raise TypeError(f"exposure datasets hold an Exposure, got {type(exposure).__name__}")
    hdus: list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU] = [fits.PrimaryHDU(header=_primary_header(exposure))]
    wcs_header = exposure.wcs.to_header(relax=True) if exposure.wcs is not None else None
    image_hdr = _image_header(exposure, "IMAGE", wcs_header)
    image_hdr["BUNIT"] = exposure_unit(exposure)
    hdus.append(fits.ImageHDU(exposure.image.astype(np.float32, copy=False), header=image_hdr))
    mask_hdr = _image_header(exposure, "MASK", wcs_header)
    for name, bit in plane_bits().items():
        mask_hdr[_long_key(f"MP_{name}")] = (bit, f"bit number of mask plane {name}")
    # Every plane bit is below 31, so int32 (Rubin's mask type) holds the bits unchanged: the
    # uint32 mask is reinterpreted, not copied (the FITS writer converts it once, to big-endian).
    hdus.append(fits.ImageHDU(exposure.mask.view(np.int32), header=mask_hdr))
    hdus.append(fits.ImageHDU(exposure.variance.astype(np.float32, copy=False),
                              header=_image_header(exposure, "VARIANCE", wcs_header)))
    if exposure.psf is not None:
        for hdu in exposure.psf.to_hdus():
            hdu.header["SFPART"] = ("PSF", "part of the PSF model")
            hdus.append(hdu)
    if exposure.ap_corr:
        names = sorted(exposure.ap_corr)
        table = Table({"name": np.array(names, dtype="U"),
                       "field": np.array([_json_dumps(exposure.ap_corr[n].to_dict()) for n in names], dtype="U")})
        hdu = fits.BinTableHDU(table)
        hdu.header["EXTNAME"] = "APCORR"
        hdu.header["SFPART"] = "APCORR"
        hdus.append(hdu)
    if exposure.background is not None:
        for hdu in exposure.background.to_hdus():
            hdu.header["SFPART"] = ("BACKGROUND", "part of the background model")
            hdus.append(hdu)
    rows: dict[str, Any] = {
        "visit_info": exposure.visit_info.to_dict(),
        "detector": exposure.detector.to_dict(),
        "origin": list(exposure.origin),
        "photo_calib": exposure.photo_calib.to_dict() if exposure.photo_calib is not None else None,
        "metadata": dict(exposure.metadata),
        "summary": dict(exposure.summary),
        "background_unit": exposure.background.unit if exposure.background is not None else None,
    }
    hdus.append(_json_table_hdu("METADATA", rows, "METADATA"))
    return fits.HDUList(hdus)


def exposure_to_fits_bytes(exposure: Exposure) -> BytesLike:
    """Serialise an exposure to multi-extension FITS bytes."""
    return _hdul_bytes(exposure_to_hdulist(exposure))


def wcs_from_header(header: fits.Header) -> WCS | None:
    """The celestial WCS of ``header``, or ``None`` if it has none."""
    if "CTYPE1" not in header or "CTYPE2" not in header:
        return None
    with warnings.catch_warnings():
        # astropy "fixes" (e.g. MJD-OBS from DATE-OBS) are informational, not problems of the file.
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header, naxis=2)
    if not wcs.has_celestial:
        return None
    return wcs


def _pixels(hdu: fits.ImageHDU, raw: bytes | None, data_offset: int | None) -> npt.NDArray[Any]:
    """Pixel data of ``hdu``, read straight from the file bytes when possible.

    astropy copies the buffer twice (read, then byte-swap); reading the
    big-endian array from ``raw`` at its data offset costs one conversion,
    which halves the time to load a 4k x 4k exposure. Scaled data (BZERO,
    BSCALE) and foreign layouts go through astropy.
    """
    hdr = hdu.header
    scaled = float(hdr.get("BSCALE", 1.0)) != 1.0 or float(hdr.get("BZERO", 0.0)) != 0.0
    bitpix_dtypes = {-32: ">f4", -64: ">f8", 32: ">i4", 16: ">i2", 64: ">i8"}
    if raw is None or data_offset is None or scaled or int(hdr["BITPIX"]) not in bitpix_dtypes:
        return np.asarray(hdu.data)
    shape = tuple(int(hdr[f"NAXIS{i}"]) for i in range(int(hdr["NAXIS"]), 0, -1))
    count = int(np.prod(shape)) if shape else 0
    return np.frombuffer(raw, dtype=bitpix_dtypes[int(hdr["BITPIX"])], count=count,
                         offset=data_offset).reshape(shape)


def read_mask_hdu(hdu: fits.ImageHDU, pixels: npt.NDArray[Any] | None = None) -> npt.NDArray[np.uint32]:
    """A ``MASK`` extension as our ``uint32`` bits, remapped through its ``MP_<PLANE>`` keywords.

    Planes the file defines but :class:`~singleframe.masks.MaskPlane` lacks are dropped.
    """
    raw = np.asarray(hdu.data) if pixels is None else pixels
    ours = plane_bits()
    theirs = {key[3:]: int(hdu.header[key]) for key in hdu.header if str(key).startswith("MP_")}
    if not theirs or all(ours.get(name) == bit for name, bit in theirs.items()):
        # Same bit layout: reinterpret the int32 bits as uint32 (one byte-swapping copy).
        return raw.astype(np.int32).view(MASK_DTYPE) if raw.dtype.itemsize == 4 else raw.astype(MASK_DTYPE)
    raw64 = raw.astype(np.int64)
    out = np.zeros(raw.shape, dtype=MASK_DTYPE)
    for name, bit in theirs.items():
        if name in ours:
            out |= (((raw64 >> bit) & 1).astype(MASK_DTYPE) << MASK_DTYPE(ours[name]))
    return out


def _visit_info_from_header(hdr: fits.Header) -> VisitInfo:
    mjd = hdr.get("MJD-AVG")
    if mjd is None and "MJD-OBS" in hdr:
        mjd = float(hdr["MJD-OBS"]) + float(hdr.get("EXPTIME", 0.0)) / 2.0 / 86400.0
    return VisitInfo(
        visit=int(hdr.get("VISIT", 0)),
        exposure_time_s=float(hdr.get("EXPTIME", math.nan)),
        mjd_tai=float(mjd) if mjd is not None else math.nan,
        band=str(hdr.get("BAND", "")),
        physical_filter=str(hdr.get("FILTER", "")),
        boresight_ra_deg=float(hdr.get("BORE-RA", math.nan)),
        boresight_dec_deg=float(hdr.get("BORE-DEC", math.nan)),
        rotation_angle_deg=float(hdr.get("ROTANGLE", math.nan)),
        airmass=float(hdr.get("AIRMASS", math.nan)),
        instrument=str(hdr.get("INSTRUME", "unknown")),
        # Files that name no site have none (NaN), not Rubin's.
        observatory_lon_lat_height=(float(hdr.get("OBS-LONG", math.nan)), float(hdr.get("OBS-LAT", math.nan)),
                                    float(hdr.get("OBS-ELEV", math.nan))),
    )


def _detector_from_header(hdr: fits.Header) -> DetectorInfo:
    return DetectorInfo(id=int(hdr.get("DETECTOR", 0)), name=str(hdr.get("DETNAME", "")),
                        gain_e_per_count=float(hdr.get("GAIN", 1.0)),
                        read_noise_e=float(hdr.get("RDNOISE", 0.0)),
                        saturation_count=float(hdr.get("SATURATE", math.inf)))


def exposure_from_hdulist(hdul: fits.HDUList, *, raw: bytes | None = None) -> Exposure:
    """Inverse of :func:`exposure_to_hdulist`.

    Files without our ``METADATA`` extension (written by other software in
    the same layout) are read from the PRIMARY keywords instead. ``raw``,
    the bytes ``hdul`` was opened from, lets the pixels be read without
    astropy's intermediate copies.
    """
    by_name = {str(h.header.get("EXTNAME", "")).upper(): h for h in hdul[1:]}
    index = {str(h.header.get("EXTNAME", "")).upper(): i for i, h in enumerate(hdul) if i > 0}
    missing = [n for n in ("IMAGE", "MASK", "VARIANCE") if n not in by_name]
    if missing:
        raise ValueError(f"not an exposure file: extensions {missing} are missing")

    def pixels(name: str) -> npt.NDArray[Any]:
        offset = int(hdul.fileinfo(index[name])["datLoc"]) if raw is not None else None
        return _pixels(by_name[name], raw, offset)

    image_hdu = by_name["IMAGE"]
    image = pixels("IMAGE").astype(np.float32)
    variance = pixels("VARIANCE").astype(np.float32)
    mask = read_mask_hdu(by_name["MASK"], pixels("MASK"))
    wcs = wcs_from_header(image_hdu.header)
    psf_hdus = [h for h in hdul[1:] if h.header.get("SFPART") == "PSF"]
    if not psf_hdus:
        psf_hdus = [h for h in hdul[1:] if "PSFTYPE" in h.header][:1]
    psf = psf_from_hdus(psf_hdus) if psf_hdus else None
    ap_corr: dict[str, ChebyshevField] = {}
    if "APCORR" in by_name:
        data = by_name["APCORR"].data
        ap_corr = {str(n): ChebyshevField.from_dict(_json_loads(str(f)))
                   for n, f in zip(data["name"], data["field"], strict=True)}
    bkg_hdus = [h for h in hdul[1:] if h.header.get("SFPART") == "BACKGROUND"]
    primary = hdul[0].header
    if "METADATA" in by_name:
        rows = _json_table_rows(by_name["METADATA"])
        visit_info = VisitInfo.from_dict(rows["visit_info"])
        detector = DetectorInfo.from_dict(rows["detector"])
        origin = (int(rows["origin"][0]), int(rows["origin"][1]))
        photo_calib = PhotoCalib.from_dict(rows["photo_calib"]) if rows.get("photo_calib") else None
        metadata, summary = rows.get("metadata", {}), rows.get("summary", {})
        bkg_unit = rows.get("background_unit") or "count"
    else:
        visit_info = _visit_info_from_header(primary)
        detector = _detector_from_header(primary)
        origin = (-int(image_hdu.header.get("LTV1", primary.get("LTV1", 0))),
                  -int(image_hdu.header.get("LTV2", primary.get("LTV2", 0))))
        photo_calib = (PhotoCalib(float(primary["PHOTCALIB"]), float(primary.get("PHOTCERR", 0.0)))
                       if "PHOTCALIB" in primary else None)
        metadata, summary = {}, {}
        bkg_unit = str(primary.get("BUNIT", "count"))
    background = None
    if bkg_hdus:
        background = BackgroundList(BackgroundList.from_hdus(bkg_hdus).components, bkg_unit)
    return Exposure(image=image, mask=mask, variance=variance, visit_info=visit_info, detector=detector,
                    wcs=wcs, psf=psf, photo_calib=photo_calib, ap_corr=ap_corr, background=background,
                    origin=origin, metadata=metadata, summary=summary)


def exposure_from_fits_bytes(data: bytes) -> Exposure:
    """Read an exposure written by :func:`exposure_to_fits_bytes`."""
    with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=True) as hdul:
        return exposure_from_hdulist(hdul, raw=data)


# ======================================================================================
# Registry
# ======================================================================================
@dataclass(frozen=True)
class StorageFormat:
    """How one storage kind becomes bytes: file extension, writer and reader."""

    storage: str
    extension: str
    write: Callable[[Any], BytesLike]
    read: Callable[[bytes], Any]
    python_type: str


FORMATS: Mapping[str, StorageFormat] = {
    "exposure": StorageFormat("exposure", "fits", exposure_to_fits_bytes, exposure_from_fits_bytes, "Exposure"),
    "background": StorageFormat("background", "fits", background_to_fits_bytes, background_from_fits_bytes,
                                "BackgroundList"),
    "catalog": StorageFormat("catalog", "parquet", table_to_parquet_bytes, table_from_parquet_bytes, "Table"),
    "json": StorageFormat("json", "json", dict_to_json_bytes, dict_from_json_bytes, "dict"),
    "image": StorageFormat("image", "fits", image_to_fits_bytes, image_from_fits_bytes, "numpy.ndarray"),
}


def get_format(storage: str) -> StorageFormat:
    """The format of a storage kind; raises :class:`DatasetError` listing the known kinds."""
    try:
        return FORMATS[storage]
    except KeyError:
        raise DatasetError(f"no format for storage {storage!r}; known: {sorted(FORMATS)}") from None
