"""opd-jax plan: ahead-of-time compiles of a step for TPU topologies (libtpu on this CPU host), its
report, the topology names, the model presets and every refusal of bad input before compiling."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from opd_jax import chunking, plan, topologies
from opd_jax.config import TrainConfig
from opd_jax.commands import main
from opd_jax.models import DecoderConfig
from opd_jax.models.presets import PRESETS, resolve_model
from opd_jax.sharding import MeshConfig, Placement

pytest.importorskip("libtpu", reason='the TPU compiler comes with the tpu extra: pip install "opd-jax[tpu]"')

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRAM_KEYS = ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes", "flops", "compile_seconds")
TINY = DecoderConfig("qwen3", vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64, max_position_embeddings=4096, eos_token_id=(1,))
# A small plan: 8 rows of 256 = 64 prompt + 192 new tokens, 2 update minibatches of 4 rows.
SMALL = ["--sequence-length", "256", "--prompt-length", "64", "--prompts-per-step", "4", "--group-size", "2",
         "--minibatches", "2"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "config.json").write_text(json.dumps(TINY.to_hf()))
    return folder


def _plan(capsys, *args) -> tuple[int, str, str]:
    try:
        status = main(["plan", *args])
    except SystemExit as exit:  # bad input found by the checks train shares exits as argparse does
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def tpu_plan():
    """The three programs of the small plan compiled for v5p-8 (4 chips), and their report."""
    config = plan.PlanConfig(student=TINY, teacher=TINY, topology="v5p-8", prompt_length=64,
                             train=TrainConfig(prompts_per_step=4, group_size=2, minibatches=2, max_new_tokens=192))
    compiled = plan.compile_programs(config)
    return compiled, plan.report(compiled)


# --------------------------------------------------------------------------------------------------
# Compiling for a TPU topology


def test_cli_json_has_the_contract_keys_and_fits_agrees_with_the_bytes(capsys, tiny_folder, tmp_path):
    out_file = tmp_path / "plan.json"
    status, out, err = _plan(capsys, "--topology", "v5p-8", "--student", str(tiny_folder), "--teacher",
                             str(tiny_folder), *SMALL, "--json", str(out_file))
    assert status == 0, err
    # rollout_mesh auto decodes on an inference layout: the training layout's static batch is
    # compiled beside it (0 runs), then the reshard and the replicas' rollout.
    step = ("rollout", "reshard", "rollout_layout", "score", "update")
    for index, name in enumerate(step, 1):
        assert f"compiling {name} ({index}/5)..." in err
    assert "fits: yes" in out and "| update | 2 |" in out and "| rollout | 0 |" in out
    result = json.loads(out_file.read_text())
    assert result["topology"] == "v5p-8" and result["devices"] == 4
    assert result["device_memory_bytes"] == 95 * 2**30  # the documented 95 GiB, below the compiler's 95.73
    assert list(result["programs"]) == list(step)
    assert result["rollout"]["layout"] == result["rollout"]["estimate"]["layout"] != "training"
    assert result["rollout"]["estimate"]["roofline_seconds"] == min(
        c["roofline_seconds"] for c in result["rollout"]["layouts"])
    assert result["programs"]["reshard"]["collective_bytes"] > 0  # fsdp shards gathered into replicas
    assert result["rollout"]["slots"] >= 1 and result["rollout"]["kv_cache_bytes"] > 0
    # Every response runs to max_new_tokens (no lengths given): the static batch is the compiled count.
    static = result["rollout"]["static_training_layout"]
    assert static["steps"] == 192
    assert static["roofline_seconds"] == pytest.approx(result["programs"]["rollout"]["roofline_seconds"])
    for name in plan.PROGRAMS + ("rollout_layout",):
        program = result["programs"][name]
        for key in PROGRAM_KEYS:
            assert program[key] > 0, (name, key)
        # The safe peak: the compiler's, or everything it allocated if that is larger.
        allocated = program["argument_bytes"] + program["output_bytes"] + program["temp_bytes"] - program["alias_bytes"]
        assert program["peak_bytes"] == max(program["compiler_peak_bytes"], allocated)
        # Loops multiplied out: never fewer FLOPs than XLA's count of each loop body once.
        assert program["flops"] >= program["xla_flops"] > 0
    totals = [p["peak_bytes"] + p["resident_bytes"] for p in result["programs"].values()]
    assert result["fits"] is (max(totals) <= result["device_memory_bytes"]) is True
    assert result["estimated_step_seconds"] == pytest.approx(sum(
        p["executions"] * p["roofline_seconds"] for p in result["programs"].values()))
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert result["models"]["attention"] == "splash"


def test_the_rollout_is_estimated_under_response_lengths(capsys, tiny_folder, tmp_path):
    """Geometric lengths of mean 16 (of 192): the static batch still runs to the batch's longest
    response, the inference layout's replicas to their own longest; both below the worst case."""
    lengths = tmp_path / "lengths.jsonl"
    lengths.write_text("".join(f"{n}\n" for n in (4, 9, 16, 40)))
    reports = {}
    for name, flags in (("mean", ["--mean-response-length", "16"]), ("observed", ["--response-lengths", str(lengths)])):
        out_file = tmp_path / f"{name}.json"
        status, out, err = _plan(capsys, "--topology", "v5p-8", "--student", str(tiny_folder), "--teacher",
                                 str(tiny_folder), *SMALL, "--programs", "rollout", *flags, "--json", str(out_file))
        assert status == 0, err
        reports[name] = json.loads(out_file.read_text())
        assert "under responses" in out
    mean = reports["mean"]["rollout"]
    assert mean["response_lengths"] == "geometric, mean 16"
    # 8 rows at the quantiles (i + 1/2) / 8 of the geometric law: the longest is ceil(log(1/16) / log(15/16)).
    longest = math.ceil(math.log1p(-7.5 / 8) / math.log1p(-1 / 16))
    assert mean["static_training_layout"]["steps"] == longest == 43
    full = reports["mean"]["programs"]["rollout"]["roofline_seconds"]
    assert mean["estimate"]["roofline_seconds"] < mean["static_training_layout"]["roofline_seconds"] < full
    assert reports["observed"]["rollout"]["static_training_layout"]["steps"] == 40
    status, _, err = _plan(capsys, "--topology", "v5p-8", "--student", str(tiny_folder), "--teacher",
                           str(tiny_folder), *SMALL, "--response-lengths", str(tmp_path / "missing.jsonl"))
    assert status == 2 and "missing.jsonl" in err


def test_the_inference_layout_rollout_is_counted_like_the_static_batch():
    """The replicas' rollout (shard_map over data, tensor groups inside) does the static batch's
    work split differently: the same FLOPs and decode segments; per step each chip reads half the
    weights (tensor 2) and none of the training layout's FSDP all-reduces."""
    config = plan.PlanConfig(student=TINY, teacher=TINY, topology="v5p-8", prompt_length=64,
                             train=TrainConfig(prompts_per_step=8, group_size=1, max_new_tokens=192,
                                               rollout_mesh="data=2,tensor=2"),
                             placement=Placement(mesh=MeshConfig(fsdp=4)))
    programs = plan.report(plan.compile_programs(config, programs=["rollout", "rollout_layout"]))["programs"]
    static, replicas = programs["rollout"], programs["rollout_layout"]
    assert replicas["flops"] == pytest.approx(static["flops"], rel=1e-9)
    assert list(replicas["phases"]) == list(static["phases"]) == ["prefill", "decode steps 0-127",
                                                                  "decode steps 128-191"]
    for name in ("decode steps 0-127", "decode steps 128-191"):
        assert replicas["phases"][name]["trips_derived"] and replicas["phases"][name]["cache_slots"] is not None
        assert replicas["phases"][name]["bytes_accessed"] < static["phases"][name]["bytes_accessed"]
        assert replicas["phases"][name]["collective_bytes"] < static["phases"][name]["collective_bytes"]


def test_splash_kernel_is_in_the_compiled_update_and_score(tpu_plan):
    compiled, _ = tpu_plan
    assert compiled.attention == "splash"
    for name in ("update", "score"):
        assert 'custom_call_target="tpu_custom_call"' in compiled.compiled[name].as_text(), name
    # The sampler's cached attention has no splash form (it runs chunked).
    assert "tpu_custom_call" not in compiled.compiled["rollout"].as_text()


def test_rollout_is_prefill_plus_one_roofline_per_decode_step_of_each_segment(tpu_plan):
    """192 new tokens after a 64-token prompt decode in two segments (cache 192, then 256 slots):
    steps 0-127 and 128-191, each step a roofline of its own."""
    _, result = tpu_plan
    rollout = result["programs"]["rollout"]
    phases = rollout["phases"]
    assert list(phases) == ["prefill", "decode steps 0-127", "decode steps 128-191"]
    assert [(p["repeats"], p["first_step"], p["cache_slots"], p["trips_derived"]) for p in list(phases.values())[1:]
            ] == [(128, 0, 192, True), (64, 128, 256, True)]
    assert rollout["roofline_seconds"] == pytest.approx(
        sum(p["repeats"] * p["roofline_seconds"] for p in phases.values()))
    # A decode step is one token per row: memory-bound on the chip (bytes / bandwidth > FLOPs / peak).
    chip = topologies.CHIPS["v5p"]
    for name in ("decode steps 0-127", "decode steps 128-191"):
        decode = phases[name]
        assert decode["bytes_accessed"] / chip.hbm_bandwidth > decode["flops"] / chip.peak_flops
    # The second segment's cache is larger: more attention per step.
    assert phases["decode steps 128-191"]["flops"] > phases["decode steps 0-127"]["flops"]


def test_collectives_enter_the_roofline(tpu_plan):
    """Every program's collectives are counted on its compiled HLO, per program and per phase, and
    the roofline is the largest of compute, HBM and interconnect time."""
    _, result = tpu_plan
    ici = topologies.CHIPS["v5p"].ici_bandwidth
    assert result["chip"]["ici_bandwidth"] == ici == 1200e9
    for name in plan.PROGRAMS:  # on the training layout
        program = result["programs"][name]
        assert program["collective_bytes"] > 0, name  # FSDP over 4 chips: gathers, reductions
        assert program["collective_seconds"] == pytest.approx(program["collective_bytes"] / ici)
        assert program["collective_bytes"] == pytest.approx(sum(program["collectives"].values()))
        assert program["roofline_seconds"] >= program["roofline_seconds_without_collectives"] > 0
        assert program["collectives_matched"], name
    rollout = result["programs"]["rollout"]
    assert isinstance(rollout["decode_weight_gathers"], bool)
    for phase in rollout["phases"].values():
        assert phase["collective_seconds"] == pytest.approx(phase["collective_bytes"] / ici)
        assert phase["roofline_seconds"] == pytest.approx(max(
            phase["roofline_seconds_without_collectives"], phase["collective_seconds"]))
    assert rollout["collective_bytes"] == pytest.approx(
        sum(p["repeats"] * p["collective_bytes"] for p in rollout["phases"].values()))


def test_update_flops_follow_the_model_not_one_scanned_layer(tpu_plan):
    """XLA counts the layer scan once; the report's FLOPs must be those of every layer.

    Forward matmuls of the student over the minibatch, 2·params·tokens (attention's share at 256
    tokens is small), then the backward (2×) and the recomputed forward under remat="full" (1×):
    about 4× in all (the vocabulary projection is rematerialised too), split over 4 devices.
    """
    _, result = tpu_plan
    tokens = 4 * 256
    layer_params = 2 * 256 * 4 * 64 + 2 * 256 * 2 * 64 + 3 * 256 * 512
    head = 256 * 1024
    expected = 2 * tokens * 4 * (2 * layer_params + head) / 4
    update = result["programs"]["update"]
    assert update["flops"] == pytest.approx(expected, rel=0.15)
    assert update["xla_flops"] < 0.8 * expected  # what a per-loop-body-once count misses


def test_jaxpr_count_with_loop_bodies_once_agrees_with_xla(tpu_plan):
    """The check behind the loop correction: counting each loop body once, as XLA does, the jaxpr's
    matmul FLOPs are XLA's per-device count times the devices (XLA does not see into the splash
    kernel, so kernel FLOPs stay out of both)."""
    compiled, result = tpu_plan
    counter = plan._Counter(multiply=False, decode_trips=192, tensor=1, devices=4)
    for name in plan.PROGRAMS:
        once, _ = counter.walk(compiled.traced[name].jaxpr.jaxpr, compiled.weights[name])
        assert once.flops / 4 == pytest.approx(result["programs"][name]["xla_flops"], rel=0.1), name


WIDE_PLAN = ["--topology", "v5e-1", "--sequence-length", "4096", "--prompt-length", "64", "--prompts-per-step", "16",
             "--group-size", "1", "--minibatches", "1", "--programs", "score"]


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory) -> pathlib.Path:
    """A large vocabulary on a small model: [16 · 4096, 65536] float32 logits are 16 GiB."""
    wide = DecoderConfig("qwen3", vocab_size=65536, hidden_size=128, intermediate_size=256, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=64, max_position_embeddings=8192)
    folder = tmp_path_factory.mktemp("wide")
    (folder / "config.json").write_text(json.dumps(wide.to_hf()))
    return folder


def test_a_plan_that_does_not_fit_says_so_and_exits_0(capsys, wide_folder, tmp_path):
    """Unchunked [rows · L, V] logits of a large vocabulary on one v5e chip (--logit-chunk-size
    none): the compiler refuses scoring (CompileTimeHbmOom), which the plan reports as not
    fitting, naming the program."""
    out_file = tmp_path / "plan.json"
    status, out, err = _plan(capsys, *WIDE_PLAN, "--student", str(wide_folder), "--teacher", str(wide_folder),
                             "--logit-chunk-size", "none", "--json", str(out_file))
    assert status == 0, err
    result = json.loads(out_file.read_text())
    assert result["fits"] is False
    over = {o["program"]: o["bytes_over"] for o in result["over"]}
    assert over["score"] > 0
    score = result["programs"]["score"]
    assert score["peak_bytes"] > result["device_memory_bytes"]
    assert "fits: NO" in out and "score is" in out and "GiB over" in out and "--logit-chunk-size" in out


def test_the_default_auto_chunk_makes_the_same_plan_fit(capsys, wide_folder, tmp_path):
    """The same step with no memory flag: logit_chunk_size "auto" chunks the projection (by the
    rule of opd_jax.chunking.auto_logit_chunk_size), says so, records it, and the compiler fits it."""
    out_file = tmp_path / "plan.json"
    status, out, err = _plan(capsys, *WIDE_PLAN, "--student", str(wide_folder), "--teacher", str(wide_folder),
                             "--json", str(out_file))
    assert status == 0, err
    result = json.loads(out_file.read_text())
    memory = topologies.CHIPS["v5e"].memory_bytes
    expected = chunking.auto_logit_chunk_size(vocab_size=65536, tokens_per_device=16 * 4096, device_memory_bytes=memory)
    assert expected is not None and 65536 * 12 * expected <= memory / 32
    assert result["batch"]["logit_chunk_size"] == expected
    assert result["train_config"]["loop"]["logit_chunk_size"] == expected
    assert f"logit_chunk_size auto: {expected} tokens" in err
    assert result["fits"] is True, result["programs"]["score"]
    assert result["programs"]["score"]["total_bytes"] < memory


def test_cpu_topology_in_a_subprocess(tiny_folder, tmp_path):
    out_file = tmp_path / "plan.json"
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-m", "opd_jax", "plan", "--topology", "cpu:8", "--student", str(tiny_folder),
         "--teacher", str(tiny_folder), *SMALL, "--attention", "xla", "--json", str(out_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out_file.read_text())
    assert result["devices"] == 8 and result["chip"]["name"] == "cpu"
    # 4-row update minibatches cannot split over 8 devices: the default mesh moves a factor to tensor.
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert result["models"]["student"]["compute_dtype"] == "float32"  # "auto" on CPU
    assert all(result["programs"][name]["peak_bytes"] > 0 for name in plan.PROGRAMS)


def test_plan_and_train_build_the_same_step(tmp_path):
    """opd-jax plan and opd-jax train, from the same folders and TrainConfig on cpu:8, build the
    same jitted programs: train's lowered on the plan's arguments give the plan's HLO text, with a
    full-vocabulary term (the teacher in the update) and with a teacher on its own mesh (its own
    program); a train step with another weight does not (tests/helpers/plan_train_hlo.py)."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "plan_train_hlo.py"), str(tmp_path)],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert set(results["full_vocab"]) == {"score", "update"}
    assert set(results["teacher_mesh"]) == {"teacher", "score", "update"}
    assert results["teacher_mesh"]["update"]["programs"] == ["reshard", "rollout", "rollout_layout", "score",
                                                             "teacher", "update"]
    for case in ("full_vocab", "teacher_mesh"):
        for name, program in results[case].items():
            assert program["equal"] and program["lines"] > 100, (case, name)
    assert results["control"] is False


# --------------------------------------------------------------------------------------------------
# Counting work on the jaxpr


def test_walk_multiplies_scans_and_each_loop_by_its_trip_count():
    w = jax.ShapeDtypeStruct((5, 64, 64), jnp.float32)
    x = jax.ShapeDtypeStruct((8, 64), jnp.float32)

    def scanned(x, w):
        return jax.lax.scan(lambda c, w: (c @ w, None), x, w)[0]

    def segments(x, w):  # two loops as the sampler runs them: the second starts where the first ended
        step, x = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, scanned(c[1], w)), (0, x))
        return jax.lax.while_loop(lambda c: (c[0] < 7) & (c[1][0, 0] < 1e9),
                                  lambda c: (c[0] + 1, scanned(c[1], w)), (step, x))[1]

    def unreadable(x, w):  # a trip count that depends on the data
        return jax.lax.while_loop(lambda c: jnp.sum(c) < 1.0, lambda c: scanned(c, w), x)

    one_matmul = 2 * 8 * 64 * 64

    def count(fn, multiply, loops=None):
        jaxpr = jax.jit(fn).trace(x, w).jaxpr.jaxpr
        counter = plan._Counter(multiply=multiply, decode_trips=11, tensor=1, devices=1)
        return counter.walk(jaxpr, [False, True], loops=loops)[0]

    assert count(scanned, multiply=False).flops == one_matmul
    assert count(scanned, multiply=True).flops == 5 * one_matmul
    loops = []
    assert count(segments, multiply=True, loops=loops).flops == (3 + 4) * 5 * one_matmul
    assert [(loop.trips, loop.first, loop.derived) for loop in loops] == [(3, 0, True), (4, 3, True)]
    loops = []
    assert count(unreadable, multiply=True, loops=loops).flops == 11 * 5 * one_matmul  # the fallback
    assert [(loop.trips, loop.first, loop.derived) for loop in loops] == [(11, None, False)]
    # Traffic: the weights [5, 64, 64] are read once per pass, the activations [8, 64] in and out.
    assert count(scanned, multiply=True).bytes == 5 * 4 * (64 * 64 + 2 * 8 * 64)


@pytest.fixture(scope="module")
def segmented_rollout():
    """The rollout of 8 rows, 64 prompt + 448 new tokens, on v5p-8: four decode segments."""
    config = plan.PlanConfig(student=TINY, teacher=TINY, topology="v5p-8", prompt_length=64,
                             train=TrainConfig(prompts_per_step=4, group_size=2, minibatches=2, max_new_tokens=448))
    return plan.report(plan.compile_programs(config, programs=["rollout"]))["programs"]["rollout"]


def _rollout_formula(prompt: int, new: int, rows: int, devices: int, segments
                     ) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """Matmul FLOPs and HBM bytes per device of TINY's rollout, from the model dimensions.

    The traffic model of the plan: each matmul reads its operands and writes its result once;
    weights (bf16) are read whole by every device (tensor = 1), activations and the KV cache are
    split over the devices; attention scores and logits are float32. Decode step ``t`` attends to
    the whole cache of the segment it runs in (``segments``: cache sizes, each segment decoding the
    steps whose slot fits). Returns the prefill's ``(flops, bytes)`` and one pair per decode step.
    """
    D, N, K, H, F, V, layers = 256, 4, 2, 64, 512, 1024, 2
    bf16, f32 = 2, 4

    def matmul(m, k, n, out=bf16):  # activations [m, k] @ weight [k, n]
        return 2 * m * k * n, (m * k * bf16 + m * n * out) / devices + k * n * bf16

    def attention(queries, keys):  # per layer: scores q·Kᵀ (f32), then p (bf16)·V (f32)
        flops = 2 * 2 * rows * queries * N * H * keys
        traffic = (rows * queries * N * H * bf16 + rows * keys * K * H * bf16 + rows * N * queries * keys * f32
                   + rows * N * queries * keys * bf16 + rows * keys * K * H * bf16 + rows * queries * N * H * f32)
        return flops, traffic / devices

    def total(parts):
        return (sum(f for f, _ in parts) / devices, sum(b for _, b in parts))

    tokens = rows * prompt
    prefill = [matmul(tokens, k, n) for k, n in ((D, N * H), (D, K * H), (D, K * H), (N * H, D), (D, F), (D, F),
                                                  (F, D))] * layers
    prefill += [attention(prompt, prompt)] * layers + [matmul(rows, D, V, out=f32)]  # logits of the last token
    steps, start = [], prompt
    for size in segments:
        step = [matmul(rows, k, n) for k, n in ((D, (N + 2 * K) * H), (N * H, D), (D, 2 * F), (F, D))] * layers
        step += [attention(1, size)] * layers + [matmul(rows, D, V, out=f32)]
        steps += [total(step)] * (size - start)
        start = size
    assert len(steps) == new
    return total(prefill), steps


def test_rollout_count_matches_a_formula_of_the_model_to_one_percent(segmented_rollout):
    """The plan's FLOPs and bytes of a rollout with four decode segments against an independent
    count from the model's dimensions, step by step, each step at the cache size of its segment.

    The steps' cache sizes come from the sampler's own segment structure (cache_segments), the
    plan's from the jaxpr it compiled: if the sampler's loops change and the plan does not follow
    (a count per loop that ignores its trips, or one cache size for all steps), the totals move by
    more than 1% (both checked below on the same figures)."""
    from opd_jax import sampling

    segments = sampling.cache_segments(64, 448)
    assert segments == (192, 320, 448, 512)  # the case this test was built for: four segments
    (prefill_flops, prefill_bytes), steps = _rollout_formula(64, 448, rows=8, devices=4, segments=segments)
    flops = prefill_flops + sum(f for f, _ in steps)
    traffic = prefill_bytes + sum(b for _, b in steps)
    assert segmented_rollout["flops"] == pytest.approx(flops, rel=0.01)
    assert segmented_rollout["bytes_accessed"] == pytest.approx(traffic, rel=0.01)
    phases = segmented_rollout["phases"]
    assert phases["prefill"]["flops"] == pytest.approx(prefill_flops, rel=0.01)
    assert phases["prefill"]["bytes_accessed"] == pytest.approx(prefill_bytes, rel=0.01)
    start = 64
    for size in segments:
        name = f"decode steps {start - 64}-{size - 64 - 1}"
        phase = phases[name]
        assert (phase["repeats"], phase["cache_slots"]) == (size - start, size)
        assert (phase["flops"], phase["bytes_accessed"]) == pytest.approx(steps[start - 64], rel=0.01)
        start = size
    # What a count that does not follow the loops would give: off by more than 1%.
    every_loop_all_steps = prefill_flops + 448 * sum(p["flops"] for n, p in phases.items() if n != "prefill")
    one_cache_size = prefill_flops + 448 * steps[-1][0]
    for wrong in (every_loop_all_steps, one_cache_size):
        assert abs(wrong / flops - 1) > 0.01


def test_collectives_of_hlo_with_a_static_and_a_decode_loop():
    """A hand-written HLO module: a loop of 3 trips (counter < constant from 0) and a loop whose count
    the jaxpr gives (5); an all-gather of a loop-invariant carry element is a weight gather."""
    from opd_jax import plan_collectives

    carry = "(s32[], f32[8,16], f32[2,16])"
    body = f"""%body{{n}} (p: {carry}) -> {carry} {{
  %p = {carry} parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{{1,0}} get-tuple-element(%p), index=1
  %w = f32[2,16]{{1,0}} get-tuple-element(%p), index=2
  %g = f32[8,16]{{1,0:T(8,128)}} all-gather(%w), channel_id=1, replica_groups=[1,4]<=[4], dimensions={{0}}
  %y = f32[8,16]{{1,0}} add(%x, %g)
  %r = f32[8,16]{{1,0}} all-reduce(%y), channel_id=2, replica_groups={{{{0,1}},{{2,3}}}}, to_apply=%sum
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = {carry} tuple(%next, %r, %w)
}}
"""
    hlo = f"""HloModule m

%sum (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %c = f32[] add(%a, %b)
}}

{body.replace("{n}", "1")}
{body.replace("{n}", "2")}
%cond1 (p: {carry}) -> pred[] {{
  %p = {carry} parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %three), direction=LT
}}

%cond2 (p: {carry}) -> pred[] {{
  %p = {carry} parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{{1,0}} get-tuple-element(%p), index=1
  %bound = s32[] constant(8)
  %lt = pred[] compare(%i, %bound), direction=LT
  %ok = pred[] custom-call(%x), custom_call_target="any"
  ROOT %and = pred[] and(%lt, %ok)
}}

ENTRY %main (a: f32[8,16], w: f32[2,16]) -> {carry} {{
  %a = f32[8,16]{{1,0}} parameter(0)
  %w = f32[2,16]{{1,0}} parameter(1)
  %zero = s32[] constant(0)
  %init = {carry} tuple(%zero, %a, %w)
  %first = {carry} while(%init), condition=%cond1, body=%body1
  %p = f32[32,16]{{1,0}} all-gather-start(%a), channel_id=3, replica_groups={{}}, dimensions={{0}}
  %q = f32[32,16]{{1,0}} all-gather-done(%p)
  ROOT %second = {carry} while(%first), condition=%cond2, body=%body2
}}
"""
    gather, reduce = 2 * 3 / 4 * 8 * 16 * 4, 4 * 1 / 2 * 8 * 16 * 4  # ring bytes sent + received per device
    count = plan_collectives.count_collectives(hlo, devices=4, loop_trips=[5], loop_bounds=[8])
    assert count.matched
    outside_gather = 2 * 3 / 4 * 32 * 16 * 4  # the async all-gather in the entry, over all 4 devices
    assert count.outside == pytest.approx({"all-gather": 3 * gather + outside_gather, "all-reduce": 3 * reduce})
    assert count.loops == [pytest.approx({"all-gather": gather, "all-reduce": reduce})]
    assert count.loop_weight_gathers == [pytest.approx(gather)]
    assert count.total([5])["all-reduce"] == pytest.approx(8 * reduce)
    # Without the jaxpr's trip count, or with another bound, the decode loop is not matched, and the
    # count says so.
    assert not plan_collectives.count_collectives(hlo, devices=4).matched
    assert not plan_collectives.count_collectives(hlo, devices=4, loop_trips=[5], loop_bounds=[9]).matched
    # A counter that steps by 2 from 0 to 3 runs twice.
    stepped = plan_collectives.count_collectives(hlo.replace("constant(1)", "constant(2)"), devices=4,
                                                 loop_trips=[5], loop_bounds=[8])
    assert stepped.outside["all-reduce"] == pytest.approx(2 * reduce)


# --------------------------------------------------------------------------------------------------
# Topologies and presets


@pytest.mark.parametrize("name, libtpu_name, devices", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-32", "v5p:2x2x4", 16), ("v5p-64", "v5p:2x4x4", 32),
    ("v5p-128", "v5p:4x4x4", 64), ("v4-8", "v4:2x2x1", 4), ("v5e-4", "v5e:2x2", 4), ("v5litepod-8", "v5e:2x4", 8),
    ("v6e-64", "v6e:8x8", 64), ("v6e-32", "v6e:4x8", 32), ("v5p:2x4x4", "v5p:2x4x4", 32),
])
def test_cloud_tpu_names_map_to_libtpu_topologies(name, libtpu_name, devices):
    topology = topologies.parse_topology(name)
    assert (topology.libtpu_name, topology.num_devices) == (libtpu_name, devices)
    assert len(topology.devices()) == devices  # a v4 megacore chip is one device


def test_chip_table_memory():
    assert topologies.CHIPS["v5p"].memory_bytes == 95 * 2**30
    assert topologies.CHIPS["v5e"].memory_bytes == int(15.75 * 2**30)  # the compiler keeps 256 MiB of 16 GiB
    for chip in topologies.CHIPS.values():
        assert chip.peak_flops > 0 and chip.hbm_bandwidth > 0 and chip.source


def test_presets_hold_the_published_sizes():
    assert set(PRESETS) == {"qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b",
                            "llama3.1-8b", "qwen2.5-7b"}
    assert [PRESETS[n].tie_word_embeddings for n in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b")] == [
        True, True, True, False]
    q8 = resolve_model("Qwen3-8B")
    assert (q8.hidden_size, q8.intermediate_size, q8.num_layers, q8.num_heads, q8.num_kv_heads, q8.head_dim) == (
        4096, 12288, 36, 32, 8, 128)
    assert resolve_model("llama3.1-8b").rope.rope_type == "llama3"
    assert resolve_model("qwen2.5-7b").qkv_bias
    counts = {name: plan._count(plan._abstract_model(PRESETS[name], "bfloat16", "bfloat16", "xla", "none")[1])
              for name in ("qwen3-1.7b", "qwen3-8b", "llama3.1-8b")}
    assert counts == {"qwen3-1.7b": pytest.approx(1.72e9, rel=0.01), "qwen3-8b": pytest.approx(8.19e9, rel=0.01),
                      "llama3.1-8b": pytest.approx(8.03e9, rel=0.01)}


def test_resolve_model_reads_a_folder(tiny_folder):
    assert resolve_model(tiny_folder) == resolve_model(str(tiny_folder))
    assert resolve_model(tiny_folder).hidden_size == 256


# --------------------------------------------------------------------------------------------------
# Bad input: refused before compiling, naming the field and what is allowed


def _refused(capsys, tiny_folder, *args) -> str:
    base = {"--topology": "v5p-8", "--student": str(tiny_folder), "--teacher": str(tiny_folder)}
    given = dict(zip(args[::2], args[1::2]))
    argv = [x for key, value in {**base, **given}.items() for x in (key, value)]
    defaults = dict(zip(SMALL[::2], SMALL[1::2]))
    argv += [x for key, value in defaults.items() if key not in given for x in (key, value)]
    status, out, err = _plan(capsys, *argv)
    assert status == 2, (out, err)
    assert "compiling" not in err  # refused before any compile
    return err


def test_unknown_topology_lists_the_valid_forms(capsys, tiny_folder):
    err = _refused(capsys, tiny_folder, "--topology", "v7-8")
    assert "unknown topology 'v7-8'" in err and "v5p-N" in err and "v6e-N" in err and "cpu:N" in err
    err = _refused(capsys, tiny_folder, "--topology", "v5p-12")
    assert "TensorCores" in err and "8, 16, 32, 64" in err
    err = _refused(capsys, tiny_folder, "--topology", "v6e-2")
    assert "v6e-N counts chips" in err and "1, 4, 8, 16, 32, 64, 128, 256" in err


def test_unknown_preset_lists_the_presets(capsys, tiny_folder):
    err = _refused(capsys, tiny_folder, "--student", "qwen9-1b")
    assert "unknown model 'qwen9-1b'" in err and all(name in err for name in PRESETS)


def test_mesh_must_divide_the_chips(capsys, tiny_folder):
    err = _refused(capsys, tiny_folder, "--mesh", "1,3,1")
    assert "mesh data=1 × fsdp=3 × tensor=1 = 3 devices" in err and "has 4" in err


def test_mesh_tensor_must_divide_the_heads(capsys, tiny_folder):
    err = _refused(capsys, tiny_folder, "--mesh", "1,1,4")
    assert "'tensor' (4)" in err and "num_heads (4)" in err and "num_kv_heads (2)" in err


def test_mesh_must_divide_the_batch(capsys, tiny_folder):
    err = _refused(capsys, tiny_folder, "--mesh", "1,4,1", "--prompts-per-step", "2", "--minibatches", "2")
    assert "update minibatch" in err and "'data' (1) × 'fsdp' (4) = 4" in err and "2 rows" in err


def test_sequence_length_over_the_context_is_refused(capsys, tiny_folder):
    err = _refused(capsys, tiny_folder, "--sequence-length", "8192", "--prompt-length", "64")
    assert "sequence_length 8192 (prompt_length 64 + max_new_tokens 8128) exceeds" in err
    assert "max_position_embeddings 4096" in err


def test_prompt_must_be_shorter_than_the_sequence(capsys, tiny_folder):
    err = _refused(capsys, tiny_folder, "--sequence-length", "256", "--prompt-length", "256")
    assert "--prompt-length (256) must be < --sequence-length (256)" in err


@pytest.mark.parametrize("text", ['[objective]\ndivergence = "nope"\n', '[loop]\nlogit_chunk_size = "big"\n',
                                  '[objective]\nlevel = "sequence"\nfull_vocab_weight = 0.5\n',
                                  'steps = 2.5\n', '[loop]\neval_every = 5\n'])
def test_a_config_train_refuses_is_refused_by_plan_with_the_same_message(capsys, tiny_folder, tmp_path, text):
    config = tmp_path / "run.toml"
    config.write_text(text)
    plan_err = _refused(capsys, tiny_folder, "--config", str(config))
    with pytest.raises(SystemExit) as exit:
        main(["train", "--config", str(config), "--teacher", str(tiny_folder), "--student", str(tiny_folder),
              "--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "run")])
    train_err = capsys.readouterr().err
    assert exit.value.code == 2 and not (tmp_path / "run").exists()
    message = plan_err.strip().removeprefix("opd-jax plan: error: ")
    assert message and train_err.strip() == f"opd-jax train: error: {message}"


def test_a_folder_without_config_json_is_named(capsys, tiny_folder, tmp_path):
    err = _refused(capsys, tiny_folder, "--student", str(tmp_path))
    assert f"no config.json in {tmp_path}" in err


def test_an_auto_chunk_that_cannot_fit_names_the_bytes(capsys, tmp_path):
    """A vocabulary whose one token's logits exceed the chunk budget of a v5e chip (abstract model:
    nothing is allocated)."""
    huge = DecoderConfig("qwen3", vocab_size=50_000_000, hidden_size=8, intermediate_size=16, num_layers=1,
                         num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=512)
    (tmp_path / "config.json").write_text(json.dumps(huge.to_hf()))
    status, out, err = _plan(capsys, "--topology", "v5e-1", "--student", str(tmp_path), "--teacher", str(tmp_path),
                             "--prompt-length", "8", "--max-new-tokens", "8", "--prompts-per-step", "1")
    assert status == 2 and "compiling" not in err
    assert "logit_chunk_size auto: one token's logits need 600000000 bytes" in err


def test_unavailable_attention_is_refused(capsys, tiny_folder):
    err = _refused(capsys, tiny_folder, "--attention", "cudnn")
    assert "'cudnn'" in err and "GPU" in err


def test_missing_libtpu_says_how_to_install_it(capsys, tiny_folder, monkeypatch):
    real_find_spec = topologies.importlib.util.find_spec
    monkeypatch.setattr(topologies.importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a))
    err = _refused(capsys, tiny_folder)
    assert 'pip install "opd-jax[tpu]"' in err


def test_cpu_topology_needs_the_devices_up_front():
    jax.devices()  # the CPU backend of this process has started with its device count
    count = len(jax.devices("cpu")) + 1
    with pytest.raises(ValueError, match=f"JAX_NUM_CPU_DEVICES={count}"):
        topologies.parse_topology(f"cpu:{count}").devices()


def test_a_mesh_axis_that_splits_a_physical_axis_is_built():
    # v6e-64 is an 8x8 grid: fsdp=32 is no product of whole physical axes, so one is split.
    from opd_jax import sharding

    devices = topologies.parse_topology("v6e-64").devices()
    mesh = sharding.MeshConfig(1, 32, 2).make_mesh(devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
