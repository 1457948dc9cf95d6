"""run_folder: identity records (new / same / changed / unrecorded / damaged) and the folder lock."""

import json

import pytest

from opd_jax import run_folder
from opd_jax.config import TrainConfig


def _inputs(tmp_path, weights=b"weights", prompts=b'{"prompt": "a"}\n'):
    for side in ("teacher", "student"):
        folder = tmp_path / side
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(weights + side.encode())
        (folder / "tokenizer.json").write_text("{}")
    (tmp_path / "prompts.jsonl").write_bytes(prompts)
    return run_folder.compute_identity(tmp_path / "teacher", tmp_path / "student", tmp_path / "prompts.jsonl",
                                       {"max_prompt_length": 8, "chat_template": True})


def test_identity_states_and_every_change_named(tmp_path):
    identity = _inputs(tmp_path)
    output = tmp_path / "run"
    assert run_folder.check_identity(output, identity) == "new"
    (output / "checkpoints" / "5").mkdir(parents=True)
    (output / "config.json").write_text(json.dumps(TrainConfig().to_json()))
    assert run_folder.check_identity(output, identity) == "unrecorded"  # a run older than the records
    run_folder.write_identity(output, identity)
    assert run_folder.check_identity(output, identity) == "same"
    changed = _inputs(tmp_path, weights=b"other", prompts=b'{"prompt": "b"}\n')
    changed["prompt_options"]["max_prompt_length"] = 16
    with pytest.raises(run_folder.RunFolderError) as error:
        run_folder.check_identity(output, changed)
    for part in ("teacher weights (model.safetensors differs)", "student weights (model.safetensors differs)",
                 "prompt file (sha256", "prompt option max_prompt_length (8 then, 16 now)"):
        assert part in str(error.value)
    (output / run_folder.IDENTITY_FILE).write_text("{not json")
    with pytest.raises(run_folder.RunFolderError, match="is damaged"):
        run_folder.check_identity(output, identity)
    (tmp_path / "student" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*student: expected model.safetensors"):
        run_folder.weight_files(tmp_path / "student")


def test_sharded_weights_are_digested_with_every_shard(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1", "b": "s2"}}))
    (folder / "s1").write_bytes(b"1")
    with pytest.raises(FileNotFoundError, match="lists s2, missing from"):
        run_folder.weight_files(folder)
    (folder / "s2").write_bytes(b"2")
    assert set(run_folder.folder_digests(folder, "weights")) == {"model.safetensors.index.json", "s1", "s2"}


def test_lock_is_exclusive_and_a_refused_run_leaves_nothing(tmp_path):
    output = tmp_path / "new" / "run"
    lock = run_folder.RunLock(output)
    assert lock.created_folder and (output / run_folder.LOCK_FILE).is_file()
    # flock belongs to the open file, so even this process cannot take it twice.
    with pytest.raises(run_folder.RunFolderError, match=r"is in use by another opd-jax run \(process \d+\)"):
        run_folder.RunLock(output)
    lock.release(undo=True)
    assert not output.exists()
    with run_folder.RunLock(output):  # released on exit; the empty lock file stays
        pass
    assert [p.name for p in output.iterdir()] == [run_folder.LOCK_FILE]
    (tmp_path / "file").write_text("x")
    with pytest.raises(run_folder.RunFolderError, match="is a file"):
        run_folder.check_output_folder(tmp_path / "file")
