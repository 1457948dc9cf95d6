"""One run specification, one run: what ``opd-jax train`` does, for Python users too.

A :class:`RunSpec` holds everything that defines a run: the :class:`~opd_jax.config.TrainConfig`,
how the models run (:class:`~opd_jax.models.Execution`), which models (:class:`Models`), where they
are placed (:class:`~opd_jax.sharding.Placement`: role -> mesh and partition rules), the data
(:class:`Data`) and the run folder. :func:`check` runs every check
that needs no compile (options, prompt file, folders, weights, tokenizers, meshes, lengths) and
writes nothing; :func:`launch` checks, takes the run folder's lock, loads the models and trains.
The command line only maps flags or TOML onto a :class:`RunSpec` and exceptions onto exit codes;
``opd-jax plan`` plans the same :class:`~opd_jax.config.TrainConfig`, :class:`Execution` and
:class:`Placement`.

Errors in the input are :class:`~opd_jax.errors.InputError` (a ``ValueError``; a missing file is
also a ``FileNotFoundError``) naming the option, file or line, raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from opd_jax import rollout_layout
from opd_jax import sharding as sharding_lib
from opd_jax import storage
from opd_jax.config import TrainConfig
from opd_jax.errors import InputError, InputFileNotFoundError
from opd_jax.models import Execution
from opd_jax.sharding import Placement

__all__ = ["Checked", "Data", "Execution", "Models", "Placement", "RunSpec", "check", "launch"]


@dataclasses.dataclass(frozen=True)
class Models:
    """The checkpoint folders (Hugging Face: config.json, safetensors, tokenizer).

    Attributes:
      student: the student's folder.
      teachers: ``{name: folder}``; one teacher is conventionally named ``teacher``. With several,
        each prompt line names its own (``"teacher"`` key).
    """

    student: pathlib.Path
    teachers: Mapping[str, pathlib.Path]

    def __post_init__(self):
        if not self.teachers:
            raise ValueError("--teacher: give at least one teacher folder")
        # Local folders or gs:// URLs, one path type (opd_jax.storage); other schemes are refused here.
        object.__setattr__(self, "student", storage.as_path(self.student, what="--student"))
        object.__setattr__(self, "teachers", {name: storage.as_path(folder, what="--teacher")
                                              for name, folder in self.teachers.items()})


@dataclasses.dataclass(frozen=True)
class Data:
    """Prompts and the held-out evaluation.

    Attributes:
      prompts: JSONL, one ``{"prompt": str}`` or ``{"messages": [...]}`` per line.
      max_prompt_length: prompt slots; a longer prompt is an error.
      chat_template: encode prompts with the tokenizer's chat template (when it has one).
      eval_dataset, eval_answer_key, eval_samples: held-out math problems scored with math-verify
        (``None``: no evaluation; ``TrainConfig.eval_every`` then must be 0).
      allow_unknown_tokens: train on prompts with text the tokenizer encodes to its unknown token
        (with a warning naming them) instead of refusing them (:mod:`opd_jax.unknown_tokens`).
    """

    prompts: pathlib.Path
    max_prompt_length: int = 256
    chat_template: bool = True
    eval_dataset: pathlib.Path | None = None
    eval_answer_key: str = "answer"
    eval_samples: int = 1
    allow_unknown_tokens: bool = False

    def __post_init__(self):
        object.__setattr__(self, "prompts", storage.as_path(self.prompts, what="--prompts"))
        if self.eval_dataset is not None:
            object.__setattr__(self, "eval_dataset", storage.as_path(self.eval_dataset, what="--eval-dataset"))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run (see the module docstring)."""

    train: TrainConfig
    models: Models
    data: Data
    output: pathlib.Path
    execution: Execution = Execution()
    placement: Placement = Placement()
    # How long the lock of a run folder in a bucket outlives its holder's last renewal (renewed
    # every quarter lease): a run killed on another host blocks its folder at most this long.
    lock_lease_seconds: float = storage.DEFAULT_LEASE_SECONDS

    def __post_init__(self):
        object.__setattr__(self, "output", storage.as_path(self.output, what="--output"))


@dataclasses.dataclass(frozen=True)
class Checked:
    """What :func:`check` read and derived, for :func:`launch`."""

    student_config: Any
    teacher_configs: dict[str, Any]
    tokenizer: Any
    tokens: np.ndarray
    mask: np.ndarray
    teacher_ids: np.ndarray
    evaluate: Callable | None
    identity: dict
    export_dtype: str
    teacher_tokenizers: dict[str, Any]
    teacher_prompts: dict[str, tuple[np.ndarray, np.ndarray]] | None


def check(spec: RunSpec) -> Checked:
    """Every check that needs no compile, in the order a user fixes them; writes nothing.

    Raises:
      InputError: naming the option, file or line, its value and what is allowed (an
        :class:`~opd_jax.errors.InputFileNotFoundError` for a missing file or folder).
    """
    try:
        return _check(spec)
    except InputError:
        raise
    except FileNotFoundError as error:  # the one input exception type, whichever check raised it
        raise InputFileNotFoundError(str(error)) from None
    except ValueError as error:
        raise InputError(str(error)) from None


def _check(spec: RunSpec) -> Checked:
    from opd_jax import data, run_folder, tokenization, unknown_tokens
    from opd_jax.models.hf import checkpoint_dtype

    config = spec.train
    _check_rollout_backend(config)
    if config.eval_every and spec.data.eval_dataset is None:
        raise ValueError("--eval-every needs --eval-dataset (without one opd-jax train has no evaluator)")
    _check_meshes(config, spec.placement)
    inputs = {**_model_flags(spec.models), "--prompts": spec.data.prompts, "--eval-dataset": spec.data.eval_dataset}
    for flag, path in inputs.items():  # credentials and buckets, named before any read
        if path is not None:
            storage.check_bucket(path, what=flag)
    run_folder.check_output_folder(spec.output, _model_flags(spec.models))
    teachers = dict(spec.models.teachers)
    line_bound = data.prompt_line_bound(spec.data.max_prompt_length)
    records = data.read_prompt_records(spec.data.prompts, max_line_bytes=line_bound,
                                       limit_hint=f" with --max-prompt-length {spec.data.max_prompt_length}")
    teacher_ids = np.asarray(data.prompt_teachers(spec.data.prompts, tuple(teachers), max_line_bytes=line_bound),
                             np.int32)
    chat = spec.data.chat_template or any(not isinstance(p, str) for _, p in records)
    student_config, teacher_configs, tokenizer, teacher_tokenizers = _read_models(
        spec.models, chat_template=chat, alignment=config.tokenizer_alignment)
    texts = [prompt for _, prompt in records]
    labels = [f"prompt {k} ({spec.data.prompts}:{line})" for k, (line, _) in enumerate(records, start=1)]
    try:
        tokens, mask = tokenization.encode_prompts(tokenizer, texts, max_length=spec.data.max_prompt_length,
                                                   use_chat_template=spec.data.chat_template, labels=labels)
    except ValueError as error:
        if "longer than max_length" in str(error):
            raise ValueError(f"{error}; raise --max-prompt-length or shorten them") from None
        raise
    unknown_tokens.check_prompts(tokenizer, texts,
                                 [f"{spec.data.prompts}:{line}" for line, _ in records],
                                 allow=spec.data.allow_unknown_tokens)
    evaluate = _held_out_evaluator(spec.data, config, tokenizer, student_config)
    text = config.tokenizer_alignment == "text"
    # Re-tokenized, a teacher's lengths are its own: its prompts are checked here, its responses each step.
    _check_positions(spec, {} if text else teacher_configs, student_config, int(mask.sum(axis=1).max()))
    teacher_prompts = _teacher_prompts(spec, texts, labels, teacher_configs, teacher_tokenizers) if text else None
    _check_layout(spec, student_config, teacher_configs)
    identity = run_folder.compute_identity(
        next(iter(teachers.values())) if len(teachers) == 1 else teachers, spec.models.student, spec.data.prompts,
        {"max_prompt_length": spec.data.max_prompt_length, "chat_template": spec.data.chat_template},
    )
    run_folder.check_identity(spec.output, identity)  # read only; again under the lock in launch
    export_dtype = (checkpoint_dtype(spec.models.student) if spec.execution.export_dtype == "auto"
                    else spec.execution.export_dtype)
    return Checked(student_config, teacher_configs, tokenizer, tokens, mask, teacher_ids, evaluate, identity,
                   export_dtype, teacher_tokenizers, teacher_prompts)


def _read_models(models: Models, *, chat_template: bool, alignment: str = "same"):
    """``(student config, {name: teacher config}, student tokenizer, {name: teacher tokenizer})``: each
    folder's config, weights and tokenizer present, and with ``alignment`` ``"same"`` every teacher's
    tokenizer (and chat template) the student's."""
    from opd_jax import models as models_lib
    from opd_jax import tokenization

    teachers = dict(models.teachers)
    flags = _model_flags(models)
    folder_configs, tokenizers = {}, {}
    for flag, folder in flags.items():
        try:  # everything train will read from the folder, headers only: no weights are loaded here
            folder_configs[flag] = models_lib.load_config(folder)
            models_lib.check_weights(folder)
            tokenizers[flag] = tokenization.load_tokenizer(folder)
        except InputError as error:
            raise type(error)(f"{flag}: {error}") from None
    student_config, tokenizer = folder_configs.pop("--student"), tokenizers.pop("--student")
    teacher_configs = dict(zip(teachers, folder_configs.values()))
    teacher_tokenizers = dict(zip(teachers, tokenizers.values()))
    if alignment == "same":  # with "text" each teacher reads the student's text with its own tokenizer
        for flag, teacher_config in zip(folder_configs, teacher_configs.values()):
            try:
                tokenization.check_compatible(tokenizers[flag], tokenizer, teacher_config,
                                              student_config, chat_template=chat_template)
            except ValueError as error:
                message = f"{error} (or set tokenizer_alignment 'text' to distil across tokenizers)"
                raise ValueError(f"{flag}: {message}" if len(teacher_configs) > 1 else message) from None
    return student_config, teacher_configs, tokenizer, teacher_tokenizers


def _teacher_prompts(spec: RunSpec, texts: list, labels: list[str], teacher_configs: dict, teacher_tokenizers: dict):
    """``{name: (tokens [N, P_t], mask)}``: every prompt in each teacher's own tokens and chat template,
    left-padded to that teacher's longest (``tokenizer_alignment = "text"``)."""
    from opd_jax import tokenization

    encoded = {}
    for name, teacher_tokenizer in teacher_tokenizers.items():
        # Room for one response token at least, and a bound on the padded arrays: a teacher's prompt
        # may take up to 8 times the student's prompt slots (a character-level teacher of a BPE student).
        limit = min(teacher_configs[name].max_position_embeddings - 1, 8 * spec.data.max_prompt_length)
        try:
            tokens, mask = tokenization.encode_prompts(teacher_tokenizer, texts, max_length=limit,
                                                       use_chat_template=spec.data.chat_template, labels=labels)
        except ValueError as error:
            raise ValueError(f"teacher {name!r} (its own tokens): {error}") from None
        width = int(mask.sum(axis=1).max())
        encoded[name] = (tokens[:, limit - width:], mask[:, limit - width:])
    return encoded


def _model_flags(models: Models) -> dict[str, pathlib.Path]:
    """``{flag: folder}``: ``--teacher`` (``--teacher NAME`` with several) and ``--student``."""
    teachers = dict(models.teachers)
    return {**{f"--teacher {name}" if len(teachers) > 1 else "--teacher": folder for name, folder in teachers.items()},
            "--student": models.student}


def _check_layout(spec: RunSpec, student_config, teacher_configs: dict) -> None:
    """The meshes against the devices, the batch and every parameter's shape, as :func:`train`
    places them (:func:`opd_jax.step.make_step_shardings` on abstract models: no weights, no compile)."""
    if spec.placement.mesh is None:
        return
    from flax import nnx

    from opd_jax import step
    from opd_jax.models import Decoder

    def abstract_params(config):
        return nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))[1]

    teacher_params = {name: abstract_params(config) for name, config in teacher_configs.items()}
    placement = spec.placement
    try:
        step.make_step_shardings(
            spec.train, placement.mesh, abstract_params(student_config),
            teacher_params if len(teacher_params) > 1 else next(iter(teacher_params.values())),
            step.make_optimizer(spec.train), placement.student_rules, placement.teacher_rules, placement.teacher_mesh)
    except ValueError as error:
        raise ValueError(f"--mesh: {error}") from None
    try:
        rollout_layout.check_rollout_mesh(spec.train.rollout_mesh, placement.mesh.size, student_config,
                                          spec.train.prompts_per_step * spec.train.group_size)
    except ValueError as error:
        raise ValueError(f"--rollout-mesh: {error}") from None


def launch(spec: RunSpec, *, progress: bool = True):
    """Check ``spec`` (:func:`check`), take the run folder's lock, load the models, train, export.

    In a multi-process run every process calls it (after ``jax.distributed.initialize``); process 0
    holds the lock and writes the run folder.

    Returns:
      The :class:`~opd_jax.train.TrainResult`; the student's tokenizer is saved beside its export.

    Raises:
      ValueError, FileNotFoundError: bad input (nothing written), or a run folder holding another run.
      opd_jax.run_folder.RunFolderError: the folder is locked by a live run, or holds another run.
      Preempted, NonFiniteError, WeightSyncError: as :func:`opd_jax.train.train`.
    """
    import jax

    from opd_jax import run_folder

    checked = check(spec)
    run_lock, folder_state = _lock(spec, checked.identity) if jax.process_index() == 0 else (None, None)
    try:
        student, teachers = _load_models(spec)
    except BaseException:
        if run_lock is not None:
            run_lock.release(undo=True)  # nothing was written but the lock
        raise
    if run_lock is not None and folder_state == "new":
        run_folder.write_identity(spec.output, checked.identity)
    try:
        result = _train(spec, checked, student, teachers, progress=progress and jax.process_index() == 0)
    finally:
        if run_lock is not None:
            run_lock.release()
    if jax.process_index() == 0 and storage.is_remote(result.output_dir):
        with tempfile.TemporaryDirectory(prefix="opd_jax_tokenizer_") as local:
            # transformers writes tokenizers to local folders only: written here, then copied up.
            checked.tokenizer.save_pretrained(local)
            storage.copy_tree(storage.as_path(local), result.output_dir / "student")
    elif jax.process_index() == 0:
        checked.tokenizer.save_pretrained(result.output_dir / "student")
    return result


def _lock(spec: RunSpec, identity: dict):
    """``(lock, folder state)``: the run folder's lock, held for the whole run by process 0 (the
    other processes write only checkpoints, which orbax coordinates), after the identity check."""
    from opd_jax import run_folder

    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    run_lock = run_folder.acquire_lock(spec.output, run=digest, lease_seconds=spec.lock_lease_seconds)
    try:
        folder_state = run_folder.check_identity(spec.output, identity)
    except run_folder.RunFolderError:
        run_lock.release(undo=True)
        raise
    if folder_state == "unrecorded":
        print(f"opd-jax train: warning: {spec.output} holds a run started before opd-jax recorded run inputs "
              f"({run_folder.IDENTITY_FILE}); resuming it without checking that the teacher, student and prompts "
              "are the same", file=sys.stderr)
    return run_lock, folder_state


def _load_models(spec: RunSpec):
    """``(student, {name: teacher})`` loaded with the execution options of ``spec``."""
    import jax

    from opd_jax import models

    execution = spec.execution
    platform = jax.default_backend()
    compute_dtype, teacher_dtype = (models.resolve_dtype(d, platform)
                                    for d in (execution.compute_dtype, execution.teacher_dtype))
    student, _ = models.from_pretrained(spec.models.student, execution.param_dtype, compute_dtype=compute_dtype,
                                        attention=execution.attention, remat=execution.remat)
    teachers = {name: models.from_pretrained(folder, teacher_dtype, compute_dtype=compute_dtype,
                                             attention=execution.attention)[0]
                for name, folder in spec.models.teachers.items()}
    return student, teachers


def _train(spec: RunSpec, checked: Checked, student, teachers: dict, *, progress: bool):
    """:func:`opd_jax.train.train` on the checked inputs."""
    from opd_jax import train

    tokenizer = checked.tokenizer
    stop_ids = tuple(checked.student_config.eos_token_id) or (
        (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    several = len(teachers) > 1
    teacher_text = None if checked.teacher_prompts is None else _teacher_reader(spec, checked, stop_ids)
    return train.train(
        spec.train, student, checked.student_config, teachers if several else next(iter(teachers.values())),
        train.PromptSet(checked.tokens, checked.mask, checked.teacher_ids if several else None, teacher_text),
        spec.output,
        stop_ids=stop_ids, pad_id=pad_id, progress=progress, placement=spec.placement,
        export_dtype=checked.export_dtype, evaluate=checked.evaluate,
    )


def _teacher_reader(spec: RunSpec, checked: Checked, stop_ids: tuple[int, ...]):
    """The :class:`~opd_jax.retokenize.TeacherReader` of ``tokenizer_alignment = "text"``."""
    from opd_jax.retokenize import TeacherReader
    from opd_jax.teacher_bytes import vocabulary_bytes
    from opd_jax.tokenization import compatibility_differences

    names = tuple(spec.models.teachers)
    tokenizers = tuple(checked.teacher_tokenizers[n] for n in names)
    identical = not any(compatibility_differences(
        teacher_tokenizer, checked.tokenizer, checked.teacher_configs[n], checked.student_config,
        chat_template=spec.data.chat_template) for n, teacher_tokenizer in zip(names, tokenizers))
    vocabularies = None
    if spec.train.alignment_credit == "characters" and not identical:  # identical: nothing is re-tokenized
        vocabularies = tuple(vocabulary_bytes(teacher_tokenizer, checked.teacher_configs[n].vocab_size)
                             for n, teacher_tokenizer in zip(names, tokenizers))
    return TeacherReader(
        checked.tokenizer, names, tokenizers, tuple(checked.teacher_prompts[n][0] for n in names),
        tuple(checked.teacher_prompts[n][1] for n in names),
        tuple(checked.teacher_configs[n].max_position_embeddings for n in names), stop_ids, identical,
        vocabularies=vocabularies)


def _check_rollout_backend(config: TrainConfig) -> None:
    """A vLLM side environment that is missing or cannot import vllm is an error naming the command
    that builds it, before anything is written (the probe takes the seconds of one ``import vllm``)."""
    if config.rollout_backend != "vllm":
        return
    from opd_jax.backends.vllm import BOOTSTRAP_COMMAND, vllm_python

    python = vllm_python()
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise ValueError(f"--rollout-backend vllm: no vLLM environment at {python}; build it with "
                         f"`{BOOTSTRAP_COMMAND}` (or point OPD_VLLM_PYTHON at one)")
    probe = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        raise ValueError(f"--rollout-backend vllm: {python} cannot import vllm ({last}); rebuild the environment "
                         f"with `{BOOTSTRAP_COMMAND}`")


def _check_meshes(config: TrainConfig, placement: Placement) -> None:
    """A teacher mesh needs a student mesh, one process and no full-vocabulary term, and the two
    meshes must split the devices (which a multi-process run has joined by now)."""
    from opd_jax import train

    if placement.teacher_mesh is None:
        return
    if placement.mesh is None:
        raise ValueError("--teacher-mesh needs --mesh (the student's mesh takes the first devices, the teacher's "
                         "the rest)")
    try:
        train.check_teacher_mesh(config, placement.mesh, placement.teacher_mesh)
        sharding_lib.disjoint_meshes(placement.mesh, placement.teacher_mesh)
    except ValueError as error:
        raise ValueError(f"--mesh / --teacher-mesh: {error}") from None


def _held_out_evaluator(data: Data, config: TrainConfig, tokenizer, student_config):
    """The ``train(evaluate=)`` hook of ``eval_dataset`` (``None`` without one), with the training
    response budget (``max_new_tokens``); the dataset and its prompt lengths are checked here,
    before anything is written."""
    if data.eval_dataset is None:
        return None
    from opd_jax import evaluation

    problems = evaluation.read_problems(data.eval_dataset, answer_key=data.eval_answer_key)
    options = dict(samples=data.eval_samples, use_chat_template=data.chat_template,
                   max_new_tokens=config.max_new_tokens)
    evaluation.encode_problems(tokenizer, problems, evaluation.MathEvalConfig(**options),
                               max_position_embeddings=student_config.max_position_embeddings)
    return evaluation.math_evaluator(tokenizer, problems, **options)


def _check_positions(spec: RunSpec, teacher_configs: dict, student_config, longest: int) -> None:
    """Prompt slots plus new tokens must fit every model's positions; say which option to change."""
    prompt_slots, new_tokens = spec.data.max_prompt_length, spec.train.max_new_tokens
    total = prompt_slots + new_tokens
    limit, who, folder = min([(student_config.max_position_embeddings, "student", spec.models.student)] + [
        (teacher_config.max_position_embeddings, "teacher" if len(teacher_configs) == 1 else f"teacher {name}",
         spec.models.teachers[name]) for name, teacher_config in teacher_configs.items()])
    if total <= limit:
        return
    fixes = []
    if limit - new_tokens >= longest:
        fixes.append(f"--max-prompt-length at most {limit - new_tokens} (the longest prompt has {longest} tokens)")
    if limit - prompt_slots >= 1:
        fixes.append(f"--max-new-tokens at most {limit - prompt_slots}")
    elif limit - longest >= 1:
        fixes.append(f"--max-new-tokens at most {limit - longest} with --max-prompt-length {longest}")
    advice = "; set " + " or ".join(fixes) if fixes else f"; the longest prompt alone has {longest} tokens"
    raise ValueError(f"--max-prompt-length {prompt_slots} + --max-new-tokens {new_tokens} = {total} positions, more "
                     f"than the {who}'s max_position_embeddings {limit} ({storage.as_path(folder) / 'config.json'})"
                     f"{advice}")
