"""Plan and train build the same step: run by tests/test_plan.py in a child process on 8 CPU devices.

For each case, two Hugging Face folders are written; ``opd-jax plan``'s path
(:func:`opd_jax.plan.compile_programs` on ``cpu:8``, models read from config.json only) and
``opd-jax train``'s path (:func:`opd_jax.models.from_pretrained`, the auto chunk resolved as
:func:`opd_jax.train.train` does, then its ``_setup``) each build the step's jitted programs. Each
of train's programs is lowered on the arguments the plan compiled its own for, and the two lowered
HLO texts are compared. Prints one JSON object ``{case: {program: {"equal": bool, "lines": n, ...}}}``
and ``"control"``: whether a train step with another ``full_vocab_weight`` lowers to the planned
update (it must not).

Usage: JAX_NUM_CPU_DEVICES=8 python plan_train_hlo.py SCRATCH_DIR
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax import models, plan, sharding, train
from opd_jax.backends import JaxBackend
from opd_jax.models.presets import resolve_model
from opd_jax.sampling import SamplingConfig

CONFIG = models.DecoderConfig("qwen3", 512, 64, 128, 2, 4, 2, 16, qk_norm=True, max_position_embeddings=64,
                              eos_token_id=(1,))
PROMPT_LENGTH = 8
EXECUTION = dict(attention="xla", remat="full", param_dtype="float32", compute_dtype="float32",
                 teacher_dtype="float32")
BATCH = dict(prompts_per_step=4, group_size=2, minibatches=2, max_new_tokens=8)
# (training options, mesh, teacher mesh): the full-vocabulary term reads the teacher in the update;
# a teacher on its own devices scores in a program of its own.
CASES = {
    "full_vocab": (dict(divergence="js", full_vocab_weight=0.1, baseline="leave_one_out"), (1, 4, 2), None),
    "teacher_mesh": (dict(divergence="forward_kl", level="sequence"), (1, 2, 2), (1, 4, 1)),
}


def planned(config: train.TrainConfig, folders: dict, mesh, teacher_mesh) -> plan.CompiledPlan:
    programs = ("score", "update") if teacher_mesh is None else ("teacher", "score", "update")
    return plan.compile_programs(plan.PlanConfig(
        student=resolve_model(folders["student"]), teacher=resolve_model(folders["teacher"]), train=config,
        topology="cpu:8", prompt_length=PROMPT_LENGTH, execution=models.Execution(**EXECUTION),
        placement=sharding.Placement(mesh, teacher_mesh)),
        programs=programs)


def trained(config: train.TrainConfig, folders: dict, mesh, teacher_mesh) -> dict:
    """The jitted programs of the step ``train`` builds for these folders, by program name."""
    dtype = jnp.float32
    student, _ = models.from_pretrained(folders["student"], dtype, compute_dtype=dtype, attention="xla",
                                        remat="full")
    teacher, _ = models.from_pretrained(folders["teacher"], dtype, compute_dtype=dtype, attention="xla")
    prompts = train.PromptSet(np.ones((8, PROMPT_LENGTH), np.int32), np.ones((8, PROMPT_LENGTH), bool))
    placement = sharding.Placement(mesh, teacher_mesh)
    config = train.resolve_logit_chunks(config, CONFIG.vocab_size, PROMPT_LENGTH, placement)
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature, stop_ids=(1,))
    run, _ = train._setup(config, (student, teacher, None), prompts, sampling, JaxBackend(nnx.graphdef(student)),
                          placement)
    step = run.step_fn
    if teacher_mesh is None:
        return {"score": step.prepare, "update": step.update}
    return {"teacher": step.score_teacher, "score": step.prepare_scored, "update": step.update}


def main(scratch: str) -> None:
    folders = {}
    for seed, role in enumerate(("student", "teacher")):
        folders[role] = pathlib.Path(scratch) / role
        models.save_pretrained(models.Decoder(CONFIG, rngs=nnx.Rngs(seed)), CONFIG, folders[role])
    results = {}
    for case, (options, mesh, teacher_mesh) in CASES.items():
        mesh = sharding.MeshConfig(*mesh)
        teacher_mesh = None if teacher_mesh is None else sharding.MeshConfig(*teacher_mesh)
        config = train.TrainConfig(**BATCH, **options)
        compiled = planned(config, folders, mesh, teacher_mesh)
        results[case] = {}
        for name, jitted in trained(config, folders, mesh, teacher_mesh).items():
            with jax.enable_x64(False), jax.set_mesh(compiled.meshes[name]):
                ours = jitted.trace(*compiled.arguments[name]).lower().as_text()
                theirs = compiled.traced[name].lower().as_text()
            results[case][name] = {"equal": ours == theirs, "lines": theirs.count("\n"),
                                   "programs": sorted(compiled.step_programs)}
    # The control: train with another weight of the full-vocabulary term builds another update.
    options, mesh, _ = CASES["full_vocab"]
    mesh = sharding.MeshConfig(*mesh)
    compiled = planned(train.TrainConfig(**BATCH, **options), folders, mesh, None)
    other = trained(train.TrainConfig(**BATCH, **{**options, "full_vocab_weight": 0.2}), folders, mesh, None)
    with jax.enable_x64(False), jax.set_mesh(compiled.meshes["update"]):
        results["control"] = (other["update"].trace(*compiled.arguments["update"]).lower().as_text()
                              == compiled.traced["update"].lower().as_text())
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
