"""Runs, models and prompts in a Cloud Storage bucket (issue 27), against a real server.

fake-gcs-server (tests/helpers/gcs_server.py) serves the JSON API on a free localhost port; the
only variable a process is given is ``STORAGE_EMULATOR_HOST``. The bucket ``opd`` is preloaded with
a tiny teacher, student and prompt file. No mocks: uploads, conditional creations
(``ifGenerationMatch=0``), orbax's tensorstore writes and a SIGKILL of a real training process.
"""

import csv
import hashlib
import io
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from opd_jax import storage
from opd_jax.commands import main
from opd_jax.errors import InputError

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
import gcs_server  # noqa: E402
from hf_fixtures import make_qwen3_folder  # noqa: E402

PROMPTS = ["1+1=", "2+3=", "4+4=", "7+1="]
TRAIN = ["--quiet", "--steps", "3", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6",
         "--max-prompt-length", "24", "--learning-rate", "1e-3", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """``(server url, local copies folder)``: the server with bucket ``opd`` holding
    ``models/teacher``, ``models/student`` and ``prompts.jsonl`` (the same files also local), and
    an empty bucket ``other``."""
    root = tmp_path_factory.mktemp("gcs")
    local = root / "local"
    make_qwen3_folder(local / "models" / "teacher", seed=1, layers=1)
    make_qwen3_folder(local / "models" / "student", seed=2, layers=1)
    (local / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    data = root / "data"
    shutil.copytree(local, data / "opd")
    (data / "other").mkdir()
    with gcs_server.fake_gcs_server(data) as url:
        os.environ.update(gcs_server.environment(url))
        try:
            yield url, local
        finally:
            gcs_server.unset_all()


def _child_env(url: str, cache: pathlib.Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in gcs_server.DERIVED}
    # The runs of one test compile the same programs: a persistent cache keeps the reruns short.
    return {**env, **gcs_server.environment(url), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _train_argv(teacher, student, prompts, output, *extra):
    return [sys.executable, "-m", "opd_jax", "train", "--teacher", str(teacher), "--student", str(student),
            "--prompts", str(prompts), "--output", str(output), *TRAIN, *extra]


def test_paths_schemes_and_missing_buckets(bucket, tmp_path, monkeypatch, capsys):
    _, local = bucket
    # pathlib (argparse's type=pathlib.Path) turns gs://b/x into gs:/b/x: read back as the URL.
    assert str(storage.as_path(pathlib.Path("gs://opd/run"))) == "gs://opd/run"
    assert storage.is_remote(storage.as_path("gs://opd/run")) and not storage.is_remote(tmp_path)
    for url, message in [("s3://b/run", "the scheme s3:// is not supported; opd-jax takes local paths and gs://"),
                         (pathlib.Path("s3://b/run"), "the scheme s3:// is not supported"),
                         ("http://host/run", "the scheme http:// is not supported"),
                         ("gs:///run", "no bucket")]:
        with pytest.raises(InputError, match=message):
            storage.as_path(url, what="--output")

    monkeypatch.chdir(tmp_path)  # a relative gs:/ or s3:/ folder would appear here
    models = local / "models"
    for output, message in [("s3://opd/run", "--output s3://opd/run: the scheme s3:// is not supported"),
                            ("gs://no-such-bucket/run", "--output gs://no-such-bucket/run: bucket no-such-bucket "
                                                        "does not exist")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(_train_argv(models / "teacher", models / "student", local / "prompts.jsonl", output)[3:])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    # Output files of the other commands (type=pathlib.Path) are read back as URLs, or refused by scheme.
    for argv, message in [(["demo", "--output", "gs://opd/demo"], "opd-jax demo writes a local folder"),
                          (["eval", "--model", str(models / "student"), "--json", "s3://b/metrics.json"],
                           "--json s3://b/metrics.json: the scheme s3:// is not supported")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no gs: or s3: folder, nothing else
    # The exact report's rows go to the bucket whole (a bucket object has no line-by-line writes).
    assert main(["verify", "--divergence", "js", "--seeds", "0", "--vocab-size", "3", "--horizon", "2", "--quiet",
                 "--json", "gs://opd/verify/rows.json", "--csv", "gs://opd/verify/rows.csv"]) == 0
    rows = json.loads(storage.as_path("gs://opd/verify/rows.json").read_text())["rows"]
    table = list(csv.DictReader(io.StringIO(storage.as_path("gs://opd/verify/rows.csv").read_text())))
    assert [r["relative_error"] for r in rows] == [float(r["relative_error"]) for r in table] and len(rows) > 4
    assert list(tmp_path.iterdir()) == []
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(_train_argv("gs://opd/models/teacher", models / "student", "gs://opd/missing.jsonl", "gs://other/run")[3:])
    err = capsys.readouterr().err
    assert "gs://opd/missing.jsonl does not exist" in err, err
    with pytest.raises(SystemExit):
        main(_train_argv("gs://no-such-bucket/teacher", models / "student", local / "prompts.jsonl", "gs://other/run")[3:])
    err = capsys.readouterr().err
    assert "--teacher gs://no-such-bucket/teacher: bucket no-such-bucket does not exist" in err, err
    assert list(storage.as_path("gs://other").iterdir()) == []  # refused before anything was written


def test_no_credentials_are_named_before_anything_is_written(bucket, monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud login either
    with pytest.raises(InputError, match=r"--output gs://my-bucket/run: no Google Cloud credentials; run `gcloud "
                                         r"auth application-default login`"):
        storage.check_bucket("gs://my-bucket/run", what="--output")


def test_models_prompts_and_config_from_a_bucket(bucket, tmp_path):
    from flax import nnx

    from opd_jax import data, models, tokenization
    from opd_jax.config import read_config_file

    _, local = bucket
    remote_model, config = models.from_pretrained("gs://opd/models/student")
    local_model, local_config = models.from_pretrained(local / "models" / "student")
    assert config == local_config
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(remote_model)), nnx.to_flat_state(nnx.state(local_model))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    tokenizer = tokenization.load_tokenizer("gs://opd/models/student")
    assert tokenizer("2+3=")["input_ids"] == tokenization.load_tokenizer(local / "models" / "student")("2+3=")["input_ids"]
    assert data.read_prompt_file("gs://opd/prompts.jsonl") == data.read_prompt_file(local / "prompts.jsonl")

    # save_pretrained into the bucket and back: the same bytes as a local export.
    models.save_pretrained(local_model, config, "gs://other/export")
    models.save_pretrained(local_model, config, tmp_path / "export")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert storage.as_path(f"gs://other/export/{name}").read_bytes() == (tmp_path / "export" / name).read_bytes()
    storage.as_path("gs://other/opd.toml").write_text("steps = 7\n")
    assert read_config_file("gs://other/opd.toml") == {"steps": 7}


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _write_lock(url: str, **record) -> None:
    storage.as_path(url).write_text(json.dumps(record))


def test_the_lock_object(bucket):
    from opd_jax.run_folder import RunFolderError, acquire_lock

    folder = "gs://other/locked"
    lock_url = f"{folder}/.opd_jax.lock"
    first = acquire_lock(folder, run="a" * 64, lease_seconds=0.8)
    held = json.loads(storage.as_path(lock_url).read_text())
    assert (held["host"], held["pid"], held["run"]) == (socket.gethostname(), os.getpid(), "a" * 64)
    time.sleep(0.5)  # renewed every quarter lease
    assert json.loads(storage.as_path(lock_url).read_text())["renewed_unix"] > held["renewed_unix"]
    # A second contender (here: this live process again) is refused, naming the holder and its lease.
    with pytest.raises(RunFolderError, match=rf"in use by another opd-jax run: process {os.getpid()} on host "
                                             rf"{socket.gethostname()} \(run aaaaaaaaaaaa.*lease until"):
        acquire_lock(folder)
    first.release()
    assert not storage.as_path(lock_url).exists()

    # A killed holder on this host: taken over at once, whatever its lease.
    _write_lock(lock_url, host=socket.gethostname(), pid=_dead_pid(), run="b", started="then",
                expires_unix=time.time() + 3600, expires="in an hour")
    second = acquire_lock(folder, lease_seconds=60)
    assert second.took_over["reason"].endswith("on this host no longer runs")
    second.release()
    # Another host's lock: refused while its lease runs, taken over once it has run out.
    _write_lock(lock_url, host="elsewhere", pid=1, run="c", started="then", expires_unix=time.time() + 3600,
                expires="in an hour")
    with pytest.raises(RunFolderError, match="process 1 on host elsewhere .* lease until in an hour"):
        acquire_lock(folder)
    _write_lock(lock_url, host="elsewhere", pid=1, run="c", started="then", expires_unix=time.time() - 1,
                expires="a second ago")
    third = acquire_lock(folder)
    assert third.took_over["reason"].startswith("its lease ran out")
    third.release()


def _wait_for(done, process, what, seconds=300):
    deadline = time.monotonic() + seconds
    while not done():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.05)


def _bucket_steps(output) -> list[int]:
    path = storage.as_path(f"{output}/metrics.jsonl")
    try:
        return [json.loads(line)["step"] for line in path.read_text().splitlines() if "teacher_kl" in line]
    except FileNotFoundError:
        return []


def test_bucket_run_preempted_killed_resumed_and_locked(bucket, tmp_path):
    """A run in the bucket holds the lock: a second run is refused, naming it. The run gets SIGTERM
    after its first step (it exits resumable, 75); its re-run is SIGKILLed after its next committed
    checkpoint (the one after may be uploading); the third run takes the dead holder's lock over at
    once and finishes. Its export is bitwise the export of the same run on local paths without a
    stop, and metrics.jsonl holds each step once."""
    url, local = bucket
    env = _child_env(url, tmp_path / "jax_cache")
    models = local / "models"
    steps = ["--steps", "6"]
    # The same run on local paths, without a stop: beside the bucket run's first attempt (two cores).
    reference = subprocess.Popen(_train_argv(models / "teacher", models / "student", local / "prompts.jsonl",
                                             tmp_path / "local_run", *steps), env=env,
                                 stdout=(tmp_path / "reference.log").open("w"), stderr=subprocess.STDOUT)

    output = "gs://opd/run"
    argv = _train_argv("gs://opd/models/teacher", "gs://opd/models/student", "gs://opd/prompts.jsonl", output, *steps)
    lock = storage.as_path(f"{output}/.opd_jax.lock")
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lock.exists, first, "the first run's lock")
        first.send_signal(signal.SIGSTOP)  # holds the lock while the second run tries
        second = subprocess.run(argv, env=env, capture_output=True, text=True)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert (f"gs://opd/run is in use by another opd-jax run: process {first.pid} on host {socket.gethostname()}"
                in second.stderr), second.stderr
        _wait_for(lambda: _bucket_steps(output), first, "step 1")  # flushed before its checkpoint
        first.send_signal(signal.SIGSTOP)
        first.send_signal(signal.SIGTERM)
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 75, err
        assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()
    finally:
        first.kill()
        reference.kill()
    preempted_at = _bucket_steps(output)[-1]
    assert preempted_at < 6 and not lock.exists()

    rerun = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        commit = storage.as_path(f"{output}/checkpoints/{preempted_at + 1}/commit_success.txt")
        _wait_for(commit.exists, rerun, f"checkpoint {preempted_at + 1}")
        rerun.send_signal(signal.SIGKILL)
    finally:
        rerun.kill()
        rerun.communicate()
    assert json.loads(lock.read_text())["pid"] == rerun.pid  # left behind by the kill

    resumed = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the run lock gs://opd/run/.opd_jax.lock from process {rerun.pid}" in resumed.stderr
    assert "resuming from step" in resumed.stderr + resumed.stdout
    remote = storage.as_path(output)
    assert (remote / "student" / "model.safetensors").read_bytes() == (
        tmp_path / "local_run" / "student" / "model.safetensors").read_bytes()
    assert _bucket_steps(output) == [1, 2, 3, 4, 5, 6]
    names = {p.name for p in remote.iterdir()}
    assert {"config.json", "run_identity.json", "metrics.jsonl", "curves.png", "tensorboard", "checkpoints",
            "student"} <= names and ".opd_jax.lock" not in names, names
    assert any(p.name.startswith("events.out.tfevents") for p in (remote / "tensorboard").iterdir())
    identity = json.loads((remote / "run_identity.json").read_text())
    assert identity["student"]["path"] == "gs://opd/models/student"
    assert identity["student"]["weights"]["model.safetensors"] == hashlib.sha256(
        (models / "student" / "model.safetensors").read_bytes()).hexdigest()
    assert not pathlib.Path("gs:").exists()


def test_a_half_uploaded_checkpoint_is_ignored_and_removed(bucket):
    """What a SIGKILL during an upload leaves (a step's objects without commit_success.txt) is never
    restored, and removed when the store opens; the step is saved again."""
    import jax
    import jax.numpy as jnp

    from opd_jax.checkpoint import CheckpointStore

    folder = "gs://other/half/checkpoints"
    store = CheckpointStore(folder)
    store.save(1, {"w": jnp.arange(3.0, dtype=jnp.float32)})
    store.close()
    storage.as_path(f"{folder}/2/state/_METADATA").write_text("{cut off")
    store = CheckpointStore(folder)
    assert store.steps() == [1] and [p.name for p in storage.as_path(folder).iterdir()] == ["1"]
    step, state = store.restore_latest({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert step == 1 and state["w"].tolist() == [0.0, 1.0, 2.0]
    store.save(2, {"w": jnp.ones(3, jnp.float32)})
    store.close()
    assert CheckpointStore(folder).steps() == [1, 2]


def _two_process_run(env, teacher, student, prompts, output) -> list[subprocess.Popen]:
    """Both processes of a run over 2 processes × 4 CPU devices, ``--mesh 2,2,2``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = _train_argv(teacher, student, prompts, output, "--prompts-per-step", "4", "--mesh", "2,2,2",
                       "--coordinator", f"localhost:{port}", "--num-processes", "2")
    return [subprocess.Popen([*argv, "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(children, timeout=900) -> list[tuple[int, str]]:
    try:
        outputs = [child.communicate(timeout=timeout)[0] for child in children]
        return [(child.returncode, out) for child, out in zip(children, outputs)]
    finally:
        for child in children:
            child.kill()


@pytest.mark.slow  # three two-process runs; the later two reuse the first one's compiled programs
def test_two_processes_preempted_in_the_bucket_end_as_on_a_local_folder(bucket, tmp_path):
    """2 processes × 4 CPU devices, --mesh 2,2,2: orbax writes each checkpoint from both processes
    straight to the bucket, process 0 holds the lock and writes the rest. One process gets SIGTERM
    after the first step: both stop after the same step, resumable; the re-run finishes. The export
    is bitwise that of the same two-process run on a local folder, and each step is logged once."""
    url, local = bucket
    env = {**_child_env(url, tmp_path / "jax_cache"), "JAX_NUM_CPU_DEVICES": "4"}
    models = local / "models"
    reference = tmp_path / "local_run"
    for code, out in _finish(_two_process_run(env, models / "teacher", models / "student", local / "prompts.jsonl",
                                              reference)):
        assert code == 0, out[-4000:]

    output = "gs://opd/two_processes"
    remote = ("gs://opd/models/teacher", "gs://opd/models/student", "gs://opd/prompts.jsonl", output)
    children = _two_process_run(env, *remote)
    _wait_for(lambda: _bucket_steps(output), children[0], "step 1")
    children[1].send_signal(signal.SIGTERM)
    for code, out in _finish(children):
        assert code == 75, out[-4000:]
    preempted_at = _bucket_steps(output)[-1]
    assert preempted_at < 3 and not storage.as_path(f"{output}/.opd_jax.lock").exists()

    finished = _finish(_two_process_run(env, *remote))
    for code, out in finished:
        assert code == 0, out[-4000:]
    assert "resuming from step" in finished[0][1]
    assert _bucket_steps(output) == [1, 2, 3]
    checkpoints = storage.as_path(f"{output}/checkpoints")
    assert all((checkpoints / str(step) / "commit_success.txt").exists() for step in (1, 2, 3))
    assert (storage.as_path(output) / "student" / "model.safetensors").read_bytes() == (
        reference / "student" / "model.safetensors").read_bytes()
    assert not storage.as_path(f"{output}/.opd_jax.lock").exists()
