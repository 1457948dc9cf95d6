"""Pipelined rollouts (TrainConfig.pipeline_rollouts): step k trains on a rollout sampled from the
parameters step k − 1 started with, and the run still resumes bitwise after SIGKILL."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from opd_jax import train
from opd_jax.backends import JaxBackend
from opd_jax.config import TrainConfig

HELPERS = pathlib.Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import faults  # noqa: E402
import tiny_run  # noqa: E402


class RecordingBackend(JaxBackend):
    """The JAX sampler, keeping a host copy of the weights of every rollout it samples."""

    def __init__(self, graphdef):
        super().__init__(graphdef)
        self.sampled_with = []

    def generate(self, prompt_tokens_BxP, prompt_mask_BxP, key, sampling):
        self.sampled_with.append([np.asarray(x) for x in jax.tree.leaves(self.params)])
        return super().generate(prompt_tokens_BxP, prompt_mask_BxP, key, sampling)


def _run(output, steps, backend=None, **overrides):
    student, teacher, prompts = tiny_run.models_and_prompts()
    config = TrainConfig(**(tiny_run.TRAIN | dict(steps=steps, checkpoint_every=steps) | overrides))
    return train.train(config, student, tiny_run.CONFIG, teacher, prompts, output, stop_ids=(3,), progress=False,
                       rollout_backend=backend)


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _same(a, b):
    return all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))


def test_each_step_samples_from_the_parameters_the_previous_step_started_with(tmp_path):
    student, _, _ = tiny_run.models_and_prompts()
    backend = RecordingBackend(nnx.graphdef(student))
    result = _run(tmp_path / "pipelined", 3, backend, pipeline_rollouts=True)
    one_step = _run(tmp_path / "one", 1, pipeline_rollouts=True).student
    on_policy = _run(tmp_path / "on_policy", 3).student
    theta0 = _leaves(student)
    assert len(backend.sampled_with) == 3
    # step 0 and step 1 both sample from θ0 (step 1's rollout was drawn while step 0 updated) ...
    assert _same(backend.sampled_with[0], theta0) and _same(backend.sampled_with[1], theta0)
    # ... step 2 from θ1, the parameters after one step (a 1-step run exports exactly those)
    assert _same(backend.sampled_with[2], _leaves(one_step))
    assert not _same(backend.sampled_with[2], theta0)
    # one step off-policy is another trajectory than the on-policy run
    assert not _same(_leaves(result.student), _leaves(on_policy))
    records = [r for r in result.history if "loss" in r]
    for record in records:
        assert record["sample_seconds"] > 0 and record["score_seconds"] > 0 and record["update_seconds"] > 0
        assert record["step_seconds"] >= record["score_seconds"] + record["update_seconds"]
    # the first rollout cannot be prefetched: the step waits for all of it
    assert records[0]["rollout_wait_seconds"] >= records[0]["sample_seconds"]


def _child(output_dir, steps):
    # The children of one test share a compilation cache: the later ones skip most compiling.
    return subprocess.Popen([sys.executable, str(HELPERS / "tiny_run.py"), str(output_dir), str(steps), "js",
                             "pipelined"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=faults.child_env(output_dir.parent / "jax_cache"))


def test_a_pipelined_run_killed_and_resumed_is_bitwise_the_uninterrupted_one(tmp_path):
    """The checkpoint holds the parameters the next rollout is sampled from, so a resumed run draws
    the rollout the killed one had in flight again."""
    assert _child(tmp_path / "whole", 8).wait(timeout=600) == 0
    faults.kill_after_checkpoint(_child(tmp_path / "killed", 8), tmp_path / "killed", 4)
    assert not (tmp_path / "killed" / "student").exists()
    resumed = _child(tmp_path / "killed", 8)
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming from step" in output
    assert (tmp_path / "killed" / "student" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "student" / "model.safetensors").read_bytes()


def test_changing_pipeline_rollouts_on_resume_is_refused(tmp_path):
    _run(tmp_path, 2, pipeline_rollouts=True)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="pipeline_rollouts"):
        _run(tmp_path, 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_an_unknown_rollout_backend_lists_the_valid_ones(tmp_path, capsys):
    from opd_jax.commands import main

    with pytest.raises(SystemExit):
        main(["train", "--teacher", "t", "--student", "s", "--prompts", "p", "--output", str(tmp_path / "r"),
              "--rollout-backend", "sglang"])
    assert "rollout_backend must be one of jax, vllm; got 'sglang'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
