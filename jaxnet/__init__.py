from .activations import *  # noqa
from .layers import *  # noqa
from .combinators import *  # noqa
