"""Multi-turn rollouts behind an Environment (opd_jax.rollouts)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import models, rollouts
from opd_jax.sampling import Rollout, SamplingConfig
from opd_jax.tasks import tool_use

REFERENCE = pathlib.Path(__file__).parent / "reference" / "tool_use_rollouts.npz"
PAD, EOS, CLOSE, REPLY = 0, 1, 5, 9


def test_tool_use_rollouts_are_bitwise_those_of_the_code_before_the_environment_protocol():
    """``reference/tool_use_rollouts.npz`` was written by the tool-use task's own rollout loop as it
    was before :mod:`opd_jax.rollouts` existed (commit 8e2d4c5, ``tool_use.make_rollout_fn``): 12
    held-out questions (seed 11) with the shipped models; the student sampled at temperature 1
    (key 3), the teacher greedy (key 0), both with the task's budget, and the teacher at temperature
    1 (key 5) with a 14-token budget that cuts turns and tool outputs."""
    reference = np.load(REFERENCE)
    vocabulary = tool_use.Vocabulary()
    rollout_fn = tool_use.make_rollout_fn(vocabulary)
    budget = tool_use.toy_task().max_response_length + 4
    runs = (("student", "student", 1.0, 3, budget), ("teacher", "teacher", 0.0, 0, budget),
            ("short", "teacher", 1.0, 5, 14))
    for name, role, temperature, seed, new_tokens in runs:
        model, _ = models.from_pretrained(tool_use.toy_model_path(role))
        config = SamplingConfig(max_new_tokens=new_tokens, temperature=temperature, stop_ids=(vocabulary.eos_id,),
                                pad_id=vocabulary.pad_id)
        rollout = rollout_fn(model, reference["prompt_tokens"], reference["prompt_mask"], jax.random.key(seed), config)
        for field in ("tokens", "token_mask", "response_mask", "sampling_logp"):
            expected, actual = reference[f"{name}_{field}"], np.asarray(getattr(rollout, field))
            assert actual.dtype == expected.dtype, (name, field)
            if field == "sampling_logp":
                # The sampler's decode step (fused projections, a heads-first cache) sums in another
                # order than the code that wrote the reference: log-probs agree to float32
                # round-off (measured: 1.7e-6 at most), the tokens and masks stay bitwise.
                np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5, err_msg=f"{name} {field}")
            else:
                np.testing.assert_array_equal(actual, expected, err_msg=f"{name} {field}")
    tool_tokens = reference["teacher_token_mask"] & ~reference["teacher_response_mask"] & ~np.pad(
        reference["prompt_mask"], ((0, 0), (0, budget)))
    assert tool_tokens.sum() > 12  # the reference does exercise tool outputs


class Scripted:
    """A ``generate`` stand-in: row ``r`` (its prompt's first token is ``r + 10``) writes
    ``turns[r][k]`` in its turn ``k`` (``k`` = the number of ``CLOSE`` tokens in its context);
    like ``generate`` it stops at the first stop id and pads after it."""

    def __init__(self, turns):
        self.turns, self.stop_ids = turns, []

    def __call__(self, model, tokens, mask, key, config):
        self.stop_ids.append(config.stop_ids)
        rows, width = tokens.shape
        new = np.full((rows, config.max_new_tokens), config.pad_id, np.int32)
        new_mask = np.zeros((rows, config.max_new_tokens), bool)
        for slot in range(rows):
            context = tokens[slot][mask[slot]]
            turns = self.turns[int(context[0]) - 10]
            ids = list(turns[min(int(np.sum(context == CLOSE)), len(turns) - 1)])[: config.max_new_tokens]
            stops = [i for i, t in enumerate(ids) if t in config.stop_ids]
            ids = ids[: stops[0] + 1] if stops else ids
            new[slot, : len(ids)], new_mask[slot, : len(ids)] = ids, True
        logp = np.where(new_mask, -0.5, 0.0).astype(np.float32)
        return Rollout(jnp.asarray(np.concatenate([tokens, new], 1)), jnp.asarray(np.concatenate([mask, new_mask], 1)),
                       jnp.asarray(np.concatenate([np.zeros_like(mask), new_mask], 1)),
                       jnp.asarray(np.concatenate([np.zeros(mask.shape, np.float32), logp], 1)))


class Echo:
    """Answers a turn with one ``REPLY`` per turn token, and ends the episode at its third turn."""

    turn_stop_ids = (CLOSE,)
    episode_stop_ids = (EOS,)

    def __init__(self):
        self.calls = []

    def respond(self, turn_T, context_C):
        self.calls.append((turn_T.tolist(), context_C.tolist()))
        return None if len(self.calls) == 3 else [REPLY] * len(turn_T)


def _run(turns, budget=16, stop_ids=()):
    prompts_BxP = np.array([[PAD, 10 + row, 3] for row in range(len(turns))], np.int32)
    mask_BxP = prompts_BxP != PAD
    generate_fn = Scripted(turns)
    environment = Echo()
    rollout_fn = rollouts.make_rollout_fn(environment, generate_fn=generate_fn)
    rollout = rollout_fn(None, prompts_BxP, mask_BxP, jax.random.key(0),
                         SamplingConfig(budget, stop_ids=stop_ids, pad_id=PAD))
    return rollout, environment, generate_fn


def test_environment_answers_turns_its_tokens_are_context_only_and_none_ends_the_episode():
    rollout, environment, generate_fn = _run([[[4, CLOSE], [6, 6, CLOSE], [7, CLOSE], [8, EOS]]])
    assert isinstance(environment, rollouts.Environment)
    # The environment's episode stop ids and turn stop ids join the sampling config's for every turn.
    assert set(generate_fn.stop_ids) == {(EOS, CLOSE)}
    assert environment.calls == [([4, CLOSE], [10, 3, 4, CLOSE]),
                                 ([6, 6, CLOSE], [10, 3, 4, CLOSE, REPLY, REPLY, 6, 6, CLOSE]),
                                 ([7, CLOSE], [10, 3, 4, CLOSE, REPLY, REPLY, 6, 6, CLOSE, REPLY, REPLY, REPLY, 7, CLOSE])]
    response = [4, CLOSE, REPLY, REPLY, 6, 6, CLOSE, REPLY, REPLY, REPLY, 7, CLOSE]  # ended by None after [7, ]]
    assert rollout.tokens.shape == (1, 3 + 16)
    np.testing.assert_array_equal(rollout.tokens[0, 3:], response + [PAD] * 4)
    np.testing.assert_array_equal(rollout.token_mask[0], [False, True, True] + [True] * 12 + [False] * 4)
    by_model = [t != REPLY for t in response] + [False] * 4
    np.testing.assert_array_equal(rollout.response_mask[0], [False] * 3 + by_model)
    np.testing.assert_array_equal(rollout.sampling_logp[0], np.where([False] * 3 + by_model, -0.5, 0.0))


@pytest.mark.parametrize("stop_ids", [(), (CLOSE,)])
def test_episode_ends_at_an_episode_stop_id_the_budget_or_a_turn_that_never_stops(stop_ids):
    # A turn stop id that is also a sampling stop id still ends the turn, not the episode.
    rollout, environment, _ = _run([[[4, CLOSE], [EOS]], [[4, 4, 4, 4, CLOSE]], [[2] * 30]], budget=8,
                                   stop_ids=stop_ids)
    tokens = np.asarray(rollout.tokens[:, 3:])
    np.testing.assert_array_equal(tokens[0], [4, CLOSE, REPLY, REPLY, EOS, PAD, PAD, PAD])
    # Row 1: after 5 model tokens the 5-token answer is cut at the budget, and the row stops there.
    np.testing.assert_array_equal(tokens[1], [4, 4, 4, 4, CLOSE, REPLY, REPLY, REPLY])
    assert np.asarray(rollout.response_mask[1, 3:]).tolist() == [True] * 5 + [False] * 3
    # Row 2 never stops a turn: the budget is all model tokens, and the environment never hears of it.
    assert np.asarray(rollout.response_mask[2, 3:]).all() and len(environment.calls) == 2


def test_a_backend_runs_the_episodes_of_a_multi_turn_rollout_fn_bitwise():
    """MultiTurnBackend: each turn one generate() of the wrapped backend (the loop wraps vLLM this
    way); on the JAX backend its episodes are bitwise those of the multi-turn rollout_fn itself."""
    from flax import nnx

    from opd_jax.backends import JaxBackend

    reference = np.load(REFERENCE)
    vocabulary = tool_use.Vocabulary()
    rollout_fn = tool_use.make_rollout_fn(vocabulary)
    assert isinstance(rollout_fn, rollouts.MultiTurn)
    model, _ = models.from_pretrained(tool_use.toy_model_path("teacher"))
    config = SamplingConfig(max_new_tokens=tool_use.toy_task().max_response_length + 4, temperature=1.0,
                            stop_ids=(vocabulary.eos_id,), pad_id=vocabulary.pad_id)
    graphdef, params = nnx.split(model)
    wrapped = rollouts.MultiTurnBackend(JaxBackend(graphdef), rollout_fn.environment)
    whole = JaxBackend(graphdef, rollout_fn)
    for backend in (wrapped, whole):
        backend.sync_weights(params)
    assert wrapped.name == "jax"
    got, want = (b.generate(reference["prompt_tokens"], reference["prompt_mask"], jax.random.key(5), config)
                 for b in (wrapped, whole))
    for field in ("tokens", "token_mask", "response_mask", "sampling_logp"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(want, field)), err_msg=field)
    assert (np.asarray(got.token_mask) & ~np.asarray(got.response_mask)).sum() > reference["prompt_mask"].sum()
