"""The rollout's inference layout (opd_jax.rollout_layout) and its estimate under real lengths
(opd_jax.rollout_estimate).

The 8-device rollouts run in a child process (``helpers/rollout_layouts.py``): the CPU device count
is fixed when jax starts, and the rest of the suite runs on one device.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from opd_jax import models, rollout_estimate, rollout_layout, topologies
from opd_jax.config import TrainConfig
from opd_jax.errors import InputError
from opd_jax.models import presets
from opd_jax.rollout_estimate import ResponseLengths, simulate_slots
from opd_jax.rollout_layout import RolloutLayout

HELPERS = pathlib.Path(__file__).parent / "helpers"
MODEL = models.DecoderConfig("qwen3", vocab_size=80, hidden_size=48, intermediate_size=96, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=12, max_position_embeddings=64)


@pytest.fixture(scope="module")
def layouts_result():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    done = subprocess.run([sys.executable, str(HELPERS / "rollout_layouts.py")], capture_output=True, text=True,
                          env={**env, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("case", ["data=8,tensor=1 slots=None", "data=4,tensor=2 slots=None",
                                  "data=4,tensor=2 slots=2"])
def test_rollouts_on_the_inference_layout_equal_the_single_device_ones(layouts_result, case):
    # Responses stop early (mean ~10 of 40 tokens), so with 2 slots per replica rows are refilled.
    assert layouts_result["mean_response_length"] < 20 and layouts_result["longest_response"] == 40
    result = layouts_result[case]
    assert result["rows_equal"] == 1.0 and result["masks_equal"]
    assert result["logp_error"] < 1e-5
    data, tensor = (int(part.split("=")[1]) for part in case.split()[0].split(","))
    assert result["out_mesh"] == {"data": data, "fsdp": 1, "tensor": tensor}


@pytest.mark.parametrize("case", ["data=8,tensor=1 slots=None", "data=4,tensor=2 slots=None"])
def test_the_reshard_splits_heads_over_tensor_only_and_keeps_every_value(layouts_result, case):
    result = layouts_result[case]
    assert result["params_equal"]
    tensor = int(case.split(",")[1].split()[0].split("=")[1])
    # q is [layers, D, heads, head]: whole over D (no fsdp), heads split over tensor.
    expected = list(result["q_shape"])
    expected[2] //= tensor
    assert result["q_shard_shape"] == expected


def test_a_layout_that_does_not_split_devices_heads_or_rows_is_refused_with_the_ones_that_would():
    with pytest.raises(ValueError, match=r"data × tensor = 6, but the student has 8 devices; layouts that fit: "
                                         r"data=8,tensor=1, data=4,tensor=2$"):
        rollout_layout.check_layout(RolloutLayout(3, 2), 8, MODEL, 16)
    with pytest.raises(ValueError, match=r"tensor 4 does not divide the student's num_heads \(4\) and num_kv_heads "
                                         r"\(2\)"):
        rollout_layout.check_layout(RolloutLayout(2, 4), 8, MODEL, 16)
    with pytest.raises(ValueError, match=r"data 8 does not divide the 12 rows.*layouts that fit: data=4,tensor=2"):
        rollout_layout.check_layout(RolloutLayout(8, 1), 8, MODEL, 12)


@pytest.mark.parametrize("text", ["3x", "data=2,fsdp=4", "0,8", "data=-1,tensor=8", ""])
def test_a_malformed_rollout_mesh_is_refused_naming_the_forms(text):
    with pytest.raises(ValueError, match="rollout_mesh must be 'auto', 'training', 'data=R,tensor=T' or 'R,T'"):
        rollout_layout.parse_rollout_mesh(text)
    with pytest.raises(InputError, match="rollout_mesh must be"):
        TrainConfig(rollout_mesh=text)


def test_rollout_mesh_forms():
    assert rollout_layout.parse_rollout_mesh("data=2,tensor=4") == RolloutLayout(2, 4)
    assert rollout_layout.parse_rollout_mesh("tensor=4") == RolloutLayout(1, 4)
    assert rollout_layout.parse_rollout_mesh(" 4,2 ") == RolloutLayout(4, 2)
    assert rollout_layout.parse_rollout_mesh("auto") == "auto" and TrainConfig().rollout_mesh == "auto"


def test_the_slot_schedule_of_the_static_batch_and_of_one_slot():
    lengths = np.array([5, 1, 9, 3, 3, 7])
    static = simulate_slots(lengths, 6)
    assert static.steps == 9 and set(static.slots_T) == {6} and static.refills == 0 and static.tokens == 28
    one = simulate_slots(lengths, 1)
    assert one.steps == lengths.sum() and one.refills == 5
    # The longest live row's length, step by step, for one slot: 1..5, 1, 1..9, ...
    assert list(one.longest_T[:7]) == [1, 2, 3, 4, 5, 1, 1]


def test_the_slot_schedule_refills_and_drains():
    lengths = ResponseLengths(mean=32).rows(1024, 512)
    schedule = simulate_slots(lengths, 256)
    assert schedule.tokens == lengths.sum()
    # Never fewer steps than the longest row or than the tokens over the slots.
    assert schedule.steps >= max(lengths.max(), math.ceil(lengths.sum() / 256))
    assert schedule.steps < lengths.max() + 2 * math.ceil(lengths.sum() / 256)
    assert schedule.refills > 1
    assert list(np.unique(schedule.slots_T)) == [16, 64, 256]  # the drain stages


def test_geometric_lengths_have_the_truncated_mean():
    mean, cap, rows = 2048.0, 7680, 4096
    lengths = ResponseLengths(mean=mean).rows(rows, cap)
    p = 1 / mean
    truncated = (1 - (1 - p) ** cap) / p  # E[min(L, cap)] for P(L > k) = (1 - p)^k
    assert abs(lengths.mean() / truncated - 1) < 0.01
    assert lengths.max() == cap and lengths.min() == 1
    assert np.array_equal(np.sort(ResponseLengths(observed=(4, 8, 8, 100)).rows(4, 50)), [4, 8, 8, 50])


def test_observed_lengths_are_read_from_jsonl(tmp_path):
    path = tmp_path / "lengths.jsonl"
    path.write_text('12\n{"length": 30}\n\n{"response_length": 7.6}\n')
    assert rollout_estimate.read_lengths(str(path)).observed == (12, 30, 8)
    path.write_text('12\n{"tokens": 3}\n')
    with pytest.raises(ValueError, match=r"lengths.jsonl line 2: expected a response length"):
        rollout_estimate.read_lengths(str(path))
    with pytest.raises(ValueError, match="mean_response_length must be a number >= 1"):
        ResponseLengths(mean=0.5)


def _qwen3_1_7b():
    return presets.resolve_model("qwen3-1.7b")


def test_decode_step_work_splits_weights_and_cache_over_tensor_and_adds_all_reduces():
    model = _qwen3_1_7b()
    one = rollout_estimate.decode_step_work(model, RolloutLayout(32, 1), 8, 4096, 2)
    eight = rollout_estimate.decode_step_work(model, RolloutLayout(4, 8), 64, 4096, 2)
    assert one[2] == 0 and eight[2] > 0
    # Eight times the slots on eight devices: the same FLOPs and cache bytes per chip, 1/8 of the weights.
    assert eight[0] == pytest.approx(one[0])
    weights = 2 * (model.num_layers * (2 * model.hidden_size * model.num_heads * model.head_dim
                                       + 2 * model.hidden_size * model.num_kv_heads * model.head_dim
                                       + 3 * model.hidden_size * model.intermediate_size)
                   + model.hidden_size * model.vocab_size)
    cache = 8 * 4096 * 2 * model.num_layers * model.num_kv_heads * model.head_dim * 2
    assert one[1] == pytest.approx(weights + cache) and eight[1] == pytest.approx(weights / 8 + cache)


def test_auto_chooses_the_layout_of_fewest_roofline_seconds():
    model = _qwen3_1_7b()
    chip = topologies.CHIPS["v5p"]
    keywords = dict(rows=256, prompt_length=512, max_new_tokens=1536, lengths=ResponseLengths(mean=256),
                    stop_ids=(1,), compute_dtype="bfloat16")
    best, candidates = rollout_estimate.choose_layout(model, 32, chip, chip.memory_bytes, **keywords)
    assert [str(c.layout) for c in candidates] == ["data=32,tensor=1", "data=16,tensor=2", "data=8,tensor=4",
                                                   "data=4,tensor=8"]
    assert best.seconds == min(c.seconds for c in candidates)
    assert all(c.seconds >= c.seconds_without for c in candidates)
    assert rollout_estimate.resolve_layout("auto", 32, model, chip, chip.memory_bytes, **keywords) == best.layout
    assert rollout_estimate.resolve_layout("training", 32, model, chip, chip.memory_bytes, **keywords) is None
    assert rollout_estimate.resolve_layout("auto", 1, model, chip, chip.memory_bytes, **keywords) is None
    with pytest.raises(ValueError, match="no rollout layout over 32 devices fits"):
        rollout_estimate.choose_layout(model, 32, chip, 2**30, **keywords)
