"""Rollouts on inference layouts vs one device, on 8 CPU devices; run by tests/test_rollout_layout.py.

The student is placed on a training mesh (fsdp 8, as a sharded run places it), resharded onto each
inference layout by the program the loop runs (:func:`opd_jax.rollout_layout.make_reshard`), and
sampled by :func:`opd_jax.rollout_layout.replica_sampler`; the single-device :func:`generate` of the
same prompts and key is the reference. Prints one ``RESULT`` JSON line.

Usage: JAX_NUM_CPU_DEVICES=8 python rollout_layouts.py
"""

import dataclasses
import json

import jax
import numpy as np
from flax import nnx

from opd_jax import models, rollout_layout, sampling, sharding

CONFIG = models.DecoderConfig(
    "qwen3", vocab_size=80, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=12, qk_norm=True, max_position_embeddings=64,
)
ROWS = 32
# Eight stop ids of 80: responses of ~10 tokens, a few running to the 40-token cap.
SAMPLING = sampling.SamplingConfig(max_new_tokens=40, stop_ids=tuple(range(1, 9)))


def main():
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    model.embedding[...] = model.embedding[...] * 40  # sharp distributions, far from uniform
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 7, ROWS)
    mask = np.arange(6)[None, :] >= 6 - lengths[:, None]  # ragged, left-padded prompts
    tokens = np.where(mask, rng.integers(9, 80, (ROWS, 6)), 0).astype(np.int32)
    key = jax.random.key(3)
    reference = sampling.generate(model, tokens, mask, key, SAMPLING)
    training_mesh = sharding.MeshConfig(fsdp=8).make_mesh()
    training = sharding.state_shardings(params, training_mesh)
    batch, replicated = sharding.batch_sharding(training_mesh), jax.sharding.NamedSharding(
        training_mesh, jax.sharding.PartitionSpec())
    placed = (sharding.place(params, training), *jax.device_put((tokens, mask, key), (batch, batch, replicated)))
    results = {}
    for layout, slots in (((8, 1), None), ((4, 2), None), ((4, 2), 2), ((2, 4), 3)):
        layout = rollout_layout.RolloutLayout(*layout)
        if CONFIG.num_heads % layout.tensor or CONFIG.num_kv_heads % layout.tensor:
            continue
        target = rollout_layout.rollout_shardings(layout, training_mesh, params)
        reshard = rollout_layout.make_reshard(
            rollout_layout.RolloutShardings(training_mesh, training, batch, replicated), target)
        moved = reshard(*placed)
        config = dataclasses.replace(SAMPLING, slots=slots)
        out = rollout_layout.replica_sampler(graphdef, target, config)(*moved)
        q = moved[0]["layers"]["attention"]["q"][...]
        results[f"{layout} slots={slots}"] = {
            "rows_equal": float(np.mean(np.all(np.asarray(out.tokens) == np.asarray(reference.tokens), axis=1))),
            "masks_equal": bool(np.array_equal(out.token_mask, reference.token_mask)),
            "logp_error": float(np.max(np.abs(np.asarray(out.sampling_logp) - np.asarray(reference.sampling_logp)))),
            "params_equal": all(bool(np.array_equal(a, b)) for a, b in zip(jax.tree.leaves(moved[0]),
                                                                          jax.tree.leaves(params))),
            "q_shard_shape": list(q.sharding.shard_shape(q.shape)),
            "q_shape": list(q.shape),
            "out_mesh": dict(out.tokens.sharding.mesh.shape),
        }
    results["mean_response_length"] = float(np.asarray(reference.response_mask).sum(1).mean())
    results["longest_response"] = int(np.asarray(reference.response_mask).sum(1).max())
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
