"""A tiny distillation run, used by tests/test_train.py in a child process (so it can be killed).

Usage: python tiny_run.py OUTPUT_DIR STEPS [DIVERGENCE] [pipelined]

DIVERGENCE defaults to js; ``custom`` trains with ``custom_divergence.triangular`` (a Divergence value
in the config, recorded in config.json as its module:attribute). ``pipelined`` turns on
``pipeline_rollouts``.
"""

import sys

import numpy as np
from flax import nnx

from opd_jax import divergences, models, train

CONFIG = models.DecoderConfig("qwen3", 40, 32, 64, 2, 4, 2, 8, qk_norm=True, max_position_embeddings=64)
TRAIN = dict(divergence="js", prompts_per_step=4, group_size=2, max_new_tokens=8, checkpoint_every=2,
             learning_rate=3e-3, minibatches=2, epochs=2, baseline="leave_one_out")


def models_and_prompts():
    student = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    teacher = models.Decoder(CONFIG, rngs=nnx.Rngs(1))
    teacher.embedding[...] = teacher.embedding[...] * 30  # a teacher far from the student
    rng = np.random.default_rng(0)
    prompts = train.PromptSet(rng.integers(1, 40, size=(20, 6)).astype(np.int32), np.ones((20, 6), bool))
    return student, teacher, prompts


def main(output_dir: str, steps: int, divergence: str = "js", *options: str) -> None:
    student, teacher, prompts = models_and_prompts()
    settings = dict(TRAIN, pipeline_rollouts="pipelined" in options)
    if divergence == "custom":
        import custom_divergence

        settings["divergence"] = divergences.custom(custom_divergence.triangular, name="triangular")
    config = train.TrainConfig(steps=steps, **settings)
    train.train(config, student, CONFIG, teacher, prompts, output_dir, stop_ids=(3,), progress=False)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
