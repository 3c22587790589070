"""Test configuration: float64 is on so that tests can compare in double precision.

Tests that need float32 ask for it explicitly.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
