"""The inputs of the loss benchmarks, built identically in both environments (NumPy only).

Student logits are ``2·N(0, 1)``; teacher logits are the student's plus ``1.5·N(0, 1)``, so the two
distributions differ by a realistic amount (per-token generalized JS of order 0.1–1) without being
unrelated. Row ``b`` of the mask ends ``b · T // 8`` tokens early (row 0 is full), so padding is
exercised whenever ``B > 1``. Each side reports :func:`checksum` of what it built and the driver
checks that they match (NumPy's generator streams are stable, but the two environments run
different NumPy versions).
"""

from __future__ import annotations

import numpy as np


def make_logits(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``student [B, T, V]`` float32, ``teacher [B, T, V]`` float32, ``mask [B, T]`` bool."""
    rng = np.random.default_rng(seed)
    student = rng.standard_normal((batch, length, vocab), dtype=np.float32)
    student *= 2.0
    teacher = rng.standard_normal((batch, length, vocab), dtype=np.float32)
    teacher *= 1.5
    teacher += student
    return student, teacher, make_mask(batch, length)


def make_mask(batch: int, length: int) -> np.ndarray:
    valid = length - (np.arange(batch) * length) // 8
    return np.arange(length)[None, :] < np.maximum(valid, 1)[:, None]


def make_sampled(batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[B, T]`` student and teacher log-probabilities of sampled tokens (float32) and the mask."""
    rng = np.random.default_rng(seed)
    student = -np.abs(rng.standard_normal((batch, length), dtype=np.float32)) * 2.0
    teacher = np.minimum(student + rng.standard_normal((batch, length), dtype=np.float32), 0.0)
    return student, teacher.astype(np.float32), make_mask(batch, length)


def checksum(array: np.ndarray) -> float:
    """A float64 fingerprint of the first and last 4096 entries."""
    flat = np.asarray(array).reshape(-1)
    return float(np.sum(flat[:4096], dtype=np.float64) + 2.0 * np.sum(flat[-4096:], dtype=np.float64))


def gradient_probe(gradient: np.ndarray) -> dict:
    """A few fixed gradient entries and the gradient's norm, to compare the two sides' gradients."""
    gradient = np.asarray(gradient)
    return {
        "norm": float(np.linalg.norm(gradient.reshape(-1).astype(np.float64))),
        "first": [float(x) for x in gradient[0, 0, :8]],
        "last": [float(x) for x in gradient[-1, gradient.shape[1] // 2, -8:]],
    }
