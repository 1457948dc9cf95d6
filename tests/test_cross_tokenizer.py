"""`opd-jax train --tokenizer-alignment text` on two tiny HF folders whose tokenizers differ (issue 24).

The student's tokenizer is a byte-level BPE trained on one corpus, the teacher's a byte-level BPE
trained on another (other merges, other ids, other size). The run is killed (SIGKILL) after a
checkpoint and resumed: it ends bitwise equal to an uninterrupted run. With one tokenizer, "text"
trains bitwise as "same".
"""

import hashlib
import json
import pathlib
import sys

import pytest

from opd_jax.commands import main

HELPERS = pathlib.Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import faults  # noqa: E402
from hf_fixtures import make_qwen3_folder  # noqa: E402

PROMPTS = ["what is 12 + 30 ?", "add the numbers", "the answer is", "step by step"]
OTHER_CORPUS = ["the numbers add up: 12 + 30 = 42, step by step"] * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_tokenizer")
    student = make_qwen3_folder(root / "student", seed=2, layers=1)
    teacher = make_qwen3_folder(root / "teacher", seed=1, layers=1,
                                tokenizer_options={"corpus": OTHER_CORPUS, "vocab_size": 280})
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root, teacher, student, prompts, faults.child_env(root / "jax_cache")


def _args(teacher, student, prompts, output, *extra):
    return ["--teacher", teacher, "--student", student, "--prompts", prompts, "--output", output, "--quiet",
            "--steps", 3, "--checkpoint-every", 1, "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 6,
            "--max-prompt-length", 24, "--learning-rate", 1e-3, *extra]


def _weights(output: pathlib.Path) -> str:
    return hashlib.sha256((output / "student" / "model.safetensors").read_bytes()).hexdigest()


def test_same_refuses_another_tokenizer_naming_the_option(setup, capsys):
    root, teacher, student, prompts, _ = setup
    output = root / "refused"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *map(str, _args(teacher, student, prompts, output))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "BPE merges mismatch" in err
    assert "or set tokenizer_alignment 'text' to distil across tokenizers" in err
    assert not output.exists()


def test_text_alignment_survives_a_kill_bitwise(setup):
    root, teacher, student, prompts, env = setup
    text = ("--tokenizer-alignment", "text")
    reference = root / "uninterrupted"
    child = faults.Child(faults.train_argv(*_args(teacher, student, prompts, reference, *text)), env,
                         root / "uninterrupted.log")
    assert child.wait() == 0, child.output()[-4000:]
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0 < r["teacher_kl"] < 100 and r["teacher_seconds"] > 0 for r in records)
    objective = json.loads((reference / "config.json").read_text())["objective"]
    assert (objective["tokenizer_alignment"], objective["alignment_credit"]) == ("text", "characters")

    killed = root / "killed"
    child = faults.Child(faults.train_argv(*_args(teacher, student, prompts, killed, *text)), env, root / "killed.log")
    faults.kill_after_checkpoint(child.process, killed, 2)
    child.kill_if_running()
    assert not (killed / "student").exists()
    child = faults.Child(faults.train_argv(*_args(teacher, student, prompts, killed, *text)), env, root / "resumed.log")
    assert child.wait() == 0, child.output()[-4000:]
    assert "resuming from step" in child.output()
    assert _weights(killed) == _weights(reference)
    assert [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_one_tokenizer_text_trains_bitwise_as_same(setup):
    root, _, student, prompts, env = setup
    teacher = make_qwen3_folder(root / "same_tokenizer_teacher", seed=1, layers=1)
    outputs = {}
    for alignment in ("same", "text"):
        outputs[alignment] = root / f"one_tokenizer_{alignment}"
        argv = _args(teacher, student, prompts, outputs[alignment], "--tokenizer-alignment", alignment, "--steps", 2)
        child = faults.Child(faults.train_argv(*argv), env, root / f"one_{alignment}.log")
        assert child.wait() == 0, child.output()[-4000:]
    assert _weights(outputs["same"]) == _weights(outputs["text"])
    losses = {a: [json.loads(line)["loss"] for line in (o / "metrics.jsonl").read_text().splitlines()]
              for a, o in outputs.items()}
    assert losses["same"] == losses["text"]


def test_the_toy_task_distils_its_digit_pair_teacher(tmp_path, capsys):
    """``opd-jax demo --task arithmetic_cross_tokenizer`` end to end (2 steps): the teacher reads
    digits in pairs, the student one character at a time, and the run trains with ``"text"``."""
    from opd_jax import tasks

    task = tasks.get_task("arithmetic_cross_tokenizer")
    setup = task.setup(train_problems=8, eval_problems=4)
    reader = setup.prompts.teacher_text
    assert len(reader.tokenizers[0]) == 120 and len(setup.tokenizer) == 20 and not reader.identical
    assert reader.prompt_mask[0].sum() < setup.prompts.mask.sum()  # "57+68=" is 4 teacher tokens, 6 student
    assert main(["demo", "--task", "arithmetic_cross_tokenizer", "--divergence", "js", "--estimator", "opd_plus",
                 "--steps", "2", "--eval-problems", "8", "--output", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    assert (run["config"]["tokenizer_alignment"], run["config"]["alignment_credit"]) == ("text", "characters")
    records = [json.loads(line) for line in next(tmp_path.rglob("metrics.jsonl")).read_text().splitlines()]
    assert [r["step"] for r in records if "teacher_kl" in r] == [1, 2]
    assert all(0 <= r["teacher_kl"] < 100 for r in records if "teacher_kl" in r)


def test_plan_sizes_the_teacher_on_its_own_tokens_measured_on_the_prompts(setup, tmp_path, capsys):
    """``opd-jax plan --tokenizer-alignment text --prompts F``: the teacher's slots are its measured
    tokens per student token times the student's (the response rounded up to a bucket), and each
    token gets the byte slots of the longest piece; without "text" the flags are refused."""
    import math

    import transformers

    root, teacher, student, prompts, _ = setup
    tokenizers = [transformers.AutoTokenizer.from_pretrained(folder) for folder in (student, teacher)]
    counts = [sum(len(t(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS) for t in tokenizers]
    ratio = counts[1] / counts[0]
    report_file = tmp_path / "plan.json"
    base = ["plan", "--topology", "local", "--student", str(student), "--teacher", str(teacher), "--prompt-length",
            "16", "--max-new-tokens", "24", "--prompts-per-step", "2", "--group-size", "2"]
    assert main([*base, "--tokenizer-alignment", "text", "--prompts", str(prompts), "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    retokenized = report["retokenized"]
    assert retokenized["teacher_token_ratio"] == pytest.approx(ratio, rel=1e-12) and ratio != 1
    response = 16
    while response < math.ceil(ratio * 24):
        response *= 2
    assert retokenized["teacher_sequence_length"] == math.ceil(ratio * 16) + response
    assert list(report["programs"]) == ["rollout", "teacher", "score", "update"] and report["fits"]
    assert 1 <= retokenized["teacher_piece_bytes"] <= retokenized["byte_slots_per_token"] < 2 * retokenized[
        "teacher_piece_bytes"]
    assert f"{ratio:.3f} teacher tokens per student token" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--teacher-token-ratio", "1.5"])
    assert exit_info.value.code == 2
    assert "--teacher-token-ratio sizes a teacher that re-tokenizes the text" in capsys.readouterr().err
