"""The embedded default: distil the shipped toy teacher into the weak toy student, OPD vs OPD+.

A demo is a grid of :class:`~opd_jax.train.TrainConfig` variations (divergence × estimator × …
× seed) run through :func:`opd_jax.train.train` on one :class:`~opd_jax.tasks.TaskSetup` (a
registered task's :meth:`~opd_jax.tasks.Task.setup`). The demo's settings on a task (its base
config, summary columns and default output folder) are the task's own ``task.demo``
(:class:`~opd_jax.tasks.DemoSettings`), so :mod:`opd_jax.tasks` is the one registry of tasks.
Each run evaluates the student before and after training on held-out problems: greedy accuracy
and response length, and the teacher-KL ``KL(π‖q)`` per response token estimated on
temperature-1 student samples. The summary is one row per variation with mean ± std over seeds,
written as Markdown and JSON beside the per-run folders and a plot of the learning curves.

Re-running into the same output folder resumes unfinished runs and reuses finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.metrics import plot_curves
from opd_jax.tasks.base import SUMMARY_COLUMNS, TaskSetup
from opd_jax.train import TrainConfig, train

__all__ = ["RunSpec", "format_table", "grid", "run_grid", "summarize", "write_results"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a grid: a label for the variation, its seed, the full training config, and keyword
    arguments of :func:`opd_jax.train.train` beyond it (plug-ins: ``advantage_fn``, ``loss_fn``,
    ``reference``; they are not recorded in ``config.json``)."""

    variation: str
    seed: int
    config: TrainConfig
    train_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def folder(self) -> str:
        return f"{self.variation}-seed{self.seed}".replace("/", "-").replace("=", "")


def grid(base: TrainConfig, axes: dict[str | tuple[str, ...], Sequence[Any]], seeds: Sequence[int]) -> list[RunSpec]:
    """Every combination of ``axes`` applied to ``base``, per seed.

    An axis is a TrainConfig field with its values, or a tuple of fields with tuples of values that
    vary together (e.g. ``("level", "gamma"): [("token", 0.0), ("token", 1.0), ("sequence", 0.0)]``).
    The variation label joins the values in the order of ``axes`` (``None`` left out), e.g.
    ``forward_kl/opd_plus``.

    Raises:
      ValueError: an axis that is not a TrainConfig field, or a combination it rejects.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    named = [name for key in axes for name in ((key,) if isinstance(key, str) else key)]
    unknown = sorted(set(named) - fields)
    if unknown:
        raise ValueError(f"unknown grid axis {unknown}; valid: {sorted(fields)}")
    combinations: list[dict[str, Any]] = [{}]
    for key, values in axes.items():
        names = (key,) if isinstance(key, str) else key
        combinations = [
            {**combo, **dict(zip(names, (value,) if isinstance(key, str) else value, strict=True))}
            for combo in combinations for value in values
        ]
    specs = []
    for combo in combinations:
        variation = "/".join(_format_value(name, value) for name, value in combo.items() if value is not None)
        for seed in seeds:
            specs.append(RunSpec(variation, seed, dataclasses.replace(base, **combo, seed=seed)))
    return specs


def _format_value(name: str, value: Any) -> str:
    return str(value) if name in ("divergence", "estimator", "level") else f"{name}={value:g}" if isinstance(
        value, float) else f"{name}={value}"


def run_grid(
    setup: TaskSetup, specs: Sequence[RunSpec], output_dir: str | pathlib.Path, *, progress: bool = True
) -> list[dict[str, Any]]:
    """Train every run of ``specs`` into ``output_dir/<run>/`` and return one record per run.

    A record holds the variation, seed, the evaluation before (``*_before``) and after training,
    and the wall time. The student is re-started from ``setup.student`` for every run.
    """
    from flax import nnx

    output_dir = pathlib.Path(output_dir)
    graphdef, initial_state = nnx.split(setup.student)
    records = []
    for index, spec in enumerate(specs):
        began = time.perf_counter()
        student = nnx.merge(graphdef, jax.tree.map(jnp.copy, initial_state))
        result = train(
            spec.config, student, setup.student_config, setup.teacher, setup.prompts, output_dir / spec.folder,
            stop_ids=setup.stop_ids, pad_id=setup.pad_id, evaluate=setup.evaluate, rollout_fn=setup.rollout_fn,
            progress=progress, label=f"[{index + 1}/{len(specs)}] {spec.variation} seed {spec.seed}",
            **spec.train_options,
        )
        setup.tokenizer.save_pretrained(result.output_dir / "student")
        evaluations = [r for r in result.history if any(k.startswith("eval_") for k in r)]
        first = {k[5:]: v for k, v in evaluations[0].items() if k.startswith("eval_")} if evaluations else {}
        last = {k[5:]: v for k, v in evaluations[-1].items() if k.startswith("eval_")} if evaluations else {}
        records.append({
            "variation": spec.variation, "seed": spec.seed, "config": spec.config.to_dict(),
            **{f"{k}_before": v for k, v in first.items()}, **last,
            "seconds": time.perf_counter() - began,
        })
    return records


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variation (in first-seen order): mean and std over seeds of every numeric metric."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        rows.setdefault(record["variation"], []).append(record)
    summary = []
    for variation, group in rows.items():
        row: dict[str, Any] = {"variation": variation, "seeds": [r["seed"] for r in group]}
        keys = [k for k in group[0] if k not in ("variation", "seed", "config")
                and isinstance(group[0][k], (int, float))]
        for key in keys:
            values = np.asarray([r[key] for r in group if key in r], np.float64)
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def format_table(summary: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = SUMMARY_COLUMNS) -> str:
    """A Markdown table: variation, then ``before → after`` for each column (mean ± std over seeds)."""

    def cell(row, key):
        if key not in row:
            return "–"
        text = f"{row[key]:.3f}"
        return text + (f" ± {row[key + '_std']:.3f}" if len(row["seeds"]) > 1 else "")

    header = ["run", "seeds"] + [f"{title} before → after" for _, title in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [row["variation"], str(len(row["seeds"]))]
        cells += [f"{cell(row, key + '_before')} → {cell(row, key)}" for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    setup: TaskSetup, specs: Sequence[RunSpec], records: Sequence[dict[str, Any]], output_dir: str | pathlib.Path,
    columns: Sequence[tuple[str, str]] = SUMMARY_COLUMNS,
) -> str:
    """Write ``results.json``, ``results.md`` and ``curves.png`` (first seed of every variation); return the table."""
    output_dir = pathlib.Path(output_dir)
    summary = summarize(records)
    table = format_table(summary, columns)
    (output_dir / "results.json").write_text(json.dumps({"task": setup.name, "runs": list(records),
                                                         "summary": summary}, indent=2) + "\n")
    (output_dir / "results.md").write_text(f"# {setup.name}: OPD vs OPD+\n\n{table}\n")
    from opd_jax.metrics import read_jsonl

    curves = {}
    for spec in specs:
        if spec.variation not in curves:
            curves[spec.variation] = read_jsonl(output_dir / spec.folder / "metrics.jsonl")
    plot_curves(curves, [f"eval_{key}" for key, _ in columns] + ["teacher_kl"],
                output_dir / "curves.png", title=f"{setup.name}: on-policy distillation")
    return table
