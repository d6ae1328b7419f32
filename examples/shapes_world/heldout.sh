#!/usr/bin/env bash
# The held-out check of PROTOCOL.md: TI+DB and PALP with train_palp.py's defaults, on the held-out subjects and prompts,
# 3 training seeds, then the decision rule. Two processes side by side (one thread each); about an hour on 2 cores.
#
#   bash examples/shapes_world/heldout.sh            # from the repository root (or anywhere: it cds there)
#
# Writes runs/heldout_{a,b}/runs.csv, and examples/shapes_world/results/heldout/{verdict.md,table.md,plot.png}.
# CONFIG names another experiment.py configuration to check (runs already in the CSVs, such as TI+DB's, are not run
# again), RESULTS another results folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
OUT=${OUT:-runs/heldout}
STEPS=${STEPS:-200}            # the world's recommended budget (README)
BASELINE_STEPS=${BASELINE_STEPS:-200}  # TI+DB's best step count on dev
X=examples/shapes_world/experiment.py
RESULTS=${RESULTS:-examples/shapes_world/results/heldout}
CONFIG=${CONFIG:-"PALP (defaults)"}

# TI+DB does not depend on the prompt: one run per subject and seed, scored on all 6 prompts, beside half of PALP's
# runs. Seed by seed, so that every finished seed covers all 24 (subject, prompt) clusters.
TI_STEPS=$(printf '%s\n' 100 "$STEPS" "$BASELINE_STEPS" | sort -nu)
(for SEED in 0 1 2; do
   python $X --split heldout --configs "TI+DB" --seeds $SEED --steps $TI_STEPS --output_dir "${OUT}_a"
   python $X --split heldout --configs "$CONFIG" --subjects dotted_star striped_triangle --seeds $SEED \
     --steps 100 "$STEPS" --output_dir "${OUT}_a"
 done) > "${OUT}_a.log" 2>&1 &
(for SEED in 0 1 2; do
   python $X --split heldout --configs "$CONFIG" --subjects ringed_square orange_circle --seeds $SEED \
     --steps 100 "$STEPS" --output_dir "${OUT}_b"
 done) > "${OUT}_b.log" 2>&1
wait

mkdir -p "$RESULTS"
python examples/shapes_world/analysis.py --runs "${OUT}_a/runs.csv" "${OUT}_b/runs.csv" \
  --method "${CONFIG}@${STEPS}" --baseline "TI+DB@${STEPS}" "TI+DB@${BASELINE_STEPS}" --output "$RESULTS/verdict.md"
python examples/shapes_world/analysis.py --runs "${OUT}_a/runs.csv" "${OUT}_b/runs.csv" --table "$RESULTS"
cp "${OUT}_a/runs.csv" "$RESULTS/runs_a.csv"; cp "${OUT}_b/runs.csv" "$RESULTS/runs_b.csv"
