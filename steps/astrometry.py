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
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from astropy import units as u
from astropy.table import Table
from astropy.wcs import WCS, Sip
from scipy.spatial import cKDTree
from scipy.special import pdtrc

from ..camera import fit_inverse_sip, sip_polynomial
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
    #: Flags a source must have (absent columns are ignored). The brief's step 4.1 (and Rubin's
    #: astrometry selector) uses the PSF candidates: stars by size, so compact galaxies and blends,
    #: whose centroids need not fall on their reference positions, stay out. Measured on the eight
    #: benchmark frames: WCS error vs truth lower on six (4096² typical 0.292 -> 0.274 mas,
    #: sparse 0.638 -> 0.620, crowded 0.197 -> 0.189, poor seeing 0.296 -> 0.274; 2048² typical
    #: 0.907 -> 0.872, sparse 2.22 -> 2.21), higher on the two two-snap frames (4096² 0.34 -> 0.37,
    #: 2048² poor seeing 0.80 -> 0.87 mas, with 6 % fewer matches), all within their noise floors'
    #: scale. With fewer than ``min_matches`` such sources (a frame too poor in stars for a PSF
    #: model) the flags are dropped, and the result says so. They are also dropped, and the fit
    #: is tried again on every usable source before any blind search, when the solution from the
    #: initial WCS fails on them: on a simulated 512² detector (the memory run of
    #: ``make bench-orchestration``) the 98 candidates voted for a false pointing offset
    #: (280″, 399 votes against 96 by chance) and the fit ended at 2.2″ rms, while all 128
    #: usable sources found the right one (6 mas rms).
    required_flags: tuple[str, ...] = ("calib_psf_candidate",)
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
    #: Minimum confidence (1 − false-alarm probability) of the pattern match and of the blind
    #: verification. Right 4096² matches reach 1 − 1e-20; wrong fields measured up to 0.9996
    #: (pattern; then stopped by the rms checks) and 0.997 (blind).
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
    #: Per-axis positional error added in quadrature to each pair in the fit weights (mas): the
    #: centroid errors of bright stars (~0.1 mas at S/N 1000) understate unmodelled systematics.
    position_error_floor_mas: float = 1.0
    #: Larger mean separation is a failure (arcsec; Rubin's maxMeanDistanceArcsec).
    max_mean_offset_arcsec: float = 0.5
    #: SIP order fitted on top of the affine part when the initial WCS has no distortion (no camera
    #: model, e.g. a TAN header); 0 or 1 = affine only.
    fit_distortion_order: int = 0
    #: Radius (deg) of the blind quad search around the initial pointing, tried when matching from
    #: the initial WCS fails; 0 disables it. Only references in ``refcat`` can be found.
    blind_search_radius_deg: float = 2.0
    #: Bright, spatially balanced sources (and references per equal area) that build quads.
    blind_n_sources: int = 60
    #: Each star forms quads with 3 of its ``blind_quad_neighbours`` nearest selected stars.
    blind_quad_neighbours: int = 6
    #: Largest distance between a source quad code and a reference quad code (code space is ~unit).
    blind_code_tolerance: float = 0.012
    #: Largest scale change accepted for a quad hypothesis (fraction of the initial scale).
    blind_max_scale_change: float = 0.1
    #: Also try the mirrored sky (unknown parity, e.g. a header without a trusted CD matrix).
    blind_try_flipped_parity: bool = False
    #: Largest number of quad hypotheses verified.
    blind_max_hypotheses: int = 20000

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
        if not 0 <= self.fit_distortion_order <= 7:
            raise ConfigError("astrometry.fit_distortion_order must be in [0, 7] (0/1: affine only)")
        if not 0 <= self.blind_search_radius_deg <= 30:
            raise ConfigError("astrometry.blind_search_radius_deg must be in [0, 30] (0 disables the blind search)")
        if self.blind_n_sources < 8 or not 3 <= self.blind_quad_neighbours <= 10:
            raise ConfigError("astrometry.blind_n_sources must be >= 8 and blind_quad_neighbours in [3, 10]")
        if not 0 < self.blind_code_tolerance < 0.2 or not 0 <= self.blind_max_scale_change < 1:
            raise ConfigError("astrometry.blind_code_tolerance must be in (0, 0.2), blind_max_scale_change in [0, 1)")
        if self.blind_max_hypotheses < 1:
            raise ConfigError("astrometry.blind_max_hypotheses must be >= 1")


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
        Correction found by the pattern stage relative to the (initial or blind) WCS.
    blind, blind_confidence
        Whether the blind quad search supplied the starting WCS, and 1 − its false-alarm probability.
    required_flags_dropped
        Every usable source was matched, not only those with ``required_flags``: fewer than
        ``min_matches`` had them, or the solution on them failed.
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
    blind: bool = False
    blind_confidence: float = float("nan")
    #: Too few sources had ``required_flags``, or the solution on them failed: all usable sources were matched.
    required_flags_dropped: bool = False


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
        For the blind fallback it must cover the search circle.
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
        Too few usable sources or references, no significant pattern match
        (and no blind solution), too few final matches, or rms / mean offset
        above the limits.
    """
    config.validate()
    x0, y0 = origin
    n_src_total = len(sources)
    meta: dict[str, object] = {"n_sources": n_src_total, "n_refs": len(refcat), "n_matches": 0,
                               "rms_arcsec": float("nan"), "blind": False}
    good = _select_sources(sources, config)
    # Every usable source, whatever its flags: the fallback when the flagged ones do not suffice.
    loose = _select_sources(sources, replace(config, required_flags=())) if config.required_flags else good
    if good.sum() < config.min_matches and loose.sum() > good.sum():
        good = loose
        meta["required_flags_dropped"] = True
    meta["n_good_sources"] = int(good.sum())
    if good.sum() < config.min_matches:
        raise AstrometryError(
            f"only {int(good.sum())} of {n_src_total} sources are usable for astrometry (S/N >= {config.min_snr}, "
            f"unflagged); need {config.min_matches} (astrometry.min_matches). The frame has too few stars bright "
            "enough for a fit (check the PSF-star catalogue); lower astrometry.min_matches only if a "
            "fit on fewer stars is acceptable",
            meta)
    ra = np.asarray(refcat["ra"], float)
    dec = np.asarray(refcat["dec"], float)
    ref_idx = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    if len(ref_idx) < config.min_matches:
        cone = refcat.meta
        where = (f" within {cone['radius_deg']:.3g} deg of (RA, Dec) = ({cone['ra_deg']:.5f}, {cone['dec_deg']:.5f})"
                 if all(k in cone for k in ("ra_deg", "dec_deg", "radius_deg")) else "")
        raise AstrometryError(f"the reference catalogue {cone.get('refcat', '')!r} has {len(ref_idx)} stars{where}; "
                              f"need {config.min_matches}. It does not cover this field: ingest one that does "
                              "(or check the image's WCS)", meta)
    r_flux = _ref_brightness(refcat)

    def inputs(selected: npt.NDArray[np.bool_]) -> _Inputs:
        src_idx = np.flatnonzero(selected)
        return _Inputs(
            sources=sources, refcat=refcat, src_idx=src_idx, ref_idx=ref_idx,
            sx=np.asarray(sources["base_SdssCentroid_x"], float)[src_idx] - x0,
            sy=np.asarray(sources["base_SdssCentroid_y"], float)[src_idx] - y0,
            s_flux=np.asarray(sources["base_PsfFlux_instFlux"], float)[src_idx],
            r_ra=ra[ref_idx], r_dec=dec[ref_idx], r_flux=r_flux[ref_idx], shape=shape)

    inp = inputs(good)
    try:
        return _solve(inp, initial_wcs, config, meta)
    except AstrometryError as first:
        first_error = first
    if loose.sum() > good.sum():
        # The flags are a preference (cleaner centroids), not a requirement: before searching
        # blind, try every usable source from the same initial WCS.
        meta.update({"required_flags_attempt": str(first_error), "required_flags_dropped": True,
                     "n_good_sources": int(loose.sum())})
        inp = inputs(loose)
        try:
            return _solve(inp, initial_wcs, config, meta)
        except AstrometryError as second:
            first_error = second
    if config.blind_search_radius_deg <= 0:
        raise first_error
    # The initial WCS did not lead to a solution: search the whole circle with quads.
    meta["first_attempt"] = str(first_error)
    blind_wcs = _blind_solve(inp, initial_wcs, config, meta)
    meta["blind"] = True
    return _solve(inp, blind_wcs, config, meta)


@dataclass(frozen=True, eq=False)
class _Inputs:
    sources: Table
    refcat: Table
    src_idx: npt.NDArray[np.int64]
    ref_idx: npt.NDArray[np.int64]
    sx: npt.NDArray[np.float64]  # array pixels of the usable sources
    sy: npt.NDArray[np.float64]
    s_flux: npt.NDArray[np.float64]
    r_ra: npt.NDArray[np.float64]  # deg, finite references
    r_dec: npt.NDArray[np.float64]
    r_flux: npt.NDArray[np.float64]
    shape: tuple[int, int]


def _positional_variances(inp: _Inputs, cd_arcsec: npt.NDArray[np.float64], config: AstrometryConfig
                          ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-axis positional variances (arcsec²) of the usable sources and references for the fit weights.

    Sources: centroid errors times the pixel scale; references: their catalogue errors. A floor of
    ``config.position_error_floor_mas`` per axis keeps any one star from dominating (unmodelled
    centroid systematics). Missing errors count as the floor plus one pixel's 1/100.
    """
    scale = math.sqrt(abs(float(np.linalg.det(cd_arcsec))))
    floor2 = (config.position_error_floor_mas / 1000.0) ** 2
    ex = _column_or(inp.sources, "base_SdssCentroid_xErr", np.nan)[inp.src_idx]
    ey = _column_or(inp.sources, "base_SdssCentroid_yErr", np.nan)[inp.src_idx]
    e2 = 0.5 * (ex**2 + ey**2) * scale**2
    var_src = np.where(np.isfinite(e2), e2, (0.01 * scale) ** 2) + floor2
    rx = _column_or(inp.refcat, "ra_err", np.nan)[inp.ref_idx]
    ry = _column_or(inp.refcat, "dec_err", np.nan)[inp.ref_idx]
    r2 = 0.5 * (rx**2 + ry**2) / 1e6
    var_ref = np.where(np.isfinite(r2), r2, 0.0)
    return var_src, var_ref


def _cd_arcsec(wcs: WCS) -> npt.NDArray[np.float64]:
    return np.asarray(wcs.wcs.cd if wcs.wcs.has_cd() else wcs.wcs.get_pc() * wcs.wcs.cdelt[:, None]) * 3600.0


def _solve(inp: _Inputs, initial_wcs: WCS, config: AstrometryConfig, meta: dict[str, object]) -> AstrometryResult:
    """Pattern match from ``initial_wcs``, then iterative matching and fit; raises on any failed check."""
    sx, sy, r_ra, r_dec = inp.sx, inp.sy, inp.r_ra, inp.r_dec
    wcs = copy.deepcopy(initial_wcs)
    wcs.wcs.set()
    # Focal-plane pixel offsets from CRPIX through the camera distortion; fixed from now on.
    f = _pix_to_focal(wcs, sx, sy)
    cd_arcsec = _cd_arcsec(wcs)
    crval = np.array(wcs.wcs.crval, float)
    # Without a camera model (no SIP) a polynomial distortion may be fitted on top of the affine part.
    order = config.fit_distortion_order if (wcs.sip is None and config.fit_distortion_order >= 2) else 1

    # --- pattern stage -------------------------------------------------------------------------
    ny, nx = inp.shape
    corners_f = _pix_to_focal(wcs, np.array([-0.5, nx - 0.5, nx - 0.5, -0.5]), np.array([-0.5, -0.5, ny - 0.5, ny - 0.5]))
    pix_scale_arcsec = math.sqrt(abs(np.linalg.det(cd_arcsec)))
    rxi, reta = _gnomonic(r_ra, r_dec, crval)
    pat = _pattern_match(f @ cd_arcsec.T, inp.s_flux, corners_f @ cd_arcsec.T, rxi, reta, inp.r_flux,
                         pix_scale_arcsec=pix_scale_arcsec, detector_radius_pix=0.5 * math.hypot(nx, ny),
                         config=config)
    meta.update({"pattern_peak": pat.peak, "pattern_background": pat.background,
                 "match_confidence": pat.confidence})
    if pat.confidence < config.min_match_confidence:
        raise AstrometryError(
            f"no significant match between {len(sx)} sources and {len(r_ra)} reference stars "
            f"(peak {pat.peak} pairs vs {pat.background:.2f} expected by chance; confidence {pat.confidence:.3g} < "
            f"{config.min_match_confidence}). Check the pointing, the reference catalogue region, "
            f"astrometry.max_offset_arcsec / max_rotation_deg, or enable astrometry.blind_search_radius_deg", meta)

    # Only references near the detector take part in the refinement (speed on dense / wide refcats).
    m = pat.linear @ cd_arcsec
    t = pat.shift.copy()
    radius = 1.5 * pat.bin_arcsec
    corners_tp = corners_f @ m.T + t
    pad = 3.0 * radius + 0.01 * float(np.ptp(corners_tp[:, 0]) + np.ptp(corners_tp[:, 1]))
    near = np.flatnonzero((rxi > corners_tp[:, 0].min() - pad) & (rxi < corners_tp[:, 0].max() + pad)
                          & (reta > corners_tp[:, 1].min() - pad) & (reta < corners_tp[:, 1].max() + pad))
    n_ra, n_dec = r_ra[near], r_dec[near]

    # --- refinement: iterative NN matching + affine (or polynomial) fit ---------------------------
    var_src, var_ref = _positional_variances(inp, cd_arcsec, config)
    model = _Model.affine(m, t)
    prev_pairs: tuple[int, ...] | None = None
    n_iter = 0
    keep = np.zeros(0, bool)
    si = ri = np.zeros(0, int)
    for n_iter in range(1, config.max_iterations + 1):  # noqa: B007
        # Re-centre the tangent point on the current shift, so t stays ~0 and CRVAL carries the pointing.
        crval = _deproject(model.t[0], model.t[1], crval)
        model = model.without_shift()
        nxi, neta = _gnomonic(n_ra, n_dec, crval)
        si, ri, _ = _match_nn(model.apply(f), np.column_stack([nxi, neta]), radius)
        if len(si) < max(3, config.min_matches):
            meta["n_matches"] = len(si)
            raise AstrometryError(f"only {len(si)} matches within {radius:.3g} arcsec at iteration {n_iter}; need "
                                  f"{config.min_matches}. The pattern solution did not hold", meta)
        # The polynomial terms start once the affine solution has settled the matches.
        fit_order = order if n_iter > 2 else 1
        model, keep, sep = _fit_model(f[si], np.column_stack([nxi[ri], neta[ri]]), fit_order, config.clip_sigma,
                                      weights=1.0 / (var_src[si] + var_ref[near][ri]))
        rms = float(np.sqrt(np.mean(sep[keep] ** 2)))
        new_radius = float(np.clip(config.match_radius_rms_factor * rms, config.min_match_radius_arcsec, radius))
        pairs = tuple((si[keep] * 1_000_003 + ri[keep]).tolist())
        converged = (pairs == prev_pairs and new_radius == radius and math.hypot(*model.t) < 1e-4
                     and fit_order == order)
        prev_pairs, radius = pairs, new_radius
        if converged:
            break
    crval = _deproject(model.t[0], model.t[1], crval)
    out = _build_wcs(initial_wcs, model, crval)
    _ensure_inverse_sip(out, nx, ny)

    # --- final statistics on the fitted WCS ------------------------------------------------------
    si_k, ri_k = si[keep], near[ri[keep]]
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

    used = np.zeros(len(inp.sources), bool)
    used[inp.src_idx[si_k]] = True
    matches = _match_table(inp.sources, inp.refcat, inp.src_idx[si_k], inp.ref_idx[ri_k], np.radians(s_ra),
                           np.radians(s_dec), dist)
    return AstrometryResult(
        wcs=out, matches=matches, used=used, n_matches=n_matches, rms_arcsec=rms, offset_mean_arcsec=mean_off,
        offset_std_arcsec=std_off, match_confidence=pat.confidence, n_iterations=n_iter, pattern_peak=pat.peak,
        pattern_background=pat.background, rotation_deg=pat.rotation_deg, scale=pat.scale,
        blind=bool(meta.get("blind", False)), blind_confidence=float(meta.get("blind_confidence", float("nan"))),
        required_flags_dropped=bool(meta.get("required_flags_dropped", False)))


def _build_wcs(initial_wcs: WCS, model: _Model, crval: npt.NDArray[np.float64]) -> WCS:
    out = copy.deepcopy(initial_wcs)
    m = model.m
    # A WCS read from a header carries PC + CDELT (wcslib ignores a CD set on top of a PC), a
    # WCS built in memory may carry CD: write the fitted matrix in the form the input uses.
    if out.wcs.has_cd():
        out.wcs.cd = m / 3600.0
    else:
        out.wcs.pc = m / 3600.0
        out.wcs.cdelt = [1.0, 1.0]
    out.wcs.crval = crval
    if model.order >= 2:
        # tangent = M (f + A(f)) with A = M^-1 H: the fitted higher-order terms become SIP A/B.
        minv = np.linalg.inv(m)
        a = np.zeros((model.order + 1, model.order + 1))
        b = np.zeros_like(a)
        for (i, j), h in zip(model.terms, model.h, strict=True):
            a[i, j], b[i, j] = minv @ h
        out.wcs.ctype = [c.split("-")[0].ljust(4, "-") + "-TAN-SIP" for c in out.wcs.ctype]
        out.sip = Sip(a, b, None, None, out.wcs.crpix)
    out.wcs.set()
    return out


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
    for name in config.required_flags:
        if name in sources.colnames:
            good &= np.asarray(sources[name], bool)
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
    return np.column_stack([du + sip_polynomial(wcs.sip.a, du, dv), dv + sip_polynomial(wcs.sip.b, du, dv)])


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


def _similarity_grid(step: float, config: AstrometryConfig) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Rotations (rad) and log-scales the pattern stage tries: 0 and the configured limits, spacing <= ``step``.

    The grid spans the limits exactly: one of whole steps would reach beyond them on a small
    detector (512²: rotations to ±7.9° for a 4° limit, scales to ±7 % for 3 %), where false
    peaks in a dense reference catalogue beat the true one (detectors 44 and 91 of the
    100 × 512² memory run of ``make bench-orchestration``: 1.9-2.2″ rms, no solution).
    """
    rot_max, lscale_max = math.radians(config.max_rotation_deg), math.log1p(config.max_scale_change)
    n_rot = int(math.ceil(rot_max / step))
    n_scl = int(math.ceil(lscale_max / step))
    thetas = np.linspace(-rot_max, rot_max, 2 * n_rot + 1) if n_rot else np.zeros(1)
    lscales = np.linspace(-lscale_max, lscale_max, 2 * n_scl + 1) if n_scl else np.zeros(1)
    return thetas, lscales


def _pattern_match(src_tp: npt.NDArray[np.float64], s_flux: npt.NDArray[np.float64],
                   corners_tp: npt.NDArray[np.float64], rxi: npt.NDArray[np.float64], reta: npt.NDArray[np.float64],
                   r_flux: npt.NDArray[np.float64], *, pix_scale_arcsec: float, detector_radius_pix: float,
                   config: AstrometryConfig) -> _Pattern:
    bin_arcsec = config.pattern_bin_pix * pix_scale_arcsec
    max_off = config.max_offset_arcsec
    # Grid steps keep the smear at the detector edge (step/2 × radius) within half a bin.
    step = config.pattern_bin_pix / detector_radius_pix
    thetas, lscales = _similarity_grid(step, config)

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
        hist, n_ok = _offset_votes(tx, ty, r, max_off=max_off, bin_arcsec=bin_arcsec, nb=nb)
        # 2x2 box sums so that a peak split across bin edges is counted whole.
        box = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
        n_trials += box.size
        k_best = int(np.argmax(box))
        if box.flat[k_best] > best[0]:
            jy, jx = divmod(k_best, nb - 1)
            best = (int(box.flat[k_best]), ic, jy, jx, 4.0 * float(n_ok) / (nb * nb))
    peak, ic, jy, jx, lam = best
    log_fap = _log_poisson_sf(peak - 1, max(lam, 1e-12)) + math.log(max(n_trials, 1))
    confidence = float(1.0 - min(1.0, math.exp(min(log_fap, 0.0))))

    # Refine the shift: median offset of the pairs inside the winning 2x2 box.
    c, s = sc[ic] * math.cos(th[ic]), sc[ic] * math.sin(th[ic])
    tx = c * sp[:, 0] - s * sp[:, 1]
    ty = s * sp[:, 0] + c * sp[:, 1]
    lo_x, lo_y = -max_off + jx * bin_arcsec, -max_off + jy * bin_arcsec
    in_x, in_y = [], []
    for dx, dy in _offset_blocks(tx, ty, rp):
        sel = (dx >= lo_x) & (dx < lo_x + 2 * bin_arcsec) & (dy >= lo_y) & (dy < lo_y + 2 * bin_arcsec)
        in_x.append(dx[sel])
        in_y.append(dy[sel])
    shift = np.array([float(np.median(np.concatenate(in_x))), float(np.median(np.concatenate(in_y)))])
    theta, scale = float(th[ic]), float(sc[ic])
    linear = scale * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return _Pattern(linear, shift, peak, lam, confidence, bin_arcsec, math.degrees(theta), scale)


#: Source-reference pairs per block of the offset vote: the temporaries of a block stay at a
#: few MB whatever the star counts (a whole 500 x 3000 vote needed ~63 MB at once, the flow
#: process's peak RSS on a dense detector).
_VOTE_BLOCK_PAIRS = 1 << 16


def _offset_blocks(tx: npt.NDArray[np.float64], ty: npt.NDArray[np.float64],
                   r: npt.NDArray[np.float64]) -> Iterator[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    """Reference - source offsets ``(dx, dy)``, flattened, for blocks of at most ``_VOTE_BLOCK_PAIRS`` pairs."""
    per = max(1, _VOTE_BLOCK_PAIRS // max(len(r), 1))
    for b in range(0, len(tx), per):
        yield (r[None, :, 0] - tx[b:b + per, None]).ravel(), (r[None, :, 1] - ty[b:b + per, None]).ravel()


def _offset_votes(tx: npt.NDArray[np.float64], ty: npt.NDArray[np.float64], r: npt.NDArray[np.float64], *,
                  max_off: float, bin_arcsec: float, nb: int) -> tuple[npt.NDArray[np.int64], int]:
    """Histogram (``nb x nb``) of reference - source offsets within ``max_off``, and its number of votes.

    Sources are taken in blocks of at most ``_VOTE_BLOCK_PAIRS`` pairs; the counts are exact.
    """
    hist = np.zeros(nb * nb, np.int64)
    n_ok = 0
    for dx, dy in _offset_blocks(tx, ty, r):
        ix = np.floor((dx + max_off) / bin_arcsec).astype(np.int64)
        iy = np.floor((dy + max_off) / bin_arcsec).astype(np.int64)
        ok = (ix >= 0) & (ix < nb) & (iy >= 0) & (iy < nb)
        n_ok += int(np.count_nonzero(ok))
        hist += np.bincount(iy[ok] * nb + ix[ok], minlength=nb * nb)
    return hist.reshape(nb, nb), n_ok


def _log_poisson_sf(k: float, lam: float) -> float:
    """``log P(X > k)`` for ``X ~ Poisson(lam)`` (``-inf`` where it underflows).

    scipy.special's ``pdtrc`` is what ``scipy.stats.poisson.logsf`` evaluates; importing
    scipy.stats for it added 0.4 s to every worker process's start-up.
    """
    if k < 0:
        return 0.0  # P(X > k) = 1 (pdtrc is NaN there; scipy.stats returned 0 too)
    with np.errstate(divide="ignore"):
        return float(np.log(pdtrc(k, lam)))


def _polygon_area(p: npt.NDArray[np.float64]) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# --------------------------------------------------------------------------------------
# Blind stage: astrometry.net-style quads
# --------------------------------------------------------------------------------------
_PAIRS = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
_OTHERS = np.array([(2, 3), (1, 3), (1, 2), (0, 3), (0, 2), (0, 1)])


def _quads(p: npt.NDArray[np.complex128], k: int) -> npt.NDArray[np.int64]:
    """Each point with every 3 of its ``k`` nearest neighbours (unique 4-point sets)."""
    n = len(p)
    if n < 4:
        return np.zeros((0, 4), np.int64)
    k = min(k, n - 1)
    _, nb = cKDTree(np.column_stack([p.real, p.imag])).query(np.column_stack([p.real, p.imag]), k=k + 1)
    nb = nb[:, 1:]
    combos = np.array(list(itertools.combinations(range(k), 3)))
    q = np.concatenate([np.repeat(np.arange(n), len(combos))[:, None],
                        nb[:, combos].reshape(-1, 3)], axis=1)
    return np.unique(np.sort(q, axis=1), axis=0)


def _quad_codes(p: npt.NDArray[np.complex128], quads: npt.NDArray[np.int64]
                ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Similarity-invariant 4-D codes of ``quads`` and their points in canonical order (A, B, C, D).

    A, B are the most distant pair; the frame with A at 0 and B at 1 gives C and D the code
    (Re c, Im c, Re d, Im d). A/B are swapped so that Re(c + d) <= 1 and C/D so that Re c <= Re d,
    which makes the code independent of the order in which the stars were found.
    """
    rows = np.arange(len(quads))
    z = p[quads]
    d = np.abs(z[:, _PAIRS[:, 0]] - z[:, _PAIRS[:, 1]])
    best = np.argmax(d, axis=1)
    ia, ib = quads[rows, _PAIRS[best, 0]], quads[rows, _PAIRS[best, 1]]
    ic, id_ = quads[rows, _OTHERS[best, 0]], quads[rows, _OTHERS[best, 1]]
    a, b = p[ia], p[ib]
    wc, wd = (p[ic] - a) / (b - a), (p[id_] - a) / (b - a)
    swap = (wc.real + wd.real) > 1.0
    ia, ib = np.where(swap, ib, ia), np.where(swap, ia, ib)
    wc, wd = np.where(swap, 1.0 - wc, wc), np.where(swap, 1.0 - wd, wd)
    swap = wc.real > wd.real
    ic, id_ = np.where(swap, id_, ic), np.where(swap, ic, id_)
    wc, wd = np.where(swap, wd, wc), np.where(swap, wc, wd)
    codes = np.column_stack([wc.real, wc.imag, wd.real, wd.imag])
    return codes, np.column_stack([ia, ib, ic, id_])


def _blind_solve(inp: _Inputs, initial_wcs: WCS, config: AstrometryConfig, meta: dict[str, object]) -> WCS:
    """Find the frame anywhere within ``blind_search_radius_deg`` of the initial pointing.

    Sources are placed on the tangent plane with the initial WCS (its scale is trusted to
    ``blind_max_scale_change``, its rotation and pointing not at all); quads of bright,
    spatially balanced stars are hashed by similarity-invariant codes; each source/reference code
    pair within ``blind_code_tolerance`` proposes a similarity transform. Hypotheses are verified,
    most voted first, by counting source/reference coincidences against the chance expectation.
    Returns the starting WCS for the normal fit; raises :class:`AstrometryError` when no hypothesis
    is significant.
    """
    t_start = time.perf_counter()
    wcs = copy.deepcopy(initial_wcs)
    wcs.wcs.set()
    ny, nx = inp.shape
    cd = _cd_arcsec(wcs)
    crval0 = np.array(wcs.wcs.crval, float)
    f = _pix_to_focal(wcs, inp.sx, inp.sy)
    sp = f @ cd.T
    corners = _pix_to_focal(wcs, np.array([-0.5, nx - 0.5, nx - 0.5, -0.5]),
                            np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])) @ cd.T
    det_area = abs(_polygon_area(corners))
    det_centre = corners.mean(axis=0)
    det_radius = float(np.max(np.hypot(*(corners - det_centre).T)))
    pix_scale = math.sqrt(abs(np.linalg.det(cd)))
    centre_sky = _deproject(det_centre[0], det_centre[1], crval0)
    search_arcsec = config.blind_search_radius_deg * 3600.0 + det_radius
    dist = _angular_sep(math.radians(centre_sky[0]), math.radians(centre_sky[1]), np.radians(inp.r_ra),
                        np.radians(inp.r_dec)) * ARCSEC_PER_RAD
    in_circle = np.flatnonzero(dist <= search_arcsec)
    rxi, reta = _gnomonic(inp.r_ra[in_circle], inp.r_dec[in_circle], crval0)
    r_flux = inp.r_flux[in_circle]
    fail_meta = {"blind_n_refs": len(in_circle)}

    def fail(why: str) -> AstrometryError:
        meta.update(fail_meta)
        meta["blind_s"] = time.perf_counter() - t_start
        return AstrometryError(
            f"no astrometric solution from the initial WCS ({meta.get('first_attempt', '')}) and the blind quad "
            f"search within {config.blind_search_radius_deg} deg failed: {why}. Check that the reference "
            "catalogue covers the field and the pixel scale of the initial WCS", meta)

    if len(in_circle) < 4:
        raise fail(f"only {len(in_circle)} reference stars in the search circle")
    # Equal cells on both sides so that the brightest star per cell is likely the same star.
    cell = math.sqrt(det_area / config.blind_n_sources)
    k = 1
    while True:
        s_sel = _balanced_brightest(sp[:, 0], sp[:, 1], inp.s_flux, cell, k)
        if len(s_sel) >= min(config.blind_n_sources, len(sp)) or k > 20:
            break
        k += 1
    r_sel = _balanced_brightest(rxi, reta, r_flux, cell, k)
    # Sources: twice as dense, and quads over more neighbours, so that a reference quad is found
    # among them despite spurious sources, missing stars and brightness ranks that differ by band.
    s_sel = _balanced_brightest(sp[:, 0], sp[:, 1], inp.s_flux, cell, 2 * k)
    s_pts = sp[s_sel, 0] + 1j * sp[s_sel, 1]
    r_pts = rxi[r_sel] + 1j * reta[r_sel]
    r_codes, r_quads = _quad_codes(r_pts, _quads(r_pts, config.blind_quad_neighbours))
    if len(r_codes) == 0 or len(s_pts) < 4:
        raise fail(f"too few stars to build quads ({len(s_pts)} sources, {len(r_pts)} references)")
    code_tree = cKDTree(r_codes)

    # Verification sets: denser than the quad sets (more coincidences), same cells on both sides.
    kv = 3 * k
    s_ver = _balanced_brightest(sp[:, 0], sp[:, 1], inp.s_flux, cell, kv)
    r_ver = _balanced_brightest(rxi, reta, r_flux, cell, kv)
    ver_pts = np.column_stack([rxi[r_ver], reta[r_ver]])
    ver_tree = cKDTree(ver_pts)
    v_radius = 0.5 * config.pattern_bin_pix * pix_scale
    # Local density of the verification references around a hypothesised detector position.
    sv = sp[s_ver, 0] + 1j * sp[s_ver, 1]

    hyps: list[tuple[complex, complex, bool]] = []
    max_log_scale = math.log1p(config.blind_max_scale_change)
    for flip in (False, True) if config.blind_try_flipped_parity else (False,):
        pts = s_pts.conjugate() * -1 if flip else s_pts  # mirror x: (x, y) -> (-x, y)
        s_codes, s_quads = _quad_codes(pts, _quads(pts, config.blind_quad_neighbours + 3))
        if len(s_codes) == 0:
            continue
        nbrs = code_tree.query_ball_point(s_codes, r=config.blind_code_tolerance)
        qi = np.repeat(np.arange(len(s_codes)), [len(x) for x in nbrs])
        if len(qi) == 0:
            continue
        qr = np.concatenate([np.asarray(x, np.int64) for x in nbrs])
        zs = pts[s_quads[qi]]
        zr = r_pts[r_quads[qr]]
        # Least-squares similarity over the 4 points: zr = a zs + b.
        ms, mr = zs.mean(axis=1, keepdims=True), zr.mean(axis=1, keepdims=True)
        a = np.sum((zr - mr) * np.conj(zs - ms), axis=1) / np.sum(np.abs(zs - ms) ** 2, axis=1)
        b = mr[:, 0] - a * ms[:, 0]
        ok = np.abs(np.log(np.abs(a))) <= max_log_scale
        hyps.extend((complex(x), complex(y), flip) for x, y in zip(a[ok], b[ok], strict=True))
    fail_meta["blind_n_hypotheses"] = len(hyps)
    if not hyps:
        raise fail("no source quad matches a reference quad")
    # Vote: hypotheses agreeing in rotation (1°), scale (1 %) and position (a few bins) are verified first.
    ha = np.array([h[0] for h in hyps])
    hb = np.array([h[1] for h in hyps])
    hf = np.array([h[2] for h in hyps])
    key = np.column_stack([np.round(np.degrees(np.angle(ha))), np.round(np.log(np.abs(ha)) * 100),
                           np.round(hb.real / (4 * v_radius)), np.round(hb.imag / (4 * v_radius)), hf])
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    order = np.argsort(-counts[inverse.ravel()], kind="stable")[: config.blind_max_hypotheses]
    n_trials = len(order)
    best = (-math.inf, -1, 0, 0.0)  # -log FAP, hypothesis, count, chance
    for h in order:
        pts = (-sv.conjugate() if hf[h] else sv) * ha[h] + hb[h]
        q = np.column_stack([pts.real, pts.imag])
        d, j = ver_tree.query(q, distance_upper_bound=v_radius)
        # The quad's own 4 stars coincide by construction: only the other coincidences are evidence.
        n_hit = len(np.unique(j[np.isfinite(d)])) - 4
        if n_hit <= max(best[2], 0):
            continue
        centre = (det_centre[0] * (-1 if hf[h] else 1) + 1j * det_centre[1]) * ha[h] + hb[h]
        n_local = len(ver_tree.query_ball_point([centre.real, centre.imag], det_radius))
        density = n_local / (math.pi * det_radius**2 * abs(ha[h]) ** 2)
        lam = max(len(sv) * density * math.pi * v_radius**2, 1e-12)
        score = -(_log_poisson_sf(n_hit - 1, lam) + math.log(n_trials))
        if score > best[0]:
            best = (score, int(h), n_hit, lam)
        if score > 50.0:  # false-alarm probability below e^-50 even after all trials: stop searching
            break
    score, h, n_hit, lam = best
    confidence = float(1.0 - min(1.0, math.exp(min(-score, 0.0)))) if h >= 0 else 0.0
    fail_meta.update({"blind_confidence": confidence, "blind_n_hit": n_hit, "blind_chance": lam})
    if h < 0 or confidence < config.min_match_confidence:
        raise fail(f"best hypothesis has {n_hit} coincidences vs {lam:.2f} by chance "
                   f"(confidence {confidence:.3g} < {config.min_match_confidence})")
    a, b, flip = ha[h], hb[h], bool(hf[h])
    lin = np.array([[a.real, -a.imag], [a.imag, a.real]])
    if flip:
        lin = lin @ np.diag([-1.0, 1.0])
    out = copy.deepcopy(initial_wcs)
    new_cd = lin @ cd / 3600.0
    if out.wcs.has_cd():
        out.wcs.cd = new_cd
    else:
        out.wcs.pc = new_cd
        out.wcs.cdelt = [1.0, 1.0]
    out.wcs.crval = _deproject(b.real, b.imag, crval0)
    out.wcs.set()
    meta.update(fail_meta)
    meta["blind_s"] = time.perf_counter() - t_start
    return out


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
    first = np.ones(order.size, bool)  # no matches: an empty selection, not np.r_[True]
    first[1:] = np.diff(ri[order]) != 0
    keep = order[first]
    return si[keep], ri[keep], d[keep]


@dataclass(frozen=True, eq=False)
class _Model:
    """Focal-plane pixels → tangent plane (arcsec): ``M f + t + Σ h_k u^i v^j`` (terms of order ≥ 2)."""

    m: npt.NDArray[np.float64]
    t: npt.NDArray[np.float64]
    order: int = 1
    terms: tuple[tuple[int, int], ...] = ()
    h: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 2)))

    @staticmethod
    def affine(m: npt.NDArray[np.float64], t: npt.NDArray[np.float64]) -> _Model:
        return _Model(np.asarray(m, float), np.asarray(t, float))

    def without_shift(self) -> _Model:
        return replace(self, t=np.zeros(2))

    def apply(self, f: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        out = f @ self.m.T + self.t
        for (i, j), h in zip(self.terms, self.h, strict=True):
            out = out + np.outer(f[:, 0] ** i * f[:, 1] ** j, h)
        return out


def _fit_model(f: npt.NDArray[np.float64], ref: npt.NDArray[np.float64], order: int, clip_sigma: float,
               weights: npt.NDArray[np.float64] | None = None,
               ) -> tuple[_Model, npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
    """Weighted least-squares ``ref = model(f)`` (affine for ``order`` 1) with iterative clipping.

    ``weights`` are inverse positional variances of the pairs (source centroid and reference
    errors); bright stars with 0.01-px centroids then count for what they are worth. Returns the
    model, the kept mask and the separations (arcsec).
    """
    w_sqrt = np.ones(len(f)) if weights is None else np.sqrt(np.asarray(weights, float))
    keep = np.ones(len(f), bool)
    terms = tuple((i, n - i) for n in range(2, order + 1) for i in range(n, -1, -1))
    # Centre the linear columns for conditioning; the shift is moved back below.
    fc = f.mean(axis=0)
    cols = [f[:, 0] - fc[0], f[:, 1] - fc[1], np.ones(len(f))] + [f[:, 0] ** i * f[:, 1] ** j for i, j in terms]
    a = np.column_stack(cols)
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    a = a / norms
    model = _Model.affine(np.eye(2), np.zeros(2))
    sep = np.zeros(len(f))
    # A polynomial needs more points than parameters, with margin for the clipping.
    if len(f) < 3 * a.shape[1]:
        terms, a = (), a[:, :3]
    for _ in range(10):
        if keep.sum() < a.shape[1]:
            break
        ws = w_sqrt[keep][:, None]
        sol, *_ = np.linalg.lstsq(a[keep] * ws, ref[keep] * ws, rcond=None)
        sol = sol / norms[: a.shape[1], None]
        m = sol[:2].T
        model = _Model(m, sol[2] - m @ fc, order if terms else 1, terms, sol[3:])
        resid = ref - model.apply(f)
        sep = np.hypot(resid[:, 0], resid[:, 1])
        # Rayleigh: median separation = sigma sqrt(2 ln 2) for a 2-D Gaussian with per-axis sigma.
        sigma = float(np.median(sep[keep])) / math.sqrt(2 * math.log(2))
        new_keep = sep <= clip_sigma * max(sigma, 1e-9)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return model, keep, sep


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
        back_u = fu + sip_polynomial(sip.ap, fu, fv)
        back_v = fv + sip_polynomial(sip.bp, fu, fv)
        if max(float(np.max(np.abs(back_u - du))), float(np.max(np.abs(back_v - dv)))) < 1e-3:
            return
    ap, bp = fit_inverse_sip(sip.a, sip.b, du, dv, max(sip.a_order + 2, 5))
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
        t[f"src_{c}"].unit = sources[c].unit  # pix, ct: the source catalogue's
    t["distance"] = dist * u.rad
    t["distance_arcsec"] = dist * ARCSEC_PER_RAD * u.arcsec
    return t
