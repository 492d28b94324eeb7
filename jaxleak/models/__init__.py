"""Victim models (Flax linen) whose Dense layers leak their inputs through gradients.

Every victim exposes its classification head, a Dense layer named ``head``,
with ``layers["head"].feature_shape`` the ``[H, W, C]`` map that is flattened
(NHWC order) into the head. For one example the head's gradient is the outer
product ``grad(kernel) = x grad(bias)^T`` that SPE inverts. The MLP also
exposes its first layer ``fc1`` as ``layers["first"]``, whose input is the
image itself.

For the FedAvg attacks: ``convnet-sme`` (SME / DLF's small ConvNet, PyTorch
initialisation), ``vgg11`` and ``mlp-mixer``. Any victim takes
``precode=K_b``, the PRECODE defense: a variational bottleneck before ``head``
whose sample makes the loss stochastic (``Victim.stochastic``; ``Victim.loss``
then needs a PRNG key).

>>> import jax
>>> from jaxleak.models import get_victim
>>> victim = get_victim("convnet", image_shape=(32, 32, 3), num_classes=10, width=8)
>>> victim.layers["head"].feature_shape
(3, 3, 32)
>>> variables = victim.init(jax.random.key(0))
>>> victim.apply(variables, jax.numpy.zeros((2, 32, 32, 3))).shape
(2, 10)
"""

from jaxleak.models._victim import VICTIMS, DenseLayer, Victim, get_victim
from jaxleak.models.train import (
    evaluate_victim,
    load_variables,
    read_metadata,
    save_variables,
    train_victim,
)

__all__ = [
    "VICTIMS",
    "DenseLayer",
    "Victim",
    "evaluate_victim",
    "get_victim",
    "load_variables",
    "read_metadata",
    "save_variables",
    "train_victim",
]
