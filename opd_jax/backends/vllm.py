"""A rollout backend that samples with vLLM, in its own process and Python environment.

vLLM's CPU build needs Python 3.11 and ``torch==2.13.0+cpu``; opd_jax needs Python >= 3.12 (jax).
So the engine lives in a side environment (``.venv-vllm``, built by ``OPD_VLLM=1 .ci/bootstrap``)
and runs :mod:`opd_jax.backends.vllm_worker` there as a subprocess. The two talk over two pipes
(length-framed JSON, see the worker's docstring); the worker's stdout and stderr, where vLLM logs,
go to a log file whose tail every error quotes.

Weights travel through a folder in shared memory (``/dev/shm``, else the temporary directory): the
student is written there with :func:`opd_jax.models.save_pretrained` at start-up and again at every
:meth:`VllmBackend.sync_weights`, after which the engine reloads it in place (vLLM's
``reload_weights`` worker method through ``LLM.collective_rpc``) and drops its prefix cache; the
engine is never rebuilt.

What comes back (see docs/vllm.md for the measurements): tokens in exactly the layout of
:func:`opd_jax.sampling.generate`, and ``sampling_logp`` from vLLM's ``processed_logprobs`` mode:
the log-probability of the sampled token after temperature, top-k and top-p, as the backend
contract asks (0 for greedy decoding). Sampling is seeded per row from the JAX key, so the same key
and weights give the same tokens, but not the JAX sampler's tokens (another random stream).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models import Decoder, DecoderConfig, save_pretrained
from opd_jax.sampling import Rollout, SamplingConfig

__all__ = ["BOOTSTRAP_COMMAND", "CPU_HEAD_SIZES", "DEFAULT_PYTHON", "VllmBackend", "VllmWorkerError", "vllm_python"]

#: The command that builds the side environment.
BOOTSTRAP_COMMAND = "OPD_VLLM=1 .ci/bootstrap"
_REPO = pathlib.Path(__file__).resolve().parents[2]
#: The side environment's interpreter; ``OPD_VLLM_PYTHON`` or the ``python`` argument override it.
DEFAULT_PYTHON = _REPO / ".venv-vllm" / "bin" / "python"


def vllm_python(python: str | os.PathLike | None = None) -> pathlib.Path:
    """The side environment's interpreter: ``python``, else ``$OPD_VLLM_PYTHON``, else :data:`DEFAULT_PYTHON`."""
    return pathlib.Path(python or os.environ.get("OPD_VLLM_PYTHON") or DEFAULT_PYTHON)
_WORKER = pathlib.Path(__file__).with_name("vllm_worker.py")
#: Head sizes vLLM 0.32's CPU attention runs: ``CPUAttentionBackend.get_supported_head_sizes`` lists
#: 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 (not checked at engine start on CPU: another
#: size fails in the first forward pass, "Unsupported CPU attention configuration"); 48 is not listed
#: but runs (its vec16 kernel), measured like the others on the tiny Qwen3 of the tests. 8, 16, 24,
#: 40, 56 and 72 fail.
CPU_HEAD_SIZES = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
_LOG_TAIL_CHARS = 4000


class VllmWorkerError(RuntimeError):
    """The vLLM worker failed (exception, crash, timeout, missing environment); the message quotes it."""


def _shared_memory_dir() -> str | None:
    shm = pathlib.Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _log_tail(path: pathlib.Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - _LOG_TAIL_CHARS))
            return handle.read().decode(errors="replace")
    except OSError:
        return "<no worker log>"


def _shutdown(process: subprocess.Popen, requests: Connection, replies: Connection, workdir: str,
              grace_s: float, owner_pid: int) -> None:
    """Stop the worker (close request, then SIGTERM, then SIGKILL to its process group) and remove ``workdir``.

    A module-level function so that the finalizer holds no reference to the backend.
    """
    if os.getpid() != owner_pid:  # a forked copy of the parent exiting: the worker is not its own
        return
    try:
        if process.poll() is None:
            try:
                requests.send_bytes(json.dumps({"cmd": "close"}).encode())
            except OSError:
                pass
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        # Anything the worker started lives in its session (start_new_session), so the group kill
        # also reaps grandchildren.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass
    finally:
        for conn in (requests, replies):
            try:
                conn.close()
            except OSError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)


class VllmBackend:
    """Samples the student's rollouts with a vLLM engine running in ``.venv-vllm``.

    Args:
      config: the student's configuration (its ``head_dim`` must be one vLLM's attention supports;
        on CPU: :data:`CPU_HEAD_SIZES`).
      student: the student ``Decoder`` (its weights are the engine's first weights; its graph
        turns the ``nnx.State`` given to :meth:`sync_weights` back into a model).
      python: the side environment's interpreter (default ``$OPD_VLLM_PYTHON`` or
        ``<repo>/.venv-vllm/bin/python``).
      kv_cache_gib: KV-cache memory in GiB (``VLLM_CPU_KVCACHE_SPACE``, whole GiB).
      max_num_seqs: the most sequences the engine batches at once.
      max_model_len: the longest prompt + response (default: the model's
        ``max_position_embeddings``).
      dtype: the engine's dtype and the dtype the weights are written in ("float32" by default,
        so its log-probabilities compare with the float32 trainer).
      enforce_eager: skip vLLM's torch.compile / graph capture (faster start-up on CPU).
      engine_options: more keyword arguments of ``vllm.LLM``.
      env: more environment variables for the worker (e.g. ``VLLM_CPU_OMP_THREADS_BIND``).
      startup_timeout_s, request_timeout_s: how long to wait for the engine, and for one request.
      workdir: the folder in which the backend makes its own folder for the weights and the worker
        log (default: ``/dev/shm``, else the temporary directory); that folder is removed by
        :meth:`close`. In ``/dev/shm`` the weights take RAM: one copy of the checkpoint in ``dtype``.

    Raises:
      VllmWorkerError: the environment is missing or broken (the message names
        ``OPD_VLLM=1 .ci/bootstrap``), or the engine failed to start (quoting vLLM's error).
    """

    name = "vllm"

    def __init__(
        self,
        config: DecoderConfig,
        student: Decoder,
        *,
        python: str | os.PathLike | None = None,
        kv_cache_gib: int = 1,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        dtype: str = "float32",
        enforce_eager: bool = True,
        engine_options: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 600.0,
        request_timeout_s: float = 3600.0,
        workdir: str | os.PathLike | None = None,
    ):
        if int(kv_cache_gib) != kv_cache_gib or kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib must be a whole number of GiB >= 1 (VLLM_CPU_KVCACHE_SPACE); "
                             f"got {kv_cache_gib}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype!r}")
        self.config = config
        self.dtype = dtype
        self.max_model_len = int(max_model_len or config.max_position_embeddings)
        self.request_timeout_s = float(request_timeout_s)
        self.python = vllm_python(python)
        self._graphdef = nnx.graphdef(student)
        self._process: subprocess.Popen | None = None
        self._finalizer = None
        # One request in flight at a time: a sampling thread and the loop must not interleave
        # their messages on the pipes. close() does not take it (it may stop a running request).
        self._lock = threading.Lock()
        #: seconds: import vllm, build the engine, and the whole start-up seen from here.
        self.startup: dict[str, float] = {}
        #: seconds of the last :meth:`sync_weights`: writing the weights, the engine's reload, total.
        self.last_sync: dict[str, float] = {}

        if not (self.python.is_file() and os.access(self.python, os.X_OK)):
            raise VllmWorkerError(
                f"no vLLM environment: {self.python} is not an executable Python (set OPD_VLLM_PYTHON, or build "
                f"{DEFAULT_PYTHON.parent.parent} with `{BOOTSTRAP_COMMAND}`)"
            )
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="opd_vllm_", dir=workdir or _shared_memory_dir()))
        self.model_dir = self.workdir / "model"
        self.log_path = self.workdir / "worker.log"
        try:
            self._write(student)
            self._start(kv_cache_gib, max_num_seqs, enforce_eager, engine_options or {}, env or {},
                        startup_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- process management ---------------------------------------------------------------------

    def _start(self, kv_cache_gib, max_num_seqs, enforce_eager, engine_options, extra_env, timeout_s):
        options = {"dtype": self.dtype, "max_model_len": self.max_model_len, "max_num_seqs": int(max_num_seqs),
                   "enforce_eager": bool(enforce_eager), **engine_options}
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
        env.update({
            # The engine in the worker's own process: reload_weights reaches the model directly and
            # no engine-core process can outlive the worker.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        })
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        start = time.perf_counter()
        try:
            with self.log_path.open("wb") as log:
                self._process = subprocess.Popen(
                    [str(self.python), str(_WORKER), "--model", str(self.model_dir), "--request-fd", str(request_read),
                     "--reply-fd", str(reply_write), "--engine-options", json.dumps(options)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                    pass_fds=(request_read, reply_write), start_new_session=True,
                )
        except OSError as error:
            for fd in (request_read, request_write, reply_read, reply_write):
                os.close(fd)
            raise VllmWorkerError(f"could not start the vLLM worker with {self.python}: {error} (the environment is "
                                  f"built by `{BOOTSTRAP_COMMAND}`)") from None
        # Only the worker holds these ends now, so its exit reads as end of file here.
        os.close(request_read)
        os.close(reply_write)
        self._requests = Connection(request_write, readable=False)
        self._replies = Connection(reply_read, writable=False)
        self._finalizer = weakref.finalize(self, _shutdown, self._process, self._requests, self._replies,
                                           str(self.workdir), 10.0, os.getpid())
        ready = self._receive("start-up", timeout_s)
        self.startup = {"import_s": ready["import_seconds"], "engine_s": ready["engine_seconds"],
                        "total_s": time.perf_counter() - start}
        self.vllm_version = ready["vllm"]

    @property
    def pid(self) -> int | None:
        """The worker's process id (``None`` once closed)."""
        return None if self._process is None or self._finalizer is None or not self._finalizer.alive \
            else self._process.pid

    def _failure(self, what: str, detail: str) -> VllmWorkerError:
        tail = _log_tail(self.log_path).rstrip()
        return VllmWorkerError(f"vLLM worker failed during {what}: {detail}\n--- last lines of {self.log_path} ---\n"
                               f"{tail}")

    def _exit_detail(self) -> str:
        try:
            code = self._process.wait(5)
        except subprocess.TimeoutExpired:
            return f"the worker (pid {self._process.pid}) closed its reply pipe but is still running"
        if code is not None and code < 0:
            return f"the worker (pid {self._process.pid}) was killed by {signal.Signals(-code).name}"
        return f"the worker (pid {self._process.pid}) exited with status {code}"

    def _receive(self, what: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._replies.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                    message = json.loads(self._replies.recv_bytes())
                    break
            except (EOFError, OSError):  # the worker's end of the reply pipe closed: it is gone
                raise self._died(what) from None
            if time.monotonic() >= deadline:
                error = self._failure(what, f"no reply within {timeout_s:.0f} s; the worker was stopped")
                try:  # it is not answering, so it would not honour a close request either
                    os.killpg(self._process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self.close()
                raise error
        if message.get("ok"):
            return message
        stage = message.get("stage")
        if stage is None:  # the request failed; the worker keeps serving
            raise self._failure(what, message.get("error", "unknown error"))
        if stage == "import":
            detail = (f"{message['error']}\n{message.get('python', self.python)} cannot import vllm; rebuild the "
                      f"environment with `{BOOTSTRAP_COMMAND}`")
        else:
            detail = message["error"]
            if self.config.head_dim not in CPU_HEAD_SIZES:
                detail += (f"\n(head_dim {self.config.head_dim}: vLLM's CPU attention supports head sizes "
                           f"{', '.join(map(str, CPU_HEAD_SIZES))})")
        error = self._failure(what, detail)
        self.close()
        raise error
        return message

    def _died(self, what: str) -> VllmWorkerError:
        detail = self._exit_detail()
        if what == "start-up":
            detail += (f" before the engine was ready (if the environment is broken, rebuild it with "
                       f"`{BOOTSTRAP_COMMAND}`)")
        error = self._failure(what, detail)
        self.close()
        return error

    def _request(self, what: str, message: dict, timeout_s: float | None = None) -> dict:
        with self._lock:
            if self._finalizer is None or not self._finalizer.alive:
                raise VllmWorkerError(f"vLLM backend used after close() (during {what})")
            try:
                self._requests.send_bytes(json.dumps(message).encode())
            except OSError:
                raise self._died(what) from None
            return self._receive(what, self.request_timeout_s if timeout_s is None else timeout_s)

    def close(self) -> None:
        """Stop the worker and remove the shared-memory folder; safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()
        elif hasattr(self, "workdir"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> VllmBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the backend protocol -------------------------------------------------------------------

    def _write(self, student: Decoder) -> None:
        save_pretrained(student, self.config, self.model_dir, dtype=jnp.dtype(self.dtype))

    def sync_weights(self, params: Any) -> None:
        """Write ``params`` (the student's ``nnx.State``, or a ``Decoder``) to shared memory; the engine reloads them.

        Raises:
          VllmWorkerError: the write or the engine's reload failed (the loop reports it as a
            :class:`~opd_jax.backends.WeightSyncError` with the step).
        """
        start = time.perf_counter()
        student = params if isinstance(params, nnx.Module) else nnx.merge(self._graphdef, params)
        if self._finalizer is None or not self._finalizer.alive:
            raise VllmWorkerError("vLLM backend used after close() (during sync_weights)")
        self._write(student)
        written = time.perf_counter()
        reply = self._request("sync_weights", {"cmd": "reload"})
        self.last_sync = {"write_s": written - start, "reload_s": reply["seconds"],
                          "total_s": time.perf_counter() - start}

    def generate(self, prompt_tokens_BxP, prompt_mask_BxP, key, sampling: SamplingConfig) -> Rollout:
        """A :class:`Rollout` ``[B, P + N]`` in :func:`opd_jax.sampling.generate`'s layout.

        Each row's real (unpadded) prompt goes to vLLM; the response (stop token included) comes
        back after the ``P`` prompt slots, then ``pad_id``. Per-row seeds are drawn from ``key``.
        """
        tokens_BxP = np.asarray(prompt_tokens_BxP).astype(np.int32)
        mask_BxP = np.asarray(prompt_mask_BxP).astype(bool)
        if tokens_BxP.ndim != 2 or tokens_BxP.shape != mask_BxP.shape:
            raise ValueError(f"prompt_tokens {list(tokens_BxP.shape)} and prompt_mask {list(mask_BxP.shape)} must be "
                             "the same [B, P]")
        batch, prompt_length = tokens_BxP.shape
        new = sampling.max_new_tokens
        if prompt_length + new > self.max_model_len:
            raise ValueError(f"prompt length {prompt_length} + max_new_tokens {new} = {prompt_length + new} exceeds "
                             f"the vLLM engine's max_model_len {self.max_model_len}")
        counts = mask_BxP.sum(axis=1)
        left_padded = mask_BxP == (np.arange(prompt_length)[None, :] >= prompt_length - counts[:, None])
        if (counts == 0).any() or not left_padded.all():
            bad = int(np.flatnonzero((counts == 0) | ~left_padded.all(axis=1))[0])
            raise ValueError(f"prompt row {bad} must be left-padded with at least one real token "
                             f"(mask {mask_BxP[bad].astype(int).tolist()})")
        real = tokens_BxP[mask_BxP]
        if real.size and (real.min() < 0 or real.max() >= self.config.vocab_size):
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size}); got {int(real.min())}.."
                             f"{int(real.max())} (vLLM would hang on an id outside the vocabulary)")
        greedy = sampling.temperature == 0
        seeds = None
        if not greedy:
            seeds = np.asarray(jax.random.bits(key, (batch,), jnp.uint32)).astype(np.int64).tolist()
        params = {"temperature": float(sampling.temperature), "top_k": sampling.top_k, "top_p": sampling.top_p,
                  "max_tokens": new, "stop_token_ids": [int(i) for i in sampling.stop_ids]}
        prompts = [tokens_BxP[row, prompt_length - counts[row]:].tolist() for row in range(batch)]
        reply = self._request("generate", {"cmd": "generate", "prompts": prompts, "params": params, "seeds": seeds})

        response = np.full((batch, new), sampling.pad_id, np.int32)
        response_mask = np.zeros((batch, new), bool)
        logp = np.zeros((batch, new), np.float32)
        for row, ids in enumerate(reply["tokens"]):
            if not 0 < len(ids) <= new:
                raise VllmWorkerError(f"vLLM returned {len(ids)} tokens for row {row}, expected 1..{new}")
            response[row, :len(ids)] = ids
            response_mask[row, :len(ids)] = True
            if not greedy:
                logp[row, :len(ids)] = reply["logprobs"][row]
        return Rollout(
            tokens=jnp.asarray(np.concatenate([tokens_BxP, response], axis=1)),
            token_mask=jnp.asarray(np.concatenate([mask_BxP, response_mask], axis=1)),
            response_mask=jnp.asarray(np.concatenate([np.zeros_like(mask_BxP), response_mask], axis=1)),
            sampling_logp=jnp.asarray(np.concatenate([np.zeros((batch, prompt_length), np.float32), logp], axis=1)),
        )
