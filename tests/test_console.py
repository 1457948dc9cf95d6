"""A clean console (issue 27 item 7): on a host without a TPU, opd-jax commands print no libtpu line.

The tpu extra installs libtpu (for opd-jax plan); jax would otherwise start its TPU plugin on every
command and libtpu would print its start-up warnings, an E0000 line and a source trace.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from opd_jax.commands import host_has_tpu

LIBTPU_LINES = ("Failed to find host bounds", "E0000", "unexpected worker hostname", "Source Location Trace",
                "could not determine TPU", "libtpu")


def _environment():
    env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    # libtpu takes a machine-wide lock file; without this it fails silently while another process
    # (a plan test) holds it, and the check below would pass without proving anything.
    return {**env, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None or host_has_tpu(),
                    reason="needs libtpu installed on a host without a TPU")
def test_verify_prints_no_libtpu_line_on_a_host_without_tpu():
    # The lines this test looks for do appear when jax starts with the TPU plugin here.
    bare = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=_environment(),
                          capture_output=True, text=True)
    assert any(line in bare.stderr for line in LIBTPU_LINES), bare.stderr
    verify = subprocess.run([sys.executable, "-m", "opd_jax", "verify", "--vocab-size", "2", "--horizon", "1",
                             "--seeds", "0", "--divergence", "reverse_kl", "--quiet"],
                            env=_environment(), capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert "reverse_kl" in verify.stdout
    assert not [line for line in LIBTPU_LINES if line in verify.stderr], verify.stderr
