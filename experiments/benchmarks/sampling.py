"""Decoding throughput: ``opd_jax.sampling.generate`` (JAX, KV cache) vs transformers ``model.generate``.

What is measured. One random Qwen3 decoder is built with ``opd_jax.models.Decoder`` and written with
``save_pretrained``; transformers loads the same folder (``AutoModelForCausalLM``, float32, PyTorch
CPU). Both sides get the same random prompts (``[batch, prompt_len]``, no padding) and generate
exactly ``new_tokens`` tokens per row with a KV cache, in two modes:

* ``sample``: temperature 1.0, no top-k / top-p (transformers: ``do_sample=True, top_k=0,
  top_p=1.0``), no stop tokens (ours: ``stop_ids=()``; transformers: ``eos_token_id=None,
  min_new_tokens=max_new_tokens``);
* ``greedy``: argmax (ours: ``temperature=0``; transformers: ``do_sample=False``).

Each side makes one untimed warm-up call per mode (ours compiles the whole prefill + decode loop
then), followed by ``--repeats`` timed calls of the full generate; our calls end with
``jax.block_until_ready``. The transformers side runs in the Python 3.11 side environment
``.venv-torch`` (see ``_torch_generate.py``), one after the other with ours, never concurrently, with
``torch.set_num_threads`` = the CPU cores available to this process. JAX (XLA:CPU) uses all cores.

How to read the table. ``median s`` is the median wall time of one full generate call (prefill +
``new_tokens`` decode steps for the whole batch); ``tokens/s = batch * new_tokens / median s``
(generated tokens only); ``ratio`` is ours / transformers tokens/s for the same mode (> 1: ours is
faster). The compile line gives our first call minus the median (≈ tracing + XLA compilation), paid
once per (shapes, sampling settings). ``greedy agreement`` is a sanity check, not a speed figure: the
share of rows whose greedy tokens are identical on both sides (float32 round-off may flip a near-tie
and make a row diverge, so a value below 1 is not by itself a bug). ``other processes' CPU`` is the mean
share of all CPUs that *other* processes used during the timed calls (``_cpuload.py``); on a shared
machine anything above a few percent slows both sides down unevenly, so rerun when it is idle.

Notes. The model is float32 with untied embeddings and RoPE theta 1e6; ``XLA_FLAGS`` is passed through
and printed (e.g. ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` turns off XLA:CPU's YNNPACK
fusions, which were slower for these small-batch matmuls on the 2-core dev machine). Under CPU
contention torch's thread pool degrades far more than XLA's (seen: 40x slower), so a busy machine
inflates the ratio; trust only rows whose ``other processes' CPU`` is near 0%.

Usage:
    .venv/bin/python experiments/benchmarks/sampling.py                  # the default (issue) size
    .venv/bin/python experiments/benchmarks/sampling.py --quick --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from _common import TORCH_PYTHON, machine_info, warn_if_busy, write_json  # this script's folder is on sys.path
from _cpuload import timed_call
from opd_jax.models import Decoder, DecoderConfig, RopeConfig, save_pretrained
from opd_jax.sampling import SamplingConfig, generate

TORCH_SCRIPT = pathlib.Path(__file__).resolve().with_name("_torch_generate.py")
MODES = {"sample": 1.0, "greedy": 0.0}  # mode -> temperature
QUICK = dict(layers=2, hidden=64, vocab=128, heads=4, kv_heads=2, batch=2, prompt_len=8, new_tokens=8, repeats=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokens/s of opd_jax.sampling.generate vs transformers model.generate (PyTorch CPU) "
        "on the same random Qwen3 weights, prompts and lengths.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 3 * hidden)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--heads", type=int, default=4, help="query heads (head_dim = hidden / heads)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row (no padding)")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens per row (exactly)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and mode (median taken)")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling seed")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny smoke size (2 layers, hidden 64, vocab 128, batch 2, 8 new tokens, 1 repeat); overrides the sizes",
    )
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.intermediate is None:
        args.intermediate = 3 * args.hidden
    if args.hidden % args.heads:
        parser.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def build_checkpoint(args: argparse.Namespace, folder: pathlib.Path) -> tuple[Decoder, np.ndarray]:
    """A random Qwen3 decoder saved to ``folder``, and random prompts saved as ``prompts.npy``."""
    config = DecoderConfig(
        model_type="qwen3",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        rope=RopeConfig(theta=1_000_000.0),
        qk_norm=True,
        max_position_embeddings=max(4096, args.prompt_len + args.new_tokens),
    )
    model = Decoder(config, rngs=nnx.Rngs(args.seed))
    save_pretrained(model, config, folder / "checkpoint")
    prompts = np.random.default_rng(args.seed).integers(0, args.vocab, (args.batch, args.prompt_len), dtype=np.int32)
    np.save(folder / "prompts.npy", prompts)
    return model, prompts


def require_torch_env() -> None:
    """Exit with a clear message when the PyTorch side environment is missing."""
    if not TORCH_PYTHON.is_file():
        raise SystemExit(
            f"error: the PyTorch side environment is missing: {TORCH_PYTHON} does not exist.\n"
            f"Create it with `.ci/bootstrap` (Python 3.11 venv with CPU torch 2.13.0 and transformers 5)."
        )


def run_torch(args: argparse.Namespace, folder: pathlib.Path, threads: int) -> dict:
    """Time transformers ``generate`` in the side environment; returns its result JSON."""
    require_torch_env()
    job = {
        "checkpoint": str(folder / "checkpoint"),
        "prompts": str(folder / "prompts.npy"),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": threads,
        "modes": list(MODES),
        "seed": args.seed,
        "out": str(folder / "torch_result.json"),
        "tokens_out": str(folder),
    }
    job_file = folder / "torch_job.json"
    job_file.write_text(json.dumps(job, indent=2))
    completed = subprocess.run([str(TORCH_PYTHON), str(TORCH_SCRIPT), str(job_file)], capture_output=True, text=True)
    if completed.returncode:
        raise SystemExit(f"error: {TORCH_SCRIPT.name} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    result = json.loads((folder / "torch_result.json").read_text())
    result["greedy_tokens"] = np.load(folder / "greedy.npy")
    return result


def run_ours(args: argparse.Namespace, model: Decoder, prompts: np.ndarray) -> dict:
    """Time ``opd_jax.sampling.generate``: per mode the first (compiling) call and ``repeats`` timed calls."""
    tokens = jnp.asarray(prompts)
    mask = jnp.ones(prompts.shape, bool)
    key = jax.random.key(args.seed)
    result: dict = {"modes": {}}
    for mode, temperature in MODES.items():
        config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=temperature, stop_ids=())
        times, foreign = [], []
        for call in range(args.repeats + 1):  # call 0 compiles
            rollout, elapsed, other_load = timed_call(
                lambda: jax.block_until_ready(generate(model, tokens, mask, key, config))  # noqa: B023
            )
            if call:
                times.append(elapsed)
                foreign.append(other_load)
            else:
                result["modes"][mode] = {"warmup_s": elapsed}
        if not bool(np.all(np.asarray(rollout.response_mask)[:, args.prompt_len:])):
            raise RuntimeError("opd_jax generate stopped early although stop_ids=()")
        result["modes"][mode].update(times_s=times, other_load=foreign)
        if mode == "greedy":
            result["greedy_tokens"] = np.asarray(rollout.tokens)[:, args.prompt_len:]
    return result


def summarise(args: argparse.Namespace, machine: dict, ours: dict, torch_side: dict) -> dict:
    generated = args.batch * args.new_tokens
    rows = []
    for mode in MODES:
        for side, source in (("opd_jax", ours), ("transformers", torch_side)):
            times = source["modes"][mode]["times_s"]
            median = statistics.median(times)
            loads = [load for load in source["modes"][mode]["other_load"] if load is not None]
            rows.append({
                "side": side, "mode": mode, "median_s": median, "tokens_per_s": generated / median,
                "best_s": min(times), "times_s": times, "warmup_s": source["modes"][mode]["warmup_s"],
                "other_load": statistics.mean(loads) if loads else None,
            })
    speed = {(row["side"], row["mode"]): row["tokens_per_s"] for row in rows}
    for row in rows:
        row["ratio"] = speed[("opd_jax", row["mode"])] / speed[("transformers", row["mode"])]
    compile_s = {
        mode: ours["modes"][mode]["warmup_s"] - statistics.median(ours["modes"][mode]["times_s"]) for mode in MODES
    }
    agreement = float(np.mean(np.all(ours["greedy_tokens"] == torch_side["greedy_tokens"], axis=1)))
    return {
        "machine": machine | {
            "torch": torch_side["torch"], "transformers": torch_side["transformers"],
            "torch_python": torch_side["python"], "torch_threads": torch_side["threads"],
        },
        "config": {
            "model_type": "qwen3", "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
            "vocab": args.vocab, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
            "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "seed": args.seed, "dtype": "float32",
        },
        "results": rows,
        "compile_s": compile_s,
        "greedy_row_agreement": agreement,
    }


def print_report(summary: dict) -> None:
    machine, config = summary["machine"], summary["config"]
    print(f"CPU: {machine['cpu']} | cores available: {machine['cores']} | torch threads: {machine['torch_threads']}")
    print(
        f"jax {machine['jax']} (backend {machine['jax_backend']}, devices {', '.join(machine['jax_devices'])}), "
        f"flax {machine['flax']}, Python {machine['python']} | torch {machine['torch']}, "
        f"transformers {machine['transformers']}, Python {machine['torch_python']}"
        + (f" | XLA_FLAGS={machine['xla_flags']}" if machine["xla_flags"] else "")
    )
    print(
        f"model: qwen3, {config['layers']} layers, hidden {config['hidden']}, intermediate {config['intermediate']}, "
        f"vocab {config['vocab']}, heads {config['heads']}/{config['kv_heads']} kv (head_dim {config['head_dim']}), "
        f"float32 | batch {config['batch']}, prompt {config['prompt_len']}, {config['new_tokens']} new tokens, "
        f"median of {config['repeats']}"
    )
    print()
    print("| side | mode | median s | tokens/s | ratio (ours / transformers) | other processes' CPU |")
    print("|---|---|---:|---:|---:|---:|")
    for row in summary["results"]:
        ratio = f"{row['ratio']:.2f}" if row["side"] == "opd_jax" else "1 (reference)"
        load = "n/a" if row["other_load"] is None else f"{100 * row['other_load']:.0f}%"
        print(f"| {row['side']} | {row['mode']} | {row['median_s']:.4f} | {row['tokens_per_s']:.0f} | {ratio} | {load} |")
    print()
    warn_if_busy([row["other_load"] for row in summary["results"]],
                 "the numbers are slowed down by them (rerun on an idle machine).")
    compile_s = ", ".join(f"{mode} {seconds:.2f} s" for mode, seconds in summary["compile_s"].items())
    print(f"opd_jax compile (first call minus median): {compile_s}")
    print(f"greedy agreement (rows with identical tokens on both sides): {summary['greedy_row_agreement']:.2f}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_torch_env()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="opd_bench_") as tmp:
        folder = pathlib.Path(tmp)
        model, prompts = build_checkpoint(args, folder)
        torch_side = run_torch(args, folder, threads=machine["cores"])  # first, so the two never overlap
        ours = run_ours(args, model, prompts)
    summary = summarise(args, machine, ours, torch_side)
    print_report(summary)
    write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
