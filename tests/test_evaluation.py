"""Math benchmarks (opd_jax.evaluation, `opd-jax eval --dataset`): math-verify's verdicts, avg@k / pass@k
and their intervals against closed forms, scoring of fixed responses, the command end to end on a tiny
random HF model built here, and bad input."""

import json
import math
import pathlib
import re
import sys
import threading

import numpy as np
import pytest

from opd_jax import evaluation
from opd_jax.commands import main

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
from hf_fixtures import make_qwen3_folder  # noqa: E402

# GSM8K-style problems written for these tests (answers: 72, 5, 10, 3/4).
GSM8K_STYLE = [
    {"prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
               "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"messages": [{"role": "system", "content": "Put the final answer in \\boxed{}."},
                  {"role": "user", "content": "Tom has 3 apples and buys 2 more. How many apples does he have?"}],
     "answer": 5},
    {"prompt": "A pen costs 2 dollars. How much do 5 pens cost, in dollars?", "answer": "10"},
    {"prompt": "What is 3 divided by 4, as a fraction?", "answer": "\\dfrac{3}{4}"},
]


def _verdict(reference: str, response: str) -> bool:
    return evaluation.check_response(evaluation.parse_reference(reference), response)


# --- math-verify ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reference, response, expected", [
    ("42", "We add: 12 + 30 = 42. The answer is \\boxed{42}.", True),
    ("42", "first 7, then \\boxed{42}, and 13 is not it", True),      # \boxed{} wins over later numbers
    ("42", "so the total is 42.", True),
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("0.5", "$\\frac{1}{2}$", True),
    ("0.5", "The answer is 1/2", True),
    ("\\dfrac{3}{4}", "so \\boxed{0.75}", True),                      # a bare LaTeX reference, read as $...$
    ("(1, 2)", "\\boxed{(1, 2)}", True),                               # an interval, not the number 2
    ("1,000", "\\boxed{1000}", True),
    ("1000", "It is 1,000 meters.", True),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "#### 72", True),      # GSM8K solution: what follows ####
    ("42", "\\boxed{41}", False),
    ("42", "The answer is 41.", False),
    ("42", "12 + 30 = 42, so 43", False),                              # no \boxed: the last number counts
    ("12", "twelve", False),                                           # words are not numbers
    ("0.5", "50\\%", False),                                           # a percentage is not the fraction
    ("42", "I don't know.", False),                                    # no answer at all
    ("42", "", False),
])
def test_math_verify_verdicts(reference, response, expected):
    assert _verdict(reference, response) is expected


@pytest.mark.parametrize("response", ["12 dollars", "The answer is 12 dollars.", "It is 12 km", "12km",
                                      "\\boxed{12\\text{ km}}", "\\boxed{12 \\mathrm{km}}", "\\boxed{\\$12}", "$12"])
def test_math_verify_accepts_a_number_followed_by_a_unit(response):
    # Recorded, not tuned: math-verify (0.9) extracts the number and drops the unit, so "12 km" and
    # "12 dollars" both count as the reference 12 (it cannot tell a wrong unit from a right one).
    assert _verdict("12", response) is True


def test_math_verify_works_outside_the_main_thread():
    # Its timeouts are SIGALRM timers, which Python refuses outside the main thread: there the wrapper
    # runs without them instead of failing.
    verdicts = []
    worker = threading.Thread(target=lambda: verdicts.append((_verdict("42", "\\boxed{42}"),
                                                              _verdict("42", "\\boxed{41}"))))
    worker.start()
    worker.join()
    assert verdicts == [(True, False)]


# --- avg@k, pass@k and intervals -------------------------------------------------------------------

def test_pass_at_k_closed_forms():
    assert evaluation.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert evaluation.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert evaluation.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert evaluation.pass_at_k(5, 2, 4) == 1.0 and evaluation.pass_at_k(5, 2, 5) == 1.0  # n - c < k
    assert evaluation.pass_at_k(5, 0, 5) == 0.0 and evaluation.pass_at_k(5, 5, 1) == 1.0
    np.testing.assert_allclose(evaluation.pass_at_k(4, [0, 1, 2, 3, 4], 2), [0, 0.5, 5 / 6, 1, 1])
    # Exact big integers: n = 1000 loses nothing (1 - C(999, 1)/C(1000, 1) = 1/1000).
    assert evaluation.pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-15)


def test_pass_at_k_is_unbiased_by_exact_expectation():
    # E_c[pass@k estimate] over c ~ Binomial(n, p) is 1 - (1 - p)^k, the chance that k fresh samples
    # hold a right one (the estimator's defining property, Chen et al. 2021).
    n, p = 7, 0.3
    c = np.arange(n + 1)
    pmf = np.array([math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in c])
    for k in range(1, n + 1):
        assert float(pmf @ evaluation.pass_at_k(n, c, k)) == pytest.approx(1 - (1 - p) ** k, abs=1e-14)


@pytest.mark.parametrize("n, c, k, message", [(5, 2, 0, r"k = 0 must be in \[1, num_samples = 5\]"),
                                              (5, 2, 6, r"k = 6 must be in \[1, num_samples = 5\]"),
                                              (5, 6, 1, r"num_correct = 6 must be in \[0, num_samples = 5\]")])
def test_pass_at_k_rejects_bad_arguments(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        evaluation.pass_at_k(n, c, k)


def test_interval_is_the_normal_approximation_over_problems():
    values = [1.0, 0.0, 0.5, 0.5]
    # By hand: mean 0.5, sample variance (0.25 + 0.25 + 0 + 0) / 3 = 1/6, half-width 1.96·√(1/6)/√4.
    half = 1.959963984540054 * math.sqrt(1 / 6) / 2
    estimate = evaluation.mean_with_interval(values)
    assert (estimate.value, estimate.low, estimate.high) == pytest.approx((0.5, 0.5 - half, 0.5 + half))
    assert estimate.low == pytest.approx(0.099924, abs=1e-6)
    clipped = evaluation.mean_with_interval([1.0, 1.0, 1.0, 0.0])  # 0.75 ± 0.49: clipped at 1
    assert clipped.high == 1.0 and clipped.low == pytest.approx(0.75 - 1.959963984540054 * 0.5 / 2)
    assert evaluation.mean_with_interval([1.0, 1.0]) == evaluation.Estimate(1.0, 1.0, 1.0)  # s = 0
    assert evaluation.mean_with_interval([0.3]) == evaluation.Estimate(0.3, None, None)   # one problem
    with pytest.raises(ValueError, match="m >= 1"):
        evaluation.mean_with_interval([])


def test_summarize_on_fixed_verdicts():
    # 3 problems × 5 samples with 2, 0 and 5 right.
    correct = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    metrics = evaluation.summarize(correct, ks=(5, 1, 2))
    assert list(metrics) == ["avg@5", "pass@1", "pass@2", "pass@5"]
    assert metrics["avg@5"].value == pytest.approx((0.4 + 0 + 1) / 3)
    assert metrics["pass@1"].value == pytest.approx(metrics["avg@5"].value)   # c/n per problem
    assert metrics["pass@2"].value == pytest.approx((0.7 + 0 + 1) / 3)
    assert metrics["pass@5"].value == pytest.approx(2 / 3)
    half = 1.959963984540054 * np.std([0.7, 0.0, 1.0], ddof=1) / math.sqrt(3)
    assert metrics["pass@2"].low == pytest.approx(max(0.0, 1.7 / 3 - half))
    assert metrics["pass@2"].high == pytest.approx(min(1.0, 1.7 / 3 + half))
    assert list(evaluation.summarize(correct)) == ["avg@5", "pass@1", "pass@5"]  # default ks: 1 and K


# --- datasets and scoring of fixed responses ---------------------------------------------------------

def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_problems_keeps_order_sources_and_answers(tmp_path):
    path = _write_jsonl(tmp_path / "gsm.jsonl", GSM8K_STYLE)
    problems = evaluation.read_problems(path)
    assert [p.source for p in problems] == [f"{path}:{i}" for i in range(1, 5)]
    assert problems[1].prompt == GSM8K_STYLE[1]["messages"] and problems[1].answer == "5"
    other = _write_jsonl(tmp_path / "other.jsonl", [{"question": "1 + 1?", "solution": "2"}])
    (problem,) = evaluation.read_problems(other, answer_key="solution", question_key="question")
    assert (problem.prompt, problem.answer) == ("1 + 1?", "2")


def test_score_responses_counts_right_and_wrong(tmp_path):
    problems = evaluation.read_problems(_write_jsonl(tmp_path / "gsm.jsonl", GSM8K_STYLE))
    responses = [
        ["24 + 48 = 72. #### 72", "\\boxed{72}", "They sold 70 clips."],
        ["He has \\boxed{5} apples.", "3 + 2 = 6", "no idea"],
        ["5 pens cost 10 dollars.", "\\boxed{\\$10}", "The answer is 12."],
        ["\\boxed{\\frac{3}{4}}", "0.75", "\\boxed{4/3}"],
    ]
    correct = evaluation.score_responses(problems, responses)
    np.testing.assert_array_equal(correct, [[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    metrics = evaluation.summarize(correct)
    assert metrics["avg@3"].value == pytest.approx(7 / 12) and metrics["pass@3"].value == 1.0
    with pytest.raises(ValueError, match="expected 4 non-empty lists of one length"):
        evaluation.score_responses(problems, responses[:3])


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "2 + 2?"}', r"d.jsonl:3: no 'answer' field \(the reference answer, --answer-key\); keys present: \['prompt'\]"),
    ('{"prompt": "2 + 2?", "answer": null}', r"d.jsonl:3: 'answer' must be a string or a number, got null"),
    ('{"prompt": "2 + 2?", "answer": " "}', r"d.jsonl:3: math-verify finds no answer in 'answer' ' '"),
    ('{"text": "2 + 2?", "answer": "4"}', r"d.jsonl:3: needs a non-empty string 'prompt' or a non-empty 'messages'"),
    ('{not json', r"d.jsonl:3: not valid JSON"),
    ('[1, 2]', r"d.jsonl:3: expected a JSON object, got list"),
])
def test_read_problems_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1 + 1?", "answer": "2"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        evaluation.read_problems(path)


def test_read_problems_missing_file_empty_file_and_question_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset .*absent.jsonl does not exist"):
        evaluation.read_problems(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl: no problems"):
        evaluation.read_problems(tmp_path / "empty.jsonl")
    path = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "1 + 1?", "answer": "2"}])
    with pytest.raises(ValueError, match=r"q.jsonl:1: needs a non-empty string 'question' \(the question, --question-key\)"):
        evaluation.read_problems(path, question_key="question")


@pytest.mark.parametrize("options, message", [
    ({"samples": 0}, r"MathEvalConfig.samples must be an integer >= 1, got 0"),
    ({"samples": 2, "pass_k": (1, 4)}, r"MathEvalConfig.pass_k: k = 4 must be in \[1, samples = 2\]"),
    ({"temperature": -1.0}, r"MathEvalConfig.temperature must be >= 0"),
    ({"top_p": 0.0}, r"MathEvalConfig.top_p must be None or in \(0, 1\]"),
])
def test_math_eval_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        evaluation.MathEvalConfig(**options)


# --- opd-jax eval --dataset end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    # The shared tokenizer splits these questions into up to ~150 tokens: room for them and the response.
    model = make_qwen3_folder(root / "model", seed=0, layers=1, max_position_embeddings=256)
    dataset = _write_jsonl(root / "gsm8k_style.jsonl", GSM8K_STYLE)
    return model, dataset


def _eval_args(model, *datasets, extra=()):
    args = ["eval", "--model", str(model), "--samples", "3", "--max-new-tokens", "6", "--batch-size", "4", "--quiet"]
    for dataset in datasets:
        args += ["--dataset", str(dataset)]
    return args + list(extra)


def test_eval_on_datasets_end_to_end(tiny, tmp_path, capsys):
    model, dataset = tiny
    second = _write_jsonl(tmp_path / "second.jsonl", GSM8K_STYLE[2:])
    output = tmp_path / "out" / "eval.json"
    assert main(_eval_args(model, dataset, second, extra=["--pass-k", "2", "3", "1", "--json", str(output)])) == 0
    summary = json.loads(output.read_text())
    assert summary["config"]["samples"] == 3 and summary["config"]["pass_k"] == [1, 2, 3]
    assert [d["dataset"] for d in summary["datasets"]] == [str(dataset), str(second)]
    assert [d["problems"] for d in summary["datasets"]] == [4, 2]
    for record in summary["datasets"]:
        metrics = record["metrics"]
        assert list(metrics) == ["avg@3", "pass@1", "pass@2", "pass@3"]
        assert metrics["pass@1"]["value"] == pytest.approx(metrics["avg@3"]["value"])
        for estimate in metrics.values():
            assert 0 <= estimate["low"] <= estimate["value"] <= estimate["high"] <= 1
        assert metrics["avg@3"]["value"] <= metrics["pass@2"]["value"] <= metrics["pass@3"]["value"]
        assert 1 <= record["response_length"] <= 6 and 0 <= record["truncated"] <= 1
    out = capsys.readouterr().out
    assert "| dataset | problems | avg@3 | pass@1 | pass@2 | pass@3 | response length | truncated |" in out
    assert f"| {dataset} | 4 | " in out and f"| {second} | 2 | " in out
    # The training-time hook measures the same numbers with the same settings.
    from opd_jax import models, tokenization

    decoder, _ = models.from_pretrained(model)
    hook = evaluation.math_evaluator(tokenization.load_tokenizer(model), evaluation.read_problems(dataset), samples=3,
                                     max_new_tokens=6, batch_size=4, pass_k=(1, 2, 3))
    measured = hook(decoder)
    assert set(measured) == {"avg@3", "pass@1", "pass@2", "pass@3", "response_length", "truncated"}
    first = summary["datasets"][0]
    for name, value in measured.items():
        expected = first["metrics"][name]["value"] if name in first["metrics"] else first[name]
        assert value == pytest.approx(expected), name


def test_eval_counts_injected_responses(tiny, tmp_path, monkeypatch, capsys):
    # A random model gets ~nothing right: fix the decoded responses to check the command's counting.
    model, dataset = tiny
    fixed = [["#### 72", "\\boxed{72}", "70"], ["5", "6", "7"], ["\\boxed{11}", "12", "13"],
             ["\\boxed{0.75}", "3/4", "\\boxed{3/4}"]]

    def sample(model, tokenizer, problems, config, **_):
        assert config.samples == 3 and len(problems) == 4
        return evaluation.Responses(texts=fixed, lengths=np.full((4, 3), 2), truncated=np.zeros((4, 3), bool))

    monkeypatch.setattr(evaluation, "sample_responses", sample)
    output = tmp_path / "eval.json"
    assert main(_eval_args(model, dataset, extra=["--json", str(output)])) == 0
    metrics = json.loads(output.read_text())["datasets"][0]["metrics"]
    # Right per problem: 2, 1, 0, 3 of 3.
    per_problem = np.array([2, 1, 0, 3]) / 3
    assert metrics["avg@3"]["value"] == pytest.approx(per_problem.mean())
    assert metrics["pass@3"]["value"] == pytest.approx(0.75)
    half = 1.959963984540054 * per_problem.std(ddof=1) / 2
    assert (metrics["avg@3"]["low"], metrics["avg@3"]["high"]) == pytest.approx(
        (per_problem.mean() - half, per_problem.mean() + half))
    assert "| 0.500 [0." in capsys.readouterr().out


def test_greedy_with_several_samples_warns_and_repeats_one_response(tiny, tmp_path, capsys):
    model, dataset = tiny
    output = tmp_path / "eval.json"
    assert main(_eval_args(model, dataset, extra=["--temperature", "0", "--json", str(output)])) == 0
    assert "--temperature 0 is greedy decoding" in capsys.readouterr().err
    metrics = json.loads(output.read_text())["datasets"][0]["metrics"]
    assert metrics["pass@3"]["value"] == metrics["pass@1"]["value"] == metrics["avg@3"]["value"]


@pytest.mark.parametrize("extra, message", [
    (["--task", "arithmetic"], "argument --task: not allowed with argument --dataset"),
    (["--teacher", "t"], "--teacher applies to --task evaluation only"),
    (["--problems", "8"], "--problems applies to --task evaluation only"),
    (["--pass-k", "5"], r"--pass-k: k = 5 must be in \[1, samples = 3\]"),
    (["--top-p", "2"], r"--top-p must be None or in \(0, 1\]"),
    (["--max-new-tokens", "200"], r"= \d+ positions, more than the model's max_position_embeddings 256; lower "
                                  r"--max-new-tokens to at most \d+"),
    (["--max-prompt-length", "8"], r"gsm8k_style.jsonl:1 has \d+ tokens.*raise --max-prompt-length"),
])
def test_bad_option_combinations_fail_before_anything_is_written(tiny, tmp_path, capsys, extra, message):
    model, dataset = tiny
    output = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit_info:
        main(_eval_args(model, dataset, extra=[*extra, "--json", str(output)]))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()


def test_math_options_are_refused_for_the_toy_task(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "m", "--samples", "4", "--temperature", "0.5"])
    assert exit_info.value.code == 2
    assert "--samples, --temperature apply to --dataset evaluation only, not to the toy task arithmetic" in (
        capsys.readouterr().err)


def test_bad_datasets_are_named_before_the_model_is_loaded(tmp_path, capsys):
    # --model does not exist: the dataset errors must come first.
    good = _write_jsonl(tmp_path / "good.jsonl", GSM8K_STYLE)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1?", "answer": "2"}\n{"prompt": "2 + 2?", "solution": "4"}\n')
    output = tmp_path / "eval.json"
    absent = tmp_path / "no-model"
    for dataset, message in ((bad, f"{bad}:2: no 'answer' field"),
                             (tmp_path / "missing.jsonl", f"dataset {tmp_path / 'missing.jsonl'} does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            main(_eval_args(absent, good, dataset, extra=["--json", str(output)]))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_eval_args(absent, good, extra=["--answer-key", "solution"]))
    assert f"{good}:1: no 'solution' field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_eval_args(absent, good, extra=["--json", str(output)]))
    assert str(absent) in capsys.readouterr().err  # only then is the model looked at
    with pytest.raises(SystemExit):
        main(_eval_args(absent, good, extra=["--json", str(tmp_path)]))
    assert "is a directory" in capsys.readouterr().err
    assert not output.exists()


# --- opd-jax train --eval-dataset: the same evaluation as a training hook --------------------------------

def _train_args(model, prompts, output, *extra):
    return ["train", "--teacher", str(model), "--student", str(model), "--prompts", str(prompts), "--output",
            str(output), "--quiet", "--steps", "2", "--prompts-per-step", "2", "--group-size", "1",
            "--max-new-tokens", "4", "--max-prompt-length", "160", *extra]


def test_train_eval_dataset_logs_held_out_metrics_before_and_after(tiny, tmp_path, capsys):
    model, dataset = tiny
    output = tmp_path / "run"
    assert main(_train_args(model, dataset, output, "--eval-dataset", str(dataset), "--eval-samples", "2")) == 0
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval_avg@2" in r}
    assert sorted(evals) == [0, 2]
    for record in evals.values():
        assert 0 <= record["eval_avg@2"] <= record["eval_pass@2"] <= 1
        assert record["eval_pass@1"] == pytest.approx(record["eval_avg@2"])
    # The final evaluation is the last record; the closing line still reports step 2's training figures.
    assert "eval_avg@2" in records[-1]
    trained = [r for r in records if "teacher_kl" in r]
    assert [r["step"] for r in trained] == [1, 2]
    final_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"step 2: teacher KL {trained[-1]['teacher_kl']:.4f}" in final_line and "KL nan" not in final_line
    assert f"evaluation at step 2: avg@2 {evals[2]['eval_avg@2']:.4f}" in final_line


@pytest.mark.parametrize("extra, message", [
    (("--eval-every", "1"), r"--eval-every needs --eval-dataset"),
    (("--eval-dataset", "{bad}"), r"bad\.jsonl:2: .*'answer'"),
])
def test_train_eval_errors_are_named_before_anything_is_written(tiny, tmp_path, capsys, extra, message):
    model, dataset = tiny
    bad = _write_jsonl(tmp_path / "bad.jsonl", [GSM8K_STYLE[0], {"prompt": "no answer here"}])
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(_train_args(model, dataset, output, *(e.format(bad=bad) for e in extra)))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()
