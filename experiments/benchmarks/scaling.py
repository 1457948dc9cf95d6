"""How the full-vocabulary loss + gradient scales with sequence length T and vocabulary V, chunked vs not.

What is measured: ``opd_jax.full_vocab_divergence`` with generalized JS (β = ½), summed and
normalised by the token count, ``jax.jit(jax.value_and_grad(...))`` with respect to the ``[B, T, V]``
student logits — exactly the ``opd_jax chunked`` / ``unchunked`` rows of ``loss.py``, through the same
worker (``_loss_jax.py``, one fresh process per point). Two sweeps, four sizes each: T grows at fixed
``V`` and V grows at fixed ``T`` (``B = 1``), with ``chunk_size = --chunk-size`` tokens and with no
chunking.

Columns. ``median s`` of ``--repeats`` calls after a warm-up call. ``XLA temp MiB``: the compiled
function's temporary buffers (``memory_analysis().temp_size_in_bytes``: neither the inputs nor the
returned gradient); with chunking this is ``O(chunk · V)`` and stays flat in T. ``peak RSS Δ MiB``: the
measured peak resident memory during the calls minus the resident memory before them (see
``_procmem.py``); it includes the returned ``[B, T, V]`` gradient, which no method can avoid, so
``RSS Δ − grad`` subtracts the gradient's size to show the working memory. The exponent rows fit
``y ∝ x^k`` by least squares on log-log axes over the four sizes of each sweep (``k ≈ 1``: linear;
``k ≈ 0``: flat).

Usage:
    .venv/bin/python experiments/benchmarks/scaling.py
    .venv/bin/python experiments/benchmarks/scaling.py --quick --json /tmp/scaling.json
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import tempfile

import numpy as np

from _common import load_average, machine_info, machine_lines, markdown_table, run_job, warn_if_busy, write_json

QUICK = dict(lengths="16,32,64,128", vocab=64, vocabs="32,64,128,256", length=32, chunk_size=8, repeats=1)


def parse_sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",")]
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"need at least two positive sizes, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time and memory of opd_jax's full-vocab generalized-JS loss + gradient as T and V grow, "
        "chunked vs unchunked, with fitted log-log exponents.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--lengths", default="256,512,1024,2048", help="T values of the T sweep")
    parser.add_argument("--vocab", type=int, default=16384, help="V of the T sweep")
    parser.add_argument("--vocabs", default="4096,8192,16384,32768", help="V values of the V sweep")
    parser.add_argument("--length", type=int, default=512, help="T of the V sweep")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=128, help="tokens per chunk (chunked rows)")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny smoke sizes, 1 repeat; overrides the sizes")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.lengths, args.vocabs = parse_sizes(str(args.lengths)), parse_sizes(str(args.vocabs))
    return args


def fitted_exponent(xs: list[float], ys: list[float | None]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (``None`` if any ``y`` is missing or ≤ 0)."""
    if any(y is None or y <= 0 for y in ys):
        return None
    slope, _ = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope)


def measure(args: argparse.Namespace, folder: pathlib.Path) -> list[dict]:
    points = [("T", length, args.vocab, length) for length in args.lengths]
    points += [("V", args.length, vocab, vocab) for vocab in args.vocabs]
    rows = []
    for sweep, length, vocab, x in points:
        for chunk in (args.chunk_size, None):
            job = {"kind": "full", "batch": args.batch, "length": length, "vocab": vocab, "beta": args.beta,
                   "chunk_size": chunk, "hidden": 0, "repeats": args.repeats, "seed": args.seed}
            name = f"{sweep}-{args.batch}x{length}x{vocab}-{chunk}"
            print(f"  sweep {sweep}: {args.batch}x{length}x{vocab} chunk {chunk} ...", file=sys.stderr, flush=True)
            result = run_job(sys.executable, "_loss_jax.py", job, folder, name)
            loads = [v for v in result["other_load"] if v is not None]
            gradient_bytes = 4 * args.batch * length * vocab
            delta = result["peak_rss_delta_bytes"]
            rows.append({
                "sweep": sweep, "x": x, "batch": args.batch, "length": length, "vocab": vocab, "chunk_size": chunk,
                "median_s": statistics.median(result["times_s"]), "times_s": result["times_s"],
                "temp_bytes": result.get("temp_bytes"), "peak_rss_delta_bytes": delta,
                "rss_minus_gradient_bytes": None if delta is None else delta - gradient_bytes,
                "gradient_bytes": gradient_bytes, "loss": result["loss"],
                "mean_other_load": statistics.mean(loads) if loads else None, "load_average_after": load_average(),
            })
    return rows


def fits(rows: list[dict]) -> list[dict]:
    out = []
    for sweep in ("T", "V"):
        for chunk in sorted({r["chunk_size"] for r in rows}, key=lambda c: math.inf if c is None else c):
            selected = sorted((r for r in rows if r["sweep"] == sweep and r["chunk_size"] == chunk), key=lambda r: r["x"])
            xs = [r["x"] for r in selected]
            out.append({
                "sweep": sweep, "chunk_size": chunk,
                "time": fitted_exponent(xs, [r["median_s"] for r in selected]),
                "temp": fitted_exponent(xs, [r["temp_bytes"] for r in selected]),
                "rss_delta": fitted_exponent(xs, [r["peak_rss_delta_bytes"] for r in selected]),
                "rss_minus_gradient": fitted_exponent(xs, [r["rss_minus_gradient_bytes"] for r in selected]),
            })
    return out


def print_report(summary: dict) -> None:
    for line in machine_lines(summary["machine"]):
        print(line)
    c = summary["config"]
    print(f"opd_jax full_vocab_divergence, generalized JS beta {c['beta']}, float32, B {c['batch']}, "
          f"loss + gradient w.r.t. the student logits; chunk {c['chunk_size']} tokens vs unchunked; median of {c['repeats']}")
    print()

    def mb(value):
        return "n/a" if value is None else f"{value / 2**20:.1f}"

    headers = ["sweep", "B×T×V", "chunk", "median s", "XLA temp MiB", "peak RSS Δ MiB", "RSS Δ − grad MiB",
               "other CPU", "load avg (1 min)"]
    table = [[
        f"{r['sweep']} = {r['x']}", f"{r['batch']}x{r['length']}x{r['vocab']}", r["chunk_size"] or "none",
        f"{r['median_s']:.4f}", mb(r["temp_bytes"]), mb(r["peak_rss_delta_bytes"]), mb(r["rss_minus_gradient_bytes"]),
        "n/a" if r["mean_other_load"] is None else f"{100 * r['mean_other_load']:.0f}%",
        f"{r['load_average_after'][0]:.2f}" if r["load_average_after"] else "n/a",
    ] for r in summary["results"]]
    print(markdown_table(headers, table, align="lllrrrrrr"))
    print()

    def k(value):
        return "n/a" if value is None else f"{value:.2f}"

    print("Fitted exponents k (y ∝ x^k over the four sizes):")
    print()
    headers = ["sweep", "chunk", "time", "XLA temp", "peak RSS Δ", "RSS Δ − grad"]
    table = [[f["sweep"], f["chunk_size"] or "none", k(f["time"]), k(f["temp"]), k(f["rss_delta"]),
              k(f["rss_minus_gradient"])] for f in summary["fits"]]
    print(markdown_table(headers, table, align="llrrrr"))
    print()
    warn_if_busy([r["mean_other_load"] for r in summary["results"]],
                 "times (not memory) are inflated; rerun on an idle machine.")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="opd_bench_scaling_") as tmp:
        rows = measure(args, pathlib.Path(tmp))
    summary = {
        "benchmark": "scaling",
        "machine": machine | {"load_average_end": load_average()},
        "config": {"batch": args.batch, "chunk_size": args.chunk_size, "beta": args.beta, "repeats": args.repeats,
                   "lengths": args.lengths, "vocab": args.vocab, "vocabs": args.vocabs, "length": args.length,
                   "dtype": "float32"},
        "results": rows,
        "fits": fits(rows),
    }
    print_report(summary)
    write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
