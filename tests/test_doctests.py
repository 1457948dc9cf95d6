"""The examples in the public functions' docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ("opd_jax.divergences", "opd_jax.advantages", "opd_jax.objectives", "opd_jax.config", "opd_jax.topk",
           "opd_jax.tasks", "opd_jax.tasks.tool_use.tools")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no examples"
