"""Sharded training: meshes, partition rules, sharded = single-device step, multi-process runs, bad meshes.

The 8-device checks run in child processes (the CPU device count is fixed when jax initialises,
and the rest of the suite expects one device): ``helpers/sharded_step.py`` compares the sharded
step with the single-device one for three mesh shapes; ``helpers/sharded_train.py`` runs a short
sharded training with checkpoints once as 1 process × 8 devices and once as 2 processes × 4
devices (``jax.distributed`` on localhost, gloo collectives).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from opd_jax import sharding
from opd_jax.commands import build_parser, main
from opd_jax.commands.flags import initialize_distributed

HELPERS = pathlib.Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import tiny_run  # noqa: E402

MESHES = ("8x1x1", "2x2x2", "1x4x2")


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    return {**env, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("bad_meshes")
    done = subprocess.run([sys.executable, str(HELPERS / "sharded_step.py"), str(scratch)], env=_env(8),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_step_equals_the_single_device_step(step_results, mesh):
    result = step_results["meshes"][mesh]
    assert max(result["loss_errors"]) < 1e-5
    assert result["param_error_max"] < 1e-5, result["param_error_worst"]
    assert max(result["prepared_errors"]) < 1e-5  # behaviour / teacher log-probs and advantages
    assert result["params_changed"] > 1e-3  # the updates did move the parameters


@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_and_adam_moments_are_really_split(step_results, mesh):
    data, fsdp, tensor = map(int, mesh.split("x"))
    config = tiny_run.CONFIG  # D 32, F 64, N 4, K 2, H 8, V 40
    d, f, n, h, v = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim, config.vocab_size
    result = step_results["meshes"][mesh]
    layers = config.num_layers  # the stacked layer axis is never split
    assert result["shard_shapes"] == {
        "q": [layers, d // fsdp, n // tensor, h], "down": [layers, f // tensor, d // fsdp],
        "embedding": [v // (fsdp * tensor), d], "lm_head": [d // fsdp, v // tensor],
    }
    assert result["mu_q_shard"] == [layers, d // fsdp, n // tensor, h]
    assert result["out_param_spec"] == "P(None, 'fsdp', 'tensor', None)"  # the update keeps the layout


def test_update_compiles_once_and_donates_its_buffers(step_results):
    assert step_results["single_traces"] == 1
    for mesh in MESHES:
        result = step_results["meshes"][mesh]
        assert result["update_traces"] == 1 and result["update_cache_size"] == 1, mesh
        assert result["params_donated"] and result["student_untouched"], mesh


def test_bad_meshes_fail_before_compilation_naming_axis_size_and_dimension(step_results):
    errors = step_results["errors"]
    assert "3 devices, but there are 8 devices" in errors["device_count"]
    assert "'tensor' of size 8" in errors["parameter"] and "dimension 2 (size 2)" in errors["parameter"]
    assert "layers/attention/k" in errors["parameter"]
    assert "'data' (1) × 'fsdp' (8) = 8" in errors["batch"] and "12 rows" in errors["batch"]
    train_errors = step_results["train_errors"]
    assert "'tensor' of size 8" in train_errors["kv_heads"] and "student parameter" in train_errors["kv_heads"]
    assert "rollout batch" in train_errors["batch"] and "4 rows" in train_errors["batch"]
    assert "minibatch of 4 rows" in train_errors["minibatch"] and "'fsdp' (4)" in train_errors["minibatch"]
    assert train_errors["rollout_mesh"] == (
        "rollout_mesh data=4,tensor=4: data × tensor = 16, but the student has 8 devices; layouts that fit: "
        "data=8,tensor=1, data=4,tensor=2")
    assert step_results["traced_before_error"] == 0
    assert step_results["folders_written"] == []  # every refusal came before the run folder


def _run_training(output: pathlib.Path, processes: int) -> dict:
    port = _free_port()
    children = [
        subprocess.Popen([sys.executable, str(HELPERS / "sharded_train.py"), str(output), str(processes), str(i),
                          str(port)], env=_env(8 // processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(processes)
    ]
    try:
        for child in children:
            out, _ = child.communicate(timeout=600)
            assert child.returncode == 0, out.decode()[-4000:]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    return dict(np.load(output / "result.npz"))


def test_two_processes_train_checkpoint_and_restore_like_one(tmp_path):
    single = _run_training(tmp_path / "single", 1)
    multi = _run_training(tmp_path / "multi", 2)
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(multi["teacher_kl"], single["teacher_kl"], rtol=1e-5)
    trained = [k for k in multi if k.startswith("trained/")]
    assert len(trained) > 10
    for key in trained:
        np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-7, err_msg=key)
        # the second call restored the last checkpoint (saved by both processes) bit for bit
        np.testing.assert_array_equal(multi["restored/" + key[8:]], multi[key], err_msg=key)
    assert int(multi["traces"]) == 1 and int(single["traces"]) == 1  # 3 steps, one compilation
    # ... and the sharded loop (sampling included) follows the single-device loop without a mesh.
    np.testing.assert_allclose(single["losses"], single["reference_losses"], rtol=1e-5)
    np.testing.assert_allclose(single["teacher_kl"], single["reference_teacher_kl"], rtol=1e-5)
    for key in trained:
        np.testing.assert_allclose(single[key], single["reference/" + key[8:]], rtol=1e-4, atol=1e-5, err_msg=key)
    records = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == [1, 2, 3]  # written once, by process 0
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]


# In-process checks (one device): configuration, rules, messages.


def test_mesh_config_parsing_and_validation():
    assert sharding.parse_mesh("2,2,2") == sharding.MeshConfig(2, 2, 2)
    assert sharding.parse_mesh("fsdp=4, tensor=2") == sharding.MeshConfig(1, 4, 2)
    for text, message in (("2,2", "three sizes"), ("pipe=2", "unknown mesh axis 'pipe'"), ("0,1,1", "'data'")):
        with pytest.raises(ValueError, match=message):
            sharding.parse_mesh(text)
    with pytest.raises(ValueError, match=r"= 2 devices, but there are 1 devices"):
        sharding.MeshConfig(1, 2, 1).make_mesh()
    mesh = sharding.MeshConfig().make_mesh()
    assert mesh.axis_names == sharding.AXES and set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    explicit = sharding.MeshConfig(axis_types="explicit").make_mesh()
    assert set(explicit.axis_types) == {jax.sharding.AxisType.Explicit}
    with pytest.raises(ValueError, match="axis_types must be 'auto' or 'explicit'"):
        sharding.MeshConfig(axis_types="manual")


def test_every_decoder_parameter_gets_a_rule_and_divisibility_is_checked_on_shapes():
    student = tiny_run.models_and_prompts()[0]
    abstract = jax.eval_shape(lambda: nnx.state(student))
    specs = sharding.partition_specs(abstract)
    flat = {sharding.path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))[0]}
    # Stacked block parameters: the rule's spec after an unsplit layer axis.
    assert flat["layers/attention/o"] == P(None, "tensor", None, "fsdp")
    assert flat["layers/mlp/gate"] == P(None, "fsdp", "tensor") and flat["final_norm/weight"] == P()
    sharding.check_divisible(abstract, specs, sharding.MeshConfig(1, 4, 2))
    with pytest.raises(ValueError, match=r"mesh axis 'fsdp×tensor' of size 3 does not divide dimension 0 \(size 40\) "
                                         r"of parameter embedding with shape \[40, 32\]"):
        sharding.check_divisible(abstract, specs, sharding.MeshConfig(1, 3, 1))
    with pytest.raises(ValueError, match=r"no partition rule matches parameter layers/mlp/gate \(shape \[2, 32, 64\]\)"):
        sharding.partition_specs(abstract, tuple(r for r in sharding.DEFAULT_RULES if "gate|up)$" not in r[0]))


def test_cli_mesh_flags_reach_the_parser_and_single_process_skips_distributed():
    args = build_parser().parse_args(
        ["train", "--teacher", "t", "--student", "s", "--prompts", "p", "--output", "o", "--mesh", "1,4,2",
         "--coordinator", "host:1234", "--num-processes", "2", "--process-id", "1"])
    assert (args.mesh, args.coordinator, args.num_processes, args.process_id) == ("1,4,2", "host:1234", 2, 1)
    assert initialize_distributed(None, 1, 0) is False  # one process: nothing to join


def test_cli_trains_on_a_one_device_mesh_and_rejects_a_bad_one(tmp_path, capsys):
    from hf_fixtures import make_qwen3_folder

    teacher = make_qwen3_folder(tmp_path / "teacher", seed=1, layers=1)
    student = make_qwen3_folder(tmp_path / "student", seed=2, layers=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("add the numbers", "the answer is")))
    base = ["train", "--teacher", str(teacher), "--student", str(student), "--prompts", str(prompts), "--quiet",
            "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
            "--max-prompt-length", "24", "--checkpoint-every", "1"]
    assert main([*base, "--output", str(tmp_path / "run"), "--mesh", "1,1,1"]) == 0
    assert [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "loss" in r] == [1, 2]
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    for mesh, message in (("2,1,1", "= 2 devices, but there are 1 devices"), ("1,1", "--mesh: mesh '1,1'")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--output", str(tmp_path / mesh), "--mesh", mesh])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
