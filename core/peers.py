"""Run the peer systems (AstrOmatic chain, astrometry.net, astroscrappy) on a frame and read their results.

Used by :mod:`singleframe.benchmarks` to compare our calibration with what
people would run instead, on the same pixels. Everything here works offline:

* :func:`write_ldac` / :func:`read_ldac` — FITS-LDAC tables (what SExtractor
  writes and SCAMP reads, including a local reference catalogue);
* :func:`refcat_to_ldac_table` — our reference table as SCAMP's ``ASTREF*`` columns;
* :func:`wcs_from_scamp_head` — a SCAMP ``.head`` as an astropy TPV WCS;
* :class:`PsfexPsf` — a PSFEx ``.psf`` file as a :class:`~singleframe.psf.PsfModel`;
* :func:`run_astromatic_chain` (:func:`run_sextractor_psfex` for its first two links),
  :func:`run_solve_field` — the binaries, timed
  one process at a time with their own peak RSS (``os.wait4``);
* :func:`run_astroscrappy` — L.A.Cosmic (astroscrappy) on an image.

Binaries missing from ``PATH`` raise :class:`PeerUnavailableError`; callers skip.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from .errors import SingleframeError
from .photo_calib import AB_MAG_OF_ONE_NJY
from .psf import PsfModel

#: Where Debian's source-extractor package keeps its filter and neural-network files.
SEXTRACTOR_SHARE = Path("/usr/share/source-extractor")
#: The configuration files used by the benchmark (shared reference, see peers.md).
ASTROMATIC_CONFIG_DIR = Path(os.environ.get("SINGLEFRAME_ASTROMATIC_CONFIG",
                                            "/work/shared/reference/astromatic"))
_MJD_J2000 = 51544.5


class PeerUnavailableError(SingleframeError):
    """A peer binary or package is not installed (run ``make bench-setup``)."""


class PeerFailedError(SingleframeError):
    """A peer ran but failed or produced no usable output."""


def peer_available(name: str) -> bool:
    """True if the executable ``name`` is on ``PATH`` (or the Python package ``astroscrappy`` imports)."""
    if name == "astroscrappy":
        try:
            import astroscrappy  # noqa: F401
        except ImportError:
            return False
        return True
    return shutil.which(name) is not None


# --------------------------------------------------------------------------------------
# Timed subprocesses
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessRun:
    """One finished peer process."""

    argv: tuple[str, ...]
    wall_s: float
    peak_rss_mb: float  #: max RSS of that process alone (from ``wait4``)
    returncode: int
    log: str  #: stderr + stdout (tail)


def run_timed(argv: Sequence[str], *, cwd: str | Path, env: Mapping[str, str] | None = None,
              check: bool = True) -> ProcessRun:
    """Run ``argv`` in ``cwd``; wall time and the process's own peak RSS.

    Raises
    ------
    PeerUnavailableError
        If the executable is not on ``PATH``.
    PeerFailedError
        If ``check`` and the exit code is non-zero.
    """
    exe = shutil.which(argv[0])
    if exe is None:
        raise PeerUnavailableError(f"{argv[0]} is not installed; run `make bench-setup`")
    log_path = Path(cwd) / f".{Path(argv[0]).name}.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([exe, *argv[1:]], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text(errors="replace")[-4000:]
    if check and proc.returncode != 0:
        raise PeerFailedError(f"{' '.join(argv)} exited with {proc.returncode}:\n{text}")
    return ProcessRun(tuple(argv), wall, usage.ru_maxrss / 1024.0, int(proc.returncode), text)


# --------------------------------------------------------------------------------------
# FITS-LDAC
# --------------------------------------------------------------------------------------
def write_ldac(path: str | Path, objects: Table, *, image_header: fits.Header | None = None) -> None:
    """Write ``objects`` as FITS-LDAC: empty primary, ``LDAC_IMHEAD``, ``LDAC_OBJECTS``.

    ``LDAC_IMHEAD`` holds ``image_header`` (default: a minimal one) as one row
    of 80-character cards, the layout SExtractor writes.
    """
    hdr = image_header.copy() if image_header is not None else fits.Header({"NAXIS": 0})
    cards = [c.image for c in hdr.cards] + ["END".ljust(80)]
    col = fits.Column(name="Field Header Card", format=f"{80 * len(cards)}A", dim=f"(80,{len(cards)})",
                      array=np.array([cards], dtype="S80"))
    imhead = fits.BinTableHDU.from_columns([col], name="LDAC_IMHEAD")
    obj = fits.BinTableHDU(objects, name="LDAC_OBJECTS")
    fits.HDUList([fits.PrimaryHDU(), imhead, obj]).writeto(path, overwrite=True)


def read_ldac(path: str | Path) -> tuple[Table, fits.Header]:
    """Objects and image header of the first LDAC pair of a FITS-LDAC file."""
    with fits.open(path, memmap=False) as hdul:
        names = [h.name for h in hdul]
        if "LDAC_OBJECTS" not in names:
            raise PeerFailedError(f"{path} has no LDAC_OBJECTS extension (extensions: {names})")
        objects = Table(hdul["LDAC_OBJECTS"].data)
        header = fits.Header()
        if "LDAC_IMHEAD" in names:
            raw = hdul["LDAC_IMHEAD"].data[0][0]
            # Read back as one string per card (trailing blanks stripped) or as one long string.
            items = [raw] if isinstance(raw, (str, bytes)) else list(np.ravel(raw))
            items = [c.decode("ascii", "replace") if isinstance(c, bytes) else str(c) for c in items]
            if len(items) == 1:
                items = [items[0][i:i + 80] for i in range(0, len(items[0]), 80)]
            header = fits.Header.fromstring("".join(c.ljust(80) for c in items))
    return objects, header


def refcat_to_ldac_table(refcat: Table, *, band: str, epoch_year: float) -> Table:
    """Our reference table (positions at ``epoch_year``) as SCAMP's default ``ASTREF*`` columns.

    ``X_WORLD``/``Y_WORLD`` (deg), ``ERRA_WORLD``/``ERRB_WORLD`` (deg, from
    ``ra_err``/``dec_err`` in mas), ``MAG``/``MAGERR`` (AB of ``<band>_flux``),
    ``OBSDATE`` (decimal year).
    """
    flux = np.asarray(refcat[f"{band}_flux"], float)
    ferr = np.asarray(refcat[f"{band}_fluxErr"], float)
    good = flux > 0
    out = Table()
    out["X_WORLD"] = np.asarray(refcat["ra"], float)[good]
    out["Y_WORLD"] = np.asarray(refcat["dec"], float)[good]
    out["ERRA_WORLD"] = np.asarray(refcat["ra_err"], float)[good] / 3.6e6
    out["ERRB_WORLD"] = np.asarray(refcat["dec_err"], float)[good] / 3.6e6
    out["ERRTHETA_WORLD"] = np.zeros(int(good.sum()))
    out["MAG"] = (AB_MAG_OF_ONE_NJY - 2.5 * np.log10(flux[good])).astype(np.float32)
    out["MAGERR"] = (2.5 / math.log(10) * ferr[good] / flux[good]).astype(np.float32)
    out["OBSDATE"] = np.full(int(good.sum()), float(epoch_year))
    return out


# --------------------------------------------------------------------------------------
# SCAMP .head -> astropy WCS
# --------------------------------------------------------------------------------------
def wcs_from_scamp_head(head: str | Path, *, image_header: fits.Header | None = None) -> WCS:
    """The WCS of a SCAMP ``.head`` (TAN + PV polynomial) as an astropy TPV WCS.

    SCAMP keeps ``CTYPE = RA---TAN`` with ``PV`` terms; wcslib reads those as
    TPV only if the type says so, hence the rename. Pixel convention: FITS
    (1-based) in the file, so ``wcs.all_pix2world(x, y, 0)`` takes array indices.

    Parameters
    ----------
    head
        Path of the ``.head`` file, or its text (a string with newlines).
    image_header
        Header to update (e.g. for ``NAXIS1/2``); the ``.head`` cards win.
    """
    is_text = isinstance(head, str) and "\n" in head
    text = str(head) if is_text else Path(head).read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("COMMENT", "HISTORY", "END"))]
    hdr = image_header.copy() if image_header is not None else fits.Header()
    # Drop every linear/distortion term of the image header: wcslib prefers PCi_j over the
    # .head's CDi_j when both are present, which would silently keep the header's rotation.
    for key in [k for k in hdr if k.startswith(("A_", "B_", "AP_", "BP_", "PC", "CD", "CROTA", "PV"))]:
        del hdr[key]
    for ln in lines:
        card = fits.Card.fromstring(ln.ljust(80)[:80])
        hdr[card.keyword] = (card.value, card.comment)
    has_pv = any(k.startswith("PV") for k in hdr)
    if has_pv:
        hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TPV", "DEC--TPV"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(hdr)


# --------------------------------------------------------------------------------------
# PSFEx .psf as a PsfModel
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PsfexPsf(PsfModel):
    """A PSFEx model (``PSF_MASK`` polynomial in ``X_IMAGE``, ``Y_IMAGE``) on our pixel grid.

    ``basis[k]`` is the k-th polynomial component sampled every ``sampling``
    image pixels; components are ordered with the x power running fastest
    (1, x, x², y, xy, y² for degree 2), as PSFEx writes them. Positions are
    our parent pixels; ``origin_offset`` converts to PSFEx's 1-based image
    coordinates (``X_IMAGE = x + 1`` for an image whose array index 0 is parent 0).
    """

    basis: npt.NDArray[np.float64]
    degree: int
    zero: tuple[float, float]
    scale: tuple[float, float]
    sampling: float
    fwhm_pix: float = float("nan")
    origin_offset: tuple[float, float] = (1.0, 1.0)
    _size: int = field(default=0)

    type_name = "psfex"

    @classmethod
    def read(cls, path: str | Path, *, origin: tuple[int, int] = (0, 0)) -> PsfexPsf:
        """Read a ``.psf`` file; ``origin`` is the parent position of the image's array index 0."""
        with fits.open(path, memmap=False) as hdul:
            return cls.from_hdus([hdul[1]], origin=origin)

    @classmethod
    def from_hdus(cls, hdus: Sequence[fits.ImageHDU | fits.BinTableHDU], *,
                  origin: tuple[int, int] = (0, 0)) -> PsfexPsf:
        hdu = hdus[0]
        h = hdu.header
        basis = np.asarray(hdu.data["PSF_MASK"][0], float)
        if basis.ndim == 2:
            basis = basis[None]
        n_axes = int(h.get("POLNAXIS", 0))
        degree = int(h.get("POLDEG1", 0)) if n_axes else 0
        zero = (float(h.get("POLZERO1", 0.0)), float(h.get("POLZERO2", 0.0)))
        scale = (float(h.get("POLSCAL1", 1.0)), float(h.get("POLSCAL2", 1.0)))
        return cls(basis=basis, degree=degree, zero=zero, scale=scale, sampling=float(h.get("PSF_SAMP", 1.0)),
                   fwhm_pix=float(h.get("PSF_FWHM", float("nan"))),
                   origin_offset=(1.0 - origin[0], 1.0 - origin[1]))

    def to_hdus(self) -> list[fits.ImageHDU | fits.BinTableHDU]:
        col = fits.Column(name="PSF_MASK", format=f"{self.basis.size}E", dim=str(self.basis.shape[::-1]),
                          array=self.basis[None].astype(np.float32))
        hdu = fits.BinTableHDU.from_columns([col], name="PSF_DATA")
        h = hdu.header
        h["PSFTYPE"] = self.type_name
        h["POLNAXIS"] = 2 if self.degree else 0
        h["POLZERO1"], h["POLZERO2"] = self.zero
        h["POLSCAL1"], h["POLSCAL2"] = self.scale
        h["POLDEG1"] = self.degree
        h["PSF_SAMP"] = self.sampling
        if math.isfinite(self.fwhm_pix):  # FITS headers cannot hold NaN
            h["PSF_FWHM"] = self.fwhm_pix
        return [hdu]

    def _coefficients(self, x: float, y: float) -> npt.NDArray[np.float64]:
        u = (x + self.origin_offset[0] - self.zero[0]) / self.scale[0]
        v = (y + self.origin_offset[1] - self.zero[1]) / self.scale[1]
        terms = [u**i * v**j for j in range(self.degree + 1) for i in range(self.degree + 1 - j)]
        if len(terms) != self.basis.shape[0]:
            raise PeerFailedError(f"PSFEx basis has {self.basis.shape[0]} components, degree {self.degree} "
                                  f"implies {len(terms)}")
        return np.asarray(terms, float)

    @property
    def default_size(self) -> int:
        if self._size:
            return int(self._size)
        n = int(math.ceil(self.basis.shape[-1] * self.sampling))
        return n if n % 2 else n - 1

    def image(self, x: float, y: float, *, size: int | None = None, centered: bool = True) -> npt.NDArray[np.float64]:
        model = np.tensordot(self._coefficients(x, y), self.basis, axes=1)
        n = int(size or self.default_size) | 1
        half = n // 2
        dx = 0.0 if centered else x - round(x)
        dy = 0.0 if centered else y - round(y)
        cy, cx = model.shape[0] // 2, model.shape[1] // 2
        off = np.arange(-half, half + 1, dtype=float)
        # Image pixel k (relative to the centre) sits at (k - d) / sampling on the PSFEx grid, and
        # is interpolated there as PSFEx itself does (vignet_resample: separable Lanczos-3). PSFEx
        # fits its samples through that kernel, so they are not point samples of the PSF: read back
        # with a cubic spline instead, its models came out 0.4 % too small on the bench frames.
        wy = _lanczos3(cy + (off - dy) / self.sampling, model.shape[0])
        wx = _lanczos3(cx + (off - dx) / self.sampling, model.shape[1])
        img = wy @ model @ wx.T
        total = img.sum()
        return img / total if total != 0 else img

    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        img = self.image(x, y)
        n = img.shape[0]
        c = np.arange(n) - n // 2
        yy, xx = np.meshgrid(c, c, indexing="ij")
        w = np.clip(img, 0, None)
        s = w.sum()
        mx, my = (w * xx).sum() / s, (w * yy).sum() / s
        return (float((w * (xx - mx) ** 2).sum() / s), float((w * (yy - my) ** 2).sum() / s),
                float((w * (xx - mx) * (yy - my)).sum() / s))


def _lanczos3(positions: npt.NDArray[np.float64], n_samples: int) -> npt.NDArray[np.float64]:
    """Weights ``(len(positions), n_samples)`` of the Lanczos-3 kernel from samples ``0..n-1`` to ``positions``."""
    d = positions[:, None] - np.arange(n_samples, dtype=float)[None, :]
    return np.where(np.abs(d) < 3.0, np.sinc(d) * np.sinc(d / 3.0), 0.0)


# --------------------------------------------------------------------------------------
# The AstrOmatic chain
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AstromaticResult:
    """One run of source-extractor → psfex → scamp."""

    runs: Mapping[str, ProcessRun]  #: by tool name
    catalog_path: Path
    psf_path: Path | None
    head_path: Path | None
    n_sources: int
    scamp_xy_contrast: float | None  #: SCAMP's match quality (≫ 1 on success)

    @property
    def wall_s(self) -> float:
        return float(sum(r.wall_s for r in self.runs.values()))

    @property
    def peak_rss_mb(self) -> float:
        return float(max(r.peak_rss_mb for r in self.runs.values()))


def run_astromatic_chain(image_path: str | Path, refcat_ldac: str | Path, *, workdir: str | Path,
                         config_dir: str | Path = ASTROMATIC_CONFIG_DIR,
                         share_dir: str | Path = SEXTRACTOR_SHARE) -> AstromaticResult:
    """SExtractor → PSFEx → SCAMP on one image with a local LDAC reference catalogue.

    The image needs an approximate celestial WCS, ``GAIN`` and ``SATURATE``.
    Each tool is timed as its own process.
    """
    for tool in ("source-extractor", "psfex", "scamp"):
        if not peer_available(tool):
            raise PeerUnavailableError(f"{tool} is not installed; run `make bench-setup`")
    wd = Path(workdir)
    runs, cat, psf = run_sextractor_psfex(image_path, workdir=wd, config_dir=config_dir, share_dir=share_dir)
    objects, _ = read_ldac(cat)
    cfg = Path(config_dir)
    runs["scamp"] = run_timed(
        ["scamp", str(cat), "-c", str(cfg / "scamp.conf"), "-ASTREF_CATALOG", "FILE",
         "-ASTREFCAT_NAME", str(Path(refcat_ldac).resolve()), "-CHECKPLOT_TYPE", "NONE", "-CHECKPLOT_DEV", "NULL",
         "-WRITE_XML", "Y", "-XML_NAME", str(wd / "scamp.xml")], cwd=wd)
    head = wd / "frame.head"
    return AstromaticResult(runs, cat, psf, head if head.exists() else None,
                            len(objects), _scamp_contrast(wd / "scamp.xml"))


def run_sextractor_psfex(image_path: str | Path, *, workdir: str | Path,
                         config_dir: str | Path = ASTROMATIC_CONFIG_DIR,
                         share_dir: str | Path = SEXTRACTOR_SHARE) -> tuple[dict[str, ProcessRun], Path, Path | None]:
    """The first two links of the chain: ``(runs by tool, LDAC catalogue, PSFEx .psf or None)``."""
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    cfg, share = Path(config_dir), Path(share_dir)
    cat = wd / "frame.ldac"
    runs: dict[str, ProcessRun] = {}
    runs["source-extractor"] = run_timed(
        ["source-extractor", str(Path(image_path).resolve()), "-c", str(cfg / "sex.conf"),
         "-PARAMETERS_NAME", str(cfg / "chain.param"), "-FILTER_NAME", str(share / "default.conv"),
         "-STARNNW_NAME", str(share / "default.nnw"), "-CATALOG_NAME", str(cat)], cwd=wd)
    runs["psfex"] = run_timed(["psfex", str(cat), "-c", str(cfg / "psfex.conf"), "-PSF_DIR", str(wd),
                               "-XML_NAME", str(wd / "psfex.xml")], cwd=wd)
    psf = wd / "frame.psf"
    return runs, cat, psf if psf.exists() else None


def _scamp_contrast(xml: Path) -> float | None:
    """``XY_Contrast`` of the first field in SCAMP's XML (None if absent)."""
    if not xml.exists():
        return None
    from astropy.io.votable import parse

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vot = parse(str(xml))
        for table in vot.iter_tables():
            names = [f.name for f in table.fields]
            if "XY_Contrast" in names:
                return float(np.ravel(table.array["XY_Contrast"])[0])
    except Exception:  # noqa: BLE001 - a malformed XML only loses the diagnostic
        return None
    return None


# --------------------------------------------------------------------------------------
# astrometry.net
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SolveFieldResult:
    index_build: ProcessRun
    solve: ProcessRun
    wcs_path: Path | None  #: None: not solved


def _index_presets(fov_arcmin: float) -> list[int]:
    """astrometry.net scale presets whose quads span ~10–100 % of the field."""
    # Preset P has quads of 2·√2^P to 2·√2^(P+1) arcmin (P = 0 → 2.0–2.8').
    presets = [p for p in range(-5, 20) if 0.1 * fov_arcmin <= 2.0 * math.sqrt(2.0) ** p <= fov_arcmin]
    return presets or [0]


def run_solve_field(catalog: Table, refcat: Table, *, band: str, shape: tuple[int, int],
                    pixel_scale_arcsec: float, ra_deg: float, dec_deg: float, workdir: str | Path,
                    x_col: str = "X_IMAGE", y_col: str = "Y_IMAGE", flux_col: str = "FLUX_AUTO",
                    tweak_order: int = 3) -> SolveFieldResult:
    """Build local index files from ``refcat`` and solve the xy list ``catalog`` with solve-field."""
    for tool in ("build-astrometry-index", "solve-field"):
        if not peer_available(tool):
            raise PeerUnavailableError(f"{tool} is not installed; run `make bench-setup`")
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    flux = np.asarray(refcat[f"{band}_flux"], float)
    good = flux > 0
    ref = Table({"ra": np.asarray(refcat["ra"], float)[good], "dec": np.asarray(refcat["dec"], float)[good],
                 "mag": AB_MAG_OF_ONE_NJY - 2.5 * np.log10(flux[good])})
    ref.write(wd / "ref.fits", overwrite=True)
    xy = Table({"X": np.asarray(catalog[x_col], float), "Y": np.asarray(catalog[y_col], float),
                "FLUX": np.asarray(catalog[flux_col], float)})
    xy.write(wd / "xy.fits", overwrite=True)
    fov_arcmin = max(shape) * pixel_scale_arcsec / 60.0
    t0 = time.perf_counter()
    peak = 0.0
    lines = []
    for p in _index_presets(fov_arcmin):
        run = run_timed(["build-astrometry-index", "-i", "ref.fits", "-o", f"idx-{p:02d}.fits", "-P", str(p),
                         "-E", "-S", "mag", "-A", "ra", "-D", "dec", "-I", str(100 + p + 5)], cwd=wd)
        peak = max(peak, run.peak_rss_mb)
        lines.append(f"index {wd.resolve() / f'idx-{p:02d}.fits'}")
    build = ProcessRun(("build-astrometry-index",), time.perf_counter() - t0, peak, 0, "")
    (wd / "astrometry.cfg").write_text("\n".join(lines) + "\n")
    ny, nx = shape
    solve = run_timed(
        ["solve-field", "xy.fits", "--config", "astrometry.cfg", "--x-column", "X", "--y-column", "Y",
         "--sort-column", "FLUX", "--width", str(nx), "--height", str(ny), "--scale-units", "arcsecperpix",
         "--scale-low", f"{0.9 * pixel_scale_arcsec}", "--scale-high", f"{1.1 * pixel_scale_arcsec}",
         "--ra", f"{ra_deg}", "--dec", f"{dec_deg}", "--radius", "0.5", "--tweak-order", str(tweak_order),
         "--no-plots", "--overwrite", "--cpulimit", "120", "--dir", "out"], cwd=wd, check=False)
    out = wd / "out" / "xy.wcs"
    return SolveFieldResult(build, solve, out if out.exists() else None)


def read_wcs_file(path: str | Path) -> WCS:
    """A WCS from a FITS header file (e.g. astrometry.net's ``.wcs``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.getheader(path))


# --------------------------------------------------------------------------------------
# astroscrappy
# --------------------------------------------------------------------------------------
def run_astroscrappy(image: npt.NDArray[np.floating], *, gain_e_per_count: float, read_noise_e: float,
                     saturation_count: float, mask: npt.NDArray[np.bool_] | None = None,
                     sigclip: float = 4.5, objlim: float = 5.0) -> tuple[npt.NDArray[np.bool_], float]:
    """L.A.Cosmic (astroscrappy, defaults otherwise) on an image in counts; (CR mask, wall s)."""
    try:
        import astroscrappy
    except ImportError as exc:
        raise PeerUnavailableError("astroscrappy is not installed; run `make bench-setup`") from exc
    data = np.asarray(image, np.float32)
    t0 = time.perf_counter()
    crmask, _ = astroscrappy.detect_cosmics(data, inmask=mask, gain=gain_e_per_count, readnoise=read_noise_e,
                                            satlevel=saturation_count, sigclip=sigclip, objlim=objlim)
    return np.asarray(crmask, bool), time.perf_counter() - t0


__all__ = [
    "ASTROMATIC_CONFIG_DIR", "AstromaticResult", "PeerFailedError", "PeerUnavailableError", "ProcessRun",
    "PsfexPsf", "SEXTRACTOR_SHARE", "SolveFieldResult", "peer_available", "read_ldac", "read_wcs_file",
    "refcat_to_ldac_table", "run_astromatic_chain", "run_astroscrappy", "run_sextractor_psfex", "run_solve_field",
    "run_timed", "wcs_from_scamp_head", "write_ldac",
]
