"""Tiny Hugging Face folders built by the tests themselves (nothing is downloaded)."""

import pathlib

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


def make_tokenizer(folder, corpus=CORPUS, vocab_size=300, eos="<|im_end|>") -> pathlib.Path:
    """A byte-level BPE tokenizer with a chat template, saved with ``save_pretrained``."""
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
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return pathlib.Path(folder)


def make_qwen3_folder(folder, *, seed, layers=2, hidden=48, vocab_size=320, eos_id=2) -> pathlib.Path:
    """A random Qwen3 checkpoint plus the shared tokenizer in ``folder``."""
    config = models.DecoderConfig(
        "qwen3", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
        num_heads=4, num_kv_heads=2, head_dim=hidden // 4, qk_norm=True, max_position_embeddings=128,
        eos_token_id=(eos_id,), pad_token_id=0,
    )
    model = models.Decoder(config, rngs=nnx.Rngs(seed))
    model.embedding[...] = model.embedding[...] * 20  # far from uniform, so the distillation has work to do
    models.save_pretrained(model, config, folder)
    make_tokenizer(folder)
    return pathlib.Path(folder)
