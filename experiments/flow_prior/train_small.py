"""Trains the ``small`` flow-matching prior on Tiny-ImageNet-32 (train split) on the CPU, resumably.

Meant to run in the background for about an hour; kill it at any time (even
``kill -9``) and start the same command again: it continues from the latest
checkpoint in ``--out`` to the same result as an uninterrupted run (every step's
randomness is ``fold_in(seed, step)``). ``--steps`` may be raised on a later
start to train longer. Sample grids (EMA weights, 25 Euler steps) land in
``OUT/samples/`` every ``--sample-every`` steps; the loss is in each checkpoint.

Settings differ from the paper's GPU recipe (Adam 2e-4, 5k warm-up, EMA 0.9999)
because a CPU hour is only ~2k steps: a higher learning rate, a short warm-up
and an EMA whose horizon (1 / (1 - decay) = 1k steps) fits the run.

    JAXLEAK_DATA_DIR=/work/shared/data nohup python experiments/flow_prior/train_small.py \\
        --out runs/flow-prior/tinyimagenet32-small --steps 2000 > train_small.log 2>&1 &

Then ``jaxleak.priors.export_prior(OUT, "jaxleak/priors/weights/tinyimagenet32-small")``
writes the compact (bfloat16) weights to ship.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from jaxleak import artifacts
from jaxleak.data import load_dataset
from jaxleak.priors import TrainConfig, preset, train_flow_prior


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/flow-prior/tinyimagenet32-small")
    parser.add_argument("--dataset", default="tinyimagenet32")
    parser.add_argument("--data-dir", default=os.environ.get("JAXLEAK_DATA_DIR", "/work/shared/data"))
    parser.add_argument("--n", type=int, default=None, help="training images (default: all)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=250)
    args = parser.parse_args(argv)

    data = load_dataset(args.dataset, split="train", n=args.n, seed=args.seed,
                        image_size=32, data_dir=args.data_dir)
    config = preset("small", image_size=32, channels=data.images.shape[-1])
    train_config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=args.warmup, ema_decay=args.ema, seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    out = Path(args.out)
    resume = (out / artifacts.CONFIG_FILE).is_file()
    print(f"{'resuming' if resume else 'starting'} {out}: {data.images.shape[0]} images of "
          f"{args.dataset} ({data.source}), {args.steps} steps of batch {args.batch_size} on "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)
    t0 = time.perf_counter()
    result = train_flow_prior(
        data.images, config=config, train_config=train_config, out=out, resume=resume,
        info={"dataset": args.dataset, "split": "train", "n": args.n, "seed": args.seed,
              "image_size": 32},
        sample_every=args.sample_every, sample_n=36, sample_steps=25,
    )
    losses = result.history["loss"]
    tail = sum(losses[-100:]) / max(1, len(losses[-100:]))
    print(f"step {int(result.state.step)}: mean loss of the last 100 steps {tail:.4f}; "
          f"this session {time.perf_counter() - t0:.0f} s, run total "
          f"{result.history['wall_s'][-1]:.0f} s", flush=True)


if __name__ == "__main__":
    main()
