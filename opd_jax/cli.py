"""The ``opd-jax`` command line.

``opd-jax verify`` enumerates every response of small random tabular problems and prints, for each
divergence × estimator × level × discount, how far the estimator's expected gradient is from the
exact gradient of the objective it claims to follow (float64).
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import re
import sys
from collections.abc import Sequence

from opd_jax import __version__

# Exit status of `opd-jax train` stopped by SIGTERM / SIGINT after committing the step it reached:
# re-running the same command resumes (EX_TEMPFAIL of sysexits.h; = opd_jax.preemption.EXIT_RESUMABLE,
# not imported here so that the CLI starts without importing jax).
EXIT_RESUMABLE = 75

_CASES_HELP = """\
rows: token level  = estimators stop_grad and opd_plus at gamma 0 and 1, and full_vocab (the
                     GKD-style per-state gradient), all compared with the exact gradient of J_tok;
      sequence level = stop_grad and opd_plus, compared with the exact gradient of J_seq.
rel. error = |g - g*| / |g*| (largest over the seeds) and cosine = cos(g, g*) (range over the seeds).
"""


def _parse_divergence(text: str) -> tuple[str, dict[str, float]]:
    """``"alpha:alpha=0.5"`` -> ``("alpha", {"alpha": 0.5})``, validated by ``divergences.get``."""
    from opd_jax import divergences

    name, _, rest = text.partition(":")
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            params[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--divergence {text!r}: parameters must be written NAME:key=value[,key=value]"
            ) from None
    try:
        divergences.get(name, **params)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--divergence {text!r}: {error}") from None
    return name, params


def _positive_int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from opd_jax import models
    from opd_jax.advantages import ESTIMATORS

    parser = argparse.ArgumentParser(
        prog="opd-jax",
        description="On-policy distillation with f-divergences: stop-gradient OPD and the unbiased OPD+.",
    )
    parser.add_argument("--version", action="version", version=f"opd-jax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="exact bias report of every estimator (float64 enumeration)",
        description=(
            "Enumerate every response of random tabular student/teacher pairs and compare each "
            "estimator's expected gradient with the exact gradient of its objective, in float64."
        ),
        epilog=_CASES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("--vocab-size", type=_positive_int(2), default=3, help="vocabulary size V (default 3)")
    verify.add_argument("--horizon", type=_positive_int(1), default=3, help="response length T (default 3)")
    verify.add_argument("--no-eos", action="store_true", help="no EOS token (default: token V-1 ends a response)")
    verify.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="problem seeds (default 0 1 2); rows summarise over them"
    )
    verify.add_argument(
        "--divergence",
        action="append",
        type=_parse_divergence,
        metavar="NAME[:key=value]",
        help="divergence to report, repeatable, e.g. js or alpha:alpha=0.5 (default: all nine, "
        "generalized_js and alpha at several values)",
    )
    verify.add_argument("--json", type=pathlib.Path, metavar="PATH", help="also write the rows as JSON")
    verify.add_argument("--csv", type=pathlib.Path, metavar="PATH", help="also write the rows as CSV")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")

    train_parser = commands.add_parser(
        "train",
        help="distil a Hugging Face teacher into a student on the student's own rollouts",
        description=(
            "On-policy distillation of --student from --teacher (Hugging Face folders with config.json, "
            "safetensors and the tokenizer) on the prompts of a JSONL file. Options come from --config "
            "(JSON or TOML with the option names below, using underscores) and are overridden by flags. "
            "Re-running with the same --output resumes from its newest good checkpoint."
        ),
    )
    train_parser.add_argument(
        "--teacher", action="append", type=_parse_teacher, required=True, metavar="[NAME=]PATH",
        help="teacher checkpoint folder; repeat as NAME=PATH for several teachers, each prompt line then "
             "naming its own with a \"teacher\" key")
    train_parser.add_argument("--student", type=pathlib.Path, required=True, help="student checkpoint folder")
    train_parser.add_argument("--prompts", type=pathlib.Path, required=True,
                              help="JSONL file, one {\"prompt\": str} or {\"messages\": [...]} per line")
    train_parser.add_argument("--output", type=pathlib.Path, required=True,
                              help="run folder: config, metrics, TensorBoard, checkpoints, exported student")
    train_parser.add_argument("--config", type=pathlib.Path, help="JSON or TOML file of training options")
    train_parser.add_argument("--max-prompt-length", type=_positive_int(1), default=256,
                              help="prompt slots P; longer prompts are an error (default 256)")
    train_parser.add_argument("--no-chat-template", action="store_true",
                              help="encode prompts as plain text even if the tokenizer has a chat template")
    train_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    train_parser.add_argument("--export-dtype", choices=("auto", *models.DTYPES), default="auto",
                              help="dtype of the exported student's weights; auto: the --student checkpoint's [auto]")
    # argparse takes "-1e-3" or "-inf" for an unknown flag ("expected one argument"); plain "-1" and
    # "-0.5" it already reads as numbers. No train flag looks like a number, so widen its matcher.
    train_parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$",
                                                       re.IGNORECASE)
    _add_train_options(train_parser)
    held_out = train_parser.add_argument_group("evaluation during training (math datasets, see opd-jax eval)")
    held_out.add_argument("--eval-dataset", type=pathlib.Path, metavar="FILE.jsonl",
                          help="held-out math problems scored (avg@k, pass@k by math-verify, responses of at "
                               "most --max-new-tokens) before training, every --eval-every steps and at the end; "
                               "logged as eval_* metrics")
    held_out.add_argument("--eval-answer-key", default="answer", metavar="KEY",
                          help="field of the reference answer [answer]")
    held_out.add_argument("--eval-samples", type=_positive_int(1), default=1, metavar="K",
                          help="responses sampled per held-out problem [1]")
    held_out.add_argument("--eval-every", dest="eval_every", type=_positive_int(0), default=None, metavar="N",
                          help="evaluate every N steps (0: only before and after) [0]")
    add_model_options(train_parser)
    scale = train_parser.add_argument_group("scaling out (see docs/scaling_out.md)")
    scale.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                       help="shard over a device mesh, e.g. 1,8,1 or fsdp=4,tensor=2; the product must be the "
                            "number of devices of all processes (default: one device)")
    scale.add_argument("--teacher-mesh", metavar="DATA,FSDP,TENSOR",
                       help="score with the teacher on a mesh of its own: --mesh then takes the first devices and "
                            "this the rest (the two products must add up to the device count; one process); with "
                            "--pipeline-rollouts true the next step's sampling and scoring run during the update")
    scale.add_argument("--coordinator", metavar="HOST:PORT",
                       help="multi-process run: address of process 0 (default: $JAX_COORDINATOR_ADDRESS, or "
                            "what jax detects on TPU pods / SLURM)")
    scale.add_argument("--num-processes", type=_positive_int(1), help="multi-process run: number of processes")
    scale.add_argument("--process-id", type=_positive_int(0), help="multi-process run: this process's index")

    from opd_jax.demo import TASKS
    from opd_jax.divergences import names as divergence_names

    # The parametrised generators (generalized_js, alpha) need a value: they are in the grid script.
    plain_divergences = [n for n in divergence_names() if n not in ("generalized_js", "alpha")]

    demo = commands.add_parser(
        "demo",
        help="the embedded default: stop-gradient OPD vs OPD+ on a toy task (no downloads)",
        description=(
            "Distil the shipped toy teacher into the weak toy student with each divergence and "
            "estimator, evaluate before and after on held-out problems (greedy accuracy, response "
            "length, teacher-KL per token on temperature-1 samples), and print the table. Writes "
            "results.md, results.json, curves.png and one folder per run (metrics, TensorBoard, "
            "checkpoints, exported student) under --output; re-running resumes unfinished runs."
        ),
    )
    demo.add_argument("--task", choices=sorted(TASKS), default="arithmetic", help="toy task (default arithmetic)")
    demo.add_argument("--output", type=pathlib.Path,
                      help="output folder (default: the task's, " + ", ".join(
                          f"{name} {task.output}" for name, task in sorted(TASKS.items())) + ")")
    demo.add_argument("--divergence", action="append", choices=plain_divergences, metavar="NAME",
                      help="divergence, repeatable (default: reverse_kl forward_kl js)")
    demo.add_argument("--estimator", action="append", choices=tuple(ESTIMATORS),
                      help="estimator, repeatable (default: both)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    default_steps = ", ".join(f"{name} {task.config.steps}" for name, task in sorted(TASKS.items()))
    demo.add_argument("--steps", type=_positive_int(1),
                      help=f"training steps per run (default: the task's, {default_steps})")
    demo.add_argument("--eval-problems", type=_positive_int(1), default=512,
                      help="held-out problems per evaluation (default 512)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = commands.add_parser(
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
    source.add_argument("--task", choices=sorted(TASKS),
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
    toy.add_argument("--problems", type=_positive_int(1), help="held-out problems (default 512)")
    from opd_jax.evaluation import MathEvalConfig

    math_defaults = MathEvalConfig()
    math = evaluate.add_argument_group("math datasets (--dataset)")
    math.add_argument("--answer-key", metavar="KEY", help="field of the reference answer (default answer)")
    math.add_argument("--question-key", metavar="KEY",
                      help="field of the question text (default: 'prompt', or a 'messages' chat)")
    math.add_argument("--samples", type=_positive_int(1), metavar="K",
                      help=f"responses sampled per problem (default {math_defaults.samples})")
    math.add_argument("--pass-k", type=_positive_int(1), nargs="+", metavar="k",
                      help="the k of the reported pass@k, each at most --samples (default 1 and K)")
    math.add_argument("--max-new-tokens", type=_positive_int(1), metavar="N",
                      help=f"response budget in tokens; a cut response is checked as it is "
                           f"(default {math_defaults.max_new_tokens})")
    math.add_argument("--max-prompt-length", type=_positive_int(1), metavar="P",
                      help=f"longest prompt allowed, in tokens; longer ones are an error "
                           f"(default {math_defaults.max_prompt_length})")
    math.add_argument("--temperature", type=float, metavar="T",
                      help=f"sampling temperature; 0 is greedy decoding, which makes K > 1 repeat one response "
                           f"(default {math_defaults.temperature:g})")
    math.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold in (0, 1] (default: none)")
    math.add_argument("--batch-size", type=_positive_int(1), metavar="ROWS",
                      help=f"rows (problem x sample) per generate call (default {math_defaults.batch_size})")
    math.add_argument("--verify-timeout", type=_positive_int(0), metavar="SECONDS",
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

    from opd_jax import plan

    plan_parser = commands.add_parser(
        "plan",
        help="compile a step's rollout, scoring and update for a TPU topology and report memory, FLOPs and fit",
        description=(
            "Compile the three programs of one distillation step (rollout, score, update) for --topology "
            "ahead of time, without running them (TPU topologies compile on any host through libtpu: "
            'pip install "opd-jax[tpu]"), and report per-device memory, FLOPs, whether the step fits and a '
            "roofline step time. Only config.json of a checkpoint folder is read."
        ),
    )
    plan.add_arguments(plan_parser)
    plan_parser.add_argument("--config", type=pathlib.Path,
                             help="the JSON or TOML file of training options that opd-jax train --config reads")
    plan_parser._negative_number_matcher = train_parser._negative_number_matcher
    _add_train_options(plan_parser)
    add_model_options(plan_parser)
    return parser


class _ExplicitNone:
    """``--flag none``: distinct from the flag's absence (``None``), which keeps the configured value."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = _ExplicitNone()


def _optional(kind):
    def parse(text: str):
        return EXPLICIT_NONE if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in "invalid <type> value"
    return parse


def _or_keywords(kind, keywords: tuple[str, ...]):
    """``kind``, or one of the field's keywords (e.g. ``auto``) as given."""
    if not keywords:
        return kind

    def parse(text: str):
        return text.lower() if text.lower() in keywords else kind(text)

    parse.__name__ = kind.__name__
    return parse


# TrainConfig fields opd-jax train does not offer: evaluation needs a task's evaluator, which only
# `opd-jax demo` / `opd-jax eval` have.
_NOT_IN_TRAIN = ("eval_every",)  # a flag of its own, with --eval-dataset


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, from its metadata (section, help), defaulting to None so that
    only given flags override."""
    import dataclasses

    from opd_jax.train import TrainConfig

    from opd_jax.config import SECTIONS

    groups = {section: parser.add_argument_group(f"training options: {section} (defaults in brackets; "
                                                 f"[{section}] table of --config)")
              for section in SECTIONS}
    for field in dataclasses.fields(TrainConfig):
        if field.name in _NOT_IN_TRAIN:
            continue
        if "bool" in str(field.type):
            kind = _boolean
        elif "float" in str(field.type):
            kind = float
        elif "int" in str(field.type):
            kind = int
        else:
            kind = str
        if "None" in str(field.type):
            kind = _optional(kind)
        kind = _or_keywords(kind, field.metadata.get("keywords", ()))
        groups[field.metadata["section"]].add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, type=kind, default=None,
            help=f"{field.metadata['help']} [{field.default}]",
        )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """How the models run: attention kernel, rematerialisation and the three dtypes.

    They change speed and memory, not the objective, so they are not part of the saved training
    configuration: a resumed run may change them.
    """
    from opd_jax import models

    group = parser.add_argument_group("model execution (speed and memory; see docs/pod_scale.md)")
    group.add_argument("--attention", choices=models.ATTENTION_IMPLEMENTATIONS, default="auto",
                       help="attention kernel: auto picks splash on TPU, cudnn on GPU, chunked on CPU [auto]")
    group.add_argument("--remat", choices=models.REMAT_POLICIES, default="full",
                       help="what each block keeps for the backward pass: full recomputes the block (activations "
                            "O(layers·tokens·width), the only choice that fits thousands of tokens per chip, for "
                            "about a third more compute); dots keeps the matmul outputs; none keeps everything [full]")
    group.add_argument("--param-dtype", choices=models.DTYPES, default="float32",
                       help="student parameters and optimizer state (master weights) [float32]")
    group.add_argument("--compute-dtype", choices=("auto", *models.DTYPES), default="auto",
                       help="student and teacher matmuls, activations and KV cache; logits, log-softmax, "
                            "divergences and advantages are float32 always; auto: bfloat16 on TPU/GPU, "
                            "float32 on CPU (where bfloat16 matmuls are slow) [auto]")
    group.add_argument("--teacher-dtype", choices=("auto", *models.DTYPES), default="auto",
                       help="teacher parameters; auto: bfloat16 on TPU/GPU, float32 on CPU [auto]")


def format_table(rows) -> str:
    """The bias report as a Markdown table."""
    lines = [
        "| divergence | level | estimator | γ | target | max rel. error | cosine (min … max) | verdict |",
        "|---|---|---|---|---|---:|:---:|---|",
    ]
    for row in rows:
        gamma = "–" if row.gamma is None else f"{row.gamma:g}"
        verdict = "exact" if row.unbiased else "biased"
        lines.append(
            f"| {row.divergence} | {row.level} | {row.estimator} | {gamma} | {row.target} "
            f"| {row.relative_error:.2e} | {row.cosine_min:+.4f} … {row.cosine_max:+.4f} | {verdict} |"
        )
    return "\n".join(lines)


def _write_outputs(rows, metadata: dict, json_path: pathlib.Path | None, csv_path: pathlib.Path | None) -> None:
    records = [
        {
            "divergence": r.divergence,
            "level": r.level,
            "estimator": r.estimator,
            "gamma": r.gamma,
            "target": r.target,
            "relative_error": r.relative_error,
            "cosine_min": r.cosine_min,
            "cosine_max": r.cosine_max,
            "unbiased": r.unbiased,
        }
        for r in rows
    ]
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"problem": metadata, "rows": records}, indent=2) + "\n")
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)


def _check_writable(path: pathlib.Path | None, flag: str) -> None:
    if path is not None and path.is_dir():
        _fail("verify", f"{flag} {path} is a directory; give a file path")


def run_verify(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from tqdm import tqdm

    from opd_jax import exact

    _check_writable(args.json, "--json")
    _check_writable(args.csv, "--csv")
    divergences = tuple(args.divergence) if args.divergence else exact.DEFAULT_DIVERGENCES
    with tqdm(total=len(divergences), desc="divergences", disable=args.quiet, file=sys.stderr) as bar:
        rows = exact.bias_report(
            seeds=tuple(args.seeds),
            vocab_size=args.vocab_size,
            horizon=args.horizon,
            eos=not args.no_eos,
            divergences=divergences,
            progress=lambda done, total: bar.update(done - bar.n),
        )
    metadata = {
        "vocab_size": args.vocab_size,
        "horizon": args.horizon,
        "eos": not args.no_eos,
        "seeds": list(args.seeds),
        "dtype": "float64",
    }
    eos = f"EOS = token {args.vocab_size - 1}" if not args.no_eos else "no EOS"
    print(
        f"Exact bias report: V = {args.vocab_size}, T = {args.horizon}, {eos}, seeds {args.seeds}, "
        "float64; largest error and range of cosines over the seeds.\n"
    )
    print(format_table(rows))
    _write_outputs(rows, metadata, args.json, args.csv)
    return 0


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-process JAX program with ``jax.distributed.initialize``, if one is asked for.

    Asked for when any argument is given, or ``JAX_COORDINATOR_ADDRESS`` is set, or
    ``OPD_JAX_DISTRIBUTED=1`` (TPU pod slices and SLURM, where jax finds everything itself). CPU
    processes exchange collectives over gloo. Must run before anything touches a device.

    Returns:
      whether this is a multi-process run.
    """
    import os

    import jax

    asked = (coordinator is not None or num_processes is not None or process_id is not None
             or "JAX_COORDINATOR_ADDRESS" in os.environ or os.environ.get("OPD_JAX_DISTRIBUTED") == "1")
    if not asked or num_processes == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return jax.process_count() > 1


def _fail(command: str, message: str):
    """Exit like argparse does for a bad argument: status 2 and the reason on stderr."""
    print(f"opd-jax {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _config_value(field, value, source: str, command: str):
    """A config-file value checked against the field's declared type (``"none"`` for an optional
    field is None, as on the command line); the error names the field, the type and the value."""
    declared = str(field.type)
    optional = "None" in declared
    if isinstance(value, str) and value.lower() in field.metadata.get("keywords", ()):
        return value.lower()
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if "bool" in declared:
        ok, wanted = isinstance(value, bool), "true or false"
    elif "int" in declared:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif "float" in declared:
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, wanted = isinstance(value, str), "a string"
    if not ok:
        kind = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}.get(type(value),
                                                                                           type(value).__name__)
        alternative = "".join(f' or "{word}"' for word in (*field.metadata.get("keywords", ()),
                                                            *(("none",) if optional else ())))
        _fail(command, f"{source}: {field.name} must be {wanted}{alternative}; got {value!r} ({kind})")
    return float(value) if wanted == "a number" else value


def _train_config(args: argparse.Namespace, command: str = "train", overrides: dict | None = None):
    """The :class:`~opd_jax.config.TrainConfig` of ``--config`` and the flags (flags win), then
    ``overrides``; what ``opd-jax train`` trains and ``opd-jax plan`` plans."""
    import dataclasses
    import tomllib

    from opd_jax.config import TrainConfig, flatten_sections

    values: dict = {}
    eval_dataset = getattr(args, "eval_dataset", None)
    if args.config is not None:
        if not args.config.is_file():
            _fail(command, f"--config {args.config} does not exist")
        try:
            text = args.config.read_text(encoding="utf-8")
            values = tomllib.loads(text) if args.config.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
            _fail(command, f"--config {args.config}: cannot parse ({error})")
        if not isinstance(values, dict):
            _fail(command, f"--config {args.config}: expected a table of options, got {type(values).__name__}")
        try:
            values = flatten_sections(values)
        except ValueError as error:
            _fail(command, f"--config {args.config}: {error}")
        fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
        for name in _NOT_IN_TRAIN:
            if values.get(name) and eval_dataset is None:
                _fail(command, f"--config {args.config}: {name} needs --eval-dataset (without one opd-jax train "
                               "has no evaluator); remove it or give a held-out dataset")
        values = {name: _config_value(fields[name], value, f"--config {args.config}", command)
                  if name in fields else value for name, value in values.items()}
    for field in dataclasses.fields(TrainConfig):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = None if given is EXPLICIT_NONE else given
    values.update(overrides or {})
    try:
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        _fail(command, str(error))


def _parse_teacher(value: str) -> tuple[str | None, pathlib.Path]:
    """``PATH`` or ``NAME=PATH`` (a name is letters, digits, ``_``, ``-``, ``.``)."""
    name, separator, path = value.partition("=")
    if separator and re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return name, pathlib.Path(path)
    return None, pathlib.Path(value)


def _teacher_folders(given: list[tuple[str | None, pathlib.Path]]) -> dict[str, pathlib.Path]:
    """``{name: folder}`` from the ``--teacher`` flags: one unnamed teacher is ``teacher``."""
    if len(given) == 1:
        name, folder = given[0]
        return {name or "teacher": folder}
    unnamed = [str(folder) for name, folder in given if name is None]
    if unnamed:
        _fail("train", f"--teacher: with several teachers each needs a name, NAME=PATH; unnamed: {', '.join(unnamed)}")
    names = [name for name, _ in given]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        _fail("train", f"--teacher: each name once; repeated: {', '.join(repeated)}")
    return dict(given)


def _run_spec(args: argparse.Namespace):
    """The :class:`~opd_jax.launch.RunSpec` of the ``opd-jax train`` flags (and ``--config``)."""
    from opd_jax import launch, sharding

    config = _train_config(args)
    meshes = {}
    for flag, text in (("--mesh", args.mesh), ("--teacher-mesh", args.teacher_mesh)):
        try:
            meshes[flag] = None if text is None else sharding.parse_mesh(text)
        except ValueError as error:
            _fail("train", f"{flag}: {error}")
    try:
        return launch.RunSpec(
            train=config, output=args.output,
            models=launch.Models(student=args.student, teachers=_teacher_folders(args.teacher)),
            data=launch.Data(prompts=args.prompts, max_prompt_length=args.max_prompt_length,
                             chat_template=not args.no_chat_template, eval_dataset=args.eval_dataset,
                             eval_answer_key=args.eval_answer_key, eval_samples=args.eval_samples),
            execution=launch.Execution(attention=args.attention, remat=args.remat, param_dtype=args.param_dtype,
                                       compute_dtype=args.compute_dtype, teacher_dtype=args.teacher_dtype,
                                       export_dtype=args.export_dtype),
            placement=launch.Placement(*meshes.values()),
        )
    except ValueError as error:
        _fail("train", str(error))


def run_train(args: argparse.Namespace) -> int:
    """``opd-jax train``: the flags as a run specification, launched; exceptions become exit codes
    (2: bad input, nothing written; 75: preempted, resumable; 1: the run failed)."""
    import jax

    from opd_jax import launch, run_folder, train
    from opd_jax.backends.vllm import VllmWorkerError

    spec = _run_spec(args)
    # A multi-process run joins before anything counts devices.
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    try:
        result = launch.launch(spec, progress=not args.quiet)
    except (ValueError, FileNotFoundError, run_folder.RunFolderError) as error:
        _fail("train", str(error))
    except train.Preempted as stopped:  # the step reached is committed: re-running resumes it
        if jax.process_index() == 0:
            print(f"opd-jax train: {stopped}", file=sys.stderr)
        return EXIT_RESUMABLE
    except (train.NonFiniteError, train.WeightSyncError, VllmWorkerError) as error:
        # nothing of the failed step was checkpointed or exported; earlier checkpoints are intact
        if jax.process_index() == 0:
            print(f"opd-jax train: error: {error}", file=sys.stderr)
        return 1
    if jax.process_index() != 0:  # process 0 exports and reports
        return 0
    final = result.history[-1]
    print(f"done: {spec.train.steps} steps, teacher KL {final.get('teacher_kl', float('nan')):.4f}; "
          f"student exported to {result.output_dir / 'student'}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from opd_jax import demo
    from opd_jax.advantages import ESTIMATORS

    task = demo.TASKS[args.task]
    output = args.output or task.output
    if output.exists() and not output.is_dir():
        _fail("demo", f"--output {output} is a file; give a folder")
    previous = output / "results.json"
    previous_task = json.loads(previous.read_text()).get("task") if previous.is_file() else None
    if previous_task not in (None, args.task):
        _fail("demo", f"--output {output} holds results of task {previous_task!r}, not --task {args.task}; "
                      "give another folder")
    setup = task.setup(eval_problems=args.eval_problems)
    steps = args.steps or task.config.steps
    base = dataclasses.replace(task.config, steps=steps, max_new_tokens=setup.max_new_tokens,
                               eval_every=min(task.config.eval_every, steps))
    axes = {"divergence": args.divergence or ["reverse_kl", "forward_kl", "js"],
            "estimator": args.estimator or list(ESTIMATORS)}
    specs = demo.grid(base, axes, args.seeds)
    try:
        records = demo.run_grid(setup, specs, output, progress=not args.quiet)
    except ValueError as error:  # e.g. a run folder that holds a run with other settings
        _fail("demo", str(error))
    table = demo.write_results(setup, specs, records, output, task.columns)
    seconds = sum(r["seconds"] for r in records)
    print(f"\n{setup.name}: {len(specs)} runs of {steps} steps in {seconds:.0f} s\n\n{table}\n")
    print(f"wrote {output / 'results.md'}, {output / 'results.json'}, {output / 'curves.png'}")
    return 0


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


def _given_flags(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) not in (None, False)]


def run_eval(args: argparse.Namespace) -> int:
    if args.json is not None and args.json.is_dir():
        _fail("eval", f"--json {args.json} is a directory; give a file path")
    if args.dataset is not None:
        return _run_math_eval(args)
    task_name, problems = args.task or "arithmetic", args.problems or 512
    misplaced = _given_flags(args, _MATH_ONLY)
    if misplaced:
        _fail("eval", f"{', '.join(misplaced)} appl{'ies' if len(misplaced) == 1 else 'y'} to --dataset evaluation "
                      f"only, not to the toy task {task_name}")
    from opd_jax import demo, models, tokenization

    try:
        model, _ = models.from_pretrained(args.model)
        tokenizer = tokenization.load_tokenizer(args.model)
        task = demo.TASKS[task_name]
        teacher_path = args.teacher or task.teacher_path()
        teacher = None if args.no_teacher_kl else models.from_pretrained(teacher_path)[0]
        if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"teacher vocab_size {teacher.config.vocab_size} != model vocab_size "
                             f"{model.config.vocab_size}")
    except (FileNotFoundError, ValueError) as error:
        _fail("eval", str(error))
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
        _fail("eval", f"{', '.join(misplaced)} appl{'ies' if len(misplaced) == 1 else 'y'} to --task evaluation only, "
                      "not to --dataset")
    options = {name: getattr(args, name) for name in ("samples", "max_new_tokens", "temperature", "top_p",
                                                      "batch_size", "max_prompt_length", "verify_timeout")
               if getattr(args, name) is not None}
    if args.pass_k is not None:
        options["pass_k"] = tuple(args.pass_k)
    try:
        config = evaluation.MathEvalConfig(seed=args.seed, use_chat_template=not args.no_chat_template, **options)
    except ValueError as error:  # name the flag, not the field
        _fail("eval", re.sub(r"MathEvalConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(error)))
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
            _fail("eval", f"{error}; raise --max-prompt-length or shorten them")
        _fail("eval", re.sub(r"\bmax_new_tokens\b", "--max-new-tokens", str(error)))
    except FileNotFoundError as error:
        _fail("eval", str(error))
    import jax

    platform = jax.default_backend()
    try:
        model, _ = models.from_pretrained(args.model, args.param_dtype or "float32",
                                          compute_dtype=models.resolve_dtype(args.compute_dtype or "auto", platform),
                                          attention=args.attention or "auto")
    except (FileNotFoundError, ValueError) as error:  # e.g. an attention kernel this platform lacks
        _fail("eval", str(error))
    backend = None
    if args.rollout_backend == "vllm":
        from opd_jax.backends.vllm import VllmBackend, VllmWorkerError

        try:
            backend = VllmBackend(model_config, model, max_num_seqs=min(config.batch_size, 256))
        except VllmWorkerError as error:
            _fail("eval", f"--rollout-backend vllm: {error}")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    runners = {"train": run_train, "demo": run_demo, "eval": run_eval, "verify": run_verify, "plan": run_plan}
    return runners[args.command](args)


def run_plan(args: argparse.Namespace) -> int:
    """``opd-jax plan`` on the training configuration ``opd-jax train`` would build from the same
    ``--config`` and flags (``--sequence-length`` L stands for ``--max-new-tokens`` L − P)."""
    from opd_jax import plan

    overrides = {}
    if args.sequence_length is not None:
        if args.max_new_tokens is not None:
            _fail("plan", f"--sequence-length {args.sequence_length} and --max-new-tokens {args.max_new_tokens}: "
                          "give one (the sequence is --prompt-length + max_new_tokens)")
        if args.sequence_length <= args.prompt_length:
            _fail("plan", f"--prompt-length ({args.prompt_length}) must be < --sequence-length "
                          f"({args.sequence_length}): the sequence is the prompt plus at least one response token")
        overrides["max_new_tokens"] = args.sequence_length - args.prompt_length
    return plan.run(args, _train_config(args, "plan", overrides))


if __name__ == "__main__":
    sys.exit(main())
