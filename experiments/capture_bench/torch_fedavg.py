"""PyTorch twin of ``convnet-sme`` and a per-client FedAvg loop (the baseline of ``fedavg.py``).

Each client does what :func:`jaxleak.protocols.local_update` does under
``Protocol(kind="fedavg", ...)``: start from the server weights ``w0``, run
``E`` epochs of ``S = ceil(M / B)`` optimizer steps (``torch.optim.SGD`` or
``torch.optim.Adam``, default hyperparameters as optax's) on the mean
cross-entropy of the batch the schedule names, and release ``w0 - w1``. The
batch order comes from jaxleak's ``schedule`` ``[E, S, B]`` (``-1`` pads a short
last batch), so both frameworks train on the same batches in the same order.

This module imports only torch and NumPy; ``fedavg.py`` writes the weights,
images and schedules to an ``.npz`` and runs this file as a separate process to
time it (no thread pool shared with JAX):

``python experiments/capture_bench/torch_fedavg.py --data d.npz --threads 1 --optimizer sgd``

prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FC_WIDTH = 200
OPTIMIZERS = ("sgd", "adam")


class ConvNetSME(nn.Module):
    """SME / DLF ConvNet: conv3x3 w, avgpool, conv3x3 2w, avgpool, fc 200, head (ReLUs between)."""

    def __init__(
        self, *, channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 64
    ):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, 2 * width, 3, padding=1)
        side = image_size // 4
        self.feature_shape = (2 * width, side, side)  # C, H, W of the map fc sees
        self.fc = nn.Linear(2 * width * side * side, FC_WIDTH)
        self.head = nn.Linear(FC_WIDTH, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(F.relu(self.conv0(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.fc(x.flatten(1)))  # NCHW flatten; load_flax_params permutes fc's columns
        return self.head(x)


def state_from_flax(
    params: Mapping[str, np.ndarray], feature_shape: tuple[int, int, int]
) -> dict[str, torch.Tensor]:
    """jaxleak's flat ``convnet-sme`` params (``"conv0/kernel"``, ...) as a torch ``state_dict``.

    Conv kernels HWIO -> OIHW; Dense ``[d_in, d_out]`` -> ``[d_out, d_in]``. jaxleak
    flattens the ``H' x W' x C'`` map before ``fc`` in NHWC order, torch in NCHW, so
    ``fc``'s input rows are reordered from ``(h, w, c)`` to ``(c, h, w)``.
    """
    c, h, w = feature_shape
    state = {}
    for name in ("conv0", "conv1"):
        state[f"{name}.weight"] = np.transpose(params[f"{name}/kernel"], (3, 2, 0, 1))
        state[f"{name}.bias"] = params[f"{name}/bias"]
    fc = np.asarray(params["fc/kernel"])  # [h*w*c, 200]
    state["fc.weight"] = (
        fc.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(fc.shape[1], c * h * w)
    )
    state["fc.bias"] = params["fc/bias"]
    state["head.weight"] = np.asarray(params["head/kernel"]).T
    state["head.bias"] = params["head/bias"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def state_to_flax(
    state: Mapping[str, torch.Tensor], feature_shape: tuple[int, int, int]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_from_flax` (to compare torch updates with jaxleak's)."""
    c, h, w = feature_shape
    out = {}
    for name in ("conv0", "conv1"):
        out[f"{name}/kernel"] = state[f"{name}.weight"].numpy().transpose(2, 3, 1, 0)
        out[f"{name}/bias"] = state[f"{name}.bias"].numpy()
    fc = state["fc.weight"].numpy()  # [200, c*h*w]
    out["fc/kernel"] = fc.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
    out["fc/bias"] = state["fc.bias"].numpy()
    out["head/kernel"] = state["head.weight"].numpy().T
    out["head/bias"] = state["head.bias"].numpy()
    return out


def make_optimizer(params, *, optimizer: str, lr: float) -> torch.optim.Optimizer:
    """SGD, or Adam with optax's defaults (betas 0.9 / 0.999, eps 1e-8 outside the sqrt)."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def client_update(
    model: nn.Module,
    w0: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: np.ndarray,
    *,
    optimizer: str,
    lr: float,
) -> dict[str, torch.Tensor]:
    """ONE client's FedAvg update ``w0 - w1`` (a ``state_dict``-shaped dict).

    Args:
      model: the twin; its parameters are overwritten with ``w0`` first.
      w0: server weights (``state_dict`` names).
      images: the client's ``[M, C, H, W]`` images.
      labels: ``[M]`` int64 labels.
      schedule: ``[E, S, B]`` indices into the client's images, ``-1`` = padding.
      optimizer: ``"sgd"`` or ``"adam"``.
      lr: learning rate.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(w0[name])
    opt = make_optimizer(model.parameters(), optimizer=optimizer, lr=lr)
    for idx in schedule.reshape(-1, schedule.shape[-1]):
        idx = torch.from_numpy(idx[idx >= 0].astype(np.int64))
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {name: w0[name] - p for name, p in model.named_parameters()}


def run_clients(
    model: nn.Module,
    w0: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    schedules: np.ndarray,
    *,
    optimizer: str,
    lr: float,
) -> list[dict[str, torch.Tensor]]:
    """The per-client loop over ``images [N, M, C, H, W]`` and ``schedules [N, E, S, B]``."""
    return [
        client_update(model, w0, images[i], labels[i], schedules[i], optimizer=optimizer, lr=lr)
        for i in range(images.shape[0])
    ]


def load_data(path: str) -> dict[str, np.ndarray]:
    """``fedavg.py``'s ``.npz``: ``param:<name>`` (flat Flax params), images, labels, schedules."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def setup(data: Mapping[str, np.ndarray]) -> tuple[ConvNetSME, dict, torch.Tensor, torch.Tensor]:
    """Model, ``w0`` (state_dict), images ``[N, M, C, H, W]`` and labels ``[N, M]`` of the data."""
    images = data["images"]  # [N, M, H, W, C]
    size, channels = images.shape[2], images.shape[4]
    params = {k.removeprefix("param:"): v for k, v in data.items() if k.startswith("param:")}
    num_classes = params["head/bias"].shape[0]
    width = params["conv0/bias"].shape[0]
    model = ConvNetSME(channels=channels, image_size=size, num_classes=num_classes, width=width)
    w0 = state_from_flax(params, model.feature_shape)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 1, 4, 2, 3)))
    y = torch.from_numpy(data["labels"].astype(np.int64))
    return model, w0, x, y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="time the torch per-client FedAvg loop (one JSON line)")
    p.add_argument("--data", required=True, help=".npz written by fedavg.py")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--lr", type=float, default=0.004)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed passes over all clients first")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_data(args.data)
    model, w0, x, y = setup(data)
    schedules = data["schedules"]

    def once() -> None:
        run_clients(model, w0, x, y, schedules, optimizer=args.optimizer, lr=args.lr)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        once()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    n, m = x.shape[:2]
    epochs = schedules.shape[1]
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "framework": "torch",
                "clients": int(n),
                "samples": int(m),
                "local_epochs": int(epochs),
                "optimizer": args.optimizer,
                "lr": args.lr,
                "median_seconds": med,
                "times": times,
                "warmup_seconds": warmup_s,
                "clients_per_second": n / med,
                "examples_per_second": n * m * epochs / med,
                "threads": torch.get_num_threads(),
                "torch_version": torch.__version__,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
