"""The opd_jax side of ``loss.py`` / ``scaling.py``: one loss + gradient measurement in a fresh process.

    .venv/bin/python experiments/benchmarks/_loss_jax.py JOB.json

Job keys: ``kind`` (``full`` | ``sampled`` | ``sampled_hidden``), ``batch``, ``length``, ``vocab``,
``beta``, ``chunk_size`` (``null``: unchunked), ``hidden`` (width for ``sampled_hidden``),
``repeats``, ``seed``, ``out``.

* ``full``: ``opd_jax.full_vocab_divergence(student, teacher, mask, divergence=generalized_js(β),
  chunk_size=…)`` summed and divided by the response-token count, value and gradient with respect to
  the ``[B, T, V]`` student logits, one ``jax.jit``.
* ``sampled``: the sampled-token OPD+ loss on ``[B, T]`` log-probabilities:
  ``pg_surrogate(student_logp, token_advantages(…, estimator="opd_plus", gamma=0), mask)``, value
  and gradient with respect to ``student_logp``.
* ``sampled_hidden``: the same loss with the student log-probabilities computed from ``[B, T, D]``
  hidden states and a ``[D, V]`` output projection, ``chunk_size`` tokens at a time under
  ``jax.checkpoint`` (``opd_jax.chunking.map_row_chunks``, as ``opd_jax.sampling.token_log_probs``
  does), gradient with respect to both: what a train step adds on top of the model trunk.

Memory: the function is compiled ahead of time (``jit(...).lower(...).compile()``, whose
``memory_analysis()`` is reported), then the peak RSS is reset (``_procmem``) and every call —
warm-up and timed — runs under it; ``peak_rss_delta`` = peak RSS minus the RSS just before the first
call (inputs, libraries and the compiled executable already resident).
"""

from __future__ import annotations

import gc
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import opd_jax
from _cpuload import timed_call
from _lossdata import checksum, gradient_probe, make_logits, make_sampled
from _procmem import peak_bytes, reset_peak, rss_bytes
from opd_jax.chunking import map_row_chunks


def _normalised(per_token_BxT, mask_BxT):
    return jnp.sum(per_token_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1).astype(per_token_BxT.dtype)


def build(job: dict):
    """``(jitted value_and_grad, device arguments, input checksum)`` for the job's kind."""
    batch, length, vocab, seed = job["batch"], job["length"], job["vocab"], job["seed"]
    divergence = opd_jax.divergences.get("generalized_js", beta=job["beta"])
    chunk_size = job["chunk_size"]
    kind = job["kind"]
    if kind == "full":
        student, teacher, mask = make_logits(batch, length, vocab, seed)

        def loss_fn(student_BxTxV, teacher_BxTxV, mask_BxT):
            per_token = opd_jax.full_vocab_divergence(
                student_BxTxV, teacher_BxTxV, mask_BxT, divergence=divergence, chunk_size=chunk_size
            )
            return _normalised(per_token, mask_BxT)

        arrays = (student, teacher, mask)
        argnums = 0
    elif kind == "sampled":
        student, teacher, mask = make_sampled(batch, length, seed)

        def loss_fn(student_logp_BxT, teacher_logp_BxT, mask_BxT):
            advantages = opd_jax.token_advantages(
                student_logp_BxT, teacher_logp_BxT, mask_BxT, divergence=divergence, estimator="opd_plus", gamma=0.0
            )
            return _normalised(opd_jax.pg_surrogate(student_logp_BxT, advantages, mask_BxT), mask_BxT)

        arrays = (student, teacher, mask)
        argnums = 0
    elif kind == "sampled_hidden":
        width = job["hidden"]
        rng = np.random.default_rng(seed)
        hidden = rng.standard_normal((batch, length, width), dtype=np.float32)
        projection = (rng.standard_normal((width, vocab), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
        tokens = rng.integers(0, vocab, (batch, length), dtype=np.int32)
        _, teacher, mask = make_sampled(batch, length, seed)
        student = hidden

        def loss_fn(hidden_BxTxD, projection_DxV, tokens_BxT, teacher_logp_BxT, mask_BxT):
            def target_logp(hidden_RxD, target_R):
                logits_RxV = jnp.einsum("rd,dv->rv", hidden_RxD, projection_DxV, preferred_element_type=jnp.float32)
                picked = jnp.take_along_axis(logits_RxV, target_R[:, None], axis=-1)[:, 0]
                return picked - jax.nn.logsumexp(logits_RxV, axis=-1)

            student_logp = map_row_chunks(
                target_logp, hidden_BxTxD.reshape(-1, width), tokens_BxT.reshape(-1), chunk_size=chunk_size
            ).reshape(tokens_BxT.shape)
            advantages = opd_jax.token_advantages(
                student_logp, teacher_logp_BxT, mask_BxT, divergence=divergence, estimator="opd_plus", gamma=0.0
            )
            return _normalised(opd_jax.pg_surrogate(student_logp, advantages, mask_BxT), mask_BxT)

        arrays = (hidden, projection, tokens, teacher, mask)
        argnums = (0, 1)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    fingerprint = checksum(student)
    device_arrays = tuple(jax.device_put(a) for a in arrays)
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=argnums))
    return step, device_arrays, fingerprint


def main() -> None:
    job = json.loads(pathlib.Path(sys.argv[1]).read_text())
    step, arrays, fingerprint = build(job)
    gc.collect()
    compiled = step.lower(*arrays).compile()
    memory = compiled.memory_analysis()
    analysis = {}
    if memory is not None:
        analysis = {
            "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
        }
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per computation
        cost = cost[0] if cost else {}
    flops = float(cost.get("flops", 0.0)) if cost else 0.0

    reset_peak()
    base = rss_bytes()
    times, foreign = [], []
    for call in range(job["repeats"] + 1):  # call 0 is the warm-up
        (loss, grads), elapsed, other = timed_call(lambda: jax.block_until_ready(compiled(*arrays)))
        if call:
            times.append(elapsed)
            foreign.append(other)
        else:
            warmup = elapsed
        if call < job["repeats"]:
            del loss, grads  # as a training loop would before the next step
    peak = peak_bytes()
    gradient = grads[0] if isinstance(grads, tuple) else grads
    result = {
        "side": "opd_jax",
        "kind": job["kind"],
        "chunk_size": job["chunk_size"],
        "loss": float(loss),
        "gradient": gradient_probe(np.asarray(gradient)) if gradient.ndim == 3 else {
            "norm": float(np.linalg.norm(np.asarray(gradient, np.float64)))
        },
        "checksum": fingerprint,
        "warmup_s": warmup,
        "times_s": times,
        "other_load": foreign,
        "rss_before_bytes": base,
        "peak_rss_bytes": peak,
        "peak_rss_delta_bytes": None if peak is None or base is None else peak - base,
        "xla_flops": flops,
        **analysis,
    }
    pathlib.Path(job["out"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
