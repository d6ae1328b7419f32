#!/usr/bin/env bash
# Alignment–fidelity frontiers on the development split (PROTOCOL.md, "Which configuration goes to v2"): TI+DB at
# 100/200/300 steps and every mechanism's λ sweep at 100 and 200 steps, training seeds 0 and 1, the four dev pairs,
# 16 samples per run; then analysis.py --frontier. Three processes, one thread each (about six hours on 2 cores); runs
# already in a runs.csv (or, on a fresh clone, in the committed runs_*.csv) are skipped, so an interrupted sweep
# resumes.
#
#   bash examples/shapes_world/frontier.sh            # from the repository root (or anywhere: it cds there)
#
# Writes runs/frontier_{ti,a,b,c,d,e,f,g,h}/runs.csv and examples/shapes_world/results/frontier/{frontier.md,frontier.png,
# runs_*.csv}.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
OUT=${OUT:-runs/frontier}
RESULTS=${RESULTS:-examples/shapes_world/results/frontier}
PYTHON=${PYTHON:-python}
X=examples/shapes_world/experiment.py
COMMON=(--split dev --pairs checkered_star:0 ringed_circle:1 orange_square:3 checkered_triangle:4 --seeds 0 1
        --num_samples 16)
# A fresh clone has no runs/: each part starts from its committed rows, so only the missing runs are trained.
for part in ti a b c d e f g h; do
  if [ ! -f "${OUT}_${part}/runs.csv" ] && [ -f "$RESULTS/runs_${part}.csv" ]; then
    mkdir -p "${OUT}_${part}" && cp "$RESULTS/runs_${part}.csv" "${OUT}_${part}/runs.csv"
  fi
done
sweep() { for w in "$@"; do printf '%s\n' "$PREFIX$w"; done; }
run() { part=$1; shift; $PYTHON $X "${COMMON[@]}" --configs "$@" --steps 100 200 --output_dir "${OUT}_${part}"; }

($PYTHON $X "${COMMON[@]}" --configs "TI+DB" --steps 100 200 300 --output_dir "${OUT}_ti"
 mapfile -t A < <(PREFIX="class-cancelling D λ=" sweep 0.03 0.1 0.3 0.6 1
                  PREFIX="identity-bearing teacher λ=" sweep 0.1 0.3 0.6 1
                  PREFIX="identity-projected D λ=" sweep 0.1 0.3 0.6 1)
 run a "${A[@]}") > "${OUT}_a.log" 2>&1 &
(mapfile -t B < <(echo "PALP (paper)"; PREFIX="PALP λ=" sweep 0.1 0.3 0.6
                  PREFIX="D on the LoRA only λ=" sweep 0.03 0.1 0.3 0.6 1)
 run b "${B[@]}"
 mapfile -t C < <(echo "PALP normalised D"; PREFIX="PALP normalised D λ=" sweep 0.5 1.5 2)
 run c "${C[@]}") > "${OUT}_b.log" 2>&1 &
(mapfile -t D < <(PREFIX="calibrated D λ=" sweep 0.5 1 2 4)
 run d "${D[@]}"
 mapfile -t E < <(PREFIX="class-source DDS λ=" sweep 0.03 0.1 0.3 1; PREFIX="D on the token only λ=" sweep 0.3 0.6 1 2)
 run e "${E[@]}"
 mapfile -t F < <(PREFIX="inverted teacher λ=" sweep 0.1 0.3 1 3)
 run f "${F[@]}"
 mapfile -t G < <(PREFIX="identity-region D λ=" sweep 0.3 0.6 1 2)
 run g "${G[@]}"
 # Multi-vector tokens: TI+DB with the same 4 vectors beside (not the protocol's reference, reported with it).
 $PYTHON $X "${COMMON[@]}" --configs "TI+DB 4 vectors" --steps 100 200 300 --output_dir "${OUT}_h"
 mapfile -t H < <(PREFIX="multi-vector token (4 vectors) λ=" sweep 1 0.3 0.6 0.1)
 run h "${H[@]}") > "${OUT}_d.log" 2>&1
wait

mkdir -p "$RESULTS"
RUNS=()
for part in ti a b c d e f g h; do
  cp "${OUT}_${part}/runs.csv" "$RESULTS/runs_${part}.csv"
  RUNS+=("$RESULTS/runs_${part}.csv")
done
$PYTHON examples/shapes_world/analysis.py --runs "${RUNS[@]}" --frontier "$RESULTS"
