#!/usr/bin/env bash
# Art-inspired composition with PALP: one cat (a few photos) + one artwork (a single image), trained for
#   "An oil painting of <my-cat> inspired by <wanderer> painting".
#
#   bash examples/art_inspiration/train.sh [more flags]
#
# Flags given on the command line come last and win over the ones below (e.g. --max_train_steps 200).
# Environment: MODEL (base model), SUBJECTS (subjects file), OUTPUT_DIR.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
MODEL="${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
SUBJECTS="${SUBJECTS:-$HERE/subjects.json}"
OUTPUT_DIR="${OUTPUT_DIR:-palp-cat-wanderer}"

# α = 7.5 and β = 1.0 are the script's defaults for composition (paper); 500 steps at 5e-5 with rank 32 (paper).
accelerate launch "$ROOT/train_palp_multi_subject.py" \
  --pretrained_model_name_or_path "$MODEL" \
  --subjects_config "$SUBJECTS" \
  --target_prompt "An oil painting of <my-cat> inspired by <wanderer> painting" \
  --clean_prompt "An oil painting of a cat sitting on a rock" \
  --output_dir "$OUTPUT_DIR" \
  --resolution 512 \
  --train_batch_size 1 \
  --max_train_steps 500 \
  --learning_rate 5e-5 \
  --rank 32 \
  --subject_sampling balanced \
  --mixed_precision fp16 \
  --checkpointing_steps 250 \
  --num_validation_images 4 \
  --validation_steps 100 \
  --seed 0 \
  "$@"
