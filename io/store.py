"""The artifact store: datasets on a local disk or any fsspec filesystem, written atomically.

Layout (levels for dimensions a dataset type lacks are dropped; the last
level becomes the file name)::

    {root}/{run}/{dataset_type}/{instrument}/visit-{visit}/det-{detector:03d}[/snap-{snap}].{ext}
    {root}/{run}/{dataset_type}/{instrument}/visit-{visit}/det-{detector:03d}[/snap-{snap}].{ext}.prov.json

Each dataset has a provenance sidecar ``<key>.prov.json`` written *after*
the dataset; a dataset without its sidecar is incomplete and
:meth:`ArtifactStore.exists` reports it missing.

Atomicity: objects are serialised to bytes in memory first. On filesystems
with a rename (local disk, SFTP, ...) the bytes go to a temporary key in the
same folder that is then renamed over the final key, so readers see either
the old file or the new one, never a partial file. Object stores whose PUT
is atomic (S3, GCS, Azure, fsspec's ``memory://``) get a direct PUT.

Errors: every I/O failure is wrapped once in :class:`~singleframe.errors.DatasetError`
naming the dataset and URI; a missing dataset raises
:class:`~singleframe.errors.DatasetNotFoundError`; network failures and
``OSError`` on remote filesystems raise :class:`~singleframe.errors.TransientIOError`
(the only kind the flows retry).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
from astropy.io.fits.verify import VerifyError

from .. import __version__
from ..errors import DatasetError, DatasetNotFoundError, SingleframeError, TransientIOError
from ..provenance import code_fingerprint
from .datasets import DatasetType, get_dataset_type
from .formats import BytesLike, _json_dumps, _json_loads, get_format

if TYPE_CHECKING:
    from .refs import DatasetRef

__all__ = ["ArtifactStore", "PROVENANCE_SUFFIX"]

#: Suffix of the provenance sidecar written beside every dataset.
PROVENANCE_SUFFIX = ".prov.json"

#: Protocols whose single-object PUT is atomic: no temporary key + rename needed.
ATOMIC_PUT_PROTOCOLS = frozenset({"memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})

_LOCAL_PROTOCOLS = frozenset({"file", "local"})

#: Key components must be safe as path segments on every filesystem.
_SAFE = re.compile(r"^[A-Za-z0-9_.+\-]+$")

#: Errors raised by readers and writers on bad content (not I/O): wrapped as DatasetError.
_CONTENT_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, TypeError, IndexError,
                                                    VerifyError, pa.ArrowException)


def _checksum(data: BytesLike) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Datasets under one root directory or fsspec URL.

    Parameters
    ----------
    root
        Local directory path or fsspec URL (``file://``, ``memory://``, ``s3://bucket/prefix`` ...).
    storage_options
        Passed to fsspec (credentials, endpoint); never stored in references.

    Notes
    -----
    The store holds no open files and is cheap to rebuild; flows pass the
    root string between tasks and make a store in each.
    """

    def __init__(self, root: str, **storage_options: Any) -> None:
        try:
            fs, path = fsspec.core.url_to_fs(str(root), **storage_options)
        except (ValueError, ImportError) as exc:
            raise DatasetError(f"cannot open artifact store {root!r}: {exc}. Check the URL and that the "
                               f"fsspec backend for its protocol is installed.", uri=str(root)) from exc
        self.fs: fsspec.AbstractFileSystem = fs
        self.root_path: str = str(path).rstrip("/")
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        self.protocol: str = protocols[0]
        self.is_local: bool = bool(set(protocols) & _LOCAL_PROTOCOLS)
        self._atomic_put = bool(set(protocols) & ATOMIC_PUT_PROTOCOLS)
        self.root: str = self.fs.unstrip_protocol(self.root_path) if not self.is_local else self.root_path

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # ------------------------------------------------------------------------------------
    # keys
    # ------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        """Full URI of a store-internal path."""
        return str(self.fs.unstrip_protocol(path))

    def _relative_key(self, dtype: DatasetType, *, run: str, instrument: str, visit: int | None,
                      detector: int | None, snap: int | None) -> str:
        parts = [_segment(run, "run"), dtype.name, _segment(instrument, "instrument")]
        values = {"visit": visit, "detector": detector, "snap": snap}
        for dim in dtype.dimensions[1:]:
            value = values[dim]
            if value is None:
                raise DatasetError(f"dataset type {dtype.name!r} needs {dim} (its dimensions are "
                                   f"{dtype.dimensions}); pass {dim}=<int>", dataset_type=dtype.name)
            value = int(value)
            parts.append({"visit": f"visit-{value}", "detector": f"det-{value:03d}", "snap": f"snap-{value}"}[dim])
        return "/".join(parts) + "." + get_format(dtype.storage).extension

    def _locate(self, dataset_type: str, *, run: str, instrument: str, visit: int | None = None,
                detector: int | None = None, snap: int | None = None) -> tuple[DatasetType, str, dict[str, Any]]:
        """Dataset type, absolute path and the data id restricted to the type's dimensions."""
        dtype = get_dataset_type(dataset_type)
        key = self._relative_key(dtype, run=run, instrument=instrument, visit=visit, detector=detector, snap=snap)
        # Dimensions the type lacks are dropped so flows can pass one full data id everywhere.
        data_id = {"instrument": instrument, "visit": visit, "detector": detector, "snap": snap}
        data_id = {k: (int(v) if k != "instrument" else v) for k, v in data_id.items()
                   if k in dtype.dimensions}
        return dtype, f"{self.root_path}/{key}", data_id

    def _make_ref(self, dtype: DatasetType, path: str, run: str, data_id: Mapping[str, Any],
                  checksum: str | None) -> DatasetRef:
        # Here, not at the top: pydantic is imported by the first write, not by a read-only process.
        from .refs import DatasetRef

        return DatasetRef(dataset_type=dtype.name, run=run, uri=self.url(path), checksum=checksum,
                          instrument=str(data_id["instrument"]), visit=data_id.get("visit"),
                          detector=data_id.get("detector"), snap=data_id.get("snap"))

    # ------------------------------------------------------------------------------------
    # error wrapping
    # ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _wrapped(self, action: str, what: str, path: str, dataset_type: str | None = None) -> Iterator[None]:
        """Translate any I/O or decoding failure into one typed error naming ``what`` and its URI."""
        uri = self.url(path)
        try:
            yield
        except SingleframeError as exc:
            if isinstance(exc, DatasetError) and exc.uri is not None:
                raise  # already wrapped once, with its URI
            raise DatasetError(f"cannot {action} {what} at {uri}: {exc}", dataset_type=dataset_type,
                               uri=uri) from exc
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(f"{what} not found at {uri}; run the task that produces it first "
                                       f"or check run/data id", dataset_type=dataset_type, uri=uri) from exc
        except (TimeoutError, ConnectionError) as exc:
            raise TransientIOError(f"cannot {action} {what} at {uri}: {exc!r} (transient; retry)",
                                   dataset_type=dataset_type, uri=uri) from exc
        except OSError as exc:
            if not self.is_local:
                raise TransientIOError(f"cannot {action} {what} at {uri}: {exc!r} (remote filesystem; retry)",
                                       dataset_type=dataset_type, uri=uri) from exc
            raise DatasetError(f"cannot {action} {what} at {uri}: {exc!r}. Check permissions and free space.",
                               dataset_type=dataset_type, uri=uri) from exc
        except _CONTENT_ERRORS as exc:
            raise DatasetError(f"cannot {action} {what} at {uri}: {type(exc).__name__}: {exc}",
                               dataset_type=dataset_type, uri=uri) from exc

    # ------------------------------------------------------------------------------------
    # raw bytes (also used by the reference-catalogue layer)
    # ------------------------------------------------------------------------------------
    def _write_bytes_atomic(self, path: str, data: BytesLike) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self._atomic_put:
            # Object-store clients want bytes; the copy is small next to the upload.
            self.fs.pipe_file(path, data if isinstance(data, bytes) else bytes(data))
            return
        tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        except BaseException:
            # Leave no partial temporary file behind, whatever interrupted the write.
            with contextlib.suppress(OSError):
                if self.fs.exists(tmp):
                    self.fs.rm_file(tmp)
            raise

    def put_bytes(self, relative_path: str, data: bytes) -> str:
        """Write ``data`` atomically at ``{root}/{relative_path}``; returns the full URI."""
        path = f"{self.root_path}/{relative_path.lstrip('/')}"
        with self._wrapped("write", relative_path, path):
            self._write_bytes_atomic(path, data)
        return self.url(path)

    def get_bytes(self, relative_path: str) -> bytes:
        """Read ``{root}/{relative_path}``; raises :class:`DatasetNotFoundError` if absent."""
        path = f"{self.root_path}/{relative_path.lstrip('/')}"
        with self._wrapped("read", relative_path, path):
            return bytes(self.fs.cat_file(path))

    def exists_path(self, relative_path: str) -> bool:
        """Whether ``{root}/{relative_path}`` exists."""
        path = f"{self.root_path}/{relative_path.lstrip('/')}"
        with self._wrapped("check", relative_path, path):
            return bool(self.fs.exists(path))

    def delete_path(self, relative_path: str, *, recursive: bool = False) -> None:
        """Remove ``{root}/{relative_path}`` if it exists."""
        path = f"{self.root_path}/{relative_path.lstrip('/')}"
        with self._wrapped("delete", relative_path, path):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)

    # ------------------------------------------------------------------------------------
    # datasets
    # ------------------------------------------------------------------------------------
    def put(self, dataset_type: str, obj: Any, *, run: str, instrument: str, visit: int | None = None,
            detector: int | None = None, snap: int | None = None,
            provenance: Mapping[str, Any] | None = None) -> DatasetRef:
        """Serialise ``obj`` and store it atomically, then its provenance sidecar.

        Parameters
        ----------
        dataset_type
            A declared dataset type name.
        obj
            Exposure, BackgroundList, astropy Table, dict or numpy array, by the type's storage.
        run, instrument, visit, detector, snap
            Collection and data id (dimensions the type lacks are ignored).
        provenance
            Extra sidecar entries, e.g. ``config_hash`` and ``inputs`` (a list of
            :meth:`DatasetRef.provenance_record`). Keys the store writes itself win.

        Returns
        -------
        DatasetRef
            Reference with the SHA-256 checksum of the stored bytes.
        """
        dtype, path, data_id = self._locate(dataset_type, run=run, instrument=instrument, visit=visit,
                                            detector=detector, snap=snap)
        what = f"dataset {dtype.name} {data_id} (run {run})"
        fmt = get_format(dtype.storage)
        with self._wrapped("serialise", what, path, dtype.name):
            data = fmt.write(obj)
        checksum = _checksum(data)
        sidecar = {
            **dict(provenance or {}),
            "dataset_type": dtype.name,
            "data_id": data_id,
            "run": run,
            "uri": self.url(path),
            "storage": dtype.storage,
            "size_bytes": len(data),
            "checksum": checksum,
            "code_version": f"{__version__}+{code_fingerprint()}",
            "created_utc": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        with self._wrapped("serialise provenance of", what, path + PROVENANCE_SUFFIX, dtype.name):
            sidecar_bytes = _json_dumps(sidecar, indent=1).encode("utf-8")
        with self._wrapped("write", what, path, dtype.name):
            # Remove the old sidecar first: while the dataset is replaced it counts as incomplete.
            if self.fs.exists(path + PROVENANCE_SUFFIX):
                self.fs.rm_file(path + PROVENANCE_SUFFIX)
            self._write_bytes_atomic(path, data)
            self._write_bytes_atomic(path + PROVENANCE_SUFFIX, sidecar_bytes)
        return self._make_ref(dtype, path, run, data_id, checksum)

    def get(self, dataset_type: str, *, run: str, instrument: str, visit: int | None = None,
            detector: int | None = None, snap: int | None = None) -> Any:
        """Read a dataset into memory (Exposure, BackgroundList, Table, dict or numpy array).

        Raises
        ------
        DatasetNotFoundError
            If the dataset or its provenance sidecar (written last) is missing.
        """
        dtype, path, data_id = self._locate(dataset_type, run=run, instrument=instrument, visit=visit,
                                            detector=detector, snap=snap)
        return self._read(dtype, path, f"dataset {dtype.name} {data_id} (run {run})", None)

    def _read(self, dtype: DatasetType, path: str, what: str, expected_checksum: str | None) -> Any:
        with self._wrapped("read", what, path, dtype.name):
            # The sidecar is written last: without it the write did not complete.
            sidecar = _json_loads(bytes(self.fs.cat_file(path + PROVENANCE_SUFFIX)))
            data = bytes(self.fs.cat_file(path))
        recorded_size = sidecar.get("size_bytes") if isinstance(sidecar, dict) else None
        if isinstance(recorded_size, int) and len(data) != recorded_size:
            with self._wrapped("read", what, path + PROVENANCE_SUFFIX, dtype.name):
                try:
                    now = _json_loads(bytes(self.fs.cat_file(path + PROVENANCE_SUFFIX)))
                except FileNotFoundError:
                    now = None
            if now != sidecar:  # another writer replaced it between our two reads: not damage
                raise TransientIOError(f"{what} at {self.url(path)} was being rewritten while read (retry)",
                                       dataset_type=dtype.name, uri=self.url(path))
            raise DatasetError(f"{what} at {self.url(path)} has {len(data)} bytes, not the {recorded_size} the store "
                               "wrote: it was changed outside the store (truncated or replaced). Restore it, or "
                               "write it again (re-ingest an input; delete a product and re-run)",
                               dataset_type=dtype.name, uri=self.url(path))
        if expected_checksum is not None and _checksum(data) != expected_checksum:
            raise DatasetError(f"{what} at {self.url(path)} does not have the bytes the store wrote (checksum "
                               "mismatch): it was changed outside the store, or since the reference was made. "
                               "Restore it, or write it again (re-ingest an input; delete a product and re-run)",
                               dataset_type=dtype.name, uri=self.url(path))
        with self._wrapped("decode", what, path, dtype.name):
            return get_format(dtype.storage).read(data)

    def get_ref(self, ref: DatasetRef, *, verify_checksum: bool = False) -> Any:
        """Read the dataset ``ref`` points to.

        ``verify_checksum=True`` checks the bytes against ``ref.checksum`` (about
        0.1-0.3 s for a 4k x 4k exposure) and raises :class:`DatasetError` if
        the dataset was overwritten since the reference was made.
        """
        dtype, path, data_id = self._locate(ref.dataset_type, run=ref.run, instrument=ref.instrument,
                                            visit=ref.visit, detector=ref.detector, snap=ref.snap)
        expected = ref.checksum if verify_checksum else None
        return self._read(dtype, path, f"dataset {dtype.name} {data_id} (run {ref.run})", expected)

    def exists(self, dataset_type: str, *, run: str, instrument: str, visit: int | None = None,
               detector: int | None = None, snap: int | None = None) -> bool:
        """True when the dataset and its provenance sidecar are both present (the write completed)."""
        dtype, path, data_id = self._locate(dataset_type, run=run, instrument=instrument, visit=visit,
                                            detector=detector, snap=snap)
        with self._wrapped("check", f"dataset {dtype.name} {data_id} (run {run})", path, dtype.name):
            return bool(self.fs.exists(path + PROVENANCE_SUFFIX) and self.fs.exists(path))

    def provenance(self, dataset_type: str, *, run: str, instrument: str, visit: int | None = None,
                   detector: int | None = None, snap: int | None = None) -> dict[str, Any]:
        """The provenance sidecar of a dataset as a dict."""
        dtype, path, data_id = self._locate(dataset_type, run=run, instrument=instrument, visit=visit,
                                            detector=detector, snap=snap)
        what = f"provenance of dataset {dtype.name} {data_id} (run {run})"
        with self._wrapped("read", what, path + PROVENANCE_SUFFIX, dtype.name):
            value = _json_loads(bytes(self.fs.cat_file(path + PROVENANCE_SUFFIX)))
            if not isinstance(value, dict):
                raise ValueError("provenance sidecar is not a JSON object")
            return value

    def ref(self, dataset_type: str, *, run: str, instrument: str, visit: int | None = None,
            detector: int | None = None, snap: int | None = None) -> DatasetRef:
        """Reference (with checksum) of an existing dataset; raises :class:`DatasetNotFoundError`."""
        dtype, path, data_id = self._locate(dataset_type, run=run, instrument=instrument, visit=visit,
                                            detector=detector, snap=snap)
        prov = self.provenance(dataset_type, run=run, instrument=instrument, visit=visit, detector=detector,
                               snap=snap)
        if not self.exists(dataset_type, run=run, instrument=instrument, visit=visit, detector=detector, snap=snap):
            raise DatasetNotFoundError(f"dataset {dtype.name} {data_id} (run {run}) not found at "
                                       f"{self.url(path)}", dataset_type=dtype.name, uri=self.url(path))
        return self._make_ref(dtype, path, run, data_id, str(prov.get("checksum")) if prov.get("checksum") else None)

    def cached_ref(self, dataset_type: str, *, cache_key: str, run: str, instrument: str, visit: int | None = None,
                   detector: int | None = None, snap: int | None = None) -> DatasetRef | None:
        """Reference of a dataset written under ``cache_key`` and unchanged since, else None.

        Unchanged: its size on disk is the size the store wrote (one ``stat``), so an output
        truncated or replaced outside the store is not taken for a finished product. One sidecar
        read, where ``exists`` + ``provenance`` + ``ref`` would read it twice.
        """
        where = {"run": run, "instrument": instrument, "visit": visit, "detector": detector, "snap": snap}
        if not self.exists(dataset_type, **where):
            return None
        prov = self.provenance(dataset_type, **where)
        if prov.get("cache_key") != cache_key or self.stored_size(dataset_type, **where) != prov.get("size_bytes"):
            return None
        dtype, path, data_id = self._locate(dataset_type, **where)
        return self._make_ref(dtype, path, run, data_id, str(prov.get("checksum")) if prov.get("checksum") else None)

    def version(self, dataset_type: str, *, run: str, instrument: str, visit: int | None = None,
                detector: int | None = None, snap: int | None = None) -> str:
        """Identity of the stored version of a dataset: ``<checksum>@<write time>``.

        Two writes of the same bytes are two versions: caches keyed on versions recompute
        everything downstream of a re-produced dataset, and nothing when nothing was rewritten.
        """
        prov = self.provenance(dataset_type, run=run, instrument=instrument, visit=visit, detector=detector,
                               snap=snap)
        return f"{prov.get('checksum')}@{prov.get('created_utc')}"

    def stored_size(self, dataset_type: str, *, run: str, instrument: str, visit: int | None = None,
                    detector: int | None = None, snap: int | None = None) -> int:
        """Bytes of the stored file as it is now (one ``stat``), to compare with the sidecar's ``size_bytes``."""
        dtype, path, data_id = self._locate(dataset_type, run=run, instrument=instrument, visit=visit,
                                            detector=detector, snap=snap)
        with self._wrapped("check", f"dataset {dtype.name} {data_id} (run {run})", path, dtype.name):
            return int(self.fs.size(path))

    def delete(self, dataset_type: str, *, run: str, instrument: str, visit: int | None = None,
               detector: int | None = None, snap: int | None = None) -> None:
        """Remove a dataset and its sidecar (sidecar first, so a half-deleted dataset reads as missing)."""
        dtype, path, data_id = self._locate(dataset_type, run=run, instrument=instrument, visit=visit,
                                            detector=detector, snap=snap)
        with self._wrapped("delete", f"dataset {dtype.name} {data_id} (run {run})", path, dtype.name):
            for p in (path + PROVENANCE_SUFFIX, path):
                if self.fs.exists(p):
                    self.fs.rm_file(p)

    def query(self, dataset_type: str, *, run: str, instrument: str | None = None, visit: int | None = None,
              detector: int | None = None) -> list[DatasetRef]:
        """Complete datasets of one type in ``run`` matching the given data-id values, sorted.

        Unset values match anything. One glob listing; the references carry no
        checksum (use :meth:`ref` for one).
        """
        dtype = get_dataset_type(dataset_type)
        ext = get_format(dtype.storage).extension
        parts = [_segment(run, "run"), dtype.name, _segment(instrument, "instrument") if instrument else "*"]
        patterns = {"visit": f"visit-{int(visit)}" if visit is not None else "visit-*",
                    "detector": f"det-{int(detector):03d}" if detector is not None else "det-*",
                    "snap": "snap-*"}
        parts += [patterns[d] for d in dtype.dimensions[1:]]
        pattern = f"{self.root_path}/{'/'.join(parts)}.{ext}"
        with self._wrapped("list", f"datasets {dtype.name} (run {run})", pattern, dtype.name):
            found = set(self.fs.glob(pattern))
            complete = {p[: -len(PROVENANCE_SUFFIX)] for p in self.fs.glob(pattern + PROVENANCE_SUFFIX)}
        regex = re.compile(
            re.escape(f"{self.root_path}/{run}/{dtype.name}/") + r"(?P<instrument>[^/]+)"
            + "".join({"visit": r"/visit-(?P<visit>\d+)", "detector": r"/det-(?P<detector>\d+)",
                       "snap": r"/snap-(?P<snap>\d+)"}[d] for d in dtype.dimensions[1:])
            + re.escape(f".{ext}") + "$"
        )
        refs = []
        for p in sorted(found & complete):
            m = regex.match(_strip(self.fs, p))
            if m is None:
                continue
            data_id = {k: (v if k == "instrument" else int(v)) for k, v in m.groupdict().items()}
            refs.append(self._make_ref(dtype, p, run, data_id, None))
        return sorted(refs, key=lambda r: (r.instrument, r.visit or 0, r.detector or 0, r.snap or 0))


def _strip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return str(fs._strip_protocol(path))


def _segment(value: str, what: str) -> str:
    if not _SAFE.match(str(value)) or str(value) in {".", ".."}:
        raise DatasetError(f"{what} {value!r} cannot be a storage key segment; use letters, digits and _.+- only")
    return str(value)
