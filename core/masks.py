"""Named mask planes. Bits are never written as literals anywhere else."""

from __future__ import annotations

import enum

import numpy as np
import numpy.typing as npt


class MaskPlane(enum.IntFlag):
    """Mask bits of an exposure's ``mask`` array (``uint32``).

    The bit numbers are stored in FITS headers as ``MP_<NAME>`` keywords
    (the layout Rubin uses), so readers never depend on this enum's order.
    """

    BAD = 1 << 0  #: permanently bad pixel (defect map, bad column)
    SAT = 1 << 1  #: saturated, including bleed trails
    INTRP = 1 << 2  #: value was interpolated
    CR = 1 << 3  #: cosmic ray
    EDGE = 1 << 4  #: too close to the edge for full measurement
    DETECTED = 1 << 5  #: inside a positive detection footprint
    DETECTED_NEGATIVE = 1 << 6  #: inside a negative detection footprint
    SUSPECT = 1 << 7  #: non-linear or otherwise suspect
    NO_DATA = 1 << 8  #: no data (vignetted, off the sensor, weight zero)


MASK_DTYPE = np.uint32

#: Planes excluded from background statistics (Rubin's SubtractBackground defaults plus SAT).
BACKGROUND_IGNORED = (
    MaskPlane.BAD | MaskPlane.EDGE | MaskPlane.DETECTED | MaskPlane.DETECTED_NEGATIVE
    | MaskPlane.NO_DATA | MaskPlane.SAT
)

#: Planes whose pixels must be interpolated before measurement.
DEFECT_PLANES = MaskPlane.BAD | MaskPlane.SAT | MaskPlane.NO_DATA


def plane_bits() -> dict[str, int]:
    """Return ``{plane name: bit number}`` for header keywords ``MP_<NAME>``."""
    return {plane.name: int(plane).bit_length() - 1 for plane in MaskPlane if plane.name}


def any_set(mask: npt.NDArray[np.integer], planes: MaskPlane) -> npt.NDArray[np.bool_]:
    """Boolean array: pixels where any of ``planes`` is set."""
    return (mask & MASK_DTYPE(int(planes))) != 0
