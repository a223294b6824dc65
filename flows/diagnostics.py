"""Diagnostic plots of one calibrated detector, made from its stored outputs.

One PNG per detector with five panels: PSF size residuals of the PSF stars,
astrometric residual vectors, photometric residuals against magnitude and
against position, and the subtracted background model. The plots are read
from the store (never from task memory) and written back to it under
``{run}/diagnostics/{instrument}/visit-{visit}/det-{detector:03d}.png``, so
they can be linked from a Prefect artifact.

A plot is redrawn only when the checksums of the datasets it shows change
(recorded in a small JSON beside it): a finished visit re-plots nothing.

A matplotlib figure is a web of reference cycles (~22 000 objects per
figure here) that only the cyclic garbage collector frees. Left to it, the
figures of ~3 detectors pile up until the next full collection and are freed
in the middle of another detector's work, which fragments the heap: in a
100-detector flow run (512² detectors) the flow process's median
per-detector peak RSS was 447 MB, against 413 MB with each figure collected
as soon as it is written. A full collection costs 125–180 ms on this VM
(~230 000 tracked objects), so the figure is drawn with the automatic
collector paused, which keeps its objects in the youngest generation, and a
collection of that generation alone (10–14 ms) frees all of it.
"""

from __future__ import annotations

import gc
import io
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from astropy.io import fits

from ..ids import DataId
from ..io.store import ArtifactStore

__all__ = ["PLOTTED_DATASETS", "diagnostics_path", "plot_detector_diagnostics"]

#: Datasets one diagnostic figure is drawn from (their checksums key the figure).
PLOTTED_DATASETS = ("single_visit_psf_star", "initial_astrometry_match_detector",
                    "initial_photometry_match_detector", "initial_photoCalib_detector",
                    "preliminary_visit_image_background", "preliminary_visit_image")

#: Milliarcseconds per radian.
_MAS_PER_RAD = 180.0 / np.pi * 3600e3


def diagnostics_path(run: str, data_id: DataId) -> str:
    """Store-relative path of the diagnostic PNG of one detector."""
    return f"{run}/diagnostics/{data_id.instrument}/visit-{data_id.visit}/det-{data_id.detector:03d}.png"


def plot_detector_diagnostics(store: ArtifactStore, *, run: str, data_id: DataId, force: bool = False) -> str:
    """Draw (or keep) the diagnostic figure of one calibrated detector; return its URI.

    Parameters
    ----------
    store
        Artifact store holding the detector's outputs.
    run
        Output run of the calibration.
    data_id
        The detector.
    force
        Redraw even when the stored figure was drawn from the same dataset versions.

    Returns
    -------
    str
        Full URI of the PNG in the store.

    Raises
    ------
    singleframe.errors.DatasetNotFoundError
        If one of :data:`PLOTTED_DATASETS` is missing (the detector did not finish).
    """
    where = {"run": run, "instrument": data_id.instrument, "visit": data_id.visit, "detector": data_id.detector}
    png = diagnostics_path(run, data_id)
    key = {name: store.version(name, **where) for name in PLOTTED_DATASETS}
    sidecar = png + ".key.json"
    if not force and store.exists_path(png) and store.exists_path(sidecar):
        if json.loads(store.get_bytes(sidecar)) == key:
            return store.url(f"{store.root_path}/{png}")
    with _figure_garbage_collected():
        data = _render(store, where, data_id)
    uri = store.put_bytes(png, data)
    # Written after the PNG: a figure without its key is redrawn next time.
    store.put_bytes(sidecar, json.dumps(key, sort_keys=True).encode())
    return uri


@contextmanager
def _figure_garbage_collected() -> Iterator[None]:
    """Pause automatic garbage collection while a figure is drawn, then free it with a youngest-generation pass.

    Only the thread that paused the collector resumes it (a concurrent plot in another thread
    finds it paused and leaves it alone), and a collector disabled by the application stays
    disabled.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        # The figure is unreachable by now (``_render`` returned its bytes only); its objects
        # never left generation 0 because no automatic collection ran while it was drawn.
        gc.collect(0)
        if paused:
            gc.enable()


def _band(store: ArtifactStore, where: Mapping[str, Any]) -> str:
    """The exposure's band, from the primary header only (no pixels are read)."""
    uri = store.ref("preliminary_visit_image", **where).uri
    with store.fs.open(store.fs._strip_protocol(uri), "rb") as f, fits.open(f, lazy_load_hdus=True) as hdul:
        return str(hdul[0].header.get("BAND", ""))


def _render(store: ArtifactStore, where: Mapping[str, Any], data_id: DataId) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # headless: workers have no display
    from matplotlib.figure import Figure

    psf = store.get("single_visit_psf_star", **where)
    astrom = store.get("initial_astrometry_match_detector", **where)
    photom = store.get("initial_photometry_match_detector", **where)
    calib = store.get("initial_photoCalib_detector", **where)
    background = store.get("preliminary_visit_image_background", **where)
    band = _band(store, where)

    # Figure (not pyplot): no global state, safe in worker threads. Fixed margins: the constrained
    # layout measures every artist before drawing (with the two changes below, the figure of a
    # 4096² detector takes 0.47 s instead of 0.75 s).
    fig = Figure(figsize=(15, 9))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.91, wspace=0.4, hspace=0.35)
    axes = fig.subplots(2, 3)
    fig.suptitle(f"{data_id.label}: {data_id.instrument} visit {data_id.visit} detector {data_id.detector}")

    # PSF: fractional size residual (trace of source vs model second moments) of the stars used.
    ax = axes[0, 0]
    used = np.asarray(psf["calib_psf_used"], bool)
    t_src = np.asarray(psf["ext_shapeHSM_HsmSourceMoments_xx"] + psf["ext_shapeHSM_HsmSourceMoments_yy"])[used]
    t_psf = np.asarray(psf["ext_shapeHSM_HsmPsfMoments_xx"] + psf["ext_shapeHSM_HsmPsfMoments_yy"])[used]
    with np.errstate(invalid="ignore", divide="ignore"):
        dsize = (t_src - t_psf) / t_psf
    sc = ax.scatter(np.asarray(psf["base_SdssCentroid_x"])[used], np.asarray(psf["base_SdssCentroid_y"])[used],
                    c=dsize, cmap="coolwarm", vmin=-0.05, vmax=0.05, s=12)
    fig.colorbar(sc, ax=ax, label="(T_star - T_psf) / T_psf")
    ax.set(title=f"PSF size residuals ({used.sum()} PSF stars)", xlabel="x [pix]", ylabel="y [pix]")

    # Astrometry: source - reference vectors in mas, exaggerated so they are visible on the detector.
    ax = axes[0, 1]
    dec = np.asarray(astrom["ref_coord_dec"])
    dx = (np.asarray(astrom["src_coord_ra"]) - np.asarray(astrom["ref_coord_ra"])) * np.cos(dec) * _MAS_PER_RAD
    dy = (np.asarray(astrom["src_coord_dec"]) - dec) * _MAS_PER_RAD
    rms = float(np.sqrt(np.mean(dx**2 + dy**2))) if len(dx) else float("nan")
    arrows = ax.quiver(np.asarray(astrom["src_base_SdssCentroid_x"]), np.asarray(astrom["src_base_SdssCentroid_y"]),
                       dx, dy, angles="xy", color="tab:blue")
    if math.isfinite(rms) and rms > 0:
        key_mas = float(f"{2.0 * rms:.1g}")  # a round length near twice the rms
        ax.quiverkey(arrows, 0.8, 1.08, key_mas, f"{key_mas:g} mas", labelpos="E", coordinates="axes")
    ax.set(title=f"astrometric residuals (rms {rms:.1f} mas, {len(dx)} matches)", xlabel="x [pix]", ylabel="y [pix]")

    # Photometry: calibrated PSF magnitude minus reference magnitude.
    cal = float(calib["calibration_njy_per_count"])
    ref_col = f"ref_{band}_flux"
    src_flux = np.asarray(photom["src_base_PsfFlux_instFlux"], float) * cal
    ref_flux = np.asarray(photom[ref_col], float) if ref_col in photom.colnames else np.full(len(photom), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_mag = -2.5 * np.log10(ref_flux) + 31.4  # AB zero point of nJy
        dmag = -2.5 * np.log10(src_flux / ref_flux)
    good = np.isfinite(dmag) & np.isfinite(ref_mag)
    ax = axes[0, 2]
    ax.scatter(ref_mag[good], dmag[good] * 1e3, s=6, alpha=0.6)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set(title=f"photometric residuals vs magnitude ({band})", xlabel=f"reference {band} [AB mag]",
           ylabel="PSF - reference [mmag]", ylim=(-150, 150))
    ax = axes[1, 0]
    sc = ax.scatter(np.asarray(photom["src_base_SdssCentroid_x"])[good],
                    np.asarray(photom["src_base_SdssCentroid_y"])[good], c=dmag[good] * 1e3, cmap="coolwarm",
                    vmin=-50, vmax=50, s=8)
    fig.colorbar(sc, ax=ax, label="PSF - reference [mmag]")
    ax.set(title="photometric residuals vs position", xlabel="x [pix]", ylabel="y [pix]")

    # Background: the model subtracted from the image, evaluated on a grid of at most ~512² pixels
    # (a look needs no more than the former full-resolution image, subsampled).
    ax = axes[1, 1]
    ny, nx = background.shape
    shown = background.image_subsampled(max(1, max(ny, nx) // 512))
    lo, hi = np.nanpercentile(shown, [1, 99]) if np.isfinite(shown).any() else (0.0, 1.0)
    im = ax.imshow(shown, origin="lower", cmap="viridis", vmin=lo, vmax=hi, extent=(0, nx, 0, ny))
    fig.colorbar(im, ax=ax, label="background [nJy/pix]")
    ax.set(title="background model", xlabel="x [pix]", ylabel="y [pix]")
    axes[1, 2].axis("off")
    axes[1, 2].text(0.0, 0.9, "\n".join([
        f"calibration: {cal:.4f} nJy/count",
        f"zero point: {calib.get('zero_point_mag', float('nan')):.3f} mag",
        f"photometric matches: {int(good.sum())} ({calib.get('n_matches', '?')} used in the fit)",
        f"astrometric matches: {len(dx)}",
    ]), va="top", family="monospace")

    buf = io.BytesIO()
    # zlib level 1: about half the encoding time of the default level, for a ~10 % larger file.
    fig.savefig(buf, format="png", dpi=72, pil_kwargs={"compress_level": 1})
    return buf.getvalue()
