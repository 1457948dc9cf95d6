"""The TRL side of ``loss.py``: ``GKDTrainer.generalized_jsd_loss`` + gradient in a fresh process.

Run by the Python 3.11 side environment (``.venv-torch``, CPU torch; ``loss.py`` installs TRL there
when it is missing):

    .venv-torch/bin/python experiments/benchmarks/_loss_trl.py JOB.json

Job keys: ``batch``, ``length``, ``vocab``, ``beta``, ``repeats``, ``seed``, ``threads``, ``out``.

The peer is called as a GKD training step calls it: ``generalized_jsd_loss(student_logits,
teacher_logits, labels, beta=β, temperature=1.0, reduction="batchmean")`` with ``labels = -100`` at
masked positions (TRL then divides the summed divergence by the number of unmasked tokens), and
``torch.autograd.grad(loss, student_logits)``. Memory is measured exactly as on the JAX side
(``_procmem``: peak RSS over all calls minus the RSS just before the first one).
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch
import trl
from trl.experimental.gkd import GKDTrainer

from _cpuload import timed_call
from _lossdata import checksum, gradient_probe, make_logits
from _procmem import peak_bytes, reset_peak, rss_bytes


def main() -> None:
    job = json.loads(pathlib.Path(sys.argv[1]).read_text())
    torch.set_num_threads(job["threads"])
    student_np, teacher_np, mask_np = make_logits(job["batch"], job["length"], job["vocab"], job["seed"])
    fingerprint = checksum(student_np)
    student = torch.from_numpy(student_np).requires_grad_(True)
    teacher = torch.from_numpy(teacher_np)
    labels = torch.where(torch.from_numpy(mask_np), 0, -100)

    def step():
        loss = GKDTrainer.generalized_jsd_loss(
            student, teacher, labels=labels, beta=job["beta"], temperature=1.0, reduction="batchmean"
        )
        (gradient,) = torch.autograd.grad(loss, student)
        return loss.detach(), gradient

    reset_peak()
    base = rss_bytes()
    times, foreign = [], []
    for call in range(job["repeats"] + 1):  # call 0 is the warm-up
        (loss, gradient), elapsed, other = timed_call(step)
        if call:
            times.append(elapsed)
            foreign.append(other)
        else:
            warmup = elapsed
        if call < job["repeats"]:
            del gradient  # as a training loop would before the next step
    peak = peak_bytes()
    result = {
        "side": "trl",
        "kind": "full",
        "chunk_size": None,
        "loss": float(loss),
        "gradient": gradient_probe(gradient.numpy()),
        "checksum": fingerprint,
        "warmup_s": warmup,
        "times_s": times,
        "other_load": foreign,
        "rss_before_bytes": base,
        "peak_rss_bytes": peak,
        "peak_rss_delta_bytes": None if peak is None or base is None else peak - base,
        "torch": torch.__version__,
        "trl": trl.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }
    pathlib.Path(job["out"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
