"""The open loop: advantage_fn / loss_fn plug points, divergences as config values, the tempered
policy, the full-vocabulary term and the loss options, end to end through opd_jax.train.train."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import divergences, step, train
from opd_jax.config import TrainConfig
from opd_jax.sampling import score

HELPERS = pathlib.Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import custom_divergence  # noqa: E402
import faults  # noqa: E402
import tiny_run  # noqa: E402

BASE = dict(prompts_per_step=4, group_size=2, max_new_tokens=6, steps=3, checkpoint_every=3, learning_rate=3e-3,
            minibatches=2, epochs=2)


def _run(output, config, **kwargs):
    student, teacher, prompts = tiny_run.models_and_prompts()
    result = train.train(config, student, tiny_run.CONFIG, teacher, prompts, output, stop_ids=(3,), progress=False,
                         **kwargs)
    return result, student


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _same_bits(a, b):
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b, strict=True))


def test_zero_advantages_leave_the_parameters_bitwise_unchanged_and_the_ratio_at_one(tmp_path):
    """With no advantage there is no gradient (weight decay 0), so nothing moves; every update then
    sees the behaviour policy itself, at the rollout temperature. The ratio is 1 to float32 rounding,
    not bitwise: prepare and update are different XLA programs (fused differently), measured
    |log ratio| ≤ 5e-7. Scoring at T = 1 what was sampled at T = 0.7 (what 0.1 did) is off by far more."""
    config = TrainConfig(**BASE, temperature=0.7, weight_decay=0.0)
    initial, teacher, _ = tiny_run.models_and_prompts()
    result, _ = _run(tmp_path, config, advantage_fn=lambda s, t, m: jnp.zeros_like(s))
    assert _same_bits(_params(result.student), _params(initial))
    records = [r for r in result.history if "loss" in r]
    for record in records:
        assert record["log_ratio_abs_max"] < 2e-6 and record["clip_fraction"] == 0.0
        assert record["sampling_logp_gap"] < 1e-5  # the trainer's behaviour log-probs are the sampler's
    _, _, _, _, batch, _ = _prepared(config)
    at_one = score(initial, batch.tokens_BxT, batch.token_mask_BxT)  # the policy at T = 1
    gap = np.abs(np.asarray(at_one - batch.behaviour_logp_BxT))[np.asarray(batch.response_mask_BxT)]
    # 0.029 nats per token on this near-uniform random student: over a thousand times the rounding gap
    assert gap.mean() > 0.01


def test_an_advantage_fn_reimplementing_js_opd_plus_is_bitwise_the_config_run(tmp_path):
    config = TrainConfig(**BASE, divergence="js", estimator="opd_plus", level="token", gamma=0.0, log_ratio_clip=20.0)
    js = divergences.get("js")

    def js_opd_plus(student_logp_BxT, teacher_logp_BxT, response_mask_BxT):
        log_u = jnp.clip(jnp.where(response_mask_BxT, teacher_logp_BxT - student_logp_BxT, 0.0), -20.0, 20.0)
        return jnp.where(response_mask_BxT, js.opd_plus_reward(log_u), 0.0)

    by_config, _ = _run(tmp_path / "config", config)
    by_function, _ = _run(tmp_path / "function", config, advantage_fn=js_opd_plus)
    assert _same_bits(_params(by_config.student), _params(by_function.student))
    assert not _same_bits(_params(by_config.student), _params(tiny_run.models_and_prompts()[0]))


@pytest.mark.parametrize("returns, expected", [
    (lambda s, t, m: jnp.zeros((s.shape[0], 2)), r"advantage_fn .*<lambda>.* returned shape \[8, 2\].*\[B, T\] = \[8, 12\] or \[B\] = \[8\]"),
    (lambda s, t, m: jnp.zeros(s.shape, jnp.int32), r"advantage_fn .* dtype int32"),
])
def test_a_wrong_advantage_fn_is_named_before_any_update(tmp_path, returns, expected):
    with pytest.raises(ValueError, match=expected):
        _run(tmp_path, TrainConfig(**BASE), advantage_fn=returns)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "student").exists()


def test_a_loss_fn_not_returning_one_value_per_sequence_is_named(tmp_path):
    def per_token_loss(logp_BxT, behaviour_BxT, advantages, mask_BxT):
        return -logp_BxT * advantages

    with pytest.raises(ValueError, match=r"loss_fn .*per_token_loss returned shape \[4, 12\].*\[B\] = \[4\]"):
        _run(tmp_path, TrainConfig(**BASE), loss_fn=per_token_loss)
    assert not (tmp_path / "student").exists()


def test_a_custom_loss_fn_is_what_the_update_minimises(tmp_path):
    """A loss whose gradient is zero (a constant per sequence) trains nothing, and its value is the loss logged."""
    result, _ = _run(tmp_path, TrainConfig(**BASE, loss_aggregation="sequence_mean"),
                     loss_fn=lambda logp, old, adv, mask: 2.0 * jnp.sum(mask, axis=-1).astype(jnp.float32))
    assert _same_bits(_params(result.student), _params(tiny_run.models_and_prompts()[0]))
    # sequence_mean over a minibatch of M = B / 2 rows: Σ_b (2 n_b / n_b) / (B / minibatches) = 2 M / (B / 2) = 2
    assert all(r["loss"] == pytest.approx(2.0, rel=1e-6) for r in result.history if "loss" in r)


def _prepared(config, **kwargs):
    """The step's pieces on the tiny models, and one scored rollout."""
    student, teacher, prompts = tiny_run.models_and_prompts()
    graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    optimizer = step.make_optimizer(config)
    fns = step.make_train_step(config, graphdef, teacher_graphdef, optimizer, **kwargs)
    from opd_jax.sampling import SamplingConfig, generate

    rollout = generate(student, jnp.asarray(np.repeat(prompts.tokens[:4], 2, axis=0)),
                       jnp.asarray(np.repeat(prompts.mask[:4], 2, axis=0)), jax.random.key(3),
                       SamplingConfig(max_new_tokens=6, temperature=config.temperature, stop_ids=(3,)))
    batch, metrics = fns.prepare(params, teacher_params, rollout, None)
    return fns, params, teacher_params, optimizer, batch, metrics


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_loss_aggregation_matches_its_closed_form(aggregation):
    config = TrainConfig(**{**BASE, "minibatches": 1}, loss_aggregation=aggregation, divergence="js")
    fns, params, teacher_params, optimizer, batch, metrics = _prepared(config)
    mask = np.asarray(batch.response_mask_BxT)
    advantages = np.asarray(batch.advantages, np.float64)
    per_sequence = -np.sum(mask * advantages, axis=-1)  # at ratio 1 the clipped surrogate is −Σ_t A_t
    counts = mask.sum(axis=-1)
    expected = (per_sequence.sum() / counts.sum() if aggregation == "token_mean"
                else np.mean(per_sequence / np.maximum(counts, 1)))
    normalizer = float(counts.sum()) if aggregation == "token_mean" else float(len(counts))
    _, _, out = fns.update(params, optimizer.init(params), teacher_params, batch, jnp.float32(normalizer))
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)


def test_the_full_vocab_term_adds_its_reward_to_go_and_trains(tmp_path):
    config = TrainConfig(**BASE, divergence="js", gamma=1.0, full_vocab_weight=0.5, full_vocab_divergence="forward_kl")
    plain = dataclasses.replace(config, full_vocab_weight=0.0)
    _, _, _, _, with_term, metrics = _prepared(config)
    _, _, _, _, without, _ = _prepared(plain)
    from opd_jax.objectives import full_vocab_divergence
    from opd_jax.sampling import positions_from_mask

    # The reward-to-go against an independent computation from materialised logits.
    student, teacher, _ = tiny_run.models_and_prompts()
    tokens, token_mask, mask = with_term.tokens_BxT, with_term.token_mask_BxT, with_term.response_mask_BxT
    logits = [m(tokens, positions_BxT=positions_from_mask(token_mask), token_mask_BxT=token_mask) for m in (student, teacher)]
    per_token = np.asarray(full_vocab_divergence(logits[0][:, :-1], logits[1][:, :-1], mask[:, 1:],
                                                 divergence="forward_kl"), np.float64)
    per_token = np.pad(per_token, ((0, 0), (1, 0)))
    future = np.flip(np.cumsum(np.flip(per_token, 1), 1), 1) - per_token  # Σ_{k>n} D_k (γ = 1)
    expected = np.asarray(without.advantages) - 0.5 * future * np.asarray(mask)
    np.testing.assert_allclose(np.asarray(with_term.advantages), expected, rtol=1e-4, atol=1e-4)
    assert float(metrics["full_vocab_divergence"]) == pytest.approx(per_token[np.asarray(mask)].mean(), rel=1e-4)
    result, _ = _run(tmp_path, config)
    assert all(np.isfinite(r["loss"]) and r["full_vocab_divergence"] > 0 for r in result.history if "loss" in r)


@pytest.mark.parametrize("overrides, expected", [
    (dict(full_vocab_weight=-0.1), r"full_vocab_weight must lie in \[0.0, ∞\)"),
    (dict(full_vocab_weight=1.0, level="sequence"), r"full_vocab_weight > 0 needs level 'token'"),
    (dict(clip_ratio_c=1.0), r"clip_ratio_c must lie in \(1.0, ∞\)"),
    (dict(loss_aggregation="seq"), r"loss_aggregation must be one of token_mean, sequence_mean"),
    (dict(divergence="nope"), r"divergence: unknown divergence 'nope'"),
    (dict(divergence="no_such_module:f"), r"cannot import the custom divergence 'no_such_module:f'"),
    (dict(divergence=divergences.custom(lambda log_u: jnp.expm1(log_u) ** 2)), r"cannot be imported by name"),
])
def test_bad_objective_options_are_named(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        TrainConfig(**overrides)


def test_divergence_values_are_recorded_so_a_config_round_trips():
    custom = divergences.custom(custom_divergence.triangular, name="triangular")
    for config in (TrainConfig(divergence=divergences.get("generalized_js", beta=0.3)),
                   TrainConfig(divergence=custom, full_vocab_divergence="custom_divergence:triangular"),
                   TrainConfig(divergence="alpha", alpha=0.5)):
        saved = json.loads(json.dumps(config.to_json()))
        rebuilt = TrainConfig.from_dict(saved)
        assert rebuilt.to_dict() == config.to_dict()
        assert rebuilt.divergence_fn().f_fn is config.divergence_fn().f_fn
        assert rebuilt.divergence_fn().params == config.divergence_fn().params
    assert TrainConfig(divergence=custom).to_dict()["divergence"] == "custom_divergence:triangular"
    assert TrainConfig(divergence=divergences.get("generalized_js", beta=0.3)).to_dict()["beta"] == 0.3


def test_a_run_with_an_unimportable_recorded_divergence_is_refused_and_nothing_changes(tmp_path):
    """A folder whose config.json names a custom divergence: resuming it with another is refused, files intact."""
    custom = divergences.custom(custom_divergence.triangular, name="triangular")
    _run(tmp_path, TrainConfig(**BASE, divergence=custom))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"differs in \['divergence'\]"):
        _run(tmp_path, TrainConfig(**BASE, divergence="js"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["objective"]["divergence"] == "custom_divergence:triangular"
    saved["objective"]["divergence"] = "custom_divergence_gone:triangular"
    with pytest.raises(ValueError, match="cannot import the custom divergence 'custom_divergence_gone:triangular'"):
        TrainConfig.from_dict(saved)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def _child(output_dir, steps):
    # The children of one test share a compilation cache: the later ones skip most compiling.
    return subprocess.Popen([sys.executable, str(HELPERS / "tiny_run.py"), str(output_dir), str(steps), "custom"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=faults.child_env(output_dir.parent / "jax_cache"))


def test_a_custom_divergence_run_killed_and_resumed_is_bitwise_the_uninterrupted_one(tmp_path):
    assert _child(tmp_path / "whole", 8).wait(timeout=600) == 0
    faults.kill_after_checkpoint(_child(tmp_path / "killed", 8), tmp_path / "killed", 4)
    assert not (tmp_path / "killed" / "student").exists()
    assert _child(tmp_path / "killed", 8).wait(timeout=600) == 0
    assert (tmp_path / "killed" / "student" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "student" / "model.safetensors").read_bytes()
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["objective"]["divergence"] == "custom_divergence:triangular"
