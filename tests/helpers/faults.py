"""Real faults for `opd-jax train` child processes: signals at chosen steps, damaged checkpoint files.

Used by tests/test_preemption.py. Nothing here mocks the loop: the children are real `opd-jax
train` (or ``train.train``) processes, the signals are real, and damage is done to the files orbax
wrote.
"""

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import numpy as np

HELPERS = pathlib.Path(__file__).parent


def child_env(cache_dir, devices: int | None = None) -> dict:
    """The environment of a child: CPU, float32, and a persistent compilation cache shared by the
    children of one test session (later children skip most compilation; compiled code is the same)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if devices is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


class Child:
    """A child process whose stdout and stderr go to a file (so a full pipe never blocks it)."""

    def __init__(self, argv, env, log_path):
        self.log_path = pathlib.Path(log_path)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout=600) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_if_running(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def train_argv(*args) -> list[str]:
    return [sys.executable, "-m", "opd_jax", "train", *map(str, args)]


def metric_steps(output) -> list[int]:
    path = pathlib.Path(output) / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return steps


def signal_at_step(child: Child, output, step: int, signum, *, times: int = 1, timeout: float = 600) -> int:
    """Once ``metrics.jsonl`` shows ``step``, freeze the child (SIGSTOP), read the step it reached,
    send ``signum`` (``times`` times) and let it continue (SIGCONT).

    Freezing makes "the step it was in" observable: the child had completed the returned step and
    no other when the signal arrived.
    """
    deadline = time.time() + timeout
    while not metric_steps(output) or metric_steps(output)[-1] < step:
        assert child.process.poll() is None, f"the child ended before step {step}:\n{child.output()[-4000:]}"
        assert time.time() < deadline, child.output()[-4000:]
        time.sleep(0.002)
    child.process.send_signal(signal.SIGSTOP)
    reached = metric_steps(output)[-1]
    for _ in range(times):
        child.process.send_signal(signum)
    child.process.send_signal(signal.SIGCONT)
    return reached


def kill_after_checkpoint(process: subprocess.Popen, output, step: int, *, timeout: float = 600) -> None:
    """SIGKILL ``process`` once ``output/checkpoints/<step>`` exists (no chance to clean up)."""
    deadline = time.time() + timeout
    while not (pathlib.Path(output) / "checkpoints" / str(step)).is_dir():
        assert process.poll() is None and time.time() < deadline, f"no checkpoint {step} in {output}"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def data_files(step_dir) -> list[pathlib.Path]:
    """The array data files of one orbax step folder (OCDBT ``d/`` files)."""
    files = sorted(p for p in pathlib.Path(step_dir).rglob("*") if p.is_file() and p.parent.name == "d")
    assert files, f"no data files in {step_dir}"
    return files


def truncate(step_dir) -> None:
    for path in data_files(step_dir):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(step_dir, seed=0) -> None:
    rng = np.random.default_rng(seed)
    for path in data_files(step_dir):
        raw = bytearray(path.read_bytes())
        start = len(raw) // 3
        raw[start : start + 64] = rng.integers(0, 256, size=len(raw[start : start + 64]), dtype=np.uint8).tobytes()
        path.write_bytes(bytes(raw))


def flip_bit(step_dir, bit=3) -> None:
    """One bit in the middle of the largest data file (the parameters)."""
    path = max(data_files(step_dir), key=lambda p: p.stat().st_size)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1 << bit
    path.write_bytes(bytes(raw))


def tensorboard_steps(directory, tag: str) -> list[int]:
    """Steps of ``tag`` as TensorBoard shows them: event files in order, and a session-start event
    at step s (tensorboardX's purge_step) drops the earlier events of steps >= s."""
    from tensorboardX.proto import event_pb2

    steps: list[int] = []
    for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
        raw, offset = path.read_bytes(), 0
        while offset + 12 <= len(raw):
            (length,) = struct.unpack("<Q", raw[offset : offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                steps = [s for s in steps if s < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    steps.append(event.step)
    return steps
