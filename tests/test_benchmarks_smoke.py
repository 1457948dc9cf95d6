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
