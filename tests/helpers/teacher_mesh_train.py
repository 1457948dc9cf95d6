"""Tiny runs with the teacher on its own mesh, against the same runs on one device.

Run by tests/test_teacher_mesh.py in a child process with 8 CPU devices. The student's mesh is
fsdp=4 over devices 0-3, the teacher's is fsdp=2 × tensor=2 over devices 4-7. Each case trains
three steps with and without the split (one teacher, pipelined rollouts, two routed teachers, and
two routed teachers with tokenizers of their own under ``tokenizer_alignment = "text"``, pipelined) and
the records and trained parameters of both, with the initial parameters, go to ``result.npz``; where the parameters of a split
run lie goes to ``placement.json``, and the messages of refused settings to ``errors.json``.

Usage: python teacher_mesh_train.py OUTPUT_DIR
"""

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from opd_jax import models, sharding, step, train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tiny_run  # noqa: E402

STUDENT_MESH = sharding.MeshConfig(1, 4, 1)
TEACHER_MESH = sharding.MeshConfig(1, 2, 2)
SETTINGS = dict(tiny_run.TRAIN, steps=3, prompts_per_step=8, group_size=2, checkpoint_every=3)


def _two_teachers():
    teachers = {}
    for name, scale in (("near", 30), ("far", -30)):
        teacher = models.Decoder(tiny_run.CONFIG, rngs=nnx.Rngs(1 if name == "near" else 7))
        teacher.embedding[...] = teacher.embedding[...] * scale
        teachers[name] = teacher
    return teachers


def _cross_tokenizer_case():
    """Two teachers that read the student's text with their own tokenizers: one reads digit pairs,
    the other is character-level like the student; the student's 40 ids are its characters."""
    from opd_jax.retokenize import TeacherReader
    from opd_jax.tasks import arithmetic, characters
    from opd_jax.teacher_bytes import vocabulary_bytes
    from opd_jax.tokenization import encode_prompts

    alphabet = "0123456789+-=,> abcdefghijklmnopqrstuvwxyz"[: tiny_run.CONFIG.vocab_size - len(characters.SPECIAL_TOKENS)]
    student_tokenizer = characters.build_tokenizer(alphabet)
    tokenizers = {"pairs": arithmetic.build_digit_pair_tokenizer(alphabet), "chars": student_tokenizer}
    teachers = {}
    for seed, (name, tokenizer) in enumerate(tokenizers.items()):
        config = dataclasses.replace(tiny_run.CONFIG, vocab_size=len(tokenizer))
        teachers[name] = models.Decoder(config, rngs=nnx.Rngs(seed + 1))
        teachers[name].embedding[...] = teachers[name].embedding[...] * 30
    rng = np.random.default_rng(0)
    texts = [f"{a}+{b}=" for a, b in rng.integers(10, 100, size=(20, 2))]
    encoded = [encode_prompts(tokenizer, texts, max_length=8, use_chat_template=False, pad_id=0)
               for tokenizer in tokenizers.values()]
    reader = TeacherReader(student_tokenizer, tuple(tokenizers), tuple(tokenizers.values()),
                           tuple(tokens for tokens, _ in encoded), tuple(mask for _, mask in encoded),
                           (tiny_run.CONFIG.max_position_embeddings,) * 2, (student_tokenizer.eos_token_id,),
                           vocabularies=tuple(vocabulary_bytes(t, len(t)) for t in tokenizers.values()))
    tokens, mask = encoded[1]
    prompts = train.PromptSet(tokens, mask, np.arange(len(texts)) % 2, teacher_text=reader)
    return teachers, prompts, (student_tokenizer.eos_token_id,)


def _run(output: pathlib.Path, case: str, split: bool) -> dict[str, np.ndarray]:
    student, teacher, prompts = tiny_run.models_and_prompts()
    stop_ids = (3,)
    config = train.TrainConfig(**SETTINGS, pipeline_rollouts=case in ("pipelined", "cross"),
                               tokenizer_alignment="text" if case == "cross" else "same")
    if case == "routed":
        teacher = _two_teachers()
        prompts = train.PromptSet(prompts.tokens, prompts.mask, np.arange(len(prompts.tokens)) % 2)
    if case == "cross":
        teacher, prompts, stop_ids = _cross_tokenizer_case()
    placement = sharding.Placement(STUDENT_MESH, TEACHER_MESH) if split else sharding.Placement()
    result = train.train(config, student, tiny_run.CONFIG, teacher, prompts, output / f"{case}-{split}",
                         stop_ids=stop_ids, progress=False, placement=placement)
    records = [r for r in result.history if "loss" in r]
    names = {"routed": ("near", "far"), "cross": ("pairs", "chars")}.get(case, ())
    keys = ("loss", "teacher_kl", "advantage_mean", "response_length") + tuple(
        f"{metric}/{name}" for metric in ("teacher_kl", "rows") for name in names)
    arrays = {f"{case}/{split}/{key}": np.array([r[key] for r in records]) for key in keys}
    arrays[f"{case}/{split}/has_teacher_seconds"] = np.array(["teacher_seconds" in r for r in records])
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(result.student)))[0]
    arrays |= {f"{case}/{split}/params/{sharding.path_name(p)}": np.asarray(x) for p, x in flat}
    return arrays


def _placement() -> dict:
    """The devices of the student's and the teacher's parameters after the loop places them."""
    student, teacher, _ = tiny_run.models_and_prompts()
    config = train.TrainConfig(**SETTINGS)
    params, teacher_params = nnx.state(student), nnx.state(teacher)
    state = {"params": params, "step": np.int32(0), "key": jax.random.key_data(jax.random.key(0)),
             "data_position": np.int32(0)}
    shardings, placed, teacher_placed, _ = train._place_on_mesh(
        config, sharding.Placement(STUDENT_MESH, TEACHER_MESH), state, teacher_params, None,
        step.make_optimizer(config))

    def device_ids(tree):
        return sorted({d.id for leaf in jax.tree.leaves(tree) for d in leaf.devices()})

    return {"student": device_ids(placed["params"]), "optimizer": device_ids(placed["opt_state"]),
            "teacher": device_ids(teacher_placed), "teacher_batch": sorted(d.id for d in shardings.teacher_batch.device_set),
            "batch": sorted(d.id for d in shardings.batch.device_set),
            "teacher_q_spec": str(jax.tree.leaves(teacher_placed.layers.attention.q)[0].sharding.spec)}


def _errors(output: pathlib.Path) -> dict[str, str]:
    """The messages of refused settings (each run's folder must not be created)."""
    student, teacher, prompts = tiny_run.models_and_prompts()
    config = train.TrainConfig(**SETTINGS)
    cases = {
        "sizes": (config, sharding.Placement(STUDENT_MESH, sharding.MeshConfig(1, 2, 1))),
        "no_mesh": (config, sharding.Placement(teacher_mesh=TEACHER_MESH)),
        "full_vocab": (train.TrainConfig(**SETTINGS, full_vocab_weight=0.1),
                       sharding.Placement(STUDENT_MESH, TEACHER_MESH)),
    }
    errors = {}
    for name, (case_config, placement) in cases.items():
        try:
            train.train(case_config, student, tiny_run.CONFIG, teacher, prompts, output / f"refused-{name}",
                        progress=False, placement=placement)
        except ValueError as error:
            errors[name] = str(error)
        errors[f"{name}_wrote"] = (output / f"refused-{name}").exists()
    return errors


def main(output_dir: str) -> None:
    output = pathlib.Path(output_dir)
    assert jax.device_count() == 8
    initial = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(tiny_run.models_and_prompts()[0])))[0]
    arrays = {f"initial/params/{sharding.path_name(p)}": np.asarray(x) for p, x in initial}
    for case in ("single", "pipelined", "routed", "cross"):
        for split in (False, True):
            arrays |= _run(output, case, split)
    np.savez(output / "result.npz", **arrays)
    (output / "placement.json").write_text(json.dumps(_placement()))
    (output / "errors.json").write_text(json.dumps(_errors(output)))


if __name__ == "__main__":
    main(sys.argv[1])
