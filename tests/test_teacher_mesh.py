"""The teacher on its own mesh (``train(placement=Placement(mesh, teacher_mesh))``, ``--teacher-mesh``).

``helpers/teacher_mesh_train.py`` runs in a child process with 8 CPU devices: the student on
devices 0-3 (fsdp=4), the teacher on 4-7 (fsdp=2 × tensor=2). The split runs must follow the same
runs on one device, since only where the teacher's forward pass runs has changed.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

HELPERS = pathlib.Path(__file__).parent / "helpers"
CASES = ("single", "pipelined", "routed", "cross")


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    output = tmp_path_factory.mktemp("teacher_mesh")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    done = subprocess.run([sys.executable, str(HELPERS / "teacher_mesh_train.py"), str(output)],
                          env={**env, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (dict(np.load(output / "result.npz")), json.loads((output / "placement.json").read_text()),
            json.loads((output / "errors.json").read_text()))


@pytest.mark.parametrize("case", CASES)
def test_a_teacher_on_its_own_mesh_trains_like_one_device(split_runs, case):
    result, _, _ = split_runs
    metrics = [k for k in result if k.startswith(f"{case}/False/") and "/params/" not in k and "has_" not in k]
    assert len(metrics) == (8 if case in ("routed", "cross") else 4)
    for key in metrics:
        # float32 reductions over other shard layouts: the records agree to rounding
        np.testing.assert_allclose(result[key.replace("/False/", "/True/")], result[key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)
    params = [k for k in result if k.startswith(f"{case}/False/params/")]
    assert len(params) > 10
    for key in params:
        # Adam moves each weight by up to ~lr = 3e-3 per update (12 updates): 1e-4 is rounding, not drift
        np.testing.assert_allclose(result[key.replace("/False/", "/True/")], result[key], atol=1e-4, err_msg=key)
    # ... and the training moved the weights far beyond that tolerance, so the comparison means something
    moved = max(np.max(np.abs(result[key] - result[key.replace(f"{case}/False/", "initial/")])) for key in params)
    assert moved > 2e-3
    # The teacher's own program is timed wherever it runs apart: on its mesh, or on its own tokens (cross).
    assert result[f"{case}/True/has_teacher_seconds"].all()
    np.testing.assert_array_equal(result[f"{case}/False/has_teacher_seconds"], case == "cross")


def test_routed_teachers_on_their_own_mesh_count_their_rows(split_runs):
    result, _, _ = split_runs
    rows = result["routed/True/rows/near"] + result["routed/True/rows/far"]
    np.testing.assert_array_equal(rows, 16)  # prompts_per_step 8 × group_size 2
    np.testing.assert_array_equal(result["cross/True/rows/pairs"] + result["cross/True/rows/chars"], 16)
    assert (result["routed/True/rows/near"] != 8).any()  # the routes differ from step to step


def test_the_teacher_lives_on_devices_the_student_does_not_use(split_runs):
    _, placement, _ = split_runs
    assert placement["student"] == placement["optimizer"] == placement["batch"] == [0, 1, 2, 3]
    assert placement["teacher"] == placement["teacher_batch"] == [4, 5, 6, 7]
    assert placement["teacher_q_spec"] == "P(None, 'fsdp', 'tensor', None)"  # split by its own rules there


def test_bad_teacher_meshes_are_refused_before_anything_is_written(split_runs):
    _, _, errors = split_runs
    assert "(4 devices) + teacher mesh 1,2,1 (2 devices) = 6, but there are 8 devices" in errors["sizes"]
    assert "teacher_mesh needs mesh" in errors["no_mesh"]
    assert "full_vocab_weight = 0.1" in errors["full_vocab"] and "teacher_mesh" in errors["full_vocab"]
    assert not any(errors[f"{name}_wrote"] for name in ("sizes", "no_mesh", "full_vocab"))
