"""The NNX decoder against the transformers PyTorch reference, and HF checkpoint I/O both ways.

The reference runs in the Python 3.11 side environment ``.venv-torch`` (see tests/reference/hf_torch.py).
Without it these tests skip, unless ``OPD_REQUIRE_TORCH=1`` (set by .ci/run), where they fail.
"""

import json
import os
import pathlib
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = ROOT / ".venv-torch" / "bin" / "python"
REFERENCE_SCRIPT = ROOT / "tests" / "reference" / "hf_torch.py"

_BASE = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    # Larger than the usual 0.02 so attention is far from uniform and a wrong RoPE or head layout
    # moves the logits by much more than the tolerance.
    "initializer_range": 0.15,
}

# name -> config.json: GQA, MQA and MHA; tied and untied; the q/k-norm, bias and RoPE variants.
CONFIGS = {
    "qwen3_gqa_untied": {**_BASE, "model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": False},
    "qwen3_mqa_tied_yarn": {
        **_BASE, "model_type": "qwen3", "head_dim": 32, "num_key_value_heads": 1, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                            "original_max_position_embeddings": 128},
    },
    "qwen2_gqa_tied": {**_BASE, "model_type": "qwen2", "tie_word_embeddings": True},
    "llama_mha_untied_llama3": {
        **_BASE, "model_type": "llama", "num_key_value_heads": 4, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    },
    "llama_gqa_biases_linear": {
        **_BASE, "model_type": "llama", "attention_bias": True, "mlp_bias": True,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    },
}
SHARDED_BF16 = "qwen3_gqa_untied"


def _run_reference(jobs: list[dict], workdir: pathlib.Path) -> None:
    jobs_file = workdir / f"jobs-{len(list(workdir.glob('jobs-*')))}.json"
    jobs_file.write_text(json.dumps(jobs))
    result = subprocess.run([str(TORCH_PYTHON), str(REFERENCE_SCRIPT), str(jobs_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """HF-written checkpoints, our logits for them, our re-exports, and torch logits for both."""
    if not TORCH_PYTHON.exists():
        reason = f"no PyTorch reference environment at {TORCH_PYTHON} (run .ci/bootstrap)"
        if os.environ.get("OPD_REQUIRE_TORCH") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("parity")
    tokens = np.random.default_rng(0).integers(0, _BASE["vocab_size"], size=(2, 24)).astype(np.int32)
    np.save(work / "tokens.npy", tokens)
    jobs = [
        {"command": "create", "config": config, "out_dir": str(work / f"hf-{name}"), "seed": i}
        for i, (name, config) in enumerate(CONFIGS.items())
    ]
    jobs.append({"command": "create", "config": CONFIGS[SHARDED_BF16], "out_dir": str(work / "hf-sharded-bf16"),
                 "seed": 99, "dtype": "bfloat16", "max_shard_size": "40KB"})
    _run_reference(jobs, work)

    ours, logits_jobs = {}, []
    for name in [*CONFIGS, "sharded-bf16"]:
        model, config = models.from_pretrained(work / f"hf-{name}")
        ours[name] = np.asarray(model(jnp.asarray(tokens)))
        models.save_pretrained(model, config, work / f"export-{name}")
        for kind in ("hf", "export"):
            logits_jobs.append({"command": "logits", "checkpoint": str(work / f"{kind}-{name}"),
                                "tokens": str(work / "tokens.npy"), "out": str(work / f"{kind}-{name}.npy")})
    _run_reference(logits_jobs, work)
    torch_logits = {(kind, name): np.load(work / f"{kind}-{name}.npy") for name in ours for kind in ("hf", "export")}
    return {"work": work, "tokens": tokens, "ours": ours, "torch": torch_logits}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(parity, name):
    reference = parity["torch"][("hf", name)]
    assert parity["ours"][name].shape == reference.shape
    assert np.max(np.abs(parity["ours"][name] - reference)) <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_loads_back_in_transformers_with_identical_logits(parity, name):
    exported = parity["torch"][("export", name)]
    assert np.max(np.abs(exported - parity["torch"][("hf", name)])) <= 1e-6
    assert np.max(np.abs(exported - parity["ours"][name])) <= 1e-4


def test_sharded_bfloat16_checkpoint_loads(parity):
    folder = parity["work"] / "hf-sharded-bf16"
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    assert np.max(np.abs(parity["ours"]["sharded-bf16"] - parity["torch"][("hf", "sharded-bf16")])) <= 1e-4
    model, _ = models.from_pretrained(folder, dtype=jnp.bfloat16)
    assert model.embedding[...].dtype == jnp.bfloat16
    logits = model(jnp.asarray(parity["tokens"]))
    assert logits.dtype == jnp.float32  # float32 logits from bfloat16 parameters


def test_export_then_reload_is_bitwise_and_config_round_trips(tmp_path):
    config = models.DecoderConfig.from_hf(CONFIGS["llama_gqa_biases_linear"] | {"eos_token_id": [2, 5]})
    model = models.Decoder(config, rngs=nnx.Rngs(3))
    models.save_pretrained(model, config, tmp_path / "a", max_shard_bytes=30_000)
    loaded, loaded_config = models.from_pretrained(tmp_path / "a")
    assert loaded_config == config
    tokens = jnp.arange(20).reshape(2, 10) % config.vocab_size
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))


def test_exported_weights_are_readable_by_others(tmp_path):
    config = models.DecoderConfig("qwen2", 40, 32, 64, 1, 4, 2, 8)
    models.save_pretrained(models.Decoder(config, rngs=nnx.Rngs(0)), config, tmp_path / "a", max_shard_bytes=20_000)
    files = sorted((tmp_path / "a").iterdir())
    assert len(files) > 3  # several shards, the index and config.json
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files), [(f.name, oct(f.stat().st_mode)) for f in files]


@pytest.mark.parametrize("model_type, implied", [
    ("qwen3", {"qk_norm": True, "qkv_bias": False, "o_bias": False}),
    ("qwen2", {"qk_norm": False, "qkv_bias": True, "o_bias": False}),
    ("llama", {"qk_norm": False, "qkv_bias": False, "o_bias": False}),
])
def test_architecture_flags_follow_model_type_and_survive_export(tmp_path, model_type, implied):
    config = models.DecoderConfig(model_type, 40, 32, 64, 1, 4, 2, 8)
    assert {name: getattr(config, name) for name in implied} == implied
    models.save_pretrained(models.Decoder(config, rngs=nnx.Rngs(0)), config, tmp_path)
    assert models.load_config(tmp_path) == config


@pytest.mark.parametrize("model_type, flags, named", [
    ("qwen3", {"qk_norm": False}, "qk_norm"),
    ("qwen2", {"qkv_bias": False}, "qkv_bias"),
    ("llama", {"qk_norm": True}, "qk_norm"),
    ("llama", {"qkv_bias": True, "o_bias": False}, "o_bias"),
    ("qwen2", {"mlp_bias": True}, "mlp_bias"),
])
def test_architecture_flags_that_config_json_cannot_express_are_rejected(model_type, flags, named):
    with pytest.raises(ValueError, match=f"{named}=.*model_type '{model_type}'"):
        models.DecoderConfig(model_type, 40, 32, 64, 1, 4, 2, 8, **flags)


def test_bad_checkpoints_name_the_file_field_or_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**_BASE, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json.*unsupported model_type 'gpt2'.*qwen3"):
        models.from_pretrained(tmp_path)

    config = models.DecoderConfig.from_hf({**_BASE, "model_type": "qwen3", "head_dim": 16})
    models.save_pretrained(models.Decoder(config, rngs=nnx.Rngs(0)), config, tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").rename(tmp_path / "ok" / "elsewhere.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.from_pretrained(tmp_path / "ok")

    untied = json.loads((tmp_path / "ok" / "config.json").read_text())
    models.save_pretrained(models.Decoder(config, rngs=nnx.Rngs(0)), config, tmp_path / "tied")
    (tmp_path / "tied" / "config.json").write_text(json.dumps(untied | {"num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.2\."):
        models.from_pretrained(tmp_path / "tied")
    (tmp_path / "tied" / "config.json").write_text(json.dumps(untied | {"hidden_size": 32}))
    with pytest.raises(ValueError, match=r"tensor model\.embed_tokens\.weight has shape \[96, 64\]"):
        models.from_pretrained(tmp_path / "tied")


def test_kv_cache_decoding_equals_full_forward():
    config = models.DecoderConfig.from_hf(CONFIGS["qwen3_gqa_untied"])
    model = models.Decoder(config, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, size=(3, 9)), jnp.int32)
    full = model(tokens)
    cache = models.KVCache.zeros(config, 3, 16)
    hidden, cache = model.hidden_states(tokens[:, :5], cache=cache)
    steps = [model.logits(hidden)]
    for t in range(5, 9):
        hidden, cache = model.hidden_states(tokens[:, t : t + 1], cache=cache)
        steps.append(model.logits(hidden))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache.index) == 9
