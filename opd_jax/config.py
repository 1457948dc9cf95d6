"""The configuration of a distillation run: :class:`TrainConfig`, in four sections.

* ``objective``: what is minimised and how its gradient is estimated (divergence, estimator,
  level, discount, clips, baseline, the full-vocabulary term, the surrogate's clips and aggregation);
* ``rollout``: how the student's samples are drawn (prompts per step, group size, length, temperature);
* ``optimizer``: AdamW, its schedule, and the PPO epochs / minibatches over each rollout batch;
* ``loop``: length, seed and bookkeeping (evaluation, checkpoints, logit chunking).

Every field carries its section and its help text as dataclass metadata; the ``opd-jax train``
flags and their help are built from them, so a new field is one declaration here.

``config.json`` is written by section (:meth:`TrainConfig.to_json`) and read back flat or by
section (:meth:`TrainConfig.from_dict`). The divergences are recorded as a name (its parameters in
``beta`` / ``alpha``) or, for a custom generator, as the importable ``module:attribute`` of its
function, so a resume rebuilds the same generator.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pathlib
import tomllib
from typing import Any

from opd_jax import chunking
from opd_jax import divergences as divergences_lib
from opd_jax import rollout_layout
from opd_jax import storage
from opd_jax.advantages import ESTIMATORS, LEVELS
from opd_jax.errors import InputError, InputFileNotFoundError

__all__ = ["BASELINES", "CONFIG_FORMATS", "LOSS_AGGREGATIONS", "RESUME_FREE", "ROLLOUT_BACKENDS", "SCHEDULES",
           "SECTIONS", "TrainConfig", "config_value", "flatten_sections", "read_config_file", "resolve_divergence"]

SECTIONS = ("objective", "rollout", "optimizer", "loop")
BASELINES = ("none", "leave_one_out")
SCHEDULES = ("constant", "cosine")
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean")

# Options that change only when or how often something happens, or how fast, not the trajectory of
# the state: a run may be resumed with other values (steps: unless the schedule is cosine).
RESUME_FREE = ("steps", "eval_every", "checkpoint_every", "keep_checkpoints", "logit_chunk_size", "rollout_backend")
#: How teachers read the student's rollouts: on the student's tokens, or re-tokenized from the text.
TOKENIZER_ALIGNMENTS = ("same", "text")
ALIGNMENT_CREDITS = ("characters", "spread")
#: Where rollouts may be sampled (:mod:`opd_jax.backends`).
ROLLOUT_BACKENDS = ("jax", "vllm")


def _field(section: str, default: Any, help_text: str, keywords: tuple[str, ...] = ()) -> Any:
    """A config field: its section, help text and the words it takes besides its type (e.g. ``auto``)."""
    return dataclasses.field(default=default, metadata={"section": section, "help": help_text, "keywords": keywords})


def resolve_divergence(value: str | divergences_lib.Divergence, *, field: str = "divergence",
                       **params: float) -> divergences_lib.Divergence:
    """A :class:`~opd_jax.divergences.Divergence` from a config value.

    Args:
      value: a built-in name (:func:`opd_jax.divergences.names`), a ``Divergence``, or
        ``"module:attribute"`` naming a ``Divergence`` or a generator function ``log_u -> f(e^ℓ)``
        (wrapped by :func:`opd_jax.divergences.custom`).
      field: the config field, for error messages.
      **params: ``beta`` / ``alpha`` of a parametrised built-in.

    Raises:
      ValueError: unknown name, bad parameters, or a ``module:attribute`` that cannot be imported
        (the message names it).
    """
    if isinstance(value, divergences_lib.Divergence):
        if params:
            raise InputError(f"{field}: beta / alpha cannot be set beside a Divergence value ({value!r})")
        return value
    if not isinstance(value, str):
        raise InputError(f"{field} must be a divergence name, a Divergence or 'module:attribute'; got {value!r}")
    if ":" not in value:
        try:
            return divergences_lib.get(value, **params)
        except ValueError as error:
            raise InputError(f"{field}: {error} (or 'module:attribute' of a custom generator)") from None
    module_name, _, attribute = value.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError, TypeError) as error:  # TypeError: a relative '.name'
        raise InputError(f"{field}: cannot import the custom divergence {value!r} ({type(error).__name__}: {error}); "
                         "it must be importable as module:attribute wherever the run is started or resumed") from None
    if params:
        raise InputError(f"{field}: beta / alpha apply to built-in divergences only, not to {value!r}")
    if isinstance(target, divergences_lib.Divergence):
        return target
    if callable(target):
        try:
            return divergences_lib.custom(target, name=attribute)
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - a user's function may raise anything when probed
            raise InputError(f"{field}: {value!r} is not a generator log u -> f(u) ({type(error).__name__}: "
                             f"{error})") from None
    raise InputError(f"{field}: {value!r} is a {type(target).__name__}, not a Divergence or a generator function")


def _divergence_record(divergence: divergences_lib.Divergence, field: str) -> str:
    """The name (built-in) or importable ``module:attribute`` that rebuilds ``divergence``."""
    if divergences_lib.is_builtin(divergence):
        return divergence.name
    function = divergence.f_fn
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    reference = f"{module}:{qualname}"
    if module is None or "<" in qualname:
        raise InputError(
            f"{field}: the custom divergence {divergence!r} has the generator {qualname or function!r}, which "
            "cannot be imported by name, so config.json could not record it and a resume could not rebuild it; "
            "define the generator at module level (or pass 'module:attribute')"
        )
    try:
        rebuilt = resolve_divergence(reference, field=field)
    except ValueError:
        rebuilt = None
    if rebuilt is None or rebuilt.f_fn is not function:
        raise InputError(f"{field}: {reference!r} does not import back to the generator of {divergence!r}; define "
                         "the generator at module level (or pass 'module:attribute')")
    return reference


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a distillation run (saved as ``config.json`` in the run folder).

    Sections (see the module docstring): ``objective``, ``rollout``, ``optimizer``, ``loop``; each
    field's help text is in its metadata (``opd-jax train --help`` prints them).

    The rollout temperature defines the policy being trained: the student is ``π_T ∝ π^{1/T}`` and
    the teacher ``q_T`` alike, and every log-probability of the loop (behaviour, current, teacher)
    is taken at ``temperature``, so the importance ratio of the first update is exactly 1 and the
    estimators keep their guarantees for ``D_f(q_T ‖ π_T)``. ``π_T = q_T`` at every state means
    logits equal up to a constant, i.e. ``π = q``: the objective's minimiser does not depend on T.

    Every float must be finite. ``learning_rate`` lies in (0, 1] (AdamW moves each parameter by
    about the learning rate per update, so a larger one cannot train) and ``learning_rate ×
    weight_decay`` below 1 (each update multiplies the parameters by ``1 − learning_rate ×
    weight_decay``).

    A run folder may be resumed with other values of :data:`RESUME_FREE` fields only (``steps``
    too, to extend a finished run, unless the schedule is ``cosine``, whose shape depends on it).

    >>> from opd_jax import divergences
    >>> config = TrainConfig(divergence=divergences.get("generalized_js", beta=0.3), gamma=1.0)
    >>> sections = config.to_json()
    >>> sections["objective"]["divergence"], sections["objective"]["beta"], sections["loop"]["steps"]
    ('generalized_js', 0.3, 100)
    >>> TrainConfig.from_dict(sections) == TrainConfig(divergence="generalized_js", beta=0.3, gamma=1.0)
    True
    """

    # objective
    divergence: str | divergences_lib.Divergence = _field(
        "objective", "reverse_kl",
        "f-divergence generator: reverse_kl, forward_kl, js, generalized_js, total_variation, squared_hellinger, "
        "pearson_chi2, neyman_chi2, alpha, or module:attribute of a custom generator")
    beta: float | None = _field("objective", None, "beta in (0, 1) for generalized_js")
    alpha: float | None = _field("objective", None, "alpha (not 0 or 1) for the alpha divergence")
    estimator: str = _field("objective", "opd_plus",
                            f"advantage estimator: {', '.join(ESTIMATORS)} (opd_jax.advantages.ESTIMATORS)")
    level: str = _field("objective", "token", "token (per-token advantages) or sequence (one per response)")
    gamma: float = _field("objective", 0.0,
                          "discount in [0, 1] of the token-level reward-to-go (0: per-token form; 1: unbiased)")
    log_ratio_clip: float | None = _field("objective", 20.0, "clamp log-ratios to [-c, c]; 'none' to disable")
    baseline: str = _field("objective", "none",
                           "none or leave_one_out (mean advantage of the other samples of the same prompt)")
    tokenizer_alignment: str = _field(
        "objective", "same",
        "same (teachers share the student's tokenizer; a mismatch is refused) or text (each teacher re-tokenizes "
        "the student's text and its log-probs are summed onto common chunks: docs/cross_tokenizer.md)")
    alignment_credit: str = _field(
        "objective", "characters",
        "with tokenizer_alignment text: characters (the teacher's log-probs factored over the bytes of the text, "
        "from its whole distribution, then summed per student token) or spread (each common chunk's log-ratio "
        "shared by its student tokens)")
    full_vocab_weight: float = _field(
        "objective", 0.0,
        "lambda >= 0: add lambda * sum_t D_f(q||pi)(s_t) over the whole vocabulary (token level; with gamma 1 "
        "unbiased for (1 + lambda) J_tok)")
    full_vocab_divergence: str | divergences_lib.Divergence | None = _field(
        "objective", None, "generator of the full-vocabulary term ('none': the same as --divergence)")
    clip_epsilon: float = _field("objective", 0.2, "PPO clip of the importance ratio, in (0, 1)")
    clip_ratio_c: float | None = _field(
        "objective", None, "dual-clip PPO: bound the loss of negative-advantage tokens at c * |A|, c > 1 ('none': off)")
    loss_aggregation: str = _field(
        "objective", "token_mean",
        "token_mean (sum over the batch / its response-token count) or sequence_mean (mean over responses "
        "of each response's token mean)")
    # rollout
    prompts_per_step: int = _field("rollout", 16, "prompts per training step")
    group_size: int = _field("rollout", 4, "rollouts per prompt")
    max_new_tokens: int = _field("rollout", 32, "longest response")
    temperature: float = _field("rollout", 1.0,
                                "sampling temperature (> 0); the trained policy is the tempered one (see docs)")
    rollout_slots: int | None = _field(
        "rollout", None, "rows the jax sampler decodes at once (per data replica of the rollout mesh); a row "
        "that stops hands its slot to the next prompt ('none': chosen from the rows and the stop ids, see "
        "opd_jax.sampling.default_slots)")
    rollout_mesh: str = _field(
        "rollout", "auto", "how the student's devices are laid out while the jax sampler decodes on a mesh: auto "
        "(the layout of fewest roofline seconds, opd_jax.rollout_estimate.choose_layout), training (the training "
        "mesh: the static batch) or data=R,tensor=T (R replicas of T tensor-parallel devices, R × T the student's "
        "devices; weights resharded once per step)")
    rollout_backend: str = _field(
        "rollout", "jax", "where rollouts are sampled: jax (this process) or vllm (an engine in its own process "
        "and environment; OPD_VLLM=1 .ci/bootstrap builds it)")
    pipeline_rollouts: bool = _field(
        "rollout", False, "sample step k+1's rollouts while step k updates: one step off-policy, corrected by "
        "the per-token importance ratio (its bias: docs/overlap.md)")
    # optimizer
    learning_rate: float = _field("optimizer", 1e-4, "peak AdamW learning rate in (0, 1]")
    warmup_steps: int = _field("optimizer", 0, "linear warm-up steps")
    schedule: str = _field("optimizer", "constant", "learning-rate schedule after warm-up: constant or cosine")
    weight_decay: float = _field("optimizer", 0.0, "AdamW weight decay (>= 0)")
    grad_clip_norm: float = _field("optimizer", 1.0, "global gradient-norm clip (> 0)")
    epochs: int = _field("optimizer", 1, "passes over each rollout batch (PPO epochs)")
    minibatches: int = _field("optimizer", 1, "optimizer updates per pass; must divide prompts_per_step x group_size")
    # loop
    steps: int = _field("loop", 100, "training steps")
    seed: int = _field("loop", 0, "seed of rollouts and prompt order")
    eval_every: int = _field("loop", 0, "evaluate every N steps (0: only before and after; needs a task)")
    checkpoint_every: int = _field("loop", 25, "save a checkpoint every N steps")
    keep_checkpoints: int = _field("loop", 3, "checkpoints kept on disk")
    logit_chunk_size: int | str | None = _field(
        "loop", chunking.AUTO,
        "tokens per vocabulary-projection chunk ('none': all at once; 'auto': chosen from the vocabulary size, "
        "tokens per device and device memory, see opd_jax.chunking.auto_logit_chunk_size)", keywords=(chunking.AUTO,))

    def __post_init__(self):
        self.divergence_fn()  # validates name / reference, beta, alpha
        self.full_vocab_divergence_fn()
        _choice("estimator", self.estimator, ESTIMATORS)
        _choice("level", self.level, LEVELS)
        _choice("baseline", self.baseline, BASELINES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        _choice("rollout_backend", self.rollout_backend, ROLLOUT_BACKENDS)
        _choice("tokenizer_alignment", self.tokenizer_alignment, TOKENIZER_ALIGNMENTS)
        _choice("alignment_credit", self.alignment_credit, ALIGNMENT_CREDITS)
        if not isinstance(self.pipeline_rollouts, bool):
            raise InputError(f"pipeline_rollouts must be true or false; got {self.pipeline_rollouts!r}")
        _range("gamma", self.gamma, 0.0, 1.0)
        if self.log_ratio_clip is not None:
            _range("log_ratio_clip", self.log_ratio_clip, 0.0, None, open_low=True)
        _range("temperature", self.temperature, 0.0, None, open_low=True)
        _range("learning_rate", self.learning_rate, 0.0, 1.0, open_low=True)
        for name in ("weight_decay", "full_vocab_weight"):
            _range(name, getattr(self, name), 0.0, None)
        if self.learning_rate * self.weight_decay >= 1:
            raise InputError(
                f"learning_rate × weight_decay must be below 1 (each update multiplies the parameters by "
                f"1 − learning_rate × weight_decay); got {self.learning_rate} × {self.weight_decay}"
            )
        _range("grad_clip_norm", self.grad_clip_norm, 0.0, None, open_low=True)
        _range("clip_epsilon", self.clip_epsilon, 0.0, 1.0, open_low=True, open_high=True)
        if self.clip_ratio_c is not None:
            _range("clip_ratio_c", self.clip_ratio_c, 1.0, None, open_low=True)
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "epochs", "minibatches", "steps",
                     "checkpoint_every", "keep_checkpoints"):
            _range(name, getattr(self, name), 1, None)
        if self.rollout_slots is not None:
            _range("rollout_slots", self.rollout_slots, 1, None)
        try:
            rollout_layout.parse_rollout_mesh(self.rollout_mesh)
        except ValueError as error:
            raise InputError(str(error)) from None
        for name in ("warmup_steps", "eval_every", "seed"):
            _range(name, getattr(self, name), 0, None)
        if isinstance(self.logit_chunk_size, str):
            _choice("logit_chunk_size", self.logit_chunk_size, (chunking.AUTO,))
        elif self.logit_chunk_size is not None:
            _range("logit_chunk_size", self.logit_chunk_size, 1, None)
        if self.baseline == "leave_one_out" and self.group_size < 2:
            raise InputError("baseline 'leave_one_out' needs group_size >= 2")
        if self.full_vocab_weight > 0 and self.level != "token":
            raise InputError("full_vocab_weight > 0 needs level 'token' (the full-vocabulary term is per token); "
                             f"got level {self.level!r}")
        if self.full_vocab_weight > 0 and self.tokenizer_alignment != "same":
            raise InputError("full_vocab_weight > 0 needs tokenizer_alignment 'same' (the full-vocabulary term "
                             "compares the two distributions id by id; across vocabularies it is not built)")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise InputError(
                f"minibatches ({self.minibatches}) must divide prompts_per_step × group_size "
                f"({self.prompts_per_step * self.group_size})"
            )
        self.to_dict()  # a divergence that config.json could not record is refused now, not at the first save

    def divergence_fn(self) -> divergences_lib.Divergence:
        """The :class:`~opd_jax.divergences.Divergence` of the sampled-token objective."""
        params = {k: v for k, v in (("beta", self.beta), ("alpha", self.alpha)) if v is not None}
        for name, value in params.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{name} must be a finite number; got {value!r}")
        return resolve_divergence(self.divergence, **params)

    def full_vocab_divergence_fn(self) -> divergences_lib.Divergence:
        """The generator of the full-vocabulary term (``divergence``'s when unset)."""
        if self.full_vocab_divergence is None:
            return self.divergence_fn()
        return resolve_divergence(self.full_vocab_divergence, field="full_vocab_divergence")

    def with_resolved_chunks(self, *, vocab_size: int, sequence_length: int, batch_shards: int,
                             device_memory_bytes: int) -> TrainConfig:
        """This config with ``logit_chunk_size = "auto"`` replaced by its value (others unchanged).

        The scoring pass projects the most tokens at once: ``prompts_per_step × group_size`` rows
        of ``sequence_length`` over ``batch_shards`` devices (see
        :func:`opd_jax.chunking.auto_logit_chunk_size`, whose ``ValueError`` it raises).
        """
        if self.logit_chunk_size != chunking.AUTO:
            return self
        rows = self.prompts_per_step * self.group_size
        chunk = chunking.auto_logit_chunk_size(
            vocab_size=vocab_size, tokens_per_device=-(-rows * sequence_length // batch_shards),
            device_memory_bytes=device_memory_bytes)
        return dataclasses.replace(self, logit_chunk_size=chunk)

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{field: value}`` of JSON values (divergences as names or ``module:attribute``)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["divergence"] = _divergence_record(self.divergence_fn(), "divergence")
        if isinstance(self.divergence, divergences_lib.Divergence) and divergences_lib.is_builtin(self.divergence):
            values.update(dict(zip(_PARAMETER_FIELDS.get(self.divergence.name, ()), self.divergence.params)))
        if self.full_vocab_divergence is not None:
            values["full_vocab_divergence"] = _divergence_record(self.full_vocab_divergence_fn(),
                                                                 "full_vocab_divergence")
        return values

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``config.json``'s content: :meth:`to_dict` grouped by section."""
        flat = self.to_dict()
        return {section: {f.name: flat[f.name] for f in dataclasses.fields(self) if f.metadata["section"] == section}
                for section in SECTIONS}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "") -> TrainConfig:
        """From a flat or sectioned mapping, each value checked against its field's type (:func:`config_value`).

        Args:
          values: ``{field: value}`` or ``{section: {field: value}}``, as JSON or TOML give them.
          source: prefix of error messages (e.g. ``"--config run.toml: "``).

        Raises:
          InputError: an unknown key (the message lists the valid ones), a value of the wrong type or
            out of range (the message names the field and what is allowed).
        """
        if not isinstance(values, dict):
            raise InputError(f"{source}expected a table of training options, got {type(values).__name__}")
        try:
            flat = flatten_sections(values)
            return cls(**{name: config_value(name, value) for name, value in flat.items()})
        except InputError as error:
            raise InputError(f"{source}{error}") from None


# The config fields that hold a parametrised built-in's parameters, in Divergence.params order.
_PARAMETER_FIELDS = {"generalized_js": ("beta",), "alpha": ("alpha",)}


def flatten_sections(values: dict[str, Any], *, other_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{section: {field: value}}`` (as in ``config.json``) or flat ``{field: value}`` -> flat.

    Args:
      other_keys: top-level keys that are not training options but are valid in the file (e.g. the
        ``opd-jax train`` options outside :class:`TrainConfig`, such as ``max_prompt_length``); they
        are left out of the result.

    Raises:
      InputError: an unknown key or section (the message lists the valid ones), or a field given twice.
    """
    fields = {f.name: f.metadata["section"] for f in dataclasses.fields(TrainConfig)}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in other_keys and key not in fields:
            continue
        if key in SECTIONS and isinstance(value, dict):
            for name, item in value.items():
                if not isinstance(name, str) or fields.get(name) != key:
                    where = f"it belongs to [{fields[name]}]" if name in fields else f"valid: {sorted(k for k, s in fields.items() if s == key)}"
                    raise InputError(f"unknown training option {name!r} in section [{key}]; {where}")
                if name in flat:
                    raise InputError(f"training option {name!r} is given twice")
                flat[name] = item
        elif key in fields:
            if key in flat:
                raise InputError(f"training option {key!r} is given twice")
            flat[key] = value
        else:
            others = f", and {sorted(other_keys)}" if other_keys else ""
            raise InputError(f"unknown training option(s) [{key!r}]; valid: {sorted(fields)} "
                             f"(or grouped in sections {', '.join(SECTIONS)}){others}")
    return flat


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _range(name, value, low, high, *, open_low=False, open_high=False) -> None:
    ok = value is not None and (value > low if open_low else value >= low)
    # inf passes an open upper bound and nan fails every comparison: both are named "finite" here.
    finite = not isinstance(value, float) or math.isfinite(value)
    ok = ok and finite
    if high is not None:
        ok = ok and (value < high if open_high else value <= high)
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {'∞)' if high is None else str(high) + (')' if open_high else ']')}"
        raise InputError(f"{name} must lie in {bounds}{'' if finite else ' and be finite'}; got {value!r}")


#: The formats of a configuration file: TOML (``.toml``) and JSON (any other name).
CONFIG_FORMATS = ("TOML (.toml)", "JSON (.json)")


def read_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """The table of a TOML (``.toml``) or JSON (any other name) configuration file, as parsed.

    Raises:
      InputFileNotFoundError: no such file (or a folder).
      InputError: a YAML name (``.yaml`` / ``.yml``: the message names the formats read), a file that
        is not UTF-8 or does not parse (the parser's message), or not a table at its top.
    """
    path = storage.as_path(path, what="file")
    formats = " or ".join(CONFIG_FORMATS)
    if path.is_dir():
        raise InputFileNotFoundError(f"{path} is a folder; give a {formats} file")
    if not path.is_file():
        raise InputFileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() in (".yaml", ".yml"):
        raise InputError(f"{path}: YAML is not read; configuration files are {formats}, with the same keys "
                         "(e.g. `steps = 100` in TOML, {\"steps\": 100} in JSON)")
    toml = path.suffix.lower() == ".toml"
    try:
        text = path.read_bytes().decode("utf-8")
        values = tomllib.loads(text) if toml else json.loads(text)
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 (byte at offset {error.start}); {formats} files are UTF-8") from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to read as {'TOML' if toml else 'JSON'}") from None
    except ValueError as error:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        kind = "TOML" if toml else "JSON (a file not named .toml is read as JSON)"
        raise InputError(f"{path}: cannot parse as {kind}: {error}; configuration files are {formats}") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a table of options at the top, got {type(values).__name__}")
    return values


def config_value(name: str, value: Any) -> Any:
    """``value`` of the field ``name`` checked against the field's declared type.

    ``"none"`` (any case) is ``None`` for an optional field, as on the command line; a field's
    keywords (``logit_chunk_size = "auto"``) are taken as given; an integer is a number for a float
    field (and becomes a float). The divergence fields also take a :class:`~opd_jax.divergences.Divergence`.

    Raises:
      InputError: naming the field, the type it needs and the value given with its type.
    """
    field = _FIELDS[name]
    declared = str(field.type)
    optional = "None" in declared
    keywords = field.metadata.get("keywords", ())
    if isinstance(value, str) and value.lower() in keywords:
        return value.lower()
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if isinstance(value, divergences_lib.Divergence) and "Divergence" in declared:
        return value
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
        alternative = "".join(f' or "{word}"' for word in (*keywords, *(("none",) if optional else ())))
        raise InputError(f"{name} must be {wanted}{alternative}; got {value!r} ({kind})")
    if wanted == "a number":
        try:
            return float(value)
        except OverflowError:
            raise InputError(f"{name} must be a finite number; got an integer of {len(str(abs(value)))} "
                             "digits") from None
    return value


_FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}
