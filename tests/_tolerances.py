"""The tolerance for comparing two correct evaluations of one formula in each float dtype.

They differ by a few units in the last place (ulp): float16's ulp is 2⁻¹⁰ ≈ 1e-3,
bfloat16's 2⁻⁷ ≈ 8e-3, float32's 2⁻²³ ≈ 1e-7, float64's 2⁻⁵² ≈ 2e-16. rtol is ~10 ulp;
atol covers results that cancel to about 0.
"""

import jax.numpy as jnp

TOL = {
    jnp.dtype(jnp.float16): dict(rtol=1e-2, atol=2e-3),
    jnp.dtype(jnp.bfloat16): dict(rtol=6e-2, atol=1.6e-2),
    jnp.dtype(jnp.float32): dict(rtol=1e-5, atol=1e-6),
    jnp.dtype(jnp.float64): dict(rtol=1e-12, atol=1e-14),
}
