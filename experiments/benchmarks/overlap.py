"""Pipelined rollouts: step time with and without ``pipeline_rollouts``, phase by phase, in one run.

What is measured. One tiny Qwen3 student (head size 64, which vLLM's CPU attention serves) and a
teacher twice as deep are distilled with :func:`opd_jax.train.train` twice on the same prompts:
``pipeline_rollouts`` off (sample, then score, then update) and on (step k + 1's rollout sampled
while step k scores and updates). Rollouts come from the chosen backend; with ``--pin`` (vLLM only)
the engine is bound to the first CPU and this process (the trainer: scoring and updates) to the
others, so that sampling and updating have hardware of their own, as they do when the engine has
its own accelerators. ``--epochs`` scales the update so that it is comparable to the rollout.

How to read the table. Medians over the steps after ``--warmup`` steps (compilation) of the
phases in ``metrics.jsonl`` (seconds): ``sample`` (the backend's generate, incl. weight sync),
``wait`` (how long the step waited for its rollout), ``score + update`` and the whole ``step``.
``step / max`` is the step time over max(sample, score + update) of the same mode: 1.0 is perfect
overlap, and a sequential step is ≈ (sample + score + update) / max. ``step / max (phases alone)``
divides by the phases measured in sequential mode, where each runs alone: phases that slow each
other down when they run at once (shared caches and memory bandwidth) show up there.

Usage:
    .venv/bin/python experiments/benchmarks/overlap.py --rollout-backend vllm --pin
    .venv/bin/python experiments/benchmarks/overlap.py --quick
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # _common, beside this file

QUICK = dict(layers=1, hidden=64, steps=4, warmup=1, prompts=4, group=2, new_tokens=8, epochs=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Step time with and without pipelined rollouts, by phase.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rollout-backend", choices=("jax", "vllm"), default="vllm")
    parser.add_argument("--pin", action="store_true",
                        help="bind the vLLM engine to CPU 0 and the trainer to the other CPUs")
    parser.add_argument("--layers", type=int, default=4, help="student layers")
    parser.add_argument("--teacher-layers", type=int, default=None, help="teacher layers (default: twice --layers)")
    parser.add_argument("--hidden", type=int, default=256, help="model width (head size 64)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="response budget (no stop token: all used)")
    parser.add_argument("--epochs", type=int, default=2, help="PPO epochs: scales the update")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke size")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.pin and args.rollout_backend != "vllm":
        parser.error("--pin binds the vLLM engine; it needs --rollout-backend vllm")
    args.teacher_layers = args.teacher_layers or 2 * args.layers
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    return args


def _models(args):
    import numpy as np
    from flax import nnx

    from opd_jax import models, train

    def config(layers):
        return models.DecoderConfig("qwen3", 512, args.hidden, 3 * args.hidden, layers, args.hidden // 64, 1, 64,
                                    qk_norm=True, max_position_embeddings=256)

    student_config = config(args.layers)
    student = models.Decoder(student_config, rngs=nnx.Rngs(0))
    teacher = models.Decoder(config(args.teacher_layers), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    prompts = train.PromptSet(rng.integers(1, 512, (256, 16)).astype(np.int32), np.ones((256, 16), bool))
    return student, student_config, teacher, prompts


def run_mode(args, pipelined: bool, folder: pathlib.Path) -> dict:
    from opd_jax import train

    student, student_config, teacher, prompts = _models(args)
    config = train.TrainConfig(
        prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.new_tokens, steps=args.steps,
        epochs=args.epochs, checkpoint_every=args.steps, learning_rate=1e-4, pipeline_rollouts=pipelined,
        rollout_backend=args.rollout_backend, seed=0)
    backend = None
    if args.rollout_backend == "vllm":
        from opd_jax.backends.vllm import VllmBackend

        env = {"VLLM_CPU_OMP_THREADS_BIND": "0"} if args.pin else {}
        backend = VllmBackend(student_config, student, max_num_seqs=args.prompts * args.group, env=env)
        if args.pin:  # every thread of the engine's process, not only its OpenMP workers
            for thread in pathlib.Path(f"/proc/{backend.pid}/task").iterdir():
                os.sched_setaffinity(int(thread.name), {0})
    try:
        result = train.train(config, student, student_config, teacher, prompts, folder, progress=False,
                             rollout_backend=backend)
    finally:
        if backend is not None:
            backend.close()
    timed = [r for r in result.history if "step_seconds" in r][args.warmup:]

    def median(key):
        return statistics.median(r[key] for r in timed)

    phases = {key: median(f"{key}_seconds") for key in ("sync", "sample", "rollout_wait", "score", "update", "step")}
    phases["sample"] += phases.pop("sync")
    phases["train"] = phases["score"] + phases["update"]
    phases["step_over_max"] = phases["step"] / max(phases["sample"], phases["train"])
    return phases


def markdown(results: dict) -> str:
    """The table of ``results`` (the ``results`` of the JSON file: mode -> phase medians, seconds)."""
    from _common import markdown_table

    rows = [[mode, f"{phases['sample']:.3f}", f"{phases['rollout_wait']:.3f}",
             f"{phases['score']:.3f} + {phases['update']:.3f}", f"{phases['step']:.3f}",
             f"{phases['step_over_max']:.2f}", f"{phases['step_over_max_alone']:.2f}"]
            for mode, phases in results.items()]
    return markdown_table(["mode", "sample", "wait", "score + update", "step", "step / max",
                           "step / max (phases alone)"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        os.sched_setaffinity(0, cpus[1:])  # before jax starts its thread pools
    from _common import machine_info, machine_lines, write_json

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for pipelined in (False, True):
            mode = "pipelined" if pipelined else "sequential"
            results[mode] = run_mode(args, pipelined, pathlib.Path(scratch) / mode)
    # The phases run alone (sequential mode) are the reference of what overlap can reach.
    alone = max(results["sequential"]["sample"], results["sequential"]["train"])
    for phases in results.values():
        phases["step_over_max_alone"] = phases["step"] / alone
    machine = machine_info()
    print("\n".join(machine_lines(machine)))
    print(f"backend {args.rollout_backend}{' (engine on CPU 0, trainer on the others)' if args.pin else ''}; "
          f"student {args.layers} x {args.hidden}, teacher {args.teacher_layers} x {args.hidden}; "
          f"{args.prompts} x {args.group} rollouts of {args.new_tokens} tokens, {args.epochs} epochs; medians of "
          f"steps {args.warmup + 1}..{args.steps} (s)\n")
    print(markdown(results))
    write_json(args.json, {"machine": machine, "settings": vars(args) | {"json": str(args.json)},
                           "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
