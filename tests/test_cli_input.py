"""`opd-jax train` against bad input, other inputs in a run folder and a second process on it.

Every refusal must name the field, file or quantity and what is allowed, exit with status 2, and
leave the run folder exactly as it was (or not create it). Tiny HF folders are built here.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from opd_jax import run_folder
from opd_jax.commands import main

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
from hf_fixtures import make_qwen3_folder, make_tokenizer  # noqa: E402

PROMPTS = ["what is 12 + 30 ?", "add the numbers", "the answer is", "step by step"]
REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_prompts(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_input")
    teacher = make_qwen3_folder(root / "teacher", seed=1, layers=1)
    # A bfloat16 checkpoint on disk: the export must keep it.
    student = make_qwen3_folder(root / "student", seed=2, layers=1, dtype=jnp.bfloat16)
    return root, teacher, student, _write_prompts(root / "prompts.jsonl")


def _args(teacher, student, prompts, output, *extra):
    return ["train", "--teacher", str(teacher), "--student", str(student), "--prompts", str(prompts),
            "--output", str(output), "--quiet", "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "6", "--max-prompt-length", "24", "--learning-rate", "1e-3", *extra]


def snapshot(folder: pathlib.Path):
    """Every path under ``folder`` (hidden ones too) with a hash of its bytes; None if it is absent."""
    if not folder.exists():
        return None
    if folder.is_file():
        return hashlib.sha256(folder.read_bytes()).hexdigest()
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def refused(argv, capsys) -> str:
    """Run the CLI, expect exit status 2, return stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def finished_run(folders, tmp_path_factory):
    """One real 1-step run; its first attempt overflows the positions and must write nothing."""
    root, teacher, student, prompts = folders
    output = tmp_path_factory.mktemp("runs") / "run"
    config_file = root / "opd.toml"
    config_file.write_text("log_ratio_clip = 5.0\n")
    with pytest.raises(SystemExit) as exit_info:
        main(_args(teacher, student, prompts, output, "--max-new-tokens", "110"))
    assert exit_info.value.code == 2 and not output.exists()
    # The natural fix is accepted (nothing of the refused attempt was written to refuse it with).
    assert main(_args(teacher, student, prompts, output, "--config", str(config_file),
                      "--log-ratio-clip", "none")) == 0
    return output


def test_finished_run_records_identity_config_and_export(finished_run, folders):
    _, teacher, student, prompts = folders
    saved = json.loads((finished_run / "config.json").read_text())
    assert saved["objective"]["log_ratio_clip"] is None  # the flag's "none" overrides the config file's 5.0
    identity = json.loads((finished_run / run_folder.IDENTITY_FILE).read_text())
    assert identity["student"]["weights"]["model.safetensors"] == hashlib.sha256(
        (student / "model.safetensors").read_bytes()).hexdigest()
    assert set(identity["teacher"]["tokenizer"]) >= {"tokenizer.json", "tokenizer_config.json"}
    assert identity["prompt_options"] == {"max_prompt_length": 24, "chat_template": True}
    exported = finished_run / "student"
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0
    import transformers

    assert transformers.GenerationConfig.from_pretrained(exported).eos_token_id == 2
    from opd_jax.models.hf import checkpoint_dtype

    assert checkpoint_dtype(student) == checkpoint_dtype(exported) == "bfloat16"


def test_bad_options_and_inputs_fail_before_anything_is_written(folders, tmp_path, capsys):
    root, teacher, student, prompts = folders
    output = tmp_path / "run"

    def config(name, text):
        (tmp_path / name).write_text(text)
        return ["--config", str(tmp_path / name)]

    no_weights = tmp_path / "no_weights"
    shutil.copytree(teacher, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(b'{"prompt": "add"}\n\n{"prompt": "caf\xe9 au lait"}\n')
    long_prompts = _write_prompts(tmp_path / "long.jsonl", ["add", "step by step we add the numbers"])
    long_prompts.write_text("\n" + long_prompts.read_text())  # line 3 holds prompt 2
    (tmp_path / "a_file").write_text("not a folder")
    cases = [
        (config("a.json", '{"steps": 2.5}'), r"a.json: steps must be an integer; got 2.5 \(a float\)"),
        (config("b.json", '{"steps": "2"}'), r"b.json: steps must be an integer; got '2' \(a string\)"),
        (config("c.toml", "group_size = true"), r"c.toml: group_size must be an integer; got True \(a boolean\)"),
        (config("d.toml", 'temperature = "hot"'), r"temperature must be a number; got 'hot'"),
        (config("e.toml", "log_ratio_clip = [1]"), r"log_ratio_clip must be a number or \"none\"; got \[1\]"),
        (config("f.toml", "eval_every = 5"), r"eval_every needs --eval-dataset"),
        (["--steps", "2.5"], r"argument --steps: invalid int value: '2.5'"),
        (["--learning-rate", "-1e-3"], r"learning_rate must lie in \(0\.0, 1\.0\]; got -0\.001"),
        (["--gamma", "-.5"], r"gamma must lie in \[0\.0, 1\.0\]; got -0\.5"),
        (["--seed", "-1"], r"seed must lie in \[0, ∞\); got -1"),
        (["--mesh", "1,1,1", "--teacher-mesh", "2,x"], r"--teacher-mesh: mesh '2,x'"),
        (["--teacher-mesh", "1,1,1"], r"--teacher-mesh needs --mesh"),
        (["--mesh", "1,1,1", "--teacher-mesh", "1,1,1"],
         r"--mesh / --teacher-mesh: mesh 1,1,1 \(1 devices\) \+ teacher mesh 1,1,1 \(1 devices\) = 2, but there "
         r"are 1 devices"),
        (["--mesh", "1,1,1", "--teacher-mesh", "1,1,1", "--full-vocab-weight", "0.5"],
         r"teacher_mesh with full_vocab_weight = 0.5"),
        (["--temperature", "-1E+2"], r"temperature must lie in \(0\.0, ∞\).*got -100\.0"),
        (["--max-prompt-length", "120", "--max-new-tokens", "16"],
         r"--max-prompt-length 120 \+ --max-new-tokens 16 = 136 positions, more than the student's "
         r"max_position_embeddings 128 \(.*student/config.json\); set --max-prompt-length at most 112 \(the longest "
         r"prompt has 17 tokens\) or --max-new-tokens at most 8"),
    ]
    for extra, message in cases:
        err = refused(_args(teacher, student, prompts, output, *extra), capsys)
        assert re.search(message, err), (extra, err)
        assert not output.exists()
    swapped = tmp_path / "swapped"
    shutil.copytree(student, swapped)
    make_tokenizer(swapped, swap_ids=(40, 41))  # same size, same merges: two ordinary tokens exchanged
    inputs = [
        ((teacher, student, bad_bytes, output), rf"{bad_bytes}:3: not valid UTF-8 \(byte 0xe9 at column 16\)"),
        ((teacher, student, long_prompts, output, "--max-prompt-length", "16"),
         rf"1 prompt\(s\) longer than max_length 16: prompt 2 \({long_prompts}:3\) has \d+ tokens.*"
         r"raise --max-prompt-length"),
        ((no_weights, student, prompts, output),
         rf"--teacher: no weights in {no_weights}: expected model.safetensors or model.safetensors.index.json"),
        ((teacher, swapped, prompts, output),
         r"teacher/student vocabulary mismatch: 2 token\(s\) have different ids: '.' teacher 40, student 41, "
         r"'.' teacher 41, student 40"),
        ((teacher, student, prompts, tmp_path / "a_file"), r"--output .*a_file is a file; give a folder"),
        ((teacher, student, prompts, tmp_path / "a_file" / "run"), r"cannot be created: .*a_file is a file"),
        # /proc refuses new files even for root: a real read-only place on every Linux machine.
        ((teacher, student, prompts, pathlib.Path("/proc/opd-jax-run")),
         r"--output /proc/opd-jax-run would be created in /proc, which is not writable"),
    ]
    for argv, message in inputs:
        before = snapshot(tmp_path / "a_file")
        err = refused(_args(*argv), capsys)
        assert re.search(message, err), (argv, err)
        assert not output.exists() and snapshot(tmp_path / "a_file") == before
    with pytest.raises(SystemExit) as exit_info:  # only with a held-out dataset to evaluate
        main(_args(teacher, student, prompts, output, "--eval-every", "2"))
    assert exit_info.value.code == 2 and "--eval-every needs --eval-dataset" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_is_refused(folders, tmp_path, capsys):
    _, teacher, student, prompts = folders
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = refused(_args(teacher, student, prompts, locked), capsys)
        assert f"--output {locked} is not writable" in err
        err = refused(_args(teacher, student, prompts, locked / "run"), capsys)
        assert f"would be created in {locked}, which is not writable" in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_resume_with_other_inputs_is_refused_naming_each_change(finished_run, folders, tmp_path, capsys):
    root, teacher, student, prompts = folders
    other_student = make_qwen3_folder(tmp_path / "other_student", seed=3, layers=1, dtype=jnp.bfloat16)
    other_teacher = make_qwen3_folder(tmp_path / "other_teacher", seed=4, layers=1)
    moved_prompts = _write_prompts(tmp_path / "prompts.jsonl")  # same bytes elsewhere: the same run
    edited_prompts = _write_prompts(tmp_path / "edited.jsonl", PROMPTS[:3] + ["step by step!"])
    before = snapshot(finished_run)
    cases = [
        ((teacher, other_student, prompts), ["student weights (model.safetensors differs)"]),
        ((other_teacher, student, prompts), ["teacher weights (model.safetensors differs)"]),
        ((teacher, student, edited_prompts), ["prompt file (sha256"]),
        ((teacher, student, moved_prompts, "--no-chat-template"), ["prompt option chat_template (True then, False now)"]),
        ((teacher, student, prompts, "--max-prompt-length", "32"), ["prompt option max_prompt_length (24 then, 32 now)"]),
        ((other_teacher, other_student, edited_prompts),
         ["teacher weights (model.safetensors differs)", "student weights (model.safetensors differs)",
          "prompt file"]),
    ]
    for (t, s, p, *extra), changes in cases:
        err = refused(_args(t, s, p, finished_run, *extra), capsys)
        assert f"{finished_run} holds a run started from other inputs" in err, err
        for change in changes:
            assert change in err, (change, err)
        assert "nothing in" in err and snapshot(finished_run) == before
    # Another tokenizer (on both sides, so that they stay compatible) is a change too.
    retokenized = {}
    for name, folder in (("teacher", teacher), ("student", student)):
        retokenized[name] = tmp_path / f"retok_{name}"
        shutil.copytree(folder, retokenized[name])
        make_tokenizer(retokenized[name], chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    err = refused(_args(retokenized["teacher"], retokenized["student"], prompts, finished_run), capsys)
    assert "teacher tokenizer (chat_template.jinja differs" in err and "student tokenizer (chat_template.jinja" in err
    assert snapshot(finished_run) == before
    # The same inputs (the prompt file moved, same bytes) resume; the record is left as it was.
    record = (finished_run / run_folder.IDENTITY_FILE).read_bytes()
    assert main(_args(teacher, student, moved_prompts, finished_run, "--steps", "2", "--log-ratio-clip", "none",
                      "--export-dtype", "float32")) == 0
    assert (finished_run / run_folder.IDENTITY_FILE).read_bytes() == record
    from opd_jax.models.hf import checkpoint_dtype

    assert checkpoint_dtype(finished_run / "student") == "float32"


def test_second_process_on_a_run_folder_fails_at_once(folders, tmp_path):
    _, teacher, student, prompts = folders
    output = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "opd_jax", *_args(teacher, student, prompts, output, "--steps", "100000",
                                                       "--checkpoint-every", "100000")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (output / "metrics.jsonl").is_file():  # training: it holds the lock
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        began = time.monotonic()
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        seconds = time.monotonic() - began
        assert second.returncode == 2, second.stderr
        assert first.poll() is None  # it failed while the first was still training
        assert f"{output} is in use by another opd-jax run (process {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr and "PyTorch was not found" not in second.stderr
        steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps))  # one writer only
        print(f"second process refused after {seconds:.1f} s")
    finally:
        first.send_signal(signal.SIGKILL)
        _, first_err = first.communicate()
    assert "PyTorch was not found" not in first_err and "Traceback" not in first_err
    # The operating system released the lock of the killed process: the folder can be locked again.
    with run_folder.RunLock(output):
        pass
