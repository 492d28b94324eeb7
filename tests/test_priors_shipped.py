"""The flow-matching prior shipped inside the package (``jaxleak.priors.load("tinyimagenet32-small")``).

Fast checks that need no data folder: it loads offline by name, has the recorded
architecture, parameter count and weight digest, and its regulariser separates
real photographs (scikit-image's bundled samples, resized to 32x32) from noise.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import artifacts
from jaxleak.priors import (
    DEFAULT_PRIOR,
    SHIPPED_DIR,
    count_params,
    load,
    shipped_priors,
    velocity_norm,
)

NAME = "tinyimagenet32-small"
PARAMS = 1_113_955  # the `small` preset at 32x32x3 (tests/test_priors.py checks the preset itself)
DIGEST = "sha256:b1dcd0216c1334062a248236e98e5acb4b09d319276723caed2d41752b31103f"  # of the stored bf16 arrays, in path order (see weights_digest)


def weights_digest(path) -> str:
    """sha256 over the stored arrays' bytes, leaves in sorted path order."""
    loaded = artifacts.load_artifact(path, kind="prior/flow")
    flat = jax.tree_util.tree_flatten_with_path(loaded.tree)[0]
    h = hashlib.sha256()
    for key, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(key).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return "sha256:" + h.hexdigest()


def _photos(size: int = 32) -> np.ndarray:
    """Four natural RGB photographs bundled with scikit-image, centre-cropped and resized, [0, 1]."""
    skdata = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = getattr(skdata, name)()
        h, w = img.shape[:2]
        s = min(h, w)
        crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out.append(resize(crop, (size, size), anti_aliasing=True))
    return np.stack(out).astype(np.float32)


def test_the_shipped_prior_is_listed_and_is_the_default():
    assert NAME in shipped_priors()
    assert DEFAULT_PRIOR == NAME
    size = sum(f.stat().st_size for f in (SHIPPED_DIR / NAME).rglob("*") if f.is_file())
    assert size <= 10 * 2**20, f"the shipped prior takes {size} bytes (limit 10 MiB)"


def test_loads_by_name_with_the_recorded_architecture_and_weights():
    prior = load(NAME)
    assert prior.config.image_shape == (32, 32, 3)
    assert count_params(prior.config) == PARAMS
    assert sum(np.asarray(a).size for a in jax.tree_util.tree_leaves(prior.params)) == PARAMS
    assert all(np.asarray(a).dtype == np.float32 for a in jax.tree_util.tree_leaves(prior.params))
    assert prior.extra["source"] == f"shipped prior {NAME}"
    assert weights_digest(SHIPPED_DIR / NAME) == DIGEST
    # a folder path names the same prior
    again = load(SHIPPED_DIR / NAME)
    chex_equal = jax.tree_util.tree_map(np.array_equal, prior.params, again.params)
    assert all(jax.tree_util.tree_leaves(chex_equal))


def test_velocity_norm_is_smaller_on_photographs_than_on_noise():
    prior = load(NAME)
    photos = _photos()
    rng = np.random.default_rng(0)
    noisy = np.clip(photos + rng.normal(0.0, 0.2, photos.shape), 0, 1).astype(np.float32)
    uniform = rng.uniform(0, 1, photos.shape).astype(np.float32)
    for t in (0.8, 0.9):
        real = float(jnp.mean(velocity_norm(prior.params, prior.config, photos, t)))
        noise = float(jnp.mean(velocity_norm(prior.params, prior.config, noisy, t)))
        unif = float(jnp.mean(velocity_norm(prior.params, prior.config, uniform, t)))
        assert real < noise < unif, (t, real, noise, unif)
