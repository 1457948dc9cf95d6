"""`opd-jax train` end to end on tiny HF Qwen3 folders built here, and its bad-input errors."""

import json
import pathlib
import re
import sys

import numpy as np
import pytest

from opd_jax.commands import main

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
from hf_fixtures import make_qwen3_folder, make_tokenizer  # noqa: E402
from test_models import TORCH_PYTHON, _run_reference  # noqa: E402

PROMPTS = ["what is 12 + 30 ?", "add the numbers", "the answer is", "step by step"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_train")
    teacher = make_qwen3_folder(root / "teacher", seed=1, layers=2)
    student = make_qwen3_folder(root / "student", seed=2, layers=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": 1}) + "\n" for p in PROMPTS)
                       + json.dumps({"messages": [{"role": "user", "content": "add 1 and 2"}]}) + "\n")
    return root, teacher, student, prompts


def _args(teacher, student, prompts, output, *extra):
    return ["train", "--teacher", str(teacher), "--student", str(student), "--prompts", str(prompts),
            "--output", str(output), "--quiet", "--steps", "3", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "6", "--max-prompt-length", "24", "--learning-rate", "1e-3", *extra]


def test_train_end_to_end_and_export_loads_in_transformers(folders, tmp_path):
    root, teacher, student, prompts = folders
    config_file = tmp_path / "opd.toml"
    # Sections as in config.json (flat keys work too: see test_cli_input)
    config_file.write_text('[objective]\ndivergence = "generalized_js"\nbeta = 0.3\nestimator = "opd_plus"\n'
                           '[loop]\ncheckpoint_every = 2\n')
    output = tmp_path / "run"
    assert main(_args(teacher, student, prompts, output, "--config", str(config_file), "--gamma", "0.5")) == 0
    saved = json.loads((output / "config.json").read_text())
    objective = saved["objective"]
    assert objective["divergence"] == "generalized_js" and objective["beta"] == 0.3 and objective["gamma"] == 0.5
    assert saved["loop"]["checkpoint_every"] == 2
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    exported = output / "student"
    assert (exported / "tokenizer.json").is_file() and (exported / "model.safetensors").is_file()
    if not TORCH_PYTHON.exists():
        pytest.skip("no PyTorch reference environment")
    tokens = np.random.default_rng(0).integers(0, 300, size=(1, 10)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    _run_reference([{"command": "logits", "checkpoint": str(exported), "tokens": str(tmp_path / "tokens.npy"),
                     "out": str(tmp_path / "logits.npy")}], tmp_path)
    from opd_jax import models

    ours, _ = models.from_pretrained(exported)
    assert np.max(np.abs(np.load(tmp_path / "logits.npy") - np.asarray(ours(tokens)))) <= 1e-4


@pytest.mark.parametrize(
    "line, message",
    [("{not json", r"prompts.jsonl:3: not valid JSON"),
     ('{"text": "hi"}', r"prompts.jsonl:3: needs a non-empty string 'prompt'"),
     ('["a"]', r"prompts.jsonl:3: expected a JSON object")],
)
def test_malformed_prompt_file_names_the_line(folders, tmp_path, line, message, capsys):
    _, teacher, student, _ = folders
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a"}\n\n' + line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(_args(teacher, student, bad, tmp_path / "run"))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_missing_folders_mismatched_tokenizers_and_bad_options_fail_before_any_work(folders, tmp_path, capsys):
    root, teacher, student, prompts = folders
    output = tmp_path / "run"
    cases = [
        (_args(root / "nope", student, prompts, output), f"--teacher: {root / 'nope'} does not exist"),
        (_args(root, student, prompts, output), f"--teacher: no config.json in {root}"),
        (_args(teacher, student, prompts, output, "--gamma", "2"), "gamma must lie in [0.0, 1.0]"),
        (_args(teacher, student, prompts, output, "--divergence", "kl"), "valid names"),
        (_args(teacher, student, prompts, output, "--minibatches", "3"), "minibatches (3) must divide"),
    ]
    other = make_qwen3_folder(tmp_path / "other", seed=3, layers=1)
    make_tokenizer(other, eos="<|im_start|>")  # same vocabulary, different EOS
    cases.append((_args(teacher, other, prompts, output), "teacher/student eos_token_id mismatch"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not output.exists()


def test_rerun_with_other_options_keeps_the_existing_run(folders, tmp_path, capsys):
    _, teacher, student, prompts = folders
    output = tmp_path / "run"
    assert main(_args(teacher, student, prompts, output, "--steps", "1")) == 0
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit):
        main(_args(teacher, student, prompts, output, "--steps", "1", "--divergence", "forward_kl"))
    assert "different configuration" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
