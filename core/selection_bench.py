"""``make bench-stars``: how far star/galaxy separation by size can go on a benchmark frame.

Issue 3 asks the star selection for ≥ 98 % of the isolated S/N ≥ 10 true stars
and ≤ 2 % contaminants. On the poor-seeing frame the faint compact galaxies
are barely larger than the 1.3″ PSF, so the question is whether any cut on the
measured size can meet both numbers, or whether the information is not in the
pixels. This benchmark runs the calibration of one simulated frame up to the
star pass (:func:`~singleframe.steps.pipeline.find_stars` with
``keep_candidates``: every detection measured, before selection) and scores,
with the evaluator of ``make bench``
(:func:`~singleframe.sim.evaluation.star_recovery`):

- the selection as configured (with the reference-catalogue prior,
  :func:`~singleframe.steps.star_selection.reference_prior`), the same without
  that prior (the size test alone), and without its size test;
- the size test at other significance thresholds (the same cut at every S/N);
- the best a cut on the size excess can do **with the truth in hand**: per bin
  of S/N, the threshold is chosen from a grid by the true classes of the
  sources in that bin (a Lagrangian trade of contaminants against recovered
  stars). No rule that sees only a source's size excess and S/N can do better
  on this frame than this oracle (up to the grid), so if it misses the bars,
  the bars cannot be met by size alone;
- the same oracle on a second, independent size statistic: the PSF-template score
  (:func:`psf_template_score`), the locally most powerful test of "this source is the PSF
  convolved with a small blur" against "it is the PSF", computed from the fitted PSF model and
  the pixels rather than from Gaussian-weighted moments. If both statistics give the same bound,
  the limit is in the pixels, not in the statistic;
- the information bound (:func:`information_bound`): for each galaxy that passes every
  cut but the size test, its noise-free distance from the nearest point source in noise
  sigmas; the most powerful test against that very galaxy (Neyman–Pearson) keeps it with a
  known probability for a given loss of stars, and the best split of the recovery bar's
  star budget over the S/N bins gives the fewest galaxies any selection can keep. If that
  misses the bar, no statistic, size-based or not, will meet it on this frame; if it is
  close, only a selection near that ideal will;
- the contaminants of the configured selection by kind (a true galaxy within
  2 px, a true star 2–5 px away: a blend, or nothing), and the size-excess
  significance of the galaxy contaminants against that of the true stars.

Only the first-pass catalogue is scored (``make bench`` also counts the stars
of the residual search around bright stars, ~0.1 % of the selection).
Writes ``benchmarks/results/stars-<frame>-<stamp>.{md,json}`` and
``stars-latest.{md,json}``. Quality only: nothing is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .benchmarks import (
    STAR_CONTAMINANT_BAR_PCT,
    STAR_RECOVERED_BAR_PCT,
    _load_frame_refcat,
    _load_snaps,
    _load_truth,
    _machine,
    _prepare,
    frame_simulation,
    frame_spec,
    run_and_write,
    scratch_dir,
)
from .errors import ConfigError

#: Match radius of the evaluator (px): a selected source with no true star this close is a contaminant.
MATCH_RADIUS_PIX = 2.0
#: A contaminant with a true star within this distance (px), but not within the match radius, is a blend.
BLEND_RADIUS_PIX = 5.0


@dataclasses.dataclass(frozen=True)
class SelectionBenchConfig:
    """What to simulate and which cuts to score."""

    #: A ``make bench`` frame name.
    frame: str = "4096-poor-seeing"
    #: Simulation seed (None: the ``make bench`` frame itself).
    seed: int | None = None
    #: Size-excess significance thresholds of the uniform cuts (and the oracle's grid).
    sigmas: tuple[float, ...] = (0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 5.0)
    #: Inner edges of the oracle's S/N bins (PSF-flux S/N; below the first and above the last are bins too).
    snr_edges: tuple[float, ...] = (10.0, 12.0, 14.0, 17.0, 20.0, 25.0, 35.0, 50.0, 100.0)
    #: Half-side (pixels) of the stamps of :func:`psf_template_score`: 12 holds 4.3 sigma of the
    #: poor-seeing (1.3", 0.2"/px) PSF, all a size test at S/N 10-30 can use.
    template_half_size_pix: int = 12

    def validate(self) -> None:
        frame_spec(self.frame)
        if not self.sigmas or any(not (k > 0) for k in self.sigmas):
            raise ConfigError(f"sigmas must be positive, got {self.sigmas}")
        if list(self.snr_edges) != sorted(set(self.snr_edges)):
            raise ConfigError(f"snr_edges must be strictly increasing, got {self.snr_edges}")
        if self.template_half_size_pix < 3:
            raise ConfigError(f"template_half_size_pix must be >= 3, got {self.template_half_size_pix}")


def passing_sigma(excess: npt.NDArray[np.float64], snr: npt.NDArray[np.float64], *, noise_coeff: float,
                  floor_frac: float) -> npt.NDArray[np.float64]:
    """The smallest size-test threshold (in sigmas) at which each source counts as a point source.

    :func:`~singleframe.steps.star_selection.select_stars` accepts a source when
    ``excess <= max(k * noise_coeff / snr, floor_frac)``: that holds for every ``k`` when the
    excess is within the floor (``-inf`` here), for ``k >= excess * snr / noise_coeff`` above
    it, and for no ``k`` when the excess or the S/N is not finite or positive (``+inf``).
    """
    excess = np.asarray(excess, float)
    snr = np.asarray(snr, float)
    ok = np.isfinite(excess) & np.isfinite(snr) & (snr > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        need = np.where(excess <= floor_frac, -np.inf, excess * snr / noise_coeff)
    return np.where(ok, need, np.inf)


def psf_template_score(exposure: Any, labels: npt.NDArray[np.integer], x: npt.NDArray[np.float64],
                       y: npt.NDArray[np.float64], own_label: npt.NDArray[np.integer], *, half_size_pix: int = 12,
                       bad_planes: Any = None, batch: int = 2000) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Significance and size of each source's blur beyond the PSF, from the PSF model's templates.

    A point source at ``(x, y)`` is ``F P``; the same source blurred by a small isotropic Gaussian of
    variance ``s²`` per axis is ``F (P + s² L)`` to first order, ``L = ∇²P / 2``. The pixels of a
    stamp are fitted by inverse-variance weighted least squares with the templates ``P``, ``L`` and
    the centroid derivatives ``∂P/∂x``, ``∂P/∂y`` (nuisance), leaving out other sources' footprints
    and ``bad_planes`` pixels. The score ``z`` is the ``L`` coefficient over its error: the score
    test of ``s² = 0``, locally most powerful against small blurs when the PSF model is right and
    the noise Gaussian. ``size_frac = 2 s² / T_psf`` (``T_psf = xx + yy`` of the model at the source)
    is comparable with the adaptive size excess ``T / T_psf − 1``.

    Parameters
    ----------
    exposure
        Background-subtracted :class:`~singleframe.exposure.Exposure` with its PSF.
    labels
        Footprint labels of the exposure (0: no source).
    x, y
        Source centroids (parent pixels).
    own_label
        Each source's label in ``labels``.
    half_size_pix
        Stamp half-side.
    bad_planes
        :class:`~singleframe.masks.MaskPlane` bits left out (default BAD, SAT, NO_DATA, CR).

    Returns
    -------
    (z, size_frac)
        NaN where the fit is singular or the position not finite.

    Raises
    ------
    ConfigError
        The exposure has no PSF, or ``labels`` does not match its shape.
    """
    from .masks import MaskPlane

    if exposure.psf is None:
        raise ConfigError("psf_template_score needs an exposure with a fitted PSF (run characterize first)")
    if np.shape(labels) != tuple(exposure.shape):
        raise ConfigError(f"labels shape {np.shape(labels)} does not match the exposure {tuple(exposure.shape)}; "
                          "pass the footprint labels of this exposure's detections")
    if bad_planes is None:
        bad_planes = MaskPlane.BAD | MaskPlane.SAT | MaskPlane.NO_DATA | MaskPlane.CR
    bad = np.uint32(int(bad_planes))
    img, var, mask = np.asarray(exposure.image), np.asarray(exposure.variance), np.asarray(exposure.mask)
    ny, nx = img.shape
    ox, oy = exposure.origin
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    own = np.asarray(own_label, np.int64)
    z = np.full(x.size, np.nan)
    frac = np.full(x.size, np.nan)
    off = np.arange(-half_size_pix, half_size_pix + 1)
    size = 2 * half_size_pix + 1
    todo = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    for start in range(0, todo.size, batch):
        idx = todo[start:start + batch]
        jx = np.round(x[idx] - ox).astype(np.int64)
        jy = np.round(y[idx] - oy).astype(np.int64)
        ry, rx = jy[:, None, None] + off[None, :, None], jx[:, None, None] + off[None, None, :]
        inside = (ry >= 0) & (ry < ny) & (rx >= 0) & (rx < nx)
        ry, rx = np.clip(ry, 0, ny - 1), np.clip(rx, 0, nx - 1)
        v = var[ry, rx].astype(float)
        lab = labels[ry, rx]
        usable = inside & ((mask[ry, rx] & bad) == 0) & ((lab == 0) | (lab == own[idx, None, None])) & (v > 0)
        w = np.where(usable, 1.0 / np.where(v > 0, v, 1.0), 0.0).reshape(idx.size, -1)
        d = img[ry, rx].astype(float).reshape(idx.size, -1)
        # One pixel of margin for the finite differences; the PSF is centred at the source's sub-pixel position.
        k = exposure.psf.images(x[idx], y[idx], size=size + 2, centered=False)
        core = k[:, 1:-1, 1:-1]
        lap = 0.5 * (k[:, 2:, 1:-1] + k[:, :-2, 1:-1] + k[:, 1:-1, 2:] + k[:, 1:-1, :-2] - 4.0 * core)
        dx = 0.5 * (k[:, 1:-1, 2:] - k[:, 1:-1, :-2])
        dy = 0.5 * (k[:, 2:, 1:-1] - k[:, :-2, 1:-1])
        t = np.stack([core, lap, dx, dy], axis=1).reshape(idx.size, 4, -1)
        normal = np.einsum("nip,np,njp->nij", t, w, t)
        rhs = np.einsum("nip,np,np->ni", t, w, d)
        ok = np.linalg.cond(normal) < 1e12
        cov = np.linalg.inv(normal[ok])
        coef = np.einsum("nij,nj->ni", cov, rhs[ok])
        z[idx[ok]] = coef[:, 1] / np.sqrt(cov[:, 1, 1])
        t_psf = exposure.psf.moments_many(x[idx[ok]], y[idx[ok]])[:, :2].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac[idx[ok]] = 2.0 * coef[:, 1] / coef[:, 0] / t_psf
    return z, frac


def best_binned_cut(need: npt.NDArray[np.float64], snr: npt.NDArray[np.float64],
                    is_star: npt.NDArray[np.bool_], is_contaminant: npt.NDArray[np.bool_],
                    evaluate: Callable[[npt.NDArray[np.bool_]], tuple[float, float]], *,
                    sigmas: Sequence[float], snr_edges: Sequence[float], min_recovered_pct: float,
                    n_lambdas: int = 60, completion_window_pct: float = 3.0) -> dict[str, Any]:
    """The per-S/N-bin size thresholds that minimise contamination at ``min_recovered_pct``, knowing the truth.

    Parameters
    ----------
    need
        :func:`passing_sigma` of each candidate (a candidate is selected at threshold ``k``
        when ``need <= k``).
    snr
        S/N of each candidate (binned at ``snr_edges``).
    is_star, is_contaminant
        Truth of each candidate: it matches an eligible true star; it matches no true star.
        They drive the choice; the totals come from ``evaluate``.
    evaluate
        ``selected mask -> (recovered %, contaminant %)``: the evaluator's exact figures.
    sigmas
        Thresholds a bin may take.
    min_recovered_pct
        The recovery a solution must reach.

    Returns
    -------
    dict
        ``recovered_pct``, ``contaminant_pct`` and ``sigmas`` (one per bin, ``snr_bins`` their
        lower edges) of the best solution (NaNs and None when none reaches the recovery), and
        ``frontier``: every distinct ``(recovered %, contaminant %)`` visited.

    For each trade-off ``lam`` (contaminants per recovered star), each bin takes the threshold
    minimising ``contaminants - lam * stars`` in that bin; sweeping ``lam`` traces the lower
    convex envelope of contamination against recovery. The envelope can step over the
    recovery target (one bin's next threshold adds many stars at once), so every envelope
    point within ``completion_window_pct`` below the target is then completed one bin at a
    time (:func:`_complete_to_target`) and the best completion counts too.
    """
    need = np.asarray(need, float)
    edges = np.concatenate([[-np.inf], np.asarray(snr_edges, float), [np.inf]])
    bins = np.clip(np.digitize(np.asarray(snr, float), edges) - 1, 0, len(edges) - 2)
    ks = np.asarray(sorted(sigmas), float)
    n_bins = len(edges) - 1
    # Counts per (bin, threshold): stars and contaminants kept.
    passed = need[:, None] <= ks[None, :]
    stars = np.zeros((n_bins, ks.size))
    conts = np.zeros((n_bins, ks.size))
    np.add.at(stars, bins, passed & np.asarray(is_star, bool)[:, None])
    np.add.at(conts, bins, passed & np.asarray(is_contaminant, bool)[:, None])
    best: dict[str, Any] = {"recovered_pct": math.nan, "contaminant_pct": math.nan, "sigmas": None}
    frontier: set[tuple[float, float]] = set()
    scored: dict[tuple[int, ...], tuple[float, float]] = {}

    def score(choice: tuple[int, ...]) -> tuple[float, float]:
        nonlocal best
        if choice not in scored:
            rec, con = evaluate(need <= ks[np.asarray(choice)][bins])
            scored[choice] = (rec, con)
            frontier.add((round(rec, 3), round(con, 3)))
            if rec >= min_recovered_pct and (best["sigmas"] is None or con < best["contaminant_pct"]):
                best = {"recovered_pct": rec, "contaminant_pct": con, "sigmas": [float(ks[i]) for i in choice]}
        return scored[choice]

    envelope = []
    for lam in np.geomspace(1e-3, 1e3, n_lambdas):
        choice = tuple(int(i) for i in np.argmin(conts - lam * stars, axis=1))
        if choice not in scored:
            envelope.append(choice)
            score(choice)
    for choice in envelope:
        rec, _ = scored[choice]
        if min_recovered_pct - completion_window_pct <= rec < min_recovered_pct:
            _complete_to_target(choice, stars, conts, score, min_recovered_pct)
    best["snr_bins"] = [float(e) for e in edges[:-1]]
    best["frontier"] = sorted(frontier)
    return best


def _complete_to_target(choice: tuple[int, ...], stars: npt.NDArray[np.float64], conts: npt.NDArray[np.float64],
                        score: Callable[[tuple[int, ...]], tuple[float, float]], target_pct: float) -> None:
    """Raise one bin's threshold at a time from ``choice`` until ``score`` reaches ``target_pct`` recovery.

    Each step takes, among the moves whose star count (``stars``: per bin and threshold)
    should reach the target, the one adding the fewest contaminants; when none should, the
    move adding the fewest contaminants per star. Every step is scored exactly.
    """
    current = list(choice)
    while True:
        rec, _ = score(tuple(current))
        bins_now = np.arange(len(current))
        n_now = float(stars[bins_now, current].sum())
        if rec >= target_pct or n_now <= 0 or rec <= 0:
            return
        n_needed = n_now * target_pct / rec  # stars at the target, by proportion
        best_move: tuple[float, float, int, int] | None = None  # (reaches?, cost, bin, threshold)
        for b, i in enumerate(current):
            for j in range(i + 1, stars.shape[1]):
                d_star = stars[b, j] - stars[b, i]
                if d_star <= 0:
                    continue
                d_cont = conts[b, j] - conts[b, i]
                reaches = n_now + d_star >= n_needed
                key = (0.0, d_cont) if reaches else (1.0, d_cont / d_star)
                if best_move is None or key < best_move[:2]:
                    best_move = (*key, b, j)
        if best_move is None:
            return
        current[best_move[2]] = best_move[3]


def neyman_pearson_bound(d_galaxy: npt.NDArray[np.float64], galaxy_bin: npt.NDArray[np.integer],
                         stars_per_bin: npt.NDArray[np.integer], star_loss_budget: float, *,
                         thresholds: npt.NDArray[np.float64] | None = None, n_lambdas: int = 400) -> dict[str, Any]:
    """Fewest galaxies any test can keep while losing at most ``star_loss_budget`` stars (expected).

    A test of "star" against a galaxy ``g`` whose log-likelihood ratio is separated by
    ``d_g`` noise sigmas (:func:`~singleframe.sim.evaluation.galaxy_point_source_distance`)
    that rejects a star with probability ``alpha`` keeps ``g`` with probability at least
    ``Phi(t - d_g)``, ``t = Phi^-1(1 - alpha)``, with equality for the most powerful test,
    which knows ``g``'s profile (Neyman–Pearson). Each S/N bin ``b`` (``galaxy_bin``; the stars
    of a bin are alike, so one ``alpha_b`` per bin) pays ``stars_per_bin[b] * alpha_b`` lost
    stars. Minimising the galaxies kept under the budget, over one threshold per bin and
    mixtures of two solutions (randomised tests), gives a bound that no selection on these
    sources can beat.

    Returns
    -------
    dict
        ``galaxies_kept`` and ``stars_lost`` (expected counts) of the optimum, ``thresholds``
        (one per bin, of the cheaper solution of the mixture), ``n_galaxies``.
    """
    from scipy.special import ndtr

    d = np.asarray(d_galaxy, float)
    gbin = np.asarray(galaxy_bin, np.int64)
    n_star = np.asarray(stars_per_bin, float)
    t = np.linspace(-4.0, 10.0, 1401) if thresholds is None else np.asarray(thresholds, float)
    n_bins = n_star.size
    if d.size and (gbin.min() < 0 or gbin.max() >= n_bins):
        raise ValueError("galaxy_bin must index stars_per_bin")
    lost = n_star[:, None] * ndtr(-t)[None, :]  # stars rejected per bin and threshold
    kept = np.zeros((n_bins, t.size))
    for b in range(n_bins):
        db = d[gbin == b]
        if db.size:
            kept[b] = ndtr(t[None, :] - db[:, None]).sum(axis=0)
    points: dict[tuple[float, float], list[int]] = {}
    for lam in np.concatenate([[0.0], np.geomspace(1e-4, 1e4, n_lambdas)]):
        j = np.argmin(kept + lam * lost, axis=1)
        rows = np.arange(n_bins)
        points[(float(lost[rows, j].sum()), float(kept[rows, j].sum()))] = [int(i) for i in j]
    # Every sweep point lies on the lower convex envelope of kept(lost): interpolate there.
    order = sorted(points)
    below = [p for p in order if p[0] <= star_loss_budget]
    above = [p for p in order if p[0] > star_loss_budget]
    if not below:
        raise ValueError("no solution loses as few stars as the budget allows")
    lo = min(below, key=lambda p: p[1])
    best_lost, best_kept = lo
    if above:
        hi = min(above, key=lambda p: p[0])
        if hi[1] < lo[1] and hi[0] > lo[0]:
            w = (star_loss_budget - lo[0]) / (hi[0] - lo[0])
            best_lost, best_kept = star_loss_budget, lo[1] + w * (hi[1] - lo[1])
    return {"galaxies_kept": best_kept, "stars_lost": best_lost, "n_galaxies": int(d.size),
            "thresholds": [float(t[i]) for i in points[lo]]}


def information_bound(candidates: Any, truth_sources: Any, *, selected_without_size: npt.NDArray[np.bool_],
                      psf_fwhm_pix: float, snr_edges: Sequence[float], min_recovered_pct: float,
                      sky_variance: npt.NDArray[np.float64], n_other_contaminants: int,
                      galaxy_distance: Callable[..., tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]
                      ) -> dict[str, Any]:
    """The contamination no selection can beat: :func:`neyman_pearson_bound` on the selection's galaxies.

    The sources that pass every cut but the size test (``selected_without_size``) are the
    pool. Its galaxies (a true galaxy within the match radius, no true star) get their
    distance from a point source and that point source's flux, ``galaxy_distance(ids, x, y,
    instflux, sky_variance) -> (d, point_flux)`` (the true galaxy's, at its local sky
    variance); its recovered eligible stars carry the loss budget: the pool's recovery minus
    ``min_recovered_pct`` of the eligible stars. Stars are binned by true S/N at
    ``snr_edges`` but the first (the faintest bin holds everything below the second edge),
    each galaxy with the star it must be told from (the true S/N of its fitted point-source
    flux).
    Knowing each source's true S/N and each galaxy's profile only helps the test, so the
    result bounds every selection whose size (rate of rejected stars) is constant within
    each S/N bin (the oracle's bins; as bins shrink, every selection).

    ``contaminant_pct_galaxies`` counts the galaxies alone (every other contaminant
    rejected, no star lost from the denominator); ``contaminant_pct`` adds
    ``n_other_contaminants`` (blends and spurious sources, e.g. as many as the configured
    cut keeps).
    """
    from .sim.evaluation import eligible_stars

    pool = np.asarray(selected_without_size, bool)
    xy = np.column_stack([np.asarray(candidates["base_SdssCentroid_x"], float),
                          np.asarray(candidates["base_SdssCentroid_y"], float)])
    tx, ty = np.asarray(truth_sources["x"], float), np.asarray(truth_sources["y"], float)
    true_star = np.asarray(truth_sources["is_star"], bool)
    eligible = eligible_stars(truth_sources, psf_fwhm_pix=psf_fwhm_pix)
    true_snr = np.asarray(truth_sources["snr"], float)

    d_star, _ = _nearest(xy, tx, ty, true_star)
    d_gal, i_gal = _nearest(xy, tx, ty, ~true_star)
    d_elig, i_elig = _nearest(xy, tx, ty, eligible)
    gal = pool & (d_star > MATCH_RADIUS_PIX) & (d_gal <= MATCH_RADIUS_PIX)
    recovered = np.unique(i_elig[pool & (d_elig <= MATCH_RADIUS_PIX)])
    n_eligible = int(eligible.sum())
    budget = recovered.size - min_recovered_pct / 100.0 * n_eligible
    # The faintest bin reaches down: a galaxy whose point source is below the first edge (S/N 10, where
    # the eligible stars start) shares its test with the stars just above it. Measured S/N scatters by
    # ~1, so no selection can reject S/N 9 sources and keep S/N 10.5 stars; a bin of its own would
    # reject them for free.
    edges = np.concatenate([[-np.inf], np.asarray(snr_edges, float)[1:], [np.inf]])
    n_bins = len(edges) - 1

    def bin_of(snr: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        return np.clip(np.digitize(snr, edges) - 1, 0, n_bins - 1)

    stars_per_bin = np.bincount(bin_of(true_snr[recovered]), minlength=n_bins)
    gi = i_gal[gal]
    flux = np.asarray(truth_sources["instflux"], float)[gi]
    d, point_flux = (galaxy_distance(np.asarray(truth_sources["id"], np.int64)[gi], tx[gi], ty[gi], flux,
                                     np.asarray(sky_variance, float)[gal]) if gi.size else (np.zeros(0), np.zeros(0)))
    # A galaxy is told from the star of its fitted point-source flux: it sits in that star's S/N bin
    # (the truth's S/N is a point source's, of the galaxy's whole flux).
    galaxy_snr = true_snr[gi] * np.asarray(point_flux, float) / np.where(flux > 0, flux, 1.0)
    n_pool_stars = int(np.sum(pool & (d_star <= MATCH_RADIUS_PIX)))
    out: dict[str, Any] = {"n_pool_galaxies": int(gi.size), "n_pool_stars": n_pool_stars,
                           "star_loss_budget": float(budget), "n_other_contaminants": int(n_other_contaminants),
                           "distance_p10_p50_p90": _percentiles(d)}
    if budget < 0:
        out.update({"galaxies_kept": math.nan, "contaminant_pct_galaxies": math.nan, "contaminant_pct": math.nan})
        return out
    np_bound = neyman_pearson_bound(d, bin_of(galaxy_snr), stars_per_bin, budget)
    kept = np_bound["galaxies_kept"]
    out.update({"galaxies_kept": kept, "stars_lost": np_bound["stars_lost"],
                "contaminant_pct_galaxies": 100.0 * kept / (n_pool_stars + kept),
                "contaminant_pct": 100.0 * (kept + n_other_contaminants) / (n_pool_stars + kept + n_other_contaminants),
                "thresholds": np_bound["thresholds"], "snr_bins": [float(e) for e in edges[:-1]]})
    return out


def run_selection_bench(config: SelectionBenchConfig, *, work_dir: str | Path | None = None,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Simulate the frame, calibrate it up to the star pass and score the cuts.

    Raises
    ------
    ConfigError
        If ``config`` is invalid.
    """
    config.validate()
    spec = frame_spec(config.frame)
    with scratch_dir(work_dir, "sf-stars-bench-") as work:
        frame_dir = work / spec.name
        log(f"simulating {spec.name}" + ("" if config.seed is None else f" (seed {config.seed})"))
        _prepare(spec, frame_dir, seed=config.seed)
        candidates, star_config, template, sky_variance, prior = _star_candidates(frame_dir, config)
        truth = _load_truth(frame_dir)
    from .sim.evaluation import galaxy_point_source_distance, true_psf_fwhm_pix
    from .steps.star_selection import select_stars

    fwhm = true_psf_fwhm_pix(truth)
    result = score_cuts(candidates, truth.sources, psf_fwhm_pix=fwhm, star_config=star_config, config=config,
                        template=template, prior=prior)
    sim_config, visit = frame_simulation(spec, seed=config.seed)
    no_size = select_stars(candidates, config=dataclasses.replace(star_config, max_size_excess_sigma=None)).selected
    kinds = result["contaminants"]
    bound = information_bound(
        candidates, truth.sources, selected_without_size=np.asarray(no_size, bool), psf_fwhm_pix=fwhm,
        snr_edges=config.snr_edges, min_recovered_pct=STAR_RECOVERED_BAR_PCT, sky_variance=sky_variance,
        n_other_contaminants=kinds["blend"] + kinds["nothing"],
        galaxy_distance=functools.partial(galaxy_point_source_distance, sim_config, visit, 0))
    return {"machine": _machine(), "config": dataclasses.asdict(config), **result, "information_bound": bound}


def _star_candidates(frame_dir: Path, config: SelectionBenchConfig) -> tuple[Any, Any, tuple[Any, Any], Any, Any]:
    """Star-pass candidates, the star selector's config, the candidates' :func:`psf_template_score`,
    the sky variance at each candidate (median of the exposure's variance in its 128-px block) and
    the candidates' reference prior (:func:`~singleframe.steps.star_selection.reference_prior`)."""
    from .steps.config import load_calibrate_config
    from .steps.pipeline import calibrate_astrometry, characterize, correct_apertures, find_stars
    from .steps.star_selection import reference_prior

    calib = load_calibrate_config(None)
    snaps = _load_snaps(frame_dir)
    refcat = _load_frame_refcat(frame_dir)
    ch = characterize(snaps, config=calib)
    del snaps
    ap = correct_apertures(ch.exposure, ch.psf_stars, config=calib)
    ast = calibrate_astrometry(ch.exposure, ap.psf_stars, refcat, config=calib)
    fs = find_stars(ch.exposure, ast.psf_stars, wcs=ast.wcs, ap_corr=ap.ap_corr, normalization=ap.normalization,
                    config=calib, scale_err=ap.scale_err, keep_candidates=True, refcat=refcat)
    assert fs.candidates is not None
    cand = fs.candidates
    template = psf_template_score(ch.exposure, fs.detections.labels, np.asarray(cand["base_SdssCentroid_x"], float),
                                  np.asarray(cand["base_SdssCentroid_y"], float), np.asarray(cand["id"], np.int64),
                                  half_size_pix=config.template_half_size_pix)
    prior = (reference_prior(cand, refcat, wcs=ast.wcs, origin=ch.exposure.origin, shape=ch.exposure.shape,
                             band=ch.exposure.visit_info.band, config=calib.star_selector)
             if calib.star_selector.use_reference_catalog else None)
    return cand, calib.star_selector, template, _block_median_at(ch.exposure.variance, cand, ch.exposure.origin), prior


def _block_median_at(values: npt.NDArray[np.floating], catalog: Any, origin: tuple[int, int],
                     block_pix: int = 128) -> npt.NDArray[np.float64]:
    """The median of ``values`` over the ``block_pix`` square block holding each source of ``catalog``."""
    ny, nx = values.shape
    nby, nbx = -(-ny // block_pix), -(-nx // block_pix)
    med = np.array([[np.median(values[by * block_pix:(by + 1) * block_pix, bx * block_pix:(bx + 1) * block_pix])
                     for bx in range(nbx)] for by in range(nby)], float)
    ix = np.asarray(catalog["base_SdssCentroid_x"], float) - origin[0]
    iy = np.asarray(catalog["base_SdssCentroid_y"], float) - origin[1]
    bx = np.clip(np.nan_to_num(ix, nan=0.0).astype(np.int64) // block_pix, 0, nbx - 1)
    by = np.clip(np.nan_to_num(iy, nan=0.0).astype(np.int64) // block_pix, 0, nby - 1)
    return med[by, bx]


def score_cuts(candidates: Any, truth_sources: Any, *, psf_fwhm_pix: float, star_config: Any,
               config: SelectionBenchConfig, template: tuple[Any, Any] | None = None,
               prior: Any = None) -> dict[str, Any]:
    """Recovery and contamination of the configured, uniform and oracle cuts on ``candidates``.

    ``prior`` is the candidates' reference prior: the configured cut uses it (and is also scored
    without it); the uniform and oracle cuts are on the size excess alone.

    ``template`` is the candidates' :func:`psf_template_score` ``(z, size_frac)``: when given, the
    oracle is also run on it (same flags, S/N cut and size floor as the selector).
    """

    from .sim.evaluation import eligible_stars, star_recovery
    from .steps.star_selection import select_stars, size_excess

    def evaluate(selected: npt.NDArray[np.bool_]) -> tuple[float, float]:
        return star_recovery(candidates[np.asarray(selected, bool)], truth_sources, psf_fwhm_pix=psf_fwhm_pix)

    configured = np.asarray(select_stars(candidates, config=star_config, prior=prior).selected, bool)
    size_only = np.asarray(select_stars(candidates, config=star_config).selected, bool)
    no_size = np.asarray(select_stars(candidates, config=dataclasses.replace(
        star_config, max_size_excess_sigma=None)).selected, bool)
    snr = (np.asarray(candidates[f"{star_config.flux_field}_instFlux"], float)
           / np.asarray(candidates[f"{star_config.flux_field}_instFluxErr"], float))
    excess = size_excess(candidates)
    need = passing_sigma(excess, snr, noise_coeff=star_config.size_noise_coeff,
                         floor_frac=star_config.min_size_excess_frac)
    need = np.where(no_size, need, np.inf)  # flags and the S/N cut stay

    x = np.asarray(candidates["base_SdssCentroid_x"], float)
    y = np.asarray(candidates["base_SdssCentroid_y"], float)
    tx, ty = np.asarray(truth_sources["x"], float), np.asarray(truth_sources["y"], float)
    true_star = np.asarray(truth_sources["is_star"], bool)
    eligible = eligible_stars(truth_sources, psf_fwhm_pix=psf_fwhm_pix)
    xy = np.column_stack([x, y])

    (d_star, _), (d_elig, _), (d_gal, _) = (_nearest(xy, tx, ty, k) for k in (true_star, eligible, ~true_star))
    is_cont = d_star > MATCH_RADIUS_PIX
    is_star = d_elig <= MATCH_RADIUS_PIX

    applied = prior is not None and prior.applied
    rows = [{"cut": "configured" + (", reference prior" if applied else ""),
             "sigma": star_config.max_size_excess_sigma, **_score(evaluate, configured)}]
    if applied:
        rows.append({"cut": "configured, size test only", "sigma": star_config.max_size_excess_sigma,
                     **_score(evaluate, size_only)})
    rows.append({"cut": "no size test", "sigma": None, **_score(evaluate, no_size)})
    for k in sorted(config.sigmas, reverse=True):
        rows.append({"cut": "uniform", "sigma": float(k), **_score(evaluate, need <= k)})
    oracle = best_binned_cut(need, snr, is_star, is_cont, evaluate, sigmas=config.sigmas,
                             snr_edges=config.snr_edges, min_recovered_pct=STAR_RECOVERED_BAR_PCT)
    template_oracle = None
    if template is not None:
        z_t, frac_t = (np.asarray(a, float) for a in template)
        need_t = np.where(frac_t <= star_config.min_size_excess_frac, -np.inf, z_t)
        need_t = np.where(no_size & np.isfinite(z_t), need_t, np.inf)
        template_oracle = best_binned_cut(need_t, snr, is_star, is_cont, evaluate, sigmas=config.sigmas,
                                          snr_edges=config.snr_edges, min_recovered_pct=STAR_RECOVERED_BAR_PCT)

    sel_cont = configured & is_cont
    with np.errstate(invalid="ignore", divide="ignore"):
        z_all = excess * snr / star_config.size_noise_coeff
    galaxy = sel_cont & (d_gal <= MATCH_RADIUS_PIX)
    kinds = {"n_selected": int(configured.sum()), "n_contaminants": int(sel_cont.sum()),
             "galaxy": int(galaxy.sum()),
             "blend": int(np.sum(sel_cont & ~galaxy & (d_star <= BLEND_RADIUS_PIX))),
             "nothing": int(np.sum(sel_cont & ~galaxy & (d_star > BLEND_RADIUS_PIX))),
             "galaxy_snr_p10_p50_p90": _percentiles(snr[galaxy]),
             "galaxy_size_excess_sigma_p50_p90": _percentiles(z_all[galaxy], (50, 90)),
             "star_size_excess_sigma_p50": _percentiles(z_all[configured & is_star], (50,)),
             "n_within_size_floor": int(np.sum(configured & (need == -np.inf)))}
    return {"rows": rows, "oracle": oracle, "template_oracle": template_oracle, "contaminants": kinds,
            "reference_prior": None if prior is None else prior.diagnostics(),
            "bars": {"recovered_pct": STAR_RECOVERED_BAR_PCT, "contaminant_pct": STAR_CONTAMINANT_BAR_PCT}}


def _nearest(xy: npt.NDArray[np.float64], tx: npt.NDArray[np.float64], ty: npt.NDArray[np.float64],
             keep: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Distance from each of ``xy`` to the nearest truth position with ``keep``, and that source's index
    (``inf`` and 0 when none is kept)."""
    idx = np.flatnonzero(keep)
    if not idx.size:
        return np.full(len(xy), np.inf), np.zeros(len(xy), np.int64)
    from scipy.spatial import cKDTree

    dist, i = cKDTree(np.column_stack([tx[idx], ty[idx]])).query(xy)
    return np.asarray(dist, float), idx[np.asarray(i, np.int64)]


def _score(evaluate: Callable[[npt.NDArray[np.bool_]], tuple[float, float]],
           selected: npt.NDArray[np.bool_]) -> dict[str, Any]:
    rec, con = evaluate(selected)
    return {"recovered_pct": rec, "contaminant_pct": con, "n_selected": int(np.sum(selected))}


def _percentiles(values: npt.NDArray[np.float64], q: Sequence[float] = (10, 50, 90)) -> list[float] | None:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return [float(p) for p in np.percentile(v, q)] if v.size else None


def format_markdown(result: dict[str, Any]) -> str:
    """The cuts, the oracle and the contaminants as Markdown."""
    cfg, bars, o, c = result["config"], result["bars"], result["oracle"], result["contaminants"]
    lines = [f"Star selection on `{cfg['frame']}`" + ("" if cfg["seed"] is None else f" (seed {cfg['seed']})")
             + f", first-pass catalogue ({result['machine']}); bars: recovered >= {bars['recovered_pct']} %, "
             f"contaminants <= {bars['contaminant_pct']} %", "",
             "| cut | size test (sigma) | recovered % | contaminants % | selected |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        sigma = "off" if r["sigma"] is None else f"{r['sigma']:g}"
        lines.append(f"| {r['cut']} | {sigma} | {r['recovered_pct']:.2f} | {r['contaminant_pct']:.2f} | "
                     f"{r['n_selected']} |")
    lines.append("")
    rp = result.get("reference_prior")
    if rp:
        lines += [("Reference prior applied" if rp["applied"] else f"Reference prior not applied ({rp['reason']})")
                  + f": {rp['n_reference']} reference stars on the detector, complete to {rp['complete_mag']:.2f} mag "
                  f"(zero point {rp['zero_point_mag']:.2f}); {rp['n_matched']} candidates matched, "
                  f"{rp['n_unmatched_complete']} unmatched in the complete range (held to the stricter size test); "
                  f"{100 * rp['matched_fraction']:.1f} % of the S/N >= 50 point sources matched.", ""]
    if o["sigmas"] is None:
        lines.append(f"Oracle (per-S/N-bin thresholds chosen with the truth): no solution reaches "
                     f"{bars['recovered_pct']} % recovery.")
    else:
        per_bin = ", ".join(f"S/N >= {lo:g}: {k:g}" if math.isfinite(lo) else f"below: {k:g}"
                            for lo, k in zip(o["snr_bins"], o["sigmas"], strict=True))
        lines.append(f"Oracle (per-S/N-bin thresholds chosen with the truth, the bound of any cut on size "
                     f"excess and S/N): best contamination at >= {bars['recovered_pct']} % recovery is "
                     f"**{o['contaminant_pct']:.2f} %** ({o['recovered_pct']:.2f} % recovered; thresholds "
                     f"{per_bin}).")
    lines.append("")
    lines.append("Frontier visited (recovered %, contaminants %): "
                 + "; ".join(f"({r:.2f}, {k:.2f})" for r, k in o["frontier"]))
    t = result.get("template_oracle")
    if t is not None:
        best = ("no solution reaches the recovery" if t["sigmas"] is None else
                f"best contamination at >= {bars['recovered_pct']} % recovery **{t['contaminant_pct']:.2f} %** "
                f"({t['recovered_pct']:.2f} % recovered)")
        lines += ["", "The same oracle on the PSF-template score (`psf_template_score`: the fitted PSF model's "
                      "blur template, an independent size statistic): " + best + "; frontier: "
                  + "; ".join(f"({r:.2f}, {k:.2f})" for r, k in t["frontier"])]
    lines += ["", f"Contaminants of the configured cut: {c['n_contaminants']} of {c['n_selected']} selected; "
                  f"{c['galaxy']} true galaxies within {MATCH_RADIUS_PIX:g} px, {c['blend']} blends (a true star "
                  f"{MATCH_RADIUS_PIX:g}-{BLEND_RADIUS_PIX:g} px away), {c['nothing']} with nothing near."]
    if c["galaxy_snr_p10_p50_p90"] and c["galaxy_size_excess_sigma_p50_p90"] and c["star_size_excess_sigma_p50"]:
        g, z = c["galaxy_snr_p10_p50_p90"], c["galaxy_size_excess_sigma_p50_p90"]
        lines.append(f"Galaxy contaminants: S/N {g[0]:.1f} / {g[1]:.1f} / {g[2]:.1f} (10th / 50th / 90th "
                     f"percentile); size excess {z[0]:.2f} sigma at the median, {z[1]:.2f} at the 90th "
                     f"percentile, against {c['star_size_excess_sigma_p50'][0]:.2f} for the selected true stars.")
    b = result.get("information_bound")
    if b is not None and math.isfinite(b.get("galaxies_kept", math.nan)):
        dq = b["distance_p10_p50_p90"] or [math.nan] * 3
        lines += ["", f"Information bound (Neyman–Pearson, `information_bound`): of the {b['n_pool_galaxies']} "
                      f"galaxies that pass every cut but the size test (their distance from the nearest point "
                      f"source: {dq[0]:.1f} / {dq[1]:.1f} / {dq[2]:.1f} noise sigmas at the 10th / 50th / 90th "
                      f"percentile), the most powerful test for each galaxy, knowing its profile and true S/N, "
                      f"still keeps **{b['galaxies_kept']:.1f}** while losing {b['stars_lost']:.1f} of the "
                      f"{b['star_loss_budget']:.1f} stars the recovery bar allows: "
                      f"**{b['contaminant_pct_galaxies']:.2f} %** galaxies among {b['n_pool_stars']} stars. No "
                      f"selection on these sources can keep fewer galaxies. With as many other contaminants as "
                      f"the configured cut keeps ({b['n_other_contaminants']} blends and spurious sources, which "
                      f"a selection might also reject) that is {b['contaminant_pct']:.2f} %."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m singleframe.selection_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frame", default=SelectionBenchConfig.frame, help="a `make bench` frame name")
    parser.add_argument("--seed", type=int, default=None, help="another sky and noise (default: make bench's frame)")
    parser.add_argument("--out", default="benchmarks/results", help="where the Markdown and JSON go")
    args = parser.parse_args(argv)
    config = SelectionBenchConfig(args.frame, args.seed)
    suffix = "" if config.seed is None else f"-seed{config.seed}"
    run_and_write(lambda: run_selection_bench(config), format_markdown, args.out, f"stars-{config.frame}{suffix}",
                  "stars-latest")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
