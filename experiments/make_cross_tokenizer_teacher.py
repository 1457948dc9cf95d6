"""Train the toy teacher of ``arithmetic_cross_tokenizer``: the arithmetic teacher's architecture and
training, on a tokenizer unlike the student's (every pair of digits is one token,
:func:`opd_jax.tasks.arithmetic.build_digit_pair_tokenizer`).

The student stays the shipped character-level one (``opd_jax/tasks/assets/student``), so distilling
this teacher into it needs ``tokenizer_alignment = "text"``. Writes ``<out>/teacher`` (config,
safetensors, tokenizer) and ``<out>/metadata.json``, through a scratch folder so a failure leaves the
previous ones intact.

Usage:
    .venv/bin/python experiments/make_cross_tokenizer_teacher.py        # ships to opd_jax/tasks/assets/cross_tokenizer
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import jax.numpy as jnp

import make_toy_models as toy
from opd_jax.models import save_pretrained
from opd_jax.tasks import arithmetic

DEFAULT_OUT = toy.DEFAULT_OUT / "cross_tokenizer"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="assets folder (teacher/, metadata)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the training problems")
    parser.add_argument("--steps", type=toy._positive_int, default=800, help="training steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--batch-size", type=toy._positive_int, default=128, help="problems per training step")
    parser.add_argument("--eval-problems", type=toy._positive_int, default=512, help="held-out problems reported")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    task = arithmetic.toy_task()
    tokenizer = arithmetic.build_digit_pair_tokenizer()
    max_new_tokens = task.max_response_length + 2
    student_config = json.loads((toy.DEFAULT_OUT / "student" / "config.json").read_text())
    config = toy.model_configs(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
                               student_config["max_position_embeddings"])["teacher"]
    teacher, training = toy.train("teacher", config, task, tokenizer, seed=args.seed, batch_size=args.batch_size,
                                  peak_lr=args.lr, steps=args.steps)
    held_out = task.sample_problems(toy.EVAL_SEED, args.eval_problems, split="test")
    metrics = toy.held_out_metrics(teacher, tokenizer, held_out, max_new_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=".cross-", dir=args.out.parent))
    try:
        save_pretrained(teacher, config, scratch / "teacher", dtype=jnp.float32)
        tokenizer.save_pretrained(scratch / "teacher")
        metadata = {"generator": "experiments/make_cross_tokenizer_teacher.py", "seed": args.seed,
                    "tokenizer": {"type": "digit pairs (opd_jax.tasks.arithmetic.build_digit_pair_tokenizer)",
                                  "vocab_size": len(tokenizer)},
                    "training": {"batch_size": args.batch_size, "peak_lr": args.lr, **training},
                    "held_out": metrics, "runtime_seconds": round(time.perf_counter() - started, 1)}
        (scratch / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        toy.publish(scratch, args.out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"teacher (digit pairs): held-out greedy accuracy {metrics['greedy_accuracy']:.3f}, "
          f"sampled {metrics['sampled_t1_accuracy']:.3f}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
