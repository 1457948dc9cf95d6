"""Paths: local files and Cloud Storage URLs (``gs://bucket/key``), as one type.

Every path the library takes (model folders, prompt and evaluation files, config files, the run
folder) goes through :func:`as_path`, which returns an ``etils.epath.Path``: the path type orbax
itself uses, so checkpoints, metrics and models take the same object end to end. ``pathlib`` turns
``gs://b/x`` into the local path ``gs:/b/x``; :func:`as_path` reads that form back as the URL, so no
local folder named ``gs:`` is ever created. Other schemes are refused by name: orbax turned
``s3://b/x`` into ``s3:/b/x`` in our trial, so s3 is not offered.

Credentials. ``STORAGE_EMULATOR_HOST`` (the variable of Google's own clients) sends every ``gs://``
access to that server with no credentials: gcsfs and google-cloud-storage read it themselves, and
:func:`configure` points tensorstore (orbax's checkpoint I/O) at it too. Without it the usual
application-default credentials apply; :func:`check_bucket` says when there are none, naming the URL,
before anything is written.

:class:`ObjectLock` is the run folder's lock in a bucket: an object created only if absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from etils import epath

from opd_jax.errors import InputError, RunFolderError

__all__ = ["DEFAULT_LEASE_SECONDS", "ObjectLock", "SCHEMES", "as_path", "check_bucket", "configure", "copy_tree",
           "is_remote", "local_copy", "move_tree", "size", "write_bytes"]

SCHEMES = "local paths and gs:// (Cloud Storage) URLs"
DEFAULT_LEASE_SECONDS = 300.0
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# What pathlib makes of gs://bucket/key: one slash after the colon.
_MANGLED_GS = re.compile(r"^gs:/(?=[^/])")
# ... and of s3://bucket/key, http://host/x: refused by scheme rather than taken as a local folder "s3:".
_MANGLED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?=[^/])")


def as_path(value: str | os.PathLike, *, what: str = "path") -> epath.Path:
    """``value`` as an ``epath.Path``: a local path, or a ``gs://`` URL (also in the ``gs:/b/x`` form
    that ``pathlib.Path("gs://b/x")`` produces).

    Args:
      what: how an error names the value (a flag such as ``"--output"``).

    Raises:
      InputError: another scheme (``s3://``, ``http://`` …), or a ``gs://`` URL without a bucket.
    """
    text = os.fspath(value)
    text = _MANGLED_GS.sub("gs://", text)
    mangled = _MANGLED_URL.match(text)
    if mangled and not _URL.match(text):
        text = f"{mangled.group(1)}://{text[mangled.end():]}"
    match = _URL.match(text)
    if match is None:
        if text.startswith("gs:"):
            raise InputError(f"{what} {text}: not a Cloud Storage URL; write gs://BUCKET/PATH")
        return epath.Path(text)
    scheme = match.group(1).lower()
    if scheme == "file":
        return epath.Path(text[len("file://"):])
    if scheme != "gs":
        raise InputError(f"{what} {text}: the scheme {scheme}:// is not supported; opd-jax takes {SCHEMES}")
    if not text[len("gs://"):].split("/", 1)[0]:
        raise InputError(f"{what} {text}: no bucket; write gs://BUCKET/PATH")
    configure()
    try:
        import gcsfs  # noqa: F401 - epath's Cloud Storage backend
        import google.cloud.storage  # noqa: F401 - the run lock's conditional uploads
    except ImportError:
        raise InputError(f"{what} {text}: gs:// needs gcsfs and google-cloud-storage; "
                         "pip install 'opd-jax[gcs]'") from None
    return epath.Path(text)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``gs://`` URL (in either form :func:`as_path` accepts)."""
    text = os.fspath(path)
    return text.startswith("gs://") or bool(_MANGLED_GS.match(text))


def bucket_of(path: str | os.PathLike) -> str:
    return os.fspath(as_path(path))[len("gs://"):].split("/", 1)[0]


def configure() -> None:
    """Point every client at ``STORAGE_EMULATOR_HOST`` when it is set (idempotent; values the user
    set are kept).

    gcsfs and google-cloud-storage follow the variable themselves. tensorstore follows
    ``TENSORSTORE_GCS_HTTP_URL`` and, with ``GOOGLE_AUTH_TOKEN_FOR_TESTING``, needs no credentials.
    gcsfs asks the storage-layout API (which emulators lack) what kind of bucket it has and warns
    on every call when it cannot tell; the experimental feature that asks is switched off for an
    emulator (before gcsfs is imported: it reads the variable once).
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        url = host if "://" in host else f"http://{host}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # Even without an emulator the message is about an optional gcsfs feature, not the run.
    logging.getLogger("gcsfs").addFilter(_drop_bucket_type_warning)
    # Several processes and hosts write one run folder: a listing gcsfs cached in one process would
    # hide the objects another wrote since (a lock, metrics.jsonl, a checkpoint). Set before epath
    # creates its file system (the user's own setting wins).
    import fsspec

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def _drop_bucket_type_warning(record: logging.LogRecord) -> bool:
    return "Could not determine bucket type" not in record.getMessage()


def _client():
    configure()
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    return storage.Client()


def check_bucket(path: str | os.PathLike, *, what: str = "path") -> None:
    """For a ``gs://`` path: credentials are there and its bucket exists (reads only; a local path
    passes).

    Raises:
      InputError: no application-default credentials (and no emulator), or no such bucket; the
        message names the URL.
    """
    if not is_remote(path):
        return
    url, bucket = os.fspath(as_path(path)), bucket_of(path)
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            google.auth.default()
        except DefaultCredentialsError:
            raise InputError(
                f"{what} {url}: no Google Cloud credentials; run `gcloud auth application-default login` or set "
                "GOOGLE_APPLICATION_CREDENTIALS (or STORAGE_EMULATOR_HOST for an emulator); nothing was written"
            ) from None
    try:
        found = _client().lookup_bucket(bucket)
    except Exception as error:  # noqa: BLE001 - a refused connection, a permission error …
        raise InputError(f"{what} {url}: cannot reach bucket {bucket} ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]}); nothing was written") from None
    if found is None:
        raise InputError(f"{what} {url}: bucket {bucket} does not exist (or these credentials cannot see it); "
                         "create it or fix the URL; nothing was written")


def size(path: epath.Path) -> int:
    """A file's size in bytes (local or in a bucket)."""
    path = as_path(path)
    return path.stat().length if is_remote(path) else os.stat(path).st_size


def write_bytes(path: epath.Path, data: bytes) -> None:
    """Write a file whole. A local file is replaced atomically (through a temporary file); a
    Cloud Storage object is replaced atomically by its upload."""
    if is_remote(path):
        path.write_bytes(data)
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def copy_tree(source: epath.Path, target: epath.Path) -> None:
    """Copy every file under ``source`` to the same place under ``target`` (local or bucket, either way)."""
    source, target = as_path(source), as_path(target)
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            copy_tree(entry, target / entry.name)
        else:
            (target / entry.name).write_bytes(entry.read_bytes())


def move_tree(source: epath.Path, target: epath.Path) -> None:
    """Move a folder: a rename on a local disk; a copy and delete in a bucket (which has no folders
    to rename)."""
    if not is_remote(source) and not is_remote(target):
        shutil.move(source, target)
        return
    copy_tree(source, target)
    as_path(source).rmtree()


@contextlib.contextmanager
def local_copy(folder: epath.Path, names: Iterable[str]) -> Iterator[epath.Path]:
    """A local folder holding ``folder``'s files ``names`` (those present): ``folder`` itself when it
    is local, else a temporary copy removed on exit.

    transformers loads tokenizers from local folders only, so the (small) tokenizer files of a
    model in a bucket are copied to a temporary folder first; the weights never are.
    """
    folder = as_path(folder)
    if not is_remote(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="opd_jax_") as local:
        for name in names:
            source = folder / name
            if source.is_file():
                (epath.Path(local) / name).write_bytes(source.read_bytes())
        yield epath.Path(local)


# --- the lock object ----------------------------------------------------------------------------


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


@dataclasses.dataclass
class ObjectLock:
    """A run folder's lock in a bucket, held by one process on one host at a time.

    The lock is the object ``<folder>/<name>``, created only if absent (``ifGenerationMatch=0``: the
    bucket refuses the second of two concurrent creations). It names its holder (``host``, ``pid``,
    ``run`` identity digest, ``started``) and a lease end (``expires``), which a thread of the holder
    renews every quarter lease (each renewal conditional on the generation it wrote last, so a lock
    taken over is never overwritten). A lock found held is taken over (conditionally on the
    generation read, so two contenders cannot both win) when:

    - it names this host and a process that no longer runs (a killed run, resumed on the same host:
      at once), or
    - its lease has run out (a run killed on another host: after at most ``lease_seconds``).

    Otherwise the constructor raises, naming the holder and the end of its lease. A takeover is
    reported on stderr.

    Args:
      folder: the run folder (``gs://…``).
      run: the run's identity digest (recorded, for people reading the lock).
      lease_seconds: how long a lock outlives its last renewal.
      name: the lock object's name in the folder.
    """

    folder: epath.Path
    run: str = ""
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    name: str = ".opd_jax.lock"
    generation: int | None = dataclasses.field(default=None, repr=False)
    took_over: dict | None = None
    lost: str | None = None

    def __post_init__(self):
        from google.api_core import exceptions

        if self.lease_seconds <= 0:
            raise InputError(f"--lock-lease must be > 0 seconds, got {self.lease_seconds}")
        self.folder = as_path(self.folder)
        bucket, _, prefix = os.fspath(self.folder)[len("gs://"):].partition("/")
        self._blob_name = f"{prefix.rstrip('/')}/{self.name}" if prefix.strip("/") else self.name
        self._bucket = _client().bucket(bucket)
        self.started = _now()
        self._stop = threading.Event()
        condition = 0
        for _ in range(5):  # a contender may take over or release between our reads
            try:
                self._write(condition)
                break
            except exceptions.PreconditionFailed:
                holder, generation = self._read()
                if generation is None:  # released in between: try to create it again
                    condition = 0
                    continue
                reason = self._stale(holder)
                if reason is None:
                    raise _held(self.folder, holder)
                self.took_over = {**holder, "reason": reason}
                condition = generation
        else:
            raise InputError(f"{self.folder}: could not take the run lock {self.url} (it changed hands five times "
                             "while we tried); try again")
        if self.took_over:
            print(f"opd-jax: took over the run lock {self.url} from {_holder_text(self.took_over)}: "
                  f"{self.took_over['reason']}", file=sys.stderr)
        self._renewer = threading.Thread(target=self._renew_loop, name="opd_jax_lock_renewal", daemon=True)
        self._renewer.start()

    @property
    def url(self) -> str:
        return f"gs://{self._bucket.name}/{self._blob_name}"

    def record(self) -> dict[str, Any]:
        renewed = _now()
        return {"host": socket.gethostname(), "pid": os.getpid(), "run": self.run, "started": _iso(self.started),
                "started_unix": self.started, "renewed_unix": renewed, "lease_seconds": self.lease_seconds,
                "expires_unix": renewed + self.lease_seconds, "expires": _iso(renewed + self.lease_seconds)}

    def _write(self, if_generation_match: int) -> None:
        blob = self._bucket.blob(self._blob_name)
        # A JSON-API multipart upload: the one kind of upload on which servers (and fake-gcs-server)
        # honour ifGenerationMatch; a small string is sent that way.
        blob.upload_from_string(json.dumps(self.record(), indent=1) + "\n", content_type="application/json",
                                if_generation_match=if_generation_match)
        self.generation = blob.generation

    def _read(self) -> tuple[dict, int | None]:
        from google.api_core import exceptions

        blob = self._bucket.blob(self._blob_name)
        try:
            text = blob.download_as_bytes()
        except exceptions.NotFound:
            return {}, None
        try:
            holder = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            holder = {}
        return (holder if isinstance(holder, dict) else {}), blob.generation

    def _stale(self, holder: dict) -> str | None:
        """Why ``holder``'s lock may be taken over, or ``None`` while it holds."""
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if holder["pid"] == os.getpid():
                return None
            if not _process_runs(holder["pid"]):
                return f"process {holder['pid']} on this host no longer runs"
        expires = holder.get("expires_unix")
        if not isinstance(expires, (int, float)):
            return "the lock object is damaged (no lease end)"
        if _now() > expires:
            return f"its lease ran out at {_iso(expires)}"
        return None

    def _renew_loop(self) -> None:
        from google.api_core import exceptions

        while not self._stop.wait(self.lease_seconds / 4):
            try:
                self._write(self.generation)
            except exceptions.PreconditionFailed:
                holder, _ = self._read()
                self.lost = f"taken over by {_holder_text(holder)}" if holder else "deleted by someone else"
                print(f"opd-jax: warning: lost the run lock {self.url} ({self.lost}); another run may now be "
                      f"writing to {self.folder}", file=sys.stderr)
                return
            except Exception as error:  # noqa: BLE001 - a network error: try again at the next renewal
                print(f"opd-jax: warning: could not renew the run lock {self.url} ({type(error).__name__}); "
                      "retrying", file=sys.stderr)

    def release(self, *, undo: bool = False) -> None:
        """Stop renewing and delete the lock object (if it is still ours). ``undo`` is accepted for
        the local lock's interface: a bucket has no folder to remove."""
        from google.api_core import exceptions

        if self._stop.is_set():
            return
        self._stop.set()
        self._renewer.join()
        if self.lost is None and self.generation is not None:
            with contextlib.suppress(exceptions.PreconditionFailed, exceptions.NotFound):
                self._bucket.blob(self._blob_name).delete(if_generation_match=self.generation)

    def __enter__(self) -> ObjectLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_text(holder: dict) -> str:
    return (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (run {str(holder.get('run', ''))[:12]}"
            f", started {holder.get('started', '?')})")


def _held(folder: epath.Path, holder: dict) -> InputError:
    return RunFolderError(
        f"{folder} is in use by another opd-jax run: {_holder_text(holder)} holds its lock, with a lease until "
        f"{holder.get('expires', '?')}; wait for it to finish (or for the lease to run out, if it was killed on "
        "another host) or choose another --output; nothing was written")


def savefig(figure, path: epath.Path, **options) -> None:
    """Save a matplotlib figure to a local path or a bucket."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=os.path.splitext(os.fspath(path))[1][1:] or "png", **options)
    as_path(path).write_bytes(buffer.getvalue())
