"""Regenerate the toy teacher and student shipped in ``opd_jax/tasks/assets``.

Both are tiny Qwen3-style decoders trained with supervised next-token cross-entropy on
``prompt + worked solution + EOS`` of :class:`opd_jax.tasks.ArithmeticTask` problems (2-digit
addition and subtraction by default), the loss masked to the solution and EOS tokens:

* the **teacher** (wider and deeper) trains for a fixed number of steps and should solve held-out
  problems almost always (greedy);
* the **student** (smaller, but able to learn the task given time) is stopped early: training ends
  at the first check where its greedy accuracy on a validation set of *training-split* problems
  reaches ``--student-target``. That makes it weak but not hopeless, with the answer format already
  right, so its errors are arithmetic ones a teacher can correct.

Held-out accuracies are then measured on ``--eval-problems`` problems of the test split (a fixed
hash partition of the problem space that training never sees), greedy and sampled at temperature
1, and written with every setting to ``<out>/metadata.json`` and ``<out>/README.md``. Each model
folder holds ``config.json``, ``model.safetensors`` and the tokenizer files, so
``opd_jax.models.from_pretrained`` and ``opd_jax.tokenization.load_tokenizer`` both work on it.

The training step is ``jax.jit`` of a pure function of the parameter state (``nnx.split``): the
library's per-token log-probabilities (:func:`opd_jax.sampling.token_log_probs`) under the explicit
loss mask, with optax AdamW, gradient clipping and a warmup-cosine schedule. (The shipped assets
were trained by an earlier version of this script that computed the same loss from full logits;
regenerating them gives equivalent, not bitwise identical, weights.)

``--head-dim 32`` makes the variant the vLLM rollout backend can serve (vLLM's CPU attention takes
head sizes 32, 64, 80, ... but not the default 12 and 24); it ships in ``opd_jax/tasks/assets/vllm``.

Usage:
    .venv/bin/python experiments/make_toy_models.py                 # ships to opd_jax/tasks/assets
    .venv/bin/python experiments/make_toy_models.py --head-dim 32 --out opd_jax/tasks/assets/vllm
    .venv/bin/python experiments/make_toy_models.py --out /tmp/toy --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from opd_jax.models import Decoder, DecoderConfig, RopeConfig, save_pretrained
from opd_jax.sampling import token_log_probs
from opd_jax.tasks import arithmetic

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "opd_jax" / "tasks" / "assets"
EVAL_SEED = 1234  # the held-out problems in metadata.json
VALIDATION_SEED = 4321  # training-split problems used to decide when the student stops


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="assets folder (teacher/, student/, metadata)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisations and the training problems")
    parser.add_argument("--digits", type=_positive_int, default=2, help="operand digits of the task")
    parser.add_argument("--operations", default="+-", help="operations of the task, e.g. '+-' or '+'")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="problems per training step")
    parser.add_argument("--teacher-steps", type=_positive_int, default=800, help="teacher training steps")
    parser.add_argument("--teacher-lr", type=float, default=2e-3, help="teacher peak learning rate")
    parser.add_argument("--student-lr", type=float, default=3e-3, help="student peak learning rate")
    parser.add_argument(
        "--student-max-steps", type=_positive_int, default=600,
        help="student step budget; also the length of its learning-rate schedule",
    )
    parser.add_argument(
        "--student-target", type=_fraction, default=0.25,
        help="stop the student at the first check where its greedy validation accuracy reaches this",
    )
    parser.add_argument("--student-check-every", type=_positive_int, default=10, help="steps between student checks")
    parser.add_argument("--validation-problems", type=_positive_int, default=256, help="training-split problems per student check")
    parser.add_argument("--eval-problems", type=_positive_int, default=512, help="held-out (test split) problems for the reported accuracies")
    parser.add_argument("--head-dim", type=_positive_int, default=None,
                        help="attention head size of both models (default: 24 teacher, 12 student); 32 for vLLM")
    parser.add_argument("--disk-dtype", choices=("float32", "bfloat16"), default="float32", help="tensor dtype on disk")
    return parser.parse_args(argv)


def model_configs(vocab_size: int, eos_id: int, pad_id: int, max_positions: int,
                  head_dim: int | None = None) -> dict[str, DecoderConfig]:
    common = dict(
        model_type="qwen3",
        vocab_size=vocab_size,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0),
        tie_word_embeddings=True,
        qk_norm=True,
        max_position_embeddings=max_positions,
        eos_token_id=(eos_id,),
        pad_token_id=pad_id,
    )
    return {
        "teacher": DecoderConfig(
            hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=head_dim or 24,
            **common
        ),
        "student": DecoderConfig(
            hidden_size=48, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=head_dim or 12,
            **common
        ),
    }


class Batches:
    """Training batches: ``(tokens_BxL, token_mask_BxL, loss_mask_BxL)``, prompt + solution + EOS,
    right-padded; the loss mask marks the solution and EOS tokens (the targets the model must predict)."""

    def __init__(self, task, tokenizer, batch_size: int, seed: int):
        self.task, self.tokenizer, self.batch_size = task, tokenizer, batch_size
        self.rng = np.random.default_rng(seed)
        self.length = task.max_prompt_length + task.max_response_length

    def __next__(self):
        problems = self.task.sample_problems(self.rng, self.batch_size, split="train")
        prompts = self.tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
        solutions = self.tokenizer([p.solution for p in problems], add_special_tokens=False)["input_ids"]
        tokens = np.full((self.batch_size, self.length), self.tokenizer.pad_token_id, np.int32)
        token_mask = np.zeros((self.batch_size, self.length), bool)
        loss_mask = np.zeros((self.batch_size, self.length), bool)
        for row, (prompt, solution) in enumerate(zip(prompts, solutions)):
            ids = prompt + solution + [self.tokenizer.eos_token_id]
            tokens[row, : len(ids)] = ids
            token_mask[row, : len(ids)] = True
            loss_mask[row, len(prompt) : len(ids)] = True
        return tokens, token_mask, loss_mask


def supervised_loss(model: Decoder, tokens_BxL, token_mask_BxL, loss_mask_BxL):
    """Mean next-token cross-entropy over the ``loss_mask_BxL`` targets (a subset of ``token_mask_BxL``).

    :func:`opd_jax.sampling.token_log_probs` gives ``log p(tokens[t] | tokens[<t])`` at slot ``t``,
    so the loss mask marks the target tokens themselves.
    """
    logp_BxL = token_log_probs(model, tokens_BxL, token_mask_BxL)
    weights_BxL = loss_mask_BxL.astype(jnp.float32)
    return -(logp_BxL * weights_BxL).sum() / weights_BxL.sum()


def make_train_step(graphdef, optimizer):
    """``step(params, opt_state, tokens_BxL, token_mask_BxL, loss_mask_BxL) -> (params, opt_state, loss)``, jitted."""

    def loss_fn(params, tokens_BxL, token_mask_BxL, loss_mask_BxL):
        return supervised_loss(nnx.merge(graphdef, params), tokens_BxL, token_mask_BxL, loss_mask_BxL)

    @jax.jit
    def step(params, opt_state, tokens_BxL, token_mask_BxL, loss_mask_BxL):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxL, token_mask_BxL, loss_mask_BxL)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_optimizer(peak_lr: float, steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=max(1, min(100, steps // 10)),
        decay_steps=steps, end_value=peak_lr * 0.1,
    )
    # No weight decay on gains (1-D parameters).
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01, mask=decay_mask),
    )


def train(
    name: str,
    config: DecoderConfig,
    task,
    tokenizer,
    *,
    seed: int,
    batch_size: int,
    peak_lr: float,
    steps: int,
    stop_when=None,
    check_every: int = 0,
):
    """Train from scratch; ``stop_when(model) -> (stop, accuracy)`` is called every ``check_every`` steps."""
    model = Decoder(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(peak_lr, steps)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(graphdef, optimizer)
    batches = Batches(task, tokenizer, batch_size, seed=seed + 1)
    started = time.perf_counter()
    last_check = None
    steps_done = steps
    with tqdm(range(1, steps + 1), desc=name, unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        for index in bar:
            params, opt_state, loss = step_fn(params, opt_state, *next(batches))
            if index % 20 == 0 or index == steps:
                bar.set_postfix(loss=f"{float(loss):.4f}", **({} if last_check is None else {"val_acc": f"{last_check:.3f}"}))
            if stop_when is not None and check_every and index % check_every == 0:
                stop, last_check = stop_when(nnx.merge(graphdef, params))
                if stop:
                    steps_done = index
                    bar.set_postfix(loss=f"{float(loss):.4f}", val_acc=f"{last_check:.3f}")
                    break
    return nnx.merge(graphdef, params), {
        "steps": steps_done,
        "final_loss": round(float(loss), 5),
        "train_seconds": round(time.perf_counter() - started, 1),
        "stopped_early": steps_done < steps,
        "validation_accuracy_at_stop": last_check,
    }


def held_out_metrics(model, tokenizer, problems, max_new_tokens: int) -> dict:
    greedy = arithmetic.evaluate(model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=128)
    sampled = arithmetic.evaluate(
        model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=128,
        key=jax.random.key(EVAL_SEED), temperature=1.0,
    )
    well_formed = np.mean([arithmetic.extract_answer(r) is not None for r in greedy.responses])
    return {
        "greedy_accuracy": round(greedy.accuracy, 4),
        "greedy_mean_response_length": round(greedy.mean_response_length, 2),
        "greedy_finished_fraction": round(float(greedy.finished.mean()), 4),
        "greedy_well_formed_fraction": round(float(well_formed), 4),
        "sampled_t1_accuracy": round(sampled.accuracy, 4),
        "sampled_t1_mean_response_length": round(sampled.mean_response_length, 2),
        "greedy_examples": [
            {"prompt": p.prompt, "response": r, "correct": bool(c)}
            for p, r, c in list(zip(problems, greedy.responses, greedy.correct))[:6]
        ],
    }


def folder_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_readme(out: pathlib.Path, metadata: dict) -> None:
    rows = []
    for role in ("teacher", "student"):
        m = metadata["models"][role]
        c, e = m["config"], m["held_out"]
        rows.append(
            f"| {role} | {c['num_layers']} × {c['hidden_size']} (heads {c['num_heads']}/{c['num_kv_heads']}, "
            f"mlp {c['intermediate_size']}) | {m['parameters']:,} | {m['training']['steps']} | "
            f"{e['greedy_accuracy']:.3f} | {e['sampled_t1_accuracy']:.3f} | {e['greedy_mean_response_length']:.1f} | "
            f"{m['bytes'] / 1e6:.2f} MB |"
        )
    task = metadata["task"]
    text = f"""# Toy arithmetic teacher and student

Generated by `experiments/make_toy_models.py` (seed {metadata['seed']}, {metadata['runtime_seconds']:.0f} s on
{metadata['cpu_count']} CPU cores); do not edit by hand. Task: `ArithmeticTask(digits={task['digits']},
operations={tuple(task['operations'])}, test_fraction={task['test_fraction']})`, e.g. `57+68=` →
`7+8+0=15,5+6+1=12>125` then EOS. Character-level tokenizer ({metadata['tokenizer']['vocab_size']} tokens,
`<eos>` = {metadata['tokenizer']['eos_token_id']}, `<pad>` = {metadata['tokenizer']['pad_token_id']}) in both folders.

Accuracies on {metadata['eval']['problems']} held-out problems (test split, seed {metadata['eval']['seed']},
`max_new_tokens` {metadata['eval']['max_new_tokens']}); a response must stop with EOS and give the exact answer.

| model | layers × width | parameters | steps | greedy acc. | sampled acc. (T=1) | mean length (tokens) | size |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The student was stopped at the first check (every {metadata['models']['student']['training']['check_every']} steps)
where its greedy accuracy on {metadata['models']['student']['training']['validation_problems']} training-split problems
reached {metadata['models']['student']['training']['target']}. All settings are in `metadata.json`.

```python
from opd_jax import models, tokenization, tasks
teacher, teacher_config = models.from_pretrained(tasks.toy_model_path("teacher"))
tokenizer = tokenization.load_tokenizer(tasks.toy_model_path("teacher"))
result = tasks.evaluate(teacher, tokenizer, tasks.toy_task().sample_problems(0, 64, split="test"))
```
"""
    (out / "README.md").write_text(text)


def publish(scratch: pathlib.Path, out: pathlib.Path) -> None:
    """Move the generated entries into ``out``, replacing only entries of the same names."""
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(scratch.iterdir()):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        entry.rename(target)
        # World-readable package data (mkdtemp and some writers create owner-only modes).
        for path in (target, *target.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
    scratch.rmdir()


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    task = arithmetic.ArithmeticTask(digits=args.digits, operations=tuple(args.operations))
    tokenizer = arithmetic.build_tokenizer()
    max_new_tokens = task.max_response_length + 2
    # Room for the prompt and a generous response budget (generate checks the sum against it).
    max_positions = max(64, -(-2 * (task.max_prompt_length + max_new_tokens) // 16) * 16)
    configs = model_configs(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, max_positions,
                            args.head_dim)
    held_out = task.sample_problems(EVAL_SEED, args.eval_problems, split="test")
    validation = task.sample_problems(VALIDATION_SEED, args.validation_problems, split="train")

    teacher, teacher_training = train(
        "teacher", configs["teacher"], task, tokenizer, seed=args.seed, batch_size=args.batch_size,
        peak_lr=args.teacher_lr, steps=args.teacher_steps,
    )

    def student_reached_target(model):
        accuracy = arithmetic.evaluate(model, tokenizer, validation, max_new_tokens=max_new_tokens, batch_size=128).accuracy
        return accuracy >= args.student_target, round(accuracy, 4)

    student, student_training = train(
        "student", configs["student"], task, tokenizer, seed=args.seed + 100, batch_size=args.batch_size,
        peak_lr=args.student_lr, steps=args.student_max_steps, stop_when=student_reached_target,
        check_every=args.student_check_every,
    )
    student_training.update(
        target=args.student_target, check_every=args.student_check_every, validation_problems=args.validation_problems
    )
    if not student_training["stopped_early"]:
        print(f"warning: the student never reached {args.student_target} validation accuracy", file=sys.stderr)

    # Write everything into a scratch folder first so a failure leaves the previous assets intact.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=".toy-", dir=args.out.parent))
    metadata = {
        "generator": "experiments/make_toy_models.py",
        "seed": args.seed,
        "task": task.to_dict(),
        "tokenizer": {
            "type": "character level (opd_jax.tasks.arithmetic.build_tokenizer)",
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "eval": {"problems": args.eval_problems, "split": "test", "seed": EVAL_SEED, "max_new_tokens": max_new_tokens},
        "models": {},
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
        "cpu_count": os.cpu_count(),
    }
    try:
        lrs = {"teacher": args.teacher_lr, "student": args.student_lr}
        for role, model, training in (("teacher", teacher, teacher_training), ("student", student, student_training)):
            folder = scratch / role
            save_pretrained(model, configs[role], folder, dtype=jnp.dtype(args.disk_dtype))
            tokenizer.save_pretrained(folder)
            metrics = held_out_metrics(model, tokenizer, held_out, max_new_tokens)
            config = configs[role]
            metadata["models"][role] = {
                "config": {
                    key: getattr(config, key)
                    for key in ("model_type", "num_layers", "hidden_size", "intermediate_size", "num_heads",
                                "num_kv_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings")
                },
                "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
                "disk_dtype": args.disk_dtype,
                "bytes": folder_bytes(folder),
                "training": {
                    "batch_size": args.batch_size, "peak_lr": lrs[role],
                    "optimizer": "adamw(b1=0.9, b2=0.98, weight_decay=0.01 on matrices), clip_by_global_norm(1.0), "
                                 "warmup_cosine (warmup min(100, steps/10), end 0.1*peak)",
                    **training,
                },
                "held_out": metrics,
            }
            print(
                f"{role}: {metadata['models'][role]['parameters']:,} parameters, "
                f"{metadata['models'][role]['training']['steps']} steps, held-out greedy accuracy "
                f"{metrics['greedy_accuracy']:.3f} (sampled T=1: {metrics['sampled_t1_accuracy']:.3f}), "
                f"mean response length {metrics['greedy_mean_response_length']:.1f} tokens",
                flush=True,
            )
        metadata["runtime_seconds"] = round(time.perf_counter() - started, 1)
        (scratch / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        write_readme(scratch, metadata)
        publish(scratch, args.out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # left over only after a failure
    total = folder_bytes(args.out)
    print(f"wrote {args.out} ({total / 1e6:.2f} MB) in {metadata['runtime_seconds']:.0f} s")
    if metadata["models"]["teacher"]["held_out"]["greedy_accuracy"] < 0.9:
        print("warning: the teacher's held-out greedy accuracy is below 0.9", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
