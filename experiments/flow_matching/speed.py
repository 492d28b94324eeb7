"""Measured speed of the SME / FM iteration: jaxleak (vmapped over targets) vs a PyTorch formulation.

Issue 13, "Measured speed": seconds per iteration of SME's and FM's attack iteration at 1 target and
amortised per target at 16 and 64 targets, on the same machine, jaxleak against PyTorch with the
same weights, the same update and the same prior architecture. Aim: >= 2x PyTorch at 1 target,
>= 10x amortised at 64.

**The iteration** (both sides): the client's ``M`` images ``x`` in SME's normalised space and the
surrogate coefficient ``alpha``; ``w_alpha = w0 - alpha u`` with ``u = w0 - w1``; the loss
``1 - cos(grad_w CE(x, y; w_alpha), u)`` over all parameters at once, ``+ tv * TV(x)`` (SME's
``(mean |dh| + mean |dw|) / 2``), and for FM ``+ lambda_fm * mean v(2 x01 - 1, tau)^2`` of the flow
prior's UNet; its gradient with respect to ``x`` and ``alpha`` (second order: through the parameter
gradient); Adam on ``x`` (lr 1) and on ``alpha`` (lr 1e-3), both with the x0.1 decay at 3/8, 5/8 and
7/8 of the budget; ``x`` boxed to the valid range and ``alpha`` to [0, 1].

* **jaxleak**: :func:`jaxleak.attacks.fedavg.make_sme` / ``make_fm`` run by the optimisation driver
  (``run_problem``), ``T`` targets vmapped in one compiled block (``RunOptions(target_batch=T)``),
  im2col convolutions for the victim (the attacks' default on CPU), compilation excluded; the
  driver's own work (keeping the best iterate) is included.
* **PyTorch**: written here: the ``convnet-sme`` twin (functional: conv 3x3 - ReLU - avgpool, twice,
  Linear-ReLU-Linear; the Flax weights copied across: HWIO -> OIHW kernels, Dense kernels
  transposed, ``fc``'s rows permuted from NHWC to NCHW flattening), the loss above with
  ``torch.autograd.grad(create_graph=True)``, ``torch.optim.Adam`` + ``MultiStepLR``, and the prior
  UNet of ``experiments/flow_prior/compare_torch.py`` (``TorchUNet`` + ``copy_params_to_torch``).
  ``T`` targets are ``T`` independent runs, one after another, as the reference code attacks one
  client at a time: the per-target time is measured on ``--torch-sample`` targets and scaled by ``T``.

Before timing, the two sides are checked on the same target and start: the loss at iteration 0
(matching term and total) must agree to ``--check-rtol`` (relative); the gradients with respect to
the images and ``alpha`` and the state after one step are printed. The images' gradient differs
where two neighbouring pixels are equal (both clipped at the box at the start): the subgradient of
``|.|`` at 0 in SME's TV is 1 in JAX and 0 in PyTorch. After one step a few pixels with a gradient
near 0 move differently (Adam's first step is about ``lr * sign(g)``).

    pip install -e '.[compare]'
    python experiments/flow_matching/speed.py --quick --prior random     # smoke: 16x16, width 8, T = 1, 2
    python experiments/flow_matching/speed.py                           # 32x32, width 64, T = 1, 16, 64

``--prior random`` times an untrained prior of the shipped ``small`` architecture (speed does not depend
on the weights; the quick run uses a tiny UNet instead). GPU rows: the same command on a machine with
a GPU (jax picks it; ``--torch-device cuda``).
"""

from __future__ import annotations

import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("speed.py needs PyTorch, which is not installed: pip install -e '.[compare]'")

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import _common as C
import jax
import jax.numpy as jnp
import numpy as np


def _torch_unet_module():
    """``experiments/flow_prior/compare_torch.py`` (the PyTorch twin of the prior's UNet), by path."""
    path = C.HERE.parent / "flow_prior" / "compare_torch.py"
    spec = importlib.util.spec_from_file_location("flow_prior_compare_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the PyTorch side


def convnet_sme_to_torch(params, image_shape, device) -> list[torch.Tensor]:
    """``convnet-sme`` params (Flax layout) as torch tensors in the twin's layout, in a fixed order.

    Order: conv0 weight, bias, conv1 weight, bias, fc weight, bias, head weight, bias. ``fc``'s
    input rows are permuted from Flax's NHWC flattening to torch's NCHW flattening.
    """
    h, w = image_shape[0] // 4, image_shape[1] // 4
    out = []
    for name in ("conv0", "conv1"):
        out += [np.asarray(params[name]["kernel"]).transpose(3, 2, 0, 1), np.asarray(params[name]["bias"])]
    fc = np.asarray(params["fc"]["kernel"])
    c2 = fc.shape[0] // (h * w)
    fc = fc.reshape(h, w, c2, -1).transpose(2, 0, 1, 3).reshape(h * w * c2, -1)
    out += [fc.T, np.asarray(params["fc"]["bias"])]
    out += [np.asarray(params["head"]["kernel"]).T, np.asarray(params["head"]["bias"])]
    return [torch.tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device) for a in out]


def torch_convnet_sme(p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The ``convnet-sme`` twin: ``x [M, C, H, W]`` in [0, 1] -> logits ``[M, K]``."""
    for i in (0, 2):
        x = F.avg_pool2d(F.relu(F.conv2d(x, p[i], p[i + 1], padding=1)), 2)
    x = F.relu(F.linear(x.flatten(1), p[4], p[5]))
    return F.linear(x, p[6], p[7])


class TorchSME:
    """One SME / FM attack run in PyTorch for one target (the reference loop's shape)."""

    def __init__(self, w0, u, probs, x0, *, mean, std, config, unet=None, budget: int, device):
        self.w0, self.u, self.probs = w0, u, probs
        self.mean = torch.tensor(mean, device=device)[None, :, None, None]
        self.std = torch.tensor(std, device=device)[None, :, None, None]
        self.lo, self.hi = -self.mean / self.std, (1.0 - self.mean) / self.std
        self.config, self.unet, self.budget = config, unet, budget
        self.x = x0.clone().requires_grad_(True)
        self.alpha = torch.tensor(config.alpha_init, device=device, requires_grad=True)
        self.opt_x = torch.optim.Adam([self.x], lr=config.learning_rate)
        self.opt_a = torch.optim.Adam([self.alpha], lr=config.alpha_learning_rate)
        milestones = [int(budget * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        self.sched = [torch.optim.lr_scheduler.MultiStepLR(o, milestones, 0.1) for o in (self.opt_x, self.opt_a)]
        self.unu = sum(torch.sum(t * t) for t in u)  # |u|^2, constant
        self.k = 0

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, matching term)`` at the current ``x``, ``alpha`` and iteration."""
        cfg = self.config
        x01 = self.x * self.std + self.mean
        p = [w - self.alpha * d for w, d in zip(self.w0, self.u, strict=True)]
        logits = torch_convnet_sme(p, x01)
        ce = -(self.probs * F.log_softmax(logits, -1)).sum(-1).mean()
        g = torch.autograd.grad(ce, p, create_graph=True)
        dot = sum(torch.sum(a * b) for a, b in zip(g, self.u, strict=True))
        ngg = sum(torch.sum(a * a) for a in g)
        match = 1.0 - dot / (torch.sqrt(ngg) * torch.sqrt(self.unu) + 1e-20)
        dw = torch.mean(torch.abs(self.x[..., :, 1:] - self.x[..., :, :-1]))
        dh = torch.mean(torch.abs(self.x[..., 1:, :] - self.x[..., :-1, :]))
        total = match + cfg.tv * (dh + dw) / 2
        if self.unet is not None:
            frac = min(max(self.k / max(cfg.iterations - 1, 1), 0.0), 1.0)
            tau = cfg.tau_start + (cfg.tau_end - cfg.tau_start) * frac
            t = torch.full((x01.shape[0],), tau, device=x01.device)
            r = torch.mean(torch.square(self.unet(2.0 * x01 - 1.0, t)))
            total = total + cfg.lambda_fm * (r * (1.0 - tau) ** 2 if cfg.fm_scale == "one_minus_tau_sq" else r)
        return total, match

    def step(self) -> float:
        """One iteration; returns the matching term before the step."""
        total, match = self.loss()
        self.opt_x.zero_grad(set_to_none=True)
        self.opt_a.zero_grad(set_to_none=True)
        total.backward()
        self.opt_x.step()
        self.opt_a.step()
        for s in self.sched:
            s.step()
        with torch.no_grad():
            self.x.copy_(torch.maximum(torch.minimum(self.x, self.hi), self.lo))
            self.alpha.clamp_(0.0, 1.0)
        self.k += 1
        return match.detach()


# --------------------------------------------------------------------------- the setup shared by both


def setup(args, attack: str, targets: int):
    """Victim, server weights, ``targets`` FedAvg updates, the attack config and the prior."""
    from jaxleak.attacks import optimization as O
    from jaxleak.attacks.fedavg import FMConfig, SMEConfig
    from jaxleak.models import get_victim
    from jaxleak.protocols import local_update

    shape = (args.image_size, args.image_size, 3)
    victim = get_victim("convnet-sme", image_shape=shape, num_classes=10, width=args.width)
    w0 = victim.init(jax.random.key(0))
    protocol, m = C.fedavg_setting(batch=args.batch, local_batches=5, optimizer="adam", lr=0.1,
                                   reading="distinct")
    key = jax.random.key(1)
    images = jax.random.uniform(key, (targets, m, *shape))
    labels = (jnp.arange(targets * m).reshape(targets, m) * 7) % 10
    client = jax.jit(jax.vmap(lambda x, y, k: local_update(victim, w0, x, y, k, protocol=protocol).update))
    updates = client(images, labels, jax.random.split(jax.random.key(2), targets))
    # The PyTorch side optimises SME's normalised images (SME's code); SME's library default is pixel space.
    common = {"iterations": args.budget, "space": "normalized"}
    config = SMEConfig(**common) if attack == "sme" else FMConfig(
        **common, prior="unused", lambda_fm=args.lambda_fm, tv=args.tv_fm, tau_start=args.tau[0],
        tau_end=args.tau[1], fm_scale=args.fm_scale)
    observed = O.prepare_targets(victim, jax.tree_util.tree_map(np.asarray, updates), labels="known",
                                 batch_size=m, true_labels=np.asarray(labels))
    return victim, w0, observed, config, protocol, m


def load_unet(args):
    """``(UNetConfig, params, info)`` of the prior (shipped / folder, or random of the same architecture)."""
    from jaxleak import priors

    if args.prior == "random":
        shape = (args.image_size, args.image_size, 3)
        cfg = (priors.preset("small") if shape == (32, 32, 3) and not args.quick
               else C.tiny_unet_config(args.image_size, 3))
        params = _torch_unet_module().random_params(cfg)
        return cfg, params, {"source": "random", "architecture": cfg.to_dict(),
                             "note": "untrained weights of that architecture (timing does not depend on them)"}
    try:
        prior = priors.load(args.prior)
    except Exception as error:  # noqa: BLE001 - any load failure ends the run with the same hint
        raise SystemExit(f"flow prior {args.prior!r} could not be loaded ({str(error).splitlines()[0]}); pass "
                         f"--prior DIR or --prior random (same architecture, untrained: fine for timing)") from None
    return prior.config, prior.params, {"source": prior.extra.get("source", args.prior),
                                        "architecture": prior.config.to_dict()}


def jax_problem(victim, config, protocol, m, unet_cfg):
    from jaxleak.attacks import optimization as O
    from jaxleak.attacks.fedavg import make_fm, make_sme

    conv = O.attack_conv_impl(victim, "auto")
    make = make_sme if unet_cfg is None else make_fm
    return make(victim.with_conv_impl(conv), config, batch_size=m, protocol=protocol, prior=unet_cfg), conv


def torch_run(args, victim, w0, observed, config, unet_cfg, unet_params, index: int, x0: np.ndarray,
              torch_mod):
    """A :class:`TorchSME` for target ``index`` starting from ``x0`` (jaxleak's start, NHWC)."""
    from jaxleak.attacks.fedavg.sme import image_stats

    device = torch.device(args.torch_device)
    u = jax.tree_util.tree_map(lambda a: a[index], observed["update"])
    w0_t = convnet_sme_to_torch(w0["params"], victim.image_shape, device)
    u_t = convnet_sme_to_torch(u, victim.image_shape, device)
    probs = torch.tensor(np.asarray(observed["label_probs"][index]), device=device)
    mean, std = (np.asarray(v).tolist() for v in image_stats(config, victim.image_shape[-1]))
    unet = None
    if unet_cfg is not None:
        unet = torch_mod.TorchUNet(unet_cfg).eval().to(device)
        torch_mod.copy_params_to_torch(unet_params, unet)
        for q in unet.parameters():
            q.requires_grad_(False)
    x = torch.tensor(np.ascontiguousarray(np.asarray(x0).transpose(0, 3, 1, 2)), device=device)
    return TorchSME(w0_t, u_t, probs, x, mean=mean, std=std, config=config, unet=unet, budget=args.budget,
                    device=device)


def check(args, attack, unet_cfg, unet_params, torch_mod) -> dict:
    """Loss at iteration 0 and the state after one step, jaxleak vs torch, on target 0."""
    from jaxleak.attacks.fedavg import (
        fm_regularizer,
        fm_tau,
        sme_total_variation,
        surrogate_matching,
    )
    from jaxleak.attacks.fedavg.sme import image_stats
    from jaxleak.attacks.optimization import layer_weights
    from jaxleak.priors.unet import make_unet

    victim, w0, observed, config, protocol, m = setup(args, attack, 1)
    problem, _ = jax_problem(victim, config, protocol, m, unet_cfg)
    target = jax.tree_util.tree_map(lambda a: a[0], observed)
    shared = {"variables": w0, "prior": None if unet_cfg is None else jax.tree_util.tree_map(jnp.asarray, unet_params)}
    state = problem.init(jax.random.key(3), target, shared)
    mean, std = image_stats(config, 3)
    weights = layer_weights(victim.abstract_variables()["params"])
    tau = fm_tau(0, iterations=config.iterations, tau_start=config.tau_start, tau_end=config.tau_end) \
        if unet_cfg is not None else None

    def pieces(x, alpha):  # the loss from the library's public pieces, as the Problem composes them
        x01 = x * std + mean
        match = surrogate_matching(victim, w0, target["update"], alpha, x01, target["label_probs"], weights)
        total = match + config.tv * sme_total_variation(x)
        if unet_cfg is not None:
            model = make_unet(unet_cfg)
            v = lambda z, t: model.apply({"params": shared["prior"]}, z, t)
            total = total + config.lambda_fm * fm_regularizer(v, x01, tau, config.fm_scale)
        return total, match

    (total, match), (gx, ga) = jax.value_and_grad(pieces, argnums=(0, 1), has_aux=True)(state["x"], state["alpha"])
    new_state, step_match = jax.jit(problem.step)(state, target, shared, jnp.int32(0))
    run = torch_run(args, victim, w0, observed, config, unet_cfg, unet_params, 0, np.asarray(state["x"]), torch_mod)
    t_total, t_match = run.loss()
    t_total.backward()
    gx_t = run.x.grad.detach().cpu().numpy().transpose(0, 2, 3, 1)
    ga_t = float(run.alpha.grad)
    run.x.grad, run.alpha.grad = None, None
    run.step()
    rel = lambda a, b: abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)
    x_torch = run.x.detach().cpu().numpy().transpose(0, 2, 3, 1)
    x_jax, gx = np.asarray(new_state["x"]), np.asarray(gx)
    step_diff = np.abs(x_torch - x_jax)
    out = {
        "attack": attack, "jax_total": float(total), "torch_total": t_total.item(),
        "jax_match": float(match), "jax_match_from_problem_step": float(step_match), "torch_match": t_match.item(),
        "rel_total": rel(t_total.item(), total), "rel_match": rel(t_match.item(), match),
        "rel_match_pieces_vs_problem": rel(match, step_match),
        "grad_x_rel_error": float(np.linalg.norm(gx_t - gx) / max(np.linalg.norm(gx), 1e-30)),
        "grad_alpha": {"jax": float(ga), "torch": ga_t},
        "x_after_step_max_abs_diff": float(step_diff.max()),
        "x_after_step_fraction_differing_1e-3": float(np.mean(step_diff > 1e-3)),
        "x_after_step_max_diff_where_grad_above_1e-6": float(np.max(step_diff[np.abs(gx) > 1e-6], initial=0.0)),
        "x_step_size_max": float(np.max(np.abs(x_jax - np.asarray(state["x"])))),
        "alpha_after_step": {"jax": float(new_state["alpha"]), "torch": float(run.alpha.detach())},
    }
    out["ok"] = out["rel_total"] < args.check_rtol and out["rel_match"] < args.check_rtol and \
        out["rel_match_pieces_vs_problem"] < args.check_rtol
    return out


# --------------------------------------------------------------------------- timing


def time_jax(args, attack, targets, unet_cfg, unet_params) -> dict:
    from jaxleak.attacks import optimization as O

    victim, w0, observed, config, protocol, m = setup(args, attack, targets)
    problem, conv = jax_problem(victim, config, protocol, m, unet_cfg)
    shared = {"variables": w0, "prior": None if unet_cfg is None else jax.tree_util.tree_map(jnp.asarray, unet_params)}
    options = O.RunOptions(iterations=args.iterations, chunk=args.iterations, target_batch=targets,
                           batching="vmap", flops=True)
    res = O.run_problem(problem, observed, shared, options)
    per_iter = res.seconds_total / args.iterations
    return {"impl": "jaxleak", "attack": attack, "targets": targets, "images_per_target": m,
            "s_per_iteration": per_iter, "s_per_iteration_per_target": per_iter / targets,
            "compile_s": res.compile_seconds, "flops_per_iteration_one_target": res.flops_per_iteration,
            "conv_impl": conv, "batching": "vmap", "backend": jax.default_backend()}


def time_torch(args, attack, targets, unet_cfg, unet_params, torch_mod) -> dict:
    victim, w0, observed, config, _, m = setup(args, attack, min(targets, args.torch_sample))
    sample = min(targets, args.torch_sample)
    times = []
    for i in range(sample):
        x0 = np.asarray(jax.random.normal(jax.random.key(10 + i), (m, *victim.image_shape)))
        run = torch_run(args, victim, w0, observed, config, unet_cfg, unet_params, i, x0, torch_mod)
        for _ in range(args.warmup):
            run.step()
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            run.step()
            if args.torch_device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    per_target = statistics.median(times)
    return {"impl": "torch", "attack": attack, "targets": targets, "images_per_target": m,
            "s_per_iteration": per_target * targets, "s_per_iteration_per_target": per_target,
            "timed_targets": sample, "threads": torch.get_num_threads(), "device": args.torch_device}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", nargs="+", choices=("sme", "fm"), default=["sme", "fm"])
    p.add_argument("--targets", type=int, nargs="+", default=None, help="default 1 16 64 (--quick: 1 2)")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations (default 20; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed torch iterations (default 2; --quick 1)")
    p.add_argument("--budget", type=int, default=20_000,
                   help="the attack's nominal budget (places the lr decay and the tau ramp; not run)")
    p.add_argument("--image-size", type=int, default=None, help="default 32 (--quick 16)")
    p.add_argument("--width", type=int, default=None, help="convnet-sme width (default 64; --quick 8)")
    p.add_argument("--batch", type=int, default=1, help="client batch B (M = 5B images per target)")
    p.add_argument("--prior", default=C.DEFAULT_PRIOR, help="shipped name, folder, or 'random' (same "
                   "architecture as shipped, untrained; --quick: a tiny UNet)")
    p.add_argument("--lambda-fm", type=float, default=1e-2)
    p.add_argument("--tv-fm", type=float, default=1e-3, help="FM's lambda_tv")
    p.add_argument("--tau", type=float, nargs=2, default=(0.6, 0.95))
    p.add_argument("--fm-scale", choices=("none", "one_minus_tau_sq"), default="none")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--torch-sample", type=int, default=1,
                   help="targets actually run in torch; the time is scaled to T (runs are identical in cost)")
    p.add_argument("--check-rtol", type=float, default=1e-4, help="loss agreement at iteration 0 (relative)")
    p.add_argument("--check-only", action="store_true", help="only the agreement check at iteration 0")
    p.add_argument("--quick", action="store_true", help="smoke: 16x16, width 8, tiny prior, T = 1, 2, 2 iterations")
    p.add_argument("--out", default=None, help="results JSON (default results/speed.json; --quick: /tmp)")
    args = p.parse_args(argv)
    q = args.quick
    args.targets = args.targets or ([1, 2] if q else [1, 16, 64])
    args.iterations = args.iterations or (2 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.image_size = args.image_size or (16 if q else 32)
    args.width = args.width or (8 if q else 64)
    args.out = Path(args.out or (C.QUICK_ROOT / "speed.json" if q else C.HERE / "results" / "speed.json"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch_mod = _torch_unet_module()
    unet_cfg, unet_params, prior_info = (None, None, None)
    if "fm" in args.attacks:
        unet_cfg, unet_params, prior_info = load_unet(args)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({args.torch_device}, {torch.get_num_threads()} threads), {C.cpu_model()}", flush=True)
    result = {"what": "seconds per SME / FM iteration, jaxleak (vmapped targets) vs PyTorch (targets one by one)",
              **C.provenance("speed.py", argv), "settings": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()},
              "prior": prior_info, "checks": [], "rows": []}
    for attack in args.attacks:
        cfg = unet_cfg if attack == "fm" else None
        c = check(args, attack, cfg, unet_params, torch_mod)
        result["checks"].append(c)
        print(f"[{attack}] loss at iteration 0: jaxleak {c['jax_total']:.7f} torch {c['torch_total']:.7f} "
              f"(rel {c['rel_total']:.1e}); matching term {c['jax_match']:.7f} vs {c['torch_match']:.7f} "
              f"(rel {c['rel_match']:.1e}; Problem.step's {c['jax_match_from_problem_step']:.7f}); gradient wrt "
              f"the images: rel error {c['grad_x_rel_error']:.1e}, wrt alpha {c['grad_alpha']['jax']:.6g} vs "
              f"{c['grad_alpha']['torch']:.6g}; after one step max |x_torch - x_jax| = "
              f"{c['x_after_step_max_abs_diff']:.2e} on {100 * c['x_after_step_fraction_differing_1e-3']:.2f}% of "
              f"pixels (Adam's first step is ~lr * sign(g): pixels with |g| near 0 may go either way; where "
              f"|g| > 1e-6: {c['x_after_step_max_diff_where_grad_above_1e-6']:.2e}), alpha "
              f"{c['alpha_after_step']['jax']:.6f} vs {c['alpha_after_step']['torch']:.6f}", flush=True)
        if not c["ok"]:
            C.write_results(args.out, result)
            raise SystemExit(f"[{attack}] LOSS MISMATCH at iteration 0 (rtol {args.check_rtol:g}); not timing")
    if args.check_only:
        C.write_results(args.out, result)
        print(f"wrote {args.out}")
        return 0
    for attack in args.attacks:
        cfg = unet_cfg if attack == "fm" else None
        for t in args.targets:
            for row in (time_jax(args, attack, t, cfg, unet_params),
                        time_torch(args, attack, t, cfg, unet_params, torch_mod)):
                result["rows"].append(row)
                print(f"  [{attack} T={t}] {row['impl']}: {row['s_per_iteration']:.4f} s / iteration, "
                      f"{row['s_per_iteration_per_target']:.4f} s per target", flush=True)
            C.write_results(args.out, result)
    header = ["attack", "T", "jaxleak s / iter", "torch s / iter", "jaxleak s / iter / target",
              "torch s / iter / target", "torch / jaxleak", "aim"]
    table = []
    for attack in args.attacks:
        for t in args.targets:
            j = next(r for r in result["rows"] if r["impl"] == "jaxleak" and r["attack"] == attack and r["targets"] == t)
            p = next(r for r in result["rows"] if r["impl"] == "torch" and r["attack"] == attack and r["targets"] == t)
            aim = ">= 2x" if t == 1 else ">= 10x" if t == 64 else ""
            table.append([attack, t, j["s_per_iteration"], p["s_per_iteration"], j["s_per_iteration_per_target"],
                          p["s_per_iteration_per_target"], p["s_per_iteration"] / j["s_per_iteration"], aim])
    result["table"] = table
    C.write_results(args.out, result)
    print()
    print(C.markdown_table(header, table))
    print(f"\n{args.image_size}x{args.image_size}x3, convnet-sme width {args.width}, M = {5 * args.batch} images per "
          f"target; jaxleak compile excluded, {args.iterations} timed iterations; torch median of "
          f"{args.iterations} after {args.warmup} warm-up, on {args.torch_sample} target(s), scaled to T")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
