"""Flag parsing shared by several ``opd-jax`` commands: typed values, the training and model-execution
options, the training configuration they make, and the argparse-like failure."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

# Exit status of `opd-jax train` stopped by SIGTERM / SIGINT after committing the step it reached:
# re-running the same command resumes (EX_TEMPFAIL of sysexits.h; = opd_jax.preemption.EXIT_RESUMABLE,
# not imported here so that the CLI starts without importing jax).
EXIT_RESUMABLE = 75

# TrainConfig fields opd-jax train does not offer: evaluation needs a task's evaluator, which only
# `opd-jax demo` / `opd-jax eval` have.
_NOT_IN_TRAIN = ("eval_every",)  # a flag of its own, with --eval-dataset


def fail(command: str, message: str, status: int = 2):
    """Exit like argparse does for a bad argument: ``status`` (2: bad input) and the reason on stderr."""
    print(f"opd-jax {command}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def positive_int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def accept_negative_numbers(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` read ``-1e-3`` and ``-inf`` as values.

    argparse takes "-1e-3" or "-inf" for an unknown flag ("expected one argument"); plain "-1" and
    "-0.5" it already reads as numbers. No flag of the commands that take the training options looks
    like a number, so widen its matcher.
    """
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$",
                                                 re.IGNORECASE)


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


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, from its metadata (section, help), defaulting to None so that
    only given flags override."""
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


# The attribute under which apply_config_file leaves, for train_config, the keys of --config that
# are flags of opd-jax train or plan outside TrainConfig (max_prompt_length, student, mesh, ...).
_CONFIG_FLAG_KEYS = "config_flag_keys"
# The commands whose --config may hold their flags, and which share one file.
_CONFIG_COMMANDS = ("train", "plan")


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Make the keys of ``--config`` that name flags outside :class:`~opd_jax.config.TrainConfig`
    (``max_prompt_length``, ``student``, ``mesh``, ...: each flag's name with underscores) the
    defaults of those flags, so that a flag given on the command line still wins.

    Each value is checked as the flag checks its text (type, choices); a flag that takes a value
    several times (``--teacher``) takes a list. A required flag given in the file is no longer
    required on the command line. Keys that are flags of the other command reading the same file
    (``opd-jax plan`` / ``train``) are left to it. Training options are left to :func:`train_config`.
    Exits with status 2 and one line naming the file and the key on a bad value.
    """
    import pathlib

    from opd_jax.config import SECTIONS, TrainConfig, read_config_file
    from opd_jax.errors import InputError

    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices
    position = next((k for k, token in enumerate(argv) if token in commands), None)
    if position is None or argv[position] not in _CONFIG_COMMANDS:
        return
    command = argv[position]
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", type=pathlib.Path)
    path = finder.parse_known_args(argv[position + 1:])[0].config
    if path is None:
        return
    try:
        values = read_config_file(path)
    except InputError as error:
        fail(command, f"--config {error}")
    fields = {field.name for field in dataclasses.fields(TrainConfig)} | set(SECTIONS)
    flags = {name: {action.dest: action for action in commands[name]._actions
                    if action.dest not in fields and action.option_strings and action.dest not in ("help", "config")}
             for name in _CONFIG_COMMANDS}
    mine = flags[command]
    given = [token.split("=", 1)[0] for token in argv[position + 1:] if token.startswith("--")]
    defaults = {}
    for key, value in values.items():
        action = mine.get(key)
        if action is None:
            continue
        if isinstance(action, argparse._AppendAction) and any(
                option.startswith(token) and len(token) > 2 for token in given for option in action.option_strings):
            continue  # the command line's list replaces the file's (append would add to it)
        try:
            defaults[key] = _flag_value(action, value)
        except InputError as error:
            fail(command, f"--config {path}: {key} = {value!r}: {error}")
        action.required = False
    commands[command].set_defaults(**defaults, **{
        _CONFIG_FLAG_KEYS: tuple(sorted({key for keys in flags.values() for key in keys}))})


def _flag_value(action: argparse.Action, value):
    """A config-file value of a flag, checked and converted as the flag does its text."""
    from opd_jax.errors import InputError

    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise InputError(f"expected true or false (the flag {action.option_strings[0]} takes no value)")
        return value if action.const is True else not value
    items = value if isinstance(action, argparse._AppendAction) and isinstance(value, list) else [value]
    converted = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise InputError(f"expected a value as {action.option_strings[0]} takes it (text or a number), got "
                             f"{type(item).__name__}")
        try:
            result = action.type(str(item)) if action.type is not None else str(item)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
            raise InputError(f"not a value of {action.option_strings[0]} ({error})") from None
        if action.choices is not None and result not in action.choices:
            raise InputError(f"{action.option_strings[0]} takes one of {', '.join(map(str, action.choices))}")
        converted.append(result)
    return converted if isinstance(action, argparse._AppendAction) else converted[0]


def train_config(args: argparse.Namespace, command: str = "train", overrides: dict | None = None):
    """The :class:`~opd_jax.config.TrainConfig` of ``--config`` and the flags (flags win), then
    ``overrides``; what ``opd-jax train`` trains and ``opd-jax plan`` plans."""
    from opd_jax.config import TrainConfig, config_value, flatten_sections, read_config_file
    from opd_jax.errors import InputError

    values: dict = {}
    eval_dataset = getattr(args, "eval_dataset", None)
    if args.config is not None:
        source = f"--config {args.config}"
        try:
            values = read_config_file(args.config)
        except InputError as error:
            fail(command, f"--config {error}")
        try:
            values = flatten_sections(values, other_keys=getattr(args, _CONFIG_FLAG_KEYS, ()))
            for name in _NOT_IN_TRAIN:
                if values.get(name) and eval_dataset is None:
                    raise InputError(f"{name} needs --eval-dataset (without one opd-jax train has no evaluator); "
                                     "remove it or give a held-out dataset")
            values = {name: config_value(name, value) for name, value in values.items()}
        except InputError as error:
            fail(command, f"{source}: {error}")
    for field in dataclasses.fields(TrainConfig):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = None if given is EXPLICIT_NONE else given
    values.update(overrides or {})
    try:
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        fail(command, str(error))


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


def execution(args: argparse.Namespace):
    """The :class:`~opd_jax.models.Execution` of the model-execution flags (:func:`add_model_options`)."""
    from opd_jax.models import Execution

    return Execution(attention=args.attention, remat=args.remat, param_dtype=args.param_dtype,
                     compute_dtype=args.compute_dtype, teacher_dtype=args.teacher_dtype,
                     export_dtype=getattr(args, "export_dtype", "auto"))


def placement(args: argparse.Namespace, command: str):
    """The :class:`~opd_jax.sharding.Placement` of ``--mesh`` / ``--teacher-mesh`` (default rules)."""
    from opd_jax import sharding

    meshes = []
    for flag, text in (("--mesh", args.mesh), ("--teacher-mesh", args.teacher_mesh)):
        try:
            meshes.append(None if text is None else sharding.parse_mesh(text))
        except ValueError as error:
            fail(command, f"{flag}: {error}")
    return sharding.Placement(*meshes)
