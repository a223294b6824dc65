"""FITS / Parquet / JSON formats: lossless round trips, files readable by plain astropy."""

from __future__ import annotations

import io
import json
import math

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.wcs import WCS

from singleframe.background import BackgroundList, BackgroundModel
from singleframe.camera import square_mosaic
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.fields import ChebyshevField
from singleframe.io import formats
from singleframe.masks import MaskPlane, plane_bits
from singleframe.photo_calib import PhotoCalib
from singleframe.psf import GaussianPsf

NY, NX = 150, 200  # non-square on purpose
ORIGIN = (37, 11)  # non-zero parent origin


def _background(rng: np.random.Generator) -> BackgroundList:
    # Centres with few decimals: BackgroundModel stores them as text with 6 decimals.
    xc = np.array([36.5, 86.5, 136.5, 186.5]) + ORIGIN[0]
    yc = np.array([24.75, 74.75, 124.75]) + ORIGIN[1]
    model = BackgroundModel(100 + rng.normal(size=(3, 4)), xc, yc, (NY, NX), ORIGIN)
    return BackgroundList((model,), "count")


@pytest.fixture
def exposure() -> Exposure:
    rng = np.random.default_rng(42)
    cam = square_mosaic("testcam", n_side=2, nx=NX, ny=NY, distortion_k3_per_mm2=1e-6)
    wcs = cam.initial_wcs(1, 150.123456789123, 2.3456789123, 33.3)
    image = rng.normal(0, 10, (NY, NX)).astype(np.float32)
    image[5, 7] = np.nan  # NaN must survive bit-for-bit
    mask = rng.integers(0, 1 << 9, (NY, NX)).astype(np.uint32)
    variance = rng.uniform(50, 150, (NY, NX)).astype(np.float32)
    visit = VisitInfo(visit=20240131, exposure_time_s=15.0, mjd_tai=60340.123456789012, band="r",
                      physical_filter="r_03", boresight_ra_deg=150.2, boresight_dec_deg=2.4,
                      rotation_angle_deg=33.3, airmass=math.nan, instrument="testcam")
    det = DetectorInfo(id=1, name="R00_S01", gain_e_per_count=1.7, read_noise_e=5.5, saturation_count=math.inf)
    field = ChebyshevField.fit(rng.uniform(37, 236, 40), rng.uniform(11, 160, 40), rng.normal(1, 0.01, 40),
                               order=2, bbox=(37.0, 11.0, 236.0, 160.0))
    return Exposure(image, mask, variance, visit, det, wcs=wcs, psf=GaussianPsf(1.8, 0.03, -0.01),
                    photo_calib=PhotoCalib(0.2871, 0.0013), ap_corr={"base_PsfFlux": field},
                    background=_background(rng), origin=ORIGIN,
                    metadata={"char.n_psf_stars": 57, "char.note": "ok", "nan_value": math.nan,
                              "a_rather_long_key_that_no_fits_keyword_could_hold": [1, 2.5]},
                    summary={"psfSigma": 1.8, "zeroPoint": 31.1234567890123, "skyBg": -math.inf})


def _same_json(a: object, b: object) -> bool:
    """Equality that treats NaN as equal to NaN (dataclass == does not)."""
    return formats._json_dumps(a) == formats._json_dumps(b)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:shape[0]:7, 0:shape[1]:9]
    return x.ravel().astype(float), y.ravel().astype(float)


def test_exposure_round_trip_is_lossless(exposure: Exposure) -> None:
    back = formats.exposure_from_fits_bytes(formats.exposure_to_fits_bytes(exposure))
    # Arrays bitwise (NaN payloads included).
    assert np.array_equal(back.image.view(np.uint32), exposure.image.view(np.uint32))
    assert np.array_equal(back.mask, exposure.mask) and back.mask.dtype == np.uint32
    assert np.array_equal(back.variance.view(np.uint32), exposure.variance.view(np.uint32))
    assert back.origin == ORIGIN
    assert _same_json(back.visit_info.to_dict(), exposure.visit_info.to_dict())
    assert back.detector == exposure.detector
    assert _same_json(dict(back.metadata), dict(exposure.metadata))
    assert _same_json(dict(back.summary), dict(exposure.summary))
    assert back.psf == exposure.psf
    assert back.photo_calib == exposure.photo_calib
    assert back.ap_corr.keys() == exposure.ap_corr.keys()
    assert back.ap_corr["base_PsfFlux"].to_dict() == exposure.ap_corr["base_PsfFlux"].to_dict()
    assert back.background is not None and back.background.unit == "count"
    np.testing.assert_array_equal(back.background.image(), exposure.background.image())  # type: ignore[union-attr]
    # The WCS (TAN-SIP) must agree to 1e-10 deg: headers keep ~14 significant digits,
    # i.e. ~1e-12 deg at RA 150, so 1e-10 leaves a wide margin.
    x, y = _grid(exposure.shape)
    ra0, dec0 = exposure.pixel_to_sky(x + ORIGIN[0], y + ORIGIN[1])
    ra1, dec1 = back.pixel_to_sky(x + ORIGIN[0], y + ORIGIN[1])
    np.testing.assert_allclose(ra1, ra0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(dec1, dec0, rtol=0, atol=1e-10)


def test_exposure_file_opens_with_plain_astropy(exposure: Exposure) -> None:
    data = formats.exposure_to_fits_bytes(exposure)
    with fits.open(io.BytesIO(data)) as hdul:
        names = [h.name for h in hdul]
        assert names[:4] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert {"PSF", "APCORR", "METADATA", "BKGD00"} <= set(names)
        primary = hdul[0].header
        assert primary["VISIT"] == 20240131 and primary["BAND"] == "r" and primary["FILTER"] == "r_03"
        assert primary["DETECTOR"] == 1 and primary["GAIN"] == 1.7 and primary["EXPTIME"] == 15.0
        assert primary["PHOTCALIB"] == 0.2871 and primary["PHOTCERR"] == 0.0013
        assert "AIRMASS" not in primary  # NaN cannot be a header value: left out, kept in METADATA
        assert primary["LTV1"] == -ORIGIN[0] and primary["LTV2"] == -ORIGIN[1]
        assert hdul["IMAGE"].data.dtype == np.dtype(">f4") and hdul["MASK"].data.dtype == np.dtype(">i4")
        for name, bit in plane_bits().items():
            assert hdul["MASK"].header[f"MP_{name}"] == bit
        # The IMAGE header WCS works with astropy on array pixel coordinates.
        wcs = WCS(hdul["IMAGE"].header)
        assert wcs.has_celestial and wcs.sip is not None
        x, y = _grid(exposure.shape)
        ra, dec = wcs.all_pix2world(x, y, 0)
        ra0, dec0 = exposure.pixel_to_sky(x + ORIGIN[0], y + ORIGIN[1])
        np.testing.assert_allclose(ra, ra0, rtol=0, atol=1e-10)  # same header precision as above
        np.testing.assert_allclose(dec, dec0, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(hdul["IMAGE"].data, exposure.image)
        assert "PSF_FALLBACK" not in primary  # a fitted PSF: no card
    # A fallback PSF is announced in the primary header too, where a plain FITS reader looks.
    data = formats.exposure_to_fits_bytes(exposure.with_metadata(PSF_FALLBACK="moments"))
    with fits.open(io.BytesIO(data)) as hdul:
        assert hdul[0].header["PSF_FALLBACK"] == "moments"
    assert formats.exposure_from_fits_bytes(bytes(data)).metadata["PSF_FALLBACK"] == "moments"


def _astropy_file(hdul: fits.HDUList) -> bytes:
    buf = io.BytesIO()
    hdul.writeto(buf, checksum=False)
    return buf.getvalue()


def test_fits_files_are_byte_for_byte_astropy_s(exposure: Exposure) -> None:
    # The pixels are written by our own conversion (formats._hdul_bytes), everything else by
    # astropy: the file must be exactly the one astropy's writeto makes, for every layout we write
    # (exposure with PSF, aperture corrections, background and metadata tables; plain images of
    # each pixel type; a background list; an image astropy has to scale, which takes its path).
    assert bytes(formats.exposure_to_fits_bytes(exposure)) == _astropy_file(formats.exposure_to_hdulist(exposure))
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64, np.int16, np.int32, np.int64, np.uint8, np.bool_, np.uint16):
        arr = (rng.normal(size=(13, 29)) * 100).astype(dtype)
        stored = arr.astype(np.uint8) if dtype == np.bool_ else arr
        hdr = fits.Header([("SFDTYPE", np.dtype(dtype).name, "numpy dtype of the stored array")])
        expected = _astropy_file(fits.HDUList([fits.PrimaryHDU(data=stored, header=hdr)]))
        assert bytes(formats.image_to_fits_bytes(arr)) == expected, dtype
        np.testing.assert_array_equal(formats.image_from_fits_bytes(formats.image_to_fits_bytes(arr)), arr)
    bkg = exposure.background
    assert bkg is not None
    primary = fits.PrimaryHDU()
    primary.header["BUNIT"] = bkg.unit
    primary.header["NBKGD"] = (len(bkg), "number of background components")
    assert bytes(formats.background_to_fits_bytes(bkg)) == _astropy_file(fits.HDUList([primary, *bkg.to_hdus()]))


def test_minimal_exposure_round_trip() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(size=(NY, NX)).astype(np.float32)
    e = Exposure(image, np.zeros((NY, NX), np.uint32), np.ones((NY, NX), np.float32),
                 VisitInfo(7, 30.0, 60000.5, "g", "g", 10.0, -5.0, 0.0), DetectorInfo(4))
    back = formats.exposure_from_fits_bytes(formats.exposure_to_fits_bytes(e))
    assert back.wcs is None and back.psf is None and back.photo_calib is None and back.background is None
    assert not back.ap_corr and back.origin == (0, 0)
    np.testing.assert_array_equal(back.image, image)


def test_foreign_exposure_without_metadata_reads_headers_and_remaps_mask_bits(exposure: Exposure) -> None:
    hdul = formats.exposure_to_hdulist(exposure)
    del hdul["METADATA"]
    # Another writer numbers the planes differently: SAT in bit 12, CR in bit 0, plus an unknown plane.
    mask = np.zeros((NY, NX), np.int32)
    mask[1, 2] = 1 << 12
    mask[3, 4] = 1 | (1 << 20)
    hdul["MASK"].data = mask
    for key in [k for k in hdul["MASK"].header if str(k).startswith("MP_")]:
        del hdul["MASK"].header[key]
    hdul["MASK"].header["MP_SAT"] = 12
    hdul["MASK"].header["MP_CR"] = 0
    hdul["MASK"].header["HIERARCH MP_UNKNOWN"] = 20
    back = formats.exposure_from_hdulist(hdul)
    assert back.mask[1, 2] == MaskPlane.SAT and back.mask[3, 4] == MaskPlane.CR
    assert int(back.mask.sum()) == int(MaskPlane.SAT) + int(MaskPlane.CR)
    vi = back.visit_info
    assert (vi.visit, vi.band, vi.physical_filter, vi.exposure_time_s) == (20240131, "r", "r_03", 15.0)
    # MJD-AVG is written with ~16 significant digits: 1e-9 d is 0.1 ms.
    assert vi.mjd_tai == pytest.approx(exposure.visit_info.mjd_tai, abs=1e-9)
    assert back.origin == ORIGIN and back.photo_calib == exposure.photo_calib
    assert back.detector.saturation_count == math.inf  # SATURATE absent (it was inf) → default inf


def test_background_round_trip_keeps_unit() -> None:
    bkg = _background(np.random.default_rng(5)).scaled(0.25, "nJy")
    back = formats.background_from_fits_bytes(formats.background_to_fits_bytes(bkg))
    assert back.unit == "nJy" and len(back) == 1
    np.testing.assert_array_equal(back.image(), bkg.image())
    empty = formats.background_from_fits_bytes(formats.background_to_fits_bytes(BackgroundList((), "nJy")))
    assert len(empty) == 0 and empty.unit == "nJy"


@pytest.fixture
def catalog() -> Table:
    rng = np.random.default_rng(11)
    n = 25
    t = Table()
    t["id"] = np.arange(1, n + 1, dtype=np.int64)
    t["coord_ra"] = rng.uniform(2.6, 2.7, n) * u.rad
    t["base_PsfFlux_instFlux"] = rng.uniform(1e3, 1e5, n)
    t["base_PsfFlux_instFlux"].unit = u.count
    t["base_PsfFlux_instFlux"].description = "PSF flux"
    t["calib_psf_used"] = rng.random(n) > 0.5  # unitless bool column
    t["band"] = np.full(n, "r")
    t["moments"] = rng.normal(size=(n, 3))
    t["masked_mag"] = MaskedColumn(rng.uniform(18, 22, n), mask=rng.random(n) > 0.7, unit=u.mag)
    t.meta["visit"] = 12
    t.meta["config"] = {"radii_pix": [3, 6, 9]}
    return t


def test_catalog_round_trip_keeps_units_meta_bools_and_masks(catalog: Table) -> None:
    back = formats.table_from_parquet_bytes(formats.table_to_parquet_bytes(catalog))
    assert back.colnames == catalog.colnames
    assert back.meta == catalog.meta
    for name in catalog.colnames:
        assert back[name].unit == catalog[name].unit, name
        assert back[name].dtype == catalog[name].dtype, name
    assert back["calib_psf_used"].unit is None and back["calib_psf_used"].dtype == np.bool_
    assert back["base_PsfFlux_instFlux"].description == "PSF flux"
    np.testing.assert_array_equal(back["masked_mag"].mask, catalog["masked_mag"].mask)
    for name in catalog.colnames:
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(catalog[name]))


def _header_yaml(table: Table) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    md = pq.ParquetFile(pa.BufferReader(formats.table_to_parquet_bytes(table))).schema_arrow.metadata
    return md[b"table_meta_yaml"].decode()


def test_table_header_parsed_by_libyaml_equals_astropys_parser(catalog: Table) -> None:
    # The fast path must give exactly astropy's header: units, descriptions, masked and 2-D
    # columns, nested meta, and the serialized-columns record of a Quantity mixin.
    from astropy.table import QTable
    from astropy.table import meta as table_meta

    if formats._libyaml_table_loader() is None:
        pytest.skip("PyYAML without libyaml: astropy's parser is used directly")
    mixed = QTable(catalog)
    mixed["flux_njy"] = np.linspace(1.0, 2.0, len(catalog)) * u.nJy
    mixed.meta["nested"] = {"a": [1, 2.5, "x"], "b": {"c": None, "d": True}}
    for table in (catalog, mixed):
        text = _header_yaml(table)
        assert formats._table_header_from_yaml(text) == dict(table_meta.get_header_from_yaml(text.split("\n")))
    back = formats.table_from_parquet_bytes(formats.table_to_parquet_bytes(mixed))
    assert back["flux_njy"].unit == u.nJy and back.meta["nested"] == mixed.meta["nested"]


def test_table_header_without_libyaml_uses_astropys_parser(catalog: Table, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "_libyaml_table_loader", lambda: None)
    back = formats.table_from_parquet_bytes(formats.table_to_parquet_bytes(catalog))
    assert back.meta == catalog.meta and back["masked_mag"].unit == u.mag


def test_catalog_file_uses_astropy_parquet_layout(catalog: Table, tmp_path) -> None:
    import pyarrow.parquet as pq

    path = tmp_path / "cat.parquet"
    path.write_bytes(formats.table_to_parquet_bytes(catalog))
    md = pq.read_schema(path).metadata
    assert b"table_meta_yaml" in md and b"unit: rad" in md[b"table_meta_yaml"]
    assert md[b"table::len::band"] == b"1"


def test_catalog_file_reads_back_with_astropy_table_read(catalog: Table, tmp_path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import astropy.io.misc.parquet as astropy_parquet

    if importlib.util.find_spec("pandas") is None:
        # astropy refuses to read Parquet without pandas, but its reading code uses pyarrow only:
        # lift the guard so the test exercises astropy's own reader on our file.
        monkeypatch.setattr(astropy_parquet, "HAS_PANDAS", True)
    path = tmp_path / "cat.parquet"
    path.write_bytes(formats.table_to_parquet_bytes(catalog))
    back = Table.read(path)
    assert back.meta == catalog.meta
    for name in catalog.colnames:
        assert back[name].unit == catalog[name].unit, name
    assert back["calib_psf_used"].dtype == np.bool_
    np.testing.assert_array_equal(back["masked_mag"].mask, catalog["masked_mag"].mask)


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint16, ">i4", "<i8", np.float16, ">f4", np.float64])
def test_catalog_columns_round_trip_bit_for_bit_through_arrow_buffers(dtype: str) -> None:
    # Odd lengths (bit-packed booleans end mid-byte), byte-swapped input, a 2-D column
    # (fixed-size list) and NaN payloads: the buffer route must give back exactly the values.
    rng = np.random.default_rng(3)
    values = (rng.normal(size=(37, 3)) * 50).astype(dtype) if np.dtype(dtype) != np.bool_ else rng.random((37, 3)) > 0.5
    if np.dtype(dtype).kind == "f":
        values[5, 1] = np.nan
    t = Table({"vec": values, "one": values[:, 0].copy()})
    back = formats.table_from_parquet_bytes(formats.table_to_parquet_bytes(t))
    for name in t.colnames:
        assert back[name].dtype == np.dtype(dtype).newbyteorder("="), name
        assert back[name].shape == t[name].shape
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(t[name]))
        back[name][0] = back[name][1]  # a writable copy, not a view of Arrow's buffer


def test_string_columns_round_trip_with_unicode_and_empty_values() -> None:
    t = Table({"name": np.array(["", "Ångström", "M31", "x" * 20]), "raw": np.array([b"", b"\x00a", b"bb", b"c"])})
    back = formats.table_from_parquet_bytes(formats.table_to_parquet_bytes(t))
    assert back["name"].dtype == t["name"].dtype and back["raw"].dtype == t["raw"].dtype
    assert list(back["name"]) == list(t["name"]) and list(back["raw"]) == list(t["raw"])


def test_sliced_and_null_arrow_arrays_convert_with_their_offset() -> None:
    import pyarrow as pa

    ints = pa.array([1, 2, None, 4, 5], type=pa.int32()).slice(1, 3)
    bools = pa.array([True, False, True, True, False, True, False, False, True, True]).slice(3, 6)
    np.testing.assert_array_equal(formats._arrow_to_numpy(ints)[[0, 2]], [2, 4])
    np.testing.assert_array_equal(formats._arrow_to_numpy(ints.is_null()), [False, True, False])
    np.testing.assert_array_equal(formats._arrow_to_numpy(bools), [True, False, True, False, False, True])


def test_catalog_write_and_read_do_not_import_pandas() -> None:
    # pyarrow imports pandas (0.2-0.3 s) at its first pa.array or to_numpy call; catalogues go
    # through Arrow buffers instead, so a worker's first detector does not pay for it.
    import subprocess
    import sys

    code = ("import sys, numpy as np, astropy.units as u\n"
            "from astropy.table import Table\n"
            "from singleframe.io import formats\n"
            "t = Table({'id': np.arange(5), 'flux': np.ones(5) * u.nJy, 'ok': np.ones(5, bool),\n"
            "           'xy': np.zeros((5, 2), np.float32), 'band': np.array(list('grizy')),\n"
            "           'raw': np.array([b'a', b'', b'ccc', b'd', b'e'])})\n"
            "back = formats.table_from_parquet_bytes(formats.table_to_parquet_bytes(t))\n"
            "assert list(back['id']) == list(range(5)) and back['flux'].unit == u.nJy\n"
            "assert list(back['band']) == list('grizy') and np.asarray(back['raw'])[2] == b'ccc'\n"
            "print('pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_reading_a_frame_and_loading_a_refcat_do_not_import_pydantic() -> None:
    # singleframe.io loads its submodules on first use: a calibration worker that reads frames and
    # a reference catalogue, calibrates and writes bytes does not pay pydantic's import (~0.08 s of
    # a fresh process), which only DatasetRef (the first store write, the flows) needs.
    import subprocess
    import sys

    code = ("import sys\n"
            "import singleframe.io as sio\n"
            "from singleframe.io.formats import exposure_to_fits_bytes\n"
            "from singleframe.io.refcat import load_refcat\n"
            "from singleframe.steps.pipeline import calibrate_image\n"
            "before = 'pydantic' in sys.modules\n"
            "ref = sio.DatasetRef\n"
            "print(before, 'pydantic' in sys.modules, ref.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "singleframe.io.refs"], out.stdout + out.stderr


def test_every_exported_io_name_resolves() -> None:
    import singleframe.io as sio

    for name in sio.__all__:
        assert getattr(sio, name) is not None, name
        assert name in dir(sio)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sio.nope  # noqa: B018


def test_empty_catalog_round_trip() -> None:
    t = Table({"id": np.zeros(0, np.int64), "flux": np.zeros(0) * u.nJy, "name": np.zeros(0, "U4")})
    back = formats.table_from_parquet_bytes(formats.table_to_parquet_bytes(t))
    assert len(back) == 0 and back["flux"].unit == u.nJy and back["name"].dtype == np.dtype("U4")


def test_json_is_strict_sorted_and_nan_safe() -> None:
    value = {"b": np.float32(np.nan), "a": {"inf": math.inf, "ninf": -math.inf, "x": np.int64(3)},
             "arr": np.arange(3), "t": (1, 2.5), "flag": np.bool_(True)}
    data = formats.dict_to_json_bytes(value)

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    raw = json.loads(data, parse_constant=refuse)  # strict JSON: no NaN/Infinity literals
    assert raw["b"] == "NaN" and raw["a"]["inf"] == "Infinity" and list(raw) == sorted(raw)
    back = formats.dict_from_json_bytes(data)
    assert math.isnan(back["b"]) and back["a"] == {"inf": math.inf, "ninf": -math.inf, "x": 3}
    assert back["arr"] == [0, 1, 2] and back["t"] == [1, 2.5] and back["flag"] is True
    assert formats.dict_from_json_bytes(formats.dict_to_json_bytes(PhotoCalib(2.0, 0.1)))[
        "calibration_njy_per_count"] == 2.0
    with pytest.raises(TypeError, match="cannot write object"):
        formats.dict_to_json_bytes({"x": object()})


@pytest.mark.parametrize("dtype", [np.bool_, np.uint32, np.int16, np.float32, np.float64])
def test_image_round_trip_keeps_dtype(dtype: type) -> None:
    rng = np.random.default_rng(8)
    arr = (rng.random((NY, NX)) * 1000).astype(dtype)
    back = formats.image_from_fits_bytes(formats.image_to_fits_bytes(arr))
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


def test_unknown_storage_lists_known() -> None:
    from singleframe.errors import DatasetError

    with pytest.raises(DatasetError, match="known"):
        formats.get_format("hdf5")
