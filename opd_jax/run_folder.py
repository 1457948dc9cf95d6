"""What a run folder was started from, and who is using it.

A run resumes from the checkpoints in its folder, so resuming it with another teacher, student,
tokenizer or prompt file would silently mix two runs. :func:`compute_identity` digests those inputs
(file bytes, SHA-256) and the prompt options; :func:`check_identity` compares them with the record
(``run_identity.json``) written when the run started and refuses, naming every change, without
touching the folder. :class:`RunLock` holds an exclusive ``flock`` on ``.opd_jax.lock`` in the
folder for the whole run, so a second process on the same folder fails at once. A run folder in a
bucket (``gs://``) has the same layout; its lock is an object created only if absent
(:class:`opd_jax.storage.ObjectLock`, with a lease), see :func:`acquire_lock`.

Folder paths are recorded but not compared: moving a checkpoint folder does not change a run.

Which folders are ours (:func:`folder_state`): a folder that holds ``run_identity.json``, or a run
from before identities were recorded (``checkpoints/`` of our layout beside a ``config.json`` that
parses as a training configuration). A missing or empty folder becomes a new run. Any other
non-empty folder (a model folder, a project) is refused, so ``--output`` never overwrites files
that are not ours.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
from typing import Any

from opd_jax import storage
from opd_jax.errors import RunFolderError
from opd_jax.tokenization import TOKENIZER_FILES

__all__ = ["IDENTITY_FILE", "LOCK_FILE", "RunFolder", "RunFolderError", "RunLock", "acquire_lock", "check_identity",
           "check_output_folder",
           "compute_identity", "folder_digests", "folder_state", "identity_changes", "weight_files", "write_identity"]

IDENTITY_FILE = "run_identity.json"
LOCK_FILE = ".opd_jax.lock"
_FORMAT = 1
_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(folder: str | pathlib.Path) -> list[str]:
    """Names of a checkpoint folder's weight files: ``config.json`` and the safetensors (one file,
    or the index and every shard it lists). Reads only the index.

    Raises:
      FileNotFoundError: no safetensors, or a shard the index lists is missing (named).
      ValueError: an index that is not a safetensors index.
    """
    folder = storage.as_path(folder)
    names = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map')") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists {', '.join(missing)}, missing from {folder}")
        return names + shards
    if not (folder / "model.safetensors").is_file():
        found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
        raise FileNotFoundError(
            f"no weights in {folder}: expected model.safetensors or model.safetensors.index.json with its shards"
            + (f" (found {', '.join(found)})" if found else "")
        )
    return names


def folder_digests(folder: str | pathlib.Path, kind: str) -> dict[str, str]:
    """``{file name: sha256}`` of a checkpoint folder's ``"weights"`` (see :func:`weight_files`) or
    ``"tokenizer"`` files (every tokenizer file present)."""
    folder = storage.as_path(folder)
    if kind == "tokenizer":
        names = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    elif kind == "weights":
        names = weight_files(folder)
    else:
        raise ValueError(f"kind must be 'weights' or 'tokenizer', got {kind!r}")
    return {name: _sha256(folder / name) for name in names}


def compute_identity(teacher: str | pathlib.Path | dict[str, str | pathlib.Path], student: str | pathlib.Path,
                     prompts: str | pathlib.Path, prompt_options: dict[str, Any]) -> dict[str, Any]:
    """The digests that define which inputs a run was started from.

    Args:
      teacher, student: checkpoint folders; ``teacher`` may be a ``{name: folder}`` dict of several
        (recorded as ``teacher:NAME`` each).
      prompts: the prompt file.
      prompt_options: how the prompts were turned into tokens (JSON-able values), e.g.
        ``{"max_prompt_length": 256, "chat_template": True}``.

    Returns:
      a JSON-able record; hashing reads every byte of the weights once.
    """
    models = {"teacher": teacher} if not isinstance(teacher, dict) else {f"teacher:{n}": p for n, p in teacher.items()}
    models["student"] = student
    return {
        "format": _FORMAT,
        **{side: {"path": _recorded(folder), "weights": folder_digests(folder, "weights"),
                  "tokenizer": folder_digests(folder, "tokenizer")} for side, folder in models.items()},
        "prompts": {"path": _recorded(prompts), "sha256": _sha256(storage.as_path(prompts))},
        "prompt_options": dict(prompt_options),
    }


def _recorded(path) -> str:
    """A path as recorded: absolute when local, the URL when in a bucket."""
    path = storage.as_path(path)
    return str(path if storage.is_remote(path) else path.resolve())


def identity_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identity records (paths ignored)."""
    changes = []
    sides = sorted(side for side in recorded.keys() | current.keys() if side.startswith("teacher")) + ["student"]
    for side in sides:
        if side not in recorded or side not in current:
            changes.append(f"{side} {'added' if side not in recorded else 'removed'}")
            continue
        for kind in ("weights", "tokenizer"):
            old, new = recorded[side].get(kind, {}), current[side][kind]
            files = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
            if files:
                detail = ", ".join(
                    f"{name} {'added' if name not in old else 'removed' if name not in new else 'differs'}"
                    for name in files
                )
                changes.append(f"{side} {kind} ({detail})")
    old_prompts = recorded.get("prompts", {}).get("sha256")
    if old_prompts != current["prompts"]["sha256"]:
        changes.append(f"prompt file (sha256 {str(old_prompts)[:12]}… then, {current['prompts']['sha256'][:12]}… now)")
    old_options = recorded.get("prompt_options", {})
    for key in sorted(old_options.keys() | current["prompt_options"].keys()):
        if old_options.get(key) != current["prompt_options"].get(key):
            changes.append(f"prompt option {key} ({old_options.get(key)!r} then, "
                           f"{current['prompt_options'].get(key)!r} now)")
    return changes


def check_identity(output: str | pathlib.Path, identity: dict[str, Any]) -> str:
    """Compare ``identity`` with the record in ``output``; reads only.

    Returns:
      ``"new"`` (no run there yet: record it), ``"same"`` (resume) or ``"unrecorded"`` (a run
      started before identities were recorded: it cannot be checked).

    Raises:
      RunFolderError: the folder's run was started from other inputs (every change named), its
        record cannot be read, or the folder is not a run (:func:`folder_state`).
    """
    output = storage.as_path(output)
    record_path = output / IDENTITY_FILE
    state = folder_state(output)
    if state != "recorded":
        return state
    try:
        recorded = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{record_path} is damaged ({error}); cannot tell which inputs the run in "
                             f"{output} was started from") from None
    changes = identity_changes(recorded, identity)
    if changes:
        raise RunFolderError(
            f"{output} holds a run started from other inputs; changed: {'; '.join(changes)}. Resume it with "
            f"the inputs it was started from (recorded in {record_path}) or choose another --output; nothing "
            f"in {output} was changed"
        )
    return "same"


def folder_state(output: str | pathlib.Path) -> str:
    """Whether ``output`` is ours to write (reads only; see the module docstring for the rule).

    Returns:
      ``"new"`` (missing, empty, or holding only the lock a refused run left), ``"recorded"`` (holds
      ``run_identity.json``) or ``"unrecorded"`` (a run from before identities were recorded).

    Raises:
      RunFolderError: a non-empty folder that is not a run; the message names a file in it.
    """
    output = storage.as_path(output)
    if not output.is_dir():
        return "new"
    if (output / IDENTITY_FILE).is_file():
        return "recorded"
    names = sorted(entry.name for entry in output.iterdir())
    if not [name for name in names if name != LOCK_FILE]:
        return "new"
    if _is_checkpoint_folder(output / "checkpoints") and _is_training_config(output / "config.json"):
        return "unrecorded"
    example = next((name for name in names if name in ("config.json", "metrics.jsonl")), None)
    example = example or next(name for name in names if name != LOCK_FILE)
    raise RunFolderError(
        f"--output {output} is not an opd-jax run folder (it holds {example}"
        f"{f' and {len(names) - 1} other entries' if len(names) > 1 else ''}, but no {IDENTITY_FILE}, nor "
        "checkpoints/ beside a training config.json) and would be overwritten; choose an empty or new folder"
    )


def _is_checkpoint_folder(folder: pathlib.Path) -> bool:
    """``checkpoints/`` as :class:`opd_jax.checkpoint.CheckpointStore` lays it out: numbered steps,
    saves a kill interrupted, the quarantine (empty too: a run killed before its first save)."""
    from opd_jax.checkpoint import QUARANTINE

    return folder.is_dir() and all(
        entry.is_dir() and (entry.name.isdigit() or ".orbax-checkpoint-tmp" in entry.name or entry.name == QUARANTINE)
        for entry in folder.iterdir())


def _is_training_config(path: pathlib.Path) -> bool:
    """``config.json`` as :class:`RunFolder` writes it: a JSON object of training-config sections, or
    flat as earlier versions wrote it. Fields may have changed between versions, so a flat file
    counts when most of its keys are training options (a model's or a project's has none)."""
    from opd_jax.config import SECTIONS, TrainConfig

    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(values, dict) or not values:
        return False
    if all(key in SECTIONS and isinstance(section, dict) for key, section in values.items()):
        return True
    options = {field.name for field in dataclasses.fields(TrainConfig)}
    return 2 * len(options.intersection(values)) > len(values)


def write_identity(output: str | pathlib.Path, identity: dict[str, Any]) -> None:
    """Record ``identity`` in ``output`` (atomically: a partial record is never left)."""
    storage.write_bytes(storage.as_path(output) / IDENTITY_FILE,
                        (json.dumps(identity, indent=2, sort_keys=True) + "\n").encode())


def check_output_folder(output: str | pathlib.Path, model_folders: dict[str, str | pathlib.Path] | None = None) -> None:
    """Refuse an ``--output`` that cannot hold a run folder, before anything is written.

    Args:
      model_folders: ``{flag: folder}`` of the run's models (``{"--student": ...}``), which the run
        folder may not be, contain or lie inside.

    Raises:
      RunFolderError: it is a file, lies under a file, overlaps a model folder, is a non-empty
        folder that is not a run (:func:`folder_state`), or it (or the folder it would be created
        in) is not writable.
    """
    output = storage.as_path(output, what="--output")
    if storage.is_remote(output):
        storage.check_bucket(output, what="--output")
    if output.exists() and not output.is_dir():
        raise RunFolderError(f"--output {output} is a file; give a folder (it is created if missing)")
    _check_apart(output, model_folders or {})
    folder_state(output)
    if storage.is_remote(output):  # objects need no parent folder; the bucket is there
        return
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"--output {output} cannot be created: {existing} is a file")
    if not _writable(existing):
        what = "is" if existing == output else f"would be created in {existing}, which is"
        raise RunFolderError(f"--output {output} {what} not writable; give a folder you can write to")


def _check_apart(output: pathlib.Path, model_folders: dict[str, str | pathlib.Path]) -> None:
    """The run folder writes ``config.json`` and ``student/``: inside a model folder (or around one)
    it would overwrite or mix with the model's files."""
    resolved = storage.as_path(_recorded(output))
    for flag, folder in model_folders.items():
        model = storage.as_path(_recorded(folder))
        relation = ("is" if resolved == model else "lies inside" if model in resolved.parents
                    else "contains" if resolved in model.parents else None)
        if relation:
            raise RunFolderError(f"--output {output} {relation} the {flag} folder {folder}; choose a run folder "
                                 "apart from the model folders")


def _writable(folder: pathlib.Path) -> bool:
    # os.access says yes to root on a read-only mount; creating (and removing) a file is the test
    # that answers for every user and file system.
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        descriptor = os.open(folder / f".opd_jax_write_test.{os.getpid()}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:
        return False
    os.close(descriptor)
    os.unlink(folder / f".opd_jax_write_test.{os.getpid()}")
    return True


@dataclasses.dataclass
class RunLock:
    """An exclusive, non-blocking lock on a run folder (``flock`` on ``LOCK_FILE`` in it).

    The lock belongs to this open file: it is released by :meth:`release`, on ``with`` exit, or by
    the operating system when the process ends (even by SIGKILL), so a crashed run never leaves a
    stale lock. The lock file stays in the folder, empty; the holder is found through
    ``/proc/locks`` (Linux) for the error message.

    Raises (on construction):
      RunFolderError: another process holds the lock.
    """

    folder: pathlib.Path
    _descriptor: int | None = dataclasses.field(default=None, repr=False)
    created_lock_file: bool = False
    created_folder: bool = False

    def __post_init__(self):
        self.folder = pathlib.Path(self.folder)
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True)
            self.created_folder = True
        path = self.folder / LOCK_FILE
        self.created_lock_file = not path.exists()
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise RunFolderError(
                f"{self.folder} is in use by another opd-jax run{f' (process {holder})' if holder else ''}: "
                f"it holds the lock on {path}; wait for it to finish or choose another --output"
            ) from None
        self._descriptor = descriptor

    def release(self, *, undo: bool = False) -> None:
        """Release the lock; with ``undo``, also remove the lock file and folder if this lock created them
        (for a run refused before it wrote anything)."""
        if self._descriptor is None:
            return
        if undo and self.created_lock_file:
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = None
        if undo and self.created_folder:
            try:
                self.folder.rmdir()
            except OSError:  # not empty: something was written after all; keep it
                pass

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_lock(folder, *, run: str = "", lease_seconds: float = storage.DEFAULT_LEASE_SECONDS):
    """The run folder's lock: :class:`RunLock` (``flock``) for a local folder,
    :class:`opd_jax.storage.ObjectLock` (an object created only if absent, renewed within
    ``lease_seconds``) for a folder in a bucket. Both are released with ``release()``.

    Args:
      run: the run's identity digest, recorded in a bucket's lock object for whoever reads it.

    Raises:
      RunFolderError: another run holds it (named, in a bucket with the end of its lease).
    """
    folder = storage.as_path(folder)
    if storage.is_remote(folder):
        return storage.ObjectLock(folder, run=run, lease_seconds=lease_seconds, name=LOCK_FILE)
    return RunLock(folder)


def _lock_holder(descriptor: int) -> int | None:
    """The process id holding a ``flock`` on the file open as ``descriptor`` (Linux), else ``None``."""
    try:
        inode = os.fstat(descriptor).st_ino
        for line in pathlib.Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 12345 08:01:123456 0 EOF"; blocked waiters have a "->" field.
            if len(fields) >= 6 and fields[1] == "FLOCK" and "->" not in fields:
                if int(fields[5].rsplit(":", 1)[1]) == inode:
                    return int(fields[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


class RunFolder:
    """A training run's output folder: the config guard, the metrics log, the export and the curves.

    ``config.json`` (by section), ``metrics.jsonl`` / ``tensorboard/``, ``curves.png`` and the
    exported ``student/`` are written by the ``writer`` process only (process 0 of a multi-process
    run); the others compute the same records and write nothing. Checkpoints are not this object's:
    :class:`opd_jax.checkpoint.CheckpointStore` writes them (with every process).

    Args:
      path: the folder (created on :meth:`start`).
      config: the run's :class:`opd_jax.config.TrainConfig`.
      writer: whether this process writes.
    """

    def __init__(self, path: str | pathlib.Path, config, *, writer: bool = True):
        self.path = storage.as_path(path)
        self.config = config
        self.writer = writer
        self._log = None

    @property
    def metrics_path(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    def check_resumable(self) -> None:
        """Refuse a folder that is not a run (:func:`folder_state`), or whose checkpoints were made
        under options this run would change (reads only).

        Only fields a resume depends on count (not :data:`opd_jax.config.RESUME_FREE`; ``steps`` does
        under a cosine schedule), and only when there is a checkpoint to resume from: a run that failed
        before its first checkpoint may be re-run with any fix. A field the record lacks (a run of an
        older version) counts as its default.
        """
        from opd_jax.config import RESUME_FREE, TrainConfig, flatten_sections

        folder_state(self.path)  # a folder that is not a run (a model, a project) is never written into
        config_path = self.path / "config.json"
        checkpoints = self.path / "checkpoints"
        has_checkpoints = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
        if not config_path.is_file() or not has_checkpoints:
            return
        current = self.config.to_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        try:
            previous = {**defaults, **flatten_sections(json.loads(config_path.read_text()))}
        except (json.JSONDecodeError, ValueError) as error:
            raise RunFolderError(f"{config_path} cannot be read as a training configuration ({error}); choose "
                                 "another output directory") from None
        free = set(RESUME_FREE) - ({"steps"} if self.config.schedule == "cosine" else set())
        changed = sorted(k for k in current if k not in free and previous.get(k) != current[k])
        if changed:
            raise RunFolderError(
                f"{self.path} holds a run with a different configuration (differs in {changed}); choose another "
                f"output directory (a resume may change only {', '.join(sorted(free))})"
            )

    def start(self, resume_step: int | None) -> None:
        """Write ``config.json`` and open the metrics log, continuing from ``resume_step`` (or fresh)."""
        from opd_jax.metrics import MetricsLog

        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        self._log = MetricsLog(self.path, resume_step=resume_step)

    def log(self, step: int, record: dict[str, float]) -> None:
        if self._log is not None:
            self._log.write(step, record)

    def flush(self) -> None:
        """Make the records logged so far durable (called before each checkpoint save: in a bucket
        the metrics are uploaded at flushes only, see :mod:`opd_jax.metrics`)."""
        if self._log is not None:
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def history(self) -> list[dict]:
        """Every metric record written so far (readable by every process once the writer closed the log)."""
        from opd_jax.metrics import read_jsonl

        return read_jsonl(self.metrics_path)

    def export(self, student, student_config, *, dtype=None) -> None:
        """The student as a Hugging Face folder in ``student/`` (see :func:`opd_jax.models.save_pretrained`)."""
        from opd_jax.models import save_pretrained

        if self.writer:
            save_pretrained(student, student_config, self.path / "student", dtype=dtype)

    def plot(self, history: list[dict], label: str = "") -> None:
        """``curves.png``: the teacher-KL, evaluation and loss curves that the records hold."""
        from opd_jax.metrics import plot_curves

        if not self.writer:
            return
        keys = [k for k in ("teacher_kl", "eval_accuracy", "response_length", "loss", "grad_norm", "clip_fraction")
                if any(k in r for r in history)]
        plot_curves({label or "run": history}, keys, self.path / "curves.png", title=label or None)
