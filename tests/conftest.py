"""Test configuration.

- float64 is on, so that tests can compare in double precision; tests that need
  float32 ask for it explicitly.
- XLA's optimisations are mostly off (``jax_disable_most_optimizations``: backend
  optimisation level 0 and LLVM's expensive passes off): the tests check what the
  code computes, and most of their time is XLA compiling many small programs, which
  this cuts by a third or more (conv, pooling, norm and layer tests: 46 s → 29 s).
  Subprocesses inherit it through ``JAX_DISABLE_MOST_OPTIMIZATIONS``. A test that
  trains convolutions long enough for run time to outweigh compile time asks for
  the ``xla_optimized`` fixture (a digits-CNN epoch takes 7.5 s unoptimised, 1.1 s
  optimised). Benchmarks and examples run outside the tests with XLA's defaults.
"""

import os

import pytest

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # read when JAX is imported

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def xla_optimized():
    """XLA's full optimisation for the duration of one test (the setting is read at every
    compile)."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
