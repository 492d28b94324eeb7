"""PyTorch (``torch.func``) twin of ``jaxleak bench capture --model lenet-dlg``.

One step does, for ``batch`` single-example clients (FedSGD ``B = 1``), the
same work as jaxleak's compiled capture step:

* ``dpsgd``: per-example gradients of the cross-entropy w.r.t. ALL parameters
  of DLG's LeNet, per-example clipping of the whole gradient to ``clip``,
  Gaussian noise of std ``noise_std`` (= z C) on the returned head gradient.
* ``paper``: the head's weight and bias gradient clipped jointly to ``clip``,
  noise of std ``noise_std`` on them. jaxleak clips every layer on its own
  under ``paper``; since only the head is returned, XLA drops the other
  layers' gradients, so here only the head's gradient is taken.
* ``none``: the raw head gradient (used for the numerical cross-check).

Noise is only drawn for what is returned (the head), which is what XLA keeps
of jaxleak's step after dead-code elimination. Output: the head's weight
gradient ``[batch, K, d]`` (torch's ``Linear`` weight is already ``[K, d]``,
with ``d`` in NCHW-flatten order) and bias gradient ``[batch, K]``.

Run: ``python experiments/capture_bench/torch_func_capture.py --calibration dpsgd``
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

HEAD = ("fc.weight", "fc.bias")
CALIBRATIONS = ("dpsgd", "paper", "none")

Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def conv_out(size: int, stride: int, kernel: int = 5, pad: int = 2) -> int:
    """Spatial size after a ``kernel`` x ``kernel`` convolution with symmetric padding ``pad``."""
    return (size + 2 * pad - kernel) // stride + 1


class LeNetDLG(nn.Module):
    """DLG's LeNet: three 5x5 convs (12 channels, pad 2, strides 2, 2, 1), sigmoid, Linear head."""

    def __init__(self, *, channels: int = 3, image_size: int = 32, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, 5, stride=2, padding=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, stride=2, padding=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, stride=1, padding=2),
            nn.Sigmoid(),
        )
        side = conv_out(conv_out(conv_out(image_size, 2), 2), 1)
        self.feature_shape = (12, side, side)  # C, H, W
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def build_model(
    *, channels: int = 3, image_size: int = 32, num_classes: int = 10, seed: int = 0
) -> LeNetDLG:
    """LeNetDLG with every weight and bias drawn from ``U(-0.5, 0.5)`` (DLG's ``weights_init``)."""
    model = LeNetDLG(channels=channels, image_size=image_size, num_classes=num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5, generator=gen)
    return model


def load_flax_params(model: LeNetDLG, params: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Copies jaxleak's Flax ``params`` of ``lenet-dlg`` into ``model`` (in place).

    Flax conv kernels are ``[kh, kw, in, out]`` (HWIO), torch's ``[out, in, kh, kw]``
    (OIHW). The Flax head kernel is ``[d, K]`` with ``d`` the NHWC-flattened
    ``(H, W, C)`` map; torch's Linear weight is ``[K, d]`` over the NCHW-flattened
    ``(C, H, W)`` map.
    """
    c, h, w = model.feature_shape
    state = {}
    for i in range(3):
        conv = params[f"conv{i}"]
        state[f"body.{2 * i}.weight"] = np.transpose(np.asarray(conv["kernel"]), (3, 2, 0, 1))
        state[f"body.{2 * i}.bias"] = np.asarray(conv["bias"])
    kernel = np.asarray(params["head"]["kernel"])  # [h*w*c, K]
    k = kernel.shape[1]
    state["fc.weight"] = kernel.reshape(h, w, c, k).transpose(3, 2, 0, 1).reshape(k, c * h * w)
    state["fc.bias"] = np.asarray(params["head"]["bias"])
    model.load_state_dict({name: torch.tensor(np.asarray(v)) for name, v in state.items()})


def head_grad_to_hwc(gw: torch.Tensor, feature_shape: tuple[int, int, int]) -> np.ndarray:
    """``[n, K, C*H*W]`` (torch order) -> ``[n, K, H*W*C]`` (jaxleak's capture order)."""
    c, h, w = feature_shape
    n, k, _ = gw.shape
    return gw.reshape(n, k, c, h, w).permute(0, 1, 3, 4, 2).reshape(n, k, -1).cpu().numpy()


def make_capture_step(
    model: nn.Module, *, calibration: str, clip: float = 1.0, noise_std: float = 0.0
) -> Step:
    """The capture step ``(images [n, C, H, W], labels [n]) -> (head weight grads [n, K, d], bias grads [n, K])``.

    Each example is its own client (``B = 1``); see the module docstring for
    what each calibration does.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    params = {name: p.detach() for name, p in model.named_parameters()}
    if calibration == "dpsgd":
        # The whole gradient's norm is clipped, so every parameter is differentiated.
        trainable, frozen = params, {}
    else:
        trainable = {name: params[name] for name in HEAD}
        frozen = {name: v for name, v in params.items() if name not in HEAD}

    def loss_one(train: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**frozen, **train}, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grads = per_example(trainable, images, labels)
        gw, gb = grads["fc.weight"], grads["fc.bias"]
        if calibration == "none":
            return gw, gb
        # dpsgd: norm over all parameters; paper: over the head's kernel and bias jointly.
        sq = sum(g.flatten(1).square().sum(1) for g in grads.values())
        norm = sq.sqrt()
        factor = torch.where(norm > clip, clip / norm.clamp_min(1e-30), torch.ones_like(norm))
        gw = gw * factor[:, None, None]
        gb = gb * factor[:, None]
        if noise_std > 0:
            gw = gw + noise_std * torch.randn_like(gw)
            gb = gb + noise_std * torch.randn_like(gb)
        return gw, gb

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    step: Step, images: torch.Tensor, labels: torch.Tensor, *, repeats: int, warmup: int
) -> tuple[list[float], float]:
    """Wall times of ``repeats`` steady-state calls, and the total time of the ``warmup`` calls."""
    device = images.device
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(images, labels)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(images, labels)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, warmup_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calibration", choices=CALIBRATIONS, default="dpsgd")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compile, allocator)")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument(
        "--noise-std",
        type=float,
        default=1.0,
        help="per-coordinate noise std (compare.py passes jaxleak's resolved value)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="wrap the step in torch.compile")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 1:
        p.error("--batch, --repeats and --warmup must be >= 1")

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(
        channels=args.channels,
        image_size=args.image_size,
        num_classes=args.num_classes,
        seed=args.seed,
    ).to(device)
    step = make_capture_step(
        model, calibration=args.calibration, clip=args.clip, noise_std=args.noise_std
    )
    if args.compile:
        step = torch.compile(step)
    rng = np.random.default_rng(args.seed)
    images = torch.from_numpy(
        rng.random((args.batch, args.channels, args.image_size, args.image_size), dtype=np.float32)
    ).to(device)
    labels = torch.from_numpy(rng.integers(0, args.num_classes, args.batch)).to(device)

    times, warmup_s = time_step(step, images, labels, repeats=args.repeats, warmup=args.warmup)
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "benchmark": "capture",
                "framework": "torch.func",
                "model": "lenet-dlg",
                "image_size": args.image_size,
                "channels": args.channels,
                "num_classes": args.num_classes,
                "examples_per_second": args.batch / med,
                "median_seconds": med,
                "warmup_seconds": warmup_s,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "batch": args.batch,
                "calibration": args.calibration,
                "clip": args.clip,
                "noise_std": args.noise_std,
                "compile": args.compile,
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else "cpu",
                "torch_version": torch.__version__,
                "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
