"""The transformers side of ``experiments/benchmarks/sampling.py``: time ``model.generate`` on CPU.

Run by the Python 3.11 side environment (``.venv-torch``, made by ``.ci/bootstrap``), which has CPU
torch; opd_jax itself needs Python >= 3.12. The driver writes a JSON job file and calls

    .venv-torch/bin/python experiments/benchmarks/_torch_generate.py JOB.json

Job keys:
    checkpoint   folder written by ``opd_jax.models.save_pretrained``
    prompts      ``[B, P]`` int .npy of prompt ids (no padding)
    new_tokens   tokens generated per row (exactly: no EOS, ``min_new_tokens = max_new_tokens``)
    repeats      timed calls per mode after one untimed warm-up call
    threads      ``torch.set_num_threads``
    modes        list of ``"sample"`` (temperature 1, no top-k / top-p) and/or ``"greedy"``
    seed         ``torch.manual_seed`` before each call
    out          where to write the result JSON
    tokens_out   optional: folder for ``greedy.npy`` (the greedy ids, for a cross-check)

The result JSON holds the versions, the thread count and, per mode, the warm-up time, every timed
wall time (s) and, per timed call, the share of the CPUs other processes used meanwhile
(``_cpuload.timed_call``).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
import transformers

from _cpuload import timed_call  # this script's folder is on sys.path when run as a script


def _generate_kwargs(mode: str, new_tokens: int, pad_id: int) -> dict:
    """Settings matching ``opd_jax.sampling.generate``: plain softmax sampling (or argmax), no early stop."""
    common = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=pad_id,
        use_cache=True,
        num_beams=1,
    )
    if mode == "sample":
        return common | dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    if mode == "greedy":
        return common | dict(do_sample=False)
    raise ValueError(f"unknown mode {mode!r}")


def main() -> None:
    job = json.loads(pathlib.Path(sys.argv[1]).read_text())
    torch.set_num_threads(job["threads"])
    model = transformers.AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=torch.float32)
    model.eval()
    prompts = torch.from_numpy(np.load(job["prompts"]).astype(np.int64))
    attention_mask = torch.ones_like(prompts)
    batch, prompt_length = prompts.shape
    new_tokens = job["new_tokens"]

    result: dict = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "modes": {},
    }
    for mode in job["modes"]:
        kwargs = _generate_kwargs(mode, new_tokens, pad_id=0)
        times, foreign = [], []
        for call in range(job["repeats"] + 1):  # call 0 is the warm-up
            torch.manual_seed(job["seed"])
            with torch.inference_mode():
                out, elapsed, other_load = timed_call(
                    lambda: model.generate(input_ids=prompts, attention_mask=attention_mask, **kwargs)
                )
            if tuple(out.shape) != (batch, prompt_length + new_tokens):
                raise RuntimeError(f"generate returned {list(out.shape)}, expected {[batch, prompt_length + new_tokens]}")
            if call:
                times.append(elapsed)
                foreign.append(other_load)
            else:
                result["modes"][mode] = {"warmup_s": elapsed}
        result["modes"][mode].update(times_s=times, other_load=foreign)
        if mode == "greedy" and job.get("tokens_out"):
            np.save(pathlib.Path(job["tokens_out"]) / "greedy.npy", out[:, prompt_length:].numpy().astype(np.int32))
    pathlib.Path(job["out"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
