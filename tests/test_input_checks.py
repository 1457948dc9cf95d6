"""Issue 28 items 2-4: prompt lines over the byte bound, prompts with unknown tokens, config keys.

Each refusal exits with status 2 and one line naming the file and line or key and what is allowed,
and leaves every file under the test's folder (models, prompts, config, the parent of --output) with
the same bytes, writing nothing new. The toy models of ``opd_jax/tasks/assets`` (a character
vocabulary of digits and ``+-=,> \\n`` with an ``<unk>`` token) are copied into the folder.
"""

import hashlib
import json
import pathlib
import re
import shutil
import tracemalloc

import pytest

from opd_jax import data, launch, unknown_tokens
from opd_jax.commands import main
from opd_jax.config import TrainConfig, read_config_file
from opd_jax.errors import InputError, InputFileNotFoundError
from opd_jax.tokenization import load_tokenizer

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "opd_jax" / "tasks" / "assets"


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Every path under ``folder`` (hidden ones too) with a hash of its bytes."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def root(tmp_path):
    for name in ("teacher", "student"):
        shutil.copytree(ASSETS / name, tmp_path / name)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("3+4=", "12+30=")))
    return tmp_path


def _argv(root, *extra, prompts="prompts.jsonl"):
    return ["train", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
            "--prompts", str(root / prompts), "--output", str(root / "run"), "--quiet", "--steps", "1",
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--max-prompt-length", "16",
            *extra]


def refused(argv, root, capsys) -> str:
    """The one error line of ``opd-jax train argv`` (status 2), after checking nothing changed under ``root``."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert snapshot(root) == before, "a refused run changed or wrote files"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opd-jax train: error: "), err
    return lines[0]


# --- item 2: prompt lines over a byte bound --------------------------------------------------------

def test_the_line_bound_follows_max_prompt_length():
    assert data.prompt_line_bound(1) == data.BYTES_PER_TOKEN + data.LINE_SLACK_BYTES
    assert data.prompt_line_bound(8192) - data.prompt_line_bound(4096) == 4096 * data.BYTES_PER_TOKEN
    # A prompt that fills every slot with the longest escapes JSON has still fits: 12 bytes a character
    # (a surrogate pair as two \uXXXX escapes), 16 characters a token.
    line = json.dumps({"prompt": "\U0001f600" * 16 * 64, "answer": "x" * 1000})
    assert len(line.encode()) <= data.prompt_line_bound(64)


def test_a_huge_line_is_refused_by_file_and_line_before_it_is_read_whole(root, capsys):
    prompts = root / "huge.jsonl"
    with prompts.open("wb") as file:
        file.write(b'{"prompt": "3+4="}\n{"prompt": "')
        file.write(b"1" * (24 << 20))
        file.write(b'"}\n')
    err = refused(_argv(root, "--max-prompt-length", "16", prompts="huge.jsonl"), root, capsys)
    bound = data.prompt_line_bound(16)
    assert re.search(rf"{re.escape(str(prompts))}:2: line of more than {bound} bytes; a prompt file line may have "
                     rf"at most {bound} bytes with --max-prompt-length 16", err), err
    assert not (root / "run").exists()
    # The reader holds at most the bound plus one read of the line, never its 24 MiB.
    tracemalloc.start()
    with pytest.raises(InputError, match=r"huge.jsonl:2: line of more than"):
        data.read_prompt_records(prompts, max_line_bytes=bound)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < bound + 3 * data.READ_BYTES + (1 << 20), peak


def test_line_bound_counts_bytes_exactly_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": "a" * n}) for n in (1, 5000, 3)]
    path.write_text("\n\n".join(lines) + "\n")  # blank lines between: records on lines 1, 3, 5
    longest = max(len(line) for line in lines)
    assert [n for n, _ in data.read_prompt_records(path, max_line_bytes=longest)] == [1, 3, 5]
    with pytest.raises(InputError, match=rf"p.jsonl:3: line of {longest} bytes; .* at most {longest - 1} bytes"):
        data.read_prompt_records(path, max_line_bytes=longest - 1)


def test_reading_in_pieces_gives_the_lines_a_whole_read_gives(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 7)  # lines cross many reads
    path = tmp_path / "p.jsonl"
    texts = ["3+4=", "é" * 30, "12\\n+30=", "x" * 7, "y" * 6]
    path.write_text("\n".join(json.dumps({"prompt": t}) for t in texts))  # no final newline
    assert data.read_prompt_file(path) == [json.loads(json.dumps(t)) for t in texts]


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "\\ud800"}\n', r"p.jsonl:1: 'prompt' holds a lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}\n', r"p.jsonl:1: messages\[0\].content holds a lone"),
    (b'{"prompt": "a", "n": 1' + b"0" * 5000 + b"}\n", r"p.jsonl:1: cannot read this JSON"),
    (b"[" * 100000 + b"\n", r"p.jsonl:1: (JSON nested too deeply|not valid JSON)"),
    (b"\n \n", r"p.jsonl: no prompts"),
])
def test_lines_json_reads_but_a_tokenizer_cannot_are_input_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        data.read_prompt_records(path)


# --- item 3: prompts the tokenizer cannot represent ------------------------------------------------

def test_unknown_characters_are_named_by_file_line_and_character(root, capsys):
    (root / "words.jsonl").write_text('{"prompt": "3+4="}\n{"prompt": "what is 3+4?"}\n'
                                      '{"prompt": "1+1=é"}\n')
    err = refused(_argv(root, "--no-chat-template", prompts="words.jsonl"), root, capsys)
    prompts = re.escape(str(root / "words.jsonl"))
    assert re.search(rf"2 prompt\(s\) hold text the student's tokenizer has no token for; it encodes to the unknown "
                     rf"token '<unk>' \(id 2\).*{prompts}:2: 'w', 'h', 'a', 't', 'i', 's', '\?'; {prompts}:3: 'é'.*"
                     r"pass --allow-unknown-tokens", err), err


def test_allow_unknown_tokens_checks_pass_with_a_warning(root, capsys):
    (root / "words.jsonl").write_text('{"prompt": "what is 3+4?"}\n')
    spec = launch.RunSpec(
        train=TrainConfig(steps=1, prompts_per_step=1, group_size=2, max_new_tokens=4),
        models=launch.Models(student=root / "student", teachers={"teacher": root / "teacher"}),
        data=launch.Data(prompts=root / "words.jsonl", max_prompt_length=16, allow_unknown_tokens=True),
        output=root / "run")
    before = snapshot(root)
    checked = launch.check(spec)
    assert checked.tokens.shape == (1, 16)
    assert "warning: 1 prompt(s) hold text" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"words.jsonl:1: 'w', 'h'"):
        launch.check(spec.__class__(**{**spec.__dict__, "data": launch.Data(prompts=root / "words.jsonl",
                                                                             max_prompt_length=16)}))
    assert snapshot(root) == before


def test_a_vocabulary_without_unknown_token_never_reports_one():
    class ByteLevel:
        unk_token_id = None

    assert unknown_tokens.unknown_characters(ByteLevel(), "anything ☃") == []
    tokenizer = load_tokenizer(ASSETS / "student")
    assert unknown_tokens.unknown_characters(tokenizer, "12+30=") == []
    assert unknown_tokens.unknown_characters(tokenizer, "1 ☃ 2 ☃") == ["☃"]
    chat = [{"role": "system", "content": "1+1"}, {"role": "user", "content": "2+é"}]
    with pytest.raises(InputError, match=r"p:7: 'é'\. Rewrite"):
        unknown_tokens.check_prompts(tokenizer, ["1+1", chat], ["p:6", "p:7"])


# --- item 4: config keys for every flag --------------------------------------------------------------

def test_max_prompt_length_and_the_folders_come_from_the_config(root, capsys):
    config = root / "run.toml"
    config.write_text(f'teacher = ["{root / "teacher"}"]\nstudent = "{root / "student"}"\n'
                      f'prompts = "{root / "prompts.jsonl"}"\noutput = "{root / "run"}"\nmax_prompt_length = 3\n'
                      "quiet = true\n[loop]\nsteps = 1\n")
    err = refused(["train", "--config", str(config)], root, capsys)
    assert "longer than max_length 3" in err, err
    # The flag wins over the file: with room for the prompts, the next check (unknown tokens) speaks.
    (root / "words.jsonl").write_text('{"prompt": "what"}\n')
    err = refused(["train", "--config", str(config), "--max-prompt-length", "32", "--prompts",
                   str(root / "words.jsonl")], root, capsys)
    assert "words.jsonl:1: 'w', 'h', 'a', 't'" in err, err


@pytest.mark.parametrize("name, text, message", [
    ("run.yaml", "steps: 3\n", r"YAML is not read; configuration files are TOML \(.toml\) or JSON"),
    ("run.yml", "steps: 3\n", r"YAML is not read"),
    ("run.json", "steps: 3\n", r"cannot parse as JSON .*configuration files are TOML \(.toml\) or JSON"),
    ("run.toml", "max_prompt_length = 0\n", r"max_prompt_length = 0: not a value of --max-prompt-length "
                                            r"\(expected an integer >= 1, got '0'\)"),
    ("run.toml", 'remat = "most"\n', r"remat = 'most': --remat takes one of none, full, dots"),
    ("run.toml", "no_chat_template = 1\n", r"no_chat_template = 1: expected true or false"),
    ("run.json", '{"max_prompt_lenght": 3}', r"unknown training option\(s\) \['max_prompt_lenght'\]; valid: .*"
                                             r"'max_prompt_length'"),
    ("run.json", '{"mesh": [1, 8, 1]}', r"mesh = \[1, 8, 1\]: expected a value as --mesh takes it"),
])
def test_bad_config_files_are_named(root, capsys, name, text, message):
    (root / name).write_text(text)
    err = refused(_argv(root, "--config", str(root / name)), root, capsys)
    assert re.search(rf"--config {re.escape(str(root / name))}.*{message}", err), err


def test_config_reader_errors_are_input_errors(tmp_path):
    with pytest.raises(InputFileNotFoundError, match="does not exist"):
        read_config_file(tmp_path / "none.toml")
    (tmp_path / "bytes.json").write_bytes(b'{"steps": "\xff"}')
    with pytest.raises(InputError, match=r"bytes.json: not UTF-8"):
        read_config_file(tmp_path / "bytes.json")
    with pytest.raises(InputError, match=r"steps must be an integer; got '3' \(a string\)"):
        TrainConfig.from_dict({"steps": "3"})
