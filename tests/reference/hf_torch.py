"""The PyTorch side of the parity tests, run by the Python 3.11 environment that has CPU torch.

opd_jax runs on Python >= 3.12, where no CPU torch wheel is available here, so the tests call this
script in a second interpreter (``.venv-torch``, made by ``.ci/bootstrap``) with a JSON list of jobs,
run in one process so torch and transformers are imported once:

    {"command": "create", "config": {...config.json...}, "out_dir": ..., "seed": 0,
     "dtype": "float32" | "bfloat16", "max_shard_size": "5GB"}
        a random transformers model of that config, saved with save_pretrained;
    {"command": "logits", "checkpoint": ..., "tokens": "in.npy", "out": "out.npy"}
        float32 logits of AutoModelForCausalLM.from_pretrained(checkpoint) on the token ids.

Usage: python hf_torch.py JOBS.json
"""

import json
import sys

import numpy as np
import torch
import transformers


def create(job):
    config = transformers.AutoConfig.for_model(**job["config"])
    torch.manual_seed(job["seed"])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so that loading them is really checked
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    model = model.to(getattr(torch, job.get("dtype", "float32")))
    model.save_pretrained(job["out_dir"], max_shard_size=job.get("max_shard_size", "5GB"))


def logits(job):
    model = transformers.AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=torch.float32)
    model.eval()
    tokens = torch.from_numpy(np.load(job["tokens"]).astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=tokens).logits
    np.save(job["out"], out.float().numpy())


def main():
    torch.set_num_threads(2)
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    for job in jobs:
        {"create": create, "logits": logits}[job["command"]](job)


if __name__ == "__main__":
    main()
