"""The rollout under real response lengths: a length model, the slot schedule it gives, and a
roofline of each rollout layout.

``opd-jax plan`` compiles the rollout's worst case (every row decoding ``max_new_tokens``, the
static batch) and counts it on the jaxpr. Responses that stop early make that the wrong figure: with
slots (:func:`opd_jax.sampling.generate`) a rollout takes about ``Σ lengths / slots`` steps, not
``max_new_tokens``. This module estimates the rollout from a response-length distribution:

- :class:`ResponseLengths`: a geometric tail with a given mean (responses that end at each token
  with the same probability, cut at ``max_new_tokens``) or observed lengths; :meth:`~ResponseLengths.rows`
  gives a batch its lengths as quantiles (deterministic, shuffled once);
- :func:`simulate_slots`: the schedule of :func:`opd_jax.sampling.generate` (refill once an eighth
  of the slots is free, drain stages of a quarter) replayed on those lengths: steps per stage,
  refills, the longest cache it needs;
- :func:`decode_step_work`: FLOPs, HBM bytes and interconnect bytes per chip of one decode step of
  ``s`` slots with a cache of ``c`` tokens on a layout of ``R`` replicas × ``T`` tensor devices,
  from the model's dimensions (the formula tests/test_plan.py checks the plan's count against):
  weights read once per step and split over ``T``; keys and values of ``c`` tokens per slot, split
  over ``T``; two all-reduces of the ``[s, D]`` activations per layer and one all-gather of the
  ``[s, V]`` float32 logits when ``T > 1`` (ring volumes as in :mod:`opd_jax.plan_collectives`);
- :func:`estimate_rollout` / :func:`choose_layout`: roofline seconds of a rollout per layout, with
  and without collectives, and the layout with the fewest (what ``rollout_mesh = "auto"`` uses).

Every figure is a lower bound of the same kind as the plan's: compute, memory and communication
overlap perfectly, elementwise work and kernel efficiency are left out.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from opd_jax import sampling as sampling_lib
from opd_jax.rollout_layout import AUTO, TRAINING, RolloutLayout, check_rollout_mesh, layouts

__all__ = ["LayoutEstimate", "ResponseLengths", "SlotSchedule", "choose_layout", "decode_step_work",
           "estimate_rollout", "layout_estimates", "read_lengths", "resolve_layout", "simulate_slots"]


@dataclasses.dataclass(frozen=True)
class ResponseLengths:
    """A response-length distribution: ``mean`` of a geometric tail, or ``observed`` lengths.

    Neither: every response runs to ``max_new_tokens`` (the static worst case).
    """

    mean: float | None = None
    observed: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mean is not None and (not math.isfinite(self.mean) or self.mean < 1):
            raise ValueError(f"mean_response_length must be a number >= 1; got {self.mean!r}")
        if self.mean is not None and self.observed:
            raise ValueError("give mean_response_length or observed response lengths, not both")
        if any(n < 1 for n in self.observed):
            raise ValueError(f"observed response lengths must be >= 1; got {min(self.observed)}")

    def describe(self) -> str:
        if self.observed:
            return f"{len(self.observed)} observed lengths (mean {np.mean(self.observed):.1f})"
        if self.mean is not None:
            return f"geometric, mean {self.mean:g}"
        return "every response to max_new_tokens"

    def rows(self, rows: int, max_new_tokens: int) -> np.ndarray:
        """``[rows]`` int lengths: the quantiles ``(i + ½) / rows`` of the distribution, cut at
        ``max_new_tokens``, in a fixed shuffled order (a batch's long rows are spread over it)."""
        u = (np.arange(rows) + 0.5) / rows
        if self.observed:
            lengths = np.quantile(np.asarray(self.observed, float), u, method="inverted_cdf")
        elif self.mean is not None:
            if self.mean <= 1:
                lengths = np.ones(rows)
            else:  # P(length > k) = (1 - 1/mean)^k
                lengths = np.ceil(np.log1p(-u) / np.log1p(-1 / self.mean))
        else:
            lengths = np.full(rows, max_new_tokens)
        lengths = np.clip(lengths, 1, max_new_tokens).astype(np.int64)
        return lengths[np.random.default_rng(0).permutation(rows)]


def read_lengths(path: str) -> ResponseLengths:
    """Observed lengths from a JSONL file: one number per line, or an object with ``length`` or
    ``response_length`` (a run's ``metrics.jsonl`` mean lengths work too).

    Raises:
      ValueError: naming the file and line that holds no length.
    """
    lengths = []
    try:
        lines = open(path)
    except OSError as error:
        raise ValueError(f"response lengths {path}: {error.strerror}") from None
    with lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                if isinstance(value, dict):
                    value = value.get("length", value.get("response_length"))
                lengths.append(int(round(float(value))))
            except (TypeError, ValueError):
                raise ValueError(f"{path} line {number}: expected a response length (a number, or an object "
                                 f"with 'length' or 'response_length'); got {line.strip()[:80]!r}") from None
    if not lengths:
        raise ValueError(f"{path} holds no response lengths")
    return ResponseLengths(observed=tuple(lengths))


@dataclasses.dataclass(frozen=True)
class SlotSchedule:
    """One replica's decode schedule: per step, the slots decoding (``slots_T``) and the longest
    live row's tokens so far (``longest_T``, which sets the cache segment); ``refills`` (prefills
    after the first) and the useful ``tokens``."""

    slots_T: np.ndarray
    longest_T: np.ndarray
    refills: int
    tokens: int

    @property
    def steps(self) -> int:
        return len(self.slots_T)


def simulate_slots(lengths: Sequence[int], slots: int, group: int = 1) -> SlotSchedule:
    """The schedule :func:`opd_jax.sampling.generate` runs for rows of these ``lengths`` in ``slots``.

    Refills come once ``min(queue, an eighth of the slots)`` are free; with an empty queue and at
    most a quarter of the stage's slots live, the live rows move into a quarter of the slots (down to
    8). ``slots`` equal to the rows is the static batch: one stage until the longest row ends.
    """
    lengths = np.asarray(lengths, np.int64)
    rows = len(lengths)
    slots = min(slots, rows)
    refill = sampling_lib.refill_rows(slots, group)
    stages = sampling_lib.drain_stages(slots) if slots < rows else (slots,)
    left, written = lengths[:slots].copy(), np.zeros(slots, np.int64)  # tokens to go (0: a free slot)
    queued, refills, stage, step_slots, step_longest = slots, 0, 0, [], []
    while (left > 0).any() or queued < rows:
        free = np.flatnonzero(left == 0)
        if stage == 0 and queued < rows and len(free) >= min(rows - queued, refill):
            take = min(len(free), rows - queued, refill) // group * group
            left[free[:take]], written[free[:take]] = lengths[queued:queued + take], 0
            queued, refills = queued + take, refills + 1
        live = left > 0
        step_slots.append(len(left))
        step_longest.append(int(written[live].max()) + 1)
        left, written = left - live, written + live
        following = stages[stage + 1] if stage + 1 < len(stages) else 0
        if following and queued == rows and np.count_nonzero(left) <= following:
            keep = np.flatnonzero(left)
            left, written = (np.pad(a[keep], (0, following - len(keep))) for a in (left, written))
            stage += 1
    return SlotSchedule(np.asarray(step_slots), np.asarray(step_longest), refills, int(lengths.sum()))


def _matmul_parameters(model) -> int:
    """Parameters a token's forward pass multiplies by (the embedding lookup excluded)."""
    n, k, h, d, f = model.num_heads, model.num_kv_heads, model.head_dim, model.hidden_size, model.intermediate_size
    return model.num_layers * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + d * model.vocab_size


def decode_step_work(model, layout: RolloutLayout, slots: int, cache: int, compute_bytes: int
                     ) -> tuple[float, float, float]:
    """``(flops, hbm_bytes, collective_bytes)`` per chip of one decode step of ``slots`` rows with
    ``cache`` key/value columns each, on ``layout`` (see the module docstring)."""
    t = layout.tensor
    layers, heads, kv, h, d = model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim, model.hidden_size
    matmul = _matmul_parameters(model)
    attention_flops = 4 * slots * cache * heads * h * layers  # QKᵀ and PV
    flops = (2 * matmul * slots + attention_flops) / t
    kv_bytes = slots * cache * 2 * layers * kv * h * compute_bytes / t
    hbm = matmul * compute_bytes / t + kv_bytes
    collective = 0.0
    if t > 1:
        ring = (t - 1) / t
        collective = 2 * layers * 4 * ring * slots * d * compute_bytes + 2 * ring * slots * model.vocab_size * 4
    return flops, hbm, collective


@dataclasses.dataclass(frozen=True)
class LayoutEstimate:
    """A rollout's roofline on one layout: ``seconds`` with collectives, ``seconds_without``
    without, the slots per replica, the slowest replica's ``steps`` and the KV cache per chip."""

    layout: RolloutLayout
    slots: int
    steps: int
    seconds: float
    seconds_without: float
    collective_seconds: float
    kv_cache_bytes: int
    weight_bytes: int

    def to_json(self) -> dict:
        return {"layout": str(self.layout), "data": self.layout.data, "tensor": self.layout.tensor,
                "slots_per_replica": self.slots, "steps": self.steps, "roofline_seconds": self.seconds,
                "roofline_seconds_without_collectives": self.seconds_without,
                "collective_seconds": self.collective_seconds, "kv_cache_bytes_per_device": self.kv_cache_bytes,
                "weight_bytes_per_device": self.weight_bytes}


def estimate_rollout(model, layout: RolloutLayout, chip, *, rows: int, prompt_length: int, max_new_tokens: int,
                     lengths: ResponseLengths, stop_ids: Sequence[int], compute_dtype, slots: int | None = None,
                     group: int = 1) -> LayoutEstimate:
    """The rollout of ``rows`` prompts on ``layout``: each replica's rows (every ``R``-th quantile
    length) in its slots (``slots`` per replica, ``None``: :func:`opd_jax.sampling.default_slots`);
    the slowest replica sets the time. Each step is a roofline at its stage's slots and the cache
    segment that holds the stage's longest row; each prefill (the first and every refill) reads the
    weights once and multiplies the prompts' tokens."""
    compute_bytes = jnp.dtype(compute_dtype).itemsize
    replica_rows = rows // layout.data
    every = lengths.rows(rows, max_new_tokens)
    per_slots = min(replica_rows, slots or sampling_lib.default_slots(replica_rows, tuple(stop_ids)))
    schedules = [simulate_slots(every[r::layout.data], per_slots, group) for r in range(layout.data)]
    slowest = max(schedules, key=lambda s: s.steps)
    segments = sampling_lib.cache_segments(prompt_length, max_new_tokens)
    segment_T = np.searchsorted(np.asarray(segments), prompt_length + slowest.longest_T)
    pairs, counts = np.unique(np.stack([slowest.slots_T, segment_T]), axis=1, return_counts=True)
    matmul = _matmul_parameters(model)
    # (flops, hbm bytes, collective bytes, repeats): each (stage, cache segment) of the decode, then
    # the prefills (the prompts' tokens; the weights read once per prefill).
    work = np.array([(*decode_step_work(model, layout, int(stage_slots), segments[segment], compute_bytes), steps)
                     for (stage_slots, segment), steps in zip(pairs.T, counts)]
                    + [(2 * matmul * replica_rows * prompt_length / layout.tensor,
                        (1 + slowest.refills) * matmul * compute_bytes / layout.tensor, 0.0, 1)])
    flops, hbm, moved, repeats = work.T
    bound = np.maximum(flops / chip.peak_flops, hbm / chip.hbm_bandwidth)
    moved_seconds = moved / chip.ici_bandwidth
    total = prompt_length + max_new_tokens
    kv = sampling_lib.kv_cache_bytes(model, per_slots, total, compute_dtype) // layout.tensor
    return LayoutEstimate(layout, per_slots, slowest.steps, float(repeats @ np.maximum(bound, moved_seconds)),
                          float(repeats @ bound), float(repeats @ moved_seconds), kv, matmul * compute_bytes // layout.tensor)


def layout_estimates(model, devices: int, chip, **estimate) -> list[LayoutEstimate]:
    """:func:`estimate_rollout` of every layout of ``devices`` (:func:`~opd_jax.rollout_layout.layouts`)."""
    return [estimate_rollout(model, layout, chip, **estimate) for layout in layouts(devices, model, estimate["rows"])]


def choose_layout(model, devices: int, chip, memory_bytes: int, *, candidates: list[LayoutEstimate] | None = None,
                  **estimate) -> tuple[LayoutEstimate, list[LayoutEstimate]]:
    """The layout of ``devices`` with the smallest rollout roofline (collectives included) among those
    whose weights and KV cache fit ``memory_bytes`` per chip, and every candidate's estimate
    (``candidates``: :func:`layout_estimates`, computed here if not given).

    Raises:
      ValueError: no layout fits (the message gives the smallest requirement).
    """
    if candidates is None:
        candidates = layout_estimates(model, devices, chip, **estimate)
    fitting = [c for c in candidates if c.kv_cache_bytes + c.weight_bytes <= memory_bytes]
    if not fitting:
        need = min((c.kv_cache_bytes + c.weight_bytes for c in candidates), default=0)
        raise ValueError(f"no rollout layout over {devices} devices fits: the smallest needs {need} bytes of weights "
                         f"and KV cache per device, more than {memory_bytes}")
    return min(fitting, key=lambda c: c.seconds), candidates


def resolve_layout(rollout_mesh: str, devices: int, model, chip, memory_bytes: int, *,
                   candidates: list[LayoutEstimate] | None = None, **estimate) -> RolloutLayout | None:
    """The inference layout ``rollout_mesh`` names for a student on ``devices``: ``None`` for
    ``training``; :func:`choose_layout`'s for ``auto`` (``None`` on one device); the named one, checked.

    Args:
      chip: the devices' :class:`~opd_jax.topologies.Chip` (``None``: unknown; ``auto`` keeps the
        training layout).
      candidates: :func:`layout_estimates` if already computed.
      estimate: :func:`estimate_rollout`'s keywords (``rows``, ``prompt_length``, ...).

    Raises:
      ValueError: a named layout that does not fit the devices, heads or rows (naming those that do).
    """
    choice = check_rollout_mesh(rollout_mesh, devices, model, estimate["rows"])
    if choice == TRAINING or (choice == AUTO and (chip is None or devices == 1)):  # one device: nothing to lay out
        return None
    if choice == AUTO:
        return choose_layout(model, devices, chip, memory_bytes, candidates=candidates, **estimate)[0].layout
    return choice
