#!/usr/bin/env bash
# PALP on the shapes world, CPU only: install the requirements, personalize the shipped base model to one subject
# (a checkered star it has never seen) for one target prompt, as plain TI + DreamBooth-LoRA and with PALP, each with
# two training seeds, then sample every run and score it with both probes.
#
#   bash examples/shapes_world/quickstart.sh            # from the repository root (or anywhere: it cds there)
#
# Leaves in $OUT (default runs/shapes_quickstart): ti_db_s<seed>/ and palp_s<seed>/ (LoRA + learned embedding +
# training config), grid.png (rows: base model with the clean prompt, then each run), metrics.md and metrics.json
# (each run, and each method's mean over its seeds).
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/shapes_quickstart}
STEPS=${STEPS:-200}
SEEDS=${SEEDS:-"0 1"}   # one run per training seed and method: one seed alone is not a result
# One thread per process: on a small, shared CPU, torch's default of one thread per core oversubscribes the cores
# and can be several times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SUBJECT=checkered_star
TOKEN="<checkered-star>"
TARGET="a sketch of ${TOKEN} on a blue background"

python -m pip install -r requirements.txt

RUNS=(); LABELS=(); METHODS=()
for MODE in none dds; do
for SEED in $SEEDS; do
  METHOD=$([ "$MODE" = none ] && echo "TI+DB" || echo "PALP")
  NAME=$([ "$MODE" = none ] && echo ti_db || echo palp)_s${SEED}
  RUNS+=("${OUT}/${NAME}"); LABELS+=("${METHOD}, seed ${SEED}"); METHODS+=("${METHOD}")
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_palp.py \
    --pretrained_model_name_or_path examples/shapes_world/model \
    --instance_data_dir examples/shapes_world/subjects/${SUBJECT} \
    --placeholder_token "${TOKEN}" \
    --class_name star \
    --personalization_prompt "a photo of {token}" \
    --target_prompt "${TARGET}" \
    --alignment_mode ${MODE} \
    --resolution 32 \
    --max_train_steps ${STEPS} \
    --train_batch_size 4 \
    --learning_rate 3e-3 \
    --rank 8 \
    --seed ${SEED} \
    --num_validation_images 4 \
    --validation_guidance_scale 5 \
    --report_to none \
    --checkpointing_steps 1000000 \
    --overwrite_output_dir \
    --output_dir "${OUT}/${NAME}"
done
done

python examples/shapes_world/evaluate.py \
  --runs "${RUNS[@]}" --labels "${LABELS[@]}" --methods "${METHODS[@]}" \
  --num_samples 8 --output_dir "${OUT}"
echo "Grid: ${OUT}/grid.png   Metrics: ${OUT}/metrics.md"
