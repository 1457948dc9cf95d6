"""Training metrics: JSON lines (the record), TensorBoard (to watch), PNG learning curves (to read)."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterable, Sequence

__all__ = ["MetricsLog", "plot_curves", "read_jsonl"]


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """All records of a metrics file (a missing file is empty; a cut-off last line is skipped)."""
    path = pathlib.Path(path)
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
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    The records always agree with the checkpoint the run continues from. On resume from
    ``resume_step``, records of later steps (written after that checkpoint, before an
    interruption) are dropped, since training regenerates them, and TensorBoard is told to purge
    its events from step ``resume_step + 1`` on; earlier records are kept. A fresh start
    (``resume_step=None``) drops every record of an earlier attempt that never reached a
    checkpoint, and purges TensorBoard from step 0.
    """

    def __init__(self, directory: str | pathlib.Path, *, resume_step: int | None = None, tensorboard: bool = True):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        if self.path.is_file():
            kept = [] if resume_step is None else [r for r in read_jsonl(self.path) if r.get("step", -1) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._tensorboard = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step writes a session-start event: TensorBoard drops the older events of
            # every step from there on, so a resumed run shows each step once.
            self._tensorboard = SummaryWriter(str(self.directory / "tensorboard"),
                                              purge_step=0 if resume_step is None else resume_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


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
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
