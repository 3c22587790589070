"""Test configuration.

- float64 is on, so that tests can compare in double precision; tests that need
  float32 ask for it explicitly.
- XLA's backend optimisation is off (``--xla_backend_optimization_level=0``):
  the tests check what the code computes, and most of their time is XLA
  compiling many small programs, which this cuts by about a quarter. Benchmarks
  and the examples run with XLA's defaults. Tests that start fresh processes
  set their own ``XLA_FLAGS``.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:  # before JAX starts its backend
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
