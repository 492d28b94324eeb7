"""The PyTorch twin of the flow-prior UNet (experiments/flow_prior/compare_torch.py) is the same network.

Skipped when torch (the ``compare`` extra) is not installed.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxleak.priors import TrainConfig, UNetConfig, count_params

ROOT = Path(__file__).resolve().parents[1]
# two stages (strided down / nearest up), attention at 4x4 with 2 heads, a width change in every up block
TINY = UNetConfig(image_size=8, base_width=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), attention_heads=2, groups=4)


@pytest.fixture(scope="module")
def compare():
    path = ROOT / "experiments/flow_prior/compare_torch.py"
    spec = importlib.util.spec_from_file_location("flow_compare_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # tiny layers: torch's thread pool only costs time here (and much of it on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


def test_parameter_counts_are_equal(compare):
    assert compare.torch_param_count(compare.TorchUNet(TINY)) == count_params(TINY) == 45_259


def test_forward_velocity_agrees_on_shared_weights(compare):
    # float32, ~10 layers deep: the two frameworks differ only in summation order
    assert compare.forward_agreement(TINY, batch=3) < 1e-5


def test_copy_rejects_a_different_network(compare):
    other = UNetConfig(image_size=8, base_width=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), attention_heads=2, groups=4)  # no attention at 4x4
    with pytest.raises(ValueError, match="no jaxleak parameter"):
        compare.copy_params_to_torch(compare.random_params(other), compare.TorchUNet(TINY))
    with pytest.raises(ValueError, match="no torch layer"):
        compare.copy_params_to_torch(compare.random_params(TINY), compare.TorchUNet(other))


def test_torch_step_trains(compare):
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    config = TrainConfig(batch_size=4, learning_rate=1e-2, warmup_steps=0)
    step = compare.torch_stepper(TINY, config, images, compare.random_params(TINY))
    losses = [float(step()) for _ in range(3)]
    assert all(np.isfinite(losses)), losses
