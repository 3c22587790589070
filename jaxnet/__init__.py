"""jaxnet: neural networks on JAX from pure (init, apply) layers with hand-written derivatives.

The public surface is re-exported here; see each module for the math.
Modules: activations, protocol, layers, combinators, summary, collapse, checks, losses,
backprop, train, datasets, checkpoint, precision, sharding, cli.
"""

from . import activations, checkpoint, datasets, losses, precision, protocol, sharding, train
from .activations import (
    ACTIVATIONS,
    elu,
    gelu,
    identity,
    leaky_relu,
    log_softmax,
    relu,
    sigmoid,
    silu,
    softmax,
    softplus,
    tanh,
)
from .attention import MultiHeadAttention, TransformerBlock
from .backprop import AutodiffFallbackWarning, manual_value_and_grad
from .checks import ActivationCheckError, ActivationReport, check_activation
from .collapse import collapse_linear
from .combinators import FanInConcat, FanInSum, FanOut, mlp, parallel, residual, serial
from .conv import Conv, Conv1D, Conv2D, ConvTranspose
from .embedding import Embedding, PositionalEmbedding
from .layer_checks import LayerCheckError, LayerReport, check_layer
from .layers import (
    Activation,
    Dense,
    Dropout,
    Elu,
    Flatten,
    Gelu,
    Identity,
    Layer,
    LayerNorm,
    LeakyRelu,
    LogSoftmax,
    NoBackwardRuleError,
    Relu,
    Reshape,
    ShapeError,
    Sigmoid,
    Silu,
    Softmax,
    Softplus,
    StatefulLayerError,
    Tanh,
    elementwise,
)
from .losses import accuracy, cross_entropy, l2_loss, softmax_cross_entropy
from .norms import BatchNorm, GroupNorm, RMSNorm
from .pooling import AvgPool, GlobalAvgPool, MaxPool, SumPool
from .precision import Policy, mixed_precision
from .summary import Summary, summary
from .train import TrainState, fit, init_state, make_epoch, make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    # activations
    "ACTIVATIONS", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "softplus", "silu",
    "identity", "softmax", "log_softmax",
    # layers
    "Layer", "ShapeError", "NoBackwardRuleError", "StatefulLayerError", "Dense", "elementwise",
    "Activation",
    "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Elu", "Gelu", "Softplus", "Silu", "Identity",
    "Softmax", "LogSoftmax", "Flatten", "Reshape", "Dropout", "LayerNorm",
    "Conv", "Conv1D", "Conv2D", "ConvTranspose", "MaxPool", "AvgPool", "SumPool", "GlobalAvgPool",
    "GroupNorm", "RMSNorm", "BatchNorm", "Embedding", "PositionalEmbedding", "MultiHeadAttention",
    "TransformerBlock",
    # combinators
    "serial", "parallel", "FanOut", "FanInSum", "FanInConcat", "residual", "mlp",
    # inspection
    "summary", "Summary", "collapse_linear", "check_activation", "ActivationReport",
    "ActivationCheckError", "check_layer", "LayerReport", "LayerCheckError",
    # manual backpropagation
    "manual_value_and_grad", "AutodiffFallbackWarning",
    # losses and metrics
    "softmax_cross_entropy", "cross_entropy", "l2_loss", "accuracy",
    # training
    "TrainState", "init_state", "make_train_step", "make_eval_step", "make_epoch", "fit",
    # precision
    "Policy", "mixed_precision",
    # modules
    "activations", "losses", "train", "datasets", "checkpoint", "precision", "sharding",
    "protocol",
]
