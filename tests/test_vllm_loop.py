"""Training with the vLLM rollout backend: the loop, a real weight-sync failure, the CLI's checks, the toy demo.

Skipped without ``.venv-vllm`` (``OPD_VLLM=1 .ci/bootstrap``), failed instead under
``OPD_REQUIRE_VLLM=1`` (CI).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from opd_jax import train
from opd_jax.backends import WeightSyncError
from opd_jax.backends.vllm import BOOTSTRAP_COMMAND, VllmBackend
from opd_jax.commands import main
from opd_jax.config import TrainConfig
from test_vllm_backend import CONFIG, _require_vllm, make_student

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
from hf_fixtures import make_qwen3_folder  # noqa: E402

SETTINGS = dict(prompts_per_step=4, group_size=2, max_new_tokens=8, learning_rate=1e-2, checkpoint_every=2)


@pytest.fixture(autouse=True)
def _vllm():
    _require_vllm()


def _prompts():
    rng = np.random.default_rng(0)
    return train.PromptSet(rng.integers(3, 256, (16, 6)).astype(np.int32), np.ones((16, 6), bool))


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


class _Answers:
    """Half of the vocabulary ends a turn; each of the first two such turns of an episode is answered."""

    turn_stop_ids = tuple(range(3, 130))
    episode_stop_ids = ()

    def __init__(self):
        self.answered = 0

    def respond(self, turn_T, context_C):
        if int(np.sum(context_C == 1)) >= 2:
            return None
        self.answered += 1
        return [1]


def test_training_samples_with_the_synced_weights(tmp_path):
    """The engine's log-probs stay the trainer's at every step: a stale engine (sync not taken) would
    sample from the step-0 weights, and with learning rate 1e-2 its log-probs would drift far more.
    The episodes are multi-turn (a MultiTurn rollout_fn): the loop runs them on the engine's turns."""
    from opd_jax import rollouts

    student, teacher = make_student(0), make_student(1)
    initial = _leaves(student)
    environment = _Answers()
    config = TrainConfig(steps=4, rollout_backend="vllm", **dict(SETTINGS, max_new_tokens=12))
    result = train.train(config, student, CONFIG, teacher, _prompts(), tmp_path / "run", stop_ids=(2,),
                         progress=False, rollout_fn=rollouts.MultiTurn(environment))
    records = [r for r in result.history if "loss" in r]
    assert len(records) == 4 and environment.answered > 8
    for record in records:
        assert record["sampling_logp_gap"] < 1e-4, record
        assert record["sync_seconds"] > 0 and record["sample_seconds"] > 0
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(initial, _leaves(result.student)))
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


class _KilledAtSync(VllmBackend):
    """Sends SIGKILL to the real worker just before the ``fatal``-th weight sync."""

    def __init__(self, *args, fatal: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fatal, self.syncs = fatal, 0

    def sync_weights(self, params):
        self.syncs += 1
        if self.syncs == self.fatal:
            os.kill(self.pid, signal.SIGKILL)
        super().sync_weights(params)


def test_a_worker_killed_at_a_weight_sync_stops_the_run_with_the_step_and_keeps_the_checkpoint(tmp_path):
    student, teacher = make_student(0), make_student(1)
    config = TrainConfig(steps=4, **SETTINGS)
    backend = _KilledAtSync(CONFIG, student, fatal=4)
    try:
        with pytest.raises(WeightSyncError, match=r"step 4: sending the student's weights to the vllm rollout "
                                                  r"backend failed .*SIGKILL") as error:
            train.train(config, student, CONFIG, teacher, _prompts(), tmp_path, stop_ids=(2,), progress=False,
                        rollout_backend=backend)
    finally:
        backend.close()
    assert error.value.step == 4
    assert not (tmp_path / "student").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    # the checkpoint is good: the run resumes from it (here with the JAX sampler) and finishes
    resumed = train.train(config, make_student(0), CONFIG, teacher, _prompts(), tmp_path, stop_ids=(2,),
                          progress=False)
    assert [r["step"] for r in resumed.history if "loss" in r] == [1, 2, 3, 4]


def test_cli_names_the_bootstrap_command_for_a_missing_vllm_environment(tmp_path, monkeypatch, capsys):
    model = make_qwen3_folder(tmp_path / "model", seed=0, layers=1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "add the numbers"}) + "\n")
    monkeypatch.setenv("OPD_VLLM_PYTHON", str(tmp_path / "no-such-env" / "bin" / "python"))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--teacher", str(model), "--student", str(model), "--prompts", str(prompts),
              "--output", str(tmp_path / "run"), "--rollout-backend", "vllm", "--quiet"])
    assert exit_info.value.code == 2
    assert BOOTSTRAP_COMMAND in capsys.readouterr().err
    assert not (tmp_path / "run").exists()



def test_the_toy_demo_runs_end_to_end_on_the_vllm_backend(tmp_path, capsys):
    """`opd-jax demo --task arithmetic_vllm`: the shipped head-size-32 models, rollouts from vLLM."""
    output = tmp_path / "demo"
    assert main(["demo", "--task", "arithmetic_vllm", "--steps", "3", "--divergence", "js", "--estimator",
                 "opd_plus", "--eval-problems", "16", "--output", str(output), "--quiet"]) == 0
    (run,) = [p for p in output.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    assert json.loads((run / "config.json").read_text())["rollout"]["rollout_backend"] == "vllm"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 3 and all(r["sampling_logp_gap"] < 1e-4 for r in trained)
    assert "eval_accuracy" in records[-1]


def test_eval_with_the_vllm_backend_agrees_with_the_jax_sampler_greedy(tmp_path):
    """`opd-jax eval --dataset ... --rollout-backend vllm`: greedy responses, so both backends must
    give the same responses and therefore the same numbers."""
    from test_evaluation import GSM8K_STYLE, _write_jsonl

    model = make_qwen3_folder(tmp_path / "model", seed=0, layers=1, hidden=128, max_position_embeddings=256)
    dataset = _write_jsonl(tmp_path / "gsm8k_style.jsonl", GSM8K_STYLE)
    summaries = {}
    for backend in ("jax", "vllm"):
        output = tmp_path / f"{backend}.json"
        assert main(["eval", "--model", str(model), "--dataset", str(dataset), "--samples", "1", "--temperature",
                     "0", "--max-new-tokens", "8", "--quiet", "--rollout-backend", backend, "--json",
                     str(output)]) == 0
        summaries[backend] = json.loads(output.read_text())["datasets"][0]
    assert summaries["vllm"] == summaries["jax"]
    assert summaries["jax"]["response_length"] > 1
