#!/usr/bin/env bash
# PALP on the shapes world, CPU only: install the requirements, personalize the shipped base model to one subject
# (a checkered star it has never seen) for one target prompt, once as plain TI + DreamBooth-LoRA and once with PALP,
# then sample both and score them with the probe.
#
#   bash examples/shapes_world/quickstart.sh            # from the repository root (or anywhere: it cds there)
#
# Leaves in $OUT (default runs/shapes_quickstart): ti_db/ and palp/ (LoRA + learned embedding + training config),
# grid.png (rows: base model with the clean prompt / TI+DB / PALP), metrics.md and metrics.json.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/shapes_quickstart}
STEPS=${STEPS:-200}
# One thread per process: on a small, shared CPU, torch's default of one thread per core oversubscribes the cores
# and can be several times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SUBJECT=checkered_star
TOKEN="<checkered-star>"
TARGET="a sketch of ${TOKEN} on a blue background"

python -m pip install -r requirements.txt

for MODE in none dds; do
  NAME=$([ "$MODE" = none ] && echo ti_db || echo palp)
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
    --seed 0 \
    --num_validation_images 4 \
    --validation_guidance_scale 5 \
    --report_to none \
    --checkpointing_steps 1000000 \
    --overwrite_output_dir \
    --output_dir "${OUT}/${NAME}"
done

python examples/shapes_world/evaluate.py \
  --runs "${OUT}/ti_db" "${OUT}/palp" --labels "TI+DB" "PALP" \
  --num_samples 8 --output_dir "${OUT}"
echo "Grid: ${OUT}/grid.png   Metrics: ${OUT}/metrics.md"
