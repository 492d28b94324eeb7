"""Inverting Gradients side by side: PyTorch (one target at a time) vs jaxleak, seconds per iteration.

The PyTorch side is a plain re-implementation of the reference ("breaching"-style)
IG loop for the CIFAR-10 ConvNet: the same ConvNet (width 64, 32x32x3, 10 classes,
BatchNorm in inference mode, as jaxleak's ``dummy_gradient`` uses it), loaded
with the *same* weights as the jaxleak victim (converted from the Flax
variables); loss ``1 - cos`` between the dummy and the observed gradient over
all parameters together, plus TV 1e-6, differentiated twice
(``create_graph=True``); Adam 0.1 on the sign of the image gradient, x0.1 at
3/8, 5/8, 7/8 of the 24,000-iteration budget (``MultiStepLR``), images clamped
to [0, 1] after every step, best iterate kept. As in the reference, ``T``
targets are ``T`` sequential runs. The jaxleak side is ``bench_ig.measure``
(one compiled block of ``T`` targets).

Both sides time ``--iterations`` steps (PyTorch: after ``--warmup`` untimed steps
per target; jaxleak: compilation excluded) and extrapolate linearly to 24,000
iterations: seconds per iteration is the cost of one step of all ``T`` targets,
seconds per image = that x 24,000 / T. Prints one JSON line per (framework, T),
then a markdown table with the ratio PyTorch / jaxleak.

    pip install -e '.[compare]'
    python experiments/baselines/compare_torch.py --check
    python experiments/baselines/compare_torch.py --targets 1 16 --iterations 20 --torch-sample 1 \
        --jax-iterations 20 2 --chunk 10 2 --unroll 10 1 --batching vmap map

(the per-T jax options pick bench_ig.py's fastest CPU settings; with the defaults, T = 16 on a
2-core CPU takes an hour: see BENCHMARKS.md, "Optimisation baselines").

``--check`` compares the first-iteration IG loss (and the observed gradient,
the image gradient and the first step) of the two implementations on the same
weights, dummy image and target, instead of timing.
"""

from __future__ import annotations

import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("compare_torch.py needs PyTorch, which is not installed: pip install -e '.[compare]'")

import argparse
import importlib.util
import json
import math
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak.attacks import optimization as O


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_ig", Path(__file__).with_name("bench_ig.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_ig = _load_bench()

IMAGE_HW = (32, 32)
CHANNELS = 3
NUM_CLASSES = 10
# The ConvNet of IG: channel multiplier per 3x3 conv (+BN+ReLU); "pool" = 3x3 max-pool, stride 3.
PLAN = (1, 2, 2, 4, 4, 4, "pool", 4, 4, "pool")
MILESTONE_FRACTIONS = (3 / 8, 5 / 8, 7 / 8)


# --------------------------------------------------------------------------- the PyTorch model


class TorchConvNet(torch.nn.Module):
    """The IG ConvNet in PyTorch, NCHW; the head takes the map flattened in NCHW order."""

    def __init__(self, width: int, num_classes: int = NUM_CLASSES, channels: int = CHANNELS,
                 image_hw: tuple[int, int] = IMAGE_HW):
        super().__init__()
        self.convs = torch.nn.ModuleList()
        self.bns = torch.nn.ModuleList()
        self.plan = PLAN
        c_in, (h, w) = channels, image_hw
        for step in PLAN:
            if step == "pool":
                h, w = h // 3, w // 3
                continue
            c_out = step * width
            self.convs.append(torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=True))
            self.bns.append(torch.nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.1))
            c_in = c_out
        self.map_shape = (c_in, h, w)
        self.head = torch.nn.Linear(c_in * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = 0
        for step in self.plan:
            if step == "pool":
                x = F.max_pool2d(x, 3, 3)
                continue
            x = F.relu(self.bns[i](self.convs[i](x)))
            i += 1
        return self.head(x.flatten(1))


def load_flax_variables(model: TorchConvNet, variables) -> None:
    """Copies the Flax ConvNet's variables into ``model`` (in place).

    Conv kernels HWIO -> OIHW; BN scale/bias -> weight/bias and mean/var -> running
    stats; the head's ``(H*W*C, K)`` kernel, whose rows follow the NHWC flattening,
    -> ``(K, C*H*W)`` with columns in NCHW flattening order.
    """
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    c, h, w = model.map_shape
    with torch.no_grad():
        for i, (conv, bn) in enumerate(zip(model.convs, model.bns)):
            kernel = np.asarray(params[f"conv{i}"]["kernel"])
            _copy(conv.weight, kernel.transpose(3, 2, 0, 1))
            _copy(conv.bias, np.asarray(params[f"conv{i}"]["bias"]))
            _copy(bn.weight, np.asarray(params[f"bn{i}"]["scale"]))
            _copy(bn.bias, np.asarray(params[f"bn{i}"]["bias"]))
            _copy(bn.running_mean, np.asarray(stats[f"bn{i}"]["mean"]))
            _copy(bn.running_var, np.asarray(stats[f"bn{i}"]["var"]))
        kernel = np.asarray(params["head"]["kernel"])  # (H*W*C, K)
        k = kernel.shape[1]
        _copy(model.head.weight, kernel.reshape(h, w, c, k).transpose(3, 2, 0, 1).reshape(k, c * h * w))
        _copy(model.head.bias, np.asarray(params["head"]["bias"]))


def _copy(dst: torch.Tensor, src: np.ndarray) -> None:
    if tuple(dst.shape) != src.shape:
        raise ValueError(f"shape mismatch: torch {tuple(dst.shape)} vs converted flax {src.shape}")
    dst.copy_(torch.from_numpy(np.array(src, dtype=np.float32, order="C")))


def torch_grads_to_flax(model: TorchConvNet, grads) -> dict:
    """Inverse layout conversion of parameter gradients (ordered as ``model.parameters()``)."""
    named = dict(zip([n for n, _ in model.named_parameters()], [g.detach().cpu().numpy() for g in grads]))
    c, h, w = model.map_shape
    out: dict = {}
    for i in range(len(model.convs)):
        out[f"conv{i}"] = {"kernel": named[f"convs.{i}.weight"].transpose(2, 3, 1, 0),
                           "bias": named[f"convs.{i}.bias"]}
        out[f"bn{i}"] = {"scale": named[f"bns.{i}.weight"], "bias": named[f"bns.{i}.bias"]}
    weight = named["head.weight"]  # (K, C*H*W)
    k = weight.shape[0]
    out["head"] = {"kernel": weight.reshape(k, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, k),
                   "bias": named["head.bias"]}
    return out


def build_torch_model(width: int, device: str) -> tuple[TorchConvNet, list[torch.Tensor]]:
    """The PyTorch ConvNet with the jaxleak victim's weights (init seed 0), eval mode."""
    _, variables = bench_ig.victim_and_variables("convnet", width)
    model = TorchConvNet(width)
    n_flax = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(variables["params"]))
    n_torch = sum(p.numel() for p in model.parameters())
    assert n_flax == n_torch, f"parameter count differs: flax {n_flax}, torch {n_torch}"
    load_flax_variables(model, variables)
    model.eval()  # BN on running statistics, as jaxleak's dummy_gradient (train=False)
    model.to(device)
    return model, list(model.parameters())


# --------------------------------------------------------------------------- the PyTorch IG step


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of an NCHW batch: mean |dx| + mean |dy|."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def parameter_gradient(model, params, x, labels, create_graph: bool):
    loss = F.cross_entropy(model(x), labels)
    return torch.autograd.grad(loss, params, create_graph=create_graph)


def ig_objective(model, params, x, labels, target, target_norm, tv: float):
    """(matching + tv * TV, matching) with matching = 1 - global cosine over all parameter grads."""
    grads = parameter_gradient(model, params, x, labels, create_graph=True)
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    norm = sum(g.pow(2).sum() for g in grads)
    match = 1.0 - dot / (norm.sqrt() * target_norm + 1e-20)
    return match + tv * total_variation(x), match


class TorchIG:
    """One IG run on one target (the reference's per-target loop)."""

    def __init__(self, model, params, target, labels, x0: torch.Tensor, budget: int,
                 config: O.IGConfig):
        self.model, self.params, self.labels, self.tv = model, params, labels, config.tv
        self.target = [t.detach() for t in target]
        self.target_norm = torch.sqrt(sum(t.pow(2).sum() for t in self.target))
        self.x = x0.detach().clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=config.learning_rate)
        milestones = [int(budget * f) for f in MILESTONE_FRACTIONS]
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones, gamma=0.1)
        self.best_loss = torch.full((), math.inf, device=x0.device)
        self.best = self.x.detach().clone()

    def step(self) -> torch.Tensor:
        """One step; returns the matching loss of the image *before* the step (as the jax driver)."""
        loss, match = ig_objective(self.model, self.params, self.x, self.labels, self.target,
                                   self.target_norm, self.tv)
        (grad,) = torch.autograd.grad(loss, [self.x])
        with torch.no_grad():
            better = match < self.best_loss  # tensors only: no host sync per step
            self.best_loss = torch.where(better, match.detach(), self.best_loss)
            self.best = torch.where(better, self.x.detach(), self.best)
            self.x.grad = grad.sign()
            self.opt.step()
            self.sched.step()
            self.x.clamp_(0.0, 1.0)
        return match.detach()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def target_problems(t: int, device: str):
    """Target images and labels as bench_ig.py draws them, NCHW on ``device``."""
    images = np.asarray(jax.random.uniform(jax.random.key(1), (t, 1, 32, 32, 3)))
    labels = np.arange(t) % NUM_CLASSES
    return ([torch.from_numpy(images[i].transpose(0, 3, 1, 2).copy()).to(device) for i in range(t)],
            [torch.tensor([int(y)], device=device) for y in labels])


def measure_torch(t: int, iterations: int, warmup: int, budget: int, width: int, device: str,
                  sample: int | None = None) -> dict:
    """Times the ``t`` sequential runs (or the first ``sample`` of them, scaled by ``t / sample``)."""
    model, params = build_torch_model(width, device)
    timed_targets = t if sample is None else min(sample, t)
    config = O.IGConfig(iterations=budget)
    images, labels = target_problems(t, device)
    gen = torch.Generator().manual_seed(0)
    timed = 0.0
    t_wall = time.perf_counter()
    for image, label in list(zip(images, labels))[:timed_targets]:  # one target at a time
        target = parameter_gradient(model, params, image, label, create_graph=False)
        x0 = torch.randn(image.shape, generator=gen).to(device)
        run = TorchIG(model, params, target, label, x0, budget, config)
        for _ in range(warmup):
            run.step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iterations):
            run.step()
        _sync(device)
        timed += time.perf_counter() - t0
    # The runs are independent and identically shaped: T runs cost T times one run.
    per_iter = timed / iterations * t / timed_targets
    return {
        "framework": "torch", "attack": "ig", "model": "convnet", "width": width, "image": "32x32x3",
        "targets": t, "mode": "sequential (one target at a time)", "timed_targets": timed_targets,
        "measured_iterations": iterations, "warmup_iterations": warmup,
        "seconds_per_iteration": per_iter, "wall_seconds": time.perf_counter() - t_wall,
        "extrapolated_budget": budget, "extrapolated_seconds_per_image": per_iter * budget / t,
        "device": device, "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- --check


def check(width: int, device: str, rtol: float, conv_impl: str = "auto") -> bool:
    """First-iteration IG loss (and more) of both implementations on identical inputs."""
    victim, variables = bench_ig.victim_and_variables("convnet", width)
    victim = victim.with_conv_impl(O.attack_conv_impl(victim, conv_impl))
    print(f"jax convolutions: {victim.conv_impl}")
    shared = dict(variables)
    model, params = build_torch_model(width, device)
    config = O.IGConfig()
    label = 3
    target_image = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
    probs = jax.nn.one_hot(jnp.array([label]), NUM_CLASSES)
    update = O.dummy_gradient(victim, variables, target_image, probs)
    target = {"update": update, "label_probs": probs}
    problem = O.make_ig(victim, config, 1)
    state = problem.init(jax.random.key(2), target, shared)
    x0 = state["images"]  # N(0, 1), the first iterate (not yet boxed)
    weights = O.layer_weights(variables["params"])

    def objective(x):
        match = O.cosine_distance(O.dummy_gradient(victim, variables, x, probs), update, weights)
        return match + config.tv * O.total_variation(x), match

    (j_loss, j_match), j_grad = jax.value_and_grad(objective, has_aux=True)(x0)
    state1, j_step_match = problem.step(state, target, shared, jnp.int32(0))

    to_t = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.tensor([label], device=device)
    t_target = parameter_gradient(model, params, to_t(target_image), y, create_graph=False)
    run = TorchIG(model, params, t_target, y, to_t(x0), config.iterations, config)
    x = run.x
    t_loss, t_match = ig_objective(model, params, x, y, run.target, run.target_norm, config.tv)
    (t_grad,) = torch.autograd.grad(t_loss, [x])
    run.step()

    # observed gradient, back in flax layout: relative L2 difference, whole and worst leaf
    j_flat, t_flat = _flat(update), _flat(torch_grads_to_flax(model, t_target))
    leaf_rel = {k: float(np.linalg.norm(a - t_flat[k]) / np.linalg.norm(a)) for k, a in j_flat.items()}
    diff2 = sum(float(np.sum((a - t_flat[k]) ** 2)) for k, a in j_flat.items())
    update_rel = math.sqrt(diff2 / sum(float(np.sum(a**2)) for a in j_flat.values()))
    worst = max(leaf_rel, key=leaf_rel.get)
    t_grad_nhwc = t_grad.detach().cpu().numpy().transpose(0, 2, 3, 1)
    j_grad = np.asarray(j_grad)
    grad_rel = float(np.linalg.norm(j_grad - t_grad_nhwc) / np.linalg.norm(j_grad))
    sign_agree = float(np.mean(np.sign(j_grad) == np.sign(t_grad_nhwc)))
    x1_diff = np.abs(np.asarray(state1["images"]) - run.x.detach().cpu().numpy().transpose(0, 2, 3, 1))
    t_loss, t_match = float(t_loss.detach()), float(t_match.detach())
    rel = abs(float(j_loss) - t_loss) / abs(float(j_loss))
    print(f"jax   IG loss at iteration 0: {float(j_loss):.9g} (matching {float(j_match):.9g}, "
          f"driver step reports {float(j_step_match):.9g})")
    print(f"torch IG loss at iteration 0: {t_loss:.9g} (matching {t_match:.9g})")
    print(f"relative difference of the loss: {rel:.3g} (tolerance {rtol:g})")
    print(f"observed gradient: relative L2 difference {update_rel:.3g} "
          f"(worst leaf {worst}: {leaf_rel[worst]:.3g})")
    print(f"image gradient: relative L2 difference {grad_rel:.3g}, sign agreement {sign_agree:.6f}")
    print(f"after one step: max |x1_jax - x1_torch| = {x1_diff.max():.3g}, "
          f"{int((x1_diff > 1e-5).sum())} of {x1_diff.size} pixels differ by > 1e-5")
    ok = rel <= rtol and abs(float(j_match) - float(j_step_match)) <= 1e-5 * abs(float(j_match))
    print("check: OK" if ok else "check: FAILED")
    return ok


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


# --------------------------------------------------------------------------- main


def _table(rows: list[dict], targets: list[int]) -> str:
    by = {(r["framework"], r["targets"]): r for r in rows}
    header = ("| T | torch s / iteration (T sequential runs) | jax s / iteration (one block) "
              "| torch s / image at 24k (extrapolated) | jax s / image at 24k (extrapolated) "
              "| torch / jax |")
    lines = [header, "|---|---|---|---|---|---|"]
    for t in targets:
        tr, jr = by.get(("torch", t)), by.get(("jax", t))
        fmt = lambda r, k: f"{r[k]:.4g}" if r else "-"
        ratio = (f"{tr['seconds_per_iteration'] / jr['seconds_per_iteration']:.3g}"
                 if tr and jr else "-")
        lines.append(f"| {t} | {fmt(tr, 'seconds_per_iteration')} | {fmt(jr, 'seconds_per_iteration')} "
                     f"| {fmt(tr, 'extrapolated_seconds_per_image')} "
                     f"| {fmt(jr, 'extrapolated_seconds_per_image')} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--iterations", type=int, default=20, help="measured iterations (torch)")
    parser.add_argument("--jax-iterations", type=int, nargs="+", default=None,
                        help="measured jax iterations: one value, or one per --targets entry "
                             "(default: --iterations)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed torch steps per target")
    parser.add_argument("--torch-sample", type=int, default=None,
                        help="time only the first K of the T sequential torch runs and scale by T / K "
                             "(default: all T; the runs are independent and identical in cost)")
    parser.add_argument("--budget", type=int, default=24_000, help="iterations extrapolated to")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: the cores available to this process)")
    parser.add_argument("--frameworks", nargs="+", choices=("torch", "jax"), default=["torch", "jax"])
    per_t = "one value, or one per --targets entry"
    parser.add_argument("--chunk", type=int, nargs="+", default=[50], help=f"jax, as bench_ig.py: {per_t}")
    parser.add_argument("--batching", choices=("vmap", "map"), nargs="+", default=["vmap"],
                        help=f"jax, as bench_ig.py: {per_t}")
    parser.add_argument("--unroll", type=int, nargs="+", default=[1], help=f"jax, as bench_ig.py: {per_t}")
    parser.add_argument("--conv-impl", choices=("auto", "xla", "patches"), nargs="+", default=["auto"],
                        help=f"jax, as bench_ig.py: {per_t}")
    parser.add_argument("--check", action="store_true",
                        help="compare the first-iteration loss of both implementations, no timing")
    parser.add_argument("--check-rtol", type=float, default=1e-4)
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"torch {torch.__version__} on {args.device} ({torch.get_num_threads()} threads); "
          f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})",
          file=sys.stderr, flush=True)
    if args.check:
        sys.exit(0 if check(args.width, args.device, args.check_rtol, args.conv_impl[0]) else 1)

    n = len(args.targets)
    jax_opts = {}
    for name in ("jax_iterations", "chunk", "batching", "unroll", "conv_impl"):
        values = getattr(args, name) or [args.iterations]
        if len(values) not in (1, n):
            parser.error(f"--{name.replace('_', '-')} takes one value or one per --targets entry")
        jax_opts[name] = values * n if len(values) == 1 else values
    common = {"torch": torch.__version__, "jax": jax.__version__, "jax_backend": jax.default_backend(),
              "python": platform.python_version(), "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "cores_available": cores}
    rows = []
    for i, t in enumerate(args.targets):
        if "torch" in args.frameworks:
            row = {**measure_torch(t, args.iterations, args.warmup, args.budget, args.width, args.device,
                                 args.torch_sample),
                   **common}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if "jax" in args.frameworks:
            row = bench_ig.measure(t, jax_opts["jax_iterations"][i], args.budget, "convnet", args.width,
                                   jax_opts["chunk"][i], jax_opts["batching"][i], jax_opts["unroll"][i],
                                   jax_opts["conv_impl"][i])
            row = {"framework": "jax", **row, "threads": None,
                   "xla_flags": os.environ.get("XLA_FLAGS", ""), **common}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(_table(rows, args.targets))


if __name__ == "__main__":
    main()
