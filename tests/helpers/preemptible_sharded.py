"""One process of a two-process sharded run that a test preempts with a real SIGTERM.

Usage: python preemptible_sharded.py ROOT NUM_PROCESSES PROCESS_ID PORT first|resume
(JAX_NUM_CPU_DEVICES = devices per process)

``first``: trains ROOT/reference to the end, then starts ROOT/preempted, where the test sends
SIGTERM to one process; every process must then stop after the same step and exit with
EXIT_RESUMABLE. ``resume``: runs ROOT/preempted again to the end (exit 0). Both export the student
(process 0), so the test compares the two exports byte for byte.
"""

import pathlib
import sys

STEPS = 20


def main(root: str, num_processes: int, process_id: int, port: int, mode: str) -> int:
    from opd_jax.commands.flags import initialize_distributed

    initialize_distributed(f"localhost:{port}", num_processes, process_id)
    import jax

    from opd_jax import preemption, sharding, train

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import tiny_run

    assert jax.process_count() == num_processes
    config = train.TrainConfig(
        steps=STEPS, **{**tiny_run.TRAIN, "prompts_per_step": 4, "group_size": 2, "minibatches": 1, "epochs": 1,
                        "checkpoint_every": 5}
    )
    mesh = sharding.MeshConfig(2, 2, 2)
    root = pathlib.Path(root)
    runs = ["reference", "preempted"] if mode == "first" else ["preempted"]
    for name in runs:
        student, teacher, prompts = tiny_run.models_and_prompts()
        try:
            train.train(config, student, tiny_run.CONFIG, teacher, prompts, root / name, stop_ids=(3,),
                        progress=False, placement=sharding.Placement(mesh))
        except train.Preempted as stopped:
            print(f"process {process_id}: {stopped}", file=sys.stderr, flush=True)
            return preemption.EXIT_RESUMABLE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
