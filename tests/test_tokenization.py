"""Tokenizers from local folders, prompt encoding with chat templates, and the compatibility check."""

import dataclasses
import pathlib
import sys

import numpy as np
import pytest

from opd_jax import models, tokenization

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
from hf_fixtures import CORPUS  # noqa: E402
from hf_fixtures import make_tokenizer as _make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _make_tokenizer(tmp_path_factory.mktemp("tok"))


def _config(vocab_size):
    return models.DecoderConfig("qwen3", vocab_size, 32, 64, 1, 2, 1, 16)


def test_load_and_encode_left_padded_with_chat_template(folder):
    tokenizer = tokenization.load_tokenizer(folder)
    tokens, mask = tokenization.encode_prompts(tokenizer, ["what is 12 + 30 ?", "add"], max_length=40)
    assert tokens.shape == mask.shape == (2, 40) and tokens.dtype == np.int32
    for row, text in enumerate(["what is 12 + 30 ?", "add"]):
        real = tokens[row][mask[row]].tolist()
        assert mask[row, -1] and mask[row].sum() == len(real)  # left padded
        expected = tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
        assert real == expected
        assert np.all(tokens[row][~mask[row]] == tokenizer.pad_token_id)
    assert tokenizer.decode(tokens[0][mask[0]]).endswith("<|im_start|>assistant\n")
    plain, plain_mask = tokenization.encode_prompts(tokenizer, ["the answer"], max_length=8, use_chat_template=False)
    assert plain[0][plain_mask[0]].tolist() == tokenizer.encode("the answer")


def test_too_long_prompt_and_missing_tokenizer_are_named(folder, tmp_path):
    tokenizer = tokenization.load_tokenizer(folder)
    # 1-based numbers (or the caller's labels), every over-long prompt named with its length.
    with pytest.raises(ValueError, match=r"1 prompt\(s\) longer than max_length 14: prompt 2 has \d+ tokens"):
        tokenization.encode_prompts(tokenizer, ["add", "step by step we add the numbers"], max_length=14)
    with pytest.raises(ValueError, match=r"p.jsonl:7 has \d+ tokens, p.jsonl:9 has \d+ tokens \(the longest"):
        tokenization.encode_prompts(tokenizer, ["step by step we add", "add", "step by step we add the numbers"],
                                    max_length=14, labels=["p.jsonl:7", "p.jsonl:8", "p.jsonl:9"])
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        tokenization.load_tokenizer(tmp_path)


def test_compatible_pair_passes(folder, tmp_path):
    teacher = tokenization.load_tokenizer(folder)
    student = tokenization.load_tokenizer(_make_tokenizer(tmp_path / "copy"))
    # An independently built pair with chat templates, so every check (chat-template ids included) runs.
    assert student is not teacher and teacher.chat_template and student.chat_template
    assert tokenization.check_compatible(teacher, student, _config(512), _config(512)) is None
    # Boundary: an output layer exactly as large as the tokenizer is enough.
    exact = _config(len(teacher))
    assert tokenization.check_compatible(teacher, student, exact, exact) is None


def test_mismatches_fail_loudly_naming_both_sides(folder, tmp_path):
    teacher = tokenization.load_tokenizer(folder)
    other_corpus = tokenization.load_tokenizer(
        _make_tokenizer(tmp_path / "other", corpus=["completely different words here"] * 20 + CORPUS[:2])
    )
    with pytest.raises(ValueError, match="teacher/student (tokenizer size|token ids of the probe text) mismatch"):
        tokenization.check_compatible(teacher, other_corpus, _config(512), _config(512))
    other_eos = tokenization.load_tokenizer(_make_tokenizer(tmp_path / "eos", eos="<|im_start|>"))
    with pytest.raises(ValueError, match=r"teacher/student eos_token_id mismatch: teacher \d+, student \d+"):
        tokenization.check_compatible(teacher, other_eos, _config(512), _config(512))
    with pytest.raises(ValueError, match=r"vocab_size \(config.json\) mismatch: teacher 512, student 1024"):
        tokenization.check_compatible(teacher, teacher, _config(512), _config(1024))
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        small = dataclasses.replace(_config(512), vocab_size=len(teacher) - 1)
        tokenization.check_compatible(teacher, teacher, small, small)
