"""Measures a flow-matching prior: FD-AlexNet with its floor and ceiling, and the ||v||^2 table.

FD-AlexNet (not comparable to Inception FID; :mod:`jaxleak.priors.quality`) of

- ``samples``: ``--n`` prior samples (EMA weights, ``--steps`` Euler steps) vs
  ``--n`` held-out real images of ``--dataset`` (its test/val split);
- ``floor``: ``--n`` real train images vs the same held-out images (what a
  perfect prior would score at this n);
- ``ceiling``: ``--n`` samples of an untrained UNet of the same config vs the
  held-out images.

and the velocity table (assumption A2): mean per-pixel ``||v(x, t)||^2`` on the
held-out images, on ``--other``'s test images (resized to the prior's size and
converted to its channel count), on both with Gaussian noise of each
``--noise-stds``, and on uniform noise, at each ``--ts``.

    JAXLEAK_DATA_DIR=/work/shared/data python experiments/flow_prior/quality.py \\
        --prior runs/flow-prior/tinyimagenet32-small --dataset tinyimagenet32 \\
        --other cifar10 --n 1000 --out results.json

Data come from ``--data-dir`` (default ``$JAXLEAK_DATA_DIR``, else
``/work/shared/data``) through :func:`jaxleak.data.load_dataset`. When the
prior's dataset is absent the script says so and exits with status 0 without
writing ``--out``; an absent ``--other`` only drops its rows (noted in the JSON).
When the dataset has a single split (e.g. ``mnist-embedded``) the train and
held-out images are disjoint halves of one draw of ``2 n``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxleak.data import DatasetNotFoundError, load_dataset
from jaxleak.priors import init_params, load_prior, sample
from jaxleak.priors.quality import (
    DEFAULT_LAYER,
    DEFAULT_MIN_SIDE,
    alexnet_features,
    format_velocity_table,
    frechet_distance,
    velocity_table,
)


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Grayscale repeated to RGB, or RGB to its ITU-R 601 luma, to fit the prior."""
    if images.shape[-1] == channels:
        return images
    if images.shape[-1] == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] == 3 and channels == 1:
        luma = np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(images @ luma, 0.0, 1.0)[..., None].astype(np.float32)
    raise ValueError(f"cannot convert {images.shape[-1]} channels to {channels}")


def real_images(name, *, n, seed, size, channels, data_dir):
    """``(train, held_out, sources)``: ``n`` each, disjoint, at the prior's shape."""
    options = {"image_size": size, "data_dir": data_dir}
    train = load_dataset(name, split="train", n=n, seed=seed, **options)
    held = load_dataset(name, split="test", n=n, seed=seed + 1, **options)
    if held.split == train.split:  # one split only: disjoint halves of one draw
        both = load_dataset(name, split="train", n=2 * n, seed=seed, **options)
        train_images, held_images = both.images[:n], both.images[n:]
        sources = {"train": both.source + " [first n]", "held_out": both.source + " [last n]"}
    else:
        train_images, held_images = train.images, held.images
        sources = {"train": train.source, "held_out": held.source}
    return (match_channels(train_images, channels), match_channels(held_images, channels),
            sources)


def draw_samples(params, config, *, n, steps, method, seed, batch):
    """``n`` samples in batches of ``batch`` (one compiled program; the last batch trimmed)."""
    key = jax.random.PRNGKey(seed)
    chunks = []
    for i in range(-(-n // batch)):
        chunks.append(np.asarray(sample(params, config, jax.random.fold_in(key, i), batch,
                                        steps, method)))
    return np.concatenate(chunks)[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", required=True, help="a prior run or export folder")
    parser.add_argument("--dataset", default="tinyimagenet32", help="the prior's domain")
    parser.add_argument("--other", default="cifar10", help="another dataset for the table")
    parser.add_argument("--data-dir",
                        default=os.environ.get("JAXLEAK_DATA_DIR", "/work/shared/data"))
    parser.add_argument("--weights-dir", default=None, help="LPIPS weights root")
    parser.add_argument("--n", type=int, default=1000, help="images per set")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--method", default="euler", choices=("euler", "heun", "midpoint"))
    parser.add_argument("--sample-batch", type=int, default=250)
    parser.add_argument("--ts", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    parser.add_argument("--noise-stds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--layer", default=DEFAULT_LAYER)
    parser.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results.json")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be >= 2 (a covariance needs two images)")

    t0 = time.perf_counter()
    prior = load_prior(args.prior)
    config = prior.config
    size, channels = config.image_size, config.channels
    try:
        train, held_out, sources = real_images(args.dataset, n=args.n, seed=args.seed, size=size,
                                               channels=channels, data_dir=args.data_dir)
    except DatasetNotFoundError as error:
        print(f"skipped: dataset {args.dataset!r} not found ({error})", file=sys.stderr)
        return 0
    sets = {f"{args.dataset} held-out": held_out}
    notes = []
    try:
        other = load_dataset(args.other, split="test", n=args.n, seed=args.seed,
                             image_size=size, data_dir=args.data_dir)
        sets[f"{args.other} test"] = match_channels(other.images, channels)
        sources["other"] = other.source
    except DatasetNotFoundError as error:
        notes.append(f"--other {args.other!r} not found, its rows are missing: {error}")
        print(f"note: {notes[-1]}", file=sys.stderr)
    print(f"prior {args.prior} ({size}x{size}x{channels}); {args.n} images per set", flush=True)

    sample_options = {"n": args.n, "steps": args.steps, "method": args.method,
                      "seed": args.seed, "batch": min(args.sample_batch, args.n)}
    t = time.perf_counter()
    samples = draw_samples(prior.params, config, **sample_options)
    untrained = init_params(config, jax.random.PRNGKey(args.seed))
    ceiling_samples = draw_samples(untrained, config, **sample_options)
    sampling_s = time.perf_counter() - t

    t = time.perf_counter()
    feature_options = {"weights_dir": args.weights_dir, "layer": args.layer,
                       "min_side_px": args.min_side}
    held_feats = alexnet_features(held_out, **feature_options)
    fd = {
        "samples": frechet_distance(alexnet_features(samples, **feature_options), held_feats),
        "floor": frechet_distance(alexnet_features(train, **feature_options), held_feats),
        "ceiling": frechet_distance(alexnet_features(ceiling_samples, **feature_options),
                                    held_feats),
    }
    fd_s = time.perf_counter() - t
    print(f"FD-AlexNet ({args.layer}, pooled; not comparable to Inception FID), n={args.n}: "
          f"samples {fd['samples']:.3f}, floor (real train) {fd['floor']:.3f}, "
          f"ceiling (untrained) {fd['ceiling']:.3f}", flush=True)

    t = time.perf_counter()
    rows = velocity_table(prior, sets, ts=tuple(args.ts), noise_stds=tuple(args.noise_stds),
                          seed=args.seed)
    table_s = time.perf_counter() - t
    print(format_velocity_table(rows), flush=True)

    results = {
        "prior": str(Path(args.prior).absolute()),
        "prior_step": prior.extra.get("step"),
        "unet": config.to_dict(),
        "dataset": args.dataset,
        "other": args.other,
        "n": args.n,
        "sources": sources,
        "sampling": {"steps": args.steps, "method": args.method, "seed": args.seed},
        "fd_alexnet": {
            **fd,
            "layer": args.layer,
            "min_side_px": args.min_side,
            "about": "FD-AlexNet, not comparable to Inception FID: Frechet distance of pooled "
                     "LPIPS-AlexNet features vs held-out real images; floor = real train "
                     "images, ceiling = samples of an untrained UNet of the same config",
        },
        "velocity_table": rows,
        "notes": notes,
        "wall_s": {"sampling": sampling_s, "fd": fd_s, "table": table_s,
                   "total": time.perf_counter() - t0},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{jax.default_backend()}",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out} ({results['wall_s']['total']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
