"""Astrometric calibration: match sources to a reference catalogue and fit an affine WCS.

The initial WCS comes from the camera model: an exact TAN-SIP description of
the optics, but with a pointing error of up to several arcminutes, a rotation
error of a few degrees and a scale error of a few per cent. The fit keeps the
camera's distortion (the SIP forward polynomial about ``CRPIX``) and solves for
the linear part on top of it, as Rubin's ``FitAffineWcsTask`` does.

Algorithm
---------
1. Source selection (Rubin's astrometry selector): S/N ≥ ``min_snr`` on
   ``base_PsfFlux``, no edge/saturated/interpolated-centre/centroid flag,
   finite centroid errors ≤ ``max_centroid_err_pix``.
2. Pattern stage (coarse, tolerant): sources are mapped through the SIP
   distortion to focal-plane pixel offsets ``f`` and then with the initial CD
   matrix to the tangent plane at the initial ``CRVAL``; references are
   projected gnomonically onto the same plane. The brightest
   spatially-balanced ~100 sources (brightest per grid cell) and references
   (same cells, same density) vote in a 2-D histogram of pair offsets
   ``ref − s R(θ) src`` over a grid of rotations θ and scales s whose steps
   keep the smear across the detector within one histogram bin. The peak is
   the pointing offset. Its Poisson false-alarm probability, corrected for
   the number of cells and (θ, s) trials, gives ``match_confidence``.
3. Refinement: nearest-neighbour matching (``cKDTree``) with a shrinking radius
   and a 6-parameter affine fit ``tangent = M f + t`` with 3σ clipping. After
   each fit the tangent point is re-centred (``CRVAL`` ← deprojection of
   ``t``) and ``CD`` ← ``M``; the references are re-projected. The SIP forward
   terms and ``CRPIX`` are kept; the inverse SIP is kept when it inverts the
   forward polynomial to < 1 mpix over the detector and refitted otherwise.
4. Checks: too few matches, low confidence, large rms or mean offset raise
   :class:`~singleframe.errors.AstrometryError`; a WCS is never returned
   unless it passed every check.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy import units as u
from astropy.table import Table
from astropy.wcs import WCS, Sip
from scipy.spatial import cKDTree
from scipy.stats import poisson

from ..errors import AstrometryError, ConfigError

ARCSEC_PER_RAD = 180.0 / math.pi * 3600.0

_BAD_SOURCE_FLAGS = (
    "base_PixelFlags_flag_edge",
    "base_PixelFlags_flag_nodata",
    "base_PixelFlags_flag_interpolatedCenter",
    "base_PixelFlags_flag_saturated",
    "base_SdssCentroid_flag",
)


@dataclass(frozen=True)
class AstrometryConfig:
    """Configuration of :func:`fit_astrometry`."""

    #: Minimum S/N on base_PsfFlux for a source to be used (Rubin: 40).
    min_snr: float = 40.0
    #: Source flags that exclude a source (absent columns are ignored).
    bad_flags: tuple[str, ...] = _BAD_SOURCE_FLAGS
    #: Largest accepted centroid error (pixels); Rubin uses 3.
    max_centroid_err_pix: float = 3.0
    #: Largest pointing error searched (arcsec, each axis).
    max_offset_arcsec: float = 600.0
    #: Largest rotation error searched (degrees).
    max_rotation_deg: float = 4.0
    #: Largest fractional scale error searched.
    max_scale_change: float = 0.03
    #: Number of spatially balanced bright sources used by the pattern stage.
    pattern_n_sources: int = 100
    #: Histogram bin of the pattern stage (pixels); also sets the (θ, s) grid steps.
    pattern_bin_pix: float = 25.0
    #: Minimum (false-alarm based) confidence of the pattern match.
    min_match_confidence: float = 0.999
    #: Smallest match radius of the refinement (arcsec).
    min_match_radius_arcsec: float = 0.05
    #: The match radius shrinks to this many times the clipped rms.
    match_radius_rms_factor: float = 5.0
    #: Clipping threshold of the affine fit (sigma).
    clip_sigma: float = 3.0
    #: Maximum number of match + fit iterations.
    max_iterations: int = 12
    #: Fewer final matches than this is a failure.
    min_matches: int = 10
    #: Larger final rms separation is a failure (arcsec).
    max_rms_arcsec: float = 0.5
    #: Larger mean separation is a failure (arcsec; Rubin's maxMeanDistanceArcsec).
    max_mean_offset_arcsec: float = 0.5

    def validate(self) -> None:
        """Raise :class:`ConfigError` on inconsistent values."""
        positive = ("min_snr", "max_centroid_err_pix", "max_offset_arcsec", "pattern_bin_pix",
                    "min_match_radius_arcsec", "match_radius_rms_factor", "clip_sigma",
                    "max_rms_arcsec", "max_mean_offset_arcsec")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"astrometry.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.max_rotation_deg < 45:
            raise ConfigError("astrometry.max_rotation_deg must be in [0, 45)")
        if not 0 <= self.max_scale_change < 0.5:
            raise ConfigError("astrometry.max_scale_change must be in [0, 0.5)")
        if not 0 <= self.min_match_confidence < 1:
            raise ConfigError("astrometry.min_match_confidence must be in [0, 1)")
        if self.min_matches < 3 or self.pattern_n_sources < 3:
            raise ConfigError("astrometry.min_matches and pattern_n_sources must be >= 3 (an affine fit needs 3 points)")
        if self.max_iterations < 1:
            raise ConfigError("astrometry.max_iterations must be >= 1")


@dataclass(frozen=True, eq=False)
class AstrometryResult:
    """The fitted WCS and its diagnostics.

    Attributes
    ----------
    wcs
        TAN-SIP WCS; array-pixel convention (pixel ``(0, 0)`` = parent ``origin``).
    matches
        Denormalised match table (``ref_*``, ``src_*``, ``distance`` [rad], ``distance_arcsec``).
    used
        Per input source: used in the final fit (→ ``calib_astrometry_used``).
    n_matches, rms_arcsec, offset_mean_arcsec, offset_std_arcsec
        Final matches used and their separations.
    match_confidence
        1 − false-alarm probability of the pattern match (≈1: right, ≈0: chance).
    n_iterations
        Match + fit iterations of the refinement.
    pattern_peak, pattern_background
        Height of the winning offset-histogram peak and the expected chance count.
    rotation_deg, scale
        Correction found by the pattern stage relative to the initial WCS.
    """

    wcs: WCS
    matches: Table
    used: npt.NDArray[np.bool_]
    n_matches: int
    rms_arcsec: float
    offset_mean_arcsec: float
    offset_std_arcsec: float
    match_confidence: float
    n_iterations: int
    pattern_peak: int = 0
    pattern_background: float = 0.0
    rotation_deg: float = 0.0
    scale: float = 1.0


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def fit_astrometry(sources: Table, refcat: Table, *, initial_wcs: WCS, origin: tuple[int, int],
                   shape: tuple[int, int], config: AstrometryConfig = AstrometryConfig()) -> AstrometryResult:
    """Fit a TAN-SIP WCS to ``sources`` using the reference catalogue ``refcat``.

    Parameters
    ----------
    sources
        Catalogue with ``base_SdssCentroid_x/_y`` (parent pixels, + ``Err``),
        ``base_PsfFlux_instFlux/_instFluxErr`` and pixel/centroid flags.
    refcat
        Reference table: ``id``, ``ra``, ``dec`` (deg, observation epoch), ``<band>_flux``.
    initial_wcs
        Camera-model WCS (array-pixel convention) used as the starting point.
    origin, shape
        Parent coordinates of array pixel ``[0, 0]``, and ``(ny, nx)``.
    config
        Step configuration.

    Returns
    -------
    AstrometryResult

    Raises
    ------
    AstrometryError
        Too few usable sources or references, no significant pattern match,
        too few final matches, or rms / mean offset above the limits.
    """
    config.validate()
    x0, y0 = origin
    n_src_total = len(sources)
    meta = {"n_sources": n_src_total, "n_refs": len(refcat), "n_matches": 0, "rms_arcsec": float("nan")}
    good = _select_sources(sources, config)
    meta["n_good_sources"] = int(good.sum())
    if good.sum() < config.min_matches:
        raise AstrometryError(
            f"only {int(good.sum())} of {n_src_total} sources are usable for astrometry (S/N >= {config.min_snr}, "
            f"unflagged); need {config.min_matches}. Check the PSF-star catalogue or lower astrometry.min_snr",
            meta)
    src_idx = np.flatnonzero(good)
    sx = np.asarray(sources["base_SdssCentroid_x"], float)[src_idx] - x0
    sy = np.asarray(sources["base_SdssCentroid_y"], float)[src_idx] - y0
    s_flux = np.asarray(sources["base_PsfFlux_instFlux"], float)[src_idx]

    ra = np.asarray(refcat["ra"], float)
    dec = np.asarray(refcat["dec"], float)
    ref_ok = np.isfinite(ra) & np.isfinite(dec)
    ref_idx = np.flatnonzero(ref_ok)
    if len(ref_idx) < config.min_matches:
        raise AstrometryError(f"the reference catalogue has only {len(ref_idx)} usable stars; "
                              f"need {config.min_matches}. Load a larger region or another catalogue", meta)
    r_ra, r_dec = ra[ref_idx], dec[ref_idx]
    r_flux = _ref_brightness(refcat)[ref_idx]

    wcs = copy.deepcopy(initial_wcs)
    wcs.wcs.set()
    # Focal-plane pixel offsets from CRPIX through the camera distortion; fixed from now on.
    f = _pix_to_focal(wcs, sx, sy)
    cd_arcsec = np.asarray(wcs.wcs.cd if wcs.wcs.has_cd() else wcs.wcs.get_pc() * wcs.wcs.cdelt[:, None]) * 3600.0
    crval = np.array(wcs.wcs.crval, float)

    # --- pattern stage -------------------------------------------------------------------------
    ny, nx = shape
    corners_f = _pix_to_focal(wcs, np.array([-0.5, nx - 0.5, nx - 0.5, -0.5]), np.array([-0.5, -0.5, ny - 0.5, ny - 0.5]))
    pix_scale_arcsec = math.sqrt(abs(np.linalg.det(cd_arcsec)))
    pat = _pattern_match(f @ cd_arcsec.T, s_flux, corners_f @ cd_arcsec.T, *_gnomonic(r_ra, r_dec, crval), r_flux,
                         pix_scale_arcsec=pix_scale_arcsec, detector_radius_pix=0.5 * math.hypot(nx, ny),
                         config=config)
    meta.update({"pattern_peak": pat.peak, "pattern_background": pat.background,
                 "match_confidence": pat.confidence})
    if pat.confidence < config.min_match_confidence:
        raise AstrometryError(
            f"no significant match between {len(src_idx)} sources and {len(ref_idx)} reference stars "
            f"(peak {pat.peak} pairs vs {pat.background:.2f} expected by chance; confidence {pat.confidence:.3g} < "
            f"{config.min_match_confidence}). Check the pointing, the reference catalogue region or "
            f"astrometry.max_offset_arcsec / max_rotation_deg", meta)

    # --- refinement: iterative NN matching + affine fit -------------------------------------------
    m = pat.linear @ cd_arcsec
    t = pat.shift.copy()
    radius = 1.5 * pat.bin_arcsec
    prev_pairs: tuple[int, ...] | None = None
    n_iter = 0
    keep = np.zeros(0, bool)
    si = ri = np.zeros(0, int)
    sep = np.zeros(0)
    for n_iter in range(1, config.max_iterations + 1):  # noqa: B007
        # Re-centre the tangent point on the current shift, so t stays ~0 and CRVAL carries the pointing.
        crval = _deproject(t[0], t[1], crval)
        t = np.zeros(2)
        rxi, reta = _gnomonic(r_ra, r_dec, crval)
        src_tp = f @ m.T
        si, ri, _ = _match_nn(src_tp, np.column_stack([rxi, reta]), radius)
        if len(si) < max(3, config.min_matches):
            meta["n_matches"] = len(si)
            raise AstrometryError(f"only {len(si)} matches within {radius:.3g} arcsec at iteration {n_iter}; need "
                                  f"{config.min_matches}. The pattern solution did not hold", meta)
        m, t, keep, sep = _fit_affine(f[si], np.column_stack([rxi[ri], reta[ri]]), config.clip_sigma)
        rms = float(np.sqrt(np.mean(sep[keep] ** 2)))
        new_radius = float(np.clip(config.match_radius_rms_factor * rms, config.min_match_radius_arcsec, radius))
        pairs = tuple((si[keep] * 1_000_003 + ri[keep]).tolist())
        converged = pairs == prev_pairs and new_radius == radius and math.hypot(*t) < 1e-4
        prev_pairs, radius = pairs, new_radius
        if converged:
            break
    crval = _deproject(t[0], t[1], crval)

    out = copy.deepcopy(initial_wcs)
    # A WCS read from a header carries PC + CDELT (wcslib ignores a CD set on top of a PC), a
    # WCS built in memory may carry CD: write the fitted matrix in the form the input uses.
    if out.wcs.has_cd():
        out.wcs.cd = m / 3600.0
    else:
        out.wcs.pc = m / 3600.0
        out.wcs.cdelt = [1.0, 1.0]
    out.wcs.crval = crval
    out.wcs.set()
    _ensure_inverse_sip(out, nx, ny)

    # --- final statistics on the fitted WCS ------------------------------------------------------
    si_k, ri_k = si[keep], ri[keep]
    s_ra, s_dec = out.all_pix2world(sx[si_k], sy[si_k], 0)
    dist = _angular_sep(np.radians(s_ra), np.radians(s_dec), np.radians(r_ra[ri_k]), np.radians(r_dec[ri_k]))
    dist_arcsec = dist * ARCSEC_PER_RAD
    n_matches = len(si_k)
    rms = float(np.sqrt(np.mean(dist_arcsec**2))) if n_matches else float("nan")
    mean_off = float(np.mean(dist_arcsec)) if n_matches else float("nan")
    std_off = float(np.std(dist_arcsec, ddof=1)) if n_matches > 1 else float("nan")
    meta.update({"n_matches": n_matches, "rms_arcsec": rms, "offset_mean_arcsec": mean_off})
    if n_matches < config.min_matches:
        raise AstrometryError(f"only {n_matches} astrometric matches survived clipping; need {config.min_matches}. "
                              "Use a deeper reference catalogue or more sources", meta)
    if not rms <= config.max_rms_arcsec:
        raise AstrometryError(f"astrometric rms {rms:.3f} arcsec exceeds astrometry.max_rms_arcsec="
                              f"{config.max_rms_arcsec}; the solution is not trustworthy", meta)
    if not mean_off <= config.max_mean_offset_arcsec:
        raise AstrometryError(f"mean match offset {mean_off:.3f} arcsec exceeds astrometry.max_mean_offset_arcsec="
                              f"{config.max_mean_offset_arcsec}; the solution is not trustworthy", meta)

    used = np.zeros(n_src_total, bool)
    used[src_idx[si_k]] = True
    matches = _match_table(sources, refcat, src_idx[si_k], ref_idx[ri_k], np.radians(s_ra), np.radians(s_dec),
                           dist)
    return AstrometryResult(
        wcs=out, matches=matches, used=used, n_matches=n_matches, rms_arcsec=rms, offset_mean_arcsec=mean_off,
        offset_std_arcsec=std_off, match_confidence=pat.confidence, n_iterations=n_iter, pattern_peak=pat.peak,
        pattern_background=pat.background, rotation_deg=pat.rotation_deg, scale=pat.scale)


def compute_coordinates(catalog: Table, wcs: WCS | None, origin: tuple[int, int]) -> Table:
    """Return a copy of ``catalog`` with sky coordinates from ``wcs``.

    Adds ``coord_ra``, ``coord_dec`` (rad), ``coord_raErr``, ``coord_decErr``
    (rad; the error of the RA angle itself, i.e. not multiplied by cos δ) and
    ``coord_ra_dec_Cov`` (rad²), propagated from the centroid errors
    (``base_SdssCentroid_xErr/_yErr``, uncorrelated) through the local WCS
    Jacobian. With ``wcs=None`` every value is NaN (Rubin's behaviour after
    an astrometry failure).
    """
    out = catalog.copy(copy_data=True)
    n = len(out)
    nan = np.full(n, np.nan)
    if wcs is None or n == 0:
        ra = dec = era = edec = cov = nan
    else:
        x0, y0 = origin
        x = np.asarray(out["base_SdssCentroid_x"], float) - x0
        y = np.asarray(out["base_SdssCentroid_y"], float) - y0
        ok = np.isfinite(x) & np.isfinite(y)
        xs, ys = np.where(ok, x, 0.0), np.where(ok, y, 0.0)
        # One-pixel finite differences: the WCS is smooth on that scale (SIP of low order).
        pts = np.concatenate([np.column_stack([xs, ys]), np.column_stack([xs + 1.0, ys]),
                              np.column_stack([xs, ys + 1.0])])
        world = np.radians(wcs.all_pix2world(pts, 0))
        ra0, dec0 = world[:n, 0], world[:n, 1]
        dra_dx = _wrap(world[n:2 * n, 0] - ra0)
        ddec_dx = world[n:2 * n, 1] - dec0
        dra_dy = _wrap(world[2 * n:, 0] - ra0)
        ddec_dy = world[2 * n:, 1] - dec0
        ex = _column_or(out, "base_SdssCentroid_xErr", np.nan)
        ey = _column_or(out, "base_SdssCentroid_yErr", np.nan)
        var_ra = (dra_dx * ex) ** 2 + (dra_dy * ey) ** 2
        var_dec = (ddec_dx * ex) ** 2 + (ddec_dy * ey) ** 2
        cov = np.where(ok, dra_dx * ddec_dx * ex**2 + dra_dy * ddec_dy * ey**2, np.nan)
        ra = np.where(ok, np.mod(ra0, 2 * np.pi), np.nan)
        dec = np.where(ok, dec0, np.nan)
        era = np.where(ok, np.sqrt(var_ra), np.nan)
        edec = np.where(ok, np.sqrt(var_dec), np.nan)
    out["coord_ra"] = np.asarray(ra, float) * u.rad
    out["coord_dec"] = np.asarray(dec, float) * u.rad
    out["coord_raErr"] = np.asarray(era, float) * u.rad
    out["coord_decErr"] = np.asarray(edec, float) * u.rad
    out["coord_ra_dec_Cov"] = np.asarray(cov, float) * u.rad**2
    return out


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------
def _column_or(table: Table, name: str, default: float) -> npt.NDArray[np.float64]:
    if name in table.colnames:
        return np.asarray(table[name], float)
    return np.full(len(table), default)


def _select_sources(sources: Table, config: AstrometryConfig) -> npt.NDArray[np.bool_]:
    n = len(sources)
    if n == 0:
        return np.zeros(0, bool)
    x = np.asarray(sources["base_SdssCentroid_x"], float)
    y = np.asarray(sources["base_SdssCentroid_y"], float)
    flux = np.asarray(sources["base_PsfFlux_instFlux"], float)
    err = _column_or(sources, "base_PsfFlux_instFluxErr", np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / err
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0) & (snr >= config.min_snr)
    for name in config.bad_flags:
        if name in sources.colnames:
            good &= ~np.asarray(sources[name], bool)
    for name in ("base_SdssCentroid_xErr", "base_SdssCentroid_yErr"):
        if name in sources.colnames:
            e = np.asarray(sources[name], float)
            # Rubin requires finite errors <= 3 px; a missing (NaN) error column entry excludes the source.
            good &= np.isfinite(e) & (e <= config.max_centroid_err_pix)
    if "sky_source" in sources.colnames:
        good &= ~np.asarray(sources["sky_source"], bool)
    return good


def _ref_brightness(refcat: Table) -> npt.NDArray[np.float64]:
    """Brightness used to rank references: the sum of all ``<band>_flux`` columns (NaN as 0)."""
    cols = [c for c in refcat.colnames if c.endswith("_flux") and not c.endswith("_fluxErr")]
    if not cols:
        return np.ones(len(refcat))
    total = np.zeros(len(refcat))
    for c in cols:
        v = np.asarray(refcat[c], float)
        total += np.where(np.isfinite(v) & (v > 0), v, 0.0)
    return total


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
def _pix_to_focal(wcs: WCS, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Array pixels (0-based) to focal-plane pixel offsets from CRPIX through the SIP forward polynomial."""
    # Evaluated here from the SIP definition (u = pixel - CRPIX, f = u + A(u, v)) rather than with
    # ``WCS.sip_pix2foc``, whose origin handling of the output is not the one all_pix2world uses.
    crpix0 = np.asarray(wcs.wcs.crpix, float) - 1.0
    du = np.asarray(x, float) - crpix0[0]
    dv = np.asarray(y, float) - crpix0[1]
    if wcs.sip is None:
        return np.column_stack([du, dv])
    return np.column_stack([du + _sip_poly(wcs.sip.a, du, dv), dv + _sip_poly(wcs.sip.b, du, dv)])


def _sip_poly(coeffs: npt.NDArray[np.float64], u: npt.NDArray[np.float64],
              v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out = np.zeros_like(u)
    c = np.asarray(coeffs, float)
    for i in range(c.shape[0]):
        for j in range(c.shape[1] - i):
            if c[i, j] != 0.0:
                out += c[i, j] * u**i * v**j
    return out


def _gnomonic(ra_deg: npt.NDArray[np.float64], dec_deg: npt.NDArray[np.float64],
              crval: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Gnomonic projection (arcsec) about ``crval``; xi to the east (+RA), eta to the north (FITS IWC)."""
    a = np.radians(ra_deg)
    d = np.radians(dec_deg)
    a0, d0 = math.radians(crval[0]), math.radians(crval[1])
    cos_c = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cos_c
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cos_c
    # Points on the far hemisphere cannot be on the detector.
    bad = cos_c <= 0
    xi = np.where(bad, np.inf, xi)
    eta = np.where(bad, np.inf, eta)
    return xi * ARCSEC_PER_RAD, eta * ARCSEC_PER_RAD


def _deproject(xi_arcsec: float, eta_arcsec: float, crval: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Inverse gnomonic projection of one tangent-plane point (arcsec) about ``crval`` → (ra, dec) deg."""
    xi, eta = xi_arcsec / ARCSEC_PER_RAD, eta_arcsec / ARCSEC_PER_RAD
    a0, d0 = math.radians(crval[0]), math.radians(crval[1])
    rho = math.hypot(xi, eta)
    if rho == 0:
        return np.array(crval, float)
    c = math.atan(rho)
    dec = math.asin(math.cos(c) * math.sin(d0) + eta * math.sin(c) * math.cos(d0) / rho)
    ra = a0 + math.atan2(xi * math.sin(c), rho * math.cos(d0) * math.cos(c) - eta * math.sin(d0) * math.sin(c))
    return np.array([math.degrees(ra) % 360.0, math.degrees(dec)])


def _wrap(dra: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return (dra + np.pi) % (2 * np.pi) - np.pi


def _angular_sep(ra1: npt.NDArray[np.float64], dec1: npt.NDArray[np.float64], ra2: npt.NDArray[np.float64],
                 dec2: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Great-circle separation (rad), haversine form (accurate at small angles)."""
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return 2 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0)))


# --------------------------------------------------------------------------------------
# Pattern stage
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pattern:
    linear: npt.NDArray[np.float64]  # 2x2: s R(θ), applied to source tangent-plane positions
    shift: npt.NDArray[np.float64]  # arcsec
    peak: int
    background: float
    confidence: float
    bin_arcsec: float
    rotation_deg: float
    scale: float


def _balanced_brightest(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], flux: npt.NDArray[np.float64],
                        cell: float, k: int) -> npt.NDArray[np.int64]:
    """Indices of the ``k`` brightest points in each square cell of side ``cell``."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    ix = np.floor((x - x.min()) / cell).astype(np.int64)
    iy = np.floor((y - y.min()) / cell).astype(np.int64)
    cid = iy * (ix.max() + 1) + ix
    order = np.lexsort((-flux, cid))
    cs = cid[order]
    start = np.r_[0, np.flatnonzero(np.diff(cs)) + 1]
    rank = np.arange(len(cs)) - np.repeat(start, np.diff(np.r_[start, len(cs)]))
    return order[rank < k]


def _pattern_match(src_tp: npt.NDArray[np.float64], s_flux: npt.NDArray[np.float64],
                   corners_tp: npt.NDArray[np.float64], rxi: npt.NDArray[np.float64], reta: npt.NDArray[np.float64],
                   r_flux: npt.NDArray[np.float64], *, pix_scale_arcsec: float, detector_radius_pix: float,
                   config: AstrometryConfig) -> _Pattern:
    bin_arcsec = config.pattern_bin_pix * pix_scale_arcsec
    max_off = config.max_offset_arcsec
    # Grid steps keep the smear at the detector edge (step/2 × radius) within half a bin.
    step = config.pattern_bin_pix / detector_radius_pix
    n_rot = int(math.ceil(math.radians(config.max_rotation_deg) / step))
    n_scl = int(math.ceil(math.log1p(config.max_scale_change) / step))
    thetas = np.arange(-n_rot, n_rot + 1) * step if n_rot else np.zeros(1)
    lscales = np.arange(-n_scl, n_scl + 1) * step if n_scl else np.zeros(1)

    # Spatially balanced bright subsets with the same cell size and count per cell.
    area = abs(_polygon_area(corners_tp))
    cell = math.sqrt(area / config.pattern_n_sources) * 1.5
    k = 1
    while True:
        s_sel = _balanced_brightest(src_tp[:, 0], src_tp[:, 1], s_flux, cell, k)
        if len(s_sel) >= min(config.pattern_n_sources, len(src_tp)) or k > 50:
            break
        k += 1
    # References: inside the detector's footprint grown by the search range (offset, rotation, scale).
    centre = corners_tp.mean(axis=0)
    lo = corners_tp.min(axis=0)
    hi = corners_tp.max(axis=0)
    grow = max_off + (math.radians(config.max_rotation_deg) + config.max_scale_change) * (
        float(np.hypot(*centre)) + 0.5 * float(np.hypot(*(hi - lo)))) + bin_arcsec
    inside = np.flatnonzero((rxi > lo[0] - grow) & (rxi < hi[0] + grow) & (reta > lo[1] - grow) & (reta < hi[1] + grow))
    r_sel = inside[_balanced_brightest(rxi[inside], reta[inside], r_flux[inside], cell, k + 1)]
    if len(s_sel) < 3 or len(r_sel) < 3:
        return _Pattern(np.eye(2), np.zeros(2), 0, 0.0, 0.0, bin_arcsec, 0.0, 1.0)

    sp = src_tp[s_sel]
    rp = np.column_stack([rxi[r_sel], reta[r_sel]])
    order = np.argsort(rp[:, 0])
    rp = rp[order]
    th, ls = np.meshgrid(thetas, lscales, indexing="ij")
    th, ls = th.ravel(), ls.ravel()
    sc = np.exp(ls)
    nb = int(math.ceil(2 * max_off / bin_arcsec)) + 1
    best = (-1, 0, 0, 0, 0.0)  # peak, combination, iy, ix, chance level
    n_trials = 0
    for ic in range(len(th)):
        c, s = sc[ic] * math.cos(th[ic]), sc[ic] * math.sin(th[ic])
        # Rotation about the tangent point (the boresight for camera-model WCSs): the residual
        # translation is then the pointing error, whatever the detector's place in the focal plane.
        tx = c * sp[:, 0] - s * sp[:, 1]
        ty = s * sp[:, 0] + c * sp[:, 1]
        # Only references that can fall in the offset window of this (θ, s) take part.
        j0, j1 = np.searchsorted(rp[:, 0], [tx.min() - max_off, tx.max() + max_off])
        r = rp[j0:j1]
        r = r[(r[:, 1] > ty.min() - max_off) & (r[:, 1] < ty.max() + max_off)]
        ix = np.floor((r[None, :, 0] - tx[:, None] + max_off) / bin_arcsec).astype(np.int64).ravel()
        iy = np.floor((r[None, :, 1] - ty[:, None] + max_off) / bin_arcsec).astype(np.int64).ravel()
        ok = (ix >= 0) & (ix < nb) & (iy >= 0) & (iy < nb)
        hist = np.bincount(iy[ok] * nb + ix[ok], minlength=nb * nb).reshape(nb, nb)
        # 2x2 box sums so that a peak split across bin edges is counted whole.
        box = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
        n_trials += box.size
        k_best = int(np.argmax(box))
        if box.flat[k_best] > best[0]:
            jy, jx = divmod(k_best, nb - 1)
            best = (int(box.flat[k_best]), ic, jy, jx, 4.0 * float(ok.sum()) / (nb * nb))
    peak, ic, jy, jx, lam = best
    log_fap = float(poisson.logsf(peak - 1, max(lam, 1e-12))) + math.log(max(n_trials, 1))
    confidence = float(1.0 - min(1.0, math.exp(min(log_fap, 0.0))))

    # Refine the shift: median offset of the pairs inside the winning 2x2 box.
    c, s = sc[ic] * math.cos(th[ic]), sc[ic] * math.sin(th[ic])
    tx = c * sp[:, 0] - s * sp[:, 1]
    ty = s * sp[:, 0] + c * sp[:, 1]
    dx = (rp[None, :, 0] - tx[:, None]).ravel()
    dy = (rp[None, :, 1] - ty[:, None]).ravel()
    lo_x, lo_y = -max_off + jx * bin_arcsec, -max_off + jy * bin_arcsec
    sel = (dx >= lo_x) & (dx < lo_x + 2 * bin_arcsec) & (dy >= lo_y) & (dy < lo_y + 2 * bin_arcsec)
    shift = np.array([float(np.median(dx[sel])), float(np.median(dy[sel]))])
    theta, scale = float(th[ic]), float(sc[ic])
    linear = scale * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return _Pattern(linear, shift, peak, lam, confidence, bin_arcsec, math.degrees(theta), scale)


def _polygon_area(p: npt.NDArray[np.float64]) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# --------------------------------------------------------------------------------------
# Refinement
# --------------------------------------------------------------------------------------
def _match_nn(src: npt.NDArray[np.float64], ref: npt.NDArray[np.float64],
              radius: float) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """One-to-one nearest-neighbour matches within ``radius`` (closest source wins a shared reference)."""
    finite = np.all(np.isfinite(ref), axis=1)
    ref_ids = np.flatnonzero(finite)
    tree = cKDTree(ref[finite])
    d, j = tree.query(src, k=1, distance_upper_bound=radius)
    ok = np.isfinite(d)
    si = np.flatnonzero(ok)
    ri = ref_ids[j[ok]]
    d = d[ok]
    order = np.lexsort((d, ri))
    first = np.r_[True, np.diff(ri[order]) != 0]
    keep = order[first]
    return si[keep], ri[keep], d[keep]


def _fit_affine(f: npt.NDArray[np.float64], ref: npt.NDArray[np.float64], clip_sigma: float
                ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
    """Least-squares ``ref = M f + t`` with iterative clipping on the separation.

    Returns ``M`` (arcsec/pixel), ``t`` (arcsec), the kept mask and the separations (arcsec).
    """
    keep = np.ones(len(f), bool)
    # Centre the focal-plane coordinates for conditioning; t is shifted back below.
    fc = f.mean(axis=0)
    a = np.column_stack([f - fc, np.ones(len(f))])
    m = np.eye(2)
    t = np.zeros(2)
    sep = np.zeros(len(f))
    for _ in range(10):
        if keep.sum() < 3:
            break
        sol, *_ = np.linalg.lstsq(a[keep], ref[keep], rcond=None)
        m = sol[:2].T
        t = sol[2] - m @ fc
        resid = ref - (f @ m.T + t)
        sep = np.hypot(resid[:, 0], resid[:, 1])
        # Rayleigh: median separation = sigma sqrt(2 ln 2) for a 2-D Gaussian with per-axis sigma.
        sigma = float(np.median(sep[keep])) / math.sqrt(2 * math.log(2))
        new_keep = sep <= clip_sigma * max(sigma, 1e-9)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return m, t, keep, sep


def _ensure_inverse_sip(wcs: WCS, nx: int, ny: int) -> None:
    """Keep the inverse SIP when it inverts the (unchanged) forward SIP to < 1 mpix; refit it otherwise."""
    sip = wcs.sip
    if sip is None:
        return
    uu, vv = np.meshgrid(np.linspace(-0.5, nx - 0.5, 25), np.linspace(-0.5, ny - 0.5, 25))
    pix = np.column_stack([uu.ravel(), vv.ravel()])
    foc = _pix_to_focal(wcs, pix[:, 0], pix[:, 1])
    crpix0 = np.asarray(wcs.wcs.crpix, float) - 1.0
    du, dv = pix[:, 0] - crpix0[0], pix[:, 1] - crpix0[1]
    fu, fv = foc[:, 0], foc[:, 1]
    if sip.ap is not None and sip.bp is not None:
        back_u = fu + _sip_poly(sip.ap, fu, fv)
        back_v = fv + _sip_poly(sip.bp, fu, fv)
        if max(float(np.max(np.abs(back_u - du))), float(np.max(np.abs(back_v - dv)))) < 1e-3:
            return
    order = max(sip.a_order + 2, 5)
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i) if i + j >= 1]
    mat = np.column_stack([fu**i * fv**j for i, j in terms])
    norms = np.linalg.norm(mat, axis=0)
    norms[norms == 0] = 1.0
    cu, *_ = np.linalg.lstsq(mat / norms, du - fu, rcond=None)
    cv, *_ = np.linalg.lstsq(mat / norms, dv - fv, rcond=None)
    ap = np.zeros((order + 1, order + 1))
    bp = np.zeros((order + 1, order + 1))
    for (i, j), p, q in zip(terms, cu / norms, cv / norms, strict=True):
        ap[i, j], bp[i, j] = p, q
    wcs.sip = Sip(sip.a, sip.b, ap, bp, wcs.wcs.crpix)
    wcs.wcs.set()


def _match_table(sources: Table, refcat: Table, s_rows: npt.NDArray[np.int64], r_rows: npt.NDArray[np.int64],
                 s_ra: npt.NDArray[np.float64], s_dec: npt.NDArray[np.float64],
                 dist: npt.NDArray[np.float64]) -> Table:
    t = Table()
    t["ref_id"] = np.asarray(refcat["id"], np.int64)[r_rows] if "id" in refcat.colnames else r_rows.astype(np.int64)
    t["ref_coord_ra"] = np.radians(np.asarray(refcat["ra"], float)[r_rows]) * u.rad
    t["ref_coord_dec"] = np.radians(np.asarray(refcat["dec"], float)[r_rows]) * u.rad
    for c in refcat.colnames:
        if c.endswith(("_flux", "_fluxErr")):
            t[f"ref_{c}"] = np.asarray(refcat[c], float)[r_rows] * u.nJy
    t["src_id"] = (np.asarray(sources["id"], np.int64)[s_rows] if "id" in sources.colnames
                   else s_rows.astype(np.int64))
    t["src_coord_ra"] = s_ra * u.rad
    t["src_coord_dec"] = s_dec * u.rad
    for c in ("base_SdssCentroid_x", "base_SdssCentroid_y", "base_PsfFlux_instFlux"):
        t[f"src_{c}"] = np.asarray(sources[c], float)[s_rows]
    t["src_base_SdssCentroid_x"].unit = u.pix
    t["src_base_SdssCentroid_y"].unit = u.pix
    t["distance"] = dist * u.rad
    t["distance_arcsec"] = dist * ARCSEC_PER_RAD * u.arcsec
    return t
