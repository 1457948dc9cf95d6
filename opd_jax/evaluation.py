"""Math benchmarks: sample K responses per problem, check each with math-verify, report avg@k and pass@k.

A dataset is a JSONL file, one problem a line: the question (``"prompt"`` text or ``"messages"``
chat, or any text field named by ``question_key``) and the reference answer under ``answer_key``.
Responses are sampled through the model's chat template by a rollout backend (:mod:`opd_jax.backends`:
the JAX sampler by default, or vLLM) and
checked with Hugging Face's ``math-verify`` (``parse`` then ``verify``).

Metrics, over ``m`` problems with ``n = K`` samples each and ``c_i`` correct ones for problem ``i``:

- ``avg@K = mean_i c_i / n``: the mean correctness of all samples.
- ``pass@k = mean_i [1 − C(n − c_i, k) / C(n, k)]`` (Chen et al. 2021, *Evaluating Large Language
  Models Trained on Code*, eq. 1): the unbiased estimate of the chance that at least one of ``k``
  samples is right, for ``1 ≤ k ≤ n``. ``pass@1`` equals ``avg@K`` exactly (``1 − (n − c)/n = c/n``).

Each comes with a 95% confidence interval from the normal approximation over problems:
``mean ± 1.96 · s / √m`` with ``s`` the sample standard deviation (ddof 1) of the per-problem
values, clipped to ``[0, 1]``. The unit of the interval is the problem, because the ``K`` samples
of one problem are not independent draws of the benchmark; with one problem there is no interval.

The same evaluation runs inside training as :func:`math_evaluator` (``train(evaluate=...)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import threading
from collections.abc import Callable, Sequence

import numpy as np

from opd_jax.data import Prompt, prompt_of, read_json_lines

__all__ = ["Estimate", "MathEvalConfig", "MathEvalResult", "MathProblem", "Responses", "check_response",
           "encode_problems", "evaluate_math", "format_table", "math_evaluator", "mean_with_interval", "parse_reference",
           "pass_at_k", "read_problems", "sample_responses", "score_responses", "summarize"]

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal


@dataclasses.dataclass(frozen=True)
class MathProblem:
    """One problem of a dataset.

    Attributes:
      prompt: the question: a text or a chat (list of ``{"role", "content"}``).
      answer: the reference answer as written in the file (numbers as their JSON text).
      source: ``"FILE:LINE"``, how errors and reports name the problem.
    """

    prompt: Prompt
    answer: str
    source: str


@dataclasses.dataclass(frozen=True)
class MathEvalConfig:
    """How a dataset is evaluated (the ``opd-jax eval --dataset`` options).

    Attributes:
      samples: ``K``, responses sampled per problem.
      max_new_tokens: the response budget ``N``; a response cut there is checked as it is.
      temperature: sampling temperature; 0 is greedy decoding (then K > 1 repeats one response).
      top_p: nucleus sampling (``None``: the whole distribution).
      batch_size: rows (problem × sample) per ``generate`` call (at most all rows); the last batch
        is filled up with copies so that every call has one shape and compiles once.
      seed: sampling seed; batch ``b`` uses ``fold_in(key(seed), b)``, so the responses depend on
        ``seed`` and ``batch_size``.
      pass_k: the ``k`` of the reported pass@k, each in ``[1, samples]`` (default ``(1, samples)``).
      max_prompt_length: the longest prompt allowed, in tokens (batches are padded to the longest
        prompt of the dataset, not to this).
      use_chat_template: encode questions through the tokenizer's chat template with the
        generation prompt.
      verify_timeout: seconds math-verify may spend on one parse or comparison (a SIGALRM timer, so
        only in the main thread; elsewhere, and at 0, no timeout).
    """

    samples: int = 1
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float | None = None
    batch_size: int = 64
    seed: int = 0
    pass_k: tuple[int, ...] | None = None
    max_prompt_length: int = 512
    use_chat_template: bool = True
    verify_timeout: int = 5

    def __post_init__(self):
        for name, minimum in (("samples", 1), ("max_new_tokens", 1), ("batch_size", 1), ("max_prompt_length", 1),
                              ("verify_timeout", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"MathEvalConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if not self.temperature >= 0:
            raise ValueError(f"MathEvalConfig.temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"MathEvalConfig.top_p must be None or in (0, 1], got {self.top_p!r}")
        for k in self.ks:
            if not 1 <= k <= self.samples:
                raise ValueError(f"MathEvalConfig.pass_k: k = {k} must be in [1, samples = {self.samples}]")

    @property
    def ks(self) -> tuple[int, ...]:
        """The pass@k reported: :attr:`pass_k`, sorted and without repeats."""
        return tuple(sorted(set(self.pass_k if self.pass_k is not None else (1, self.samples))))


def read_problems(path: str | pathlib.Path, *, answer_key: str = "answer",
                  question_key: str | None = None) -> list[MathProblem]:
    """Read a JSONL dataset (UTF-8, one JSON object a line, blank lines skipped).

    Args:
      path: the ``.jsonl`` file.
      answer_key: the field holding the reference answer (a string or a number).
      question_key: the field holding the question text; ``None``: ``"prompt"`` (a string) or
        ``"messages"`` (a list of ``{"role": str, "content": str}``), as in prompt files.

    Returns:
      the problems in file order.

    Raises:
      FileNotFoundError: the file does not exist or is a folder.
      ValueError: ``FILE:LINE: ...`` for a line that is not UTF-8 or JSON, has no question, no
        answer under ``answer_key``, or an answer math-verify finds nothing in; or no problems.
    """
    problems = [MathProblem(_question(record, question_key, f"{path}:{number}"),
                            _answer(record, answer_key, f"{path}:{number}"), f"{path}:{number}")
                for number, record in read_json_lines(path, kind="dataset")]
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def _question(record: dict, question_key: str | None, where: str) -> Prompt:
    keys = f"; keys present: {sorted(record)}"
    if question_key is None:
        return prompt_of(record, where, hint=f" (or name the question's field with --question-key){keys}")
    value = record.get(question_key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: needs a non-empty string {question_key!r} (the question, --question-key){keys}")
    return value


def _answer(record: dict, answer_key: str, where: str) -> str:
    if answer_key not in record:
        raise ValueError(f"{where}: no {answer_key!r} field (the reference answer, --answer-key); "
                         f"keys present: {sorted(record)}")
    value = record[answer_key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: {answer_key!r} must be a string or a number, got {json.dumps(value)}")
    answer = value if isinstance(value, str) else json.dumps(value)
    if not parse_reference(answer):
        raise ValueError(f"{where}: math-verify finds no answer in {answer_key!r} {answer!r}")
    return answer


def _timeout(seconds: int) -> int | None:
    """math-verify's timeout is a SIGALRM timer, which Python allows in the main thread only."""
    return seconds if seconds > 0 and threading.current_thread() is threading.main_thread() else None


def parse_reference(answer: str, *, timeout_seconds: int = 5) -> list:
    """math-verify's parse of a reference answer.

    A GSM8K-style solution ``"... #### 72"`` keeps what follows the last ``####``. A bare answer
    (no ``\\boxed`` and no ``$``) is parsed as inline LaTeX ``$answer$``, so that ``\\dfrac{3}{4}``
    or ``(1, 2)`` mean what they say (bare, math-verify reads nothing in the first and ``2`` in
    the second); anything else is parsed as it is.

    Returns:
      math-verify's extraction (empty: nothing found).
    """
    from math_verify import parse

    text = answer.rpartition("####")[2].strip() if "####" in answer else answer.strip()
    if "\\boxed" not in text and "$" not in text:
        text = f"${text}$"
    return parse(text, parsing_timeout=_timeout(timeout_seconds))


def check_response(reference: list, response: str, *, timeout_seconds: int = 5) -> bool:
    """Whether math-verify finds ``reference`` (a :func:`parse_reference` result) in ``response``.

    The response is parsed with math-verify's defaults (LaTeX, ``\\boxed{}`` first, and plain
    expressions); a response without any answer is wrong.
    """
    from math_verify import parse, verify

    timeout = _timeout(timeout_seconds)
    return bool(verify(reference, parse(response, parsing_timeout=timeout), timeout_seconds=timeout))


def score_responses(problems: Sequence[MathProblem], responses: Sequence[Sequence[str]], *,
                    timeout_seconds: int = 5) -> np.ndarray:
    """Check every response against its problem's reference answer.

    Args:
      problems: ``m`` problems.
      responses: ``m`` lists of ``K`` decoded responses each.

    Returns:
      ``correct [m, K]`` bool.

    Raises:
      ValueError: ``responses`` does not hold ``K`` responses for each of the ``m`` problems.
    """
    counts = {len(row) for row in responses}
    if len(responses) != len(problems) or len(counts) != 1 or 0 in counts:
        raise ValueError(f"responses: expected {len(problems)} non-empty lists of one length (one per problem), got "
                         f"{len(responses)} lists of lengths {sorted(counts)}")
    correct_PxK = np.zeros((len(problems), counts.pop()), bool)
    for i, (problem, row) in enumerate(zip(problems, responses, strict=True)):
        reference = parse_reference(problem.answer, timeout_seconds=timeout_seconds)
        for j, response in enumerate(row):
            correct_PxK[i, j] = check_response(reference, response, timeout_seconds=timeout_seconds)
    return correct_PxK


def pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """The unbiased pass@k estimate ``1 − C(n − c, k) / C(n, k)`` of each problem (Chen et al. 2021).

    Exact binomial coefficients (Python integers), so large ``n`` loses nothing.

    Args:
      num_samples: ``n``, samples per problem: an integer or ``[m]`` integers.
      num_correct: ``c``, correct samples: an integer or ``[m]`` integers in ``[0, n]``.
      k: in ``[1, n]``.

    Returns:
      ``[m]`` float64 (``[]`` for scalar inputs).

    Raises:
      ValueError: ``k`` outside ``[1, n]`` or ``c`` outside ``[0, n]``.
    """
    n_M, c_M = np.broadcast_arrays(np.asarray(num_samples), np.asarray(num_correct))
    out = np.empty(n_M.shape, np.float64)
    for index in np.ndindex(n_M.shape):
        n, c = int(n_M[index]), int(c_M[index])
        if not 1 <= k <= n:
            raise ValueError(f"pass_at_k: k = {k} must be in [1, num_samples = {n}]")
        if not 0 <= c <= n:
            raise ValueError(f"pass_at_k: num_correct = {c} must be in [0, num_samples = {n}]")
        out[index] = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    return out


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over problems with its 95% interval (``low``/``high`` None with a single problem)."""

    value: float
    low: float | None
    high: float | None


def mean_with_interval(values_M) -> Estimate:
    """Mean of per-problem values with the 95% normal-approximation interval over problems.

    ``mean ± 1.96 · s / √m``, ``s`` the sample standard deviation (ddof 1), clipped to ``[0, 1]``.

    Args:
      values_M: ``[m]`` per-problem values in ``[0, 1]``, ``m >= 1``.
    """
    values_M = np.asarray(values_M, np.float64)
    if values_M.ndim != 1 or values_M.size == 0:
        raise ValueError(f"mean_with_interval needs [m] values with m >= 1, got shape {list(values_M.shape)}")
    mean = float(values_M.mean())
    if values_M.size == 1:
        return Estimate(mean, None, None)
    half_width = Z_95 * float(values_M.std(ddof=1)) / math.sqrt(values_M.size)
    return Estimate(mean, max(0.0, mean - half_width), min(1.0, mean + half_width))


def summarize(correct_MxK, ks: Sequence[int] | None = None) -> dict[str, Estimate]:
    """avg@K and pass@k, each with its interval.

    Args:
      correct_MxK: ``[m, K]`` bool, sample ``j`` of problem ``i`` is right.
      ks: the pass@k to report (default ``1`` and ``K``).

    Returns:
      ``{"avg@K": ..., "pass@k": ... for each k}`` in that order, ``k`` ascending.
    """
    correct_MxK = np.asarray(correct_MxK, bool)
    if correct_MxK.ndim != 2 or 0 in correct_MxK.shape:
        raise ValueError(f"summarize needs correct [m, K] with m, K >= 1, got shape {list(correct_MxK.shape)}")
    samples = correct_MxK.shape[1]
    num_correct_M = correct_MxK.sum(axis=1)
    metrics = {f"avg@{samples}": mean_with_interval(correct_MxK.mean(axis=1))}
    for k in sorted(set(ks if ks is not None else (1, samples))):
        metrics[f"pass@{k}"] = mean_with_interval(pass_at_k(samples, num_correct_M, k))
    return metrics


@dataclasses.dataclass(frozen=True)
class Responses:
    """Sampled responses of ``m`` problems × ``K`` samples.

    Attributes:
      texts: ``m`` lists of ``K`` decoded responses (special tokens, the stop token among them, removed).
      lengths: ``[m, K]`` int, response tokens (the stop token included).
      truncated: ``[m, K]`` bool, the response reached ``max_new_tokens`` without a stop token.
    """

    texts: list[list[str]]
    lengths: np.ndarray
    truncated: np.ndarray


def _stop_and_pad(model, tokenizer) -> tuple[tuple[int, ...], int]:
    """Stop ids from the model's config (else the tokenizer's EOS); pad: the tokenizer's pad, else EOS, else 0."""
    stop_ids = tuple(model.config.eos_token_id) or (
        (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return tuple(int(i) for i in stop_ids), int(pad_id)


def encode_problems(tokenizer, problems: Sequence[MathProblem], config: MathEvalConfig, *,
                    max_position_embeddings: int, pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The questions as a left-padded batch, as long as the longest of them.

    Args:
      tokenizer: the model's tokenizer.
      problems: ``m`` problems.
      config: :class:`MathEvalConfig` (``max_prompt_length``, ``max_new_tokens``, ``use_chat_template``).
      max_position_embeddings: the model's; the longest prompt plus ``max_new_tokens`` must fit.
      pad_id: padding id (default: the tokenizer's pad, else EOS, else 0).

    Returns:
      ``(tokens [m, P] int32, mask [m, P] bool)`` with ``P`` the longest prompt's length.

    Raises:
      ValueError: prompts longer than ``max_prompt_length`` (each named ``FILE:LINE``), or the
        longest prompt plus ``max_new_tokens`` beyond ``max_position_embeddings``.
    """
    from opd_jax import tokenization

    tokens_MxP, mask_MxP = tokenization.encode_prompts(
        tokenizer, [p.prompt for p in problems], max_length=config.max_prompt_length,
        use_chat_template=config.use_chat_template, pad_id=pad_id, labels=[p.source for p in problems],
    )
    longest = int(mask_MxP.sum(axis=1).max())
    if longest + config.max_new_tokens > max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens {config.max_new_tokens} = "
                         f"{longest + config.max_new_tokens} positions, more than the model's max_position_embeddings "
                         f"{max_position_embeddings}; lower max_new_tokens to at most "
                         f"{max(max_position_embeddings - longest, 0)}")
    return tokens_MxP[:, -longest:], mask_MxP[:, -longest:]


def sample_responses(model, tokenizer, problems: Sequence[MathProblem], config: MathEvalConfig, *,
                     progress: bool = False, label: str = "", backend=None) -> Responses:
    """Sample ``config.samples`` responses to every problem.

    Row ``i·K + j`` of the flattened batch is sample ``j`` of problem ``i``; prompts are left-padded
    to the dataset's longest.

    Args:
      model: a :class:`opd_jax.models.Decoder`.
      tokenizer: its tokenizer.
      problems: ``m`` problems.
      config: :class:`MathEvalConfig`.
      progress: a tqdm bar over batches (on stderr).
      label: the bar's description.
      backend: the :class:`~opd_jax.backends.RolloutBackend` to sample with; it is sent ``model``'s
        weights first (``None``: the JAX sampler in this process).

    Raises:
      ValueError: a prompt longer than ``config.max_prompt_length`` (named ``FILE:LINE``), or prompt
        plus ``max_new_tokens`` beyond the model's ``max_position_embeddings``.
    """
    import jax
    from flax import nnx
    from tqdm import tqdm

    from opd_jax import sampling
    from opd_jax.backends import JaxBackend

    backend = backend or JaxBackend(nnx.graphdef(model))
    backend.sync_weights(nnx.state(model))
    stop_ids, pad_id = _stop_and_pad(model, tokenizer)
    tokens_MxP, mask_MxP = encode_problems(tokenizer, problems, config,
                                           max_position_embeddings=model.config.max_position_embeddings, pad_id=pad_id)
    longest = tokens_MxP.shape[1]
    sampling_config = sampling.SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                              top_p=config.top_p, stop_ids=stop_ids, pad_id=pad_id)
    samples, rows = config.samples, len(problems) * config.samples
    batch_size = min(config.batch_size, rows)
    response_RxN = np.empty((rows, config.max_new_tokens), np.int32)
    response_mask_RxN = np.empty((rows, config.max_new_tokens), bool)
    base_key = jax.random.key(config.seed)
    starts = range(0, rows, batch_size)
    for batch, start in enumerate(tqdm(starts, desc=label or "eval", unit="batch", disable=not progress,
                                       file=sys.stderr)):
        # Fill the last batch up with copies of its first row: one shape, one compilation.
        row_B = np.arange(start, start + batch_size)
        row_B[row_B >= rows] = start
        problem_B = row_B // samples
        rollout = backend.generate(tokens_MxP[problem_B], mask_MxP[problem_B], jax.random.fold_in(base_key, batch),
                                   sampling_config)
        kept = min(batch_size, rows - start)
        response_RxN[start:start + kept] = np.asarray(rollout.tokens[:kept, longest:])
        response_mask_RxN[start:start + kept] = np.asarray(rollout.response_mask[:kept, longest:])
    stopped_R = (np.isin(response_RxN, stop_ids) & response_mask_RxN).any(axis=1)
    texts = [tokenizer.decode(ids[keep].tolist(), skip_special_tokens=True)
             for ids, keep in zip(response_RxN, response_mask_RxN, strict=True)]
    shape = (len(problems), samples)
    return Responses(texts=[texts[i * samples:(i + 1) * samples] for i in range(len(problems))],
                     lengths=response_mask_RxN.sum(axis=1).reshape(shape), truncated=(~stopped_R).reshape(shape))


@dataclasses.dataclass(frozen=True)
class MathEvalResult:
    """What :func:`evaluate_math` measured on one dataset.

    Attributes:
      responses: the sampled :class:`Responses`.
      correct: ``[m, K]`` bool, math-verify's verdict on each response.
      metrics: ``{"avg@K", "pass@k"...}`` -> :class:`Estimate`.
    """

    responses: Responses
    correct: np.ndarray
    metrics: dict[str, Estimate]

    def record(self) -> dict:
        """A JSON-ready summary: problem count, metrics with intervals, response length, truncation."""
        return {
            "problems": int(self.correct.shape[0]),
            "samples": int(self.correct.shape[1]),
            "metrics": {name: dataclasses.asdict(estimate) for name, estimate in self.metrics.items()},
            "response_length": float(self.responses.lengths.mean()),
            "truncated": float(self.responses.truncated.mean()),
        }


def evaluate_math(model, tokenizer, problems: Sequence[MathProblem], config: MathEvalConfig, *,
                  progress: bool = False, label: str = "", backend=None) -> MathEvalResult:
    """Sample (with ``backend``, see :func:`sample_responses`), check and summarise one dataset (see the
    module docstring for the metrics)."""
    responses = sample_responses(model, tokenizer, problems, config, progress=progress, label=label, backend=backend)
    correct_MxK = score_responses(problems, responses.texts, timeout_seconds=config.verify_timeout)
    return MathEvalResult(responses=responses, correct=correct_MxK, metrics=summarize(correct_MxK, config.ks))


def math_evaluator(tokenizer, problems: Sequence[MathProblem], *, samples: int = 1,
                   **options) -> Callable[..., dict[str, float]]:
    """An ``evaluate`` hook for :func:`opd_jax.train.train`: ``model -> {"avg@K", "pass@k"..., ...}``.

    Args:
      tokenizer: the student's tokenizer.
      problems: e.g. from :func:`read_problems`.
      samples: ``K``.
      **options: the other :class:`MathEvalConfig` fields.

    Returns:
      a function of the model giving the metric values (no intervals), ``response_length`` and
      ``truncated``.
    """
    config = MathEvalConfig(samples=samples, **options)
    problems = list(problems)

    def evaluate_model(model) -> dict[str, float]:
        result = evaluate_math(model, tokenizer, problems, config)
        record = result.record()
        return {**{name: estimate.value for name, estimate in result.metrics.items()},
                "response_length": record["response_length"], "truncated": record["truncated"]}

    return evaluate_model


def format_table(records: Sequence[dict]) -> str:
    """Markdown table of :meth:`MathEvalResult.record` dicts with a ``"dataset"`` key, one row each.

    Cells are ``value [low, high]`` (the 95% interval; ``–`` with a single problem).
    """
    names = list(records[0]["metrics"])
    lines = ["| dataset | problems | " + " | ".join(names) + " | response length | truncated |",
             "|---|---:|" + "---:|" * len(names) + "---:|---:|"]
    for record in records:
        cells = []
        for name in names:
            estimate = record["metrics"][name]
            interval = "–" if estimate["low"] is None else f"[{estimate['low']:.3f}, {estimate['high']:.3f}]"
            cells.append(f"{estimate['value']:.3f} {interval}")
        lines.append(f"| {record['dataset']} | {record['problems']} | " + " | ".join(cells)
                     + f" | {record['response_length']:.1f} | {record['truncated']:.3f} |")
    return "\n".join(lines)
