"""``opd-jax eval``: a checkpoint on a toy task, or on math datasets (avg@k, pass@k checked by math-verify)."""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from collections.abc import Sequence

from opd_jax.commands.flags import fail, positive_int

_EVAL_EPILOG = """\
math datasets (--dataset): one problem a line, e.g.
  {"prompt": "Tom has 3 apples and buys 4 more. How many does he have?", "answer": "7"}
  {"messages": [{"role": "user", "content": "Half of 1?"}], "answer": "\\\\frac{1}{2}"}
The reference answer is a number, a LaTeX answer, or a GSM8K solution ending in "#### 72" (what follows
the last #### is the answer). Each response is checked with math-verify (parse, then verify).
  avg@K   mean correctness of all K samples of all problems
  pass@k  mean over problems of 1 - C(n-c, k) / C(n, k), n = K samples, c of them correct (pass@1 = avg@K)
Intervals: 95% normal approximation over problems, mean +- 1.96 s / sqrt(m) (s: sample standard deviation
of the per-problem values, m problems), clipped to [0, 1].

examples:
  opd-jax eval --model runs/demo/js-opd_plus-seed0/student
  opd-jax eval --model DIR --dataset gsm8k.jsonl --dataset math500.jsonl --samples 8 --max-new-tokens 1024 \\
      --json eval.json
"""

# Options of one kind of evaluation only: giving them to the other is an error, not silently ignored.
_TOY_ONLY = ("teacher", "no_teacher_kl", "problems")
_MATH_ONLY = ("answer_key", "question_key", "samples", "pass_k", "max_new_tokens", "max_prompt_length", "temperature",
              "top_p", "batch_size", "verify_timeout", "no_chat_template", "param_dtype", "compute_dtype", "attention",
              "quiet", "rollout_backend")


def add_parser(subparsers) -> None:
    from opd_jax.tasks import task_names

    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on a toy task, or on math datasets (avg@k, pass@k checked by math-verify)",
        description=(
            "Two evaluations. --task (the default, arithmetic): greedy accuracy and response length of "
            "--model on held-out problems of a toy task, and its per-token KL to the teacher on "
            "temperature-1 samples. --dataset FILE.jsonl (repeatable): sample --samples responses per "
            "problem through the model's chat template, check each against the reference answer with "
            "math-verify and report, per file, avg@k and pass@k (the unbiased estimator of Chen et al. "
            "2021) with 95% confidence intervals, as a Markdown table (and --json)."
        ),
        epilog=_EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--model", type=pathlib.Path, required=True, help="checkpoint folder (HF format)")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--task", choices=sorted(task_names()),
                        help="toy task (default arithmetic when no --dataset is given)")
    source.add_argument("--dataset", type=pathlib.Path, action="append", metavar="FILE.jsonl",
                        help="math dataset, repeatable: one JSON object a line with the question ('prompt' or "
                             "'messages', or --question-key) and the reference answer (--answer-key)")
    evaluate.add_argument("--seed", type=int, default=0, help="problem and sampling seed (default 0)")
    evaluate.add_argument("--json", type=pathlib.Path, metavar="PATH", help="also write the metrics as JSON")
    toy = evaluate.add_argument_group("toy task (--task)")
    toy.add_argument("--teacher", type=pathlib.Path,
                     help="teacher checkpoint folder for the teacher-KL (default: the task's shipped teacher)")
    toy.add_argument("--no-teacher-kl", action="store_true", help="skip the teacher-KL")
    toy.add_argument("--problems", type=positive_int(1), help="held-out problems (default 512)")
    _add_math_options(evaluate)


def _add_math_options(parser: argparse.ArgumentParser) -> None:
    from opd_jax import models
    from opd_jax.evaluation import MathEvalConfig

    math_defaults = MathEvalConfig()
    math = parser.add_argument_group("math datasets (--dataset)")
    math.add_argument("--answer-key", metavar="KEY", help="field of the reference answer (default answer)")
    math.add_argument("--question-key", metavar="KEY",
                      help="field of the question text (default: 'prompt', or a 'messages' chat)")
    math.add_argument("--samples", type=positive_int(1), metavar="K",
                      help=f"responses sampled per problem (default {math_defaults.samples})")
    math.add_argument("--pass-k", type=positive_int(1), nargs="+", metavar="k",
                      help="the k of the reported pass@k, each at most --samples (default 1 and K)")
    math.add_argument("--max-new-tokens", type=positive_int(1), metavar="N",
                      help=f"response budget in tokens; a cut response is checked as it is "
                           f"(default {math_defaults.max_new_tokens})")
    math.add_argument("--max-prompt-length", type=positive_int(1), metavar="P",
                      help=f"longest prompt allowed, in tokens; longer ones are an error "
                           f"(default {math_defaults.max_prompt_length})")
    math.add_argument("--temperature", type=float, metavar="T",
                      help=f"sampling temperature; 0 is greedy decoding, which makes K > 1 repeat one response "
                           f"(default {math_defaults.temperature:g})")
    math.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold in (0, 1] (default: none)")
    math.add_argument("--batch-size", type=positive_int(1), metavar="ROWS",
                      help=f"rows (problem x sample) per generate call (default {math_defaults.batch_size})")
    math.add_argument("--verify-timeout", type=positive_int(0), metavar="SECONDS",
                      help=f"math-verify's limit per parse or comparison; 0: none "
                           f"(default {math_defaults.verify_timeout})")
    math.add_argument("--no-chat-template", action="store_true",
                      help="encode questions as plain text even if the tokenizer has a chat template")
    math.add_argument("--rollout-backend", choices=("jax", "vllm"),
                      help="sample with our JAX sampler (default) or a vLLM engine in its own process "
                           "(.venv-vllm, built by OPD_VLLM=1 .ci/bootstrap)")
    math.add_argument("--param-dtype", choices=models.DTYPES, help="model parameters (default float32)")
    math.add_argument("--compute-dtype", choices=("auto", *models.DTYPES),
                      help="matmuls, activations and KV cache; auto: bfloat16 on TPU/GPU, float32 on CPU "
                           "(default auto)")
    math.add_argument("--attention", choices=models.ATTENTION_IMPLEMENTATIONS, help="attention kernel (default auto)")
    math.add_argument("--quiet", action="store_true", help="no progress bar")


def _given_flags(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) not in (None, False)]


def run(args: argparse.Namespace) -> int:
    if args.json is not None and args.json.is_dir():
        fail("eval", f"--json {args.json} is a directory; give a file path")
    if args.dataset is not None:
        return _run_math_eval(args)
    task_name, problems = args.task or "arithmetic", args.problems or 512
    misplaced = _given_flags(args, _MATH_ONLY)
    if misplaced:
        fail("eval", f"{', '.join(misplaced)} appl{'ies' if len(misplaced) == 1 else 'y'} to --dataset evaluation "
                     f"only, not to the toy task {task_name}")
    from opd_jax import models, tasks, tokenization

    try:
        model, _ = models.from_pretrained(args.model)
        tokenizer = tokenization.load_tokenizer(args.model)
        task = tasks.get_task(task_name)
        teacher_path = args.teacher or task.model_path("teacher")
        teacher = None if args.no_teacher_kl else models.from_pretrained(teacher_path)[0]
        if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"teacher vocab_size {teacher.config.vocab_size} != model vocab_size "
                             f"{model.config.vocab_size}")
    except (FileNotFoundError, ValueError) as error:
        fail("eval", str(error))
    metrics = task.evaluator(tokenizer, teacher, eval_problems=problems, seed=args.seed)(model)
    print(f"{task_name}, {problems} held-out problems, {args.model}:")
    for key, value in metrics.items():
        print(f"  {key:16s} {value:.4f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "task": task_name, **metrics}, indent=2) + "\n")
    return 0


def _run_math_eval(args: argparse.Namespace) -> int:
    """Every input is checked (options, datasets, tokenizer, prompt lengths) before the model is loaded;
    the JSON is written only when every dataset is done."""
    import dataclasses

    from opd_jax import evaluation, models, tokenization

    misplaced = _given_flags(args, _TOY_ONLY)
    if misplaced:
        fail("eval", f"{', '.join(misplaced)} appl{'ies' if len(misplaced) == 1 else 'y'} to --task evaluation only, "
                     "not to --dataset")
    options = {name: getattr(args, name) for name in ("samples", "max_new_tokens", "temperature", "top_p",
                                                      "batch_size", "max_prompt_length", "verify_timeout")
               if getattr(args, name) is not None}
    if args.pass_k is not None:
        options["pass_k"] = tuple(args.pass_k)
    try:
        config = evaluation.MathEvalConfig(seed=args.seed, use_chat_template=not args.no_chat_template, **options)
    except ValueError as error:  # name the flag, not the field
        fail("eval", re.sub(r"MathEvalConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(error)))
    if config.temperature == 0 and config.samples > 1:
        print(f"opd-jax eval: warning: --temperature 0 is greedy decoding: the {config.samples} samples of a problem "
              "are one response repeated, so every pass@k equals pass@1 (= avg@k); use --samples 1 or a "
              "temperature > 0", file=sys.stderr)
    try:
        datasets = [(path, evaluation.read_problems(path, answer_key=args.answer_key or "answer",
                                                    question_key=args.question_key)) for path in args.dataset]
        model_config = models.load_config(args.model)
        tokenizer = tokenization.load_tokenizer(args.model)
        for _, problems in datasets:
            evaluation.encode_problems(tokenizer, problems, config,
                                       max_position_embeddings=model_config.max_position_embeddings)
    except ValueError as error:
        if "longer than max_length" in str(error):
            fail("eval", f"{error}; raise --max-prompt-length or shorten them")
        fail("eval", re.sub(r"\bmax_new_tokens\b", "--max-new-tokens", str(error)))
    except FileNotFoundError as error:
        fail("eval", str(error))
    import jax

    platform = jax.default_backend()
    try:
        model, _ = models.from_pretrained(args.model, args.param_dtype or "float32",
                                          compute_dtype=models.resolve_dtype(args.compute_dtype or "auto", platform),
                                          attention=args.attention or "auto")
    except (FileNotFoundError, ValueError) as error:  # e.g. an attention kernel this platform lacks
        fail("eval", str(error))
    backend = None
    if args.rollout_backend == "vllm":
        from opd_jax.backends.vllm import VllmBackend, VllmWorkerError

        try:
            backend = VllmBackend(model_config, model, max_num_seqs=min(config.batch_size, 256))
        except VllmWorkerError as error:
            fail("eval", f"--rollout-backend vllm: {error}")
    records = []
    try:
        for path, problems in datasets:
            result = evaluation.evaluate_math(model, tokenizer, problems, config, progress=not args.quiet,
                                              label=path.name, backend=backend)
            records.append({"dataset": str(path), **result.record()})
    finally:
        if backend is not None:
            backend.close()
    print(f"{args.model}: {config.samples} sample(s) per problem at temperature {config.temperature:g}, "
          f"at most {config.max_new_tokens} new tokens, seed {config.seed}; answers checked by math-verify; "
          "95% intervals over problems (normal approximation)\n")
    print(evaluation.format_table(records))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"model": str(args.model), "config": {**dataclasses.asdict(config), "pass_k": list(config.ks)},
                   "interval": "95% normal approximation over problems: mean +- 1.96 s / sqrt(m), clipped to [0, 1]",
                   "datasets": records}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0
