"""Sharded vs single-device train step on 8 CPU devices; run by tests/test_sharding.py in a child process.

The device count is fixed when jax initialises, so this runs in its own process with
``JAX_NUM_CPU_DEVICES=8`` and prints one JSON object of measurements for the test to assert on.

Usage: JAX_NUM_CPU_DEVICES=8 python sharded_step.py SCRATCH_DIR
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import sharding, step, train
from opd_jax.sampling import SamplingConfig, generate

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import tiny_run  # noqa: E402

MESHES = ((8, 1, 1), (2, 2, 2), (1, 4, 2))
# No baseline: with leave-one-out the advantages are centred per group, the surrogate loss is
# then a near-cancelling sum and its relative error says nothing about the sharding. At a small
# learning rate AdamW moves each weight by ~lr whatever the sign noise of its near-zero gradients.
CONFIG = train.TrainConfig(**{**tiny_run.TRAIN, "prompts_per_step": 8, "group_size": 2, "minibatches": 2,
                              "baseline": "none", "learning_rate": 1e-4})
UPDATES = 2  # one epoch over both minibatches: the updates of one training step


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_step(step_fn, params, opt_state, teacher_params, rollout, place=lambda x: x):
    """prepare, then UPDATES minibatch updates on fixed row sets; returns losses, final params and the
    prepared (behaviour log-probs, teacher-KL, advantages)."""
    scored, metrics = step_fn.prepare(params, teacher_params, rollout, None, None)
    normalizer = place(jnp.maximum(metrics["response_tokens"], 1).astype(jnp.float32) / CONFIG.minibatches)
    losses = []
    for update in range(UPDATES):
        rows = place(jnp.arange(update % 2, 16, 2))  # 8 rows, a different half each time
        params, opt_state, out = step_fn.update(params, opt_state, teacher_params, step_fn.take_rows(scored, rows),
                                                normalizer)
        losses.append(float(out["loss"]))
    return losses, params, (scored.behaviour_logp_BxT, metrics["teacher_kl"], scored.advantages)


def place_on(mesh, params, teacher_params, optimizer):
    """Student and teacher parameters and the AdamW state placed on ``mesh`` by the default rules,
    and the :class:`step.StepShardings` of a step there."""
    placed, param_shardings = sharding.shard_state(params, mesh)
    teacher_placed, teacher_shardings = sharding.shard_state(teacher_params, mesh)
    opt_shardings = sharding.state_shardings(jax.eval_shape(optimizer.init, params), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = step.StepShardings(param_shardings, opt_shardings, teacher_shardings, sharding.batch_sharding(mesh),
                                    replicated)
    return placed, teacher_placed, jax.jit(optimizer.init, out_shardings=opt_shardings)(placed), shardings


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    student, teacher, prompts = tiny_run.models_and_prompts()
    graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    tokens, mask = prompts.batch(0, 16, seed=0)
    rollout = generate(student, tokens, mask, jax.random.key(0), SamplingConfig(8, stop_ids=(3,)))
    optimizer = step.make_optimizer(CONFIG)

    # Traces of the loss = traces of `update` (it runs once per trace of the loss).
    traces = []
    surrogate = step.config_loss_fn(CONFIG)

    def counting_loss(*args):
        traces.append(1)
        return surrogate(*args)

    single = step.make_train_step(CONFIG, graphdef, teacher_graphdef, optimizer, loss_fn=counting_loss)
    ref_losses, ref_params, ref_prepared = run_step(single, params, optimizer.init(params), teacher_params, rollout)
    results = {"single_traces": len(traces), "ref_losses": ref_losses, "meshes": {}}

    for shape in MESHES:
        traces.clear()
        mesh = sharding.MeshConfig(*shape).make_mesh()
        placed, teacher_placed, opt_state, shardings = place_on(mesh, params, teacher_params, optimizer)
        replicated, batch_sharding = shardings.replicated, shardings.batch
        step_fn = step.make_train_step(CONFIG, graphdef, teacher_graphdef, optimizer, shardings, loss_fn=counting_loss)
        shard_shapes = {
            name: list(_get_array(placed, path).addressable_shards[0].data.shape)
            for name, path in (("q", ("layers", "attention", "q")), ("down", ("layers", "mlp", "down")),
                               ("embedding", ("embedding",)), ("lm_head", ("lm_head",)))
        }
        mu_q_shard = list(opt_state[1][0].mu["layers"]["attention"]["q"][...].addressable_shards[0].data.shape)
        losses, new_params, prepared = run_step(
            step_fn, placed, opt_state, teacher_placed, jax.device_put(rollout, batch_sharding),
            place=lambda x: jax.device_put(x, replicated),
        )
        param_errors = jax.tree_util.tree_flatten_with_path(
            jax.tree.map(relative, nnx.to_pure_dict(new_params), nnx.to_pure_dict(ref_params)))[0]
        worst_path, worst = max(param_errors, key=lambda item: item[1])
        donated = _get_array(placed, ("layers", "mlp", "gate")).is_deleted()
        results["meshes"]["x".join(map(str, shape))] = {
            "loss_errors": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)],
            "param_error_max": worst,
            "param_error_worst": sharding.path_name(worst_path),
            "params_changed": relative(_get_array(new_params, ("lm_head",)), params["lm_head"][...]),
            "prepared_errors": [relative(a, b) for a, b in zip(prepared, ref_prepared)],
            "shard_shapes": shard_shapes,
            "mu_q_shard": mu_q_shard,
            "out_param_spec": str(_get_array(new_params, ("layers", "attention", "q")).sharding.spec),
            "update_traces": len(traces),
            "update_cache_size": step_fn.update._cache_size(),
            "params_donated": donated,
            "student_untouched": not student.layers.mlp.gate[...].is_deleted(),
        }

    errors = {}
    for name, call in {
        "device_count": lambda: sharding.MeshConfig(3, 1, 1).make_mesh(),
        "parameter": lambda: sharding.state_shardings(params, sharding.MeshConfig(1, 1, 8).make_mesh()),
        "batch": lambda: sharding.check_batch(12, sharding.MeshConfig(1, 8, 1).make_mesh()),
    }.items():
        try:
            call()
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    results["errors"] = errors

    # train() with a bad mesh: the error comes before any part of the step is traced (so compiled):
    # the advantage_fn, traced with prepare, never runs.
    scored = []
    advantages = step.config_advantage_fn(CONFIG)

    def counting_advantages(*args):
        scored.append(1)
        return advantages(*args)

    train_errors = {}
    for name, mesh_config, overrides in (
        ("kv_heads", sharding.MeshConfig(1, 1, 8), {}),
        ("batch", sharding.MeshConfig(8, 1, 1), {"prompts_per_step": 2, "group_size": 2, "minibatches": 1}),
        ("minibatch", sharding.MeshConfig(2, 4, 1), {"minibatches": 4}),
        ("rollout_mesh", sharding.MeshConfig(1, 8, 1), {"rollout_mesh": "data=4,tensor=4"}),
    ):
        config = train.TrainConfig(**{**CONFIG.to_dict(), "steps": 1, **overrides})
        try:
            train.train(config, student, tiny_run.CONFIG, teacher, prompts, f"{sys.argv[1]}/{name}", progress=False,
                        placement=sharding.Placement(mesh_config), advantage_fn=counting_advantages)
            train_errors[name] = None
        except ValueError as error:
            train_errors[name] = str(error)
    results["train_errors"] = train_errors
    results["folders_written"] = sorted(p.name for p in __import__("pathlib").Path(sys.argv[1]).iterdir())
    results["traced_before_error"] = len(scored)
    print("RESULT " + json.dumps(results))


def _get(state, path):
    for key in path:
        state = state[key]
    return state


def _get_array(state, path):
    return _get(state, path)[...]


if __name__ == "__main__":
    main()
