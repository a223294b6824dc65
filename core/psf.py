"""PSF models: the interface every model follows, and the Gaussian model.

Every model gives, at any parent-pixel position ``(x, y)``, a normalised
kernel image (sum 1) and its second moments, and serialises itself to FITS
HDUs (no pickle) with a ``PSFTYPE`` keyword naming the class in the registry.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy.io import fits
from scipy import fft as sp_fft
from scipy import special

from .errors import DatasetError
from .splines import GridSpline

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

_REGISTRY: dict[str, type[PsfModel]] = {}


def register_psf(cls: type[PsfModel]) -> type[PsfModel]:
    """Class decorator: make ``cls`` loadable by :func:`psf_from_hdus` via its ``type_name``."""
    _REGISTRY[cls.type_name] = cls
    return cls


class PsfModel(abc.ABC):
    """Interface of a PSF model. Positions are parent pixel coordinates."""

    type_name: str = ""

    @abc.abstractmethod
    def image(self, x: float, y: float, *, size: int | None = None, centered: bool = True) -> npt.NDArray[np.float64]:
        """Kernel image of odd ``size`` (default :attr:`default_size`), sum 1.

        With ``centered=True`` the PSF centre is the centre of the middle
        pixel; otherwise it is offset by the fractional part of ``(x, y)``
        (``x - round(x)``), so the stamp can be placed at ``round(x), round(y)``.
        """

    @abc.abstractmethod
    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        """Second moments ``(ixx, iyy, ixy)`` in pixel² (unweighted Gaussian-equivalent)."""

    @property
    @abc.abstractmethod
    def default_size(self) -> int:
        """Odd stamp size (pixels) holding nearly all the flux."""

    @abc.abstractmethod
    def to_hdus(self) -> list[fits.ImageHDU | fits.BinTableHDU]:
        """FITS extensions describing the model; the first has ``PSFTYPE``."""

    @classmethod
    @abc.abstractmethod
    def from_hdus(cls, hdus: Sequence[fits.ImageHDU | fits.BinTableHDU]) -> PsfModel:
        """Inverse of :meth:`to_hdus`."""

    def _positions_and_size(self, x: npt.ArrayLike, y: npt.ArrayLike, size: int | None
                            ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int]:
        """Positions as 1-d float arrays and the odd stamp size (``size`` or the default, made odd)."""
        xs = np.atleast_1d(np.asarray(x, float))
        ys = np.atleast_1d(np.asarray(y, float))
        return xs, ys, int(size or self.default_size) | 1

    # -- vectorised forms (models override them for speed) ---------------------------
    def images(self, x: npt.ArrayLike, y: npt.ArrayLike, *, size: int | None = None,
               centered: bool = True) -> npt.NDArray[np.float64]:
        """Stack of kernel images ``(n, size, size)`` at the positions ``x``, ``y`` (see :meth:`image`)."""
        xs, ys, n = self._positions_and_size(x, y, size)
        if xs.size == 0:
            return np.zeros((0, n, n))
        return np.stack([self.image(float(a), float(b), size=n, centered=centered) for a, b in zip(xs, ys, strict=True)])

    def moments_many(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``(n, 3)`` array of :meth:`moments` ``(ixx, iyy, ixy)`` at the positions ``x``, ``y``."""
        xs = np.atleast_1d(np.asarray(x, float))
        ys = np.atleast_1d(np.asarray(y, float))
        if xs.size == 0:
            return np.zeros((0, 3))
        return np.array([self.moments(float(a), float(b)) for a, b in zip(xs, ys, strict=True)], float).reshape(-1, 3)

    # -- derived quantities ---------------------------------------------------------
    def sigma(self, x: float, y: float) -> float:
        """Determinant radius ``(ixx iyy - ixy²)^(1/4)`` in pixels."""
        ixx, iyy, ixy = self.moments(x, y)
        return float(max(ixx * iyy - ixy * ixy, 0.0) ** 0.25)

    def area(self, x: float, y: float) -> float:
        """Effective area ``(Σk)² / Σk²`` of the kernel in pixels² (noise-equivalent area)."""
        k = self.image(x, y, size=max(self.default_size, int(2 * math.ceil(8 * self.sigma(x, y)) + 1)))
        return float(k.sum() ** 2 / np.sum(k * k))


@register_psf
@dataclass(frozen=True)
class GaussianPsf(PsfModel):
    """An elliptical Gaussian, constant over the detector."""

    sigma_pix: float
    e1: float = 0.0
    e2: float = 0.0
    size: int = 0  # 0: choose from sigma

    type_name = "gaussian"

    def __post_init__(self) -> None:
        if not (self.sigma_pix > 0 and math.isfinite(self.sigma_pix)):
            raise ValueError(f"Gaussian PSF sigma must be positive and finite, got {self.sigma_pix}")

    @property
    def default_size(self) -> int:
        if self.size:
            return int(self.size)
        return int(2 * math.ceil(5.0 * self.sigma_pix) + 1)

    def _covariance(self) -> tuple[float, float, float]:
        # Moments with determinant radius sigma and ellipticity (e1, e2) in the
        # (xx-yy)/(xx+yy) convention.
        e = math.hypot(self.e1, self.e2)
        t = 2.0 * self.sigma_pix**2 / math.sqrt(max(1.0 - e * e, 1e-12))
        return 0.5 * t * (1 + self.e1), 0.5 * t * (1 - self.e1), 0.5 * t * self.e2

    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        return self._covariance()

    def image(self, x: float, y: float, *, size: int | None = None, centered: bool = True) -> npt.NDArray[np.float64]:
        return self.images(x, y, size=size, centered=centered)[0]

    def images(self, x: npt.ArrayLike, y: npt.ArrayLike, *, size: int | None = None,
               centered: bool = True) -> npt.NDArray[np.float64]:
        xs, ys, n = self._positions_and_size(x, y, size)
        dx = np.zeros(xs.size) if centered else xs - np.round(xs)
        dy = np.zeros(ys.size) if centered else ys - np.round(ys)
        half = n // 2
        ixx, iyy, ixy = self._covariance()
        if ixy == 0.0:
            # Axis-aligned: the pixel integral is a product of erf differences (exact and fast).
            edges = np.arange(-half - 0.5, half + 1.0, dtype=float)
            cx = special.erf((edges[None, :] - dx[:, None]) / math.sqrt(2.0 * ixx))
            cy = special.erf((edges[None, :] - dy[:, None]) / math.sqrt(2.0 * iyy))
            kx = np.diff(cx, axis=1)
            ky = np.diff(cy, axis=1)
            k = ky[:, :, None] * kx[:, None, :]
            return np.asarray(k / k.sum(axis=(1, 2), keepdims=True), dtype=float)
        # Integrate over each pixel with 3x3 sub-samples so that narrow PSFs keep their flux.
        sub = (np.arange(3) - 1) / 3.0
        grid = np.arange(-half, half + 1, dtype=float)
        # Axes: (source, row, column, sub-row, sub-column).
        xx = (grid[None, None, :, None, None] + sub[None, None, None, None, :]) - dx[:, None, None, None, None]
        yy = (grid[None, :, None, None, None] + sub[None, None, None, :, None]) - dy[:, None, None, None, None]
        det = ixx * iyy - ixy * ixy
        q = (iyy * xx * xx - 2 * ixy * xx * yy + ixx * yy * yy) / det
        k = np.exp(-0.5 * q).sum(axis=(3, 4))
        return np.asarray(k / k.sum(axis=(1, 2), keepdims=True), dtype=float)

    def moments_many(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        n = np.atleast_1d(np.asarray(x, float)).size
        return np.tile(np.array(self._covariance(), float), (n, 1))

    def to_hdus(self) -> list[fits.ImageHDU | fits.BinTableHDU]:
        hdr = fits.Header()
        hdr["EXTNAME"] = "PSF"
        hdr["PSFTYPE"] = self.type_name
        hdr["SIGMA"] = (self.sigma_pix, "Gaussian sigma [pixel]")
        hdr["E1"] = self.e1
        hdr["E2"] = self.e2
        hdr["STAMPSZ"] = self.size
        data = self.image(0.0, 0.0).astype(np.float32)
        return [fits.ImageHDU(data=data, header=hdr)]

    @classmethod
    def from_hdus(cls, hdus: Sequence[fits.ImageHDU | fits.BinTableHDU]) -> GaussianPsf:
        h = hdus[0].header
        return cls(float(h["SIGMA"]), float(h.get("E1", 0.0)), float(h.get("E2", 0.0)), int(h.get("STAMPSZ", 0)))

# --------------------------------------------------------------------------------------
# Shared pixel tools: sub-pixel shifts and adaptive moments of stamp stacks
# --------------------------------------------------------------------------------------
def shift_stamps(stamps: npt.ArrayLike, dx: npt.ArrayLike, dy: npt.ArrayLike, *,
                 pad_pix: int = 3) -> npt.NDArray[np.float64]:
    """Shift each stamp of an ``(n, ny, nx)`` stack by ``(dx, dy)`` pixels (Fourier phase shift).

    Parameters
    ----------
    stamps
        Stack of images.
    dx, dy
        Shifts in pixels, one per stamp (best within ``[-0.5, 0.5]``): the
        content at ``(x, y)`` moves to ``(x + dx, y + dy)``.
    pad_pix
        Zero padding on every side, so that the periodic wrap of the FFT
        does not bring one edge's pixels to the other.

    Returns
    -------
    Shifted stack, same shape, float64.

    Notes
    -----
    A phase shift is exact for band-limited images. Pixelised PSFs with
    sigma ≳ 1.2 pixel are band-limited to better than 1e-4, so a shift and
    its inverse preserve adaptive sizes to < 1e-6. Lanczos-3 (tried first)
    shrinks sizes by ~0.6 % at half-pixel shifts for sigma = 2 pixels, which
    is too much for a 0.2 % size budget. Odd padded sizes avoid the
    ambiguous Nyquist bin.
    """
    s = np.asarray(stamps, dtype=float)
    n, ny0, nx0 = s.shape
    py = pad_pix + (1 - (ny0 + 2 * pad_pix) % 2)  # make the padded size odd
    px = pad_pix + (1 - (nx0 + 2 * pad_pix) % 2)
    s = np.pad(s, ((0, 0), (pad_pix, py), (pad_pix, px)))
    ny, nx = s.shape[1], s.shape[2]
    dxs = np.broadcast_to(np.asarray(dx, float), (n,))
    dys = np.broadcast_to(np.asarray(dy, float), (n,))
    # The phase ramp is separable: two small exponentials and an outer product.
    # Single precision halves the cost; its ~1e-7 relative error is far below any pixel noise.
    phase_x = np.exp(-2j * np.pi * np.fft.rfftfreq(nx)[None, :] * dxs[:, None]).astype(np.complex64)
    phase_y = np.exp(-2j * np.pi * np.fft.fftfreq(ny)[None, :] * dys[:, None]).astype(np.complex64)
    spec = sp_fft.rfft2(s.astype(np.float32))
    spec *= phase_y[:, :, None]
    spec *= phase_x[:, None, :]
    out = sp_fft.irfft2(spec, s=(ny, nx))
    return np.asarray(out[:, pad_pix:pad_pix + ny0, pad_pix:pad_pix + nx0], dtype=float)


def _shift_combinations(basis: npt.NDArray[np.float64], weights: npt.NDArray[np.float64], dx: npt.ArrayLike,
                        dy: npt.ArrayLike, *, pad_pix: int = 3) -> npt.NDArray[np.float64]:
    """:func:`shift_stamps` of the stamps ``weights @ basis`` (``(n, K) @ (K, s, s)``).

    The Fourier transform is linear, so the K basis images are transformed once and each
    stamp's spectrum is the weighted sum of theirs: one inverse FFT per stamp instead of two.
    """
    k, ny0, nx0 = basis.shape
    py = pad_pix + (1 - (ny0 + 2 * pad_pix) % 2)  # same odd padded size as shift_stamps
    px = pad_pix + (1 - (nx0 + 2 * pad_pix) % 2)
    padded = np.pad(np.asarray(basis, float), ((0, 0), (pad_pix, py), (pad_pix, px)))
    ny, nx = padded.shape[1], padded.shape[2]
    n = weights.shape[0]
    dxs = np.broadcast_to(np.asarray(dx, float), (n,))
    dys = np.broadcast_to(np.asarray(dy, float), (n,))
    spec_b = sp_fft.rfft2(padded.astype(np.float32)).reshape(k, -1)
    spec = (np.asarray(weights, np.float32) @ spec_b).reshape(n, ny, -1)
    phase_x = np.exp(-2j * np.pi * np.fft.rfftfreq(nx)[None, :] * dxs[:, None]).astype(np.complex64)
    phase_y = np.exp(-2j * np.pi * np.fft.fftfreq(ny)[None, :] * dys[:, None]).astype(np.complex64)
    spec *= phase_y[:, :, None]
    spec *= phase_x[:, None, :]
    out = sp_fft.irfft2(spec, s=(ny, nx))
    return np.asarray(out[:, pad_pix:pad_pix + ny0, pad_pix:pad_pix + nx0], dtype=float)


@dataclass(frozen=True, eq=False)
class AdaptiveMoments:
    """Adaptive (elliptical-Gaussian-weighted) moments of a stack of stamps.

    Positions are relative to the centre pixel of each stamp; moments in pixel².
    ``flux`` is the amplitude of the matched elliptical Gaussian times its
    integral (a Gaussian-model flux); errors come from the per-pixel variance.
    """

    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    xx: npt.NDArray[np.float64]
    yy: npt.NDArray[np.float64]
    xy: npt.NDArray[np.float64]
    flux: npt.NDArray[np.float64]
    flux_err: npt.NDArray[np.float64]
    x_err: npt.NDArray[np.float64]
    y_err: npt.NDArray[np.float64]
    converged: npt.NDArray[np.bool_]
    n_iterations: int


def distortion(xx: npt.ArrayLike, yy: npt.ArrayLike,
               xy: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Distortion ellipticity ``(e1, e2) = ((xx - yy) / T, 2 xy / T)``, ``T = xx + yy`` (the HSM convention)."""
    xx, yy, xy = np.asarray(xx, float), np.asarray(yy, float), np.asarray(xy, float)
    t = xx + yy
    return (xx - yy) / t, 2 * xy / t


#: Smallest second moment (pixel²) along any axis of a converged adaptive shape: a quarter of
#: the 1/12 px² a pixel-integrated point source has. Below it the iteration collapsed.
MIN_ADAPTIVE_MOMENT_PIX2 = 1.0 / 48.0


def adaptive_moments(stamps: npt.ArrayLike, *, variance: npt.ArrayLike | None = None,
                     valid: npt.ArrayLike | None = None, sigma_guess_pix: float | npt.ArrayLike = 2.0,
                     x_guess: npt.ArrayLike | None = None, y_guess: npt.ArrayLike | None = None,
                     max_iterations: int = 40, tolerance: float = 1e-6,
                     recentre: bool = True, accelerate: bool = True,
                     shape_guess: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike] | None = None
                     ) -> AdaptiveMoments:
    """HSM-style adaptive moments of every stamp of an ``(n, s, s)`` stack, vectorised.

    The weight is an elliptical Gaussian whose covariance ``M`` and centre are
    iterated to the HSM fixed point: the weighted moments equal ``M / 2`` and
    the weighted first moment is zero. For a Gaussian source of covariance
    ``C`` that fixed point is ``M = C`` (so the moments are those of the source).

    Parameters
    ----------
    stamps
        Background-subtracted pixel stack (odd size ``s``; centre pixel = origin).
    variance
        Per-pixel variance (same shape) for the errors; None gives NaN errors.
    valid
        Boolean stack; invalid pixels are ignored (weight 0).
    sigma_guess_pix
        Starting Gaussian sigma (scalar or per stamp).
    shape_guess
        Optional starting moments ``(xx, yy, xy)`` per stamp (pixel²), e.g. an earlier measurement
        of the same sources: rows where they form a finite positive-definite shape start there
        (a warm start converges in one or two steps when the pixels are unchanged), the others
        from ``sigma_guess_pix``. Either way the iteration stops at the same fixed point within
        ``tolerance``.
    x_guess, y_guess
        Starting centres relative to the centre pixel (default 0).
    max_iterations, tolerance
        Stop when the relative change of every moment and the change of the
        centre (pixels) are below ``tolerance``.
    recentre
        If False the centre is held at the guess (fixed-position moments).
    accelerate
        Extrapolate the iteration's linear convergence (see Notes); False gives the
        plain iteration. Both stop at the same fixed point within ``tolerance``.

    Notes
    -----
    Each step uses the Gaussian deconvolution update ``M ← (Mw⁻¹ − M⁻¹)⁻¹``
    (``Mw``: weighted moments), which reaches the fixed point in one step for
    a Gaussian source and converges in a few steps otherwise; where it is
    not positive definite (noise, very peaked sources) the plain HSM update
    ``M ← 2 Mw`` is used. The quadratic forms and all sums are matrix products
    against a fixed polynomial basis of the stamp grid, so the cost per
    iteration is two small GEMMs and one ``exp``.

    Away from Gaussian profiles (faint, noisy or blended sources) the iteration converges
    only linearly: each step shrinks the distance to the fixed point by a factor ``λ``
    of 0.5-0.6 (alternating in sign for some sources), so S/N < 20 sources needed
    10-40 steps. With ``accelerate``, after two plain steps ``Δ₁, Δ₂`` of a row ``λ`` is
    estimated as ``Δ₂·Δ₁ / Δ₁·Δ₁`` and the row jumps to ``x + λ/(1 - λ) Δ₂`` (Aitken's
    extrapolation of a geometric sequence) when ``|λ| < 0.9`` and the jump keeps a valid
    shape. Convergence is still declared on a plain step below ``tolerance``.
    """
    # Failed sources (zero or negative weighted flux, singular moments) produce NaN/inf on
    # the way; they are detected and flagged explicitly, so the floating-point warnings are noise.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _adaptive_moments(stamps, variance, valid, sigma_guess_pix, x_guess, y_guess,
                                 max_iterations, tolerance, recentre, accelerate, shape_guess)


def _adaptive_moments(stamps: npt.ArrayLike, variance: npt.ArrayLike | None, valid: npt.ArrayLike | None,
                      sigma_guess_pix: float | npt.ArrayLike, x_guess: npt.ArrayLike | None,
                      y_guess: npt.ArrayLike | None, max_iterations: int, tolerance: float,
                      recentre: bool, accelerate: bool,
                      shape_guess: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike] | None) -> AdaptiveMoments:
    img = np.asarray(stamps)
    n, ny, nx = img.shape
    ok = None if valid is None else np.asarray(valid, bool)
    # float64 pixels: a mixed float32 x float64 product costs twice a float64 one.
    data = (img.astype(float) if ok is None else np.where(ok, img, 0.0).astype(float, copy=False)).reshape(n, -1)
    hy, hx = ny // 2, nx // 2
    gy, gx = np.mgrid[-hy:ny - hy, -hx:nx - hx]
    X = gx.ravel().astype(float)
    Y = gy.ravel().astype(float)
    # Basis (6, P): 1, X, Y, X², Y², XY.
    basis = np.stack([np.ones_like(X), X, Y, X * X, Y * Y, X * Y])
    s2 = np.broadcast_to(np.asarray(sigma_guess_pix, float) ** 2, (n,)).copy()
    mxx, myy, mxy = s2.copy(), s2.copy(), np.zeros(n)
    if shape_guess is not None:
        gxx, gyy, gxy = (np.broadcast_to(np.asarray(g, float), (n,)) for g in shape_guess)
        warm = (np.isfinite(gxx) & np.isfinite(gyy) & np.isfinite(gxy) & (gxx > 0) & (gyy > 0)
                & (gxx * gyy - gxy * gxy > 0))
        mxx[warm], myy[warm], mxy[warm] = gxx[warm], gyy[warm], gxy[warm]
    cx = np.zeros(n) if x_guess is None else np.asarray(x_guess, float).copy()
    cy = np.zeros(n) if y_guess is None else np.asarray(y_guess, float).copy()
    converged = np.zeros(n, bool)
    max_m = float(max(nx, ny)) ** 2  # beyond this the stamp cannot hold the source
    # Rows still iterating, and their pixels gathered once (re-gathered only when rows finish).
    idx = np.arange(n)
    rows = data
    buf = np.empty((n, ny * nx))
    # The last plain step of each row (normalised) and whether it may be extrapolated from.
    last_step = np.zeros((n, 5))
    has_last = np.zeros(n, bool)
    n_iter = 0
    for it in range(1, max_iterations + 1):
        if idx.size == 0:
            break
        n_iter = it
        det = mxx[idx] * myy[idx] - mxy[idx] ** 2
        a, b, c = myy[idx] / det, -mxy[idx] / det, mxx[idx] / det
        px, py = cx[idx], cy[idx]
        # -q/2 with q = a (X-px)² + 2b (X-px)(Y-py) + c (Y-py)², expanded on the basis; the
        # factor -1/2 is folded into the coefficients (exact) so the big array is touched fewer times.
        qc = np.stack([a * px * px + 2 * b * px * py + c * py * py,
                       -2 * (a * px + b * py), -2 * (b * px + c * py), a, c, 2 * b], axis=1) * -0.5
        w = buf[:idx.size]
        np.matmul(qc, basis, out=w)
        np.maximum(w, -40.0, out=w)
        np.exp(w, out=w)
        np.multiply(w, rows, out=w)
        # (6, P) @ (P, m) runs about twice as fast as (m, P) @ (P, 6) in BLAS.
        sums = (basis @ w.T).T
        s0 = sums[:, 0]
        bad = ~(s0 > 0)
        s0 = np.where(bad, 1.0, s0)
        ux, uy = sums[:, 1] / s0, sums[:, 2] / s0
        wxx = sums[:, 3] / s0 - ux * ux
        wyy = sums[:, 4] / s0 - uy * uy
        wxy = sums[:, 5] / s0 - ux * uy
        # Deconvolution update (exact for Gaussians), else the plain 2 Mw update.
        wdet = wxx * wyy - wxy * wxy
        iwxx, iwyy, iwxy = wyy / wdet, wxx / wdet, -wxy / wdet
        dxx, dyy, dxy = iwxx - a, iwyy - c, iwxy - b
        ddet = dxx * dyy - dxy * dxy
        good = (wdet > 0) & (ddet > 0) & (dxx > 0)
        nxx = np.where(good, dyy / np.where(good, ddet, 1.0), 2 * wxx)
        nyy = np.where(good, dxx / np.where(good, ddet, 1.0), 2 * wyy)
        nxy = np.where(good, -dxy / np.where(good, ddet, 1.0), 2 * wxy)
        # Keep each step within a factor 4 of the previous size (noise safety).
        tr_old = mxx[idx] + myy[idx]
        tr_new = nxx + nyy
        scale = np.clip(tr_new / tr_old, 0.25, 4.0) / np.where(tr_new > 0, tr_new / tr_old, 1.0)
        scale = np.where(tr_new > 0, scale, 1.0)
        nxx, nyy, nxy = nxx * scale, nyy * scale, nxy * scale
        # Centre: mu_true = c + C Mw⁻¹ (mu_w - c), with C the new moments.
        if recentre:
            jxx = nxx * iwxx + nxy * iwxy
            jxy = nxx * iwxy + nxy * iwyy
            jyx = nxy * iwxx + nyy * iwxy
            jyy = nxy * iwxy + nyy * iwyy
            ddx = np.clip(jxx * (ux - px) + jxy * (uy - py), -1.0, 1.0)
            ddy = np.clip(jyx * (ux - px) + jyy * (uy - py), -1.0, 1.0)
        else:
            ddx = np.zeros(idx.size)
            ddy = np.zeros(idx.size)
        finite = np.isfinite(nxx) & np.isfinite(nyy) & np.isfinite(nxy) & np.isfinite(ddx) & np.isfinite(ddy)
        fail = bad | ~finite | (nxx * nyy - nxy * nxy <= 0) | (nxx > max_m) | (nyy > max_m)
        upd = ~fail
        tol_m = tolerance * tr_old
        done = upd & (np.abs(nxx - mxx[idx]) < tol_m) & (np.abs(nyy - myy[idx]) < tol_m) \
            & (np.abs(nxy - mxy[idx]) < tol_m) & (np.abs(ddx) < tolerance) & (np.abs(ddy) < tolerance)
        if accelerate:
            nxx, nyy, nxy, ddx, ddy = _extrapolate(idx, upd & ~done, mxx, myy, mxy, tr_old, nxx, nyy, nxy, ddx, ddy,
                                                   last_step, has_last, max_m)
        ui = idx[upd]
        mxx[ui], myy[ui], mxy[ui] = nxx[upd], nyy[upd], nxy[upd]
        cx[ui] += ddx[upd]
        cy[ui] += ddy[upd]
        converged[idx[done]] = True
        left = ~(done | fail)
        if not left.all():
            # Only the rows still iterating are computed from now on.
            idx, rows = idx[left], rows[left]
    # Final weights at the converged shape: Gaussian-model flux and errors.
    det = mxx * myy - mxy**2
    det_safe = np.where(det > 0, det, 1.0)
    a, b, c = myy / det_safe, -mxy / det_safe, mxx / det_safe
    qc = np.stack([a * cx * cx + 2 * b * cx * cy + c * cy * cy, -2 * (a * cx + b * cy),
                   -2 * (b * cx + c * cy), a, c, 2 * b], axis=1) * -0.5
    w = np.matmul(qc, basis, out=buf)
    np.maximum(w, -40.0, out=w)
    np.exp(w, out=w)
    if ok is not None:
        w *= ok.reshape(n, -1)
    # Plain row sums (not einsum): failed rows can hold weights of huge dynamic range, and
    # the summation order then decides their (flagged) values.
    sw2 = np.sum(w * w, axis=1)
    swi = np.sum(w * data, axis=1)
    norm = 2.0 * math.pi * np.sqrt(det_safe)
    amp = swi / np.where(sw2 > 0, sw2, np.nan)
    flux = amp * norm
    if variance is None:
        flux_err = np.full(n, np.nan)
        x_err = np.full(n, np.nan)
        y_err = np.full(n, np.nan)
    else:
        var = np.asarray(variance)
        if var.dtype != np.float32:
            var = var.astype(float, copy=False)
        if ok is not None:
            var = np.where(ok, var, var.dtype.type(0))
        w *= w
        w *= var.reshape(n, -1)
        # Sums of w² var (X - cx)^k from the basis moments (one GEMM instead of per-pixel offsets).
        sv = (basis[:5] @ w.T).T
        flux_err = np.sqrt(sv[:, 0]) / np.where(sw2 > 0, sw2, np.nan) * norm
        sxx = np.maximum(sv[:, 3] - 2.0 * cx * sv[:, 1] + cx * cx * sv[:, 0], 0.0)
        syy = np.maximum(sv[:, 4] - 2.0 * cy * sv[:, 2] + cy * cy * sv[:, 0], 0.0)
        # At the fixed point the centre responds to the weighted first moment with gain 2.
        x_err = 2.0 * np.sqrt(sxx) / np.where(swi > 0, swi, np.nan)
        y_err = 2.0 * np.sqrt(syy) / np.where(swi > 0, swi, np.nan)
    # A shape narrower than a pixel along one axis has collapsed onto a ridge (a star on an
    # interpolated column, a cosmic ray): the fixed point is degenerate, not a measurement. A
    # pixel-integrated source has at least the pixel's own 1/12 px² along every axis.
    half_trace = 0.5 * (mxx + myy)
    min_eigen = half_trace - np.sqrt(0.25 * (mxx - myy) ** 2 + mxy * mxy)
    converged &= min_eigen >= MIN_ADAPTIVE_MOMENT_PIX2  # which also makes the determinant positive
    return AdaptiveMoments(cx, cy, mxx, myy, mxy, flux, flux_err, x_err, y_err, converged, n_iter)


def _extrapolate(idx: npt.NDArray[np.intp], live: npt.NDArray[np.bool_], mxx: npt.NDArray[np.float64],
                 myy: npt.NDArray[np.float64], mxy: npt.NDArray[np.float64], tr_old: npt.NDArray[np.float64],
                 nxx: npt.NDArray[np.float64], nyy: npt.NDArray[np.float64], nxy: npt.NDArray[np.float64],
                 ddx: npt.NDArray[np.float64], ddy: npt.NDArray[np.float64], last_step: npt.NDArray[np.float64],
                 has_last: npt.NDArray[np.bool_], max_m: float) -> tuple[npt.NDArray[np.float64], ...]:
    """Aitken step of :func:`adaptive_moments` on the rows ``idx`` (``live``: updated, not converged).

    Returns the proposals, extrapolated where allowed; records each row's plain step in
    ``last_step`` / ``has_last`` (in place; a row that jumped needs two fresh steps again).
    A jump must keep a positive-definite shape no larger than the stamp allows (``max_m``),
    within a factor 4 of the current size and a centre step of at most 1 px. Moments are
    scaled by the trace and centre shifts by its square root, so that one ``λ`` describes
    all five.
    """
    scale = np.sqrt(tr_old)
    step = np.stack([(nxx - mxx[idx]) / tr_old, (nyy - myy[idx]) / tr_old, (nxy - mxy[idx]) / tr_old,
                     ddx / scale, ddy / scale], axis=1)
    prev = last_step[idx]
    den = np.einsum("ij,ij->i", prev, prev)
    lam = np.einsum("ij,ij->i", step, prev) / np.where(den > 0, den, 1.0)
    jump = live & has_last[idx] & (den > 0) & (np.abs(lam) < 0.9)
    f = np.where(jump, lam / (1.0 - lam), 0.0)
    exx = nxx + f * (nxx - mxx[idx])
    eyy = nyy + f * (nyy - myy[idx])
    exy = nxy + f * (nxy - mxy[idx])
    edx, edy = ddx * (1.0 + f), ddy * (1.0 + f)
    tr = exx + eyy
    jump &= (exx > 0) & (eyy > 0) & (exx * eyy - exy * exy > 0) & (tr > 0.25 * tr_old) & (tr < 4.0 * tr_old) \
        & (exx <= max_m) & (eyy <= max_m) & (np.abs(edx) <= 1.0) & (np.abs(edy) <= 1.0)
    last_step[idx] = step
    has_last[idx] = live & ~jump
    return (np.where(jump, exx, nxx), np.where(jump, eyy, nyy), np.where(jump, exy, nxy),
            np.where(jump, edx, ddx), np.where(jump, edy, ddy))


def chebyshev_terms(order: int) -> list[tuple[int, int]]:
    """Exponent pairs ``(i, j)`` with ``i + j <= order``, by total degree."""
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


def chebyshev_design(x: npt.ArrayLike, y: npt.ArrayLike, *, order: int,
                     bbox: tuple[float, float, float, float]) -> npt.NDArray[np.float64]:
    """``(n, n_terms)`` matrix of ``T_i(x') T_j(y')`` (terms of :func:`chebyshev_terms`; bbox → [-1, 1])."""
    x_min, y_min, x_max, y_max = bbox
    xs = (2.0 * np.atleast_1d(np.asarray(x, float)) - (x_min + x_max)) / max(x_max - x_min, 1e-12)
    ys = (2.0 * np.atleast_1d(np.asarray(y, float)) - (y_min + y_max)) / max(y_max - y_min, 1e-12)
    tx = np.polynomial.chebyshev.chebvander(xs, order)
    ty = np.polynomial.chebyshev.chebvander(ys, order)
    return np.stack([tx[:, i] * ty[:, j] for i, j in chebyshev_terms(order)], axis=1)


@register_psf
@dataclass(frozen=True, eq=False)
class PixelPsf(PsfModel):
    """A pixel-basis PSF whose component weights vary as a polynomial over the detector.

    The kernel at ``(x, y)`` is ``sum_k c_k(x, y) B_k`` normalised to sum 1,
    where ``B_k`` are the ``basis`` images (``(K, n, n)``, native pixels,
    centred on the middle pixel) and ``c_k(x, y) = sum_t coefficients[k, t]
    T_i(x') T_j(y')`` is a triangular Chebyshev polynomial of
    ``spatial_order`` over ``bbox`` (parent pixels, mapped to [-1, 1]).

    :meth:`moments` are adaptive (HSM-style, :func:`adaptive_moments`) moments
    of the centred model image, i.e. the same estimator and pixel response as
    the measured ``ext_shapeHSM_HsmSourceMoments``, so the two compare fairly.
    """

    basis: npt.NDArray[np.float64]
    coefficients: npt.NDArray[np.float64]
    spatial_order: int
    bbox: tuple[float, float, float, float]

    type_name = "pixel"

    def __post_init__(self) -> None:
        b = np.asarray(self.basis, dtype=float)
        c = np.asarray(self.coefficients, dtype=float)
        n_terms = len(chebyshev_terms(self.spatial_order))
        if b.ndim != 3 or b.shape[1] != b.shape[2] or b.shape[1] % 2 == 0:
            raise ValueError(f"basis must be (K, n, n) with odd n, got {b.shape}")
        if c.shape != (b.shape[0], n_terms):
            raise ValueError(f"coefficients must be (K={b.shape[0]}, n_terms={n_terms}), got {c.shape}")
        object.__setattr__(self, "basis", b)
        object.__setattr__(self, "coefficients", c)
        object.__setattr__(self, "bbox", tuple(float(v) for v in self.bbox))

    @property
    def default_size(self) -> int:
        return int(self.basis.shape[1])

    def images(self, x: npt.ArrayLike, y: npt.ArrayLike, *, size: int | None = None,
               centered: bool = True) -> npt.NDArray[np.float64]:
        xs, ys, n = self._positions_and_size(x, y, size)
        basis = self.basis
        m = basis.shape[1]
        if n < m:
            c = (m - n) // 2
            basis = basis[:, c:c + n, c:c + n]
        elif n > m:
            c = (n - m) // 2
            basis = np.pad(basis, ((0, 0), (c, c), (c, c)))
        weights = chebyshev_design(xs, ys, order=self.spatial_order, bbox=self.bbox) @ self.coefficients.T
        if centered:
            k = (weights @ basis.reshape(basis.shape[0], -1)).reshape(-1, n, n)
        else:
            k = _shift_combinations(basis, weights, xs - np.round(xs), ys - np.round(ys))
        tot = k.sum(axis=(1, 2), keepdims=True)
        return np.asarray(k / np.where(tot != 0, tot, 1.0), dtype=float)

    def image(self, x: float, y: float, *, size: int | None = None, centered: bool = True) -> npt.NDArray[np.float64]:
        return self.images(x, y, size=size, centered=centered)[0]

    #: Above this many positions, moments are interpolated from a grid of exact evaluations.
    _MOMENT_GRID_MIN_POINTS = 100
    _MOMENT_GRID_NODES = 9

    def moments_many(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        xs = np.atleast_1d(np.asarray(x, float))
        ys = np.atleast_1d(np.asarray(y, float))
        if xs.size > self._MOMENT_GRID_MIN_POINTS and self.spatial_order > 0:
            # The kernel varies as a low-order polynomial, so its moments are smooth: bicubic
            # splines through 9x9 exact evaluations over the bbox reproduce them to ~1e-5
            # relative (the exact moments' own iteration tolerance) and cost 81 evaluations
            # once per model instead of one per source.
            splines = self._moment_splines()
            if splines is not None:
                x0, y0, x1, y1 = self.bbox
                inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
                out = np.empty((xs.size, 3))
                for j, spline in enumerate(splines):
                    out[inside, j] = spline.ev(xs[inside], ys[inside])
                if not inside.all():
                    out[~inside] = self._exact_moments(xs[~inside], ys[~inside])
                return out
        return self._exact_moments(xs, ys)

    def _moment_splines(self) -> tuple[GridSpline, ...] | None:
        """Splines of ``(ixx, iyy, ixy)`` through a grid of exact moments over the bbox (built once).

        None when the bbox is degenerate or a node's moments did not converge.
        """
        if "_moment_splines_cache" in self.__dict__:
            return self.__dict__["_moment_splines_cache"]
        x0, y0, x1, y1 = self.bbox
        splines = None
        if x1 > x0 and y1 > y0:
            gx = np.linspace(x0, x1, self._MOMENT_GRID_NODES)
            gy = np.linspace(y0, y1, self._MOMENT_GRID_NODES)
            mx, my = np.meshgrid(gx, gy, indexing="ij")
            nodes = self._exact_moments(mx.ravel(), my.ravel())
            if np.all(np.isfinite(nodes)):
                splines = tuple(GridSpline.fit(gx, gy, nodes[:, j].reshape(mx.shape)) for j in range(3))
        # A cache, not a field: the instance is frozen, and the model it describes is unchanged.
        self.__dict__["_moment_splines_cache"] = splines
        return splines

    def _exact_moments(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        k = self.images(x, y)
        if k.shape[0] == 0:
            return np.zeros((0, 3))
        # Start from the unweighted second moments of the model (close to the answer).
        h = k.shape[1] // 2
        g = np.arange(-h, h + 1, dtype=float)
        # Only the inner half-radius: a noisy model's far wings (extrapolated to a detector corner from
        # few stars) can dominate r² and start the iteration far off, so it never converges.
        r2 = g[None, :] ** 2 + g[:, None] ** 2
        inner = np.where(r2 <= (h / 2.0) ** 2, k, 0.0)
        f = np.sum(inner, axis=(1, 2))
        t = np.sum(inner * r2[None], axis=(1, 2)) / (2.0 * np.where(f > 0, f, np.nan))
        t = np.clip(np.nan_to_num(t, nan=1.0), 0.25, h * h)
        am = adaptive_moments(k, sigma_guess_pix=np.sqrt(t))
        out = np.stack([am.xx, am.yy, am.xy], axis=1)
        out[~am.converged] = np.nan
        return out

    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        # Cached per position: each measurement batch asks for the moments at the detector's centre.
        if np.ndim(x) or np.ndim(y):  # arrays: the first position's, uncached
            m = self.moments_many(x, y)[0]
            return float(m[0]), float(m[1]), float(m[2])
        cache = self.__dict__.setdefault("_moments_cache", {})
        key = (float(x), float(y))
        if key not in cache:
            m = self.moments_many(x, y)[0]
            if len(cache) >= 64:
                cache.clear()
            cache[key] = (float(m[0]), float(m[1]), float(m[2]))
        return cache[key]

    def to_hdus(self) -> list[fits.ImageHDU | fits.BinTableHDU]:
        hdr = fits.Header()
        hdr["EXTNAME"] = "PSF"
        hdr["PSFTYPE"] = self.type_name
        hdr["SPORDER"] = (self.spatial_order, "Chebyshev order of the component weights")
        hdr["NCOMP"] = (int(self.basis.shape[0]), "number of basis images")
        for key, value in zip(("XMIN", "YMIN", "XMAX", "YMAX"), self.bbox, strict=True):
            hdr[key] = (value, "poly domain [parent px]")
        terms = chebyshev_terms(self.spatial_order)
        table = fits.BinTableHDU.from_columns([
            fits.Column(name="x_power", format="K", array=np.array([t[0] for t in terms], np.int64)),
            fits.Column(name="y_power", format="K", array=np.array([t[1] for t in terms], np.int64)),
            fits.Column(name="coeff", format=f"{self.coefficients.shape[0]}D",
                        array=np.ascontiguousarray(self.coefficients.T)),
        ])
        table.header["EXTNAME"] = "PSF_COEFFS"
        return [fits.ImageHDU(data=self.basis, header=hdr), table]

    @classmethod
    def from_hdus(cls, hdus: Sequence[fits.ImageHDU | fits.BinTableHDU]) -> PixelPsf:
        if len(hdus) < 2:
            raise DatasetError("a pixel PSF needs two extensions (PSF basis cube and PSF_COEFFS table)")
        h = hdus[0].header
        order = int(h["SPORDER"])
        rows = hdus[1].data
        expected = chebyshev_terms(order)
        got = [(int(i), int(j)) for i, j in zip(rows["x_power"], rows["y_power"], strict=True)]
        if got != expected:
            raise DatasetError(f"PSF_COEFFS terms {got} do not match spatial order {order} ({expected})")
        coeff = np.asarray(rows["coeff"], float).reshape(len(expected), -1).T
        bbox = (float(h["XMIN"]), float(h["YMIN"]), float(h["XMAX"]), float(h["YMAX"]))
        return cls(np.asarray(hdus[0].data, float), coeff, order, bbox)



def psf_from_hdus(hdus: Sequence[fits.ImageHDU | fits.BinTableHDU]) -> PsfModel:
    """Rebuild a PSF model from the HDUs written by its :meth:`PsfModel.to_hdus`."""
    if not hdus:
        raise DatasetError("no PSF extensions found")
    name = str(hdus[0].header.get("PSFTYPE", ""))
    cls = _REGISTRY.get(name)
    if cls is None:
        raise DatasetError(f"unknown PSFTYPE {name!r}; known types: {sorted(_REGISTRY)}")
    return cls.from_hdus(hdus)


PsfFactory = Callable[[float], PsfModel]
