"""Full-vocabulary distillation loss + gradient: ``opd_jax.full_vocab_divergence`` vs TRL's GKD loss.

What is measured. For each shape ``B×T×V`` the same random student / teacher logits and mask
(``_lossdata.py``) go to

* **opd_jax, chunked**: ``full_vocab_divergence(student, teacher, mask,
  divergence=generalized_js(beta=β), chunk_size=C)`` summed over tokens and divided by the number of
  unmasked tokens, ``jax.jit(jax.value_and_grad(...))`` with respect to the student logits;
* **opd_jax, unchunked**: the same with ``chunk_size=None``;
* **TRL**: ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=β,
  temperature=1, reduction="batchmean")`` (``labels = -100`` at masked tokens) and
  ``torch.autograd.grad`` with respect to the student logits, CPU PyTorch in ``.venv-torch``;

plus two rows that need no ``[B, T, V]`` tensor at all, the sampled-token OPD+ loss
(``token_advantages(..., estimator="opd_plus", gamma=0)`` + ``pg_surrogate``, same generalized JS):

* **OPD+ sampled [B,T]**: on ``[B, T]`` log-probabilities of the sampled tokens (what the loss itself costs);
* **OPD+ sampled from hidden**: the student log-probabilities computed from ``[B, T, D]`` hidden
  states and a ``[D, V]`` projection, ``C`` tokens at a time under ``jax.checkpoint``, gradient with
  respect to both (what the loss costs in a train step on top of the model trunk; the full-vocab rows
  start from ready-made logits, so they exclude this projection, which they would need twice, for
  the student and the teacher).

Convention mapping (checked by the ``loss`` and gradient columns). TRL's loss is
``β KL(q ‖ m) + (1 − β) KL(π ‖ m)`` with ``m = β q + (1 − β) π`` (``q`` teacher, ``π`` student; TRL
builds ``log m`` from ``log1p(−β) + log π`` and ``log β + log q``, and ``F.kl_div(input, target)`` is
``KL(target ‖ input)``). opd_jax's ``generalized_js`` is ``D_f(q ‖ π) = Σ_v π f(q/π)`` with
``f(u) = β u log u − (β u + 1 − β) log(β u + 1 − β)``; expanding, ``Σ π f(q/π) = β Σ q log q +
(1 − β) Σ π log π − Σ m log m``, the same quantity with the same ``β``. TRL's ``β = 0`` and ``β = 1``
special cases (forward / reverse KL) are not limits of that formula; opd_jax calls those
``forward_kl`` / ``reverse_kl`` and ``generalized_js`` needs ``0 < β < 1``. Reduction: TRL's
``batchmean`` with labels divides the summed divergence by the number of unmasked tokens, which is
what the opd_jax side does explicitly. At ``β = ½`` the divergence is symmetric in ``q`` and ``π``, so
run with ``--beta 0.1`` to check the direction (the smoke test does).

Memory, the same way on both sides: every measurement runs in a fresh process that builds its
inputs, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), then makes the warm-up and
the timed calls; ``peak RSS Δ`` is the peak resident memory during those calls minus the resident
memory just before them, i.e. what the loss adds on top of its inputs (forward and backward
temporaries, and the returned gradient). For opd_jax the function is compiled ahead of time (before
the reset) and XLA's own ``memory_analysis().temp_size_in_bytes`` is shown too.

Timing: ``--repeats`` timed calls after one warm-up call, median reported; opd_jax calls end with
``jax.block_until_ready``. ``torch.set_num_threads`` = cores available; XLA:CPU uses all cores. The
sides run one after another, never concurrently. With ``--rounds R`` every side of a case runs ``R``
times in turn (side 1, side 2, …, side 1, side 2, …, each time in a fresh process), so that a change
of load on a shared machine hits every side alike; the median is then over all ``R · repeats``
timed calls and the peak memory the largest of the rounds. ``other CPU`` is the share of the
machine's CPUs other processes used during the timed calls (``_cpuload.py``); the load average is
printed at start and end.

Usage:
    .venv/bin/python experiments/benchmarks/loss.py                       # the default (issue) sizes
    .venv/bin/python experiments/benchmarks/loss.py --quick --beta 0.1 --json /tmp/loss.json
    .venv/bin/python experiments/benchmarks/loss.py --cases 4x1024x32000 --rounds 3   # issue 23's shape
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile

from _common import (
    BUSY_WARNING, TORCH_PYTHON, ensure_trl, load_average, machine_info, machine_lines, markdown_table, mib, run_job,
    write_json,
)

DEFAULT_CASES = "2x256x8192,1x1024x32768,2x1024x32768,4x1024x32768,4x1024x32000"
QUICK = dict(cases="2x16x64,1x32x128", repeats=1, chunk_size=8, hidden=16, rounds=1)
SIDES = (  # (label, worker, kind, chunked)
    ("opd_jax chunked", "jax", "full", True),
    ("opd_jax unchunked", "jax", "full", False),
    ("TRL generalized_jsd_loss", "trl", "full", False),
    ("OPD+ sampled [B,T]", "jax", "sampled", False),
    ("OPD+ sampled from hidden", "jax", "sampled_hidden", True),
)
REFERENCE = "TRL generalized_jsd_loss"


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    cases = []
    for item in text.split(","):
        parts = item.lower().strip().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"case {item!r} is not BxTxV (e.g. 4x1024x32768)")
        cases.append(tuple(int(p) for p in parts))
    return cases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of the full-vocabulary generalized-JS loss + gradient: opd_jax "
        "(chunked / unchunked) vs TRL GKDTrainer.generalized_jsd_loss, and the sampled-token OPD+ loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated BxTxV shapes")
    parser.add_argument("--beta", type=float, default=0.5, help="generalized JS beta (same on both sides), in (0, 1)")
    parser.add_argument("--chunk-size", type=int, default=256, help="opd_jax tokens per chunk (chunked rows)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden width D of the 'sampled from hidden' row")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and case (median taken)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the sides of a case this many times in turn (fresh processes), pooling the timed calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-unchunked", action="store_true", help="leave out the unchunked opd_jax row")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny smoke sizes, 1 repeat; overrides the sizes")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.cases = parse_cases(args.cases)
    if not 0 < args.beta < 1:
        parser.error("--beta must lie in (0, 1) (TRL's 0 and 1 are forward / reverse KL, not generalized JS)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def _relative_gradient_error(ours: dict, reference: dict) -> float:
    values = ours["first"] + ours["last"]
    expected = reference["first"] + reference["last"]
    scale = max(max(abs(x) for x in expected), 1e-30)
    probe = max(abs(a - b) for a, b in zip(values, expected)) / scale
    return max(probe, abs(ours["norm"] - reference["norm"]) / max(reference["norm"], 1e-30))


def _pool_rounds(results: list[dict]) -> dict:
    """One side's result over its rounds: timed calls and foreign loads pooled, the first round's
    warm-up, the largest peak memory (values and gradients are those of the last round)."""
    pooled = dict(results[-1])
    pooled["times_s"] = [t for r in results for t in r["times_s"]]
    pooled["other_load"] = [x for r in results for x in r["other_load"]]
    pooled["warmup_s"] = results[0]["warmup_s"]
    pooled["rounds"] = len(results)
    for key in ("peak_rss_delta_bytes", "peak_rss_bytes"):
        values = [r[key] for r in results if r.get(key) is not None]
        pooled[key] = max(values) if values else None
    return pooled


def measure(args: argparse.Namespace, machine: dict, folder: pathlib.Path) -> list[dict]:
    rows = []
    for batch, length, vocab in args.cases:
        base_job = {
            "batch": batch, "length": length, "vocab": vocab, "beta": args.beta, "hidden": args.hidden,
            "repeats": args.repeats, "seed": args.seed, "threads": machine["cores"],
        }
        sides = [side for side in SIDES if not (side[0] == "opd_jax unchunked" and args.skip_unchunked)]
        results = {label: [] for label, *_ in sides}
        for round_index in range(args.rounds):
            for label, worker, kind, chunked in sides:
                job = dict(base_job, kind=kind, chunk_size=args.chunk_size if chunked else None)
                python = TORCH_PYTHON if worker == "trl" else sys.executable
                script = "_loss_trl.py" if worker == "trl" else "_loss_jax.py"
                name = (f"{batch}x{length}x{vocab}-{label.replace(' ', '_').replace('[', '').replace(']', '').replace(',', '')}"
                        f"-{round_index}")
                print(f"  {batch}x{length}x{vocab} {label} (round {round_index + 1}/{args.rounds}) ...", file=sys.stderr,
                      flush=True)
                results[label].append(run_job(python, script, job, folder, name) | {"load_average_after": load_average()})
        for label, *_ in sides:
            result = _pool_rounds(results[label])
            loads = [x for x in result["other_load"] if x is not None]
            rows.append(result | {
                "case": f"{batch}x{length}x{vocab}", "batch": batch, "length": length, "vocab": vocab, "label": label,
                "median_s": statistics.median(result["times_s"]),
                "mean_other_load": statistics.mean(loads) if loads else None,
            })
    # Ratios and agreement against TRL, per case.
    for row in rows:
        reference = next(r for r in rows if r["case"] == row["case"] and r["label"] == REFERENCE)
        row["speedup_vs_trl"] = reference["median_s"] / row["median_s"]
        ours, theirs = row["peak_rss_delta_bytes"], reference["peak_rss_delta_bytes"]
        row["memory_vs_trl"] = None if not ours or not theirs else ours / theirs
        if row["kind"] == "full":
            if row["checksum"] != reference["checksum"]:
                raise SystemExit(f"error: the two sides built different inputs for {row['case']} "
                                 f"(checksums {row['checksum']} vs {reference['checksum']})")
            row["loss_relative_error"] = abs(row["loss"] - reference["loss"]) / max(abs(reference["loss"]), 1e-30)
            row["gradient_relative_error"] = _relative_gradient_error(row["gradient"], reference["gradient"])
    return rows


def summarise(args: argparse.Namespace, machine: dict, rows: list[dict]) -> dict:
    trl = next(r for r in rows if r["side"] == "trl")
    machine = machine | {
        "torch": trl["torch"], "trl": trl["trl"], "torch_python": trl["python"], "torch_threads": trl["threads"],
        "load_average_end": load_average(),
    }
    keep = ("case", "batch", "length", "vocab", "label", "side", "kind", "chunk_size", "median_s", "times_s", "warmup_s",
            "loss", "loss_relative_error", "gradient_relative_error", "speedup_vs_trl", "peak_rss_delta_bytes",
            "peak_rss_bytes", "memory_vs_trl", "temp_bytes", "argument_bytes", "output_bytes", "mean_other_load",
            "load_average_after", "rounds", "gradient")
    return {
        "benchmark": "loss",
        "machine": machine,
        "config": {"beta": args.beta, "chunk_size": args.chunk_size, "hidden": args.hidden, "repeats": args.repeats,
                   "rounds": args.rounds, "seed": args.seed, "dtype": "float32"},
        "results": [{k: row.get(k) for k in keep} for row in rows],
    }


def _fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def report(summary: dict) -> str:
    """The printed report (machine, settings, table, warnings) of a summary, e.g. a saved ``--json``."""
    lines = list(machine_lines(summary["machine"]))
    config = summary["config"]
    rounds = config.get("rounds", 1)
    lines.append(f"generalized JS beta {config['beta']}, float32, opd_jax chunk {config['chunk_size']} tokens, "
                 f"hidden D {config['hidden']} for 'from hidden', median of {config['repeats']} (after 1 warm-up call)"
                 + (f" × {rounds} rounds, the sides taking turns" if rounds > 1 else ""))
    lines.append("")
    headers = ["B×T×V", "side", "median s", "speed-up vs TRL", "peak RSS Δ MiB", "memory vs TRL", "XLA temp MiB",
               "loss", "rel. err vs TRL (loss / grad)", "other CPU", "load avg (1 min)"]
    table = []
    for row in summary["results"]:
        is_reference = row["label"] == REFERENCE
        table.append([
            row["case"], row["label"], f"{row['median_s']:.4f}",
            "1 (reference)" if is_reference else f"{row['speedup_vs_trl']:.2f}×",
            mib(row["peak_rss_delta_bytes"]),
            "1 (reference)" if is_reference else _fmt(row["memory_vs_trl"], ".2f"),
            mib(row["temp_bytes"]) if row["temp_bytes"] is not None else "—",
            f"{row['loss']:.6g}",
            "—" if row["kind"] != "full" or is_reference
            else f"{row['loss_relative_error']:.1e} / {row['gradient_relative_error']:.1e}",
            "n/a" if row["mean_other_load"] is None else f"{100 * row['mean_other_load']:.0f}%",
            f"{row['load_average_after'][0]:.2f}" if row["load_average_after"] else "n/a",
        ])
    lines.append(markdown_table(headers, table))
    lines.append("")
    busiest = max((row["mean_other_load"] or 0.0) for row in summary["results"])
    if busiest > BUSY_WARNING:
        lines.append(f"WARNING: other processes used up to {100 * busiest:.0f}% of the CPUs during timed calls; "
                     "times are inflated (unevenly between the sides); rerun on an idle machine.")
    lines.append("'OPD+ sampled' rows use [B,T] inputs (no [B,T,V] tensor); their loss is a different quantity "
                 "(surrogate).")
    return "\n".join(lines) + "\n"


def print_report(summary: dict) -> None:
    print(report(summary), end="")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ensure_trl()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="opd_bench_loss_") as tmp:
        rows = measure(args, machine, pathlib.Path(tmp))
    summary = summarise(args, machine, rows)
    print_report(summary)
    write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
