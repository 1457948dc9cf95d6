"""Tokenizers from local folders, prompt encoding with chat templates, and the compatibility check."""

import dataclasses
import re
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


def _edited(folder, tmp_path, name, edit):
    """A copy of the tokenizer in ``folder`` with ``edit(spec)`` applied to its tokenizer.json."""
    import json
    import shutil

    copy = tmp_path / name
    shutil.copytree(folder, copy)
    spec = json.loads((copy / "tokenizer.json").read_text())
    edit(spec)
    (copy / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return tokenization.load_tokenizer(copy)


def _differences(teacher, student, **options):
    return tokenization.compatibility_differences(teacher, student, _config(512), _config(512), **options)


def test_swapped_ordinary_token_ids_are_caught_with_both_tokens_named(folder, tmp_path):
    # Same size, same merges, same special tokens: a probe text need not contain either token.
    teacher = tokenization.load_tokenizer(folder)
    probed = set(teacher.encode(tokenization.DEFAULT_PROBE)) | set(
        teacher.apply_chat_template(list(tokenization.PROBE_CONVERSATION), add_generation_prompt=True)["input_ids"])
    i = next(i for i in range(len(tokenization.PROBE_CONVERSATION), 200) if not {i, i + 1} & probed)
    swapped = tokenization.load_tokenizer(_make_tokenizer(tmp_path / "swapped", swap_ids=(i, i + 1)))
    first, second = teacher.convert_ids_to_tokens([i, i + 1])
    assert swapped.convert_tokens_to_ids([first, second]) == [i + 1, i] and len(swapped) == len(teacher)
    assert _differences(teacher, swapped) == [
        f"teacher/student vocabulary mismatch: 2 token(s) have different ids: {first!r} teacher {i}, student {i + 1}, "
        f"{second!r} teacher {i + 1}, student {i}"
    ]
    with pytest.raises(ValueError, match=r"would not score the same token ids \(1 difference\)"):
        tokenization.check_compatible(teacher, swapped, _config(512), _config(512))


def test_merges_model_options_pre_tokenizer_and_special_flags_are_each_named(folder, tmp_path):
    teacher = tokenization.load_tokenizer(folder)

    def drop_last_merge(spec):
        spec["model"]["merges"] = spec["model"]["merges"][:-1]

    def byte_fallback(spec):
        spec["model"]["byte_fallback"] = True

    def prefix_space(spec):
        spec["pre_tokenizer"]["add_prefix_space"] = True

    def not_special(spec):
        next(t for t in spec["added_tokens"] if t["content"] == "<|im_start|>")["special"] = False

    expected = {
        "merges": (drop_last_merge, r"teacher/student BPE merges mismatch: first difference at position 39 "
                                    r"\(lengths 40 and 39\)"),
        "fallback": (byte_fallback, r"tokenizer model option 'byte_fallback' mismatch: teacher False, student True"),
        "prefix": (prefix_space, r"teacher/student pre_tokenizer mismatch: teacher \{.*\"add_prefix_space\": false"),
        "special": (not_special, r"added/special tokens mismatch: 1 id\(s\) differ: id 1: teacher '<\|im_start\|>' "
                                 r"\(special\), student '<\|im_start\|>'$"),
    }
    for name, (edit, message) in expected.items():
        found = _differences(teacher, _edited(folder, tmp_path, name, edit))
        assert any(re.search(message, d) for d in found), (name, found)


def test_chat_templates_are_compared_by_their_rendering_of_a_probe_conversation(folder, tmp_path):
    teacher = tokenization.load_tokenizer(folder)
    # Renders user and assistant turns as the default does, a system turn differently.
    other = "{% for m in messages %}<|im_start|>{{ 'sys' if m['role'] == 'system' else m['role'] }}\n" \
            "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    other_template = tokenization.load_tokenizer(_make_tokenizer(tmp_path / "other", chat_template=other))
    assert other_template.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        teacher.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    [found] = _differences(teacher, other_template)
    assert found.startswith("teacher/student chat-template rendering of the probe conversation mismatch: "
                            "first difference at position 15 (lengths 263 and 260): teacher 'system\\nY', "
                            "student 'sys\\nYou '")
    no_template = tokenization.load_tokenizer(_make_tokenizer(tmp_path / "none", chat_template=None))
    [found] = _differences(teacher, no_template)
    assert found.startswith("teacher/student chat template mismatch: teacher gives '<|im_start|>system")
    assert found.endswith("student gives 'no chat_template'")
    # Plain-text prompts (--no-chat-template) never use the templates.
    assert _differences(teacher, no_template, chat_template=False) == []


def test_every_difference_is_named_at_once(folder, tmp_path):
    teacher = tokenization.load_tokenizer(folder)
    student = tokenization.load_tokenizer(
        _make_tokenizer(tmp_path / "many", eos="<|im_start|>", chat_template=None, swap_ids=(100, 101))
    )
    with pytest.raises(ValueError) as error:
        tokenization.check_compatible(teacher, student, _config(512), _config(1024))
    message = str(error.value)
    assert "(4 differences)" in message
    for part in ("vocabulary mismatch: 2 token(s) have different ids", "eos_token_id mismatch: teacher 2, student 1",
                 "chat template mismatch",
                 "model vocab_size (config.json) mismatch: teacher 512, student 1024"):
        assert part in message, (part, message)
