"""Test configuration.

- float64 is on, so that tests can compare in double precision; tests that need
  float32 ask for it explicitly.
- LLVM's expensive passes are off (``--xla_llvm_disable_expensive_passes``): the
  tests check what the code computes, and most of their time is XLA compiling
  many small programs. This flag cuts compile time as much as
  ``--xla_backend_optimization_level=0`` did, without that flag's slow convolution
  loops (a digits-CNN epoch took 7.5 s instead of 1.1 s). Subprocesses inherit it
  through ``XLA_FLAGS``; benchmarks and examples run outside the tests with XLA's
  defaults.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_llvm_disable_expensive_passes" not in _flags:  # before JAX starts its backend
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_llvm_disable_expensive_passes=true".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
