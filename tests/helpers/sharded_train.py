"""A sharded tiny distillation run, one process of a (possibly multi-process) JAX program.

Run by tests/test_sharding.py: once as a single process over 8 CPU devices, and as 2 processes × 4
CPU devices joined by ``jax.distributed.initialize`` on localhost (gloo CPU collectives). It trains
a few steps on a 2×2×2 mesh with a checkpoint every step, then calls ``train`` again on the same
folder, which restores the last checkpoint across the processes and exports it. Process 0 writes
``result.npz`` (losses, trace count, the exported and the restored parameters; for one process
also those of the same run on one device without a mesh).

Usage: python sharded_train.py OUTPUT_DIR NUM_PROCESSES PROCESS_ID PORT
(set JAX_NUM_CPU_DEVICES to the devices per process first)
"""

import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

STEPS = 3


def main(output_dir: str, num_processes: int, process_id: int, port: int) -> None:
    from opd_jax.commands.flags import initialize_distributed

    initialize_distributed(f"localhost:{port}" if num_processes > 1 else None, num_processes, process_id)
    from opd_jax import sharding, step, train

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import tiny_run

    assert jax.device_count() == 8 and jax.process_count() == num_processes
    student, teacher, prompts = tiny_run.models_and_prompts()
    config = train.TrainConfig(
        steps=STEPS, **{**tiny_run.TRAIN, "prompts_per_step": 8, "group_size": 2, "checkpoint_every": 1}
    )
    mesh = sharding.MeshConfig(2, 2, 2)

    traces = []  # traces of the update = traces of its loss
    surrogate = step.config_loss_fn(config)

    def counting_loss(*args):
        traces.append(1)
        return surrogate(*args)

    result = train.train(config, student, tiny_run.CONFIG, teacher, prompts, output_dir, stop_ids=(3,),
                         progress=False, placement=sharding.Placement(mesh), loss_fn=counting_loss)
    trained = nnx.to_pure_dict(nnx.state(result.student))
    # A second call finds the run finished: it restores the last checkpoint (sharded, across the
    # processes) and exports it without training.
    fresh_student, fresh_teacher, _ = tiny_run.models_and_prompts()
    again = train.train(config, fresh_student, tiny_run.CONFIG, fresh_teacher, prompts, output_dir, stop_ids=(3,),
                        progress=False, placement=sharding.Placement(mesh))
    restored = nnx.to_pure_dict(nnx.state(again.student))
    reference = {}
    if num_processes == 1:  # the same run on one device, without a mesh
        plain_student, plain_teacher, _ = tiny_run.models_and_prompts()
        plain = train.train(config, plain_student, tiny_run.CONFIG, plain_teacher, prompts,
                            pathlib.Path(output_dir) / "unsharded", stop_ids=(3,), progress=False)
        reference = {f"reference/{sharding.path_name(p)}": np.asarray(x)
                     for p, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(plain.student)))[0]}
        plain_history = [r for r in plain.history if "loss" in r]
        reference["reference_losses"] = np.array([r["loss"] for r in plain_history])
        reference["reference_teacher_kl"] = np.array([r["teacher_kl"] for r in plain_history])
    if jax.process_index() == 0:
        flat = {f"trained/{sharding.path_name(p)}": np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(trained)[0]}
        flat.update({f"restored/{sharding.path_name(p)}": np.asarray(x)
                     for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]})
        history = [r for r in result.history if "loss" in r]
        np.savez(pathlib.Path(output_dir) / "result.npz", **flat, **reference,
                 losses=np.array([r["loss"] for r in history]),
                 teacher_kl=np.array([r["teacher_kl"] for r in history]),
                 traces=np.array(len(traces)))
        (pathlib.Path(output_dir) / "done.json").write_text(json.dumps({"steps": len(history)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
