"""``opd-jax train``: the flags (and ``--config``) as a :class:`~opd_jax.launch.RunSpec`, launched;
exceptions become exit codes."""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from opd_jax.commands.flags import (EXIT_RESUMABLE, accept_negative_numbers, add_model_options, add_train_options,
                                    execution, fail, initialize_distributed, placement, positive_int, train_config)
from opd_jax.errors import InputError


def _parse_teacher(value: str) -> tuple[str | None, pathlib.Path]:
    """``PATH`` or ``NAME=PATH`` (a name is letters, digits, ``_``, ``-``, ``.``)."""
    name, separator, path = value.partition("=")
    if separator and re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return name, pathlib.Path(path)
    return None, pathlib.Path(value)


def add_parser(subparsers) -> None:
    from opd_jax import models

    train_parser = subparsers.add_parser(
        "train",
        help="distil a Hugging Face teacher into a student on the student's own rollouts",
        description=(
            "On-policy distillation of --student from --teacher (Hugging Face folders with config.json, "
            "safetensors and the tokenizer) on the prompts of a JSONL file. Options come from --config "
            "(TOML or JSON with the option names below, using underscores: every flag, training options also "
            "by section) and are overridden by flags. "
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
    train_parser.add_argument("--max-prompt-length", type=positive_int(1), default=256,
                              help="prompt slots P; longer prompts are an error (default 256)")
    train_parser.add_argument("--no-chat-template", action="store_true",
                              help="encode prompts as plain text even if the tokenizer has a chat template")
    train_parser.add_argument("--allow-unknown-tokens", action="store_true",
                              help="train on prompts with text the tokenizer encodes to its unknown token, with a "
                                   "warning naming them (default: an error naming each prompt's file, line and "
                                   "characters)")
    train_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    train_parser.add_argument("--export-dtype", choices=("auto", *models.DTYPES), default="auto",
                              help="dtype of the exported student's weights; auto: the --student checkpoint's [auto]")
    accept_negative_numbers(train_parser)
    add_train_options(train_parser)
    _add_held_out_options(train_parser)
    add_model_options(train_parser)
    _add_scaling_options(train_parser)


def _add_held_out_options(parser: argparse.ArgumentParser) -> None:
    held_out = parser.add_argument_group("evaluation during training (math datasets, see opd-jax eval)")
    held_out.add_argument("--eval-dataset", type=pathlib.Path, metavar="FILE.jsonl",
                          help="held-out math problems scored (avg@k, pass@k by math-verify, responses of at "
                               "most --max-new-tokens) before training, every --eval-every steps and at the end; "
                               "logged as eval_* metrics")
    held_out.add_argument("--eval-answer-key", default="answer", metavar="KEY",
                          help="field of the reference answer [answer]")
    held_out.add_argument("--eval-samples", type=positive_int(1), default=1, metavar="K",
                          help="responses sampled per held-out problem [1]")
    held_out.add_argument("--eval-every", dest="eval_every", type=positive_int(0), default=None, metavar="N",
                          help="evaluate every N steps (0: only before and after) [0]")


def _add_scaling_options(parser: argparse.ArgumentParser) -> None:
    scale = parser.add_argument_group("scaling out (see docs/scaling_out.md)")
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
    scale.add_argument("--num-processes", type=positive_int(1), help="multi-process run: number of processes")
    scale.add_argument("--process-id", type=positive_int(0), help="multi-process run: this process's index")
    scale.add_argument("--lock-lease", dest="lock_lease", type=float, default=300.0, metavar="SECONDS",
                       help="a run folder in a bucket (gs://): how long its lock outlives the holder's last renewal "
                            "(renewed every quarter lease); a run killed on another host blocks the folder at most "
                            "this long, one killed on this host not at all [300]")


def _teacher_folders(given: list[tuple[str | None, pathlib.Path]]) -> dict[str, pathlib.Path]:
    """``{name: folder}`` from the ``--teacher`` flags: one unnamed teacher is ``teacher``."""
    if len(given) == 1:
        name, folder = given[0]
        return {name or "teacher": folder}
    unnamed = [str(folder) for name, folder in given if name is None]
    if unnamed:
        fail("train", f"--teacher: with several teachers each needs a name, NAME=PATH; unnamed: {', '.join(unnamed)}")
    names = [name for name, _ in given]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        fail("train", f"--teacher: each name once; repeated: {', '.join(repeated)}")
    return dict(given)


def _run_spec(args: argparse.Namespace):
    """The :class:`~opd_jax.launch.RunSpec` of the ``opd-jax train`` flags (and ``--config``)."""
    from opd_jax import launch

    config = train_config(args)
    try:
        return launch.RunSpec(
            train=config, output=args.output,
            models=launch.Models(student=args.student, teachers=_teacher_folders(args.teacher)),
            data=launch.Data(prompts=args.prompts, max_prompt_length=args.max_prompt_length,
                             chat_template=not args.no_chat_template, eval_dataset=args.eval_dataset,
                             eval_answer_key=args.eval_answer_key, eval_samples=args.eval_samples,
                             allow_unknown_tokens=args.allow_unknown_tokens),
            execution=execution(args), placement=placement(args, "train"), lock_lease_seconds=args.lock_lease,
        )
    except ValueError as error:
        fail("train", str(error))


def run(args: argparse.Namespace) -> int:
    """``opd-jax train``: the flags as a run specification, launched; exceptions become exit codes
    (2: bad input, nothing written; 75: preempted, resumable; 1: the run failed)."""
    import jax

    from opd_jax import launch, train
    from opd_jax.backends.vllm import VllmWorkerError

    spec = _run_spec(args)
    # A multi-process run joins before anything counts devices.
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    try:
        result = launch.launch(spec, progress=not args.quiet)
    except InputError as error:  # launch.check's and the run folder's: raised before anything is written
        fail("train", str(error))
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
    print(f"done: {spec.train.steps} steps, {_final_figures(result.history)}; "
          f"student exported to {result.output_dir / 'student'}")
    return 0


def _final_figures(history: list[dict]) -> str:
    """The closing line's figures: the last training step's, then the last evaluation's, if any.

    Read by kind, not from the last record: an evaluation at the end of a run writes the final record
    of ``metrics.jsonl``, and that record holds no training figures (the line once read "teacher KL
    nan" from it).
    """
    trained = [record for record in history if "teacher_kl" in record]
    evaluated = [record for record in history if any(key.startswith("eval_") for key in record)]
    parts = []
    if trained:
        last = trained[-1]
        parts.append(f"step {last['step']}: teacher KL {last['teacher_kl']:.4f}, "
                     f"response length {last['response_length']:.1f}")
    if evaluated:
        last = evaluated[-1]
        figures = ", ".join(f"{key.removeprefix('eval_')} {_figure(value)}" for key, value in last.items()
                            if key.startswith("eval_"))
        parts.append(f"evaluation at step {last['step']}: {figures}")
    return "; ".join(parts) or "no metrics recorded"


def _figure(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
