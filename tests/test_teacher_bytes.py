"""The byte view of a teacher with another tokenizer (``alignment_credit = "characters"``, issue 24).

float64 throughout (conftest turns x64 on), except the model's masses (float32, as trained).

Each check is against a brute-force reference written here: prefix masses by ``startswith`` over
every piece in float64, the per-byte values from their definition, and the model's masses from its
full log-softmax.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers
from flax import nnx

from opd_jax import models
from opd_jax.alignment import aligned_teacher_logp
from opd_jax.retokenize import align_response
from opd_jax.sampling import positions_from_mask
from opd_jax.tasks import arithmetic
from opd_jax.teacher_bytes import byte_log_probs, byte_slots, prefix_log_masses, vocabulary_bytes

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
from hf_fixtures import make_tokenizer  # noqa: E402

TEXTS = ["what is 12 + 30 ? the answer is 42", "café 你好 step by step", "", "  two  spaces\nand a line"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A byte-level BPE student and a byte-level BPE teacher of other merges (both split "é" and "你")."""
    student = transformers.AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("student")))
    teacher = transformers.AutoTokenizer.from_pretrained(make_tokenizer(
        tmp_path_factory.mktemp("teacher"), corpus=["café 你好 two spaces"] * 30, vocab_size=280))
    return student, teacher


def _reference_values(vocabulary, teacher_ids, stopped, log_q_MxV) -> list[float]:
    """Each byte's value from the definition (module docstring of opd_jax.teacher_bytes), by brute force."""
    text_pieces = [(v, p) for v, p in enumerate(vocabulary.pieces) if not vocabulary.special[v]]

    def mass(row, prefix):
        return np.logaddexp.reduce([row[v] for v, p in text_pieces if p.startswith(prefix)])

    values, stop = [], 0.0
    for t, token in enumerate(teacher_ids):
        row = log_q_MxV[t]
        if vocabulary.special[token]:
            values.append(stop + row[token])
            stop = 0.0
            continue
        piece, before = vocabulary.pieces[token], 0.0
        for d in range(len(piece)):
            now = mass(row, piece[: d + 1])
            values.append(now - before + (stop if d == 0 else 0.0))
            before = now
        stop = row[token] - before
    if not stopped and values:
        values[-1] += stop
    return values


def _random_rows(seed, tokens, vocab):
    logits = 2.0 * np.random.default_rng(seed).standard_normal((tokens, vocab))
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def test_pieces_spell_every_text_and_ranges_hold_exactly_the_prefixed_pieces(pair):
    _, teacher = pair
    vocabulary = vocabulary_bytes(teacher, len(teacher) + 3)  # a model vocabulary padded past the tokenizer
    assert vocabulary.special[-3:].all() and vocabulary.special[teacher.eos_token_id]
    for text in TEXTS:
        ids = teacher(text, add_special_tokens=False)["input_ids"]
        assert b"".join(vocabulary.pieces[i] for i in ids) == text.encode("utf-8")
    for prefix in (b"t", b"th", "é".encode()[:1], "你".encode()[:2], b" ", b"\xff"):
        lo, hi = vocabulary.prefix_range(prefix)
        inside = {v for v in range(len(vocabulary.pieces)) if lo <= vocabulary.rank_V[v] < hi}
        assert inside == {v for v, p in enumerate(vocabulary.pieces)
                          if not vocabulary.special[v] and p.startswith(prefix)}


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stopped", [True, False])
def test_byte_values_match_the_definition_and_sum_to_the_sequence(pair, text, stopped):
    student, teacher = pair
    ids = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id] * stopped
    aligned = align_response(student, teacher, ids, stopped=stopped, teacher="bpe")
    vocabulary = vocabulary_bytes(teacher, len(teacher))
    slots = byte_slots(vocabulary, aligned.teacher_ids, aligned.text, aligned.student_ends, stopped=stopped,
                       depth=8, teacher="bpe")
    log_q = _random_rows(len(text), len(aligned.teacher_ids), len(teacher))
    logp = log_q[np.arange(len(aligned.teacher_ids)), aligned.teacher_ids]
    masses = np.full(slots.lo_MxD.shape, -np.inf)
    for t in range(len(aligned.teacher_ids)):
        for d in range(8):
            chosen = (vocabulary.rank_V >= slots.lo_MxD[t, d]) & (vocabulary.rank_V < slots.hi_MxD[t, d])
            if chosen.any():
                masses[t, d] = np.logaddexp.reduce(log_q[t][chosen])
    values = byte_log_probs(*(jnp.asarray(a)[None] for a in (logp, masses, slots.slot_mask_MxD, slots.depth_M,
                                                             slots.end_slot_M)))[0]
    got = np.asarray(values)[slots.slot_mask_MxD.reshape(-1)]
    np.testing.assert_allclose(got, _reference_values(vocabulary, aligned.teacher_ids, stopped, log_q),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.sum(), logp.sum(), rtol=0, atol=1e-12)
    # Carried onto the student's tokens: the per-token shares still sum to the teacher's sequence log-prob.
    student_logp = jnp.asarray(np.random.default_rng(1).uniform(-3, 0, len(ids)))[None]
    carried = aligned_teacher_logp(student_logp, values[None], jnp.asarray(slots.student_chunk)[None],
                                   jnp.asarray(slots.slot_chunk_MxD.reshape(-1))[None], jnp.ones((1, len(ids)), bool),
                                   jnp.asarray(slots.slot_mask_MxD.reshape(-1))[None])
    np.testing.assert_allclose(float(carried.sum()), logp.sum(), rtol=0, atol=1e-11)
    if "é" in text:  # the student's two byte tokens of "é" form one chunk
        split = [n for n in range(len(aligned.student_ends) - 1) if aligned.student_ends[n] == aligned.student_ends[n + 1]]
        assert split and all(slots.student_chunk[n] == slots.student_chunk[n + 1] for n in split)


def test_a_special_token_inside_the_text_holds_its_whole_log_prob():
    """The student wrote "<unk>" (a special token on the teacher's side too): one slot, its bytes' end."""
    teacher = arithmetic.build_digit_pair_tokenizer()
    student = arithmetic.build_tokenizer()
    text = "7+3+1=11<unk>01"
    ids = student(text, add_special_tokens=False)["input_ids"]
    aligned = align_response(student, teacher, ids, stopped=False, teacher="pairs")
    vocabulary = vocabulary_bytes(teacher, len(teacher))
    slots = byte_slots(vocabulary, aligned.teacher_ids, aligned.text, aligned.student_ends, stopped=False, depth=2,
                       teacher="pairs")
    unk = aligned.teacher_ids.index(teacher.unk_token_id)
    assert slots.depth_M[unk] == 0 and slots.slot_mask_MxD[unk].tolist() == [True, False]
    log_q = _random_rows(0, len(aligned.teacher_ids), len(teacher))
    logp = log_q[np.arange(len(aligned.teacher_ids)), aligned.teacher_ids]
    masses = np.zeros(slots.lo_MxD.shape)
    for (t, d), lo in np.ndenumerate(slots.lo_MxD):
        chosen = (vocabulary.rank_V >= lo) & (vocabulary.rank_V < slots.hi_MxD[t, d])
        masses[t, d] = np.logaddexp.reduce(log_q[t][chosen]) if chosen.any() else -np.inf
    values = byte_log_probs(*(jnp.asarray(a)[None] for a in (logp, masses, slots.slot_mask_MxD, slots.depth_M,
                                                             slots.end_slot_M)))[0]
    np.testing.assert_allclose(np.asarray(values)[slots.slot_mask_MxD.reshape(-1)],
                               _reference_values(vocabulary, aligned.teacher_ids, False, log_q), rtol=0, atol=1e-12)


def test_a_tokenizer_whose_pieces_do_not_spell_the_text_is_refused_naming_the_other_credit():
    """WordPiece marks word-inner pieces with "##" and drops spaces: its pieces do not spell the text."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[SEP]", "two", "spaces", "sp", "##aces"])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()
    teacher = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                                   eos_token="[SEP]")
    vocabulary = vocabulary_bytes(teacher, len(teacher))
    ids = teacher("two spaces", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"teacher 'wordpiece': its tokens' pieces spell b'twospaces', not the "
                                         r"student's text 'two spaces'.*use alignment_credit 'spread'"):
        byte_slots(vocabulary, ids, "two spaces", [3, 10], stopped=False, depth=8, teacher="wordpiece")


def test_prefix_masses_of_a_model_match_its_full_log_softmax():
    config = models.DecoderConfig("qwen3", 40, 32, 64, 1, 4, 2, 8, max_position_embeddings=32)
    model = models.Decoder(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 40, (2, 9)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], bool)
    rank_V = jnp.asarray(rng.permutation(40), jnp.int32)
    lo = jnp.asarray(rng.integers(0, 30, (2, 9, 3)), jnp.int32)
    hi = lo + jnp.asarray(rng.integers(1, 10, (2, 9, 3)), jnp.int32)
    logp, masses = prefix_log_masses(model, tokens, mask, lo, hi, rank_V, temperature=0.7, chunk_size=5)
    hidden, _ = model.hidden_states(tokens, positions_BxT=positions_from_mask(mask), token_mask_BxT=mask)
    full = jax.nn.log_softmax(np.einsum("bne,ev->bnv", np.asarray(hidden, np.float64),
                                        np.asarray(model.output_projection(), np.float64)) / 0.7, axis=-1)
    for b in range(2):
        for n in range(1, 9):
            if not (mask[b, n] and mask[b, n - 1]):
                assert logp[b, n] == 0
                continue
            np.testing.assert_allclose(logp[b, n], full[b, n - 1, tokens[b, n]], rtol=0, atol=2e-5)
            for d in range(3):
                chosen = (rank_V >= lo[b, n, d]) & (rank_V < hi[b, n, d])
                np.testing.assert_allclose(masses[b, n, d], np.logaddexp.reduce(full[b, n - 1][np.asarray(chosen)]),
                                           rtol=0, atol=2e-5)


def test_the_reader_lays_out_byte_slots_only_for_the_byte_view():
    """TeacherReader.read: chunks (spread) without byte_view; with it, per-row byte slots at the
    teacher's response positions whose student side is one chunk per student token."""
    from opd_jax.retokenize import TeacherReader
    from opd_jax.tokenization import encode_prompts

    student, teacher = arithmetic.build_tokenizer(), arithmetic.build_digit_pair_tokenizer()
    prompts = ["57+68=", "3+4="]
    responses = ["7+8+0=15,5+6+1=12>125", "3+4+0=07>7"]
    encoded = [encode_prompts(t, prompts, max_length=8, use_chat_template=False, pad_id=0) for t in (student, teacher)]
    reader = TeacherReader(student, ("pairs",), (teacher,), (encoded[1][0],), (encoded[1][1],), (64,),
                           (student.eos_token_id,), vocabularies=(vocabulary_bytes(teacher, len(teacher)),))
    rows = [student(r, add_special_tokens=False)["input_ids"] + [student.eos_token_id] for r in responses]
    tokens = np.zeros((2, 24), np.int32)
    mask = np.zeros((2, 24), bool)
    for b, ids in enumerate(rows):
        tokens[b, : len(ids)], mask[b, : len(ids)] = ids, True
    index = np.arange(2)
    chunks = reader.read(tokens, mask, index, np.zeros(2, int))
    assert chunks.bytes is None
    assert chunks.student_chunk_BxL[0, :len(rows[0])].max() < len(rows[0]) - 1  # pairs merge two student tokens
    read = reader.read(tokens, mask, index, np.zeros(2, int), byte_view=True)
    np.testing.assert_array_equal(read.tokens_BxN, chunks.tokens_BxN)
    for b, ids in enumerate(rows):
        np.testing.assert_array_equal(read.student_chunk_BxL[b, : len(ids)], np.arange(len(ids)))
        assert read.bytes.slot_mask_BxNxD[b].sum() == len(responses[b]) + 1  # every byte, and the EOS
    assert read.bytes.lo_BxNxD.shape[-1] == 2  # the longest piece: a digit pair
