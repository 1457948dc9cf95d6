"""Pod-scale figures from the real TPU compiler (libtpu, ahead of time, on any host): nothing runs on a TPU.

Three tables, each from :func:`opd_jax.plan.compile_programs` / :func:`opd_jax.plan.plan`, the
same code as ``opd-jax plan``:

- ``depth``: compile seconds and per-chip temporaries of the update step of a Qwen3-8B-width
  student at 4 / 8 / 16 / 36 layers (one 2048-token sequence per chip, v5p-16 = 8 chips). The
  layers are one ``lax.scan``, so compile time should not grow with depth.
- ``remat``: update-step temporaries per chip for ``none`` / ``dots`` / ``full`` at two sequence
  lengths (Qwen3-1.7B student, one sequence per chip, v5p-16).
- ``sizing``: the whole step (rollout, score, update) for students × sequence lengths ×
  topologies with a Qwen3-8B bf16 teacher, 64 prompts × 4 samples, 8 update minibatches, a
  1024-token prompt, logits projected 1024 tokens at a time. Results are kept in ``--out``/sizing.json and finished rows are reused, so
  the grid can be filled in over several runs.

Usage (needs the tpu extra: ``pip install -e '.[tpu]'``):

    JAX_PLATFORMS=cpu python experiments/pod_scale.py depth
    JAX_PLATFORMS=cpu python experiments/pod_scale.py remat
    JAX_PLATFORMS=cpu python experiments/pod_scale.py sizing [--students qwen3-1.7b ...] [--lengths 8192 ...]
        [--topologies v5p-64 ...]

Each prints a Markdown table (GiB = 2**30 bytes per chip) and writes JSON beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from opd_jax import plan
from opd_jax.config import TrainConfig
from opd_jax.models import Execution
from opd_jax.models.presets import PRESETS

GIB = 2**30
DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "pod_scale"
# Tokens per vocabulary-projection chunk in scoring and the update, as the recorded tables were
# compiled (before "auto" became the default): 1024 × 151,936 float32 logits are 0.6 GB, where
# unchunked [rows, L, V] logits would not fit any chip.
LOGIT_CHUNK = 1024


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _gib(value) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def depth_table(layers=(4, 8, 16, 36), topology="v5p-16", length=2048, repeats=2) -> tuple[list[dict], str]:
    """Each depth compiled ``repeats`` times, the rounds interleaved (so a burst of load from another
    process hits every depth alike); the minimum compile time is reported."""
    width = PRESETS["qwen3-8b"]
    seconds: dict[int, list[float]] = {count: [] for count in layers}
    memory: dict[int, dict] = {}
    for _ in range(repeats):
        for count in layers:
            student = dataclasses.replace(width, num_layers=count)
            config = plan.PlanConfig(student=student, teacher=student, topology=topology, prompt_length=length // 2,
                                     train=_train_config(8, 1, 1, length - length // 2),
                                     execution=Execution(remat="full"),
                                     student_name=f"qwen3-8b width, {count} layers")
            update = plan.report(plan.compile_programs(config, programs=("update",), progress=_progress))
            seconds[count].append(update["programs"]["update"]["compile_seconds"])
            memory[count] = update["programs"]["update"]
    rows = [{"layers": count, "compile_seconds": min(seconds[count]), "compile_seconds_all": seconds[count],
             "temp_bytes": memory[count]["temp_bytes"], "peak_bytes": memory[count]["peak_bytes"]} for count in layers]
    return rows, depth_markdown(rows, topology=topology, length=length)


def depth_markdown(rows: list[dict], topology="v5p-16", length=2048) -> str:
    """The table of :func:`depth_table`'s rows (``depth.json``)."""
    fastest = min(r["compile_seconds"] for r in rows)
    repeats = len(rows[0]["compile_seconds_all"])
    lines = [f"update step, Qwen3-8B width, {topology}, one {length}-token sequence per chip, remat full; "
             f"compile seconds: minimum of {repeats} interleaved rounds",
             "", "| layers | compile s | × fastest | temp GiB/chip | peak GiB/chip |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layers']} | {r['compile_seconds']:.1f} | {r['compile_seconds'] / fastest:.2f} | "
              f"{_gib(r['temp_bytes'])} | {_gib(r['peak_bytes'])} |" for r in rows]
    return "\n".join(lines)


def remat_table(lengths=(2048, 4096), topology="v5p-16", student="qwen3-1.7b") -> tuple[list[dict], str]:
    rows = []
    for length in lengths:
        for policy in ("none", "dots", "full"):
            config = plan.PlanConfig(student=PRESETS[student], teacher=PRESETS[student], topology=topology,
                                     prompt_length=length // 2, train=_train_config(8, 1, 1, length - length // 2),
                                     execution=Execution(remat=policy), student_name=student)
            update = plan.report(plan.compile_programs(config, programs=("update",), progress=_progress))
            entry = update["programs"]["update"]
            rows.append({"sequence_length": length, "remat": policy, "temp_bytes": entry["temp_bytes"],
                         "peak_bytes": entry["peak_bytes"], "compiler_error": entry.get("compiler_error")})
    return rows, remat_markdown(rows, topology=topology, student=student)


def remat_markdown(rows: list[dict], topology="v5p-16", student="qwen3-1.7b") -> str:
    """The table of :func:`remat_table`'s rows (``remat.json``)."""
    lines = [f"update step temporaries, {student}, {topology}, one sequence per chip (memory_analysis)", "",
             "| L | remat | temp GiB/chip | peak GiB/chip |", "|---:|---|---:|---:|"]
    lines += [f"| {r['sequence_length']} | {r['remat']} | {_gib(r['temp_bytes'])} | {_gib(r['peak_bytes'])} |"
              for r in rows]
    return "\n".join(lines)


def sizing_config(student: str, length: int, topology: str, teacher: str = "qwen3-8b") -> plan.PlanConfig:
    return plan.PlanConfig(student=PRESETS[student], teacher=PRESETS[teacher], topology=topology, prompt_length=1024,
                           train=_train_config(64, 4, 8, length - 1024), execution=Execution(remat="full"),
                           student_name=student,
                           teacher_name=teacher)


def _train_config(prompts_per_step: int, group_size: int, minibatches: int, new_tokens: int) -> TrainConfig:
    """The run's options at their defaults but for the batch, the response length and the recorded chunk."""
    return TrainConfig(prompts_per_step=prompts_per_step, group_size=group_size, minibatches=minibatches,
                       max_new_tokens=new_tokens, logit_chunk_size=LOGIT_CHUNK)


def sizing_table(students, lengths, topologies, out: pathlib.Path) -> tuple[list[dict], str]:
    path = out / "sizing.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    for topology in topologies:
        for student in students:
            for length in lengths:
                key = f"{student}|{length}|{topology}"
                if key in done:
                    continue
                _progress(f"== {key}")
                done[key] = plan.plan(sizing_config(student, length, topology), progress=_progress)
                path.write_text(json.dumps(done, indent=1) + "\n")  # keep finished rows if a later one dies
    return list(done.values()), sizing_markdown(done)


def sizing_markdown(done: dict[str, dict]) -> str:
    """The table of ``sizing.json``: ``"student|length|topology"`` -> :func:`opd_jax.plan.plan`'s report."""
    header = ["| student | L | topology | mesh d×f×t | rollout GiB | score GiB | update GiB | of chip | fits | "
              "est. step s |", "|---|---:|---|---|---:|---:|---:|---:|---|---:|"]
    lines = []
    for key, result in done.items():
        student, length, topology = key.split("|")
        programs, mesh = result["programs"], result["mesh"]
        worst = max(p["total_bytes"] for p in programs.values())
        step = result["estimated_step_seconds"]
        lines.append(
            f"| {student} | {length} | {topology} ({result['devices']} chips) | "
            f"{mesh['data']}×{mesh['fsdp']}×{mesh['tensor']} | "
            + " | ".join(_gib(programs[p]["total_bytes"]) for p in plan.PROGRAMS)
            + f" | {worst / result['device_memory_bytes']:.0%} | {'yes' if result['fits'] else 'NO'} | "
            f"{'—' if step is None else f'{step:.1f}'} |")
    return "\n".join(header + lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=("depth", "remat", "sizing"))
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"results folder [{DEFAULT_OUT}]")
    parser.add_argument("--students", nargs="+", default=["qwen3-1.7b", "qwen3-4b", "qwen3-8b"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    parser.add_argument("--topologies", nargs="+", default=["v5p-32", "v5p-64", "v5p-128", "v6e-64"])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table == "depth":
        rows, table = depth_table()
    elif args.table == "remat":
        rows, table = remat_table()
    else:
        rows, table = sizing_table(args.students, args.lengths, args.topologies, args.out)
    if args.table != "sizing":
        (args.out / f"{args.table}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{args.table}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
