#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md, "Optimisation baselines": IG seconds per image (ConvNet and ResNet-18,
# CIFAR 32x32) at T = 1, 16, 256 targets per block, XLA vs im2col convolutions side by side, then the
# PyTorch reference loop on the same GPU. One command for a lent GPU session; JSON lines go to stdout
# and to $OUT/ig_rows.jsonl when OUT is set. Not yet run on a GPU (none lent so far).
#
#   bash experiments/baselines/gpu_rows.sh                          # GPU: the rows
#   TARGETS="1 2" ITS=2 TORCH=0 bash experiments/baselines/gpu_rows.sh   # CPU smoke check of the commands
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGETS=${TARGETS:-"1 16 256"}
ITS=${ITS:-50}
log=${OUT:+$OUT/ig_rows.jsonl}
log=${log:-/dev/null}
python -c "import jax; print('jax', jax.__version__, jax.devices())" >&2
for model in convnet resnet18; do
  python experiments/baselines/bench_ig.py --model "$model" --width 64 --targets $TARGETS \
      --iterations "$ITS" --chunk "$ITS" --batching vmap --conv-impl xla patches | tee -a "$log"
done
if [ "${TORCH:-1}" = 1 ]; then
  python experiments/baselines/compare_torch.py --targets 1 16 --iterations "$ITS" --torch-sample 1 \
      --jax-iterations "$ITS" --chunk "$ITS" --frameworks torch | tee -a "$log"
fi
