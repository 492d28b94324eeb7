"""GradInversion on FedAvg updates: ``w0 - w1`` treated as the gradient, as the FM paper's Table 2 does.

The registered ``gradinversion`` attack (needs: whole_update, weights) reads a FedAvg capture like a
FedSGD one; it runs end to end through the CLI on tiny captures of the embedded digits, and recovers a
toy image from a FedAvg update that is exactly a gradient (one SGD step at lr 1).
"""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak.attacks import optimization as O
from jaxleak.capture import load_capture
from jaxleak.cli import main
from jaxleak.metrics import psnr
from jaxleak.models import get_victim
from jaxleak.protocols import Protocol, local_update


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _capture(root, model):
    """Two clients of 4 digits each, 2 local epochs of 2 SGD steps (batches of 2), whole update and w0 kept."""
    path = root / f"{model}.npz"
    extra = ("--hidden", "8") if model == "mlp" else ("--width", "4")
    assert main(["capture", "--model", model, *extra, "--image-size", "12", "--n", "2", "--protocol", "fedavg",
                 "--samples", "4", "--local-batch", "2", "--local-epochs", "2", "--local-optimizer", "sgd",
                 "--local-lr", "0.01", "--keep-update", "--keep-params", "--quiet", "--out", str(path)]) == 0
    return path


@pytest.mark.parametrize("model,labels", [
    ("mlp", "infer"),
    pytest.param("convnet-sme", "known", marks=pytest.mark.slow),  # ~1 min of XLA:CPU compilation
])
def test_gradinversion_runs_on_a_fedavg_capture(model, labels, tmp_path, capsys):
    path = _capture(tmp_path, model)
    capsys.readouterr()
    cap = load_capture(path)
    assert cap.protocol["kind"] == "fedavg" and cap.n == 2 and cap.samples == 4
    assert cap.schedule.shape == (2, 2, 2, 2)  # E = 2 epochs of S = 2 steps of B = 2 images
    out = tmp_path / "gi"
    code, _, err = _run(capsys, "attack", "gradinversion", "--captures", path, "--out", out,
                        "--iterations", 5, "--labels", labels, "--quiet", "--lpips-net", "none")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["kind"] == "fedavg"
    # 2 clients x 4 images, each matched to a reconstruction and scored
    psnr = metrics["metrics"]["psnr"]["values"]
    assert len(psnr) == 8 and all(math.isfinite(v) for v in psnr)
    images = np.load(out / "reconstructions.npz")["images"]
    assert images.shape == (2, 4, 12, 12, 1) and np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert metrics["config"]["iterations"] == 5 and metrics["config"]["labels"] == labels
    assert metrics["n"] == 8 and metrics["best_iteration"] != [-1, -1]  # a finite matching loss was reached


def test_gradinversion_recovers_an_image_from_a_fedavg_update_that_is_a_gradient():
    """Noise-free toy case: one full-batch local SGD step at lr 1 makes ``w0 - w1`` the gradient itself
    (checked), so GradInversion's reading of a FedAvg update must recover the image as from FedSGD: DLG's
    sigmoid LeNet on one 8x8 grey image, 300 iterations, PSNR > 35 dB (measured ~47). A sign slip in the
    update (``w1 - w0``) fails this."""
    victim = get_victim("lenet-dlg", image_shape=(8, 8, 1), num_classes=4)
    w0 = victim.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 1))
    y = jnp.array([2])
    one_step = Protocol(kind="fedavg", local_epochs=1, local_batch=None, optimizer="sgd", lr=1.0)
    update = local_update(victim, w0, x, y, jax.random.key(2), protocol=one_step).update
    chex.assert_trees_all_close(update, O.dummy_gradient(victim, w0, x, jax.nn.one_hot(y, 4)), rtol=1e-4,
                                atol=1e-6)
    updates = jax.tree_util.tree_map(lambda a: a[None], update)
    config = O.GradInversionConfig(iterations=300, matching_scale=1.0, group_size=2)
    res = O.reconstruct("gradinversion", victim, w0, updates, config=config, true_labels=np.array([[2]]),
                        chunk=50)
    assert float(psnr(jnp.clip(res.images[0], 0, 1), x)[0]) > 35.0
