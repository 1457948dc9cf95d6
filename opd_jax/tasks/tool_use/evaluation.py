"""Evaluation on the tool-use task: multi-turn rollouts on held-out questions, checked call by call.

:func:`evaluate` measures the answer accuracy, the share of valid and of exact call sequences
(:func:`~opd_jax.tasks.tool_use.checker.check_response`), the response lengths with and without
the tool outputs, and optionally the per-token teacher-KL on temperature-1 rollouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.sampling import Rollout, SamplingConfig, score
from opd_jax.tasks.tool_use.checker import ResponseCheck, check_response
from opd_jax.tasks.tool_use.environment import make_rollout_fn
from opd_jax.tasks.tool_use.problems import ToolUseProblem, ToolUseTask
from opd_jax.tasks.tool_use.vocabulary import Vocabulary, encode_prompts

__all__ = ["ToolUseEvalResult", "evaluate"]

@dataclasses.dataclass(frozen=True)
class ToolUseEvalResult:
    """What :func:`evaluate` measured over ``n`` questions (a response counts only if it ended with EOS).

    Attributes:
      accuracy: share with the correct final answer.
      call_validity: share whose calls are valid (see :class:`ResponseCheck`).
      call_exactness: share whose calls equal the reference calls.
      mean_response_length: mean model tokens per response (EOS included, tool outputs excluded).
      mean_transcript_length: mean tokens per response including tool outputs.
      teacher_kl: ``KL(π‖q)`` per model token on temperature-1 rollouts (``None`` without teacher).
      checks: the per-response :class:`ResponseCheck`.
      finished: ``[n]`` bool, the response ended with EOS.
      transcripts: the decoded transcripts (EOS removed).
    """

    accuracy: float
    call_validity: float
    call_exactness: float
    mean_response_length: float
    mean_transcript_length: float
    teacher_kl: float | None
    checks: tuple[ResponseCheck, ...]
    finished: np.ndarray
    transcripts: tuple[str, ...]

    def metrics(self) -> dict[str, float]:
        """The scalar metrics, with the demo's key names (``accuracy``, ``response_length``, …)."""
        values = {
            "accuracy": self.accuracy, "call_validity": self.call_validity, "call_exactness": self.call_exactness,
            "response_length": self.mean_response_length, "transcript_length": self.mean_transcript_length,
        }
        if self.teacher_kl is not None:
            values["teacher_kl"] = self.teacher_kl
        return values


def evaluate(
    model,
    problems: Sequence[ToolUseProblem],
    *,
    teacher=None,
    max_new_tokens: int | None = None,
    batch_size: int = 128,
    key=None,
    temperature: float = 0.0,
    vocabulary: Vocabulary = Vocabulary(),
) -> ToolUseEvalResult:
    """Run multi-turn rollouts on ``problems`` and check them.

    Calls, accuracy and lengths come from rollouts at ``temperature`` (0: greedy). With a
    ``teacher``, also the per-token ``KL(π‖q)`` on one temperature-1 rollout per question:
    ``Σ (log π − log q) / Σ 1`` over model tokens, the teacher scoring the same tokens (tool outputs
    included as context). Batches of ``batch_size`` rows (the last filled up with copies).

    Args:
      model: an :class:`opd_jax.models.Decoder` with this task's vocabulary.
      problems: the questions (non-empty).
      teacher: optional teacher decoder for the KL.
      max_new_tokens: the response budget (default the task's longest solution + 4).
      batch_size, key, temperature: batching, PRNG key (default ``jax.random.key(0)``), sampling.
      vocabulary: the task's ids.

    Returns:
      :class:`ToolUseEvalResult`.
    """
    problems = list(problems)
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = max_new_tokens or ToolUseTask().max_response_length + 4
    prompt_length = max(len(p.prompt) for p in problems)
    rollout_fn = make_rollout_fn(vocabulary)
    key = jax.random.key(0) if key is None else key
    batch_size = min(batch_size, len(problems))
    config = SamplingConfig(max_new_tokens=budget, temperature=temperature, stop_ids=(vocabulary.eos_id,),
                            pad_id=vocabulary.pad_id)
    responses: list[_Response] = []
    kl_sum, kl_count = 0.0, 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        tokens_BxP, mask_BxP = encode_prompts(chunk + [chunk[-1]] * (batch_size - len(chunk)), prompt_length, vocabulary)
        key, greedy_key, sample_key = jax.random.split(key, 3)
        rollout = rollout_fn(model, tokens_BxP, mask_BxP, greedy_key, config)
        responses += _responses(rollout, len(chunk), prompt_length, vocabulary)
        if teacher is not None:
            sampled = rollout_fn(model, tokens_BxP, mask_BxP, sample_key, dataclasses.replace(config, temperature=1.0))
            gap_sum, gap_count = _teacher_gap(sampled, teacher, len(chunk))
            kl_sum, kl_count = kl_sum + gap_sum, kl_count + gap_count
    return _eval_result(problems, responses, kl_sum / max(kl_count, 1) if teacher is not None else None)


@dataclasses.dataclass(frozen=True)
class _Response:
    """One decoded response: transcript (EOS removed), ended with EOS, tokens with and without tool outputs."""

    transcript: str
    finished: bool
    length: int
    model_length: int


def _responses(rollout: Rollout, rows: int, prompt_length: int, vocabulary: Vocabulary) -> list[_Response]:
    """The first ``rows`` responses of ``rollout``, decoded."""
    tokens_RxN = np.asarray(rollout.tokens[:rows, prompt_length:])
    in_transcript_RxN = np.asarray(rollout.token_mask[:rows, prompt_length:])
    by_model_RxN = np.asarray(rollout.response_mask[:rows, prompt_length:])
    responses = []
    for ids, real, by_model in zip(tokens_RxN, in_transcript_RxN, by_model_RxN):
        ids = ids[real].tolist()
        stopped = bool(ids) and ids[-1] == vocabulary.eos_id
        responses.append(_Response(vocabulary.decode(ids[:-1] if stopped else ids), stopped, len(ids), int(by_model.sum())))
    return responses


def _teacher_gap(rollout: Rollout, teacher, rows: int) -> tuple[float, int]:
    """``Σ (log π − log q)`` and the number of model tokens over the first ``rows`` rows of ``rollout``."""
    teacher_logp_BxL = score(teacher, rollout.tokens, rollout.token_mask)
    in_response_BxL = rollout.response_mask & (jnp.arange(rollout.tokens.shape[0]) < rows)[:, None]
    gap_BxL = jnp.where(in_response_BxL, rollout.sampling_logp - teacher_logp_BxL, 0.0)
    return float(jnp.sum(gap_BxL)), int(jnp.sum(in_response_BxL))


def _eval_result(problems: Sequence[ToolUseProblem], responses: Sequence[_Response], teacher_kl: float | None) -> ToolUseEvalResult:
    finished = np.asarray([r.finished for r in responses], bool)
    checks = tuple(check_response(p, r.transcript) for p, r in zip(problems, responses))

    def share(attribute):
        return float(np.mean([getattr(c, attribute) and f for c, f in zip(checks, finished)]))

    return ToolUseEvalResult(
        accuracy=share("answer_correct"),
        call_validity=share("calls_valid"),
        call_exactness=share("calls_exact"),
        mean_response_length=float(np.mean([r.model_length for r in responses])),
        mean_transcript_length=float(np.mean([r.length for r in responses])),
        teacher_kl=teacher_kl,
        checks=checks,
        finished=finished,
        transcripts=tuple(r.transcript for r in responses),
    )
