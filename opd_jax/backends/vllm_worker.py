"""The vLLM side of :class:`opd_jax.backends.vllm.VllmBackend`: one engine, driven over two pipes.

Run by the Python 3.11 environment that holds vLLM (``.venv-vllm``), never imported by opd_jax:
this file uses only vllm, torch and the standard library (jax is not installed there).

Protocol. The parent passes two pipe file descriptors (``--request-fd``, ``--reply-fd``) and reads
nothing from stdout or stderr: vLLM logs to both, so they go to a log file and cannot corrupt the
messages. Each message is one UTF-8 JSON object framed by :class:`multiprocessing.connection.Connection`
(``send_bytes`` / ``recv_bytes``: a length header, then the bytes). Every reply has ``"ok"``; a
failed request replies ``{"ok": false, "error": <message and traceback>}`` and the worker keeps
serving. The first message the worker sends is ``{"ok": true, "event": "ready", ...}`` once the
engine is built and has decoded one warm-up token, or ``{"ok": false, "stage": "import" |
"engine", ...}`` before it exits.

Requests:
  ``{"cmd": "generate", "prompts": [[int]], "params": {...}, "seeds": [int] | null}`` ->
    ``{"ok": true, "tokens": [[int]], "logprobs": [[float] | null], "finish": [str]}`` (a row's
    log-probabilities are null when greedy)
  ``{"cmd": "reload"}`` -> reload the weights from the model folder (rewritten by the parent) in
    place, reset the prefix cache -> ``{"ok": true, "seconds": float}``
  ``{"cmd": "ping"}`` -> ``{"ok": true, "pid": int}``
  ``{"cmd": "close"}`` -> ``{"ok": true}``, then the worker exits.
End of file on the request pipe, or the parent's death (checked every second, also during a
request), makes the worker exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

# Run as a script, this file's folder leads sys.path, and its sibling vllm.py (the opd_jax side)
# would shadow the vllm package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]


def _send(conn: Connection, message: dict) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _engine(model: str, options: dict):
    from vllm import LLM

    return LLM(
        model=model,
        skip_tokenizer_init=True,
        # Log-probabilities of the distribution actually sampled from: after temperature, top-k and
        # top-p (vLLM's default "raw_logprobs" would be the untempered model's).
        logprobs_mode="processed_logprobs",
        # Stops are the caller's stop ids only (the model folder's generation_config is ignored).
        generation_config="vllm",
        seed=0,
        **options,
    )


def _sampling_params(params: dict, seed: int | None):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=params["temperature"],
        top_k=params.get("top_k") or 0,
        top_p=params.get("top_p") or 1.0,
        max_tokens=params["max_tokens"],
        stop_token_ids=list(params["stop_token_ids"]),
        # generation_config.json's eos would otherwise be added to the stop ids behind our back.
        ignore_eos=True,
        logprobs=0 if params["temperature"] > 0 else None,
        seed=seed,
        detokenize=False,
        skip_special_tokens=False,
    )


def _generate(llm, request: dict) -> dict:
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(row)) for row in request["prompts"]]
    seeds = request.get("seeds") or [None] * len(prompts)
    params = [_sampling_params(request["params"], seed) for seed in seeds]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens, logprobs, finish = [], [], []
    for output in outputs:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        tokens.append(ids)
        finish.append(str(completion.finish_reason))
        if completion.logprobs is None:
            logprobs.append(None)
        else:
            logprobs.append([float(step[token].logprob) for step, token in zip(completion.logprobs, ids)])
    return {"ok": True, "tokens": tokens, "logprobs": logprobs, "finish": finish}


def _warm_up(llm) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.generate([TokensPrompt(prompt_token_ids=[0])],
                 SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False), use_tqdm=False)


def _prepare_tied_head(worker) -> bool:
    """Prepare the output head again when it shares the input embedding's weight.

    vLLM's CPU layers keep a prepacked copy of each weight for their matmul (``cpu_linear``), made
    when the weights are processed after loading. The layer-wise ``reload_weights`` of vLLM 0.32
    refreshes the embedding's weight but not the head's copy when the two are tied, so the engine
    went on computing logits with the old embedding (measured: mean |log-prob gap| 0.25 after a
    sync, against 2e-7 untied, with every parameter equal to a fresh engine's).
    """
    network = worker.model_runner.get_model()
    head = getattr(network, "lm_head", None)
    if head is None or not getattr(network.config, "tie_word_embeddings", False):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def _reload(llm, model: str) -> dict:
    start = time.perf_counter()
    llm.collective_rpc("reload_weights", kwargs={"weights_path": model})
    llm.collective_rpc(_prepare_tied_head)
    # Cached prefixes hold keys and values of the old weights.
    llm.reset_prefix_cache()
    return {"ok": True, "seconds": time.perf_counter() - start}


def _exit_with_parent(interval_s: float = 1.0) -> None:
    """Exit when the parent is gone, even in the middle of a request (the pipes only say so between requests)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(5)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF folder (config.json + model.safetensors)")
    parser.add_argument("--request-fd", type=int, required=True)
    parser.add_argument("--reply-fd", type=int, required=True)
    parser.add_argument("--engine-options", default="{}", help="JSON keyword arguments of vllm.LLM")
    args = parser.parse_args(argv)
    requests = Connection(args.request_fd, writable=False)
    replies = Connection(args.reply_fd, readable=False)
    # Processes vLLM or torch start must not hold the pipes open (the parent reads end of file
    # from the reply pipe as "the worker is gone").
    os.set_inheritable(args.request_fd, False)
    os.set_inheritable(args.reply_fd, False)

    _exit_with_parent()
    start = time.perf_counter()
    try:
        import vllm
    except BaseException as error:  # noqa: BLE001 - the parent reports it with the bootstrap hint
        _send(replies, {"ok": False, "stage": "import", "error": f"import vllm failed: {error!r}\n"
                        + traceback.format_exc(), "python": sys.executable})
        return 3
    import_seconds = time.perf_counter() - start
    try:
        llm = _engine(args.model, json.loads(args.engine_options))
        # Some failures (e.g. a head size the CPU attention kernel lacks) only show in the first
        # forward pass; one token now makes them start-up errors.
        _warm_up(llm)
    except BaseException as error:  # noqa: BLE001
        _send(replies, {"ok": False, "stage": "engine", "error": f"building the vLLM engine failed: {error!r}\n"
                        + traceback.format_exc()})
        return 4
    _send(replies, {"ok": True, "event": "ready", "pid": os.getpid(), "vllm": vllm.__version__,
                    "import_seconds": import_seconds, "engine_seconds": time.perf_counter() - start - import_seconds})

    while True:
        try:
            request = json.loads(requests.recv_bytes())
        except EOFError:
            return 0
        command = request.get("cmd")
        try:
            if command == "generate":
                reply = _generate(llm, request)
            elif command == "reload":
                reply = _reload(llm, args.model)
            elif command == "ping":
                reply = {"ok": True, "pid": os.getpid()}
            elif command == "close":
                _send(replies, {"ok": True})
                return 0
            else:
                reply = {"ok": False, "error": f"unknown command {command!r}"}
        except Exception as error:  # noqa: BLE001 - reported to the parent, the worker keeps serving
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}\n" + traceback.format_exc()}
        _send(replies, reply)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so nothing is left to
    # clean up; skipping interpreter teardown saves seconds of torch / vLLM finalisers.
    os._exit(code)
