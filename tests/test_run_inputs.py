"""`opd-jax train` on folders it does not own, damaged model folders and meshes that do not divide.

Each refusal exits with status 2 and one line naming the folder or file, before the lock: every
file that was there keeps its bytes (sha256) and nothing new is written (issue 28, items 1-2).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from opd_jax import run_folder
from opd_jax.commands import main
from opd_jax.config import TrainConfig
from opd_jax.errors import InputError, InputFileNotFoundError

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
from hf_fixtures import make_qwen3_folder  # noqa: E402
from test_cli_input import _args, _write_prompts, refused, snapshot  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_inputs")
    teacher = make_qwen3_folder(root / "teacher", seed=1, layers=1)
    student = make_qwen3_folder(root / "student", seed=2, layers=1)
    return root, teacher, student, _write_prompts(root / "prompts.jsonl")


def _refused_keeping(argv, watched: pathlib.Path, message: str, capsys) -> str:
    before = snapshot(watched)
    err = refused(argv, capsys)
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert snapshot(watched) == before
    return err


def test_output_that_is_not_a_run_is_refused_and_kept(folders, tmp_path, capsys):
    _, teacher, student, prompts = folders
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"name": "my experiment"}\n')
    (project / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    _refused_keeping(_args(teacher, student, prompts, project), project,
                     f"--output {project} is not an opd-jax run folder (it holds config.json", capsys)
    # A model folder copied elsewhere is not a run either: its config.json is not a training config.
    model_copy = shutil.copytree(student, tmp_path / "model_copy")
    _refused_keeping(_args(teacher, student, prompts, model_copy), model_copy,
                     "is not an opd-jax run folder", capsys)
    # A stray file is enough: only empty folders (or only a refused run's lock) are new runs.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    _refused_keeping(_args(teacher, student, prompts, notes), notes, "(it holds todo.txt, but no run_identity.json",
                     capsys)
    assert (project / "config.json").read_text() == '{"name": "my experiment"}\n'
    assert len((project / "metrics.jsonl").read_text().splitlines()) == 2
    assert not any((folder / run_folder.IDENTITY_FILE).exists() for folder in (project, model_copy, notes))


def test_output_may_not_overlap_a_model_folder(folders, tmp_path, capsys):
    root, teacher, student, prompts = folders
    wrapper = tmp_path / "wrapper"
    inner_student = shutil.copytree(student, wrapper / "student")
    cases = [
        (student, student, f"--output {student} is the --student folder {student}"),
        (student / "run", student, f"--output {student / 'run'} lies inside the --student folder {student}"),
        (teacher / "sub" / "run", teacher, "lies inside the --teacher folder"),
        (wrapper, wrapper, f"--output {wrapper} contains the --student folder {inner_student}"),
    ]
    for output, watched, message in cases:
        model = inner_student if watched == wrapper else student
        _refused_keeping(_args(teacher, model, prompts, output), watched, message, capsys)
        assert not (student / "run").exists() and not (teacher / "sub").exists()
    assert run_folder.check_identity(tmp_path / "new", {}) == "new"


def test_damaged_model_folders_are_named_before_the_lock(folders, tmp_path, capsys):
    _, teacher, student, prompts = folders
    output = tmp_path / "run"
    truncated = shutil.copytree(teacher, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_tokenizer = shutil.copytree(student, tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    bad_header = shutil.copytree(student, tmp_path / "bad_header")
    (bad_header / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"{not a header!!}")
    cases = [
        ((truncated, student), rf"--teacher: {weights} is damaged or truncated ({weights.stat().st_size} bytes, "
                               "but its header describes"),
        ((tmp_path / "missing", student), f"--teacher: {tmp_path / 'missing'} does not exist"),
        ((teacher, no_tokenizer), f"--student: no tokenizer in {no_tokenizer} (it has only tokenizer_config.json)"),
        ((teacher, bad_header), "its header is not a safetensors header"),
    ]
    for (teacher_folder, student_folder), message in cases:
        _refused_keeping(_args(teacher_folder, student_folder, prompts, output), tmp_path, message, capsys)
        assert not output.exists()
    from opd_jax import models

    with pytest.raises(InputError, match="is damaged or truncated"):  # Python users get the same error
        models.from_pretrained(truncated)
    with pytest.raises(InputFileNotFoundError, match="does not exist"):
        models.load_config(tmp_path / "missing")


def test_mesh_that_does_not_divide_writes_nothing(folders, tmp_path):
    _, teacher, student, prompts = folders
    output = tmp_path / "run"
    # Four CPU devices in a child process (this one has one); 2 rollout rows over fsdp 4 do not split.
    argv = _args(teacher, student, prompts, output, "--mesh", "1,4,1", "--prompts-per-step", "1")
    child = subprocess.run(
        [sys.executable, "-m", "opd_jax", *argv],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"},
    )
    assert child.returncode == 2, child.stderr[-2000:]
    assert "--mesh: the rollout batch (prompts_per_step × group_size) of 2 rows" in child.stderr
    assert "Traceback" not in child.stderr
    assert not output.exists()


def test_run_from_before_identities_still_resumes(folders, tmp_path, capsys):
    _, teacher, student, prompts = folders
    output = tmp_path / "run"
    assert main(_args(teacher, student, prompts, output, "--checkpoint-every", "1")) == 0
    (output / run_folder.IDENTITY_FILE).unlink()  # as an older version left it
    assert run_folder.folder_state(output) == "unrecorded"
    capsys.readouterr()
    assert main(_args(teacher, student, prompts, output, "--checkpoint-every", "1", "--steps", "2")) == 0
    assert "holds a run started before opd-jax recorded run inputs" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_folder_state_rule(tmp_path):
    assert run_folder.folder_state(tmp_path / "absent") == "new"
    (tmp_path / "lock_only").mkdir()
    (tmp_path / "lock_only" / run_folder.LOCK_FILE).write_text("")
    assert run_folder.folder_state(tmp_path / "lock_only") == "new"
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints" / "50").mkdir(parents=True)
    (legacy / "config.json").write_text(json.dumps(TrainConfig().to_json()))
    assert run_folder.folder_state(legacy) == "unrecorded"
    (legacy / "config.json").write_text(json.dumps(TrainConfig().to_dict()))  # flat, as earlier versions wrote it
    assert run_folder.folder_state(legacy) == "unrecorded"
    (legacy / "checkpoints" / "notes.txt").write_text("x")  # not our checkpoint layout
    with pytest.raises(run_folder.RunFolderError, match="not an opd-jax run folder"):
        run_folder.folder_state(legacy)
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / run_folder.IDENTITY_FILE).write_text("{}")
    assert run_folder.folder_state(recorded) == "recorded"
