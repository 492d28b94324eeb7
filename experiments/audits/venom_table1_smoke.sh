#!/bin/bash
# Trains three tiny recovery networks on embedded digits (20 steps each), then runs venom_table1.smoke.toml.
set -euo pipefail
ROOT=/tmp/jaxleak-audit-venom-smoke
HERE=$(cd "$(dirname "$0")" && pwd)
for variant in fgla venom-diff venom; do
  if [ ! -e "$ROOT/nets/$variant/config.json" ] && [ ! -d "$ROOT/nets/$variant" ]; then
    jaxleak train "$variant" --aux-dataset mnist-embedded --aux-split train --aux-n 300 --model lenet-venom \
      --steps 20 --batch-size 8 --base-width 8 --multipliers 1 2 --eval-every 10 --eval-size 32 \
      --checkpoint-every 10 --quiet --out "$ROOT/nets/$variant"
  fi
done
jaxleak audit run "$HERE/venom_table1.smoke.toml" --out "$ROOT/audit"
