"""A run in a bucket beside the same run on local paths: step time and wall time, on the emulator.

What is measured. The packaged toy teacher and student (``opd_jax/tasks/assets``) and a prompt file
of arithmetic problems are uploaded to a bucket of fake-gcs-server (the real Cloud Storage JSON API,
in memory, on localhost). ``opd-jax train`` then runs twice with the same settings: on local paths,
and with ``--teacher``, ``--student``, ``--prompts`` and ``--output`` all ``gs://``. The bucket run
reads the models from the bucket, holds the lock object, writes checkpoints through tensorstore,
and rewrites ``metrics.jsonl`` whole at each flush.

How to read the table. ``step s`` is the median (and max) of ``step_seconds`` over the steps after
``--warmup`` (rollout, scoring and update; checkpoints are saved asynchronously beside the next
steps). ``wall s`` is the whole command, start-up, model reads, compilation and the last
checkpoint's upload included. An emulator on localhost has none of a real bucket's latency or
bandwidth limits, so this measures the library's own cost of a bucket, not Cloud Storage's.

Usage:
    .venv/bin/python experiments/benchmarks/bucket_run.py [--steps 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))  # the emulator fixture the tests use


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians (compilation)")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    return parser.parse_args(argv)


def _train(paths: dict[str, str], args: argparse.Namespace, env: dict[str, str]) -> float:
    """Wall seconds of one ``opd-jax train`` run."""
    argv = [sys.executable, "-m", "opd_jax", "train", *(x for flag, path in paths.items() for x in (flag, path)),
            "--steps", str(args.steps), "--checkpoint-every", str(args.checkpoint_every), "--prompts-per-step",
            str(args.prompts_per_step), "--group-size", str(args.group_size), "--max-new-tokens", "24",
            "--max-prompt-length", "8", "--no-chat-template", "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def _row(name: str, metrics_text: str, wall: float, warmup: int) -> dict:
    steps = [json.loads(line)["step_seconds"] for line in metrics_text.splitlines() if "step_seconds" in line]
    kept = steps[warmup:]
    return {"run": name, "steps": len(steps), "step_seconds_median": statistics.median(kept),
            "step_seconds_max": max(kept), "wall_seconds": wall}


def main(argv=None) -> None:
    args = parse_args(argv)
    import gcs_server

    from opd_jax.tasks.arithmetic import ASSETS_DIR, ToyArithmetic

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bucket_run_"))
    try:
        data = scratch / "data" / "opd"
        for role in ("teacher", "student"):
            shutil.copytree(ASSETS_DIR / role, data / "models" / role)
        problems = ToyArithmetic().problems("train", 256, 0)
        (data / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in problems))
        with gcs_server.fake_gcs_server(scratch / "data") as url:
            env = {**os.environ, **gcs_server.environment(url), "JAX_PLATFORMS": "cpu"}
            os.environ.update(gcs_server.environment(url))
            from opd_jax import storage

            rows = []
            for name, base, output in (("local", str(data), str(scratch / "local_run")),
                                       ("bucket", "gs://opd", "gs://opd/run")):
                paths = {"--teacher": f"{base}/models/teacher", "--student": f"{base}/models/student",
                         "--prompts": f"{base}/prompts.jsonl", "--output": output}
                wall = _train(paths, args, env)
                rows.append(_row(name, storage.as_path(f"{output}/metrics.jsonl").read_text(), wall, args.warmup))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{args.steps} steps of {args.prompts_per_step} × {args.group_size} rollouts, checkpoint every "
          f"{args.checkpoint_every}; step s after {args.warmup} warm-up steps\n")
    print("| run | step s (median) | step s (max) | wall s |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run']} | {row['step_seconds_median']:.3f} | {row['step_seconds_max']:.3f} | "
              f"{row['wall_seconds']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
