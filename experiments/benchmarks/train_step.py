"""Achieved FLOP/s of the OPD+ train step, as a share of the matmul peak measured in the same run.

What is measured (all float32, XLA on the default JAX backend):

* **matmul peak**: a jitted ``[n, n] @ [n, n]`` (``--matmul-size``), ``2 n³`` FLOPs per call; the
  machine's attainable peak under the same load as the step.
* **train step (rollout excluded)**: one jitted function built from the public pieces the way
  ``opd_jax.train`` builds its step: ``token_log_probs`` of the student (behaviour log-probs) and the
  teacher on a batch of ``[B, P + N]`` sequences, ``token_advantages(..., estimator="opd_plus",
  gamma=0, log_ratio_clip=20)`` with generalized JS (β = ½), then ``value_and_grad`` of the
  ``importance_surrogate`` (PPO clip 0.2) through the student's ``token_log_probs``, and an optax
  update (global-norm clipping + AdamW). One epoch, one minibatch; parameters and optimiser state are
  donated and fed back, so consecutive calls are consecutive training steps.
* **rollout**: ``opd_jax.sampling.generate`` of ``N`` new tokens after a ``P``-token prompt (KV
  cache, temperature 1, no stop tokens, so every row generates exactly ``N``).
* **train step (rollout included)**: rollout followed by the step, timed together.

FLOPs are counted **analytically** (model FLOPs, no rematerialisation): a forward pass costs
``2 · (matmul parameters) · tokens`` plus attention ``4 · layers · heads · head_dim · keys`` per query
token, where ``keys`` counts every key slot the kernel computes (the full ``L × L`` score matrix in
training; the whole cache in decoding); a backward pass costs twice its forward. The step is 2
forwards (student and teacher scoring) + 1 forward/backward (the update) = 5 forwards over ``B · L``
tokens; the rollout is a prefill over ``B · P`` tokens plus ``N`` one-token decode steps, the LM head
applied to ``1 + N`` positions per row. XLA's own count (``compiled.cost_analysis()['flops']``) of
the step is printed beside it as a cross-check (XLA counts the elementwise work too). The rollout's
XLA count is not used: XLA counts a ``while_loop`` body once.

``% of peak`` = achieved FLOP/s ÷ the median matmul FLOP/s of this run. Medians over ``--repeats``
calls after a warm-up (compiling) call; ``other CPU`` as in the other benchmarks.

Usage:
    .venv/bin/python experiments/benchmarks/train_step.py          # 8 layers, d 512, L 256 (issue size)
    .venv/bin/python experiments/benchmarks/train_step.py --quick --json /tmp/step.json
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import opd_jax
from _common import load_average, machine_info, machine_lines, markdown_table, warn_if_busy, write_json
from _cpuload import timed_call
from opd_jax.models import Decoder, DecoderConfig, RopeConfig
from opd_jax.sampling import SamplingConfig, generate, token_log_probs

QUICK = dict(layers=2, hidden=64, heads=4, kv_heads=2, vocab=256, batch=2, prompt_len=8, new_tokens=8, repeats=1,
             matmul_size=256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="FLOP/s of the OPD+ train step (rollout excluded / included) vs a measured matmul peak.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 3 * hidden)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens (L = prompt + new)")
    parser.add_argument("--chunk-size", type=int, default=None, help="token_log_probs chunk (None: unchunked)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the [n, n] @ [n, n] peak matmul")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny smoke sizes, 1 repeat; overrides the sizes")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.intermediate is None:
        args.intermediate = 3 * args.hidden
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    return args


def decoder_config(args: argparse.Namespace) -> DecoderConfig:
    return DecoderConfig(
        model_type="qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        rope=RopeConfig(theta=1_000_000.0), qk_norm=True,
        max_position_embeddings=max(4096, args.prompt_len + args.new_tokens),
    )


def matmul_parameters(config: DecoderConfig) -> tuple[int, int]:
    """``(trunk, lm_head)`` parameters that take part in matrix products, per token."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    attention = d * config.num_heads * h * 2 + d * config.num_kv_heads * h * 2
    return config.num_layers * (attention + 3 * d * f), d * config.vocab_size


def forward_flops(config: DecoderConfig, queries: int, keys: int, head_tokens: int) -> float:
    """Forward FLOPs for ``queries`` tokens each attending to ``keys`` slots, LM head on ``head_tokens``."""
    trunk, head = matmul_parameters(config)
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * keys
    return 2.0 * trunk * queries + attention * queries + 2.0 * head * head_tokens


def analytic_flops(args: argparse.Namespace, config: DecoderConfig) -> dict[str, float]:
    batch, prompt, new = args.batch, args.prompt_len, args.new_tokens
    length = prompt + new
    one_forward = forward_flops(config, batch * length, length, batch * length)
    step = 2 * one_forward + 3 * one_forward  # student + teacher scoring, then forward + backward
    prefill = forward_flops(config, batch * prompt, prompt, batch)
    decode = new * forward_flops(config, batch, length, batch)
    return {"step": step, "rollout": prefill + decode}


def build(args: argparse.Namespace, config: DecoderConfig):
    student = Decoder(config, rngs=nnx.Rngs(args.seed))
    teacher = Decoder(config, rngs=nnx.Rngs(args.seed + 1))
    graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
    divergence = opd_jax.divergences.get("generalized_js", beta=0.5)
    chunk = args.chunk_size

    def loss_fn(params, tokens, token_mask, response_mask, old_logp, advantages, normalizer):
        logp = token_log_probs(nnx.merge(graphdef, params), tokens, token_mask, chunk_size=chunk)
        per_sequence = opd_jax.importance_surrogate(logp, old_logp, advantages, response_mask, clip_epsilon=0.2)
        return jnp.sum(per_sequence) / normalizer

    def step(params, opt_state, teacher_params, tokens, token_mask, response_mask):
        old_logp = token_log_probs(nnx.merge(graphdef, params), tokens, token_mask, chunk_size=chunk)
        teacher_logp = token_log_probs(nnx.merge(teacher_graphdef, teacher_params), tokens, token_mask, chunk_size=chunk)
        advantages = opd_jax.token_advantages(
            old_logp, teacher_logp, response_mask, divergence=divergence, estimator="opd_plus", gamma=0.0,
            log_ratio_clip=20.0,
        )
        normalizer = jnp.maximum(jnp.sum(response_mask), 1).astype(jnp.float32)
        loss, grads = jax.value_and_grad(loss_fn)(
            params, tokens, token_mask, response_mask, old_logp, advantages, normalizer
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    return graphdef, params, optimizer.init(params), teacher_params, jitted


def median_or_none(values):
    return statistics.median(values) if values else None


def run(args: argparse.Namespace) -> dict:
    machine = machine_info()
    config = decoder_config(args)
    flops = analytic_flops(args, config)
    rng = np.random.default_rng(args.seed)
    prompts = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.prompt_len), dtype=np.int32))
    prompt_mask = jnp.ones(prompts.shape, bool)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, stop_ids=())
    rows = {}

    # Matmul peak.
    n = args.matmul_size
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    times, loads = [], []
    for call in range(max(args.repeats, 5) + 1):
        _, elapsed, other = timed_call(lambda: jax.block_until_ready(matmul(a, b)))
        if call:
            times.append(elapsed)
            loads.append(other)
    rows["matmul peak"] = {"flops": 2.0 * n**3, "times_s": times, "other_load": loads}

    graphdef, params, opt_state, teacher_params, step = build(args, config)
    student_for_rollout = lambda p: nnx.merge(graphdef, p)  # noqa: E731
    rollout = generate(student_for_rollout(params), prompts, prompt_mask, jax.random.key(args.seed), sampling)
    compiled = step.lower(params, opt_state, teacher_params, rollout.tokens, rollout.token_mask,
                          rollout.response_mask).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    xla_step_flops = float(cost.get("flops", 0.0)) if cost else None

    step_times, step_loads, rollout_times, rollout_loads, both_times, both_loads = [], [], [], [], [], []
    losses = []
    for call in range(args.repeats + 1):  # call 0 is the warm-up (and compiles generate's loop)
        key = jax.random.key(args.seed + 100 + call)
        rollout, r_time, r_load = timed_call(
            lambda: jax.block_until_ready(  # noqa: B023
                generate(student_for_rollout(params), prompts, prompt_mask, key, sampling)  # noqa: B023
            )
        )
        (params, opt_state, loss), s_time, s_load = timed_call(
            lambda: jax.block_until_ready(  # noqa: B023
                compiled(params, opt_state, teacher_params, rollout.tokens, rollout.token_mask,  # noqa: B023
                         rollout.response_mask)  # noqa: B023
            )
        )
        losses.append(float(loss))
        if call:
            step_times.append(s_time)
            step_loads.append(s_load)
            rollout_times.append(r_time)
            rollout_loads.append(r_load)
            both_times.append(r_time + s_time)
            both_loads.append(None if r_load is None or s_load is None else (r_load * r_time + s_load * s_time)
                              / (r_time + s_time))
    if not bool(np.all(np.asarray(rollout.response_mask)[:, args.prompt_len:])):
        raise RuntimeError("generate stopped early although stop_ids=()")
    rows["train step (rollout excluded)"] = {"flops": flops["step"], "xla_flops": xla_step_flops,
                                             "times_s": step_times, "other_load": step_loads}
    rows["rollout (generate)"] = {"flops": flops["rollout"], "times_s": rollout_times, "other_load": rollout_loads}
    rows["train step (rollout included)"] = {"flops": flops["step"] + flops["rollout"], "times_s": both_times,
                                             "other_load": both_loads}
    peak = rows["matmul peak"]["flops"] / statistics.median(rows["matmul peak"]["times_s"])
    results = []
    for name, row in rows.items():
        median = statistics.median(row["times_s"])
        loads = [x for x in row["other_load"] if x is not None]
        results.append({
            "name": name, "median_s": median, "times_s": row["times_s"], "flops": row["flops"],
            "xla_flops": row.get("xla_flops"), "flops_per_s": row["flops"] / median,
            "fraction_of_peak": row["flops"] / median / peak,
            "mean_other_load": statistics.mean(loads) if loads else None,
        })
    trunk, head = matmul_parameters(config)
    return {
        "benchmark": "train_step",
        "machine": machine | {"load_average_end": load_average()},
        "config": {
            "model_type": "qwen3", "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
            "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "batch": args.batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "chunk_size": args.chunk_size,
            "matmul_size": args.matmul_size, "repeats": args.repeats, "dtype": "float32",
            "matmul_parameters_trunk": trunk, "matmul_parameters_lm_head": head,
        },
        "matmul_peak_flops_per_s": peak,
        "results": results,
        "losses": losses,
    }


def print_report(summary: dict) -> None:
    for line in machine_lines(summary["machine"]):
        print(line)
    c = summary["config"]
    print(f"student = teacher architecture: qwen3, {c['layers']} layers, d {c['hidden']}, MLP {c['intermediate']}, "
          f"heads {c['heads']}/{c['kv_heads']} kv, vocab {c['vocab']}, float32 "
          f"({c['matmul_parameters_trunk'] / 1e6:.1f}M trunk + {c['matmul_parameters_lm_head'] / 1e6:.1f}M LM-head "
          f"matmul parameters) | batch {c['batch']} × (prompt {c['prompt_len']} + {c['new_tokens']} new) | "
          f"matmul peak: [{c['matmul_size']}]² f32 | median of {c['repeats']}")
    print()
    headers = ["measurement", "median s", "GFLOP (analytic)", "GFLOP (XLA count)", "GFLOP/s", "% of matmul peak",
               "other CPU"]
    table = []
    for row in summary["results"]:
        table.append([
            row["name"], f"{row['median_s']:.4f}", f"{row['flops'] / 1e9:.2f}",
            "—" if row["xla_flops"] is None else f"{row['xla_flops'] / 1e9:.2f}",
            f"{row['flops_per_s'] / 1e9:.1f}", f"{100 * row['fraction_of_peak']:.0f}%",
            "n/a" if row["mean_other_load"] is None else f"{100 * row['mean_other_load']:.0f}%",
        ])
    print(markdown_table(headers, table, align="lrrrrrr"))
    print()
    warn_if_busy([row["mean_other_load"] for row in summary["results"]],
                 "the peak and the step are both slowed down by them; rerun on an idle machine.")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = run(args)
    print_report(summary)
    write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
