#!/usr/bin/env bash
# PALP on the shapes world, CPU only: install the requirements, personalize the shipped base model to one subject
# (a checkered star it has never seen) for one target prompt, as plain TI + DreamBooth-LoRA (one token vector, and
# train_palp.py's 4) and with PALP's defaults (with the default clean prompt y_c and with one that describes the
# subject), each with two training seeds, then sample every run and score it with both probes.
#
#   bash examples/shapes_world/quickstart.sh            # from the repository root (or anywhere: it cds there)
#   WORLD=flow bash examples/shapes_world/quickstart.sh # the same on the flow-matching world (SD3 architecture)
#
# Leaves in $OUT (default runs/shapes_quickstart): ti_db_s<seed>/, ti_db_4_vectors_s<seed>/, palp_s<seed>/,
# palp_described_s<seed>/ (LoRA + learned embedding + training config), grid.png (rows: base model with the clean
# prompt, then each run), metrics.md and metrics.json (each run, and each method's mean over its seeds).
set -euo pipefail
cd "$(dirname "$0")/../.."

# The UNet world (model/, Stable Diffusion's architecture) or the flow world (model_flow/, SD3's MM-DiT trained with
# rectified flow), which conditions on no T5 tokens as it was trained (--max_sequence_length 0).
WORLD=${WORLD:-unet}
case $WORLD in
  unet) MODEL=examples/shapes_world/model; MODEL_ARGS=(); DEFAULT_OUT=runs/shapes_quickstart ;;
  flow) MODEL=examples/shapes_world/model_flow; MODEL_ARGS=(--max_sequence_length 0)
        DEFAULT_OUT=runs/shapes_quickstart_flow ;;
  *) echo "WORLD must be 'unet' or 'flow', not '$WORLD'" >&2; exit 2 ;;
esac
OUT=${OUT:-$DEFAULT_OUT}
STEPS=${STEPS:-100}   # the step count of the measured default (README)
SEEDS=${SEEDS:-"0 1"}   # one run per training seed and method: one seed alone is not a result
# One thread per process: on a small, shared CPU, torch's default of one thread per core oversubscribes the cores
# and can be several times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SUBJECT=checkered_star
TOKEN="<checkered-star>"
TARGET="a sketch of ${TOKEN} on a blue background"

python -m pip install -r requirements.txt

# PALP twice: with the default y_c ("a sketch of a star on a blue background") and with a y_c that describes the
# subject's appearance, as a user can write it with --clean_prompt (see README: it keeps more of the subject).
DESCRIBED="a sketch of a yellow checkered star on a blue background"

RUNS=(); LABELS=(); METHODS=()
# TI+DB as the protocol's baseline (one token vector), TI+DB with train_palp.py's 4 vectors (so that the token's share
# of the result shows), and PALP with the script's defaults (4 vectors, λ = 0.1), with and without the described y_c.
for NAME in ti_db ti_db_4_vectors palp palp_described; do
for SEED in $SEEDS; do
  case $NAME in
    ti_db) METHOD="TI+DB"; EXTRA=(--alignment_mode none --num_vectors 1) ;;
    ti_db_4_vectors) METHOD="TI+DB, 4 vectors"; EXTRA=(--alignment_mode none) ;;
    palp) METHOD="PALP"; EXTRA=(--alignment_mode dds) ;;
    palp_described) METHOD="PALP, described y_c"; EXTRA=(--alignment_mode dds --clean_prompt "${DESCRIBED}") ;;
  esac
  RUNS+=("${OUT}/${NAME}_s${SEED}"); LABELS+=("${METHOD}, seed ${SEED}"); METHODS+=("${METHOD}")
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_palp.py \
    --pretrained_model_name_or_path "${MODEL}" "${MODEL_ARGS[@]}" \
    --instance_data_dir examples/shapes_world/subjects/${SUBJECT} \
    --placeholder_token "${TOKEN}" \
    --class_name star \
    --personalization_prompt "a photo of {token}" \
    --target_prompt "${TARGET}" \
    "${EXTRA[@]}" \
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
    --output_dir "${OUT}/${NAME}_s${SEED}"
done
done

python examples/shapes_world/evaluate.py \
  --runs "${RUNS[@]}" --labels "${LABELS[@]}" --methods "${METHODS[@]}" \
  --num_samples 8 --output_dir "${OUT}"
echo "Grid: ${OUT}/grid.png   Metrics: ${OUT}/metrics.md"
