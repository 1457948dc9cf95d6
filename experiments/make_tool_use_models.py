"""Regenerate the toy tool-use teacher and student shipped in ``opd_jax/tasks/assets/tool_use``.

Same recipe as ``experiments/make_toy_models.py`` (whose model sizes, optimiser and jitted step this
script imports; the loss is its ``supervised_loss``, the library's
:func:`opd_jax.sampling.token_log_probs` under an explicit loss mask): supervised next-token cross-entropy on reference transcripts of
:class:`opd_jax.tasks.tool_use.ToolUseTask` questions, ``prompt + calls/outputs + >answer + EOS``,
with the loss on the tokens the *model* writes (calls, the answer, EOS) and not on the tool outputs
the environment inserts (they are context, as in the multi-turn rollouts of OPD).

* the **teacher** (3 × 96) trains for a fixed number of steps;
* the **student** (2 × 48) stops at the first check where its greedy answer accuracy on
  training-split questions (multi-turn rollouts with the real tools) reaches ``--student-target``
  (checks every ``--student-check-every`` steps, and every step once a third of the target is
  reached, because accuracy jumps within a few steps once the student copies operators right).

Held-out metrics (test split; greedy and temperature-1 multi-turn rollouts: answer accuracy, call
validity, exact calls, lengths) go with every setting into ``<out>/metadata.json`` and
``<out>/README.md``.

``--teacher opd_jax/tasks/assets/tool_use/teacher --head-dim 32 --out opd_jax/tasks/assets/tool_use_vllm``
trains a student vLLM's CPU attention serves (head size 32; vLLM rejects 12) for the shipped
teacher, which stays where it is (the teacher only scores, in JAX, so its head size does not matter).

Usage:
    nice -n 10 .venv/bin/python experiments/make_tool_use_models.py       # ships to opd_jax/tasks/assets/tool_use
    nice -n 10 .venv/bin/python experiments/make_tool_use_models.py --out /tmp/tool --teacher-steps 50
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_toy_models import folder_bytes, make_optimizer, make_train_step, model_configs, publish  # noqa: E402

from opd_jax.models import Decoder, save_pretrained  # noqa: E402
from opd_jax.tasks import tool_use  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "opd_jax" / "tasks" / "assets" / "tool_use"
EVAL_SEED = 1234
VALIDATION_SEED = 4321


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="assets folder (teacher/, student/, metadata)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisations and the training questions")
    parser.add_argument("--batch-size", type=int, default=128, help="questions per training step")
    parser.add_argument("--teacher-steps", type=int, default=300, help="teacher training steps")
    parser.add_argument("--teacher-lr", type=float, default=2e-3, help="teacher peak learning rate")
    parser.add_argument("--student-lr", type=float, default=3e-3, help="student peak learning rate")
    parser.add_argument("--student-max-steps", type=int, default=600, help="student step budget (and schedule length)")
    parser.add_argument("--student-target", type=float, default=0.3, help="stop the student when its greedy validation accuracy reaches this")
    parser.add_argument("--student-check-every", type=int, default=10, help="steps between student checks")
    parser.add_argument("--validation-problems", type=int, default=256, help="training-split questions per student check")
    parser.add_argument("--eval-problems", type=int, default=512, help="held-out questions for the reported metrics")
    parser.add_argument("--head-dim", type=int, default=None,
                        help="attention head size of the models trained here (default: 24 teacher, 12 student); "
                             "32 for vLLM's CPU attention")
    parser.add_argument("--teacher", type=pathlib.Path, default=None,
                        help="use this shipped teacher folder (its metadata from the folder above) instead of "
                             "training one; --out then holds the student only")
    return parser.parse_args(argv)


class Batches:
    """Training batches ``(tokens_BxL, token_mask_BxL, loss_mask_BxL)``: prompt + reference transcript
    + EOS, right-padded; the loss mask marks the model-written tokens (calls, answer, EOS), not the
    prompt or tool outputs."""

    def __init__(self, task: tool_use.ToolUseTask, batch_size: int, seed: int):
        self.task, self.batch_size = task, batch_size
        self.vocabulary = tool_use.Vocabulary()
        self.rng = np.random.default_rng(seed)
        self.length = task.max_prompt_length + task.max_response_length

    def __next__(self):
        v = self.vocabulary
        tokens = np.full((self.batch_size, self.length), v.pad_id, np.int32)
        token_mask = np.zeros((self.batch_size, self.length), bool)
        loss_mask = np.zeros((self.batch_size, self.length), bool)
        for row, problem in enumerate(self.task.sample_problems(self.rng, self.batch_size, split="train")):
            ids, targets = v.encode(problem.prompt), [False] * len(problem.prompt)
            for text, by_model in tool_use.transcript_segments(problem):
                ids += v.encode(text)
                targets += [by_model] * len(text)
            ids.append(v.eos_id)
            targets.append(True)
            tokens[row, : len(ids)] = ids
            token_mask[row, : len(ids)] = True
            loss_mask[row, : len(ids)] = targets
        # Trim the common right padding (to a multiple of 8, so only a few shapes compile).
        length = min(self.length, -(-int(token_mask.sum(axis=1).max()) // 8) * 8)
        return tokens[:, :length], token_mask[:, :length], loss_mask[:, :length]


def train(name, config, task, *, seed, batch_size, peak_lr, steps, stop_when=None, check_every=0, near_target=1.0):
    """Train from scratch; ``stop_when(model) -> (stop, accuracy)`` every ``check_every`` steps,
    and every step once the last checked accuracy reached ``near_target``."""
    model = Decoder(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(peak_lr, steps)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(graphdef, optimizer)
    batches = Batches(task, batch_size, seed=seed + 1)
    started = time.perf_counter()
    last_check, steps_done = None, steps
    with tqdm(range(1, steps + 1), desc=name, unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        for index in bar:
            params, opt_state, loss = step_fn(params, opt_state, *next(batches))
            if index % 20 == 0 or index == steps:
                bar.set_postfix(loss=f"{float(loss):.4f}", **({} if last_check is None else {"val_acc": f"{last_check:.3f}"}))
            # Accuracy can jump within a few steps once the format is learnt: near the target,
            # check every step so the student stops close to it.
            near = last_check is not None and last_check >= near_target
            if stop_when is not None and check_every and (near or index % check_every == 0):
                stop, last_check = stop_when(nnx.merge(graphdef, params))
                if stop:
                    steps_done = index
                    break
    return nnx.merge(graphdef, params), {
        "steps": steps_done,
        "final_loss": round(float(loss), 5),
        "train_seconds": round(time.perf_counter() - started, 1),
        "stopped_early": steps_done < steps,
        "validation_accuracy_at_stop": last_check,
    }


def held_out_metrics(model, problems) -> dict:
    greedy = tool_use.evaluate(model, problems, batch_size=128)
    sampled = tool_use.evaluate(model, problems, batch_size=128, key=jax.random.key(EVAL_SEED), temperature=1.0)
    by_kind = {}
    for kind in tool_use.KINDS:
        rows = [i for i, p in enumerate(problems) if p.kind == kind]
        if rows:
            by_kind[kind] = round(float(np.mean([greedy.checks[i].answer_correct and greedy.finished[i] for i in rows])), 4)
    return {
        "greedy_accuracy": round(greedy.accuracy, 4),
        "greedy_call_validity": round(greedy.call_validity, 4),
        "greedy_call_exactness": round(greedy.call_exactness, 4),
        "greedy_accuracy_by_kind": by_kind,
        "greedy_mean_response_length": round(greedy.mean_response_length, 2),
        "greedy_mean_transcript_length": round(greedy.mean_transcript_length, 2),
        "greedy_finished_fraction": round(float(greedy.finished.mean()), 4),
        "sampled_t1_accuracy": round(sampled.accuracy, 4),
        "sampled_t1_call_validity": round(sampled.call_validity, 4),
        "greedy_examples": [
            {"prompt": p.prompt, "transcript": t, "correct": bool(c.answer_correct and f)}
            for p, t, c, f in list(zip(problems, greedy.transcripts, greedy.checks, greedy.finished))[:8]
        ],
    }


def write_readme(out: pathlib.Path, metadata: dict) -> None:
    rows = []
    for role in ("teacher", "student"):
        m = metadata["models"][role]
        c, e = m["config"], m["held_out"]
        rows.append(
            f"| {role} | {c['num_layers']} × {c['hidden_size']} | {m['parameters']:,} | {m['training']['steps']} | "
            f"{e['greedy_accuracy']:.3f} | {e['greedy_call_validity']:.3f} | {e['greedy_call_exactness']:.3f} | "
            f"{e['sampled_t1_accuracy']:.3f} | {e['greedy_mean_response_length']:.1f} / {e['greedy_mean_transcript_length']:.1f} | "
            f"{m['bytes'] / 1e6:.2f} MB |"
        )
    student = metadata["models"]["student"]["training"]
    shipped = metadata["models"]["teacher"].get("folder")
    where = "in both folders" if shipped is None else f"in `student/` and in the teacher's folder `{shipped}` (not copied here)"
    text = f"""# Toy tool-use teacher and student

Generated by `experiments/make_tool_use_models.py` (seed {metadata['seed']}, {metadata['runtime_seconds']:.0f} s on
{metadata['cpu_count']} CPU cores); do not edit by hand. Task: `ToolUseTask(kinds={tuple(metadata['task']['kinds'])})`,
e.g. `k*7?` → `[look:k]=35[calc:35*7]=245>245` then EOS, where `=35` and `=245` are tool outputs the
environment inserts. Character-level tokenizer ({metadata['tokenizer']['vocab_size']} tokens, `<eos>` =
{metadata['tokenizer']['eos_token_id']}, `<pad>` = {metadata['tokenizer']['pad_token_id']}) {where}.

Metrics on {metadata['eval']['problems']} held-out questions (test split, seed {metadata['eval']['seed']}),
multi-turn rollouts with the real tools, budget {metadata['eval']['max_new_tokens']} tokens; a response must stop with EOS.

| model | layers × width | parameters | steps | greedy answer acc. | call validity | exact calls | sampled acc. (T=1) | length (model / with tools) | size |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The student was stopped at the first check (every {student['check_every']} steps, every step once it passed a third
of the target) where its greedy answer accuracy on {student['validation_problems']} training-split questions reached
{student['target']}.
All settings and per-kind accuracies are in `metadata.json`.
"""
    (out / "README.md").write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    task = tool_use.ToolUseTask()
    tokenizer = tool_use.build_tokenizer()
    vocabulary = tool_use.Vocabulary()
    budget = task.max_response_length + 4
    # The rollout re-prefills prompt + response (P + N slots) and may sample N more.
    max_positions = -(-(task.max_prompt_length + 2 * budget) // 16) * 16
    configs = model_configs(len(vocabulary), vocabulary.eos_id, vocabulary.pad_id, max_positions, args.head_dim)
    held_out = task.sample_problems(EVAL_SEED, args.eval_problems, split="test")
    validation = task.sample_problems(VALIDATION_SEED, args.validation_problems, split="train")

    shipped_teacher = None
    if args.teacher is not None:
        shipped_teacher = json.loads((args.teacher.parent / "metadata.json").read_text())["models"]["teacher"]
        shipped_teacher["folder"] = os.path.relpath(args.teacher.resolve(), args.out.resolve())
    else:
        teacher, teacher_training = train(
            "teacher", configs["teacher"], task, seed=args.seed, batch_size=args.batch_size,
            peak_lr=args.teacher_lr, steps=args.teacher_steps,
        )

    def student_reached_target(model):
        accuracy = tool_use.evaluate(model, validation, batch_size=128).accuracy
        return accuracy >= args.student_target, round(accuracy, 4)

    student, student_training = train(
        "student", configs["student"], task, seed=args.seed + 100, batch_size=args.batch_size,
        peak_lr=args.student_lr, steps=args.student_max_steps, stop_when=student_reached_target,
        check_every=args.student_check_every, near_target=args.student_target / 3,
    )
    student_training.update(target=args.student_target, check_every=args.student_check_every,
                            validation_problems=args.validation_problems)
    if not student_training["stopped_early"]:
        print(f"warning: the student never reached {args.student_target} validation accuracy", file=sys.stderr)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=".tool-use-", dir=args.out.parent))
    metadata = {
        "generator": "experiments/make_tool_use_models.py",
        "seed": args.seed,
        "task": task.to_dict(),
        "tokenizer": {"type": "character level (opd_jax.tasks.tool_use.build_tokenizer)", "vocab_size": len(vocabulary),
                      "eos_token_id": vocabulary.eos_id, "pad_token_id": vocabulary.pad_id},
        "eval": {"problems": args.eval_problems, "split": "test", "seed": EVAL_SEED, "max_new_tokens": budget},
        "models": {},
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
        "cpu_count": os.cpu_count(),
    }
    try:
        lrs = {"teacher": args.teacher_lr, "student": args.student_lr}
        trained = [("student", student, student_training)]
        if shipped_teacher is None:
            trained.insert(0, ("teacher", teacher, teacher_training))
        else:
            metadata["models"]["teacher"] = shipped_teacher
        for role, model, training in trained:
            folder = scratch / role
            save_pretrained(model, configs[role], folder, dtype=jnp.float32)
            tokenizer.save_pretrained(folder)
            metrics = held_out_metrics(model, held_out)
            config = configs[role]
            metadata["models"][role] = {
                "config": {key: getattr(config, key) for key in (
                    "model_type", "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                    "head_dim", "max_position_embeddings", "tie_word_embeddings")},
                "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
                "disk_dtype": "float32",
                "bytes": folder_bytes(folder),
                "training": {"batch_size": args.batch_size, "peak_lr": lrs[role],
                             "optimizer": "as experiments/make_toy_models.py", "loss": "model-written tokens only",
                             **training},
                "held_out": metrics,
            }
            print(f"{role}: {metadata['models'][role]['parameters']:,} parameters, {training['steps']} steps, "
                  f"held-out greedy accuracy {metrics['greedy_accuracy']:.3f}, call validity "
                  f"{metrics['greedy_call_validity']:.3f}, exact calls {metrics['greedy_call_exactness']:.3f}, "
                  f"sampled {metrics['sampled_t1_accuracy']:.3f}", flush=True)
        metadata["runtime_seconds"] = round(time.perf_counter() - started, 1)
        (scratch / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        write_readme(scratch, metadata)
        publish(scratch, args.out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {args.out} ({folder_bytes(args.out) / 1e6:.2f} MB) in {metadata['runtime_seconds']:.0f} s")
    if shipped_teacher is None and metadata["models"]["teacher"]["held_out"]["greedy_accuracy"] < 0.9:
        print("warning: the teacher's held-out greedy accuracy is below 0.9", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
