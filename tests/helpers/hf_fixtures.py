"""Tiny Hugging Face folders built by the tests themselves (nothing is downloaded)."""

import json
import pathlib

import jax.numpy as jnp
import tokenizers
import transformers
from flax import nnx

from opd_jax import models

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CORPUS = ["what is 12 + 30 ?", "the answer is 42", "step by step we add the numbers", "user assistant"] * 20


def make_tokenizer(folder, corpus=CORPUS, vocab_size=300, eos="<|im_end|>", *, chat_template=CHAT_TEMPLATE,
                   swap_ids=None) -> pathlib.Path:
    """A byte-level BPE tokenizer with a chat template, saved with ``save_pretrained``.

    Args:
      chat_template: the Jinja template (``None``: none).
      swap_ids: ``(i, j)``: exchange the ids of the two vocabulary entries with ids ``i`` and ``j``
        in ``tokenizer.json`` (same size, same merges, two tokens scored as each other).
    """
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token=eos, unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    if swap_ids is not None:
        path = pathlib.Path(folder) / "tokenizer.json"
        spec = json.loads(path.read_text())
        vocab = spec["model"]["vocab"]
        by_id = {i: token for token, i in vocab.items()}
        first, second = (by_id[i] for i in swap_ids)
        vocab[first], vocab[second] = vocab[second], vocab[first]
        path.write_text(json.dumps(spec, ensure_ascii=False))
    return pathlib.Path(folder)


def make_qwen3_folder(folder, *, seed, layers=2, hidden=48, vocab_size=320, eos_id=2, max_position_embeddings=128,
                      dtype=None, tokenizer_options=None) -> pathlib.Path:
    """A random Qwen3 checkpoint plus the shared tokenizer in ``folder``.

    Args:
      dtype: tensor dtype on disk (default float32), e.g. ``jnp.bfloat16``.
      tokenizer_options: keyword arguments of :func:`make_tokenizer`.
    """
    config = models.DecoderConfig(
        "qwen3", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
        num_heads=4, num_kv_heads=2, head_dim=hidden // 4, qk_norm=True,
        max_position_embeddings=max_position_embeddings, eos_token_id=(eos_id,), pad_token_id=0,
    )
    model = models.Decoder(config, rngs=nnx.Rngs(seed))
    model.embedding[...] = model.embedding[...] * 20  # far from uniform, so the distillation has work to do
    models.save_pretrained(model, config, folder, dtype=None if dtype is None else jnp.dtype(dtype))
    make_tokenizer(folder, **(tokenizer_options or {}))
    return pathlib.Path(folder)
