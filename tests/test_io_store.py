"""Artifact store: layout, atomic writes, provenance, errors, fsspec memory:// (object-store-like)."""

from __future__ import annotations

import hashlib
import math
import uuid
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table

from singleframe import __version__
from singleframe.background import BackgroundList, BackgroundModel
from singleframe.errors import ConfigError, DatasetError, DatasetNotFoundError, TransientIOError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.io import DATASET_TYPES, ArtifactStore, DatasetRef, get_dataset_type
from singleframe.io.datasets import DatasetType
from singleframe.provenance import code_fingerprint
from singleframe.psf import GaussianPsf

DATA_ID = {"instrument": "sim", "visit": 42, "detector": 7}

RUBIN_OUTPUTS = {
    "preliminary_visit_image", "preliminary_visit_image_background", "single_visit_star_unstandardized",
    "single_visit_psf_star", "single_visit_psf_star_footprints", "initial_astrometry_match_detector",
    "initial_photometry_match_detector", "initial_photoCalib_detector",
}


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "repo"))


@pytest.fixture
def memory_store() -> ArtifactStore:
    # fsspec's memory filesystem is process-global: a fresh prefix isolates each test.
    return ArtifactStore(f"memory://bucket-{uuid.uuid4().hex[:8]}/repo")


def _exposure() -> Exposure:
    rng = np.random.default_rng(1)
    ny, nx = 40, 64  # non-square
    return Exposure(rng.normal(size=(ny, nx)).astype(np.float32), np.zeros((ny, nx), np.uint32),
                    np.ones((ny, nx), np.float32), VisitInfo(42, 15.0, 60000.25, "i", "i_06", 1.0, 2.0, 3.0),
                    DetectorInfo(7), psf=GaussianPsf(2.1), origin=(100, 200))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_registry_declares_rubin_outputs_and_lists_names_on_error() -> None:
    outputs = {t.name for t in DATASET_TYPES.values() if t.group == "output"}
    assert outputs == RUBIN_OUTPUTS
    assert get_dataset_type("post_isr_image").dimensions == ("instrument", "visit", "detector", "snap")
    assert get_dataset_type("calibrate_config").dimensions == ("instrument",)
    assert get_dataset_type("characterized_image").internal
    with pytest.raises(ConfigError, match="preliminary_visit_image"):
        get_dataset_type("calexp")
    with pytest.raises(ConfigError, match="storage"):
        DatasetType("x", "hdf5", ("instrument",), "bad")  # type: ignore[arg-type]


def test_key_layout_and_provenance_sidecar(store: ArtifactStore, tmp_path: Path) -> None:
    inputs = [DatasetRef(dataset_type="post_isr_image", snap=0, run="raw", uri="file:///x", checksum="ab",
                         **DATA_ID).provenance_record()]
    ref = store.put("detector_summary", {"psfSigma": 1.9, "bad": math.nan}, run="run1", **DATA_ID,
                    provenance={"config_hash": "cafe", "inputs": inputs})
    key = tmp_path / "repo/run1/detector_summary/sim/visit-42/det-007.json"
    assert key.is_file() and Path(str(key) + ".prov.json").is_file()
    assert ref.uri == key.as_uri() and ref.visit == 42 and ref.snap is None
    assert ref.checksum == hashlib.sha256(key.read_bytes()).hexdigest()
    prov = store.provenance("detector_summary", run="run1", **DATA_ID)
    # The release and the fingerprint of the calibration source (it changes with the code).
    assert prov["checksum"] == ref.checksum and prov["code_version"] == f"{__version__}+{code_fingerprint()}"
    assert prov["config_hash"] == "cafe" and prov["inputs"] == inputs and prov["created_utc"].endswith("+00:00")
    # Types lacking a dimension drop that level; extra data-id values are ignored.
    cfg = store.put("calibrate_config", {"a": 1}, run="run1", **DATA_ID)
    assert cfg.uri.endswith("/run1/calibrate_config/sim.json") and cfg.visit is None
    snap = store.put("truth_cr_mask", np.zeros((4, 5), bool), run="run1", snap=1, **DATA_ID)
    assert snap.uri.endswith("/run1/truth_cr_mask/sim/visit-42/det-007/snap-1.fits")
    assert store.ref("detector_summary", run="run1", **DATA_ID) == ref
    # DatasetRef is small and JSON-serialisable (what Prefect passes between tasks).
    assert DatasetRef.model_validate_json(ref.model_dump_json()) == ref


def test_cached_ref_only_for_the_same_cache_key_and_the_bytes_written(store: ArtifactStore, tmp_path: Path) -> None:
    assert store.cached_ref("detector_summary", cache_key="k1", run="run1", **DATA_ID) is None  # nothing stored
    ref = store.put("detector_summary", {"psfSigma": 1.9}, run="run1", **DATA_ID, provenance={"cache_key": "k1"})
    assert store.cached_ref("detector_summary", cache_key="k1", run="run1", **DATA_ID) == ref
    assert store.cached_ref("detector_summary", cache_key="k2", run="run1", **DATA_ID) is None
    # Truncated outside the store: not the product the key names any more.
    path = tmp_path / "repo/run1/detector_summary/sim/visit-42/det-007.json"
    path.write_bytes(path.read_bytes()[:-1])
    assert store.cached_ref("detector_summary", cache_key="k1", run="run1", **DATA_ID) is None


@pytest.mark.parametrize("which", ["exposure", "background", "catalog", "json", "image"])
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_round_trip_every_storage_kind(which: str, kind: str, store: ArtifactStore,
                                       memory_store: ArtifactStore) -> None:
    s = store if kind == "local" else memory_store
    bkg = BackgroundList((BackgroundModel(np.full((2, 3), 5.0), np.array([10.0, 30.0, 50.0]),
                                          np.array([8.5, 28.5]), (40, 64), (0, 0)),), "nJy")
    catalog = Table({"flux": np.arange(3.0) * u.nJy, "calib_psf_used": np.array([True, False, True])})
    objects = {
        "exposure": ("characterized_image", _exposure()),
        "background": ("characterized_background", bkg),
        "catalog": ("star_catalog", catalog),
        "json": ("detector_summary", {"nan": math.nan, "n": 3}),
        "image": ("truth_cr_mask", np.eye(5, 7, dtype=bool)),
    }
    dataset_type, obj = objects[which]
    snap = 0 if which == "image" else None
    ref = s.put(dataset_type, obj, run="r", snap=snap, **DATA_ID)
    back = s.get_ref(ref, verify_checksum=True)
    if which == "exposure":
        np.testing.assert_array_equal(back.image, obj.image)
        assert back.psf == obj.psf and back.origin == (100, 200)
    elif which == "background":
        assert back.unit == "nJy"
        np.testing.assert_array_equal(back.image(), obj.image())
    elif which == "catalog":
        assert back["flux"].unit == u.nJy and back["calib_psf_used"].dtype == np.bool_
        assert back["calib_psf_used"].unit is None
    elif which == "json":
        assert math.isnan(back["nan"]) and back["n"] == 3
    else:
        assert back.dtype == np.bool_ and np.array_equal(back, obj)
    assert s.exists(dataset_type, run="r", snap=snap, **DATA_ID)
    assert s.query(dataset_type, run="r") == [ref.model_copy(update={"checksum": None})]


def test_failed_rename_leaves_no_dataset_and_no_partial_file(store: ArtifactStore, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_mv(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.fs, "mv", broken_mv)
    with pytest.raises(DatasetError, match="star_catalog") as info:
        store.put("star_catalog", Table({"a": [1.0]}), run="r", **DATA_ID)
    assert not isinstance(info.value, TransientIOError)  # a full local disk is not retried
    assert info.value.uri is not None and info.value.uri.endswith("det-007.parquet")
    assert not store.exists("star_catalog", run="r", **DATA_ID)
    assert [f for f in _files(tmp_path / "repo")] == []  # temporary file removed


def test_crash_mid_write_is_invisible(store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that dies half way through: readers see neither a partial nor a temporary dataset."""
    store.put("detector_summary", {"version": 1}, run="r", **DATA_ID)
    real_open = store.fs.open

    class HalfWriter:
        def __init__(self, f: object) -> None:
            self.f = f

        def __enter__(self) -> HalfWriter:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()  # type: ignore[attr-defined]

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])  # type: ignore[attr-defined]
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(store.fs, "open", lambda path, mode="rb", **kw: HalfWriter(real_open(path, mode, **kw)))
    with pytest.raises(DatasetError):
        store.put("detector_summary", {"version": 2, "pad": "x" * 1000}, run="r", **DATA_ID)
    monkeypatch.undo()
    # The old sidecar was withdrawn before the replacement began, so the dataset reads as incomplete,
    # and no temporary or half-written file is left beside it.
    assert not store.exists("detector_summary", run="r", **DATA_ID)
    files = _files(tmp_path / "repo")
    assert files == ["r/detector_summary/sim/visit-42/det-007.json"]
    assert (tmp_path / "repo" / files[0]).read_bytes().decode().strip().endswith("}")  # the old, whole file
    with pytest.raises(DatasetNotFoundError):
        store.get("detector_summary", run="r", **DATA_ID)


def test_serialisation_failure_writes_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot serialise dataset detector_summary"):
        store.put("detector_summary", {"x": object()}, run="r", **DATA_ID)
    with pytest.raises(DatasetError, match="Exposure"):
        store.put("characterized_image", {"not": "an exposure"}, run="r", **DATA_ID)
    assert not (tmp_path / "repo").exists() or _files(tmp_path / "repo") == []


def test_missing_dataset_and_missing_sidecar(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="visit-42/det-007.json"):
        store.get("detector_summary", run="r", **DATA_ID)
    with pytest.raises(DatasetNotFoundError):
        store.ref("detector_summary", run="r", **DATA_ID)
    store.put("detector_summary", {"a": 1}, run="r", **DATA_ID)
    Path(tmp_path / "repo/r/detector_summary/sim/visit-42/det-007.json.prov.json").unlink()
    assert not store.exists("detector_summary", run="r", **DATA_ID)  # no sidecar: incomplete
    assert store.query("detector_summary", run="r") == []
    with pytest.raises(DatasetError, match="needs snap"):
        store.put("post_isr_image", _exposure(), run="r", **DATA_ID)
    with pytest.raises(DatasetError, match="storage key segment"):
        store.put("detector_summary", {}, run="../escape", **DATA_ID)


def test_checksum_detects_overwrite_and_delete(memory_store: ArtifactStore) -> None:
    old = memory_store.put("detector_summary", {"v": 1}, run="r", **DATA_ID)
    memory_store.put("detector_summary", {"v": 2}, run="r", **DATA_ID)
    assert memory_store.get_ref(old)["v"] == 2  # without verification the current content is read
    with pytest.raises(DatasetError, match="checksum mismatch"):
        memory_store.get_ref(old, verify_checksum=True)
    memory_store.delete("detector_summary", run="r", **DATA_ID)
    assert not memory_store.exists("detector_summary", run="r", **DATA_ID)


def test_query_filters_by_data_id(memory_store: ArtifactStore) -> None:
    for visit in (1, 2):
        for det in (0, 11):
            for snap in (0, 1):
                memory_store.put("truth_cr_mask", np.zeros((2, 3), np.uint8), run="r", instrument="sim",
                                 visit=visit, detector=det, snap=snap)
    assert len(memory_store.query("truth_cr_mask", run="r")) == 8
    refs = memory_store.query("truth_cr_mask", run="r", visit=2, detector=11)
    assert [(r.visit, r.detector, r.snap) for r in refs] == [(2, 11, 0), (2, 11, 1)]
    assert memory_store.query("truth_cr_mask", run="r", instrument="other") == []
    assert memory_store.query("truth_cr_mask", run="other") == []


def test_remote_oserror_is_transient(memory_store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    memory_store.put("detector_summary", {"a": 1}, run="r", **DATA_ID)

    def flaky(*args: object, **kwargs: object) -> bytes:
        raise OSError("connection reset by peer")

    monkeypatch.setattr(memory_store.fs, "cat_file", flaky)
    with pytest.raises(TransientIOError, match="detector_summary") as info:
        memory_store.get("detector_summary", run="r", **DATA_ID)
    assert info.value.dataset_type == "detector_summary"
    assert info.value.uri is not None and info.value.uri.startswith("memory://")


def test_corrupt_file_is_a_dataset_error(store: ArtifactStore, tmp_path: Path) -> None:
    store.put("star_catalog", Table({"a": [1.0]}), run="r", **DATA_ID)
    path = tmp_path / "repo/r/star_catalog/sim/visit-42/det-007.parquet"
    path.write_bytes(b"x" * path.stat().st_size)  # the size the store recorded: the decoder must tell
    with pytest.raises(DatasetError, match="cannot decode dataset star_catalog") as info:
        store.get("star_catalog", run="r", **DATA_ID)
    assert not isinstance(info.value, DatasetNotFoundError | TransientIOError)


def test_a_file_changed_outside_the_store_is_refused_on_read(tmp_path: Path) -> None:
    # Truncated or replaced by hand: the size the sidecar recorded no longer matches (every
    # read), and the checksum does not either (reads that verify it: the flow's ingested inputs).
    store = ArtifactStore(str(tmp_path / "repo"))
    ref = store.put("post_isr_image", _exposure(), run="r", snap=0, **DATA_ID)
    path = tmp_path / "repo/r/post_isr_image/sim/visit-42/det-007/snap-0.fits"
    data = path.read_bytes()
    path.write_bytes(data[:5000])
    with pytest.raises(DatasetError, match="has 5000 bytes, not the .* changed outside the store"):
        store.get("post_isr_image", run="r", snap=0, **DATA_ID)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # same size, one pixel byte changed
    path.write_bytes(bytes(flipped))
    store.get_ref(ref)  # decodes: only the checksum can tell
    with pytest.raises(DatasetError, match="checksum mismatch.*changed outside the store"):
        store.get_ref(ref, verify_checksum=True)


def test_a_rewrite_between_the_two_reads_of_a_dataset_is_transient(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Sidecar read, then data read: if another writer replaced both in between, the sizes
    # disagree but nothing is damaged. A retry (TransientIOError) reads the new version.
    store = ArtifactStore(str(tmp_path / "repo"))
    store.put("detector_summary", {"v": 1}, run="r", **DATA_ID)
    real = store.fs.cat_file
    calls = []

    def cat_file(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the data: meanwhile rewritten as a larger version...
            store.put("detector_summary", {"v": 2, "pad": "x" * 100}, run="r", **DATA_ID)
            return real(path, *a, **k)
        return real(path, *a, **k)

    monkeypatch.setattr(store.fs, "cat_file", cat_file)
    with pytest.raises(TransientIOError, match="being rewritten while read"):
        store.get("detector_summary", run="r", **DATA_ID)
    monkeypatch.setattr(store.fs, "cat_file", real)
    assert store.get("detector_summary", run="r", **DATA_ID)["v"] == 2
