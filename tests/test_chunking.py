"""The ``logit_chunk_size = "auto"`` rule (opd_jax.chunking.auto_logit_chunk_size) and how a
TrainConfig resolves it; the compiled effect is in tests/test_plan.py (the same plan unchunked does
not fit, with "auto" it does)."""

import dataclasses

import pytest
from hypothesis import given, strategies as st

from opd_jax import chunking
from opd_jax.config import TrainConfig


@given(vocab=st.integers(2, 300_000), tokens=st.integers(1, 10**7), memory=st.integers(2**26, 2**37))
def test_auto_chunk_is_the_largest_power_of_two_within_the_budget(vocab, tokens, memory):
    per_token, budget = 12 * vocab, int(memory / 32)
    try:
        chunk = chunking.auto_logit_chunk_size(vocab_size=vocab, tokens_per_device=tokens, device_memory_bytes=memory)
    except ValueError as error:
        assert per_token > budget and str(per_token) in str(error)
        return
    if tokens * per_token <= budget:
        assert chunk is None
    else:
        assert chunk & (chunk - 1) == 0 and chunk * per_token <= budget < 2 * chunk * per_token


def test_a_vocabulary_that_cannot_fit_is_refused_naming_the_bytes():
    with pytest.raises(ValueError, match=r"one token's logits need 1200000000 bytes .*vocab_size 100000000"):
        chunking.auto_logit_chunk_size(vocab_size=10**8, tokens_per_device=1, device_memory_bytes=16 * 2**30)


def test_train_config_resolves_auto_from_its_rows_and_keeps_explicit_values():
    config = TrainConfig(prompts_per_step=64, group_size=4)
    assert config.logit_chunk_size == "auto"
    # 256 rows x 8192 slots over 32 shards = 65536 tokens per device of a 95 GiB v5p chip, V = 151936.
    resolved = config.with_resolved_chunks(vocab_size=151_936, sequence_length=8192, batch_shards=32,
                                           device_memory_bytes=95 * 2**30)
    assert resolved.logit_chunk_size == 1024
    assert dataclasses.replace(resolved, logit_chunk_size="auto") == config
    for explicit in (None, 7):
        fixed = TrainConfig(logit_chunk_size=explicit)
        assert fixed.with_resolved_chunks(vocab_size=10**6, sequence_length=10**4, batch_shards=1,
                                          device_memory_bytes=2**30) is fixed


def test_logit_chunk_size_takes_auto_none_or_a_positive_integer():
    for bad in ("big", 0, -3):
        with pytest.raises(ValueError, match="logit_chunk_size"):
            TrainConfig(logit_chunk_size=bad)
