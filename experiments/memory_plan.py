"""Per-device memory of a Qwen3-8B student + Qwen3-8B teacher distillation under opd_jax's partition rules.

Parameters, gradients, AdamW moments and the teacher come from the real partition rules applied to
``jax.eval_shape`` of the model and of ``optax.adamw(...).init`` (nothing is allocated): each leaf's
per-device shard shape is ``NamedSharding.shard_shape`` on a mesh of virtual CPU devices. Activations
are an estimate (see :func:`activation_bytes`) for one minibatch of the update step, which is the
peak of a step: the rollout and the teacher scoring hold one layer's activations at a time.

Usage: python experiments/memory_plan.py [--sequence-length 1024] [--rows-per-device 1] [--calibrate]
Prints a Markdown table (GiB = 2**30 bytes per device).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os

# Virtual devices for the meshes below; must be set before jax initialises.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from opd_jax import sharding  # noqa: E402
from opd_jax.models import Decoder, DecoderConfig  # noqa: E402

# Qwen3-8B (config.json of Qwen/Qwen3-8B): untied embeddings, q/k norm.
QWEN3_8B = DecoderConfig(
    "qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
    num_kv_heads=8, head_dim=128, max_position_embeddings=40960,
)


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str
    mesh: sharding.MeshConfig
    device_gib: float


PLATFORMS = (
    Platform("TPU v5p-32 (16 chips, 95 GiB HBM)", sharding.MeshConfig(1, 8, 2), 95.0),
    Platform("TPU v5p-32 (16 chips, 95 GiB HBM)", sharding.MeshConfig(1, 16, 1), 95.0),
    Platform("8× H100 80 GB (one host)", sharding.MeshConfig(1, 4, 2), 80.0 * 1e9 / 2**30),
    Platform("8× H100 80 GB (one host)", sharding.MeshConfig(1, 8, 1), 80.0 * 1e9 / 2**30),
)

GIB = 2**30


def per_device_bytes(abstract_tree, mesh) -> int:
    """Bytes on the most loaded device: sum over leaves of shard size × itemsize under the rules."""
    shardings = sharding.state_shardings(abstract_tree, mesh)
    leaves = jax.tree.leaves(abstract_tree)
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True))


# Calibration against XLA's own memory analysis of the compiled update (see --calibrate): the named
# per-token tensors below account for ~1/1.4 of what XLA keeps (float32 casts of the norms, RoPE's
# halves, ...), and XLA holds ~3.7 float32 copies of the [N, L] attention weights per query
# (scores, masked scores, probabilities, their gradient).
NAMED_FACTOR = 1.4
ATTENTION_COPIES = 3.7


def activation_bytes(config: DecoderConfig, mesh: sharding.MeshConfig, *, minibatch: int, length: int,
                     itemsize: int = 4, logit_chunk: int = 1024) -> int:
    """Activations kept for the backward pass of one minibatch, per device (estimate).

    Per layer and token the update keeps (elements): the residual stream and the two norm inputs and
    outputs (~6 D), q/k/v before and after q/k-norm and RoPE (~(3N + 4K) H), the attention output
    (N H) and the MLP's gate, up, SiLU(gate) and product (4 F), all × ``NAMED_FACTOR``; and
    ``ATTENTION_COPIES`` × N × L attention weights per query (``jax.nn.dot_product_attention``'s XLA
    path materialises ``[B, N, L, L]``). Head and width terms are split over ``tensor``, rows over
    ``data × fsdp``. The layers are not rematerialised, so all of them are held; the vocabulary
    projection is chunked (``logit_chunk`` rows of V/tensor float32 logits, ×3 for softmax and
    gradient).
    """
    t = mesh.tensor
    rows = minibatch // (mesh.data * mesh.fsdp)
    tokens = rows * length
    d, n, k, h, f = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                     config.intermediate_size)
    named = 6 * d + (3 * n + 4 * k) * h / t + n * h / t + 4 * f / t
    per_token_layer = NAMED_FACTOR * named + ATTENTION_COPIES * n * length / t
    logits = 3 * logit_chunk * config.vocab_size / t * 4
    return int(tokens * per_token_layer * config.num_layers * itemsize + logits)


def calibrate() -> None:
    """Compare :func:`activation_bytes` with XLA's temp bytes of the compiled update (one device).

    A reduced 4-layer model at three minibatch shapes; XLA's figure also holds the gradients and
    AdamW's temporaries, which the estimate leaves to the other columns (small at this size).
    """
    from opd_jax import train

    config = DecoderConfig("qwen3", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=4,
                           num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=4096)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    print("| rows × L | XLA temp MiB | estimate MiB |\n|---|---:|---:|")
    for rows, length in ((4, 256), (4, 512), (8, 512), (4, 1024)):
        train_config = train.TrainConfig(prompts_per_step=rows, group_size=1, logit_chunk_size=1024)
        optimizer = train._make_optimizer(train_config)
        update = train.make_train_step(train_config, graphdef, graphdef, optimizer).update
        tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        mask = jax.ShapeDtypeStruct((rows, length), bool)
        values = jax.ShapeDtypeStruct((rows, length), jnp.float32)
        compiled = update.lower(params, jax.eval_shape(optimizer.init, params), tokens, mask, mask, values, values,
                                jax.ShapeDtypeStruct((), jnp.float32)).compile()
        estimate = activation_bytes(config, sharding.MeshConfig(), minibatch=rows, length=length)
        print(f"| {rows} × {length} | {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} | "
              f"{estimate / 2**20:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequence-length", type=int, default=1024, help="prompt + response slots L")
    parser.add_argument("--rows-per-device", type=int, default=1,
                        help="sequences of an update minibatch per data × fsdp shard (minibatch = this × data × fsdp)")
    parser.add_argument("--calibrate", action="store_true",
                        help="compare the activation estimate with XLA's compiled memory analysis and exit")
    args = parser.parse_args()
    if args.calibrate:
        calibrate()
        return

    student = nnx.eval_shape(lambda: Decoder(QWEN3_8B, rngs=nnx.Rngs(0), param_dtype=jnp.float32))
    teacher = nnx.eval_shape(lambda: Decoder(QWEN3_8B, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    student_params, teacher_params = nnx.state(student), nnx.state(teacher)
    adam = jax.eval_shape(optax.adamw(1e-6).init, student_params)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(student_params))

    print(f"Qwen3-8B: {count / 1e9:.2f} B parameters; student float32 + AdamW (float32 moments), teacher "
          f"bfloat16; update minibatch of {args.rows_per_device} sequence(s) × {args.sequence_length} tokens per "
          "data × fsdp shard, float32 activations.\n")
    print("| platform | mesh data×fsdp×tensor | minibatch | student params | grads | AdamW μ+ν | teacher params | "
          "activations | total | of device |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for platform in PLATFORMS:
        mesh = platform.mesh.make_mesh(jax.devices()[: platform.mesh.size])
        minibatch = args.rows_per_device * platform.mesh.data * platform.mesh.fsdp
        params = per_device_bytes(student_params, mesh)
        moments = per_device_bytes(adam, mesh)
        teacher_bytes = per_device_bytes(teacher_params, mesh)
        activations = activation_bytes(QWEN3_8B, platform.mesh, minibatch=minibatch,
                                       length=args.sequence_length)
        total = 2 * params + moments + teacher_bytes + activations  # grads are the size of the params
        m = platform.mesh
        print(f"| {platform.name} | {m.data}×{m.fsdp}×{m.tensor} | {minibatch} | {params / GIB:.2f} | {params / GIB:.2f} | "
              f"{moments / GIB:.2f} | {teacher_bytes / GIB:.2f} | {activations / GIB:.2f} | {total / GIB:.2f} | "
              f"{100 * total / GIB / platform.device_gib:.0f}% |")


if __name__ == "__main__":
    main()
