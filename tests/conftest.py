"""Test-wide settings.

float64 is enabled at import so that the exact checks (closed forms, enumeration) can hold to
~1e-12; tests of float32 / bfloat16 behaviour create arrays of those dtypes explicitly.
"""

import os

# libtpu is installed (the tpu extra, for ahead-of-time TPU compiles); without a TPU it would print
# an initialisation trace on every backend start. Tests run on the CPU; topologies still compile.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests that compile for a TPU topology load libtpu, which takes a machine-wide lock by default; a
# plan run in another process (or a test's child process) must not make them fail.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

# JAX compiles each new shape on first use, so the first examples are slow: no deadline. A modest
# example count keeps the suite fast on two CPU cores.
settings.register_profile(
    "opd_jax",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("opd_jax")
