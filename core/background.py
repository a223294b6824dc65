"""Background models: binned statistics interpolated smoothly, evaluable anywhere."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy.io import fits
from scipy.interpolate import RectBivariateSpline

from .errors import DatasetError


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

    def _spline(self) -> RectBivariateSpline | None:
        ny, nx = self.values.shape
        if ny == 1 and nx == 1:
            return None
        ky = min(3, ny - 1) if ny > 1 else 1
        kx = min(3, nx - 1) if nx > 1 else 1
        yc, xc, v = self.y_centers, self.x_centers, self.values
        # A single row or column is padded so the spline is constant along that axis.
        if ny == 1:
            yc, v = np.array([yc[0] - 1.0, yc[0] + 1.0]), np.vstack([v, v])
        if nx == 1:
            xc, v = np.array([xc[0] - 1.0, xc[0] + 1.0]), np.hstack([v, v])
        return RectBivariateSpline(yc, xc, v, kx=ky, ky=kx)

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Background at parent positions ``(x, y)`` (extrapolated as constant past the outer bin centres)."""
        xa = np.clip(np.asarray(x, float), self.x_centers[0], self.x_centers[-1])
        ya = np.clip(np.asarray(y, float), self.y_centers[0], self.y_centers[-1])
        spl = self._spline()
        if spl is None:
            return np.full(np.broadcast(xa, ya).shape, float(self.values[0, 0]))
        return np.asarray(spl.ev(ya, xa), float)

    def image(self) -> npt.NDArray[np.float32]:
        """The model evaluated at every pixel of the fitted image."""
        ny, nx = self.shape
        x0, y0 = self.origin
        xs = np.clip(np.arange(nx, dtype=float) + x0, self.x_centers[0], self.x_centers[-1])
        ys = np.clip(np.arange(ny, dtype=float) + y0, self.y_centers[0], self.y_centers[-1])
        spl = self._spline()
        if spl is None:
            return np.full(self.shape, self.values[0, 0], dtype=np.float32)
        return np.asarray(spl(ys, xs), dtype=np.float32)

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
        hdr["XCEN"] = ",".join(f"{v:.6f}" for v in self.x_centers)
        hdr["YCEN"] = ",".join(f"{v:.6f}" for v in self.y_centers)
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

    def image(self) -> npt.NDArray[np.float32]:
        if not self.components:
            raise ValueError("empty background list has no image")
        total = self.components[0].image().astype(np.float64)
        for c in self.components[1:]:
            total += c.image()
        return total.astype(np.float32)

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return sum((c.evaluate(x, y) for c in self.components), start=np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape))

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
