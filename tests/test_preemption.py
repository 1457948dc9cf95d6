"""Runs that survive preemption, damage and bad input (issue 14), shown on real `opd-jax train`
child processes: real signals at real steps, real damage to the files orbax wrote.

Every child shares one persistent compilation cache, so after the first they start in seconds.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import sys

import numpy as np
import pytest
from flax import nnx

from opd_jax import models, preemption, run_folder, train
from opd_jax.commands import main
from opd_jax.commands.flags import EXIT_RESUMABLE

HELPERS = pathlib.Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import faults  # noqa: E402
from hf_fixtures import make_qwen3_folder, make_tokenizer  # noqa: E402

STEPS = 40
PROMPTS = ["what is 12 + 30 ?", "add the numbers", "the answer is", "step by step", "the numbers we add"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    teacher = make_qwen3_folder(root / "teacher", seed=1, layers=2)
    student = make_qwen3_folder(root / "student", seed=2, layers=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = faults.child_env(root / "jax_cache")
    return root, teacher, student, prompts, env


def _argv(setup, output, steps=STEPS, *extra):
    _, teacher, student, prompts, _ = setup
    return faults.train_argv(
        "--teacher", teacher, "--student", student, "--prompts", prompts, "--output", output, "--quiet",
        "--steps", steps, "--checkpoint-every", 4, "--keep-checkpoints", 5, "--prompts-per-step", 2,
        "--group-size", 2, "--max-new-tokens", 6, "--max-prompt-length", 24, "--learning-rate", 1e-3, *extra,
    )


def _start(setup, output, log_name, *args):
    return faults.Child(_argv(setup, output, *args), setup[4], pathlib.Path(output).parent / log_name)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    output = setup[0] / "uninterrupted"
    child = _start(setup, output, "uninterrupted.log")
    assert child.wait() == 0, child.output()[-4000:]
    return output


def _records(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _committed_steps(output):
    return sorted(int(p.name) for p in (output / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same_run(output, uninterrupted):
    assert (output / "student" / "model.safetensors").read_bytes() == (
        uninterrupted / "student" / "model.safetensors").read_bytes()
    records, reference = _records(output), _records(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once, in order
    for a, b in zip(records, reference):
        assert (a["loss"], a["teacher_kl"], a["grad_norm"]) == (b["loss"], b["teacher_kl"], b["grad_norm"]), a["step"]
    assert faults.tensorboard_steps(output / "tensorboard", "loss") == list(range(1, STEPS + 1))


def test_a_runs_life_sigkill_before_a_checkpoint_sigterm_finish_extend_sigint_finish(setup, uninterrupted, tmp_path):
    output = tmp_path / "run"
    # 1. SIGKILL before the first checkpoint commits (checkpoint_every may differ on resume).
    child = _start(setup, output, "0.log", 20, "--checkpoint-every", 20)
    faults.signal_at_step(child, output, 1, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert _committed_steps(output) == [] and len(faults.metric_steps(output)) >= 1

    # 2. SIGTERM mid-run: the current step is finished and committed, then exit 75.
    child = _start(setup, output, "1.log", 20)
    reached = faults.signal_at_step(child, output, 6, signal.SIGTERM)
    assert reached < 19
    assert child.wait() == preemption.EXIT_RESUMABLE == EXIT_RESUMABLE, child.output()[-4000:]
    stopped = faults.metric_steps(output)[-1]
    assert stopped in (reached, reached + 1)  # within one step of the signal
    assert stopped in _committed_steps(output)
    assert not list((output / "checkpoints").glob("*tmp*"))  # no save left in flight
    log = child.output()
    assert f"stopped by SIGTERM after step {stopped} of 20" in log and "Traceback" not in log
    assert not (output / "student").exists()

    # 3. The re-run finishes the 20 steps.
    child = _start(setup, output, "2.log", 20)
    assert child.wait() == 0, child.output()[-4000:]
    assert f"resuming from step {stopped} of 20 (checkpoint {output.resolve() / 'checkpoints' / str(stopped)})" in (
        child.output())

    # 4. The finished run is extended to 40 steps, and Ctrl-C (SIGINT) interrupts that.
    child = _start(setup, output, "3.log", STEPS)
    reached = faults.signal_at_step(child, output, 26, signal.SIGINT)
    assert reached < STEPS - 1
    assert child.wait() == preemption.EXIT_RESUMABLE, child.output()[-4000:]
    log = child.output()
    assert "resuming from step 20 of 40" in log
    stopped = faults.metric_steps(output)[-1]
    assert stopped in (reached, reached + 1) and stopped in _committed_steps(output)
    assert f"stopped by SIGINT after step {stopped} of 40" in log
    assert "KeyboardInterrupt" not in log and "cannot schedule new futures" not in log

    # 5. The last re-run ends bitwise where the uninterrupted 40-step run ended.
    child = _start(setup, output, "4.log", STEPS)
    assert child.wait() == 0, child.output()[-4000:]
    assert f"resuming from step {stopped} of 40" in child.output()
    _assert_same_run(output, uninterrupted)


def test_damaged_latest_checkpoints_are_quarantined_and_the_rerun_ends_bitwise_equal(setup, uninterrupted, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(uninterrupted, output)
    shutil.rmtree(output / "student")
    checkpoints = output / "checkpoints"
    assert _committed_steps(output) == [24, 28, 32, 36, 40]
    faults.truncate(checkpoints / "40")
    faults.random_bytes(checkpoints / "36")
    faults.flip_bit(checkpoints / "32")
    (checkpoints / "28" / "_CHECKPOINT_METADATA").unlink()  # the checksum record goes with it
    faults.flip_bit(checkpoints / "28")
    child = _start(setup, output, "damaged.log")
    assert child.wait() == 0, child.output()[-4000:]
    log = child.output()
    quarantined = sorted(p.name for p in (checkpoints / "quarantine").iterdir())
    assert [name.split("-")[0] for name in quarantined] == ["28", "32", "36", "40"]
    assert "28-no-checksum" in quarantined
    assert next(n for n in quarantined if n.startswith("32-")) in ("32-checksum-mismatch", "32-unreadable")
    for name in quarantined:
        step = name.split("-")[0]
        assert f"checkpoint step {step} in {checkpoints.resolve()} is damaged" in log
        assert (checkpoints / "quarantine" / name / "QUARANTINE.txt").read_text().startswith(f"checkpoint step {step}")
    assert "no checksum record" in log and "refused" in log
    assert "resuming from step 24 of 40" in log
    assert _committed_steps(output) == [24, 28, 32, 36, 40]  # the freed step numbers were saved again
    _assert_same_run(output, uninterrupted)


def _peaked_folder(folder, seed, layers, scale):
    """A Qwen3 folder whose output projection is scaled: next-token distributions this peaked."""
    config = models.DecoderConfig(
        "qwen3", vocab_size=320, hidden_size=48, intermediate_size=96, num_layers=layers, num_heads=4,
        num_kv_heads=2, head_dim=12, qk_norm=True, max_position_embeddings=128, eos_token_id=(2,), pad_token_id=0,
    )
    model = models.Decoder(config, rngs=nnx.Rngs(seed))
    model.lm_head[...] = model.lm_head[...] * scale
    models.save_pretrained(model, config, folder)
    make_tokenizer(folder)
    return folder


def test_neyman_chi2_without_a_clip_going_non_finite_stops_with_the_step_and_quantity(setup, tmp_path):
    # Two very peaked models that disagree: the student samples the tokens it is sure of, which the
    # teacher gives ~e^-300: log-ratios ~ -300, and neyman_chi2's 1/u = e^300 overflows float32.
    teacher = _peaked_folder(tmp_path / "teacher", 1, 2, 300.0)
    student = _peaked_folder(tmp_path / "student", 2, 1, 300.0)
    config = tmp_path / "neyman.json"
    config.write_text(json.dumps({"divergence": "neyman_chi2", "log_ratio_clip": None, "checkpoint_every": 1}))
    output = tmp_path / "run"
    argv = faults.train_argv("--teacher", teacher, "--student", student, "--prompts", setup[3], "--output", output,
                             "--quiet", "--steps", 6, "--prompts-per-step", 2, "--group-size", 2,
                             "--max-new-tokens", 6, "--max-prompt-length", 24, "--config", config)
    child = faults.Child(argv, setup[4], tmp_path / "neyman.log")
    assert child.wait() == 1, child.output()[-4000:]
    log = child.output()
    message = next(line for line in log.splitlines() if line.startswith("opd-jax train: error: step "))
    step = int(message.split("step ")[1].split(":")[0])
    assert "non-finite loss" in message or "non-finite grad_norm" in message, message
    assert "log_ratio_clip is off" in message and "done:" not in log
    assert not (output / "student").exists()  # nothing exported
    assert all(saved < step for saved in _committed_steps(output))  # nothing non-finite checkpointed
    assert not np.isfinite(_records(output)[-1]["loss"]) or not np.isfinite(_records(output)[-1]["grad_norm"])


@pytest.mark.parametrize("flags, config_text, message", [
    (["--learning-rate", "inf"], None, "learning_rate must lie in (0.0, 1.0] and be finite; got inf"),
    (["--learning-rate", "1e30"], None, "learning_rate must lie in (0.0, 1.0]; got 1e+30"),
    (["--weight-decay", "inf"], None, "weight_decay must lie in [0.0, ∞) and be finite; got inf"),
    ([], "learning_rate = inf\n", "learning_rate must lie in (0.0, 1.0] and be finite; got inf"),
    ([], '{"weight_decay": Infinity}', "weight_decay must lie in [0.0, ∞) and be finite; got inf"),
    ([], '{"temperature": NaN}', "temperature must lie in (0.0, ∞) and be finite; got nan"),
    (["--divergence", "alpha", "--alpha", "inf"], None, "alpha must be a finite number; got inf"),
    (["--learning-rate", "0.5", "--weight-decay", "2"], None, "learning_rate × weight_decay must be below 1"),
])
def test_non_finite_hyper_parameters_are_refused_at_parse_time(setup, tmp_path, capsys, flags, config_text, message):
    output = tmp_path / "run"
    argv = _argv(setup, output)[3:]  # main's argv starts at the command
    if config_text is not None:  # the config file's values, not the flags' (flags override it)
        at = argv.index("--learning-rate")
        del argv[at : at + 2]
    argv += flags
    if config_text is not None:
        path = tmp_path / ("opd.toml" if "=" in config_text else "opd.json")
        path.write_text(config_text)
        argv += ["--config", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def _check_resumable(folder, config):
    run_folder.RunFolder(folder, config).check_resumable()


def test_the_resume_guard_counts_only_what_a_resume_depends_on(tmp_path):
    base = train.TrainConfig(steps=10, checkpoint_every=5)
    (tmp_path / "config.json").write_text(json.dumps(base.to_dict()))  # flat, as earlier versions wrote it
    (tmp_path / "checkpoints").mkdir()  # as a run that stopped before its first checkpoint leaves it
    # No checkpoint to resume from: any fix is accepted.
    _check_resumable(tmp_path, train.TrainConfig(steps=10, divergence="js"))
    (tmp_path / "checkpoints" / "5").mkdir()
    for free in (dict(steps=30), dict(checkpoint_every=2, keep_checkpoints=9, eval_every=3, logit_chunk_size=64)):
        _check_resumable(tmp_path, train.TrainConfig(**{"steps": 10, "checkpoint_every": 5, **free}))
    with pytest.raises(ValueError, match=r"differs in \['divergence', 'learning_rate'\]"):
        _check_resumable(tmp_path, train.TrainConfig(steps=10, divergence="js", learning_rate=3e-4))
    (tmp_path / "config.json").write_text(json.dumps(train.TrainConfig(steps=10, schedule="cosine").to_dict()))
    with pytest.raises(ValueError, match=r"differs in \['steps'\]"):  # the cosine schedule's length
        _check_resumable(tmp_path, train.TrainConfig(steps=20, schedule="cosine"))


def test_a_second_signal_exits_at_once(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "from opd_jax.preemption import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('requested', stop.received == signal.SIGTERM, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "    print('not reached', flush=True)\n"
    )
    child = faults.Child([sys.executable, "-c", script], faults.child_env(tmp_path), tmp_path / "log")
    assert child.wait(timeout=120) == -signal.SIGINT
    assert "requested True" in child.output() and "not reached" not in child.output()
    assert "second signal (SIGINT): stopping at once" in child.output()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_two_processes_agree_on_the_step_at_sigterm_and_the_rerun_ends_bitwise_equal(setup, tmp_path):
    env = faults.child_env(setup[0] / "jax_cache", devices=4)

    def launch(mode):
        port = _free_port()
        return [faults.Child([sys.executable, str(HELPERS / "preemptible_sharded.py"), str(tmp_path), "2", str(i),
                              str(port), mode], env, tmp_path / f"{mode}-{i}.log") for i in range(2)]

    children = launch("first")
    try:
        preempted = tmp_path / "preempted"
        # SIGTERM to process 1 only: process 0 learns of it through the per-step agreement.
        reached = faults.signal_at_step(children[1], preempted, 3, signal.SIGTERM)
        codes = [child.wait() for child in children]
    finally:
        for child in children:
            child.kill_if_running()
    assert codes == [preemption.EXIT_RESUMABLE] * 2, [c.output()[-3000:] for c in children]
    stopped = faults.metric_steps(preempted)[-1]
    assert stopped in (reached, reached + 1) and stopped < 20
    assert stopped in _committed_steps(preempted)
    assert f"process 1: stopped by SIGTERM after step {stopped} of 20" in children[1].output()
    assert f"process 0: stopped by preemption notice after step {stopped} of 20" in children[0].output()
    children = launch("resume")
    try:
        codes = [child.wait() for child in children]
    finally:
        for child in children:
            child.kill_if_running()
    assert codes == [0, 0], [c.output()[-3000:] for c in children]
    assert f"resuming from step {stopped} of 20" in children[0].output()
    assert (preempted / "student" / "model.safetensors").read_bytes() == (
        tmp_path / "reference" / "student" / "model.safetensors").read_bytes()
    assert [json.loads(r)["step"] for r in (preempted / "metrics.jsonl").read_text().splitlines()] == list(range(1, 21))


def test_exit_status_constant_is_documented_as_resumable():
    assert EXIT_RESUMABLE == preemption.EXIT_RESUMABLE == os.EX_TEMPFAIL
