"""The vLLM rollout backend against our own sampler and scorer, on a tiny random Qwen3.

The engine runs in ``.venv-vllm`` (built by ``OPD_VLLM=1 .ci/bootstrap``). Without it these tests
skip, unless ``OPD_REQUIRE_VLLM=1`` (set by .ci/run), where they fail. One engine serves the
module (start-up is ~17 s on two CPU cores); the crash and exit tests start their own.

Measured on this model (2 layers × 128, head_dim 64, vocab 256, float32, two CPU cores): greedy
tokens equal ``sampling.generate``'s on every row; at T = 0.7 vLLM's processed log-probabilities
differ from ``sampling.score(..., temperature=0.7)`` by at most ~2e-6 (float32 rounding of two
different kernels), so the tolerance below is 1e-4.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import models, sampling
from opd_jax.backends import vllm as vllm_backend
from opd_jax.backends.vllm import BOOTSTRAP_COMMAND, VllmBackend, VllmWorkerError

PYTHON = pathlib.Path(os.environ.get("OPD_VLLM_PYTHON") or vllm_backend.DEFAULT_PYTHON)
REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = models.DecoderConfig(
    "qwen3", vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=1,
    head_dim=64, qk_norm=True, max_position_embeddings=256, eos_token_id=(2,), pad_token_id=0,
)
# |log p(backend) - log p(trainer)| per response token; measured max ~2e-6 in float32.
LOGP_TOLERANCE = 1e-4


def _require_vllm():
    if not PYTHON.exists():
        reason = f"no vLLM environment at {PYTHON} (build it with `{BOOTSTRAP_COMMAND}`)"
        if os.environ.get("OPD_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def make_student(seed: int, config: models.DecoderConfig = CONFIG) -> models.Decoder:
    model = models.Decoder(config, rngs=nnx.Rngs(seed))
    # Peaked distributions (random init is nearly uniform), so greedy decoding has few near-ties.
    model.embedding[...] = model.embedding[...] * 20
    model.lm_head[...] = model.lm_head[...] * 10
    return model


def left_padded_prompts(batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of every length 1..length (left-padded with 0), ids 3..255."""
    rng = np.random.default_rng(seed)
    lengths = 1 + np.arange(batch) % length
    mask = np.arange(length)[None, :] >= length - lengths[:, None]
    tokens = np.where(mask, rng.integers(3, CONFIG.vocab_size, (batch, length)), 0).astype(np.int32)
    return tokens, mask


class Engine:
    """The module's backend and the student it started with (tests that sync restore it)."""

    def __init__(self):
        self.student = make_student(0)
        self.backend = VllmBackend(CONFIG, self.student, max_num_seqs=32)


@pytest.fixture(scope="module")
def engine():
    _require_vllm()
    engine = Engine()
    print(f"\nvLLM start-up: {engine.backend.startup}")
    yield engine
    # Dropping the last reference stops the worker (weakref finalizer), without close().
    pid, workdir = engine.backend.pid, engine.backend.workdir
    engine.backend = None
    gc.collect()
    assert not _alive(pid), f"worker {pid} still running after the backend was garbage-collected"
    assert not workdir.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_layout_contract(engine):
    tokens, mask = left_padded_prompts(12, 7)
    # Pick a stop id the greedy responses actually produce, so some rows stop early.
    probe = engine.backend.generate(tokens, mask, jax.random.key(0), sampling.SamplingConfig(max_new_tokens=10,
                                                                                               temperature=0.0))
    stop = int(np.asarray(probe.tokens)[0, 7 + 3])
    config = sampling.SamplingConfig(max_new_tokens=10, temperature=0.0, stop_ids=(stop,), pad_id=1)
    rollout = engine.backend.generate(tokens, mask, jax.random.key(0), config)
    ours = sampling.generate(engine.student, tokens, mask, jax.random.key(0), config)

    for name in ("tokens", "token_mask", "response_mask", "sampling_logp"):
        got, want = getattr(rollout, name), getattr(ours, name)
        assert got.shape == want.shape == (12, 17), name
        assert got.dtype == want.dtype, name
    out, token_mask = np.asarray(rollout.tokens), np.asarray(rollout.token_mask)
    response_mask = np.asarray(rollout.response_mask)
    np.testing.assert_array_equal(out[:, :7], tokens)
    np.testing.assert_array_equal(token_mask[:, :7], mask)
    assert not response_mask[:, :7].any()
    np.testing.assert_array_equal(token_mask[:, 7:], response_mask[:, 7:])
    stopped = 0
    for row in range(12):
        n = int(response_mask[row].sum())
        assert response_mask[row, 7:7 + n].all() and not response_mask[row, 7 + n:].any()
        assert (out[row, 7 + n:] == 1).all(), "pad_id after the response"
        hits = np.flatnonzero(out[row, 7:7 + n] == stop)
        if n < 10:
            assert hits.tolist() == [n - 1], "a short response ends with its (only) stop token"
            stopped += 1
        else:
            assert hits.size <= 1 and (hits.size == 0 or hits[0] == 9)
    assert stopped >= 1
    assert (np.asarray(rollout.sampling_logp) == 0).all(), "greedy decoding has sampling_logp 0, as ours"
    np.testing.assert_array_equal(response_mask, np.asarray(ours.response_mask))


def test_greedy_tokens_equal_jax_sampler(engine):
    tokens, mask = left_padded_prompts(32, 9, seed=1)
    config = sampling.SamplingConfig(max_new_tokens=24, temperature=0.0)
    ours = np.asarray(sampling.generate(engine.student, tokens, mask, jax.random.key(0), config).tokens)
    theirs = np.asarray(engine.backend.generate(tokens, mask, jax.random.key(0), config).tokens)
    agree = (ours == theirs).all(axis=1)
    print(f"\ngreedy rows equal: {agree.sum()}/{len(agree)}")
    # Measured 32/32; a float32 near-tie may flip one row on another CPU.
    assert agree.sum() >= 31


def test_sampling_logp_matches_trainer_score(engine):
    tokens, mask = left_padded_prompts(16, 6, seed=2)
    config = sampling.SamplingConfig(max_new_tokens=20, temperature=0.7)
    rollout = engine.backend.generate(tokens, mask, jax.random.key(3), config)
    scored = np.asarray(sampling.score(engine.student, rollout.tokens, rollout.token_mask, temperature=0.7))
    response = np.asarray(rollout.response_mask)
    logp = np.asarray(rollout.sampling_logp)
    gap = np.abs(logp - scored)[response]
    print(f"\nT=0.7 |vLLM - score| over {gap.size} tokens: max {gap.max():.2e}, mean {gap.mean():.2e}")
    assert gap.max() < LOGP_TOLERANCE
    assert (logp[~response] == 0).all()
    assert (logp[response] < 0).all()


def test_sampling_logp_after_top_k_and_top_p(engine):
    """processed_logprobs: renormalised over the tokens top-k / top-p keep, as the JAX sampler's."""
    tokens, mask = left_padded_prompts(8, 5, seed=4)
    for config in (sampling.SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=5),
                   sampling.SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.7)):
        rollout = engine.backend.generate(tokens, mask, jax.random.key(5), config)
        token_mask = rollout.token_mask
        hidden, _ = engine.student.hidden_states(rollout.tokens, positions_BxT=sampling.positions_from_mask(token_mask),
                                                 token_mask_BxT=token_mask)
        logits = engine.student.logits(hidden)[:, :-1].astype(jnp.float32)
        filtered = sampling._filter_logits(logits.reshape(-1, CONFIG.vocab_size), config).reshape(logits.shape)
        expected = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), rollout.tokens[:, 1:, None], -1)[..., 0]
        response = np.asarray(rollout.response_mask)[:, 1:]
        got = np.asarray(rollout.sampling_logp)[:, 1:][response]
        want = np.asarray(expected)[response]
        assert np.isfinite(want).all(), "every sampled token is one the filter keeps"
        assert np.abs(got - want).max() < LOGP_TOLERANCE, config


def test_seeded_by_key(engine):
    tokens, mask = left_padded_prompts(8, 4, seed=6)
    config = sampling.SamplingConfig(max_new_tokens=16, temperature=1.0)
    first = engine.backend.generate(tokens, mask, jax.random.key(7), config)
    again = engine.backend.generate(tokens, mask, jax.random.key(7), config)
    other = engine.backend.generate(tokens, mask, jax.random.key(8), config)
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
    np.testing.assert_allclose(np.asarray(first.sampling_logp), np.asarray(again.sampling_logp), atol=1e-6)
    assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()


class _Reply:
    """An environment that answers a turn ending in ``stop`` with ``[7, 8, 9]``, at most twice per episode."""

    episode_stop_ids = ()

    def __init__(self, stop: int):
        self.turn_stop_ids = (stop,)

    def respond(self, turn_T, context_C):
        return None if int(np.sum(context_C == 9)) >= 2 else [7, 8, 9]


def test_multi_turn_episodes_run_on_vllm_turns(engine):
    """rollouts.MultiTurnBackend over the vLLM backend: greedy episodes with environment answers equal
    those of the JAX sampler's multi-turn rollout (the tokens, and which of them are the model's)."""
    from opd_jax import rollouts

    tokens, mask = left_padded_prompts(16, 5, seed=11)
    probe = engine.backend.generate(tokens, mask, jax.random.key(0), sampling.SamplingConfig(max_new_tokens=6,
                                                                                              temperature=0.0))
    stop = int(np.asarray(probe.tokens)[0, 5 + 2])  # a token greedy decoding writes: turns do end
    config = sampling.SamplingConfig(max_new_tokens=40, temperature=0.0)
    ours = rollouts.MultiTurn(_Reply(stop))(engine.student, tokens, mask, jax.random.key(0), config)
    theirs = rollouts.MultiTurnBackend(engine.backend, _Reply(stop)).generate(tokens, mask, jax.random.key(0), config)
    rows = [all((np.asarray(getattr(ours, f))[r] == np.asarray(getattr(theirs, f))[r]).all()
                for f in ("tokens", "token_mask", "response_mask")) for r in range(16)]
    print(f"\nmulti-turn greedy episodes equal: {sum(rows)}/16")
    assert sum(rows) >= 15  # as single turns: a float32 near-tie may flip one row
    answered = (np.asarray(theirs.token_mask) & ~np.asarray(theirs.response_mask))[:, 5:].sum(axis=1)
    print(f"episodes the environment answered: {int((answered > 0).sum())}/16")
    assert (answered > 0).sum() >= 2  # turns did end and go on after an answer


def test_sync_weights(engine):
    tokens, mask = left_padded_prompts(16, 6, seed=8)
    config = sampling.SamplingConfig(max_new_tokens=16, temperature=0.0)
    new = make_student(1)
    want_new = np.asarray(sampling.generate(new, tokens, mask, jax.random.key(0), config).tokens)
    want_old = np.asarray(sampling.generate(engine.student, tokens, mask, jax.random.key(0), config).tokens)
    assert (want_new != want_old).any(axis=1).all()
    try:
        _, state = nnx.split(new)
        engine.backend.sync_weights(state)
        cost = engine.backend.last_sync
        print(f"\nsync_weights: {cost}")
        got = np.asarray(engine.backend.generate(tokens, mask, jax.random.key(0), config).tokens)
        assert (got == want_new).all(axis=1).sum() >= 15
        # The temperature path follows the new weights too.
        rollout = engine.backend.generate(tokens, mask, jax.random.key(1), sampling.SamplingConfig(16, 0.7))
        scored = np.asarray(sampling.score(new, rollout.tokens, rollout.token_mask, temperature=0.7))
        response = np.asarray(rollout.response_mask)
        assert np.abs(np.asarray(rollout.sampling_logp) - scored)[response].max() < LOGP_TOLERANCE
    finally:
        engine.backend.sync_weights(nnx.state(engine.student))
    got = np.asarray(engine.backend.generate(tokens, mask, jax.random.key(0), config).tokens)
    assert (got == want_old).all(axis=1).sum() >= 15


def test_sync_weights_of_a_tied_model():
    """Tied embeddings (the toy models have them): the engine's output head must follow a sync too.
    Before the worker prepared the tied head again, the engine sampled with the old embedding
    (mean |log-prob gap| 0.25) while every parameter equalled a fresh engine's."""
    _require_vllm()
    tied = dataclasses.replace(CONFIG, tie_word_embeddings=True)
    old, new = (models.Decoder(tied, rngs=nnx.Rngs(seed)) for seed in (0, 5))
    tokens, mask = left_padded_prompts(8, 6, seed=9)
    with VllmBackend(tied, old, max_num_seqs=8) as backend:
        backend.sync_weights(nnx.state(new))
        rollout = backend.generate(tokens, mask, jax.random.key(0), sampling.SamplingConfig(12, 1.0))
    scored = np.asarray(sampling.score(new, rollout.tokens, rollout.token_mask))
    stale = np.asarray(sampling.score(old, rollout.tokens, rollout.token_mask))
    response = np.asarray(rollout.response_mask)
    assert np.abs(np.asarray(rollout.sampling_logp) - scored)[response].max() < LOGP_TOLERANCE
    assert np.abs(np.asarray(rollout.sampling_logp) - stale)[response].mean() > 100 * LOGP_TOLERANCE


def test_request_error_keeps_the_worker(engine):
    with pytest.raises(VllmWorkerError, match="unknown command 'bogus'"):
        engine.backend._request("a bogus request", {"cmd": "bogus"})
    rollout = engine.backend.generate(np.array([[5]], np.int32), np.ones((1, 1), bool), jax.random.key(0),
                                      sampling.SamplingConfig(4, 0.0))
    assert rollout.tokens.shape == (1, 5)


def test_bad_inputs(engine):
    config = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0)
    with pytest.raises(ValueError, match="left-padded"):
        engine.backend.generate(np.ones((2, 4), np.int32), np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool),
                                jax.random.key(0), config)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        engine.backend.generate(np.array([[0, 5, 300]], np.int32), np.array([[0, 1, 1]], bool), jax.random.key(0),
                                config)
    with pytest.raises(ValueError, match="max_model_len 256"):
        engine.backend.generate(np.ones((1, 250), np.int32), np.ones((1, 250), bool), jax.random.key(0), config)


def test_missing_environment_names_bootstrap():
    with pytest.raises(VllmWorkerError, match=r"OPD_VLLM=1 \.ci/bootstrap"):
        VllmBackend(CONFIG, make_student(0), python="/nonexistent/.venv-vllm/bin/python")


def test_python_without_vllm_names_bootstrap():
    # This interpreter (the jax environment) has no vllm: the worker reports the failed import.
    with pytest.raises(VllmWorkerError, match=r"cannot import vllm.*OPD_VLLM=1 \.ci/bootstrap"):
        VllmBackend(CONFIG, make_student(0), python=sys.executable, startup_timeout_s=120)


def test_unsupported_head_size_is_explained():
    _require_vllm()
    config = models.DecoderConfig("qwen3", vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=1,
                                  num_heads=4, num_kv_heads=2, head_dim=12, qk_norm=True, max_position_embeddings=64)
    # vLLM builds the engine, then its first forward pass fails; the backend's warm-up token makes
    # that a start-up error.
    with pytest.raises(VllmWorkerError, match=r"(?s)Unsupported CPU attention configuration: head_dim=12.*"
                                              r"head_dim 12: vLLM's CPU attention supports head sizes 32, 48, 64"):
        VllmBackend(config, models.Decoder(config, rngs=nnx.Rngs(0)))


def test_sigkill_mid_run_raises_and_close_cleans_up():
    _require_vllm()
    backend = VllmBackend(CONFIG, make_student(2), max_num_seqs=32)
    pid, workdir = backend.pid, backend.workdir
    tokens, mask = left_padded_prompts(32, 8, seed=9)
    errors: list[BaseException] = []

    def run():
        try:
            backend.generate(tokens, mask, jax.random.key(0), sampling.SamplingConfig(max_new_tokens=240,
                                                                                      temperature=1.0))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive(), "the request should still be running (too fast to interrupt)"
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], VllmWorkerError), errors
    assert "during generate" in str(errors[0]) and "SIGKILL" in str(errors[0])
    with pytest.raises(VllmWorkerError, match="sync_weights"):
        backend.sync_weights(nnx.state(make_student(3)))
    with pytest.raises(VllmWorkerError, match="after close"):
        backend.generate(tokens, mask, jax.random.key(0), sampling.SamplingConfig(4, 0.0))
    backend.close()
    backend.close()
    assert not _alive(pid)
    assert not workdir.exists()


def test_unresponsive_worker_times_out():
    """A worker that stops answering (SIGSTOP: alive, silent) is killed after request_timeout_s."""
    _require_vllm()
    backend = VllmBackend(CONFIG, make_student(0), max_num_seqs=4, request_timeout_s=3)
    pid, workdir = backend.pid, backend.workdir
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(VllmWorkerError, match="during generate: no reply within 3 s; the worker was stopped"):
        backend.generate(np.array([[5, 6]], np.int32), np.ones((1, 2), bool), jax.random.key(0),
                         sampling.SamplingConfig(4, 0.0))
    assert time.monotonic() - start < 30
    assert not _alive(pid)
    assert not workdir.exists()


def test_exit_without_close_leaves_no_process(tmp_path):
    """A script that never calls close(): the atexit finalizer stops the worker."""
    _require_vllm()
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_vllm_backend import CONFIG, make_student
        from opd_jax.backends.vllm import VllmBackend
        backend = VllmBackend(CONFIG, make_student(0), max_num_seqs=4)
        print(backend.pid, backend.workdir, flush=True)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    pid, workdir = result.stdout.split()[-2:]
    assert not _alive(int(pid))
    assert not pathlib.Path(workdir).exists()
