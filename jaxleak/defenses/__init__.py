"""Defenses: pure transforms of one client's update, composed with :func:`chain` (optax-style).

Each factory closes over its parameters and returns a :class:`Defense`
``(name, stage, apply, meta)``. Update-stage defenses act on the released update
(``apply(update, key) -> update``); the step-stage DP defenses act inside every local
step on the ``[B, ...]`` per-example gradients (``apply(grads, key) -> mean gradient``).
Everything ``apply`` does is jit/vmap friendly and written for ONE client; callers vmap.

>>> import jax, jax.numpy as jnp
>>> c = parse_chain("clip-value:0.5,quantize:1")
>>> c.update({"w": jnp.array([2.0, -0.25, 0.0])}, jax.random.PRNGKey(0))["w"].tolist()
[0.25, -0.25, 0.0]
>>> format_chain(c)
'clip-value:0.5,quantize:1'
"""

from jaxleak.defenses.base import Defense
from jaxleak.defenses.chain import Chain, chain
from jaxleak.defenses.clip import clip_norm, clip_value
from jaxleak.defenses.dp import dp_from_config, dp_paper, dpsgd, protect_update
from jaxleak.defenses.noise import gaussian, laplace
from jaxleak.defenses.parse import DefenseSpecError, format_chain, parse_chain
from jaxleak.defenses.quantize import quantize
from jaxleak.defenses.sparsify import keep_largest, prune_smallest

__all__ = [
    "Chain",
    "Defense",
    "DefenseSpecError",
    "chain",
    "clip_norm",
    "clip_value",
    "dp_from_config",
    "dp_paper",
    "dpsgd",
    "format_chain",
    "gaussian",
    "keep_largest",
    "laplace",
    "parse_chain",
    "protect_update",
    "prune_smallest",
    "quantize",
]
