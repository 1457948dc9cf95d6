"""The distillation loop: outputs, exact resume after SIGKILL, corrupted checkpoints, bad input."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import checkpoint, train

HELPERS = pathlib.Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import faults  # noqa: E402
import tiny_run  # noqa: E402


def _child(output_dir, steps):
    # The children of one test share a compilation cache: the later ones skip most compiling.
    return subprocess.Popen([sys.executable, str(HELPERS / "tiny_run.py"), str(output_dir), str(steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=faults.child_env(output_dir.parent / "jax_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    assert _child(output, 10).wait(timeout=600) == 0
    return output


def test_run_writes_metrics_tensorboard_curves_checkpoints_and_export(uninterrupted):
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    for record in records:
        for key in ("loss", "grad_norm", "clip_fraction", "teacher_kl", "advantage_mean", "response_length",
                    "tokens_per_second"):
            assert np.isfinite(record[key]), key
        assert 0 <= record["clip_fraction"] <= 1 and 1 <= record["response_length"] <= 8
    assert any((uninterrupted / "tensorboard").iterdir())
    assert (uninterrupted / "curves.png").stat().st_size > 10_000
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == [6, 8, 10]
    assert json.loads((uninterrupted / "config.json").read_text())["objective"]["divergence"] == "js"
    assert (uninterrupted / "student" / "model.safetensors").is_file()


def test_sigkill_and_resume_gives_bitwise_the_same_parameters(uninterrupted, tmp_path):
    child = _child(tmp_path, 10)
    deadline = time.time() + 600
    while not (tmp_path / "checkpoints" / "4").is_dir():
        assert child.poll() is None and time.time() < deadline, child.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "student").exists()  # it really died before the end
    assert _child(tmp_path, 10).wait(timeout=600) == 0
    assert (tmp_path / "student" / "model.safetensors").read_bytes() == (
        uninterrupted / "student" / "model.safetensors").read_bytes()
    resumed = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    original = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(resumed, original):
        assert a["loss"] == b["loss"] and a["teacher_kl"] == b["teacher_kl"]


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    store = checkpoint.CheckpointStore(tmp_path, keep=3)
    states = {step: {"w": jnp.full((64,), float(step)), "step": jnp.int32(step)} for step in (1, 2, 3)}
    for step, state in states.items():
        store.save(step, state)
    store.wait()
    data_files = [p for p in (tmp_path / "3").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:  # flip bytes in the middle of the stored arrays
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states[1])
    store = checkpoint.CheckpointStore(tmp_path, keep=3)
    with pytest.warns(UserWarning, match="step 3"):
        step, state = store.restore_latest(abstract)
    assert step == 2
    np.testing.assert_array_equal(state["w"], states[2]["w"])
    # Moved aside with its reason, so step 3 can be saved again (it used to raise StepAlreadyExistsError).
    (quarantined,) = (tmp_path / "quarantine").iterdir()
    assert quarantined.name in ("3-checksum-mismatch", "3-unreadable") and store.quarantined == [quarantined.resolve()]
    assert store.steps() == [1, 2]
    store.save(3, states[3])
    store.close()
    store = checkpoint.CheckpointStore(tmp_path, keep=3)
    step, state = store.restore_latest(abstract)
    store.close()
    assert step == 3
    np.testing.assert_array_equal(state["w"], states[3]["w"])


def test_checkpoints_of_earlier_versions_are_verified_with_their_sha256(tmp_path):
    store = checkpoint.CheckpointStore(tmp_path, keep=3)
    states = {step: {"w": jnp.full((64,), float(step))} for step in (1, 2)}
    for step, state in states.items():  # what earlier versions wrote
        store._checkpointer.save_async(step, state, custom_metadata={"opd_jax_sha256": checkpoint.legacy_sha256(state)})
    store.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states[1])
    store = checkpoint.CheckpointStore(tmp_path, keep=3)
    assert store.restore_latest(abstract)[0] == 2 and not store.quarantined
    store.close()
    for path in (tmp_path / "2").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0x10
            path.write_bytes(bytes(raw))
    store = checkpoint.CheckpointStore(tmp_path, keep=3)
    with pytest.warns(UserWarning, match="step 2"):
        assert store.restore_latest(abstract)[0] == 1
    store.close()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64, jnp.int8, jnp.bool_])
def test_the_checksum_sees_every_single_bit_and_every_swap(dtype):
    values = np.random.default_rng(0).normal(size=(3, 5)) * 4
    array = jnp.asarray(values > 0 if dtype == jnp.bool_ else values, dtype)
    reference = checkpoint.state_checksum({"a": array})
    bits = jnp.dtype(dtype).itemsize * 8 if dtype != jnp.bool_ else 1
    raw = np.asarray(array).copy().view(np.uint8 if bits <= 8 else f"uint{bits}")
    for bit in range(bits):
        flipped = raw.copy()
        flipped.flat[7] ^= np.array(1 << bit, flipped.dtype)
        changed = jnp.asarray(flipped.view(np.asarray(array).dtype) if dtype != jnp.bool_ else flipped.astype(bool))
        assert checkpoint.state_checksum({"a": changed}) != reference, bit
    swapped = np.asarray(array).copy()
    swapped.flat[[1, 2]] = swapped.flat[[2, 1]]
    if swapped.flat[1] != swapped.flat[2]:
        assert checkpoint.state_checksum({"a": jnp.asarray(swapped)}) != reference
    assert checkpoint.state_checksum({"b": array}) != reference  # the structure counts too
    assert checkpoint.state_checksum({"a": array.reshape(5, 3)}) != reference


def test_checkpoints_under_a_relative_path_save_and_restore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(8.0)}
    store = checkpoint.CheckpointStore(pathlib.Path("runs") / "relative", keep=1)
    store.save(5, state)
    store.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    step, restored = checkpoint.CheckpointStore("runs/relative").restore_latest(abstract)
    assert step == 5
    np.testing.assert_array_equal(restored["w"], state["w"])


@pytest.mark.parametrize(
    "overrides, field",
    [({"divergence": "kl"}, "valid names"), ({"estimator": "ppo"}, "estimator"), ({"gamma": 1.5}, "gamma"),
     ({"log_ratio_clip": 0.0}, "log_ratio_clip"), ({"level": "step"}, "level"), ({"group_size": 0}, "group_size"),
     ({"minibatches": 3}, "minibatches"), ({"learning_rate": -1.0}, "learning_rate"),
     ({"baseline": "leave_one_out", "group_size": 1}, "group_size"), ({"alpha": 1.0, "divergence": "alpha"}, "alpha")],
)
def test_out_of_range_options_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        train.TrainConfig(**overrides)
    with pytest.raises(ValueError, match="unknown training option"):
        train.TrainConfig.from_dict({"lr": 1.0})


def test_a_different_config_in_an_existing_run_is_refused_and_nothing_is_touched(uninterrupted):
    before = {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*") if p.is_file()}
    student, teacher, prompts = tiny_run.models_and_prompts()
    config = train.TrainConfig(steps=10, **{**tiny_run.TRAIN, "divergence": "forward_kl"})
    with pytest.raises(ValueError, match=r"different configuration \(differs in \['divergence'\]\)"):
        train.train(config, student, tiny_run.CONFIG, teacher, prompts, uninterrupted, progress=False)
    assert {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*") if p.is_file()} == before


def test_prompt_order_is_a_seeded_permutation_per_epoch():
    prompts = train.PromptSet(np.arange(10, dtype=np.int32)[:, None], np.ones((10, 1), bool))
    first_epoch = np.concatenate([prompts.batch(p, 5, seed=3)[0][:, 0] for p in (0, 5)])
    assert sorted(first_epoch) == list(range(10))
    np.testing.assert_array_equal(prompts.batch(7, 6, seed=3)[0], prompts.batch(7, 6, seed=3)[0])
    assert not np.array_equal(prompts.batch(0, 10, seed=3)[0], prompts.batch(10, 10, seed=3)[0])
