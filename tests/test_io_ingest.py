"""Ingest of plain and multi-extension FITS files into post_isr_image datasets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from singleframe.errors import IngestError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.io import ArtifactStore, ingest_files, read_raw_file
from singleframe.io.formats import exposure_to_fits_bytes
from singleframe.masks import MaskPlane

NY, NX = 120, 170  # non-square
ROTATION_DEG = 25.0
SCALE_DEG = 0.2 / 3600


def _header(**changes: Any) -> fits.Header:
    hdr = fits.Header()
    theta = math.radians(ROTATION_DEG)
    values: dict[str, Any] = {
        "INSTRUME": "My Cam", "OBJECT": "M 31 field", "VISIT": 1001, "DETECTOR": 3, "EXPTIME": 30.0,
        "GAIN": 2.0, "RDNOISE": 6.0, "SATURATE": 50000.0, "FILTER": "SDSS r'", "DATE-OBS": "2024-01-31T03:04:05.0",
        "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.5, "CRVAL2": 41.2, "CRPIX1": 80.0, "CRPIX2": 50.0,
        # +y points at position angle ROTATION_DEG east of north; +x is 90 deg further round (west).
        "CD1_1": -SCALE_DEG * math.cos(theta), "CD1_2": SCALE_DEG * math.sin(theta),
        "CD2_1": SCALE_DEG * math.sin(theta), "CD2_2": SCALE_DEG * math.cos(theta),
    }
    values.update(changes)
    for key, value in values.items():
        if value is not None:
            hdr[key] = value
    return hdr


def _image(seed: int, shape: tuple[int, int] = (NY, NX)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(1000.0, 30.0, shape).astype(np.float32)
    img[10, 20] = 60000.0  # saturated
    img[11, 21] = 50000.0  # exactly at SATURATE counts as saturated
    img[30, 40] = np.nan  # no data
    img[31, 41] = -500.0  # negative: Poisson term clipped to zero
    return img


def _write(path: Path, seed: int = 1, shape: tuple[int, int] = (NY, NX), **changes: Any) -> str:
    fits.PrimaryHDU(_image(seed, shape), header=_header(**changes)).writeto(path)
    return str(path)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "repo"))


def test_plain_fits_builds_exposure_with_noise_model_and_visit_info(tmp_path: Path) -> None:
    raw = read_raw_file(_write(tmp_path / "a.fits"))
    e = raw.exposure
    img = _image(1)
    assert e.shape == (NY, NX) and e.origin == (0, 0) and raw.snap is None
    # variance = max(image, 0)/gain + (rdnoise/gain)^2, in counts^2
    expected = np.maximum(np.nan_to_num(img, nan=0.0), 0) / 2.0 + (6.0 / 2.0) ** 2
    np.testing.assert_allclose(e.variance, expected, rtol=1e-6)  # float32 arithmetic
    assert e.variance[31, 41] == pytest.approx(9.0)  # negative pixel: read noise only
    assert e.mask[10, 20] & MaskPlane.SAT and e.mask[11, 21] & MaskPlane.SAT
    assert e.mask[30, 40] & MaskPlane.NO_DATA and e.image[30, 40] == 0.0
    assert int(np.count_nonzero(e.mask)) == 3
    vi, det = e.visit_info, e.detector
    assert (vi.visit, vi.instrument, vi.band, vi.physical_filter) == (1001, "My_Cam", "r", "SDSS r'")
    assert (det.id, det.gain_e_per_count, det.read_noise_e, det.saturation_count) == (3, 2.0, 6.0, 50000.0)
    # Mid-exposure in TAI: DATE-OBS is UTC start; +15 s; TAI-UTC = 37 s in 2024.
    start = Time("2024-01-31T03:04:05.0", scale="utc")
    assert vi.mjd_tai == pytest.approx(start.tai.mjd + 15.0 / 86400, abs=1e-9)  # 1e-9 d = 0.1 ms
    assert vi.mjd_tai - start.mjd == pytest.approx(52.0 / 86400, abs=1e-9)
    # Rotation angle from the CD matrix; boresight = WCS centre of the detector.
    assert vi.rotation_angle_deg == pytest.approx(ROTATION_DEG, abs=1e-9)  # exact up to round-off
    ra_c, dec_c = e.pixel_to_sky((NX - 1) / 2, (NY - 1) / 2)
    assert (vi.boresight_ra_deg, vi.boresight_dec_deg) == pytest.approx((float(ra_c), float(dec_c)), abs=1e-12)
    assert e.metadata["ingest.object"] == "M 31 field"


def test_bad_file_is_reported_with_the_override_and_good_file_still_ingested(tmp_path: Path,
                                                                            store: ArtifactStore) -> None:
    good = _write(tmp_path / "good.fits")
    bad = _write(tmp_path / "bad.fits", VISIT=1002, EXPTIME=None)
    report = ingest_files(store, [good, bad])
    assert not report.ok and len(report.refs) == 1 and len(report.failures) == 1
    path, message = report.failures[0]
    assert path == bad and "bad.fits" in message and "EXPTIME" in message and "overrides={'EXPTIME'" in message
    ref = report.refs[0]
    assert (ref.dataset_type, ref.instrument, ref.visit, ref.detector, ref.snap, ref.run) == (
        "post_isr_image", "My_Cam", 1001, 3, 0, "raw")
    stored = store.get_ref(ref, verify_checksum=True)
    np.testing.assert_array_equal(stored.variance, read_raw_file(good).exposure.variance)
    prov = store.provenance("post_isr_image", run="raw", instrument="My_Cam", visit=1001, detector=3, snap=0)
    assert prov["ingested_from"] == good
    # The override named in the message fixes the file.
    fixed = ingest_files(store, [bad], overrides={"EXPTIME": 30.0})
    assert fixed.ok and fixed.refs[0].visit == 1002
    with pytest.raises(IngestError, match="READNOIS"):
        read_raw_file(_write(tmp_path / "nonoise.fits", RDNOISE=None))


def test_alternative_keywords_and_missing_visit(tmp_path: Path) -> None:
    path = _write(tmp_path / "alt.fits", RDNOISE=None, READNOIS=4.0, DETECTOR=None, CCDNUM=9, VISIT=None,
                  **{"DATE-OBS": None, "MJD-OBS": 60340.5, "TIMESYS": "TAI", "BORE-RA": 10.0, "BORE-DEC": 41.0})
    e = read_raw_file(path, instrument="other").exposure
    assert e.detector.read_noise_e == 4.0 and e.detector.id == 9 and e.visit_info.instrument == "other"
    assert e.visit_info.mjd_tai == pytest.approx(60340.5 + 15 / 86400, abs=1e-9)  # TAI start + 15 s
    # No VISIT/EXPID: 10-second intervals since 2000-01-01 TAI, below the 2**29 packed-id limit.
    assert e.visit_info.visit == math.floor((60340.5 - 51544.0) * 8640)
    assert e.visit_info.visit < 2**29
    assert (e.visit_info.boresight_ra_deg, e.visit_info.boresight_dec_deg) == (10.0, 41.0)


def test_two_files_of_one_visit_are_snaps_ordered_by_time_or_by_snap_keyword(tmp_path: Path,
                                                                             store: ArtifactStore) -> None:
    late = _write(tmp_path / "late.fits", seed=2, **{"DATE-OBS": "2024-01-31T03:05:00.0"})
    early = _write(tmp_path / "early.fits", seed=3)
    report = ingest_files(store, [late, early])
    assert report.ok and [r.snap for r in report.refs] == [0, 1]
    snap0 = store.get("post_isr_image", run="raw", instrument="My_Cam", visit=1001, detector=3, snap=0)
    np.testing.assert_array_equal(snap0.variance, read_raw_file(early).exposure.variance)
    # A SNAP keyword overrides the time order.
    a = _write(tmp_path / "s1.fits", seed=4, VISIT=7, SNAP=1)
    b = _write(tmp_path / "s0.fits", seed=5, VISIT=7, SNAP=0, **{"DATE-OBS": "2024-01-31T03:05:00.0"})
    report = ingest_files(store, [a, b], run="snaps")
    assert report.ok
    snap1 = store.get("post_isr_image", run="snaps", instrument="My_Cam", visit=7, detector=3, snap=1)
    np.testing.assert_array_equal(snap1.variance, read_raw_file(a).exposure.variance)


def test_a_later_call_never_replaces_a_stored_snap_with_another_file(tmp_path: Path, store: ArtifactStore) -> None:
    first = _write(tmp_path / "first.fits", seed=2, VISIT=11)
    second = _write(tmp_path / "second.fits", seed=3, VISIT=11, **{"DATE-OBS": "2024-01-31T03:05:00.0"})
    assert ingest_files(store, [first], run="split").ok
    # Without SNAP keywords the second file of the visit would be numbered snap 0 again: refused,
    # with the fix, and the stored snap is untouched.
    report = ingest_files(store, [second], run="split")
    assert not report.refs and [p for p, _ in report.failures] == [second]
    assert "already has snap 0, from" in report.failures[0][1] and "in one call" in report.failures[0][1]
    stored = store.get("post_isr_image", run="split", instrument="My_Cam", visit=11, detector=3, snap=0)
    np.testing.assert_array_equal(stored.variance, read_raw_file(first).exposure.variance)
    # Re-ingesting the same file is idempotent: its stored dataset is returned, not rewritten (a
    # rewrite would be a new input version and recompute the detector).
    version = store.version("post_isr_image", run="split", instrument="My_Cam", visit=11, detector=3, snap=0)
    again = ingest_files(store, [first], run="split")
    assert again.ok and [r.snap for r in again.refs] == [0]
    assert store.version("post_isr_image", run="split", instrument="My_Cam", visit=11, detector=3, snap=0) == version
    # A second snap with its SNAP keyword is added.
    with_keyword = _write(tmp_path / "second_kw.fits", seed=3, VISIT=11, SNAP=1)
    assert ingest_files(store, [with_keyword], run="split").ok
    # Two snaps numbered by time in one call; the later one re-ingested alone (numbered 0 by that
    # call) is recognised by its bytes as snap 1, not refused as a clash with snap 0.
    assert [r.snap for r in ingest_files(store, [second, first], run="pair").refs] == [0, 1]
    alone = ingest_files(store, [second], run="pair")
    assert alone.ok and [r.snap for r in alone.refs] == [1]
    # A stored snap is not replaced by a file that claims its number either.
    other = _write(tmp_path / "other.fits", seed=4, VISIT=11, SNAP=1)
    report = ingest_files(store, [other], run="split")
    assert not report.ok and "already has snap 1, from" in report.failures[0][1]


def test_third_snap_and_mismatched_shapes_fail_the_group_only(tmp_path: Path, store: ArtifactStore) -> None:
    trio = [_write(tmp_path / f"t{i}.fits", seed=i, VISIT=5) for i in range(3)]
    other = _write(tmp_path / "other.fits", VISIT=6)
    report = ingest_files(store, [*trio, other])
    assert [r.visit for r in report.refs] == [6]
    assert sorted(p for p, _ in report.failures) == sorted(trio)
    assert all("at most two snaps" in m and "VISIT" in m for _, m in report.failures)
    small = _write(tmp_path / "small.fits", seed=7, VISIT=8, shape=(NY, NX - 10))
    big = _write(tmp_path / "big.fits", seed=8, VISIT=8, **{"DATE-OBS": "2024-01-31T03:05:00.0"})
    report = ingest_files(store, [small, big])
    assert not report.refs and sorted(p for p, _ in report.failures) == sorted([small, big])
    assert "differ in shape" in report.failures[0][1]


def test_unreadable_and_wcs_less_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not FITS")
    with pytest.raises(IngestError, match="junk.fits"):
        read_raw_file(str(junk))
    nowcs = _write(tmp_path / "nowcs.fits", CTYPE1=None, CTYPE2=None)
    with pytest.raises(IngestError, match="no celestial WCS"):
        read_raw_file(nowcs)
    with pytest.raises(IngestError, match="BUNIT"):
        read_raw_file(_write(tmp_path / "flux.fits", BUNIT="nJy"))


def test_multi_extension_layout_is_ingested_losslessly(tmp_path: Path, store: ArtifactStore) -> None:
    rng = np.random.default_rng(9)
    raw = read_raw_file(_write(tmp_path / "src.fits")).exposure
    mask = rng.integers(0, 1 << 9, (NY, NX)).astype(np.uint32)
    e = Exposure(raw.image, mask, raw.variance * 1.5, VisitInfo(77, 15.0, 60340.2, "r", "r_03", 10.5, 41.2, 25.0,
                                                               instrument="sim"),
                 DetectorInfo(4, "S04", 1.1, 4.0, 60000.0), wcs=raw.wcs, origin=(16, 24))
    path = tmp_path / "ours.fits"
    path.write_bytes(exposure_to_fits_bytes(e))
    report = ingest_files(store, [str(path)], overrides={"DETECTOR": 5})
    assert report.ok and (report.refs[0].visit, report.refs[0].detector) == (77, 5)
    back = store.get_ref(report.refs[0])
    np.testing.assert_array_equal(back.mask, mask)
    np.testing.assert_array_equal(back.variance, e.variance)
    assert back.origin == (16, 24) and back.detector.name == "S04" and back.visit_info.mjd_tai == 60340.2
    # Our layout without a WCS is refused at ingest (calibration could not load reference stars).
    nowcs = tmp_path / "nowcs_ours.fits"
    nowcs.write_bytes(exposure_to_fits_bytes(e.replace(wcs=None)))
    with pytest.raises(IngestError, match="no celestial WCS in the IMAGE header"):
        read_raw_file(str(nowcs))


def test_placeholder_values_count_as_missing(tmp_path: Path) -> None:
    # Observatory headers write 'N/A' or 'UNKNOWN' for values they do not know (e.g. LCO's ROTANGLE).
    path = _write(tmp_path / "na.fits", ROTANGLE="N/A", AIRMASS="UNKNOWN", DETECTOR="N/A", CCDNUM=4)
    e = read_raw_file(path).exposure
    assert e.detector.id == 4  # the next keyword in line is used
    assert math.isnan(e.visit_info.airmass)
    # From the CD matrix instead, never a default such as 0.
    assert e.visit_info.rotation_angle_deg == pytest.approx(ROTATION_DEG, abs=1e-9)
    # A required keyword given as a placeholder is reported as missing, with the fix.
    bad = _write(tmp_path / "bad.fits", EXPTIME="N/A")
    with pytest.raises(IngestError, match="EXPTIME"):
        read_raw_file(bad)


def test_header_seeing_is_recorded_in_pixels(tmp_path: Path) -> None:
    # For calibrate's psf_fallback='seeing': the CP's FWHM is in pixels; SEEING is in arcsec and
    # goes through the WCS scale (0.2"/px); no keyword, no entry.
    fwhm_px = read_raw_file(_write(tmp_path / "a.fits", FWHM=4.2)).exposure.metadata["seeing_fwhm_pix"]
    assert fwhm_px == pytest.approx(4.2)
    seeing = read_raw_file(_write(tmp_path / "b.fits", SEEING=0.9)).exposure.metadata["seeing_fwhm_pix"]
    assert seeing == pytest.approx(4.5, rel=1e-9)  # 0.9" / 0.2"/px, exact up to round-off
    assert "seeing_fwhm_pix" not in read_raw_file(_write(tmp_path / "c.fits")).exposure.metadata


def test_observatory_site_from_the_keywords_observatories_write(tmp_path: Path) -> None:
    # Longitude conventions differ: FITS's OBSGEO-L and LCO's LONGITUD ("[deg East]") are east,
    # NOIRLab's SITELONG ("degrees W") and OBS-LONG (no sign in the comment) are west-positive.
    # A site the header does not give is unknown (NaN), never another observatory's.
    from astropy.coordinates import EarthLocation

    from singleframe.exposure import zenith_distance_deg

    def site(name: str, **cards: Any) -> tuple[float, float, float]:
        hdr = _header(**{k: v for k, v in cards.items() if not isinstance(v, tuple)})
        for key, value in cards.items():
            if isinstance(value, tuple):
                hdr[key] = value  # (value, comment)
        path = tmp_path / f"{name}.fits"
        fits.PrimaryHDU(_image(1), header=hdr).writeto(path)
        return read_raw_file(str(path)).exposure.visit_info.observatory_lon_lat_height

    assert all(math.isnan(v) for v in site("none"))
    assert site("geo", **{"OBSGEO-L": -70.75, "OBSGEO-B": -30.24, "OBSGEO-H": 2663.0}) == (-70.75, -30.24, 2663.0)
    lco = site("lco", LONGITUD=(-16.511703, "[deg East] Telescope Longitude"), LATITUDE=28.300308, HEIGHT=2390.0)
    assert lco == (-16.511703, 28.300308, 2390.0)
    bok = site("bok", SITELONG=("111:36.0", "Longitude (degrees W)"), SITELAT=("31:58.8", "Latitude (degrees N)"))
    assert bok == pytest.approx((-111.6, 31.98, 0.0), abs=1e-9)  # sexagesimal, exact up to round-off
    loc = EarthLocation.from_geodetic(-16.511703, 28.300308, 2390.0)
    xyz = {k: float(v.to_value("m")) for k, v in zip(("OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z"), loc.geocentric, strict=True)}
    assert site("xyz", **xyz) == pytest.approx((-16.511703, 28.300308, 2390.0), abs=1e-6)
    # An unsigned OBS-LONG: the sign whose zenith distance matches AIRMASS. The boresight is put
    # 20 deg from the zenith of the west-positive reading (Kitt Peak); east, it is far from it.
    mjd = Time("2024-01-31T03:04:20.0", scale="utc").tai.mjd  # mid-exposure
    ras = np.arange(0.0, 360.0, 0.25)
    zds = np.array([zenith_distance_deg(r, 31.96, mjd, -111.6, 31.96) for r in ras])
    ra0 = float(ras[np.argmin(np.abs(zds - 20.0))])
    assert abs(zenith_distance_deg(ra0, 31.96, mjd, 111.6, 31.96) - 20.0) > 10.0
    cards = {"OBS-LONG": ("111:36.0", "[deg] Observatory longitude"), "OBS-LAT": "31:57.6", "OBS-ELEV": 2120,
             "BORE-RA": ra0, "BORE-DEC": 31.96}
    kpno = site("kpno", AIRMASS=1.0 / math.cos(math.radians(20.0)), **cards)
    assert kpno == pytest.approx((-111.6, 31.96, 2120.0), abs=1e-9)
    assert site("kpno_no_airmass", **cards)[0] == pytest.approx(111.6)  # east: the FITS convention
    # A comment stating a sign rule is no answer; nor is a card's old comment under an override.
    assert site("rule", AIRMASS=1.0 / math.cos(math.radians(20.0)),
                **{**cards, "OBS-LONG": ("111:36.0", "Telescope longitude [deg], W < 0")})[0] == pytest.approx(-111.6)
    hdr = _header(**{"OBS-LAT": 31.96})
    hdr["OBS-LONG"] = (111.6, "Longitude (degrees W)")
    fits.PrimaryHDU(_image(1), header=hdr).writeto(tmp_path / "override.fits")
    overridden = read_raw_file(str(tmp_path / "override.fits"), overrides={"OBS-LONG": -111.6})
    assert overridden.exposure.visit_info.observatory_lon_lat_height[0] == -111.6  # as given, east


def test_a_date_without_time_of_day_is_completed_or_refused(tmp_path: Path) -> None:
    # SDSS: DATE-OBS holds the TAI date and TAIHMS the time. A date alone is not a time: it would
    # give every frame of the night one visit id and misplace the sky by hours.
    sdss = _write(tmp_path / "sdss.fits", **{"DATE-OBS": "2009-11-18", "TAIHMS": "02:23:45.93"})
    start = Time("2009-11-18T02:23:45.93", scale="tai")
    assert read_raw_file(sdss).exposure.visit_info.mjd_tai == pytest.approx(start.mjd + 15.0 / 86400, abs=1e-9)
    kpno = _write(tmp_path / "kpno.fits", **{"DATE-OBS": "2015-12-14", "UT": "02:17:23"})
    start = Time("2015-12-14T02:17:23", scale="utc")
    assert read_raw_file(kpno).exposure.visit_info.mjd_tai == pytest.approx(start.tai.mjd + 15.0 / 86400, abs=1e-9)
    bare = _write(tmp_path / "bare.fits", **{"DATE-OBS": "2009-11-18"})
    with pytest.raises(IngestError, match="not the time of day.*--set 'MJD-OBS=<start MJD>'"):
        read_raw_file(bare)


def test_decam_detector_serial_and_per_amplifier_gains(tmp_path: Path) -> None:
    # DECam: DETECTOR is the CCD's serial, CCDNUM the integer id; gain and read noise per amplifier.
    path = _write(tmp_path / "decam.fits", DETECTOR="S3-177_107419-14-1", CCDNUM=37, GAIN=None, RDNOISE=None,
                  GAINA=4.0, GAINB=4.4, RDNOISEA=6.0, RDNOISEB=7.0)
    det = read_raw_file(path).exposure.detector
    assert det.id == 37 and det.gain_e_per_count == pytest.approx(4.2) and det.read_noise_e == pytest.approx(6.5)
    # A whole-detector value given (here READNOIS, as --set would) wins over the amplifiers'.
    assert read_raw_file(path, overrides={"READNOIS": 5.0}).exposure.detector.read_noise_e == 5.0
    with pytest.raises(IngestError, match=r"no integer detector id.*--set 'DETECTOR=<int>'"):
        read_raw_file(_write(tmp_path / "serial.fits", DETECTOR="S3-177"))


@pytest.mark.parametrize("suffix", [".fits.gz", ".fits.bz2"])
def test_whole_file_compressed_fits_is_read(tmp_path: Path, suffix: str) -> None:
    import bz2
    import gzip

    plain = Path(_write(tmp_path / "plain.fits"))
    packed = tmp_path / f"packed{suffix}"
    packed.write_bytes((gzip.compress if suffix.endswith("gz") else bz2.compress)(plain.read_bytes()))
    a, b = read_raw_file(str(plain)).exposure, read_raw_file(str(packed)).exposure
    np.testing.assert_array_equal(a.image, b.image)
    assert a.visit_info == b.visit_info
    data = packed.read_bytes()
    for name, bad in (("truncated", data[:200]), ("corrupt", data[:20] + bytes(b ^ 0x5A for b in data[20:400]))):
        broken = tmp_path / f"{name}{suffix}"
        broken.write_bytes(bad)
        with pytest.raises(IngestError, match="does not decompress"):  # zlib.error too, not a crash
            read_raw_file(str(broken))
