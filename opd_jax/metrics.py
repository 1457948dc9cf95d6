"""Training metrics: JSON lines (the record), TensorBoard (to watch), PNG learning curves (to read).

In a local folder ``metrics.jsonl`` is appended one line per record. A Cloud Storage object cannot
be appended, so in a bucket :class:`MetricsLog` keeps the run's records in memory and replaces the
whole ``metrics.jsonl`` object at each :meth:`MetricsLog.flush`: before every checkpoint save (the
loop calls it), at most every ``flush_seconds`` otherwise, and on close. Why one object rewritten
rather than one object per flush merged later: an object upload replaces it atomically, so the
bucket always holds one complete, valid log that anyone can read during the run, a kill can leave
no half-merged pieces, and a resume (which drops records past its checkpoint) needs no merge. The
cost is the log's size per flush (about 300 bytes a step: 3 MB for 10,000 steps), which the flush
interval bounds. A kill loses only records after the last flush, and every flush precedes a
checkpoint save, so it loses only steps the resume recomputes. TensorBoard events are written to a
local temporary folder (tensorboardX's own GCS writer crashes) and uploaded whole at each flush.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence

from opd_jax import storage

__all__ = ["MetricsLog", "plot_curves", "read_jsonl"]


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """All records of a metrics file (a missing file is empty; a cut-off last line is skipped)."""
    path = storage.as_path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
            # The last line of a process killed in the middle of a write: it is regenerated.
    return records


class MetricsLog:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard
    (in a bucket: keeps the records and replaces the object at each :meth:`flush`, see the module
    docstring).

    The records always agree with the checkpoint the run continues from. On resume from
    ``resume_step``, records of later steps (written after that checkpoint, before an
    interruption) are dropped, since training regenerates them, and TensorBoard is told to purge
    its events from step ``resume_step + 1`` on; earlier records are kept. A fresh start
    (``resume_step=None``) drops every record of an earlier attempt that never reached a
    checkpoint, and purges TensorBoard from step 0.
    """

    def __init__(self, directory: str | pathlib.Path, *, resume_step: int | None = None, tensorboard: bool = True,
                 flush_seconds: float = 60.0):
        self.directory = storage.as_path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self.remote = storage.is_remote(self.directory)
        self._flush_seconds = flush_seconds
        self._flushed_at = time.monotonic()
        kept = []
        if self.path.is_file():
            kept = [] if resume_step is None else [r for r in read_jsonl(self.path) if r.get("step", -1) <= resume_step]
            storage.write_bytes(self.path, _lines(kept))
        self._records = kept if self.remote else None  # the whole log, for a bucket
        self._tensorboard = None
        self._tensorboard_local = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            events, suffix = self.directory / "tensorboard", ""
            if self.remote:
                self._tensorboard_local = tempfile.mkdtemp(prefix="opd_jax_tensorboard_")
                # Event files are named by second and host: the process id keeps two sessions of
                # one second apart once uploaded into one folder (a random tag, two in one process).
                events, suffix = self._tensorboard_local, f".{os.getpid()}.{os.urandom(4).hex()}"
            # purge_step writes a session-start event: TensorBoard drops the older events of
            # every step from there on, so a resumed run shows each step once.
            self._tensorboard = SummaryWriter(str(events), purge_step=0 if resume_step is None else resume_step + 1,
                                              filename_suffix=suffix)

    def write(self, step: int, values: dict[str, float]) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        if self._records is not None:
            self._records.append(record)
        else:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
        if self.remote and time.monotonic() - self._flushed_at > self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Make every record written so far durable in the folder (in a bucket: replace
        ``metrics.jsonl`` and upload the TensorBoard events; locally lines are appended already)."""
        self._flushed_at = time.monotonic()
        if self._tensorboard is not None:
            self._tensorboard.flush()
        self._upload()

    def _upload(self) -> None:
        if not self.remote:
            return
        storage.write_bytes(self.path, _lines(self._records))
        if self._tensorboard_local is not None:
            storage.copy_tree(self._tensorboard_local, self.directory / "tensorboard")

    def close(self) -> None:
        """Write the last records and events; a second close (or a flush after it) writes nothing."""
        writer, self._tensorboard = self._tensorboard, None
        if writer is not None:
            writer.close()
        self._upload()
        if self._tensorboard_local is not None:
            shutil.rmtree(self._tensorboard_local, ignore_errors=True)
            self._tensorboard_local = None
        self.remote = False


def _lines(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _plain(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def plot_curves(
    runs: dict[str, Iterable[dict]],
    keys: Sequence[str],
    path: str | pathlib.Path,
    *,
    title: str | None = None,
) -> None:
    """One panel per metric key, one line per run, saved as a PNG.

    Args:
      runs: run label -> its metric records (``{"step": …, key: …}``).
      keys: metrics to plot; records without a key are skipped for that panel.
      path: output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    # Past ten runs the default colour cycle repeats; tab20 keeps up to twenty lines apart.
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    for axis, key in zip(axes.flat, keys):
        for index, (label, records) in enumerate(runs.items()):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, label=label, color=colours[index % len(colours)],
                          marker="o" if len(points) < 12 else None, markersize=3)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    path = storage.as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.savefig(figure, path, dpi=110)
    plt.close(figure)
