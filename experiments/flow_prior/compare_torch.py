"""Flow-prior training throughput side by side: jaxleak's jitted step vs the same UNet and step in PyTorch.

The PyTorch side is a re-implementation of :class:`jaxleak.priors.UNet` layer for
layer (NCHW): the 3x3 input convolution, residual blocks (GroupNorm(eps 1e-6),
SiLU, 3x3 conv, + Linear(SiLU(time embedding)), GroupNorm, SiLU, 3x3 conv, 1x1
skip conv when the width changes), multi-head self-attention (GroupNorm, one
Linear to q/k/v, ``scaled_dot_product_attention``, output Linear, residual),
strided 3x3 downsampling with XLA's "SAME" padding for stride 2 (0 before, 1
after), nearest 2x upsampling + 3x3 conv, one skip per down-path output, and the
sinusoidal embedding of ``1000 t`` through a two-layer MLP. Every torch layer
carries the Flax path of its parameters, so :func:`copy_params_to_torch` loads
jaxleak's weights and fails loudly on any parameter left unmatched.

One training step on both sides (``TrainConfig`` defaults: the torchcfm recipe):
draw ``B`` images uniformly with replacement from a uint8 set held in memory,
map them to [-1, 1], flip each horizontally with probability 1/2, draw
``x0 ~ N(0, I)`` and ``t ~ U[0, 1]``, the loss ``mean (v(x_t, t) - (x1 - x0))^2``
on ``x_t = (1 - t) x0 + t x1``, its gradient, global-norm clipping to 1, Adam
(lr 2e-4 after a 5k-step linear warm-up, betas (0.9, 0.999), eps 1e-8; torch: the
multi-tensor ``foreach`` implementation) and the
EMA update with decay ``min(0.9999, (1 + s) / (10 + s))``. Both start from the
same (jaxleak-initialised) weights; the random draws differ (threefry vs torch's
generator), which does not change the work.

Before timing, for every preset: the parameter counts of both models are printed
and must be equal (exit status 1 otherwise), and the forward velocity of the two
models on the same random weights (:func:`random_params`: no zero layer, so the
zero-initialised output convolution of a fresh UNet does not make the check
trivial) and a fixed input must agree to a relative error
(``||v_torch - v_jax|| / ||v_jax||``, float32) below ``FORWARD_RTOL``.

Timing: compilation (jax) and the first steps (both) are excluded: ``--warmup``
untimed steps per implementation, then ``--rounds`` rounds of ``--steps`` timed
steps, the implementations alternating within each round (jaxleak, then torch at
each of ``--torch-threads``), each step timed on its own (jax: until its outputs
are ready). Reported: the median seconds per step over all timed steps, steps/s,
images/s, and the speed-up ``jaxleak steps/s / torch steps/s`` (> 1: jaxleak
faster). XLA uses every core (its default); torch uses ``torch.set_num_threads(n)``
for each ``n`` of ``--torch-threads`` (default ``os.cpu_count()``).

    pip install -e '.[compare]'
    python experiments/flow_prior/compare_torch.py --quick      # smoke check: small, batch 8, 2x2 steps
    python experiments/flow_prior/compare_torch.py --presets small paper --batch-sizes 64 128 \\
        --torch-threads $(nproc) 1 --out results.json

``--torch-compile`` adds a ``torch.compile``-d model (inductor, needs a C++ compiler)
as a further torch variant per thread count; its compilation falls in the warm-up
steps and takes minutes (over 8 on the busy 2-core development machine).
``--channels-last`` runs torch in the channels-last memory format.
"""

from __future__ import annotations

import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("compare_torch.py needs PyTorch, which is not installed: pip install -e '.[compare]'")

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax

from jaxleak._provenance import machine
from jaxleak.priors import TrainConfig, UNetConfig, count_params, make_train_step, preset
from jaxleak.priors.flow import init_state
from jaxleak.priors.unet import abstract_params, make_unet

FORWARD_RTOL = 1e-4
"""Largest accepted relative error of the torch forward velocity against jaxleak's (float32).

Observed: ~1e-6 (summation order differs between oneDNN/ATen and XLA kernels, ~40 layers deep)."""

GROUPNORM_EPS = 1e-6  # flax.linen.GroupNorm's default (torch's is 1e-5)


# --------------------------------------------------------------------------- the PyTorch UNet


class _Names:
    """Flax's automatic submodule names: ``Kind_<n>`` counted per kind in creation order."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str) -> str:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        return f"{kind}_{n}"


def _tag(module: torch.nn.Module, path: tuple[str, ...]) -> torch.nn.Module:
    """Records the Flax path of a leaf layer's parameters (read by :func:`copy_params_to_torch`)."""
    module.flax_path = path
    return module


def _group_norm(groups: int, channels: int, path: tuple[str, ...]) -> torch.nn.GroupNorm:
    return _tag(torch.nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS), path)


class TorchResBlock(torch.nn.Module):
    """jaxleak's ``ResBlock`` in NCHW (dropout only when the rate is non-zero, as Flax skips it)."""

    def __init__(self, in_channels: int, width: int, time_dim: int, groups: int, dropout: float,
                 path: tuple[str, ...]):
        super().__init__()
        names = _Names()
        self.norm0 = _group_norm(groups, in_channels, (*path, names("GroupNorm")))
        self.conv0 = _tag(torch.nn.Conv2d(in_channels, width, 3, padding=1), (*path, names("Conv")))
        self.time = _tag(torch.nn.Linear(time_dim, width), (*path, names("Dense")))
        self.norm1 = _group_norm(groups, width, (*path, names("GroupNorm")))
        self.dropout = dropout
        self.conv1 = _tag(torch.nn.Conv2d(width, width, 3, padding=1), (*path, names("Conv")))
        self.skip = None
        if in_channels != width:
            self.skip = _tag(torch.nn.Conv2d(in_channels, width, 1), (*path, names("Conv")))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.time(F.silu(emb))[:, :, None, None]
        h = F.silu(self.norm1(h))
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        h = self.conv1(h)
        return (x if self.skip is None else self.skip(x)) + h


class TorchSelfAttention(torch.nn.Module):
    """jaxleak's ``SelfAttention``: q/k/v laid out as ``(3, heads, head_dim)`` in the Linear's output."""

    def __init__(self, channels: int, heads: int, groups: int, path: tuple[str, ...]):
        super().__init__()
        names = _Names()
        # Flax builds the qkv Dense before the GroupNorm it is applied to: Dense_0, GroupNorm_0, Dense_1
        self.qkv = _tag(torch.nn.Linear(channels, 3 * channels), (*path, names("Dense")))
        self.norm = _group_norm(groups, channels, (*path, names("GroupNorm")))
        self.out = _tag(torch.nn.Linear(channels, channels), (*path, names("Dense")))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [b, hw, c]
        qkv = self.qkv(tokens).reshape(b, hh * ww, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, hw, d]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = self.out(out.transpose(1, 2).reshape(b, hh * ww, c))
        return x + out.transpose(1, 2).reshape(b, c, hh, ww)


def torch_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """jaxleak's ``timestep_embedding``: cosines then sines of ``1000 t`` times DDPM frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TorchUNet(torch.nn.Module):
    """jaxleak's ``UNet`` velocity field in NCHW: ``(x [B, C, H, W] in [-1, 1], t [B]) -> v``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        names = _Names()

        def block(in_channels, width):
            return TorchResBlock(in_channels, width, cfg.time_dim, cfg.groups, cfg.dropout,
                                 (names("ResBlock"),))

        def attention(channels, resolution, always=False):
            if not always and resolution not in cfg.attention_resolutions:
                return torch.nn.Identity()
            return TorchSelfAttention(channels, cfg.attention_heads, cfg.groups, (names("SelfAttention"),))

        def conv(in_channels, out_channels, stride=1):
            return _tag(torch.nn.Conv2d(in_channels, out_channels, 3, stride=stride,
                                        padding=1 if stride == 1 else 0), (names("Conv"),))

        # created in the order Flax creates them, so the automatic names agree
        self.time0 = _tag(torch.nn.Linear(cfg.base_width, cfg.time_dim), (names("Dense"),))
        self.time1 = _tag(torch.nn.Linear(cfg.time_dim, cfg.time_dim), (names("Dense"),))
        self.conv_in = conv(cfg.channels, cfg.base_width)
        channels, skips = cfg.base_width, [cfg.base_width]
        self.down_blocks, self.down_attention = torch.nn.ModuleList(), torch.nn.ModuleList()
        self.downsample = torch.nn.ModuleList()
        last = len(cfg.channel_mult) - 1
        for level, (width, resolution) in enumerate(zip(cfg.widths, cfg.resolutions)):
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(block(channels, width))
                self.down_attention.append(attention(width, resolution))
                channels = width
                skips.append(channels)
            if level != last:
                self.downsample.append(conv(channels, channels, stride=2))
                skips.append(channels)
        self.mid0 = block(channels, cfg.widths[-1])
        self.mid_attention = attention(cfg.widths[-1], cfg.resolutions[-1], always=True)
        self.mid1 = block(cfg.widths[-1], cfg.widths[-1])
        channels = cfg.widths[-1]
        self.up_blocks, self.up_attention = torch.nn.ModuleList(), torch.nn.ModuleList()
        self.upsample = torch.nn.ModuleList()
        for level in reversed(range(len(cfg.widths))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up_blocks.append(block(channels + skips.pop(), cfg.widths[level]))
                self.up_attention.append(attention(cfg.widths[level], cfg.resolutions[level]))
                channels = cfg.widths[level]
            if level != 0:
                self.upsample.append(conv(channels, cfg.widths[level]))
        self.norm_out = _group_norm(cfg.groups, channels, (names("GroupNorm"),))
        self.conv_out = conv(channels, cfg.channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        emb = self.time1(F.silu(self.time0(torch_timestep_embedding(t, cfg.base_width))))
        h = self.conv_in(x)
        skips, i = [h], 0
        for level in range(len(cfg.widths)):
            for _ in range(cfg.num_res_blocks):
                h = self.down_attention[i](self.down_blocks[i](h, emb))
                skips.append(h)
                i += 1
            if level != len(cfg.widths) - 1:
                h = self.downsample[level](F.pad(h, (0, 1, 0, 1)))  # XLA "SAME" at stride 2
                skips.append(h)
        h = self.mid1(self.mid_attention(self.mid0(h, emb)), emb)
        i, u = 0, 0
        for level in reversed(range(len(cfg.widths))):
            for _ in range(cfg.num_res_blocks + 1):
                h = self.up_attention[i](self.up_blocks[i](torch.cat([h, skips.pop()], dim=1), emb))
                i += 1
            if level != 0:
                h = self.upsample[u](F.interpolate(h, scale_factor=2, mode="nearest"))
                u += 1
        return self.conv_out(F.silu(self.norm_out(h)))


def torch_param_count(model: torch.nn.Module) -> int:
    """Number of parameters of a torch model."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- weights: Flax -> torch

# (torch attribute, Flax leaf, Flax array -> torch layout) per layer type
_LEAF_RULES = {
    torch.nn.Conv2d: (("weight", "kernel", lambda a: a.transpose(3, 2, 0, 1)), ("bias", "bias", None)),
    torch.nn.Linear: (("weight", "kernel", lambda a: a.T), ("bias", "bias", None)),
    torch.nn.GroupNorm: (("weight", "scale", None), ("bias", "bias", None)),
}


def copy_params_to_torch(params: Any, model: TorchUNet) -> None:
    """Loads jaxleak UNet ``params`` into ``model``; every leaf and every torch parameter used once.

    Raises:
      ValueError: a shape mismatch, a Flax leaf with no torch parameter, or a torch
        parameter with no Flax leaf (the two networks would differ).
    """
    flat = {k: np.asarray(v, np.float32) for k, v in flax.traverse_util.flatten_dict(params).items()}
    used: set[tuple[str, ...]] = set()
    assigned = 0
    for module in model.modules():
        path = getattr(module, "flax_path", None)
        if path is None:
            continue
        for attribute, leaf, to_torch in _LEAF_RULES[type(module)]:
            key = (*path, leaf)
            if key not in flat:
                raise ValueError(f"torch layer {'/'.join(path)} has no jaxleak parameter {'/'.join(key)}")
            value = flat[key] if to_torch is None else to_torch(flat[key])
            target = getattr(module, attribute)
            if tuple(target.shape) != value.shape:
                raise ValueError(f"{'/'.join(key)}: jaxleak {value.shape} vs torch {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(torch.tensor(value))
            used.add(key)
            assigned += target.numel()
    if set(flat) - used:
        raise ValueError(f"jaxleak parameters with no torch layer: {sorted(set(flat) - used)[:5]}")
    if assigned != torch_param_count(model):
        raise ValueError(f"{torch_param_count(model) - assigned} torch parameters have no jaxleak leaf")


def random_params(config: UNetConfig, seed: int = 0) -> Any:
    """Random UNet ``params`` with no zero layer (unlike the zero-initialised output convolutions).

    Kernels ``N(0, 1/fan_in)``, GroupNorm scales ``1 + N(0, 0.01)``, biases ``N(0, 0.01)``; drawn
    with NumPy from the shapes alone (no compiled initialiser).
    """
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(abstract_params(config))
    out = {}
    for key, leaf in sorted(flat.items()):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if len(leaf.shape) > 1:
            out[key] = noise / np.float32(math.sqrt(math.prod(leaf.shape[:-1])))
        else:
            out[key] = (1.0 if key[-1] == "scale" else 0.0) + np.float32(0.1) * noise
    return flax.traverse_util.unflatten_dict(out)


# --------------------------------------------------------------------------- checks


def check_param_counts(config: UNetConfig, name: str) -> tuple[int, int]:
    """Prints both parameter counts; raises ``SystemExit`` when they differ."""
    jax_count, torch_count = count_params(config), torch_param_count(TorchUNet(config))
    print(f"[{name}] parameters: jaxleak {jax_count:,}  torch {torch_count:,}", flush=True)
    if jax_count != torch_count:
        raise SystemExit(f"[{name}] PARAMETER COUNTS DIFFER: jaxleak {jax_count} vs torch {torch_count}")
    return jax_count, torch_count


def forward_agreement(config: UNetConfig, batch: int = 4, seed: int = 0) -> float:
    """``||v_torch - v_jax|| / ||v_jax||`` on shared random weights and a fixed input (float32)."""
    params = random_params(config, seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.uniform(-1.0, 1.0, (batch, *config.image_shape)).astype(np.float32)
    t = np.linspace(0.05, 0.95, batch, dtype=np.float32)
    v_jax = np.asarray(jax.jit(make_unet(config).apply)({"params": params}, x, t))
    model = TorchUNet(config).eval()
    copy_params_to_torch(params, model)
    with torch.no_grad():
        v_torch = model(torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t)).numpy().transpose(0, 2, 3, 1)
    return float(np.linalg.norm(v_torch - v_jax) / np.linalg.norm(v_jax))


# --------------------------------------------------------------------------- the two training steps


def jax_stepper(config: UNetConfig, train_config: TrainConfig, images: np.ndarray):
    """``(step(), params)``: ``step()`` runs one jitted jaxleak step and waits for its outputs."""
    step_fn = make_train_step(config, train_config)
    state = init_state(config, train_config)
    params = jax.tree_util.tree_map(np.array, state.params)  # a copy: the step donates state
    data = jax.device_put(images)
    box = [state]

    def step():
        state, loss = step_fn(box[0], data)
        jax.block_until_ready((state, loss))
        box[0] = state
        return loss

    return step, params


def torch_stepper(config: UNetConfig, train_config: TrainConfig, images: np.ndarray, params: Any, *,
                  compile_model: bool = False, channels_last: bool = False):
    """``step()`` running one PyTorch training step of the same recipe as jaxleak's."""
    model = TorchUNet(config).train()
    copy_params_to_torch(params, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = list(model.parameters())
    ema = [p.detach().clone() for p in weights]
    # foreach: one multi-tensor update instead of a Python loop over ~300 tensors (torch's CPU default)
    optimizer = torch.optim.Adam(weights, lr=0.0, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    forward = torch.compile(model) if compile_model else model
    data = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # uint8 NCHW, once
    b, n, count = train_config.batch_size, data.shape[0], [0]

    def step():
        s = count[0]
        # optax.linear_schedule from 0 at count s, then the constant rate
        warm = train_config.warmup_steps
        lr = train_config.learning_rate * (min(s, warm) / warm if warm else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x1 = data[torch.randint(n, (b,))].float() / 255.0 * 2.0 - 1.0
        if train_config.flip:
            mirror = torch.rand(b) < 0.5
            x1 = torch.where(mirror[:, None, None, None], x1.flip(3), x1)
        if channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
        x0 = torch.randn_like(x1)
        t = torch.rand(b)
        tb = t[:, None, None, None]
        loss = torch.mean(torch.square(forward((1.0 - tb) * x0 + tb * x1, t) - (x1 - x0)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_config.grad_clip:
            torch.nn.utils.clip_grad_norm_(weights, train_config.grad_clip)
        optimizer.step()
        decay = min(train_config.ema_decay, (1.0 + s) / (10.0 + s))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in weights], 1.0 - decay)
        count[0] = s + 1
        return loss.detach()

    return step


# --------------------------------------------------------------------------- timing


def _timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def benchmark(config: UNetConfig, name: str, batch: int, *, images: np.ndarray, warmup: int, rounds: int,
              steps: int, torch_threads: list[int], compile_model: bool, channels_last: bool) -> list[dict]:
    """Interleaved rounds of every implementation at one (preset, batch); one row per implementation."""
    train_config = TrainConfig(batch_size=batch)
    jax_step, params = jax_stepper(config, train_config, images)
    t0 = time.perf_counter()
    jax_step()  # compiles
    compile_s = time.perf_counter() - t0
    variants: list[tuple[str, int | None, Any]] = [("jaxleak", None, jax_step)]
    for threads in torch_threads:
        variants.append(("torch", threads, torch_stepper(config, train_config, images, params,
                                                         channels_last=channels_last)))
        if compile_model:
            variants.append(("torch.compile", threads, torch_stepper(
                config, train_config, images, params, compile_model=True, channels_last=channels_last)))
    default_threads = torch.get_num_threads()
    times: dict[int, list[list[float]]] = {i: [] for i in range(len(variants))}
    try:
        for i, (_, threads, step) in enumerate(variants):
            if threads is not None:
                torch.set_num_threads(threads)
            _timed(step, warmup - 1 if i == 0 else warmup)  # jax's first step was the compile
        for r in range(rounds):
            for i, (impl, threads, step) in enumerate(variants):
                if threads is not None:
                    torch.set_num_threads(threads)
                times[i].append(_timed(step, steps))
                label = impl if threads is None else f"{impl}/{threads}t"
                print(f"  [{name} b={batch}] round {r + 1}/{rounds} {label}: "
                      f"median {statistics.median(times[i][-1]):.3f} s/step", flush=True)
    finally:
        torch.set_num_threads(default_threads)
    rows = []
    for i, (impl, threads, _) in enumerate(variants):
        flat = [s for round_times in times[i] for s in round_times]
        median = statistics.median(flat)
        rows.append({
            "preset": name, "batch": batch, "impl": impl,
            "threads": threads if threads is not None else os.cpu_count(),
            "s_per_step": median, "steps_per_s": 1.0 / median, "images_per_s": batch / median,
            "round_medians": [statistics.median(t) for t in times[i]], "times": times[i],
            **({"compile_s": compile_s} if impl == "jaxleak" else {}),
        })
    jax_median = rows[0]["s_per_step"]
    for row in rows:
        row["speedup_jaxleak_over_this"] = row["s_per_step"] / jax_median
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows (speed-up: jaxleak steps/s / this row's steps/s)."""
    lines = ["| preset | batch | impl | threads | s/step (median) | steps/s | images/s | jaxleak/this |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['batch']} | {r['impl']} | {r['threads']} | {r['s_per_step']:.3f} "
                     f"| {r['steps_per_s']:.3f} | {r['images_per_s']:.1f} "
                     f"| {r['speedup_jaxleak_over_this']:.2f} |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Versions of Python and the libraries timed."""
    import jaxlib

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=("small", "paper"), default=None,
                        help="default: small paper (--quick: small)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="default: 64 128 (--quick: 8)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per round (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps each (default 2; --quick 1)")
    parser.add_argument("--torch-threads", nargs="+", type=int, default=None,
                        help=f"torch.set_num_threads values (default: os.cpu_count() = {os.cpu_count()})")
    parser.add_argument("--torch-compile", action="store_true", help="also time a torch.compile-d model")
    parser.add_argument("--channels-last", action="store_true", help="torch in channels-last format")
    parser.add_argument("--images", type=int, default=1024, help="size of the random uint8 training set")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check: small preset, batch 8, 2 rounds of 2 steps")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    presets = args.presets or (["small"] if quick else ["small", "paper"])
    batch_sizes = args.batch_sizes or ([8] if quick else [64, 128])
    rounds = args.rounds or (2 if quick else 3)
    steps = args.steps or (2 if quick else 5)
    warmup = args.warmup or (1 if quick else 2)
    torch_threads = args.torch_threads or [os.cpu_count()]
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])

    print(f"jax {jax.__version__} ({', '.join(str(d) for d in jax.devices())}), torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})", flush=True)
    checks = {}
    for name in presets:
        config = preset(name)
        jax_count, torch_count = check_param_counts(config, name)
        rel = forward_agreement(config)
        print(f"[{name}] forward velocity, same weights and input: relative error {rel:.2e} "
              f"(float32; tolerance {FORWARD_RTOL:g})", flush=True)
        if not rel < FORWARD_RTOL:
            raise SystemExit(f"[{name}] FORWARD MISMATCH: relative error {rel:.2e} >= {FORWARD_RTOL:g}")
        checks[name] = {"params_jaxleak": jax_count, "params_torch": torch_count, "forward_rel_error": rel}

    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    rows = []
    for name in presets:
        config = preset(name)
        for batch in batch_sizes:
            rows += benchmark(config, name, batch, images=images, warmup=warmup, rounds=rounds, steps=steps,
                              torch_threads=torch_threads, compile_model=args.torch_compile,
                              channels_last=args.channels_last)
    print()
    print(format_table(rows))
    print(f"\nmedian s/step over {rounds} interleaved rounds x {steps} steps after {warmup} warm-up steps "
          f"(jax compile excluded); XLA on all {os.cpu_count()} cores; "
          "jaxleak/this = this s/step / jaxleak s/step")
    if args.out is not None:
        result = {
            "what": "flow-prior training step throughput, jaxleak vs PyTorch, same UNet and recipe",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command, "machine": machine(), "versions": versions(),
            "settings": {"presets": presets, "batch_sizes": batch_sizes, "rounds": rounds, "steps": steps,
                         "warmup": warmup, "torch_threads": torch_threads,
                         "torch_compile": args.torch_compile,
                         "channels_last": args.channels_last, "images": args.images, "quick": quick,
                         "forward_rtol": FORWARD_RTOL},
            "checks": checks, "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
