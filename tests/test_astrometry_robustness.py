"""Catalogue-level robustness of the astrometric fit on 4096² detectors (issue 4).

Scenes are built from a true camera WCS: references carry a few mas of noise;
detections carry centroid noise, miss a fraction of the stars and include
spurious sources / galaxies without a reference. The fit starts from a camera
WCS with pointing, rotation and scale errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from scenes import noisy_refcat

from singleframe.camera import square_mosaic
from singleframe.errors import AstrometryError
from singleframe.steps.astrometry import AstrometryConfig, fit_astrometry

N = 4096
NX, NY = N, N
ORIGIN = (0, 4096 * 5 + 17)  # a non-zero parent origin
RA0, DEC0, ROT0 = 40.0, -45.0, 30.0
DETECTOR = 5  # right-hand detector of a 3x3 mosaic: rotation errors also shift it by ~40"
PIX_ARCSEC = 0.2
MARGIN_ARCSEC = 700.0  # refs cover the detector grown by the largest pointing + rotation shift


def _camera(scale: float = 1.0):
    # 0.2"/px; cubic radial distortion reaching ~0.8 % at the far corner of the off-axis detector.
    return square_mosaic("robust", n_side=3, nx=NX, ny=NY, distortion_k3_per_mm2=2e-6,
                         plate_scale_arcsec_per_mm=20.0 * scale)


def _magnitudes(rng: np.random.Generator, n: int) -> np.ndarray:
    # Power-law counts between 16 and 22 mag: many faint stars, few bright ones (dN/dm ∝ 10^(0.3 m)).
    return 16.0 + np.log10(1 + rng.random(n) * (10 ** (0.3 * 6.0) - 1)) / 0.3


def _refcat(rng: np.random.Generator, ra: np.ndarray, dec: np.ndarray, ref_noise_mas: float) -> Table:
    flux_njy = 10 ** (-0.4 * (_magnitudes(rng, len(ra)) - 31.4))
    return noisy_refcat(rng, ra, dec, flux_njy, noise_mas=ref_noise_mas, first_id=1_000_000)


def observe(rng: np.random.Generator, truth: WCS, ref: Table, *, n_spurious: int, missing: float = 0.15) -> Table:
    """Detections of ``ref`` through ``truth``: centroid noise, missing stars, spurious sources/galaxies."""
    cra, cdec = truth.all_pix2world([(NX - 1) / 2], [(NY - 1) / 2], 0)
    ra, dec = np.asarray(ref["ra"]), np.asarray(ref["dec"])
    near = np.flatnonzero((np.abs(dec - cdec[0]) < 0.3)
                          & (np.abs(((ra - cra[0] + 180) % 360 - 180) * np.cos(np.radians(dec))) < 0.3))
    x, y = truth.all_world2pix(ra[near], dec[near], 0)
    on = (x > 3) & (x < NX - 4) & (y > 3) & (y < NY - 4) & (rng.random(len(near)) > missing)
    x, y, flux_njy = x[on], y[on], np.asarray(ref["r_flux"])[near[on]]
    # Instrumental counts: colour scatter of 0.2 mag between the reference band and the detector.
    counts = flux_njy * 0.5 * 10 ** (-0.4 * rng.normal(0, 0.2, len(x)))
    sx = rng.uniform(3, NX - 4, n_spurious)
    sy = rng.uniform(3, NY - 4, n_spurious)
    s_counts = 10 ** rng.uniform(np.log10(counts.min() + 1), np.log10(np.percentile(counts, 99) + 1), n_spurious)
    xs, ys, cs = np.r_[x, sx], np.r_[y, sy], np.r_[counts, s_counts]
    err_counts = np.sqrt(cs + 400.0)
    # Centroid noise ~ FWHM / S/N (FWHM 4 px), floored at 0.005 px.
    cerr = np.maximum(4.0 / (cs / err_counts), 0.005)
    src = Table()
    src["id"] = np.arange(1, len(xs) + 1, dtype=np.int64)
    src["base_SdssCentroid_x"] = xs + rng.normal(0, cerr) + ORIGIN[0]
    src["base_SdssCentroid_y"] = ys + rng.normal(0, cerr) + ORIGIN[1]
    src["base_SdssCentroid_xErr"] = cerr
    src["base_SdssCentroid_yErr"] = cerr
    src["base_PsfFlux_instFlux"] = cs
    src["base_PsfFlux_instFluxErr"] = err_counts
    return src[rng.permutation(len(src))]


def make_scene(seed: int, *, n_star_on_detector: int, n_spurious: int, missing: float = 0.15,
               ref_noise_mas: float = 5.0, truth: WCS | None = None, margin_arcsec: float = MARGIN_ARCSEC):
    """Sources and refs of a field seen through ``truth`` (default: the camera WCS at RA0, DEC0, ROT0).

    References are uniform over the detector grown by ``margin_arcsec``.
    """
    rng = np.random.default_rng(seed)
    truth = truth if truth is not None else _camera().initial_wcs(DETECTOR, RA0, DEC0, ROT0)
    grow = margin_arcsec / PIX_ARCSEC
    n_ref = int(n_star_on_detector * ((N + 2 * grow) / N) ** 2)
    ra, dec = truth.all_pix2world(rng.uniform(-grow, N + grow, n_ref), rng.uniform(-grow, N + grow, n_ref), 0)
    ref = _refcat(rng, ra, dec, ref_noise_mas)
    return truth, observe(rng, truth, ref, n_spurious=n_spurious, missing=missing), ref


def sky_cap(rng: np.random.Generator, ra0: float, dec0: float, radius_deg: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform on the sphere within ``radius_deg`` of (ra0, dec0)."""
    cos_r = np.cos(np.radians(radius_deg))
    z = rng.uniform(cos_r, 1.0, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    rho = np.sqrt(1 - z**2)
    v = np.stack([rho * np.cos(phi), rho * np.sin(phi), z])  # around the pole
    a, d = np.radians(ra0), np.radians(dec0)
    # Rotate the pole to (ra0, dec0): about y by (90° - dec0), then about z by ra0.
    ry = np.array([[np.sin(d), 0, np.cos(d)], [0, 1, 0], [-np.cos(d), 0, np.sin(d)]])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    x, y, zz = rz @ ry @ v
    return np.degrees(np.arctan2(y, x)) % 360, np.degrees(np.arcsin(np.clip(zz, -1, 1)))


def grid_error_mas(truth: WCS, wcs: WCS) -> float:
    gx, gy = np.meshgrid(np.linspace(0, NX - 1, 20), np.linspace(0, NY - 1, 20))
    a = np.array(truth.all_pix2world(gx.ravel(), gy.ravel(), 0))
    b = np.array(wcs.all_pix2world(gx.ravel(), gy.ravel(), 0))
    d = np.hypot((a[0] - b[0]) * np.cos(np.radians(a[1])), a[1] - b[1]) * 3.6e6
    return float(np.sqrt(np.mean(d**2)))


def initial_wcs(d_arcmin: float, angle_deg: float, d_rot_deg: float, scale: float) -> WCS:
    dra = d_arcmin / 60 * np.cos(np.radians(angle_deg)) / np.cos(np.radians(DEC0))
    ddec = d_arcmin / 60 * np.sin(np.radians(angle_deg))
    return _camera(scale).initial_wcs(DETECTOR, RA0 + dra, DEC0 + ddec, ROT0 + d_rot_deg)


# The issue's grid: pointing 0 and 5' (two directions), rotation 0/±3°, scale ±2 %, plus one interior point.
GRID = [(d, ang, rot, sc) for d, ang in ((0.0, 0.0), (5.0, 35.0), (5.0, 250.0))
        for rot in (-3.0, 0.0, 3.0) for sc in (0.98, 1.02)] + [(2.5, 130.0, 1.5, 1.0)]
DENSITIES = {"sparse": dict(n_star_on_detector=100, n_spurious=15),
             "dense": dict(n_star_on_detector=14000, n_spurious=8000)}


@pytest.fixture(scope="module", params=sorted(DENSITIES))
def field(request):
    truth, src, ref = make_scene(1, **DENSITIES[request.param])
    return request.param, truth, src, ref


def test_solve_rate_over_initial_error_grid(field):
    """100 % solve rate over pointing 0–5', rotation 0–3°, scale 0–2 % for ~100 and ~20 000 sources."""
    name, truth, src, ref = field
    errors, failures = [], []
    for d, ang, rot, sc in GRID:
        try:
            res = fit_astrometry(src, ref, initial_wcs=initial_wcs(d, ang, rot, sc), origin=ORIGIN, shape=(NY, NX))
        except AstrometryError as exc:
            failures.append(((d, ang, rot, sc), str(exc)))
            continue
        assert not res.blind  # the grid is inside the pattern stage's search range
        errors.append(grid_error_mas(truth, res.wcs))
    assert not failures, failures
    if name == "dense":
        # ≥ 10 000 matches with 5 mas reference noise: the bar is 2 mas (measured ~0.2-0.4 mas).
        assert max(errors) <= 2.0
    else:
        # ~80 matches, faint ones with ~15 mas centroid noise: ~3 mas expected; 6 mas leaves room for the seed.
        assert max(errors) <= 6.0


def test_dense_4096_detector_at_the_corner_of_the_grid(field):
    """A ~20 000-source 4096² detector at the worst corner of the error grid (speed: see make bench)."""
    name, truth, src, ref = field
    if name != "dense":
        pytest.skip("only the dense field")
    initial = initial_wcs(5.0, 35.0, 3.0, 1.02)
    res = fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))
    assert grid_error_mas(truth, res.wcs) <= 2.0


def test_header_round_trip(field):
    """The fitted TAN-SIP WCS written as a FITS header and read back by astropy maps pixels identically."""
    _, truth, src, ref = field
    res = fit_astrometry(src, ref, initial_wcs=initial_wcs(2.5, 130.0, 3.0, 1.02), origin=ORIGIN, shape=(NY, NX))
    back = WCS(res.wcs.to_header(relax=True))
    assert back.sip is not None
    gx, gy = np.meshgrid(np.linspace(0, NX - 1, 30), np.linspace(0, NY - 1, 30))
    a = np.array(res.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0))
    b = np.array(back.all_pix2world(gx.ravel(), gy.ravel(), 0))
    d = np.hypot((a[0] - b[0]) * np.cos(np.radians(a[1])), a[1] - b[1]) * 3.6e6
    # The header carries the same TAN-SIP model: the round trip only loses the %20.12G formatting (< 1 µas).
    assert d.max() < 1e-3
    # The inverse SIP in the header inverts the forward one to < 1 mpix (it is kept or refitted to that).
    x, y = back.all_world2pix(a[0], a[1], 0)
    assert np.max(np.hypot(x - gx.ravel(), y - gy.ravel())) < 1e-3


def _wrong_field_frame(i: int):
    """Sources of one field against references of another field at the same place."""
    rng = np.random.default_rng(1000 + i)
    n = (100, 300, 1000)[i % 3]
    _, src, _ = make_scene(2000 + i, n_star_on_detector=n, n_spurious=n // 5, margin_arcsec=400.0)
    _, _, other = make_scene(3000 + i, n_star_on_detector=n, n_spurious=0, margin_arcsec=400.0)
    g = (rng.uniform(0, 5), rng.uniform(0, 360), rng.uniform(-3, 3), rng.uniform(0.98, 1.02))
    return src, other, initial_wcs(*g)


def test_zero_silent_failures_wrong_field_or_blank():
    """50 hopeless frames (40 wrong fields, 10 with 3–5 sources): every one raises AstrometryError."""
    confidences = []
    for i in range(50):
        if i < 40:
            src, ref, initial = _wrong_field_frame(i)
        else:
            _, src, ref = make_scene(4000 + i, n_star_on_detector=300, n_spurious=20, margin_arcsec=400.0)
            src = src[: 3 + i % 3]
            initial = initial_wcs(1.0, 10.0 * i, 0.5, 1.0)
        with pytest.raises(AstrometryError) as info:
            fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))
        meta = info.value.metadata
        assert meta["n_sources"] == len(src)
        if i < 40:
            # Both searches ran (blind fallback is on by default) and both were rejected.
            assert "blind_n_refs" in meta
            confidences.append(meta.get("blind_confidence", 0.0))
    # Blind verification of wrong fields: measured max confidence 0.997, below the 0.999 threshold;
    # right 4096² frames reach 1 - 1e-20 or better (test_right_frames_confidence). The pattern stage's
    # chance level is a window mean: wrong fields reach up to 0.9996 there and are stopped by the
    # refinement checks (match count, rms, mean offset), which the pytest.raises above covers.
    assert max(confidences) < AstrometryConfig().min_match_confidence, sorted(confidences)[-5:]


def test_right_frames_confidence(field):
    _, _, src, ref = field
    res = fit_astrometry(src, ref, initial_wcs=initial_wcs(5.0, 250.0, -3.0, 0.98), origin=ORIGIN, shape=(NY, NX))
    # Even ~80 sparse matches give a peak tens of pairs above a chance level of ~1: FAP < 1e-20.
    assert 1.0 - res.match_confidence < 1e-20


def _blind_scene(seed: int, *, per_detector: int, n_spurious: int, offset_deg: float, radius_deg: float = 2.0):
    """A refcat over the whole search circle; the truth is ``offset_deg`` away and rotated by 40°."""
    rng = np.random.default_rng(seed)
    initial = _camera().initial_wcs(DETECTOR, RA0, DEC0, ROT0)
    cra, cdec = initial.all_pix2world([(NX - 1) / 2], [(NY - 1) / 2], 0)
    det_deg2 = (N * PIX_ARCSEC / 3600) ** 2
    cap = radius_deg + 0.1  # the circle plus the detector's half-diagonal
    ra, dec = sky_cap(rng, cra[0], cdec[0], cap, int(per_detector * np.pi * cap**2 / det_deg2))
    ref = _refcat(rng, ra, dec, 5.0)
    ang = rng.uniform(0, 2 * np.pi)
    truth = _camera().initial_wcs(DETECTOR, RA0 + offset_deg * np.cos(ang) / np.cos(np.radians(DEC0)),
                                  DEC0 + offset_deg * np.sin(ang), ROT0 + 40.0)
    return truth, observe(rng, truth, ref, n_spurious=n_spurious), ref, initial


@pytest.mark.parametrize(("per_detector", "n_spurious"), [(100, 15), (1000, 500)])
def test_blind_fallback_one_degree_off(per_detector, n_spurious):
    """Header WCS 1° off (and 40° rotated): the quad search over a 2° radius finds the field."""
    truth, src, ref, initial = _blind_scene(21, per_detector=per_detector, n_spurious=n_spurious, offset_deg=1.0)
    res = fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX),
                         config=AstrometryConfig(blind_search_radius_deg=2.0))
    assert res.blind and res.blind_confidence > 0.999
    # Same accuracy as a normal solve once the blind stage has found the field (sparse: ~80 matches).
    assert grid_error_mas(truth, res.wcs) <= (2.0 if per_detector >= 500 else 6.0)
    with pytest.raises(AstrometryError, match="no significant match"):
        fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX),
                       config=AstrometryConfig(blind_search_radius_deg=0.0))
