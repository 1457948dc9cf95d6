"""Driver-side helpers shared by the benchmarks that run in ``.venv`` (loss, sampling, train step, scaling).

Machine description (CPU model, cores, load average), running one measurement in a fresh
subprocess through a JSON job file, setting up the PyTorch peer environment, and Markdown tables.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
TORCH_PYTHON = ROOT / ".venv-torch" / "bin" / "python"
BUSY_WARNING = 0.05  # warn when other processes used more than this share of the CPUs while timing


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """``os.getloadavg()``: run-queue length averaged over 1, 5 and 15 minutes."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    """CPU model, cores, load average and the JAX versions/backend (imported here, in ``.venv``)."""
    import flax  # noqa: PLC0415
    import jax  # noqa: PLC0415

    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "cpus_in_machine": os.cpu_count(),
        "load_average_start": load_average(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(device) for device in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def require_torch_env() -> None:
    if not TORCH_PYTHON.is_file():
        raise SystemExit(
            f"error: the PyTorch side environment is missing: {TORCH_PYTHON} does not exist.\n"
            f"Create it with `.ci/bootstrap` (Python 3.11 venv with CPU torch 2.13.0 and transformers 5)."
        )


def ensure_trl() -> str:
    """Install TRL into ``.venv-torch`` when it is missing; return its version.

    ``pip install trl`` with the installed torch pinned as a constraint, so pip can never replace the
    CPU torch with a (multi-GB, CUDA) build; TRL's other requirements (accelerate, datasets, pandas,
    pyarrow, …) come with it because ``trl.experimental.gkd`` imports them at module level.
    """
    require_torch_env()
    probe = [str(TORCH_PYTHON), "-c", "import trl; print(trl.__version__)"]
    found = subprocess.run(probe, capture_output=True, text=True)
    if found.returncode == 0:
        return found.stdout.strip()
    torch_version = subprocess.run(
        [str(TORCH_PYTHON), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    constraints = HERE / ".torch-constraint.txt"
    constraints.write_text(f"torch=={torch_version}\n")
    print(f"installing trl into {TORCH_PYTHON.parent.parent} (torch pinned to {torch_version}) ...", file=sys.stderr)
    try:
        installed = subprocess.run(
            [str(TORCH_PYTHON), "-m", "pip", "install", "--quiet", "trl", "-c", str(constraints)],
            capture_output=True, text=True,
        )
    finally:
        constraints.unlink(missing_ok=True)
    if installed.returncode:
        raise SystemExit(f"error: could not install trl into .venv-torch:\n{installed.stderr[-3000:]}")
    found = subprocess.run(probe, capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"error: trl installed but does not import:\n{found.stderr[-3000:]}")
    return found.stdout.strip()


def run_job(python: pathlib.Path | str, script: str, job: dict, folder: pathlib.Path, name: str) -> dict:
    """Run ``python HERE/script JOB.json`` in a fresh process; return the JSON it wrote to ``job['out']``."""
    job = dict(job, out=str(folder / f"{name}.result.json"))
    job_file = folder / f"{name}.job.json"
    job_file.write_text(json.dumps(job, indent=2))
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=str(ROOT))
    completed = subprocess.run([str(python), str(HERE / script), str(job_file)], capture_output=True, text=True, env=env)
    if completed.returncode:
        raise SystemExit(
            f"error: {script} failed on job {name} (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
        )
    return json.loads(pathlib.Path(job["out"]).read_text())


def warn_if_busy(other_loads, consequence: str) -> None:
    """Print a warning when other processes took more than ``BUSY_WARNING`` of the CPUs in a timed call."""
    busiest = max((load or 0.0) for load in other_loads)
    if busiest > BUSY_WARNING:
        print(f"WARNING: other processes used up to {100 * busiest:.0f}% of the CPUs during timed calls; {consequence}")


def write_json(path: pathlib.Path | None, summary: dict) -> None:
    """Write ``summary`` to ``path`` (the ``--json`` option) unless it is ``None``."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")


def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one char per column, ``l`` or ``r`` (default: l then r)."""
    align = align or "l" * 2 + "r" * (len(headers) - 2)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n_bytes: float | None) -> str:
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / 2**20:.1f}" if abs(n_bytes) < 10 * 2**20 else f"{n_bytes / 2**20:.0f}"


def machine_lines(machine: dict) -> list[str]:
    lines = [
        f"CPU: {machine['cpu']} | cores available: {machine['cores']} (machine: {machine['cpus_in_machine']}) | "
        f"load average (1/5/15 min) at start: {machine['load_average_start']}, at end: {machine.get('load_average_end')}",
        f"jax {machine['jax']} (backend {machine['jax_backend']}), flax {machine['flax']}, Python {machine['python']}"
        + (f" | torch {machine['torch']}, trl {machine['trl']}, Python {machine['torch_python']}" if "torch" in machine else "")
        + (f" | XLA_FLAGS={machine['xla_flags']}" if machine["xla_flags"] else ""),
    ]
    return lines
