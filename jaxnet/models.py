"""Ready-made nets for the command line and the examples, built from jaxnet's layers.

Each takes flat example rows (N, F), as the data sets hold them, and reshapes them
itself (a :func:`~jaxnet.Reshape` first), so that ``fit``, the evaluation and the
checkpoints treat every model alike.

- :func:`cnn`: for a 1-d signal of length F, the MNIST-1D paper's CNN (three Conv1D of
  25 channels, kernels 5, 3, 3, stride 2, padding 1, ReLU, then Dense); for an image of
  H×W pixels, 3×3 convolutions of 32, 32 (stride 2) and 64 (stride 2) channels, then
  Dense (examples/digits_cnn.py's net: strided convolutions downsample at a sixth of the
  time max pooling took in its training step). ``batch_norm`` puts a BatchNorm after every
  convolution (before its ReLU).
- :func:`transformer`: the F values as a sequence of F steps of one feature: a Dense
  embedding, learned positions, pre-norm transformer blocks, a final LayerNorm, the mean
  over the steps and Dense.
"""

from __future__ import annotations

from collections.abc import Sequence

from .attention import TransformerBlock
from .combinators import serial
from .conv import Conv1D, Conv2D
from .embedding import PositionalEmbedding
from .layers import Dense, Flatten, Layer, LayerNorm, Relu, Reshape
from .norms import BatchNorm
from .pooling import GlobalAvgPool

__all__ = ["cnn", "transformer"]


def _conv_block(conv: Layer, batch_norm: bool) -> list[Layer]:
    return [conv] + ([BatchNorm()] if batch_norm else []) + [Relu]


def cnn(example_shape: Sequence[int], num_classes: int, *, batch_norm: bool = False,
        channels: int = 25) -> Layer:
    """A convolutional classifier for flat rows of a 1-d signal (``example_shape=(L,)``) or of
    an image (``(H, W)``), channels-last inside. Width (the course's) of a convolution is its
    number of output channels."""
    shape = tuple(int(d) for d in example_shape)
    if len(shape) == 1:
        (length,) = shape
        pad = ((1, 1),)
        layers = [Reshape((length, 1))]
        for k in (5, 3, 3):
            layers += _conv_block(Conv1D(channels, k, strides=2, padding=pad), batch_norm)
        return serial(*layers, Flatten, Dense(num_classes))
    if len(shape) == 2:
        h, w = shape
        layers = [Reshape((h, w, 1))]
        for out, stride in ((32, 1), (32, 2), (64, 2)):
            layers += _conv_block(Conv2D(out, 3, strides=stride), batch_norm)
        return serial(*layers, Flatten, Dense(num_classes))
    raise ValueError(f"cnn takes a 1-d signal (L,) or an image (H, W), got example shape {shape}")


def transformer(length: int, num_classes: int, *, dim: int = 32, depth: int = 2,
                num_heads: int = 4, mlp_dim: int = 64) -> Layer:
    """A transformer classifier for rows of ``length`` values read as a sequence of one
    feature per step (bidirectional attention: the whole sequence is the input)."""
    if dim % num_heads:
        raise ValueError(f"transformer: num_heads={num_heads} must divide dim={dim}")
    blocks = [TransformerBlock(num_heads, dim // num_heads, mlp_dim) for _ in range(depth)]
    return serial(Reshape((length, 1)), Dense(dim), PositionalEmbedding(length), *blocks,
                  LayerNorm(), GlobalAvgPool, Dense(num_classes))
