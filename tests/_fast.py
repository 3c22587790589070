"""Cheaper setup for tests whose subject is not the initialiser or XLA's optimiser.

Most of these tests' time is XLA compiling small programs on two shared CPU cores.

- :func:`numpy_init`: a net's init draws every parameter with ``jax.random``; run eagerly,
  each distinct shape compiles its own threefry program (0.1-0.7 s each, the largest single
  cost in many tests), and inside a jitted program the draws make the compile several times
  longer than the computation under test. It traces the init abstractly (``jax.eval_shape``:
  nothing runs or compiles) for the tree, shapes and dtypes, and fills it in numpy at the
  initialisers' scale:

  - arrays of two or more axes (weights, kernels, embedding tables): N(0, 1/fan_in), fan_in
    the product of all axes but the last (the scale of LeCun/Glorot initialisation);
  - ``scale`` and ``var`` vectors (norm gains, BatchNorm's running variance): 1 + N(0, 0.1²)
    and 1 + U[0, 0.5);
  - other vectors (biases, offsets, running means): N(0, 0.1²), not 0, so that they matter.

  Tests of init itself (shapes, dtypes, counts, seeds) still call the net's init.
- :func:`normal`: standard normal data drawn in numpy.
"""

import jax
import numpy as np

from jaxnet.protocol import init_with_state


def _leaf(path, spec, rng, dtype):
    shape, name = spec.shape, str(getattr(path[-1], "key", "")) if path else ""
    if len(shape) >= 2:
        a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "scale":
        a = 1 + 0.1 * rng.standard_normal(shape)
    elif name == "var":
        a = 1 + 0.5 * rng.random(shape)
    else:
        a = 0.1 * rng.standard_normal(shape)
    return np.asarray(a, spec.dtype if dtype is None else dtype)


def numpy_init(net, input_shape, seed=0, dtype=None, with_state=False):
    """``(output_shape, params)`` (``with_state``: ``(output_shape, params, state)``) of ``net``
    for ``input_shape``, drawn in numpy from ``seed``; ``dtype`` casts every leaf (default: the
    init's dtypes). Putting numpy arrays on the device compiles nothing."""
    box = []

    def init():
        out_shape, params, state = init_with_state(net, jax.random.key(0), input_shape)
        box.append(out_shape)
        return params, state

    params, state = jax.eval_shape(init)
    rng = np.random.default_rng(seed)
    params, state = jax.device_put(jax.tree_util.tree_map_with_path(
        lambda p, s: _leaf(p, s, rng, dtype), (params, state)))
    out_shape = box[0]
    return (out_shape, params, state) if with_state else (out_shape, params)


def normal(shape, seed=0, dtype=np.float64):
    """Standard normal draws made in numpy, on the device (``jax.random.normal`` compiles a
    program per shape and dtype)."""
    return jax.device_put(np.random.default_rng(seed).standard_normal(shape).astype(dtype))
