#!/usr/bin/env bash
# The CPU cells of experiments/venom/README.md, in the order they were run (resumable: re-run to continue).
set -euo pipefail
cd "$(dirname "$0")/../.."
export JAXLEAK_DATA_DIR="${JAXLEAK_DATA_DIR:-$(pwd)/../shared/data}"
python experiments/venom/table1.py --dataset mnist --calibration paper --steps 3000
python experiments/venom/table1.py --dataset cifar10 --calibration paper --steps 3000
python experiments/venom/table1.py --dataset mnist --calibration dpsgd --steps 1500
python experiments/venom/table1.py --dataset cifar10 --calibration dpsgd --steps 1500
python experiments/venom/table1.py --dataset mnist --calibration paper --steps 3000 --networks venom --clamp-levels
python experiments/venom/table1.py --dataset tinyimagenet32 --calibration paper --steps 3000
python experiments/venom/table1.py --dataset tinyimagenet32 --calibration dpsgd --steps 1500
