"""The sharded train step with each attention kernel on 8 CPU devices against the single-device ``xla`` step.

Splash runs in Pallas interpret mode inside ``shard_map`` (batch over data × fsdp, heads over
tensor), as it would on a TPU mesh. Run by tests/test_model_execution.py in a child process; prints
one JSON object of relative errors.

Usage: JAX_NUM_CPU_DEVICES=8 python sharded_attention.py
"""

import json
import sys

import jax
from flax import nnx

from opd_jax import models, sharding, step
from opd_jax.sampling import SamplingConfig, generate

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import sharded_step  # noqa: E402
import tiny_run  # noqa: E402

ATTENTIONS = {"xla": "xla", "chunked": models.AttentionConfig("chunked", block_size=4),
              "splash": models.AttentionConfig("splash", interpret=True)}


def graphdef_with(attention) -> nnx.GraphDef:
    """The decoder's graph with another attention kernel (the parameters are the same)."""
    return nnx.split(nnx.eval_shape(lambda: models.Decoder(tiny_run.CONFIG, rngs=nnx.Rngs(0), attention=attention)))[0]


def step_on(mesh_config, attention, params, teacher_params, rollout, optimizer):
    """Losses, final params and prepared arrays of one step with ``attention`` (``mesh_config`` None: one device)."""
    graphdef = graphdef_with(attention)
    if mesh_config is None:
        step_fn = step.make_train_step(sharded_step.CONFIG, graphdef, graphdef, optimizer)
        return sharded_step.run_step(step_fn, params, optimizer.init(params), teacher_params, rollout)
    mesh = mesh_config.make_mesh()
    placed, teacher_placed, opt_state, shardings = sharded_step.place_on(mesh, params, teacher_params, optimizer)
    step_fn = step.make_train_step(sharded_step.CONFIG, graphdef, graphdef, optimizer, shardings)
    with jax.set_mesh(mesh):
        return sharded_step.run_step(step_fn, placed, opt_state, teacher_placed, jax.device_put(rollout, shardings.batch),
                                     place=lambda x: jax.device_put(x, shardings.replicated))


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    student, teacher, prompts = tiny_run.models_and_prompts()
    params, teacher_params = nnx.state(student), nnx.state(teacher)
    tokens, mask = prompts.batch(0, 16, seed=0)
    rollout = generate(student, tokens, mask, jax.random.key(0), SamplingConfig(8, stop_ids=(3,)))
    optimizer = step.make_optimizer(sharded_step.CONFIG)
    ref_losses, ref_params, ref_prepared = step_on(None, "xla", params, teacher_params, rollout, optimizer)
    results = {}
    for name, attention in ATTENTIONS.items():
        losses, new_params, prepared = step_on(sharding.MeshConfig(2, 2, 2), attention, params, teacher_params,
                                               rollout, optimizer)
        results[name] = {
            "prepared_errors": [sharded_step.relative(a, b) for a, b in zip(prepared, ref_prepared)],
            "loss_errors": [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)],
            "param_error_max": max(jax.tree.leaves(jax.tree.map(
                sharded_step.relative, nnx.to_pure_dict(new_params), nnx.to_pure_dict(ref_params)))),
        }
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
