"""``opd-jax plan``: compile a step's programs for a device topology (:mod:`opd_jax.plan`) on the
training configuration ``opd-jax train`` would build, and report memory, FLOPs and fit."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from opd_jax.commands.flags import (accept_negative_numbers, add_model_options, add_train_options, execution, fail,
                                    placement, positive_int, train_config)


def add_parser(subparsers) -> None:
    plan_parser = subparsers.add_parser(
        "plan",
        help="compile a step's rollout, scoring and update for a TPU topology and report memory, FLOPs and fit",
        description=(
            "Compile the programs of one distillation step (rollout, score, update; teacher with "
            "--teacher-mesh) for --topology "
            "ahead of time, without running them (TPU topologies compile on any host through libtpu: "
            'pip install "opd-jax[tpu]"), and report per-device memory, FLOPs, whether the step fits and a '
            "roofline step time. Only config.json of a checkpoint folder is read."
        ),
    )
    _add_plan_options(plan_parser)
    plan_parser.add_argument("--config", type=pathlib.Path,
                             help="the JSON or TOML file of training options that opd-jax train --config reads")
    accept_negative_numbers(plan_parser)
    add_train_options(plan_parser)
    add_model_options(plan_parser)


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    """The ``opd-jax plan`` options of its own (the training options, ``--config`` and the
    model-execution options are the ones ``opd-jax train`` takes)."""
    from opd_jax.models.presets import PRESETS

    group = parser.add_argument_group("what to plan for")
    group.add_argument("--topology", required=True,
                       help="v5p-N / v4-N (N TensorCores), v5e-N / v6e-N (N chips), an explicit grid such as "
                            "v5p:2x4x4, cpu:N (N virtual CPU devices) or local")
    group.add_argument("--student", required=True,
                       help=f"preset ({', '.join(PRESETS)}) or a Hugging Face folder (only config.json is read)")
    group.add_argument("--teacher", required=True, help="preset or Hugging Face folder, as --student")
    group.add_argument("--prompt-length", type=positive_int(1), required=True,
                       help="prompt slots P (train: --max-prompt-length)")
    group.add_argument("--sequence-length", type=positive_int(1),
                       help="prompt + response slots L: sets max_new_tokens to L - P (default: P + max_new_tokens)")
    group.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                       help="e.g. 1,16,2 or fsdp=16,tensor=2 (default: fsdp over every device; a factor of 2, 4 "
                            "or 8 moves to tensor when the update minibatch has fewer rows than devices, to data "
                            "when fsdp would not divide a parameter)")
    group.add_argument("--teacher-mesh", metavar="DATA,FSDP,TENSOR",
                       help="the teacher scores on a mesh of its own, over the devices after --mesh's (as opd-jax "
                            "train --teacher-mesh); planned as the program 'teacher'")
    group.add_argument("--programs", type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
                       metavar="NAME[,NAME]",
                       help="compile only these of rollout, score, update (and teacher with --teacher-mesh); "
                            "the step time then is not estimated [all]")
    group.add_argument("--json", type=pathlib.Path, metavar="FILE", help="also write the report as JSON")
    lengths = group.add_mutually_exclusive_group()
    lengths.add_argument("--mean-response-length", type=float, metavar="N",
                         help="estimate the rollout for responses of geometric length with this mean, cut at "
                              "max_new_tokens (and let --rollout-mesh auto choose for them) [every response runs to "
                              "max_new_tokens]")
    lengths.add_argument("--response-lengths", type=pathlib.Path, metavar="FILE",
                         help="estimate the rollout for these observed lengths: JSONL, a number or an object with "
                              "'length' or 'response_length' per line")
    retokenized = parser.add_argument_group(
        "a teacher with another tokenizer (--tokenizer-alignment text): its own slots")
    retokenized.add_argument("--prompts", type=pathlib.Path, metavar="FILE",
                             help="the JSONL prompt file of opd-jax train: the teacher's tokens per student token and "
                                  "its longest piece are measured on its prompts (needs the tokenizers of the "
                                  "--student and --teacher folders)")
    retokenized.add_argument("--teacher-token-ratio", type=float, metavar="R",
                             help="the teacher's tokens per student token; its prompt and response slots are R times "
                                  "the student's, the response rounded up to a bucket [measured on --prompts, else 1]")
    retokenized.add_argument("--teacher-piece-bytes", type=positive_int(1), metavar="D",
                             help="with --alignment-credit characters: the longest teacher piece in bytes a batch "
                                  "holds, the byte slots per token [measured on --prompts, else 16]")


def run(args: argparse.Namespace) -> int:
    """``opd-jax plan`` on the training configuration ``opd-jax train`` would build from the same
    ``--config`` and flags (``--sequence-length`` L stands for ``--max-new-tokens`` L − P)."""
    overrides = {}
    if args.sequence_length is not None:
        if args.max_new_tokens is not None:
            fail("plan", f"--sequence-length {args.sequence_length} and --max-new-tokens {args.max_new_tokens}: "
                         "give one (the sequence is --prompt-length + max_new_tokens)")
        if args.sequence_length <= args.prompt_length:
            fail("plan", f"--prompt-length ({args.prompt_length}) must be < --sequence-length "
                         f"({args.sequence_length}): the sequence is the prompt plus at least one response token")
        overrides["max_new_tokens"] = args.sequence_length - args.prompt_length
    return _plan(args, train_config(args, "plan", overrides))


def _plan(args: argparse.Namespace, config) -> int:
    """Exit 0 with a report (also when it does not fit), 2 for bad input, 1 when a program does not
    compile. ``config`` is the :class:`~opd_jax.config.TrainConfig` to plan."""
    import functools
    import os

    import jax

    from opd_jax import plan, rollout_estimate
    from opd_jax.models.presets import resolve_model

    if args.json is not None and args.json.is_dir():
        fail("plan", f"--json {args.json} is a directory; give a file path")
    if args.topology.strip().lower() != "local" and "JAX_PLATFORMS" not in os.environ:
        # Compiling for a named topology needs no accelerator here; do not start one.
        jax.config.update("jax_platforms", "cpu")
    try:
        student, teacher = resolve_model(args.student), resolve_model(args.teacher)
        ratio, piece_bytes = _teacher_tokens(args, config, teacher.vocab_size)
        lengths = (rollout_estimate.read_lengths(args.response_lengths) if args.response_lengths is not None
                   else rollout_estimate.ResponseLengths(mean=args.mean_response_length))
        plan_config = plan.PlanConfig(
            student=student, teacher=teacher, train=config, topology=args.topology, prompt_length=args.prompt_length,
            execution=execution(args), placement=placement(args, "plan"), student_name=args.student,
            teacher_name=args.teacher, teacher_token_ratio=ratio, teacher_piece_bytes=piece_bytes,
            response_lengths=lengths,
        )
        result = plan.plan(plan_config, programs=args.programs,
                           progress=functools.partial(print, file=sys.stderr, flush=True))
    except ValueError as error:
        fail("plan", str(error))
    except plan.PlanCompileError as error:
        fail("plan", str(error), status=1)
    print(plan.format_report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _teacher_tokens(args: argparse.Namespace, config, teacher_vocab_size: int) -> tuple[float, int]:
    """``(teacher_token_ratio, teacher_piece_bytes)``: the flags, else measured on ``--prompts``, else 1 and 16."""
    ratio, piece_bytes = args.teacher_token_ratio, args.teacher_piece_bytes
    if config.tokenizer_alignment != "text":
        for flag, value in (("--prompts", args.prompts), ("--teacher-token-ratio", ratio),
                            ("--teacher-piece-bytes", piece_bytes)):
            if value is not None:
                fail("plan", f"{flag} sizes a teacher that re-tokenizes the text; it needs --tokenizer-alignment text")
        return 1.0, 16
    if args.prompts is not None and (ratio is None or piece_bytes is None):
        measured_ratio, measured_bytes = _measure(args, teacher_vocab_size)
        print(f"measured on {args.prompts}: {measured_ratio:.3f} teacher tokens per student token, teacher pieces "
              f"up to {measured_bytes} bytes", file=sys.stderr)
        ratio = measured_ratio if ratio is None else ratio
        piece_bytes = measured_bytes if piece_bytes is None else piece_bytes
    return (1.0 if ratio is None else ratio), (16 if piece_bytes is None else piece_bytes)


def _measure(args: argparse.Namespace, teacher_vocab_size: int) -> tuple[float, int]:
    """The teacher's tokens per student token and its longest piece, over the prompts of ``--prompts``."""
    from opd_jax import data, tokenization
    from opd_jax.retokenize import measure_teacher_tokens

    folders = {}
    for flag, value in (("--student", args.student), ("--teacher", args.teacher)):
        folder = pathlib.Path(value).expanduser()
        if not folder.is_dir():
            fail("plan", f"--prompts measures the teacher's tokens with the tokenizers of the model folders, but "
                         f"{flag} {value} is a preset; give --teacher-token-ratio (and --teacher-piece-bytes)")
        folders[flag] = folder
    try:
        records = data.read_prompt_records(args.prompts)
        tokenizers = [tokenization.load_tokenizer(folders[flag]) for flag in ("--student", "--teacher")]
        texts = [p if isinstance(p, str) else "".join(str(m.get("content", "")) for m in p) for _, p in records]
        return measure_teacher_tokens(*tokenizers, texts, teacher_vocab_size)
    except (ValueError, OSError) as error:
        fail("plan", f"--prompts {args.prompts}: {error}")
