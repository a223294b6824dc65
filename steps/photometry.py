"""Photometric calibration: one zero point per detector from matched reference stars.

Algorithm
---------
1. Match stars (``coord_ra``/``coord_dec``, rad) to the reference catalogue by
   sky position: closest reference within ``match_radius_arcsec``, one-to-one.
2. Select: not a sky source, no bad flag, finite positive fluxes, S/N ≥
   ``min_snr`` on the calibration flux. A seeded fraction
   ``reserve_fraction`` is set aside (``calib_photometry_reserved``).
3. Δ = m_ref − m_inst with m_inst = −2.5 log10(instFlux); per-star error
   σ_i from the instrumental and reference flux errors.
4. Robust start: the median of Δ, then iterative ``clip_sigma`` clipping with
   σ from the normal-scaled MAD of the residuals.
5. Weighted fit of the kept stars with weights 1/(σ_i² + σ_int²); the
   intrinsic scatter σ_int ≥ 0 is solved so that χ²/dof = 1 (zero when the
   errors already explain the scatter). The zero-point error is
   sqrt((AᵀWA)⁻¹)₀₀ (= sqrt(1/Σw) without a colour term), so it includes the
   intrinsic scatter, plus (in quadrature) the flux-scale error ``scale_err_mag``
   shared by all stars (aperture-correction normalisation). Clipping of step 4 is repeated about the weighted model
   until the kept set is stable.
6. Optional colour term (``colour_band_pair = (b1, b2)``): Δ = ZP + k·(C − C₀)
   with C = m_ref(b1) − m_ref(b2) and C₀ the median colour of the fit stars,
   fitted jointly; the zero point applies at C₀.
7. ``reserved_rms_mag``: rms of the model residuals of the reserved stars
   that pass the same clipping threshold (an out-of-sample check).

The zero point is the AB magnitude of a source giving one count; the
calibration is 10^(−0.4 (ZP − 31.4)) nJy per count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy import units as u
from astropy.table import Table
from scipy.spatial import cKDTree

from ..errors import ConfigError, PhotometryError
from ..photo_calib import AB_MAG_OF_ONE_NJY, PhotoCalib

_MAG_PER_LN = 2.5 / math.log(10.0)
ARCSEC_PER_RAD = 180.0 / math.pi * 3600.0


@dataclass(frozen=True)
class PhotometryConfig:
    """Configuration of :func:`fit_photometry`."""

    #: Match radius (arcsec); the closest reference wins. Rubin uses 0.25"; our WCS is good to
    #: < 1 mas on the benchmarks, so either keeps every true pair there. 0.5" leaves room for real
    #: frames' WCS residuals and reference positions at another epoch without proper motions
    #: (tens to hundreds of mas); a wrong neighbour inside it is an outlier the clipping removes.
    match_radius_arcsec: float = 0.5
    #: Source flux used (``<flux_field>_instFlux``). The aperture-corrected PSF flux is on the
    #: total-flux scale of the calibration flux (Rubin's slot_CalibFlux) but has ~3x its S/N and
    #: no bias from neighbours' pixels (zeroed in apertures, zero-weighted in the PSF fit).
    flux_field: str = "base_PsfFlux"
    #: Minimum S/N on the source flux. Selecting on the calibrated flux itself biases faint stars
    #: bright (measured +5 mmag at S/N >= 10 on the calibration flux); at S/N >= 50 the bias is
    #: < 0.5 mmag and the reference errors (0.5-1 %) dominate each star's error anyway.
    min_snr: float = 50.0
    #: Source flags that exclude a star (absent columns ignored); the flux's own ``_flag`` is always
    #: applied. Rubin rejects only sky sources here, relying on its star selection; we also drop
    #: saturated stars (their fluxes are low by construction) and edge stars (PSF fit truncated).
    bad_flags: tuple[str, ...] = ("base_PixelFlags_flag_saturated", "base_PixelFlags_flag_edge")
    #: Clipping threshold: a star is clipped beyond ``clip_sigma`` x max(normal-scaled MAD of the
    #: residuals, its own error), from a median start. Rubin starts from a mode and caps the clip
    #: at 0.25 mag; the per-star floor keeps a faint star whose residual is within its own error.
    clip_sigma: float = 3.0
    #: Maximum clipping iterations.
    max_iterations: int = 20
    #: Fraction of the selected matches reserved from the fit (validation sample).
    reserve_fraction: float = 0.1
    #: Seed of the reserve selection.
    reserve_seed: int = 0
    #: Bands of the colour ``m(b1) − m(b2)`` for a colour term; empty = no colour term.
    colour_band_pair: tuple[str, ...] = ()
    #: Fewer matches used in the fit is a failure.
    min_matches: int = 5

    def validate(self) -> None:
        """Raise :class:`ConfigError` on invalid values."""
        if not self.match_radius_arcsec > 0:
            raise ConfigError("photometry.match_radius_arcsec must be > 0")
        if not self.clip_sigma > 0:
            raise ConfigError("photometry.clip_sigma must be > 0")
        if not 0 <= self.reserve_fraction < 1:
            raise ConfigError("photometry.reserve_fraction must be in [0, 1)")
        if len(self.colour_band_pair) not in (0, 2):
            raise ConfigError(f"photometry.colour_band_pair must be empty or two bands, got {self.colour_band_pair}")
        if self.min_matches < 2:
            raise ConfigError("photometry.min_matches must be >= 2")
        if self.max_iterations < 1:
            raise ConfigError("photometry.max_iterations must be >= 1")


@dataclass(frozen=True, eq=False)
class PhotometryResult:
    """The fitted calibration and its diagnostics.

    Attributes
    ----------
    photo_calib
        Calibration (nJy/count) and error, including the intrinsic scatter.
    matches
        Denormalised match table (``ref_*``, ``src_*``, ``distance`` [rad]).
    used, reserved
        Per input star (→ ``calib_photometry_used``, ``calib_photometry_reserved``).
    n_matches
        Stars used in the final fit.
    zero_point_mag, zero_point_err_mag
        AB magnitude of one count and its error.
    intrinsic_scatter_mag
        Scatter beyond the measurement errors (solved so that χ²/dof = 1).
    colour_term, colour_term_used, colour_reference_mag
        Fitted colour coefficient (None when not fitted) and the colour at which the zero point applies.
    reserved_rms_mag
        Rms residual of the reserved stars (NaN when none).
    chi2_dof
        χ²/dof with measurement errors only (before adding intrinsic scatter).
    n_iterations
        Clipping iterations.
    """

    photo_calib: PhotoCalib
    matches: Table
    used: npt.NDArray[np.bool_]
    reserved: npt.NDArray[np.bool_]
    n_matches: int
    zero_point_mag: float
    zero_point_err_mag: float
    intrinsic_scatter_mag: float
    colour_term: float | None
    colour_term_used: bool
    reserved_rms_mag: float
    colour_reference_mag: float = float("nan")
    chi2_dof: float = float("nan")
    n_iterations: int = 0


def fit_photometry(stars: Table, refcat: Table, *, band: str,
                   config: PhotometryConfig = PhotometryConfig(), scale_err_mag: float = 0.0) -> PhotometryResult:
    """Fit the photometric zero point of a detector.

    Parameters
    ----------
    stars
        Star catalogue with ``coord_ra``/``coord_dec`` (rad) and the configured flux.
    refcat
        Reference table: ``id``, ``ra``, ``dec`` (deg), ``<band>_flux``, ``<band>_fluxErr`` (nJy).
    band
        Band of the exposure (selects ``<band>_flux``).
    config
        Step configuration.
    scale_err_mag
        One-sigma error (mag) of the flux scale shared by every star of the detector (the
        aperture-correction normalisation, ``ApertureCorrectionResult.scale_err``); added in
        quadrature to the zero-point error, since no number of stars averages it down.

    Returns
    -------
    PhotometryResult

    Raises
    ------
    PhotometryError
        Missing columns, or fewer than ``min_matches`` usable matches.
    """
    config.validate()
    if not (math.isfinite(scale_err_mag) and scale_err_mag >= 0):
        raise ConfigError(f"scale_err_mag must be finite and >= 0, got {scale_err_mag}")
    n = len(stars)
    meta = {"n_stars": n, "n_refs": len(refcat), "band": band}
    ref_col, ref_err_col = f"{band}_flux", f"{band}_fluxErr"
    if ref_col not in refcat.colnames:
        raise PhotometryError(f"reference catalogue has no {ref_col!r}; bands available: "
                              f"{[c[:-5] for c in refcat.colnames if c.endswith('_flux')]}", meta)
    fcol, ecol = f"{config.flux_field}_instFlux", f"{config.flux_field}_instFluxErr"
    for c in (fcol, ecol, "coord_ra", "coord_dec"):
        if c not in stars.colnames:
            raise PhotometryError(f"star catalogue has no {c!r}; compute coordinates and measure "
                                  f"{config.flux_field} before photometry", meta)
    if config.colour_band_pair:
        for b in config.colour_band_pair:
            if f"{b}_flux" not in refcat.colnames:
                raise PhotometryError(f"colour term needs {b}_flux in the reference catalogue", meta)

    # --- match -----------------------------------------------------------------------------------
    s_idx, r_idx, dist = _match_sky(np.asarray(stars["coord_ra"], float), np.asarray(stars["coord_dec"], float),
                                    np.radians(np.asarray(refcat["ra"], float)),
                                    np.radians(np.asarray(refcat["dec"], float)),
                                    config.match_radius_arcsec / ARCSEC_PER_RAD)
    meta["n_matched"] = len(s_idx)

    # --- select ----------------------------------------------------------------------------------
    flux = np.asarray(stars[fcol], float)[s_idx]
    ferr = np.asarray(stars[ecol], float)[s_idx]
    rflux = np.asarray(refcat[ref_col], float)[r_idx]
    rerr = (np.asarray(refcat[ref_err_col], float)[r_idx] if ref_err_col in refcat.colnames
            else np.zeros(len(r_idx)))
    rerr = np.where(np.isfinite(rerr), rerr, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (np.isfinite(flux) & (flux > 0) & np.isfinite(ferr) & (ferr > 0) & (flux / ferr >= config.min_snr)
              & np.isfinite(rflux) & (rflux > 0))
    for name in (*config.bad_flags, f"{config.flux_field}_flag"):
        if name in stars.colnames:
            ok &= ~np.asarray(stars[name], bool)[s_idx]
    if "sky_source" in stars.colnames:
        ok &= ~np.asarray(stars["sky_source"], bool)[s_idx]
    colour = np.zeros(len(s_idx))
    if config.colour_band_pair:
        b1, b2 = config.colour_band_pair
        f1 = np.asarray(refcat[f"{b1}_flux"], float)[r_idx]
        f2 = np.asarray(refcat[f"{b2}_flux"], float)[r_idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            colour = -2.5 * np.log10(f1 / f2)
        ok &= np.isfinite(colour)

    with np.errstate(divide="ignore", invalid="ignore"):
        delta = (AB_MAG_OF_ONE_NJY - 2.5 * np.log10(rflux)) + 2.5 * np.log10(flux)
        sig = _MAG_PER_LN * np.hypot(ferr / flux, rerr / rflux)

    cand = np.flatnonzero(ok)
    rng = np.random.default_rng(config.reserve_seed)
    n_res = int(round(config.reserve_fraction * len(cand)))
    reserved_m = np.zeros(len(s_idx), bool)
    if n_res:
        reserved_m[rng.choice(cand, size=n_res, replace=False)] = True
    fit_m = ok & ~reserved_m
    meta["n_selected"] = int(ok.sum())
    if fit_m.sum() < config.min_matches:
        raise PhotometryError(
            f"only {int(fit_m.sum())} usable photometric matches (of {len(s_idx)} matched within "
            f"{config.match_radius_arcsec} arcsec, S/N >= {config.min_snr}); need {config.min_matches}. "
            "Check the astrometry, the band's reference fluxes, or lower photometry.min_snr", meta)

    # --- robust weighted fit ---------------------------------------------------------------------
    use_colour = bool(config.colour_band_pair)
    c_ref = float(np.median(colour[fit_m])) if use_colour else 0.0
    x = colour - c_ref
    keep = fit_m.copy()
    centre = np.full(len(delta), float(np.median(delta[keep])))
    n_iter = 0
    params = np.array([centre[0], 0.0])
    cov = np.zeros((2, 2))
    sig_int = 0.0
    chi2_dof = float("nan")
    for n_iter in range(1, config.max_iterations + 1):  # noqa: B007
        resid = delta - centre
        mad_sigma = 1.4826 * float(np.median(np.abs(resid[keep] - np.median(resid[keep]))))
        # Floor: a perfect data set (MAD 0) must not clip stars whose residual is within their error.
        thresh = config.clip_sigma * np.maximum(mad_sigma, sig)
        new_keep = fit_m & (np.abs(resid) <= thresh)
        if new_keep.sum() < config.min_matches:
            new_keep = keep
        keep = new_keep
        params, cov, sig_int, chi2_dof = _fit_with_scatter(delta[keep], sig[keep], x[keep], use_colour)
        new_centre = params[0] + params[1] * x
        if np.allclose(new_centre, centre, rtol=0, atol=1e-9):
            break
        centre = new_centre
    # The final kept set about the final model.
    resid = delta - (params[0] + params[1] * x)
    n_used = int(keep.sum())
    if n_used < config.min_matches:
        raise PhotometryError(f"only {n_used} photometric matches survive clipping; need {config.min_matches}", meta)

    zp = float(params[0])
    zp_err = float(math.sqrt(cov[0, 0] + scale_err_mag**2))
    mad_sigma = 1.4826 * float(np.median(np.abs(resid[keep] - np.median(resid[keep]))))
    res_ok = reserved_m & (np.abs(resid) <= config.clip_sigma * np.maximum(mad_sigma, sig))
    reserved_rms = float(np.sqrt(np.mean(resid[res_ok] ** 2))) if res_ok.any() else float("nan")

    calib = 10 ** (-0.4 * (zp - AB_MAG_OF_ONE_NJY))
    photo_calib = PhotoCalib(calib, calib * zp_err / _MAG_PER_LN)

    used = np.zeros(n, bool)
    used[s_idx[keep]] = True
    reserved = np.zeros(n, bool)
    reserved[s_idx[reserved_m]] = True
    matches = _match_table(stars, refcat, s_idx, r_idx, dist, config.flux_field)
    # Reported with the persisted matches, so a reader knows whether the zero point is colour-dependent.
    matches.meta.update({"colour_term_used": use_colour, "colour_band_pair": list(config.colour_band_pair),
                         "colour_term": float(params[1]) if use_colour else None,
                         "colour_reference_mag": c_ref if use_colour else None})
    return PhotometryResult(
        photo_calib=photo_calib, matches=matches, used=used, reserved=reserved, n_matches=n_used,
        zero_point_mag=zp, zero_point_err_mag=zp_err, intrinsic_scatter_mag=float(sig_int),
        colour_term=float(params[1]) if use_colour else None, colour_term_used=use_colour,
        reserved_rms_mag=reserved_rms, colour_reference_mag=c_ref if use_colour else float("nan"),
        chi2_dof=chi2_dof, n_iterations=n_iter)


def _fit_with_scatter(d: npt.NDArray[np.float64], s: npt.NDArray[np.float64], x: npt.NDArray[np.float64],
                      use_colour: bool) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, float]:
    """Weighted linear fit of ``d = a + b x`` (b = 0 without colour) with χ²/dof = 1 intrinsic scatter."""
    a = np.column_stack([np.ones_like(d), x]) if use_colour else np.ones((len(d), 1))
    dof = len(d) - a.shape[1]

    def solve(sig_int: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]:
        w = 1.0 / (s**2 + sig_int**2)
        atw = a.T * w
        cov = np.linalg.inv(atw @ a)
        p = cov @ (atw @ d)
        chi2 = float(np.sum(w * (d - a @ p) ** 2))
        return p, cov, chi2

    p, cov, chi2 = solve(0.0)
    chi2_dof0 = chi2 / dof if dof > 0 else float("nan")
    sig_int = 0.0
    if dof > 0 and chi2 > dof:
        hi = max(float(np.std(d)), 1e-6)
        while solve(hi)[2] > dof:
            hi *= 2.0
        # chi2 falls monotonically with sig_int: bisect the bracket [0, hi] to 1e-7 mag.
        lo = 0.0
        while hi - lo > 1e-7:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if solve(mid)[2] > dof else (lo, mid)
        sig_int = 0.5 * (lo + hi)
        p, cov, chi2 = solve(sig_int)
    full_p = np.array([p[0], p[1] if use_colour else 0.0])
    full_cov = np.zeros((2, 2))
    full_cov[: cov.shape[0], : cov.shape[1]] = cov
    return full_p, full_cov, sig_int, chi2_dof0


def _unit(ra: npt.NDArray[np.float64], dec: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def _match_sky(s_ra: npt.NDArray[np.float64], s_dec: npt.NDArray[np.float64], r_ra: npt.NDArray[np.float64],
               r_dec: npt.NDArray[np.float64], radius_rad: float
               ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Closest reference within ``radius_rad`` for each star; one-to-one (closest star keeps a shared ref)."""
    s_ok = np.flatnonzero(np.isfinite(s_ra) & np.isfinite(s_dec))
    r_ok = np.flatnonzero(np.isfinite(r_ra) & np.isfinite(r_dec))
    if len(s_ok) == 0 or len(r_ok) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    chord = 2.0 * math.sin(radius_rad / 2.0)
    d, j = cKDTree(_unit(r_ra[r_ok], r_dec[r_ok])).query(_unit(s_ra[s_ok], s_dec[s_ok]), k=1,
                                                         distance_upper_bound=chord)
    hit = np.isfinite(d)
    si, ri, d = s_ok[hit], r_ok[j[hit]], d[hit]
    order = np.lexsort((d, ri))
    first = np.r_[True, np.diff(ri[order]) != 0]
    keep = np.sort(order[first])
    return si[keep], ri[keep], 2.0 * np.arcsin(np.clip(d[keep] / 2.0, 0.0, 1.0))


def _match_table(stars: Table, refcat: Table, s_idx: npt.NDArray[np.int64], r_idx: npt.NDArray[np.int64],
                 dist: npt.NDArray[np.float64], flux_field: str) -> Table:
    t = Table()
    t["ref_id"] = np.asarray(refcat["id"], np.int64)[r_idx] if "id" in refcat.colnames else r_idx.astype(np.int64)
    t["ref_coord_ra"] = np.radians(np.asarray(refcat["ra"], float)[r_idx]) * u.rad
    t["ref_coord_dec"] = np.radians(np.asarray(refcat["dec"], float)[r_idx]) * u.rad
    for c in refcat.colnames:
        if c.endswith(("_flux", "_fluxErr")):
            t[f"ref_{c}"] = np.asarray(refcat[c], float)[r_idx] * u.nJy
    t["src_id"] = np.asarray(stars["id"], np.int64)[s_idx] if "id" in stars.colnames else s_idx.astype(np.int64)
    t["src_psf_id"] = (np.asarray(stars["psf_id"], np.int64)[s_idx] if "psf_id" in stars.colnames
                       else np.zeros(len(s_idx), np.int64))
    t["src_coord_ra"] = np.asarray(stars["coord_ra"], float)[s_idx] * u.rad
    t["src_coord_dec"] = np.asarray(stars["coord_dec"], float)[s_idx] * u.rad
    for c in ("base_SdssCentroid_x", "base_SdssCentroid_y", f"{flux_field}_instFlux", f"{flux_field}_instFluxErr",
              "base_PsfFlux_instFlux", "base_PsfFlux_instFluxErr"):
        if c in stars.colnames and f"src_{c}" not in t.colnames:
            t[f"src_{c}"] = np.asarray(stars[c], float)[s_idx]
            t[f"src_{c}"].unit = stars[c].unit  # pix, ct: the source catalogue's
    t["distance"] = dist * u.rad
    return t
