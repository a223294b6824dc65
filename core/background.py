"""Background models: binned statistics interpolated smoothly, evaluable anywhere."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from .errors import DatasetError
from .splines import GridSpline


def _extend_axis(centers: npt.NDArray[np.float64], values: npt.NDArray[np.float64], lo: float, hi: float,
                 *, axis: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Add knots on the image edges, linearly extrapolated from the two outer bins.

    Keeps a gradient going into the outer half-bins (a constant there would bias
    the corners) without the wild cubic end pieces of a spline extrapolation.
    A single bin along ``axis`` gives a constant.
    """
    v = np.moveaxis(values, axis, 0)
    c = np.asarray(centers, float)
    if len(c) == 1:
        ext_c = np.array([min(lo, c[0] - 1.0), max(hi, c[0] + 1.0)])
        ext_v = np.stack([v[0], v[0]])
        return ext_c, np.moveaxis(ext_v, 0, axis)
    rows = [v]
    cs = [c]
    if lo < c[0]:
        slope = (v[1] - v[0]) / (c[1] - c[0])
        rows.insert(0, (v[0] - slope * (c[0] - lo))[None])
        cs.insert(0, np.array([lo]))
    if hi > c[-1]:
        slope = (v[-1] - v[-2]) / (c[-1] - c[-2])
        rows.append((v[-1] + slope * (hi - c[-1]))[None])
        cs.append(np.array([hi]))
    return np.concatenate(cs), np.moveaxis(np.concatenate(rows, axis=0), 0, axis)


@dataclass(frozen=True, eq=False)
class BackgroundModel:
    """Background level on a grid of bin centres, interpolated by a smoothing-free spline.

    Attributes
    ----------
    values
        ``(n_bins_y, n_bins_x)`` background per pixel at the bin centres (image units).
    x_centers, y_centers
        Bin-centre positions in parent pixel coordinates (increasing).
    shape
        ``(ny, nx)`` of the image the model was fitted to.
    origin
        Parent coordinates of that image's pixel ``[0, 0]``.
    """

    values: npt.NDArray[np.float64]
    x_centers: npt.NDArray[np.float64]
    y_centers: npt.NDArray[np.float64]
    shape: tuple[int, int]
    origin: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        v = np.asarray(self.values, float)
        if v.shape != (len(self.y_centers), len(self.x_centers)):
            raise ValueError(f"values {v.shape} do not match {len(self.y_centers)}x{len(self.x_centers)} bin centres")
        if not np.all(np.isfinite(v)):
            raise ValueError("background values must be finite (fill empty bins before building the model)")
        object.__setattr__(self, "values", v)

    def _spline(self) -> GridSpline | None:
        ny, nx = self.values.shape
        if ny == 1 and nx == 1:
            return None
        y_lo, y_hi, x_lo, x_hi = self._extent()
        yc, v = _extend_axis(self.y_centers, self.values, y_lo, y_hi, axis=0)
        xc, v = _extend_axis(self.x_centers, v, x_lo, x_hi, axis=1)
        ky = min(3, len(yc) - 1)
        kx = min(3, len(xc) - 1)
        return GridSpline.fit(yc, xc, v, degree_u=ky, degree_v=kx)

    def _extent(self) -> tuple[float, float, float, float]:
        """``(y_min, y_max, x_min, x_max)`` of the fitted image in parent coordinates (pixel edges)."""
        x0, y0 = self.origin
        ny, nx = self.shape
        return (y0 - 0.5, y0 + ny - 0.5, x0 - 0.5, x0 + nx - 0.5)

    def _clipped(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Positions moved inside the spline's span: the model is constant beyond the image edges."""
        y_lo, y_hi, x_lo, x_hi = self._extent()
        xa = np.clip(np.asarray(x, float), min(x_lo, self.x_centers[0]), max(x_hi, self.x_centers[-1]))
        ya = np.clip(np.asarray(y, float), min(y_lo, self.y_centers[0]), max(y_hi, self.y_centers[-1]))
        return xa, ya

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Background at parent positions ``(x, y)`` (constant beyond the image edges)."""
        xa, ya = self._clipped(x, y)
        spl = self._spline()
        if spl is None:
            return np.full(np.broadcast(xa, ya).shape, float(self.values[0, 0]))
        return np.asarray(spl.ev(ya, xa), float)

    def grid(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Background on the grid of 1-D parent positions ``y`` (rows) x ``x`` (columns).

        Equal to ``evaluate(x[None, :], y[:, None])``, through the separable form.
        """
        xa, ya = self._clipped(np.ravel(x), np.ravel(y))
        spl = self._spline()
        if spl is None:
            return np.full((ya.size, xa.size), float(self.values[0, 0]))
        return spl.grid(ya, xa)

    def image(self) -> npt.NDArray[np.float32]:
        """The model evaluated at every pixel of the fitted image."""
        factors = self._factors()
        if factors is None:
            return np.full(self.shape, self.values[0, 0], dtype=np.float32)
        by_c, bx_t = factors
        return np.asarray(by_c @ bx_t, dtype=np.float32)

    def subtract_from(self, image: npt.ArrayLike, *, out: npt.NDArray[np.float32] | None = None,
                      band_rows: int = 256) -> npt.NDArray[np.float32]:
        """``image - self.image()`` in float32, without the model image: one band of rows at a time.

        A 4k x 4k frame saves a 64 MB temporary (a fresh one is page-faulted in every time).
        Equal to ``np.subtract(image, self.image(), dtype=np.float32)`` up to float32 rounding
        of the model (the product's summation order may differ between bands). ``out`` (float32,
        the image's shape) may be ``image`` itself.
        """
        img = np.asarray(image)
        if img.shape != tuple(self.shape):
            raise ValueError(f"image shape {img.shape} differs from the model's {tuple(self.shape)}")
        if out is None:
            out = np.empty(img.shape, np.float32)
        elif out.shape != img.shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {img.shape}, got {out.dtype} {out.shape}")
        factors = self._factors()
        if factors is None:
            return np.subtract(img, np.float32(self.values[0, 0]), out=out, dtype=np.float32)
        by_c, bx_t = factors
        for y0 in range(0, img.shape[0], band_rows):
            rows = slice(y0, y0 + band_rows)
            np.subtract(img[rows], by_c[rows] @ bx_t, out=out[rows], dtype=np.float32)
        return out

    def _factors(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None:
        """``(B_y C, B_x^T)``, float32, whose product is the model image; None for a constant model.

        The tensor-product spline is ``B_y C B_x^T``: two small dense design matrices and one
        matrix product are ~10x faster than evaluating the spline on the full grid. float32
        throughout: a float64 product would be a 128 MB temporary on a 4k² frame, and each pixel
        sums at most (k + 1)² non-zero terms of the sky level's magnitude.
        """
        ny, nx = self.shape
        x0, y0 = self.origin
        spl = self._spline()
        if spl is None:
            return None
        xs = np.arange(nx, dtype=float) + x0
        ys = np.arange(ny, dtype=float) + y0
        by = spl.basis_u(ys).astype(np.float32)
        bx = spl.basis_v(xs).astype(np.float32)
        return by @ spl.coeffs.astype(np.float32), np.ascontiguousarray(bx.T)

    def scaled(self, factor: float) -> BackgroundModel:
        """The same model multiplied by ``factor`` (e.g. counts → nJy)."""
        return BackgroundModel(self.values * factor, self.x_centers, self.y_centers, self.shape, self.origin)

    def to_hdu(self, index: int) -> fits.ImageHDU:
        hdr = fits.Header()
        hdr["EXTNAME"] = f"BKGD{index:02d}"
        hdr["BKGTYPE"] = ("spline-grid", "bicubic spline through bin centres")
        hdr["NX"], hdr["NY"] = self.shape[1], self.shape[0]
        hdr["X0"], hdr["Y0"] = self.origin
        hdr["XC0"], hdr["YC0"] = float(self.x_centers[0]), float(self.y_centers[0])
        # Centres are stored explicitly in a second axis-free form: first and step when uniform.
        hdr["XCSTEP"] = float(np.diff(self.x_centers).mean()) if len(self.x_centers) > 1 else 0.0
        hdr["YCSTEP"] = float(np.diff(self.y_centers).mean()) if len(self.y_centers) > 1 else 0.0
        hdr["XCEN"] = ",".join(repr(float(v)) for v in self.x_centers)
        hdr["YCEN"] = ",".join(repr(float(v)) for v in self.y_centers)
        return fits.ImageHDU(data=self.values.astype(np.float64), header=hdr)

    @classmethod
    def from_hdu(cls, hdu: fits.ImageHDU) -> BackgroundModel:
        h = hdu.header
        if h.get("BKGTYPE") != "spline-grid":
            raise DatasetError(f"unknown background type {h.get('BKGTYPE')!r} in {h.get('EXTNAME')}")
        xc = np.array([float(v) for v in str(h["XCEN"]).split(",")])
        yc = np.array([float(v) for v in str(h["YCEN"]).split(",")])
        return cls(np.asarray(hdu.data, float), xc, yc, (int(h["NY"]), int(h["NX"])), (int(h["X0"]), int(h["Y0"])))


@dataclass(frozen=True, eq=False)
class BackgroundList:
    """All background components subtracted from an exposure, in order."""

    components: tuple[BackgroundModel, ...] = ()
    unit: str = "count"

    def __iter__(self) -> Iterator[BackgroundModel]:
        return iter(self.components)

    def __len__(self) -> int:
        return len(self.components)

    def append(self, model: BackgroundModel) -> BackgroundList:
        return BackgroundList((*self.components, model), self.unit)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the image the components model (that of the first)."""
        return self._first().shape

    def _first(self) -> BackgroundModel:
        if not self.components:
            raise ValueError("empty background list has no image")
        return self.components[0]

    def image(self) -> npt.NDArray[np.float32]:
        total = self._first().image().astype(np.float64)
        for c in self.components[1:]:
            total += c.image()
        return total.astype(np.float32)

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return sum((c.evaluate(x, y) for c in self.components), start=np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape))

    def image_subsampled(self, step: int) -> npt.NDArray[np.float64]:
        """The model at every ``step``-th pixel of each axis (the pixels of ``image()[::step, ::step]``),
        evaluated on that grid only: a look at a 4096² model costs a 512² evaluation."""
        (ny, nx), (x0, y0) = self.shape, self._first().origin
        xs, ys = x0 + np.arange(0, nx, step), y0 + np.arange(0, ny, step)
        return sum((c.grid(xs, ys) for c in self.components), start=np.zeros((ys.size, xs.size)))

    def scaled(self, factor: float, unit: str) -> BackgroundList:
        return BackgroundList(tuple(c.scaled(factor) for c in self.components), unit)

    def to_hdus(self) -> list[fits.ImageHDU]:
        hdus = [c.to_hdu(i) for i, c in enumerate(self.components)]
        for h in hdus:
            h.header["BUNIT"] = self.unit
        return hdus

    @classmethod
    def from_hdus(cls, hdus: Sequence[fits.ImageHDU]) -> BackgroundList:
        comps = tuple(BackgroundModel.from_hdu(h) for h in hdus if str(h.header.get("EXTNAME", "")).startswith("BKGD"))
        unit = str(hdus[0].header.get("BUNIT", "count")) if hdus else "count"
        return cls(comps, unit)
