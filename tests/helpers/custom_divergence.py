"""A custom f-divergence defined at module level, so a run's config.json can record it as
``custom_divergence:triangular`` and a resumed process can import it again."""

import jax.numpy as jnp


def triangular(log_u):
    """Triangular discrimination (Le Cam): ``f(u) = (u − 1)² / (u + 1)``, convex, ``f(1) = 0``."""
    return jnp.expm1(log_u) ** 2 / (jnp.exp(log_u) + 1)
