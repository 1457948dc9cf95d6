"""How the models of a run execute: attention kernel, rematerialisation, dtypes (speed and memory,
not the objective; a resumed run may change them)."""

from __future__ import annotations

import dataclasses

from opd_jax.models.decoder import DTYPES, REMAT_POLICIES

__all__ = ["Execution"]


@dataclasses.dataclass(frozen=True)
class Execution:
    """How the models run: speed and memory, not the objective (a resumed run may change them).

    Attributes:
      attention: ``auto`` | ``xla`` | ``chunked`` | ``splash`` | ``cudnn`` (both models).
      remat: the student's rematerialisation: ``none`` | ``full`` | ``dots``.
      param_dtype: student parameters and optimizer state.
      compute_dtype, teacher_dtype: matmuls / activations of both models, and the teacher's
        parameters; ``auto``: bfloat16 on TPU/GPU, float32 on CPU.
      export_dtype: the exported student's weights; ``auto``: the student checkpoint's.
    """

    attention: str = "auto"
    remat: str = "full"
    param_dtype: str = "float32"
    compute_dtype: str = "auto"
    teacher_dtype: str = "auto"
    export_dtype: str = "auto"

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype", "teacher_dtype", "export_dtype"):
            allowed = DTYPES if name == "param_dtype" else ("auto", *DTYPES)
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}; got {self.remat!r}")
