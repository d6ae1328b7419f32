#!/usr/bin/env bash
# A held-out check of PROTOCOL.md: TI+DB and one configuration of experiment.py on a held-out split's subjects and
# prompts, 3 training seeds, then the split's decision rule. Two processes side by side (one thread each).
#
#   bash examples/shapes_world/heldout.sh                      # v1 (about an hour on 2 cores)
#   SPLIT=heldout_v2 CONFIG="<chosen on dev>" STEPS=200 bash examples/shapes_world/heldout.sh
#   ANALYSIS_ONLY=1 bash examples/shapes_world/heldout.sh     # the verdict again, from $RESULTS/runs_{a,b}.csv
#   MODEL=examples/shapes_world/model_flow OUT=runs/flow_heldout_v2 RESULTS=examples/shapes_world/results/flow_heldout_v2 \
#     SPLIT=heldout_v2 CONFIG="PALP (paper)" STEPS=200 bash examples/shapes_world/heldout.sh   # on the flow world
#
# Writes ${OUT}_{a,b}/runs.csv, and $RESULTS/{verdict.md,table.md,plot.png,runs_a.csv,runs_b.csv}. v1's verdict
# compares CONFIG@STEPS with TI+DB at STEPS, then at every other TI+DB step count, then with EXTRA_BASELINES; v2's
# applies the v2 rule (TI+DB at its own best of TI_STEPS, leave-one-subject-out). Runs already in the CSVs (TI+DB's,
# when another configuration is checked; on a fresh clone, the committed $RESULTS/runs_{a,b}.csv) are not run again.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
SPLIT=${SPLIT:-heldout}
OUT=${OUT:-runs/$SPLIT}
STEPS=${STEPS:-200}                 # the configuration's step budget (README)
TI_STEPS=${TI_STEPS:-$([ "$SPLIT" = heldout ] && echo "100 $STEPS" || echo "100 200 300")}
PALP_STEPS=${PALP_STEPS:-"100 $STEPS"}
SEEDS=${SEEDS:-"0 1 2"}
NUM_SAMPLES=${NUM_SAMPLES:-$([ "$SPLIT" = heldout ] && echo 8 || echo 16)}
CONFIG=${CONFIG:-"PALP (defaults)"}
EXTRA_BASELINES=${EXTRA_BASELINES:-}
X=examples/shapes_world/experiment.py
RESULTS=${RESULTS:-examples/shapes_world/results/$SPLIT}
PYTHON=${PYTHON:-python}
# The split's subjects, in two halves (one per process) unless SUBJECTS_A / SUBJECTS_B name them.
read -r -a ALL <<< "$($PYTHON -c "import sys; sys.path.insert(0, 'examples/shapes_world'); import world; \
print(' '.join(world.SPLITS['$SPLIT'][0]))")"
HALF=$(( (${#ALL[@]} + 1) / 2 ))
SUBJECTS_A=${SUBJECTS_A:-${ALL[*]:0:$HALF}}
SUBJECTS_B=${SUBJECTS_B-${ALL[*]:$HALF}}
PROMPT_INDICES=${PROMPT_INDICES:-"0 1 2 3 4 5"}
MODEL=${MODEL:-}                     # another pre-trained world (model_flow/); the UNet world's model/ when empty
COMMON=(--split "$SPLIT" --num_samples "$NUM_SAMPLES" --prompt_indices $PROMPT_INDICES ${MODEL:+--model "$MODEL"})

if [ -z "${ANALYSIS_ONLY:-}" ]; then
  # A fresh clone has no runs/: each process starts from its committed rows, so an interrupted check resumes.
  for part in a b; do
    if [ ! -f "${OUT}_${part}/runs.csv" ] && [ -f "$RESULTS/runs_${part}.csv" ]; then
      mkdir -p "${OUT}_${part}" && cp "$RESULTS/runs_${part}.csv" "${OUT}_${part}/runs.csv"
    fi
  done
  # TI+DB does not depend on the prompt: one run per subject and seed, scored on all 6 prompts, beside half of the
  # configuration's runs. Seed by seed, so that every finished seed covers every (subject, prompt) cluster.
  (for SEED in $SEEDS; do
     $PYTHON $X "${COMMON[@]}" --configs "TI+DB" --seeds "$SEED" --steps $TI_STEPS --output_dir "${OUT}_a"
     $PYTHON $X "${COMMON[@]}" --configs "$CONFIG" --subjects $SUBJECTS_A --seeds "$SEED" --steps $PALP_STEPS \
       --output_dir "${OUT}_a"
   done) > "${OUT}_a.log" 2>&1 &
  (for SEED in $SEEDS; do
     if [ -n "$SUBJECTS_B" ]; then
       $PYTHON $X "${COMMON[@]}" --configs "$CONFIG" --subjects $SUBJECTS_B --seeds "$SEED" --steps $PALP_STEPS \
         --output_dir "${OUT}_b"
     fi
   done) > "${OUT}_b.log" 2>&1
  wait
  mkdir -p "$RESULTS"
  cp "${OUT}_a/runs.csv" "$RESULTS/runs_a.csv"
  if [ -f "${OUT}_b/runs.csv" ]; then cp "${OUT}_b/runs.csv" "$RESULTS/runs_b.csv"; fi
fi

RUNS=("$RESULTS/runs_a.csv")
if [ -f "$RESULTS/runs_b.csv" ]; then RUNS+=("$RESULTS/runs_b.csv"); fi
if [ "$SPLIT" = heldout ]; then
  BASELINES=("TI+DB@${STEPS}")
  for N in $(printf '%s\n' $TI_STEPS | sort -nu); do
    if [ "$N" != "$STEPS" ]; then BASELINES+=("TI+DB@${N}"); fi
  done
  if [ -n "$EXTRA_BASELINES" ]; then BASELINES+=("$EXTRA_BASELINES"); fi
  $PYTHON examples/shapes_world/analysis.py --runs "${RUNS[@]}" --method "${CONFIG}@${STEPS}" \
    --baseline "${BASELINES[@]}" --output "$RESULTS/verdict.md"
else
  $PYTHON examples/shapes_world/analysis.py --runs "${RUNS[@]}" --v2_rule --method "${CONFIG}@${STEPS}" \
    --baseline "TI+DB" --baseline_steps $TI_STEPS --output "$RESULTS/verdict.md"
fi
if [ -z "${ANALYSIS_ONLY:-}" ]; then  # the table's seed diversity reads the samples next to each runs.csv
  TABLE_RUNS=("${OUT}_a/runs.csv")
  if [ -f "${OUT}_b/runs.csv" ]; then TABLE_RUNS+=("${OUT}_b/runs.csv"); fi
  $PYTHON examples/shapes_world/analysis.py --runs "${TABLE_RUNS[@]}" --table "$RESULTS"
fi
