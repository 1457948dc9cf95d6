"""Re-tokenizing student responses for a teacher with another tokenizer (issue 24, host side).

Real tokenizers built here with ``tokenizers``: the student a byte-level BPE (it splits "é" and
"你" into byte tokens), the teachers a character-level WordLevel tokenizer and a BPE of other merges.
"""

import pathlib
import sys

import numpy as np
import pytest
import tokenizers
import transformers

from opd_jax.retokenize import align_response, student_token_ends, teacher_encoding

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
from hf_fixtures import make_tokenizer  # noqa: E402

TEXTS = ["what is 12 + 30 ? the answer is 42", "café 你好 step by step", "", "  two  spaces\nand a line"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    folder = make_tokenizer(tmp_path_factory.mktemp("student"))
    return transformers.AutoTokenizer.from_pretrained(folder)


def _characters(alphabet: str, unknown: bool = True):
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *alphabet])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    letters = "".join(sorted(set("".join(TEXTS))))
    other_bpe = make_tokenizer(tmp_path_factory.mktemp("teacher_bpe"), corpus=["café 你好 two spaces"] * 30,
                               vocab_size=280)
    return {"characters": _characters(letters), "bpe": transformers.AutoTokenizer.from_pretrained(other_bpe)}


@pytest.mark.parametrize("text", TEXTS)
def test_student_ends_cover_each_token_and_split_characters_join_the_next(student, text):
    ids = student(text, add_special_tokens=False)["input_ids"]
    ends = student_token_ends(student, ids, text, window=2)
    assert ends == sorted(ends) and (not ids or ends[-1] == len(text))
    # Decoding every prefix: a prefix ending inside a character ends where that character ends.
    prefixes = [student.decode(ids[: n + 1]) for n in range(len(ids))]
    assert ends == [len(p) if not p.endswith("\ufffd") else len(p.rstrip("\ufffd")) + 1 for p in prefixes]
    if "é" in text:  # byte-level BPE splits "é": its first byte's token ends with "é", not before it
        inside = [n for n, p in enumerate(prefixes) if p.endswith("\ufffd")]
        assert inside and ends[inside[0]] == text.index("é") + 1


@pytest.mark.parametrize("name", ["characters", "bpe"])
@pytest.mark.parametrize("text", TEXTS)
def test_chunks_partition_both_sides_and_reassemble_the_text(student, teachers, name, text):
    teacher = teachers[name]
    ids = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    aligned = align_response(student, teacher, ids, stopped=True, teacher=name)
    assert aligned.teacher_ids[-1] == teacher.eos_token_id
    assert len(aligned.student_chunk) == len(ids) and len(aligned.teacher_chunk) == len(aligned.teacher_ids)
    # The last chunk is the two end tokens alone; every chunk spells the same text on both sides.
    assert aligned.student_chunk[-1] == aligned.teacher_chunk[-1]
    assert np.sum(aligned.student_chunk == aligned.student_chunk[-1]) == 1
    for chunk in np.unique(aligned.student_chunk[:-1]):
        student_text = student.decode([i for i, c in zip(ids, aligned.student_chunk) if c == chunk])
        teacher_text = teacher.decode([i for i, c in zip(aligned.teacher_ids, aligned.teacher_chunk) if c == chunk])
        assert student_text == teacher_text
    assert set(aligned.student_chunk.tolist()) == set(aligned.teacher_chunk.tolist())


def test_one_tokenizer_aligns_token_by_token(student):
    text = TEXTS[0]
    ids = student(text, add_special_tokens=False)["input_ids"]
    aligned = align_response(student, student, ids, stopped=False, teacher="same")
    assert aligned.teacher_ids == ids
    np.testing.assert_array_equal(aligned.student_chunk, np.arange(len(ids)))
    np.testing.assert_array_equal(aligned.teacher_chunk, np.arange(len(ids)))


def test_a_teacher_that_does_not_read_the_text_back_is_named(student):
    narrow = _characters("abcdefghijklmnopqrstuvwxyz ")  # no digits: they become <unk>
    with pytest.raises(ValueError, match=r"teacher 'narrow': its tokenizer does not read back the student's text "
                                         r"'what is 12'"):
        teacher_encoding(narrow, "what is 12", teacher="narrow")
