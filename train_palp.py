#!/usr/bin/env python
# coding=utf-8
# Copyright 2026 The PALP training scripts authors. Licensed under the Apache License, Version 2.0.
"""PALP: Prompt Aligned Personalization of text-to-image models (Arar et al., arXiv 2401.06105).

Personalizes a Stable Diffusion model to one subject for ONE target prompt ("A sketch of <my-cat> in Paris"):
LoRA on the UNet's attention plus a new textual-inversion token, trained jointly with two terms:

    loss = L_pers + λ · L_align

* ``L_pers``: the usual DreamBooth / Textual Inversion denoising loss on the subject photos, prompt ``y_P``
  ("A photo of <my-cat>").
* ``L_align``: PALP's prompt-alignment term. From the personalization forward pass we take the one-step clean
  estimate ``x̂0``, re-noise it (stop-gradient, same noise) to ``x̂_t2`` and compare, gradient-free, the
  *pre-trained* model on the clean target prompt ``y_c`` ("A sketch of a cat in Paris", guidance α) with the
  *personalized* model on ``y_P`` (guidance β). Their difference ``D`` is a Delta Denoising Score direction; the
  surrogate ``-⟨sg(D), ε̂⟩`` back-propagates it through the same Jacobian the personalization loss already uses, so
  a step costs one backward pass plus gradient-free forward passes.

Run ``python train_palp.py --help`` for every flag, its default and where the default comes from.

    accelerate launch train_palp.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir ./my_cat --placeholder_token "<my-cat>" --class_name cat \\
      --target_prompt "A sketch of <my-cat> in Paris" --output_dir palp-cat-sketch --mixed_precision fp16

The same command trains Stable Diffusion 1.x/2.x, SDXL and Stable Diffusion 3 / 3.5: the model folder's
``model_index.json`` says which.
The result loads into a stock ``StableDiffusionPipeline``:

    pipe.load_lora_weights("palp-cat-sketch")
    pipe.load_textual_inversion("palp-cat-sketch/learned_embeds.safetensors")

or, for SDXL, into a ``StableDiffusionXLPipeline`` (the embedding file holds one row per text encoder):

    pipe.load_lora_weights("palp-cat-sketch")
    state = load_file("palp-cat-sketch/learned_embeds.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="<my-cat>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<my-cat>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)

SD3's pipeline has no ``load_textual_inversion``: the model card shows the lines that add the token to both CLIP
tokenizers and set its rows from the same ``{"clip_l", "clip_g"}`` file.

With ``--num_vectors N`` the token has N embedding rows (the file holds ``[N, dim]`` per text encoder):
``load_textual_inversion`` adds ``<my-cat>_1 … <my-cat>_{N-1}`` itself and the SD and SDXL pipelines write
``<my-cat>`` as ``<my-cat> <my-cat>_1 …`` in every prompt, as training does; for SD3 the model card's lines add the
N tokens and its prompt is written out expanded.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
EMBEDDINGS_NAME = "learned_embeds.safetensors"
LORA_NAME = "pytorch_lora_weights.safetensors"
KOHYA_LORA_NAME = "pytorch_lora_weights_kohya.safetensors"
CONFIG_NAME = "training_config.json"
CHECKPOINT_STATE_NAME = "training_state.json"
OPTIMIZER_TENSORS_NAME = "optimizer.safetensors"
LOCK_NAME = ".palp-run.lock"


class UserInputError(ValueError):
    """A problem with the command line or the inputs it names; the message says which flag and how to fix it."""


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="PALP (Prompt Aligned Personalization): LoRA + textual inversion with a prompt-alignment term.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Subject and prompts.
    parser.add_argument(
        "--instance_data_dir",
        type=str,
        default=None,
        help="Folder of subject photos (jpg/png/webp/bmp/gif/tiff; other files are ignored). One image is enough.",
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Instead of --instance_data_dir: a `datasets` dataset holding the subject photos (its train split): a Hub "
        "id, a local folder `datasets.load_dataset` reads (e.g. an image folder), or a folder written by "
        "`save_to_disk`. Needs `pip install datasets`.",
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Config name of --dataset_name.")
    parser.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    parser.add_argument(
        "--placeholder_token",
        type=str,
        required=True,
        help="The new token [V] that stands for the subject, e.g. '<my-cat>'. Must not already be in the vocabulary.",
    )
    parser.add_argument(
        "--class_name",
        type=str,
        required=True,
        help="Class noun of the subject ('cat'). Initialises [V] and builds the default clean prompt.",
    )

    # Prompts.
    parser.add_argument(
        "--target_prompt",
        type=str,
        required=True,
        help="The prompt to personalize for (y), containing the placeholder token: 'A sketch of <my-cat> in Paris'.",
    )
    parser.add_argument(
        "--personalization_prompt",
        type=str,
        default="A photo of {token}",
        help="Personalization prompt y_P for the subject photos; '{token}' is replaced by the placeholder (paper).",
    )
    parser.add_argument(
        "--clean_prompt",
        type=str,
        default=None,
        help="Clean target prompt y_c for the pre-trained model, without any learned token. "
        "Default: the target prompt with the placeholder replaced by 'a <class_name>' (paper). The alignment term "
        "pulls the subject towards what y_c describes, so naming the subject's visible traits here ('A sketch of a "
        "ginger tabby cat in Paris') keeps more of its look, for a little prompt alignment, where the pre-trained model "
        "knows those words (ours; README, 'Balancing the two terms').",
    )

    add_training_arguments(
        parser,
        guidance_scale_pretrained=15.0,
        guidance_scale_personalized=7.5,
        alignment_weight=0.1,
        num_vectors=4,
    )
    args = parser.parse_args(input_args)
    validate_args(args)
    return args


def add_training_arguments(
    parser, guidance_scale_pretrained, guidance_scale_personalized, alignment_weight, num_vectors
):
    """Every flag that is not about the subjects: model, PALP, LoRA, the token's vectors, images, optimisation,
    checkpoints, validation, logging and Hub. Flag names follow diffusers' DreamBooth-LoRA script where the concept
    is the same."""
    # Model.
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Stable Diffusion 1.x/2.x or SDXL base model: a Hub id or a local folder in the diffusers layout. "
        "Which of the two it is comes from its model_index.json.",
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Another VAE to use (a Hub id or folder holding an AutoencoderKL), e.g. an fp16-safe SDXL VAE such as "
        "'madebyollin/sdxl-vae-fp16-fix'. Default: the model's own VAE.",
    )
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=256,
        help="SD3 only: T5's token count in the conditioning of every prompt (StableDiffusion3Pipeline's "
        "max_sequence_length; 256 is its default, so validation and the card sample as training conditioned). The "
        "length changes what the transformer's attention sees: sample with the value trained with. A model loaded "
        "without T5 gets that many zero rows, as the pipeline gives it.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. 'fp16'.")

    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")

    # PALP.
    palp = parser.add_argument_group("PALP prompt alignment")
    palp.add_argument(
        "--alignment_mode",
        type=str,
        default="dds",
        choices=["dds", "class_source", "class_delta", "teacher", "sds", "none"],
        help="'dds': PALP (pre-trained on y_c minus personalized on y_P); 'class_source' (ours): DDS whose "
        "personalized prediction is given ỹ_P, y_P with the token replaced by the class ('a photo of a cat'): the "
        "term of PALP's D that pushes the subject towards a generic member of its class is gone, at the same cost; "
        "'class_delta' (ours): the pre-trained model on y_c minus the same model on ỹ_P, so the pull "
        "towards a generic member of the class cancels; 'teacher' (ours): DDS whose pre-trained prediction is given "
        "the learned token on the target prompt instead of y_c; 'sds': pre-trained on y_c minus the noise (the "
        "paper's ablation: over-saturates); 'none': plain TI + DreamBooth-LoRA baseline (with 4 vectors it "
        "matched every alignment setting measured on the shapes world's SD3 model in alignment and kept more of "
        "the subject: README, SD3 section).",
    )
    palp.add_argument(
        "--guidance_scale_pretrained",
        type=float,
        default=guidance_scale_pretrained,
        help="α, classifier-free guidance of the pre-trained model on the clean prompt "
        "(paper, App. C: 15.0 for one subject, 7.5 for multi-subject and art-inspired composition).",
    )
    palp.add_argument(
        "--guidance_scale_personalized",
        type=float,
        default=guidance_scale_personalized,
        help="β, classifier-free guidance of the personalized model on y_P (paper: 7.5 for one subject, 1.0 for "
        "multi-subject and composition). With β = 1 the personalized unconditional pass is skipped.",
    )
    palp.add_argument(
        "--alignment_weight",
        type=float,
        default=alignment_weight,
        help="λ, weight of the alignment loss (the paper gives none; its loss is λ = 1). Default: %(default)s. "
        "train_palp.py's 0.1, with --num_vectors 4, is the shapes world's measured point: most prompt alignment at "
        "0.95× of TI+DB's look or more, on development subjects and again on held-out ones (README, 'Mechanisms aimed "
        "at the identity'); the multi-subject script keeps 1, not measured with several subjects.",
    )
    palp.add_argument(
        "--alignment_noise",
        type=str,
        default="same",
        choices=["same", "fresh"],
        help="Re-noise x̂0 with the same ε as the personalization branch (paper: better text alignment) or fresh noise.",
    )
    palp.add_argument(
        "--alignment_timestep",
        type=str,
        default="independent",
        choices=["independent", "same"],
        help="Draw t2 independently of t1 (ours: the paper states no rule), or reuse t1.",
    )
    palp.add_argument(
        "--alignment_weighting",
        type=str,
        default="uniform",
        choices=["uniform", "one_minus_alpha_bar"],
        help="w(t2) of the alignment loss: 1, or 1 - ᾱ_t2 (ours: the paper names a weighting but not its form).",
    )
    palp.add_argument(
        "--rescale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Rescale the alignment gradient by √ᾱ_t1/√(1-ᾱ_t1) so every t1 gets an update of the same size "
        "(paper: best variant of its ablation). --no-rescale keeps the factor, as an ablation.",
    )
    palp.add_argument(
        "--timestep_min_ratio",
        type=float,
        default=0.02,
        help="Lowest t1 (and t2, unless --alignment_timestep_min_ratio) as a fraction of the schedule length T (ours).",
    )
    palp.add_argument(
        "--timestep_max_ratio",
        type=float,
        default=0.98,
        help="Highest t1 (and t2, unless --alignment_timestep_max_ratio) as a fraction of the schedule length T (ours). "
        "Must stay below the last step of a zero-terminal-SNR schedule, where ᾱ = 0.",
    )
    palp.add_argument(
        "--alignment_timestep_min_ratio",
        type=float,
        default=None,
        help="Lowest t2 of the alignment branch as a fraction of T. Default: --timestep_min_ratio (ours).",
    )
    palp.add_argument(
        "--alignment_timestep_max_ratio",
        type=float,
        default=None,
        help="Highest t2 of the alignment branch as a fraction of T. Default: --timestep_max_ratio (ours). Near T the "
        "re-noised x̂_t2 keeps little of the subject, and both models' predictions there come mostly from the prompt.",
    )
    palp.add_argument(
        "--alignment_warmup_steps",
        type=int,
        default=0,
        help="Ramp λ linearly from 0 over the first N optimizer steps, so the alignment term starts once the token and "
        "the LoRA hold something of the subject (ours; the paper applies both terms from step 0).",
    )
    palp.add_argument(
        "--alignment_normalization",
        type=str,
        default="none",
        choices=["none", "personalization", "calibrated"],
        help="'none' (the default): D as the paper uses it. 'personalization' (ours): rescale D per sample to the "
        "RMS of the personalization gradient 2(ε̂ − ε), so λ is the ratio of the two terms' pushes on ε̂ at each "
        "step; it fades as the model learns its photos (the residual shrinks), and on the shapes world it sits below "
        "the paper's trade-off between alignment and the subject's look (README). 'calibrated' (ours): D times one "
        "factor, the ratio of the two gradients' mean RMS over the first --alignment_calibration_steps steps, then "
        "held: λ is the ratio of the pushes at the start of training, and the push does not fade; up to that factor "
        "it is the paper's D.",
    )
    palp.add_argument(
        "--alignment_calibration_steps",
        type=int,
        default=25,
        help="With --alignment_normalization calibrated: the optimizer steps over which the two gradients' sizes "
        "are averaged before the factor is held (ours; 25 steps see the residual at about 25 × batch random "
        "timesteps while the LoRA has barely moved).",
    )
    palp.add_argument(
        "--alignment_projection",
        type=str,
        default="none",
        choices=["none", "residual", "identity", "identity_region"],
        help="'residual' (ours): per sample, remove from D its component along the personalization residual ε̂ − ε "
        "when that component would make the model reproduce its photos worse (a one-sided gradient projection, "
        "before --alignment_normalization). 'identity' (ours): remove D's component along the personalized model's "
        "identity direction u = ε_per(y_P) − ε_per(y_P with the class for the token) at x̂_t2 (one more batched "
        "pass). 'identity_region' (ours): keep D off the latent positions where the subject is drawn, weighting it "
        "per position by 1 − |u| / max |u| (the same pass). 'none': D as it is (the paper).",
    )
    palp.add_argument(
        "--alignment_gradient",
        type=str,
        default="all",
        choices=["all", "lora", "token"],
        help="Which trainable parameters the alignment loss updates (ours; the paper: 'all'). 'lora': the token "
        "learns the subject from the personalization loss alone and the LoRA aligns; 'token': the converse.",
    )
    palp.add_argument(
        "--teacher_inversion",
        action="store_true",
        help="With --alignment_mode teacher (ours): add the personalization loss of the pre-trained model (LoRA "
        "off) on y_P, which reaches only the token, so that the token carries the subject in the frozen model too, "
        "as textual inversion's does, and the teacher's picture of the target prompt shows the subject. One more "
        "gradient pass per step.",
    )

    # LoRA.
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (paper: 32).")
    parser.add_argument(
        "--lora_alpha",
        type=int,
        default=None,
        help="LoRA alpha; the LoRA's scale is alpha/rank, folded into the saved up-weights. Default: equal to --rank "
        "(ours). 0 switches the LoRA's effect off (a textual-inversion-only run).",
    )
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA layers.")

    # The placeholder token.
    parser.add_argument(
        "--num_vectors",
        type=int,
        default=num_vectors,
        help="Embedding vectors per placeholder token: <t> becomes N new tokens <t>, <t>_1, …, <t>_{N-1} in every CLIP "
        "tokenizer and text encoder, each initialised from the class noun, and every prompt holding <t> is written "
        "'<t> <t>_1 … <t>_{N-1}' before tokenizing, as diffusers' TextualInversionLoaderMixin.maybe_convert_prompt "
        "writes it at inference. The embedding file holds N rows per text encoder ([N, dim]), which "
        "load_textual_inversion loads as a multi-vector embedding (SD3: the model card's lines). More vectors give "
        "the subject's identity more room in the text embedding. Default: %(default)s (the paper: one token). "
        "train_palp.py's 4 is the shapes world's measured default (README, 'Mechanisms aimed at the identity'); the "
        "multi-subject script keeps 1, not measured with several subjects.",
    )

    # Images.
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training resolution (a multiple of 8). Images are resized so the shorter side matches, then cropped. "
        "Default: the model's native size, UNet sample_size × VAE scale factor (512, 768 or 1024).",
    )
    parser.add_argument("--center_crop", action="store_true", help="Center-crop instead of random crop.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")

    # Optimisation.
    parser.add_argument("--train_batch_size", type=int, default=1, help="Batch size per device (paper: 32 on TPU).")
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches accumulated per optimizer step."
    )
    parser.add_argument("--max_train_steps", type=int, default=500, help="Optimizer steps (paper: 500).")
    parser.add_argument(
        "--learning_rate", type=float, default=5e-5, help="Learning rate of the LoRA and the token (paper: 5e-5)."
    )
    parser.add_argument(
        "--embedding_learning_rate",
        type=float,
        default=None,
        help="Learning rate of the placeholder embedding. Default: --learning_rate (paper). 0 freezes the token at "
        "its class-noun initialisation (a LoRA-only run).",
    )
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rates by batch size × accumulation steps × number of processes.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule.",
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the learning-rate schedule.")
    parser.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    parser.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    parser.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="8-bit AdamW from bitsandbytes (`pip install bitsandbytes`; CUDA or CPU). As bitsandbytes does, tensors "
        "under 4096 elements (the token rows, small LoRA matrices) keep 32-bit state.",
    )
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW ε.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument("--seed", type=int, default=None, help="Seed of the whole run. Default: drawn and recorded.")

    # Speed and memory.
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: the accelerate config. Trainable parameters always stay in fp32.",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Trade compute for memory: recompute the UNet's and the text encoder's activations in the backward pass.",
    )
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention (PyTorch SDPA is the default and usually as good).",
    )
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    parser.add_argument(
        "--base_quantization",
        type=str,
        default="none",
        choices=["none", "nf4", "int8"],
        help="Load the frozen UNet (SD3: transformer) quantized by bitsandbytes through diffusers' "
        "BitsAndBytesConfig (QLoRA-style): 'nf4' stores its linear layers in 4-bit NormalFloat and computes in the "
        "training dtype, 'int8' in LLM.int8(); convolutions and norms stay in the training dtype, the LoRA and the "
        "token rows in fp32. PALP's pre-trained prediction is then this quantized model with its LoRA switched off, "
        "not the full-precision one. The saved LoRA loads into the ordinary, unquantized pipeline. Needs "
        "bitsandbytes and a GPU. "
        "Default: none (ours; the paper does not quantize).",
    )

    # Checkpoints.
    parser.add_argument(
        "--output_dir",
        type=str,
        default="palp-model",
        help="Where outputs and checkpoints go. One run at a time: a run holds the folder (a lock file in it) until it "
        "exits, and a second launch into it stops at once.",
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Allow writing into an --output_dir that already holds a finished run (never into one a live run holds).",
    )
    parser.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps."
    )
    parser.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Resume from a checkpoint: a name in --output_dir ('checkpoint-500'), a path, or 'latest' for the newest "
        "in --output_dir.",
    )

    # Validation.
    parser.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        help="Prompt of the validation images. Default: the target prompt.",
    )
    parser.add_argument(
        "--num_validation_images", type=int, default=4, help="Validation images per run (0 disables validation)."
    )
    parser.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Also validate every N optimizer steps (default: only at the end).",
    )
    parser.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=None,
        help="CFG scale of validation. Default: the model family's pipeline default (7.5 for SD 1.x/2.x, 5.0 for "
        "SDXL).",
    )
    parser.add_argument("--validation_num_inference_steps", type=int, default=25, help="Sampling steps of validation.")

    # Logging and Hub.
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        choices=["tensorboard", "wandb", "all", "none"],
        help="Where to log losses and validation images.",
    )
    parser.add_argument(
        "--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir."
    )
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the result to the Hugging Face Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repo. Default: the output folder name.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `hf auth login`).")


def validate_args(args):
    """Every error a user can cause with the flags alone, raised before any model is loaded."""
    token = args.placeholder_token
    if not token or re.search(r"\s", token):
        raise UserInputError(f"--placeholder_token {token!r} must be one word without spaces, e.g. '<my-cat>'.")
    if not args.class_name.strip():
        raise UserInputError("--class_name is empty: give the subject's class noun, e.g. 'cat'.")
    if token not in args.target_prompt:
        raise UserInputError(
            f"--target_prompt {args.target_prompt!r} does not contain the placeholder {token!r}: "
            f"write it where the subject goes, e.g. 'A sketch of {token} in Paris'."
        )
    if "{token}" not in args.personalization_prompt and token not in args.personalization_prompt:
        raise UserInputError(
            f"--personalization_prompt {args.personalization_prompt!r} must contain '{{token}}' or {token!r}."
        )
    if args.clean_prompt is not None and token in args.clean_prompt:
        raise UserInputError(
            f"--clean_prompt must describe the scene with the class noun, not {token!r}: "
            f"e.g. {default_clean_prompt(args.target_prompt, token, args.class_name)!r}."
        )
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        raise UserInputError("Give exactly one of --instance_data_dir and --dataset_name.")
    if args.instance_data_dir is not None and not Path(args.instance_data_dir).is_dir():
        raise UserInputError(f"--instance_data_dir {args.instance_data_dir!r} is not a folder.")
    require_package("datasets", "--dataset_name", args.dataset_name is not None)
    validate_training_args(args)


def validate_training_args(args):
    """Checks of the flags that both PALP scripts share; each error names the flag and the fix."""
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        raise UserInputError(f"--resolution {args.resolution} must be a positive multiple of 8 (e.g. 512).")
    for flag in (
        "max_train_steps",
        "rank",
        "num_vectors",
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
    ):
        if getattr(args, flag) <= 0:
            raise UserInputError(f"--{flag} must be a positive integer, got {getattr(args, flag)}.")
    for flag in ("guidance_scale_pretrained", "guidance_scale_personalized", "alignment_weight", "learning_rate"):
        if getattr(args, flag) < 0:
            raise UserInputError(f"--{flag} must not be negative, got {getattr(args, flag)}.")
    if args.alignment_warmup_steps < 0:
        raise UserInputError(f"--alignment_warmup_steps must not be negative, got {args.alignment_warmup_steps}.")
    if args.alignment_calibration_steps <= 0:
        raise UserInputError(
            f"--alignment_calibration_steps must be a positive integer, got {args.alignment_calibration_steps}."
        )
    if args.teacher_inversion and args.alignment_mode != "teacher":
        raise UserInputError(
            "--teacher_inversion trains the token for the identity-bearing teacher: it needs --alignment_mode "
            f"teacher, got {args.alignment_mode!r}."
        )
    if not 0.0 <= args.timestep_min_ratio <= args.timestep_max_ratio <= 1.0:
        raise UserInputError("--timestep_min_ratio and --timestep_max_ratio need 0 <= min <= max <= 1.")
    if args.timestep_min_ratio >= 1.0:
        raise UserInputError(
            "--timestep_min_ratio 1 leaves no timestep inside the schedule (t runs from 0 to T-1): use at most 0.98."
        )
    for flag in ("embedding_learning_rate", "lora_alpha"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UserInputError(f"--{flag} must not be negative, got {getattr(args, flag)}.")
    t2_min, t2_max = alignment_timestep_ratios(args)
    if not 0.0 <= t2_min <= t2_max <= 1.0:
        raise UserInputError(
            "--alignment_timestep_min_ratio and --alignment_timestep_max_ratio need 0 <= min <= max <= 1 "
            f"(got {t2_min} and {t2_max}; unset, they follow --timestep_min_ratio / --timestep_max_ratio)."
        )
    if args.alignment_timestep == "same" and (t2_min, t2_max) != (args.timestep_min_ratio, args.timestep_max_ratio):
        raise UserInputError(
            "--alignment_timestep same reuses t1 as t2, so a separate t2 range does not apply: drop "
            "--alignment_timestep_min_ratio / --alignment_timestep_max_ratio, or use --alignment_timestep independent."
        )
    if t2_min >= 1.0:
        raise UserInputError(
            "--alignment_timestep_min_ratio 1 leaves no timestep inside the schedule (t runs from 0 to T-1): use at "
            "most 0.98."
        )
    if args.validation_steps is not None and args.validation_steps <= 0:
        raise UserInputError("--validation_steps must be a positive integer.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit <= 0:
        raise UserInputError("--checkpoints_total_limit must be a positive integer.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise UserInputError(
            "--report_to wandb together with --hub_token would expose the token to wandb; "
            "log in with `hf auth login` instead of passing --hub_token."
        )
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise UserInputError(
                "--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers`, "
                "or drop the flag to use PyTorch's SDPA attention."
            )
    require_package("bitsandbytes", "--use_8bit_adam", args.use_8bit_adam)
    check_base_quantization(args.base_quantization)
    require_package("wandb", "--report_to wandb", args.report_to in ("wandb", "all"))
    output_dir = Path(args.output_dir)
    if (output_dir / LORA_NAME).exists() and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        raise UserInputError(
            f"--output_dir {args.output_dir!r} already holds a finished run ({LORA_NAME}); "
            "choose another folder or pass --overwrite_output_dir."
        )


def alignment_timestep_ratios(args):
    """The t2 range as fractions of T: its own flags where given, otherwise t1's."""
    low = args.timestep_min_ratio if args.alignment_timestep_min_ratio is None else args.alignment_timestep_min_ratio
    high = args.timestep_max_ratio if args.alignment_timestep_max_ratio is None else args.alignment_timestep_max_ratio
    return low, high


def base_quantization_config(mode, compute_dtype):
    """diffusers' ``BitsAndBytesConfig`` for --base_quantization, or None for 'none'. NF4 computes in the training
    dtype, as QLoRA does; bitsandbytes quantizes only the linear layers, so the convolutions and norms stay in it."""
    if mode == "none":
        return None
    from diffusers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def check_base_quantization(mode):
    """--base_quantization needs bitsandbytes and what diffusers' bitsandbytes quantizer asks of the machine (a GPU
    and recent enough versions): its own check, asked here rather than half-way through loading the models."""
    if mode == "none":
        return
    require_package("bitsandbytes", "--base_quantization", True)
    from diffusers.quantizers import DiffusersAutoQuantizer

    quantizer = DiffusersAutoQuantizer.from_config(base_quantization_config(mode, torch.float32))
    try:
        quantizer.validate_environment()
    except (RuntimeError, ImportError) as error:
        raise UserInputError(
            f"--base_quantization {mode}: {error} Drop the flag to train on the full-precision UNet."
        ) from None


def require_package(name, flag, needed):
    if not needed:
        return
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise UserInputError(f"{flag} needs the '{name}' package: `pip install {name}`.")


# ----------------------------------------------------------------------------------------------------------------------
# The PALP mathematics: pure functions of tensors, written once on a noise process (DDPM or rectified flow).
# ----------------------------------------------------------------------------------------------------------------------


def _per_sample(values, like):
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class NoiseProcess:
    """What PALP needs of a noise process: x_t = a_t · x0 + b_t · ε on a (signal, noise) pair (a_t, b_t), per sample.

    DDPM has (a_t, b_t) = (√ᾱ_t, √(1-ᾱ_t)); rectified flow has (1 - σ_t, σ_t). The PALP functions below are written
    in ε, the one parametrization both share: a subclass says how the model's output becomes ε̂ and x̂0, what the
    personalization loss trains it towards, the factor that balances L_align against that loss per timestep, and how
    timesteps are drawn. ``t`` is always the timestep the model is called with.

    The paper's rescale, for any pair: x̂0 = (x_t - b_t1 · ε̂) / a_t1, so ∂x̂0/∂ε̂ = -b_t1/a_t1 and the DDS gradient
    through x̂0 is -(b_t1/a_t1) · D · ∂ε̂/∂θ. Rescaling by a_t1/b_t1 leaves -D · ∂ε̂/∂θ, the gradient of
    -⟨sg(D), ε̂⟩, at every t1 (:func:`palp_alignment_loss`); ``x0_epsilon_gain`` is the b_t1/a_t1 that the rescale
    removes.
    """

    num_train_timesteps: int

    def coefficients(self, t, like):
        """(a_t, b_t), shaped to broadcast over ``like``'s samples, in its dtype."""
        raise NotImplementedError

    def add_noise(self, x0, noise, t):
        """x_t = a_t · x0 + b_t · ε."""
        a, b = self.coefficients(t, x0)
        return a * x0 + b * noise

    def predicted_original_sample(self, x_t, eps, t):
        """x̂0 = (x_t - b_t · ε̂) / a_t, the one-step clean estimate that goes with ε̂."""
        a, b = self.coefficients(t, x_t)
        return (x_t - b * eps) / a

    def epsilon(self, model_output, x_t, t):
        """ε̂ from what the model outputs."""
        raise NotImplementedError

    def original_sample(self, model_output, x_t, t):
        """x̂0 from what the model outputs."""
        return self.predicted_original_sample(x_t, self.epsilon(model_output, x_t, t), t)

    def target(self, x0, noise, t):
        """What the personalization loss trains the model's output towards."""
        raise NotImplementedError

    def personalization_loss(self, model_output, x0, noise, t):
        """L_pers: the plain mean squared error against :meth:`target`."""
        return F.mse_loss(model_output.float(), self.target(x0, noise, t).float())

    def noise_variance(self, t):
        """The variance of x_t's noise part, b_t² (1 - ᾱ_t for DDPM): w(t2) of --alignment_weighting."""
        raise NotImplementedError

    def alignment_balance(self, t1):
        """The per-sample factor on L_align that gives it, against L_pers, the balance it has on an ε-model.

        The paper's rescale makes the alignment push uniform across t1 *on ε̂*: there ∂L_pers/∂ε̂ = 2(ε̂ - ε)/N and
        ∂L_align/∂ε̂ = -w·D/N, a ratio that does not depend on t1. A model whose output o gives ε̂ with
        ∂ε̂/∂o = g_t (and ε̂ - ε = g_t · (o - target)) and whose loss weights ‖o - target‖² by ω_t has
        ∂L_pers/∂o = 2ω_t(ε̂ - ε)/(g_t·N) and ∂L_align/∂o = -w·g_t·D/N: the ratio is g_t²/ω_t times the ε-model's.
        The balance ω_t1/g_t1² restores it, which also keeps λ the ratio of the two pushes on the model's own output
        when D is normalised to the personalization gradient (--alignment_normalization personalization). It is
        taken at t1 because ε̂ and x̂0 belong to the personalization pass; t2 only shapes D. It applies with and
        without --rescale: it converts between parametrizations, the rescale is the ablation.
        """
        raise NotImplementedError

    def x0_epsilon_gain(self, t):
        """b_t / a_t = -∂x̂0/∂ε̂: the factor the paper's rescale removes, kept in with --no-rescale."""
        raise NotImplementedError

    def sample_timesteps(self, batch, bounds, generator):
        """``batch`` timesteps inside ``bounds`` (indices of the schedule, [t_min, t_max]), from ``generator``."""
        raise NotImplementedError

    def check_timestep_bounds(self, t_bounds, flag="--timestep_max_ratio"):
        """Raise a UserInputError naming ``flag`` when ``t_bounds`` reach a timestep where PALP divides by zero."""
        raise NotImplementedError


class DDPMProcess(NoiseProcess):
    """DDPM on the schedule ᾱ_t (``scheduler.alphas_cumprod``): x_t = √ᾱ_t · x0 + √(1-ᾱ_t) · ε, t an integer index.

    ``prediction_type`` is the scheduler's: 'epsilon' (the model outputs ε̂) or 'v_prediction' (SD 2.x 768 px:
    v̂ ≈ √ᾱ_t · ε - √(1-ᾱ_t) · x0, hence ε̂ = √ᾱ_t · v̂ + √(1-ᾱ_t) · x_t). t1 and t2 are drawn uniformly.
    """

    def __init__(self, alphas_cumprod, prediction_type="epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"Unsupported prediction_type {prediction_type!r}: PALP needs 'epsilon' or 'v_prediction'."
            )
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(alphas_cumprod)

    def coefficients(self, t, like):
        a = _per_sample(self.alphas_cumprod[t], like)
        return a.sqrt(), (1 - a).sqrt()

    def epsilon(self, model_output, x_t, t):
        if self.prediction_type == "epsilon":
            return model_output
        a, b = self.coefficients(t, x_t)
        return a * model_output + b * x_t

    def target(self, x0, noise, t):
        if self.prediction_type == "epsilon":
            return noise
        a, b = self.coefficients(t, x0)
        return a * noise - b * x0

    def noise_variance(self, t):
        return 1 - self.alphas_cumprod[t]

    def alignment_balance(self, t1):
        """1 for an ε-model (g = 1); 1/ᾱ_t1 for a v-model, whose g_t1 = √ᾱ_t1.

        Without it, the alignment push on v̂ would shrink with √ᾱ_t1 (13× smaller at t1 = 0.98T than at 0.02T on
        SD's schedule) while L_pers's grows with 1/√ᾱ_t1: relative to L_pers the alignment term would be 168× weaker
        at 0.98T than at 0.02T.
        """
        alpha_bar = self.alphas_cumprod[t1].float()
        if self.prediction_type == "v_prediction":
            return 1.0 / alpha_bar
        return torch.ones_like(alpha_bar)

    def x0_epsilon_gain(self, t):
        alpha_bar = self.alphas_cumprod[t]
        return ((1 - alpha_bar) / alpha_bar).sqrt()

    def sample_timesteps(self, batch, bounds, generator):
        t_min, t_max = bounds
        return torch.randint(t_min, t_max + 1, (batch,), generator=generator)

    def check_timestep_bounds(self, t_bounds, flag="--timestep_max_ratio"):
        """x̂0 divides by √ᾱ_t1 and the rescale by ᾱ_t1: a zero-terminal-SNR schedule (ᾱ_{T-1} = 0) must not be
        sampled at its last step."""
        t_min, t_max = t_bounds
        if self.alphas_cumprod[t_max] > 0:
            return
        usable = int(torch.nonzero(self.alphas_cumprod > 0).max())
        raise UserInputError(
            f"{flag} reaches t={t_max}, where this model's noise schedule has ᾱ_t = 0 (a zero-terminal-SNR "
            f"schedule): PALP's x̂0 would divide by zero. Use {flag} {usable / self.num_train_timesteps:.3f} "
            f"or lower (the default 0.98 is fine)."
            + ("" if self.alphas_cumprod[t_min] > 0 else f" Lower {flag.replace('max', 'min')} too.")
        )


class RectifiedFlowProcess(NoiseProcess):
    """Rectified flow (SD3): x_t = (1 - σ) · x0 + σ · ε with σ = t/T, and a model that outputs the velocity
    v̂ ≈ ε - x0. From one output: x̂0 = x_t - σ · v̂ and ε̂ = x_t + (1 - σ) · v̂.

    ``sigmas`` is the training table in ascending order (index i holds the i-th smallest σ, so the --timestep_*_ratio
    bounds keep their meaning: small t, little noise); the model is called with t = σ · T, as diffusers'
    FlowMatchEulerDiscreteScheduler holds its timesteps. L_pers is the flow-matching loss of diffusers' SD3
    DreamBooth-LoRA script, ω(σ) · ‖v̂ - (ε - x0)‖² with ω from ``compute_loss_weighting_for_sd3``, and t1 is drawn
    from that script's density (``compute_density_for_timestep_sampling``: logit-normal by default, over the
    scheduler's shifted σ). t2 follows the same rule, drawn independently over its own bounds (or t2 = t1 with
    --alignment_timestep same): the DDPM default carried over, an independent draw from t1's distribution, which puts
    the pre-trained model's D where the model was trained most. Where t2 should land for flow models is to be
    measured.

    What the paper's rescale becomes: the DDS gradient through x̂0 is D · ∂x̂0/∂θ = -σ1 · D · ∂v̂/∂θ, and since
    ∂ε̂/∂θ = (1 - σ1) · ∂v̂/∂θ this is -(σ1/(1 - σ1)) · D · ∂ε̂/∂θ. The rescale is (1 - σ1)/σ1 (the ε-model's
    √ᾱ/√(1-ᾱ) with (√ᾱ, √(1-ᾱ)) replaced by (1 - σ, σ)) and the surrogate stays -⟨sg(D), ε̂⟩, whose push on v̂ is
    (1 - σ1) · D. D stays in ε units: the guided ε-predictions at x̂_t2 differ by (1 - σ2)(v^α_pre - v^β_per), the
    x_t2 term cancelling.

    The balance against L_pers (see :meth:`NoiseProcess.alignment_balance`): ε̂ - ε = (1 - σ1)(v̂ - (ε - x0)), so
    g = 1 - σ1 and the balance is ω(σ1)/(1 - σ1)². Per element the two gradients on v̂ are then
    2ω(v̂ - v)/N = 2ω(ε̂ - ε)/((1 - σ1)N) and -w·ω·D/((1 - σ1)N): their ratio is the ε-model's, -w·D/(2(ε̂ - ε)), at
    every σ1, so λ means what it means for SD 1.x/2.x and SDXL. The cost: both pushes on v̂ grow as 1/(1 - σ1) where
    the ε-picture does (at σ1 = 0.98, 50×), which is why σ = 1 is refused and the t bounds stay in force.

    ``precondition_outputs`` is the SD3 script's flag of the same name (on by default there, and for SD3 here): the
    loss compares the preconditioned output x_t - σ · v̂ = x̂0 with x0, ω(σ) · ‖x̂0 - x0‖² = ω(σ) · σ² · ‖v̂ - v‖², the
    same target with the weight ω(σ) · σ² on ‖v̂ - v‖²; the balance follows the weight (ω σ² / (1 - σ)²).
    """

    def __init__(
        self,
        sigmas,
        weighting_scheme="logit_normal",
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        precondition_outputs=False,
    ):
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        self.num_train_timesteps = len(self.sigmas)
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs

    @classmethod
    def from_scheduler(cls, scheduler, **density):
        """The training table of a FlowMatchEulerDiscreteScheduler's config: σ = i/T for i = 1 … T, shifted by
        ``shift`` as σ' = shift·σ / (1 + (shift - 1)·σ), exactly as the scheduler builds it before set_timesteps."""
        config = scheduler.config
        if config.get("use_dynamic_shifting"):
            raise ValueError("A resolution-dependent shift (use_dynamic_shifting) has no fixed training table.")
        steps = config.num_train_timesteps
        sigmas = torch.linspace(1, steps, steps, dtype=torch.float32) / steps
        shift = config.get("shift", 1.0)
        return cls(shift * sigmas / (1 + (shift - 1) * sigmas), **density)

    def sigma(self, t):
        return t / self.num_train_timesteps

    def coefficients(self, t, like):
        sigma = _per_sample(self.sigma(t), like)
        return 1 - sigma, sigma

    def epsilon(self, model_output, x_t, t):
        a, _ = self.coefficients(t, x_t)
        return x_t + a * model_output

    def original_sample(self, model_output, x_t, t):
        _, b = self.coefficients(t, x_t)
        return x_t - b * model_output

    def target(self, x0, noise, t):
        return noise - x0

    def loss_weighting(self, t):
        """ω(σ) of diffusers' SD3 script (1 for its default logit-normal density)."""
        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigma(t).float())

    def output_weighting(self, t):
        """The weight of ‖v̂ - v‖² in L_pers: ω(σ), times σ² with preconditioned outputs (‖x̂0 - x0‖ = σ‖v̂ - v‖)."""
        weight = self.loss_weighting(t)
        return weight * self.sigma(t).float() ** 2 if self.precondition_outputs else weight

    def personalization_loss(self, model_output, x0, noise, t):
        weight = _per_sample(self.output_weighting(t), model_output).float()
        error = (model_output.float() - self.target(x0, noise, t).float()) ** 2
        return (weight * error).flatten(1).mean(dim=1).mean()

    def noise_variance(self, t):
        return self.sigma(t) ** 2

    def alignment_balance(self, t1):
        return self.output_weighting(t1) / (1 - self.sigma(t1).float()) ** 2

    def x0_epsilon_gain(self, t):
        sigma = self.sigma(t)
        return sigma / (1 - sigma)

    def sample_timesteps(self, batch, bounds, generator):
        """u from diffusers' density, then σ at index t_max - ⌊u·n⌋ of the n = t_max - t_min + 1 allowed ones: on
        the full table (0, T - 1) this is the SD3 script's draw, ``timesteps[⌊u·T⌋]`` of the descending schedule;
        narrower bounds squeeze the same density onto their range."""
        t_min, t_max = bounds
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme,
            batch,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        count = t_max - t_min + 1
        index = t_max - (u * count).long().clamp(0, count - 1)
        return self.sigmas[index] * self.num_train_timesteps

    def check_timestep_bounds(self, t_bounds, flag="--timestep_max_ratio"):
        """At σ = 1 x_t holds no signal: ε̂ = x_t carries no gradient and the balance divides by 1 - σ = 0, the flow
        counterpart of a zero-terminal-SNR schedule's last step."""
        t_min, t_max = t_bounds
        if self.sigmas[t_max] < 1:
            return
        usable = int(torch.nonzero(self.sigmas < 1).max())
        raise UserInputError(
            f"{flag} reaches t={t_max}, where σ = 1 (pure noise): PALP's balance would divide by 1 - σ = 0. Use "
            f"{flag} {usable / self.num_train_timesteps:.3f} or lower (the default 0.98 is fine)."
            + ("" if self.sigmas[t_min] < 1 else f" Lower {flag.replace('max', 'min')} too.")
        )


def classifier_free_guidance(eps_uncond, eps_cond, scale):
    """ε^s = ε(∅) + s · (ε(y) - ε(∅))."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def alignment_direction(mode, guided_pretrained, guided_personalized=None, noise=None):
    """The direction D that the alignment loss pushes ε̂ along (and x̂0 against).

    dds (PALP): D = ε^α_pre(x̂_t2, t2, y_c) - ε^β_per(x̂_t2, t2, y_P), the Delta Denoising Score.
    class_source: D = ε^α_pre(x̂_t2, t2, y_c) - ε^β_per(x̂_t2, t2, ỹ_P), the personalized (source) prediction given ỹ_P,
    y_P with the class phrase in place of the token. Write u = ε_per(y_P) - ε_per(ỹ_P), the personalized model's own
    identity direction at x̂_t2; since ε^β(y) = ε(∅) + β(ε(y) - ε(∅)), ε^β_per(y_P) = ε^β_per(ỹ_P) + β·u, so PALP's
    D is this D minus β·u. Descent on L_align moves ε̂ along +D and x̂0 along -D, so PALP's -β·u moves x̂0 along
    +u, from the subject towards a generic member of its class, at the personalized guidance scale and at every
    step: y_c names no subject, so nothing on the pre-trained side cancels it. Here that term is gone and D asks
    for the change from the class phrase's picture to the target prompt's (context), with the same two batched
    calls as DDS. Like class_delta, it need not vanish once the picture shows the target context.
    teacher: the same difference as DDS, with the pre-trained prediction given the learned token on the target prompt.
    (class_delta has a direction of its own: :func:`class_delta_direction`.)
    sds (ablation): D = ε^α_pre(x̂_t2, t2, y_c) - ε2, Score Distillation against the added noise.
    """
    if mode in ("dds", "class_source", "teacher"):
        return guided_pretrained - guided_personalized
    if mode == "sds":
        return guided_pretrained - noise
    raise ValueError(f"alignment mode {mode!r} has no direction")


def class_delta_direction(eps_clean, eps_class, scale):
    """D = ε^α_pre(x̂_t2, y_c) - ε^α_pre(x̂_t2, ỹ_P) = α · (ε_pre(y_c) - ε_pre(ỹ_P)), the class-cancelling D.

    ỹ_P is y_P with the token replaced by the class phrase ('a photo of a star'). PALP's D is dominated by
    α · (ε_pre(y_c) - ε_pre(∅)): the pre-trained model's whole picture of the clean prompt, which includes a generic
    member of the class, so it pulls the subject's colour and pattern towards the class average. Here both terms come
    from the same pre-trained model and name the same class, so what they share (∅, and the class the prompts
    describe alike) cancels, and ∅'s term drops out exactly: ε^α(y) = ε(∅) + α(ε(y) - ε(∅)), so the difference of two
    guided predictions with the same α and ∅ is α times the difference of the conditional ones. What is left is the
    change the pre-trained model makes between 'a photo of a star' and the target context ('a sketch of a star on a
    blue background'). Two forwards in one batched call, against four in two for DDS. Unlike DDS it does not vanish
    once the personalized model draws the target context, as SDS does not vanish: it keeps pushing along the context
    change, which is the risk to watch (over-saturation of the context's colours).
    """
    return scale * (eps_clean - eps_class)


def project_off_direction(direction, axis):
    """D without its component along ``axis``, per sample: D - ⟨D, u⟩/‖u‖² · u (two-sided; a zero axis keeps D).

    With u = ε_per(x̂_t2, y_P) - ε_per(x̂_t2, ỹ_P), the personalized model's own identity direction at x̂_t2 (what the
    token changes in its prediction against the plain class), D keeps only what changes the picture without adding
    or removing the subject's identity there. On ε̂ the gradient of L_align is -w·D, so the part of D along u is the
    part of the alignment push that moves x̂0 along or against the identity.
    """
    axis = axis.float()
    dims = tuple(range(1, axis.ndim))
    overlap = (direction.float() * axis).sum(dims, keepdim=True)
    size = axis.pow(2).sum(dims, keepdim=True)
    coefficient = torch.where(size > 0, overlap / size.clamp_min(torch.finfo(size.dtype).tiny), torch.zeros_like(size))
    return direction - coefficient * axis


def identity_region_weight(axis):
    """Per sample and latent position, 1 - |u(x)| / max_x |u(x)|, where |u(x)| is the RMS over channels of u at
    position x; shape [batch, 1, *spatial]. A zero axis weighs every position 1.

    With u = ε_per(x̂_t2, y_P) - ε_per(x̂_t2, ỹ_P), what the token changes in the personalized prediction against
    the plain class, |u(x)| is largest where the subject is drawn and near zero in the context, which the token
    does not change. D times this weight is D kept off the subject's region: the target context (background,
    companion, lighting) is pushed at full strength, while where the subject stands PALP's pull of x̂0 towards the
    pre-trained model's generic member of the class, ε^α_pre(y_c), fades with how much the token matters there.
    The identity projection removes one direction of the whole latent, along which that pull hardly lies; this
    removes the pull where it acts. Latents of every family here (UNet and SD3's transformer alike) are
    [batch, channels, height, width], so the weight is spatial in both.
    """
    size = axis.float().pow(2).mean(dim=1, keepdim=True).sqrt()
    peak = size.flatten(1).amax(dim=1).view(-1, *([1] * (size.ndim - 1)))
    return torch.where(peak > 0, 1 - size / peak.clamp_min(torch.finfo(peak.dtype).tiny), torch.ones_like(size))


def alignment_timestep_weight(process, t2, weighting):
    """w(t2): 1 ('uniform'), or the variance of x_t2's noise part ('one_minus_alpha_bar': 1 - ᾱ_t2 for DDPM, σ_t2²
    for rectified flow)."""
    noise_variance = process.noise_variance(t2)
    if weighting == "uniform":
        return torch.ones_like(noise_variance)
    if weighting == "one_minus_alpha_bar":
        return noise_variance
    raise ValueError(f"Unknown alignment weighting {weighting!r}")


def normalize_direction(direction, reference):
    """D rescaled per sample to the RMS of ``reference`` (the personalization gradient 2(ε̂ − ε) on ε̂).

    Both losses are means over the same elements, so per element their gradients on ε̂ compare as λ·D against
    2(ε̂ − ε). D's size grows with the guidance scales (α − β multiplies a term of the pre-trained model that does not
    cancel) and differs between models; after this rescale λ alone sets the ratio of the two pushes.
    """
    dims = tuple(range(1, direction.ndim))
    ratio = reference.float().pow(2).mean(dims, keepdim=True).sqrt() / direction.float().pow(2).mean(
        dims, keepdim=True
    ).sqrt().clamp_min(1e-12)
    return direction * ratio


def rms_per_sample(x):
    """The root mean square of each sample of ``x``, shape [batch]."""
    return x.float().flatten(1).pow(2).mean(dim=1).sqrt()


class DirectionCalibration:
    """--alignment_normalization calibrated (ours): D times one factor c = mean RMS(2(ε̂ − ε)) / mean RMS(D), both
    sizes averaged over the first ``calls`` micro-batches of the run and then held.

    'personalization' rescales each sample's D to the current residual ε̂ − ε. That residual shrinks as the LoRA
    memorises its photos, so the push fades as training goes on, and a near-zero D is blown up to the residual's
    size. Here the ratio of the two sizes is measured while the residual still has its starting size, then frozen:
    λ keeps the meaning 'personalization' gives it (the ratio of the two pushes on ε̂, scale-free, the same on any
    model and at any guidance scale) at the start of training; after that D keeps its own size per sample and over
    training, as in the paper, so a small D stays small. Up to the one factor it is the paper's unnormalised D.
    Until ``calls`` measurements are in, the factor is the ratio of the running means so far.

    ``reduce`` averages each measurement over processes (accelerate's ``reduce``), so that every rank holds the same
    factor and a checkpoint written by the main process resumes every rank.
    """

    def __init__(self, calls, reduce=None):
        self.calls = calls
        self.reduce = reduce
        self.count = 0
        self.reference_sum = 0.0
        self.direction_sum = 0.0

    def factor(self, direction, reference):
        if self.count < self.calls:
            sizes = torch.stack([rms_per_sample(reference).mean(), rms_per_sample(direction).mean()])
            if self.reduce is not None:
                sizes = self.reduce(sizes)
            self.reference_sum += sizes[0].item()
            self.direction_sum += sizes[1].item()
            self.count += 1
        return self.reference_sum / self.direction_sum if self.direction_sum > 0 else 0.0

    def state_dict(self):
        return {"count": self.count, "reference_sum": self.reference_sum, "direction_sum": self.direction_sum}

    def load_state_dict(self, state):
        self.count, self.reference_sum, self.direction_sum = (
            state["count"],
            state["reference_sum"],
            state["direction_sum"],
        )


def project_off_residual(direction, residual):
    """D without the part that asks ε̂ to move away from ε: per sample, where ⟨D, ε̂ − ε⟩ > 0, D's component along
    the personalization residual r = ε̂ − ε is removed (D − ⟨D, r⟩/‖r‖² · r); where it is ≤ 0 D is kept.

    The personalization gradient on ε̂ is 2r, so descent on L_pers moves ε̂ along −r and descent on L_align along +D.
    A positive ⟨D, r⟩ is the part of the alignment push that makes the model reproduce its own photos worse, which is
    what the personalization term is there to prevent: the one-sided gradient projection of PCGrad (Yu et al. 2020),
    per sample, on the one tensor both terms act on. What remains changes ε̂ only in directions the personalization
    gradient does not oppose to first order.
    """
    residual = residual.float()
    dims = tuple(range(1, residual.ndim))
    overlap = (direction.float() * residual).sum(dims, keepdim=True)
    size = residual.pow(2).sum(dims, keepdim=True).clamp_min(1e-12)
    return direction - overlap.clamp_min(0) / size * residual


def alignment_ramp(step, warmup_steps):
    """The factor on λ at optimizer step ``step`` (0-based): linear from 0 to 1 over ``warmup_steps``."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def palp_alignment_loss(eps_hat, direction, process, t1, weight, rescale=True):
    """L_align = -w(t2) · mean(sg(D) · ε̂), PALP's surrogate for the DDS gradient.

    The DDS gradient on the sample is D, applied through x̂0 = (x_t1 - b_t1 · ε̂) / a_t1:
        ∇_θ = D · ∂x̂0/∂θ = -(b_t1/a_t1) · D · ∂ε̂/∂θ       (DDPM: b/a = √(1-ᾱ_t1)/√ᾱ_t1; flow: σ1/(1 - σ1)).
    With the paper's rescale by a_t1/b_t1 every timestep gets an update of the same size and
    ∇_θ = -D · ∂ε̂/∂θ, the gradient of -⟨sg(D), ε̂⟩. Descent moves ε̂ along +D, hence x̂0 along -D: towards the
    pre-trained model's picture of the clean prompt, away from the personalized model's habit. Without the rescale
    the factor b_t1/a_t1 stays in. Only ε̂ carries a gradient: D is detached here whatever the caller passed.
    A model that does not output ε̂ itself (v-prediction, rectified flow) gets the process's balance at t1
    (:meth:`NoiseProcess.alignment_balance`).
    """
    eps_hat = eps_hat.float()
    scale = weight.float() * process.alignment_balance(t1)
    if not rescale:
        scale = scale * process.x0_epsilon_gain(t1).float()
    per_sample = (direction.detach().float() * eps_hat).flatten(1).mean(dim=1)
    return -(scale * per_sample).mean()


@dataclass
class AlignmentConfig:
    """PALP's alignment settings. The field defaults are the paper's method as written (D unnormalised, no warm-up);
    the command line's defaults, and where each comes from, are in --help."""

    mode: str = "dds"
    guidance_scale_pretrained: float = 15.0
    guidance_scale_personalized: float = 7.5
    weight: float = 1.0
    noise: str = "same"
    timestep: str = "independent"
    weighting: str = "uniform"
    rescale: bool = True
    normalization: str = "none"
    projection: str = "none"
    gradient: str = "all"
    teacher_inversion: bool = False
    warmup_steps: int = 0
    calibration_steps: int = 25

    @property
    def needs_class_prompt(self):
        """Whether the step needs ỹ_P, y_P with the class phrase in place of the token."""
        return self.mode in ("class_delta", "class_source") or self.projection in ("identity", "identity_region")

    @classmethod
    def from_args(cls, args):
        return cls(
            mode=args.alignment_mode,
            guidance_scale_pretrained=args.guidance_scale_pretrained,
            guidance_scale_personalized=args.guidance_scale_personalized,
            weight=args.alignment_weight,
            noise=args.alignment_noise,
            timestep=args.alignment_timestep,
            weighting=args.alignment_weighting,
            rescale=args.rescale,
            normalization=args.alignment_normalization,
            projection=args.alignment_projection,
            gradient=args.alignment_gradient,
            teacher_inversion=args.teacher_inversion,
            warmup_steps=args.alignment_warmup_steps,
            calibration_steps=args.alignment_calibration_steps,
        )


@contextlib.contextmanager
def lora_dropout_off(unet):
    """The gradient-free personalized pass must see the personalized model, not a random thinning of its LoRA:
    LoRA dropout (``--lora_dropout``) belongs to the training pass only. Only the dropout modules change mode, on the
    unwrapped module (DDP keeps no state about them), and they come back as they were."""
    dropouts = [m for name, m in unet.named_modules() if ".lora_dropout." in f".{name}." and m.training]
    for module in dropouts:
        module.eval()
    try:
        yield
    finally:
        for module in dropouts:
            module.train()


@contextlib.contextmanager
def lora_disabled(unet):
    """The pre-trained model is the same UNet with its LoRA switched off: no second copy in memory."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@dataclass
class Conditioning:
    """What a denoiser call is conditioned on, as one value, and the call itself: :meth:`denoise` feeds it to the
    model the way the family's pipeline does. This class is SD 1.x/2.x: text hidden states alone, passed to the UNet
    as ``encoder_hidden_states`` (a plain tensor stands for it). :class:`SDXLConditioning` adds SDXL's
    ``added_cond_kwargs``, :class:`SD3Conditioning` SD3's pooled projections and transformer call. The PALP functions
    only batch, detach and pass it on, so they do not know which model family they run on."""

    hidden: torch.Tensor

    @classmethod
    def of(cls, value):
        return value if isinstance(value, Conditioning) else cls(value)

    def tensors(self):
        """Its fields in order, None where a family leaves one out."""
        return [getattr(self, field.name) for field in fields(self)]

    def _map(self, fn):
        return type(self)(*(None if v is None else fn(v) for v in self.tensors()))

    def expand(self, batch):
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    def to(self, dtype):
        return self._map(lambda v: v.to(dtype))

    def detach(self):
        return self._map(torch.Tensor.detach)

    def for_alignment(self):
        """Gradient-free, as the alignment passes see a prompt."""
        return self.detach()

    def zeroed(self):
        """∅ as zeros, for a model that says ``force_zeros_for_empty_prompt``."""
        return self._map(torch.zeros_like)

    @staticmethod
    def cat(conds):
        columns = zip(*(c.tensors() for c in conds))
        return type(conds[0])(*(None if values[0] is None else torch.cat(values) for values in columns))

    def unet_kwargs(self):
        return {"encoder_hidden_states": self.hidden}

    def denoise(self, model, x_t, t):
        """The model's raw output at (x_t, t) under this conditioning."""
        return model(x_t, t, **self.unet_kwargs()).sample


@dataclass
class SDXLConditioning(Conditioning):
    """SDXL: the hidden states, the pooled text embedding and the micro-conditioning ``time_ids`` (diffusers'
    ``added_cond_kwargs``)."""

    text_embeds: torch.Tensor = None
    time_ids: torch.Tensor = None
    # The alignment passes see a prompt as inference does: SDXL's time_ids (res, res, 0, 0, res, res) rather than
    # the photo's real size and crop. None: the same as time_ids.
    alignment_time_ids: torch.Tensor = None

    def for_alignment(self):
        """Gradient-free, with the time_ids of inference."""
        cond = self.detach()
        if cond.alignment_time_ids is not None:
            cond.time_ids = cond.alignment_time_ids
        return cond

    def zeroed(self):
        """Zero text, the time_ids kept: what the pipeline's ∅ is under ``force_zeros_for_empty_prompt``."""
        cond = self._map(lambda v: v)
        cond.hidden, cond.text_embeds = torch.zeros_like(self.hidden), torch.zeros_like(self.text_embeds)
        return cond

    def unet_kwargs(self):
        added = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": added}


@dataclass
class SD3Conditioning(Conditioning):
    """SD3: the joint sequence [CLIP-L ‖ CLIP-G, zero-padded to T5's width ; T5] and the pooled projections (both
    CLIP encoders' pooled embeddings, concatenated), fed to the MMDiT as ``StableDiffusion3Pipeline`` feeds it: the
    timestep is the scheduler's, σ · 1000."""

    pooled: torch.Tensor = None

    def denoise(self, model, x_t, t):
        return model(
            hidden_states=x_t,
            timestep=t,
            encoder_hidden_states=self.hidden,
            pooled_projections=self.pooled,
            return_dict=False,
        )[0]


def batched_epsilon(unet, x_t, t, conds, process):
    """[ε(x_t, t, c) for c in conds], gradient-free, in one batched call. Each Conditioning has the batch of x_t."""
    n = len(conds)
    both = Conditioning.cat([Conditioning.of(c) for c in conds])
    x, ts = torch.cat([x_t] * n), torch.cat([t] * n)
    out = both.denoise(unet, x, ts)
    return process.epsilon(out.float(), x.float(), ts).chunk(n)


def guided_epsilon(unet, x_t, t, cond, uncond, scale, process):
    """ε^scale(x_t, t, cond), gradient-free. The conditional and unconditional passes run as one batched call;
    with scale 1 the unconditional pass is skipped (ε^1 = ε(cond)). ``cond`` and ``uncond`` are Conditionings
    (or hidden-state tensors); ``uncond`` has batch dimension 1. Guidance is affine and so is ε̂ in the model's
    output, so guiding ε̂ is guiding the output (v^s = v_∅ + s · (v_c - v_∅) for a velocity model)."""
    cond = Conditioning.of(cond)
    if scale == 1.0:
        out = cond.denoise(unet, x_t, t)
        return process.epsilon(out.float(), x_t.float(), t)
    uncond = Conditioning.of(uncond).to(cond.hidden.dtype).expand(x_t.shape[0])
    eps_cond, eps_uncond = batched_epsilon(unet, x_t, t, [cond, uncond], process)
    return classifier_free_guidance(eps_uncond, eps_cond, scale)


def palp_losses(
    unet,
    base_unet,
    latents,
    noise,
    t1,
    t2,
    noise2,
    cond_personal,
    cond_clean,
    uncond,
    process,
    config,
    cond_class=None,
    cond_teacher=None,
    calibration=None,
):
    """One PALP step's two loss terms; returns (L_pers, L_align). Only L_pers's forward pass carries a gradient.

    ``unet`` is the (possibly distributed) training denoiser (a UNet, or SD3's transformer), ``base_unet`` the same
    module unwrapped, whose LoRA can be switched off for the pre-trained prediction. ``cond_personal`` is y_P per sample (with gradient to [V]);
    ``cond_clean`` and ``uncond`` are fixed embeddings of y_c and ∅ with batch dimension 1. ``cond_class`` is ỹ_P
    per sample (y_P with the class phrase for the token), needed by ``class_delta``, ``class_source`` and the
    identity projection and region;
    ``cond_teacher`` the target prompt with the learned token, batch dimension 1, needed by ``teacher``. All are
    Conditionings (or hidden-state tensors), whatever the model family. ``process`` is the noise process
    (:class:`DDPMProcess` or :class:`RectifiedFlowProcess`): it noises, reads ε̂ and x̂0 off the model's output and
    supplies the personalization loss and the balance; everything here is written in ε. ``calibration`` is the
    run's :class:`DirectionCalibration`, needed by --alignment_normalization calibrated. With
    ``config.teacher_inversion`` L_pers also holds the same loss of the pre-trained model (LoRA off) on y_P.
    """
    cond_personal, cond_clean = Conditioning.of(cond_personal), Conditioning.of(cond_clean)
    x_t1 = process.add_noise(latents, noise, t1)
    model_output = cond_personal.denoise(unet, x_t1, t1)
    loss_pers = process.personalization_loss(model_output, latents, noise, t1)
    if config.teacher_inversion:
        # The teacher is the pre-trained model given the token. Textual inversion's loss on that model (the same
        # x_t1 and ε, LoRA off) makes the token carry the subject there too; its gradient reaches only the token,
        # since the frozen weights have none.
        with lora_disabled(base_unet):
            base_output = cond_personal.denoise(base_unet, x_t1, t1)
        loss_pers = loss_pers + process.personalization_loss(base_output, latents, noise, t1)
    if config.mode == "none" or config.weight == 0:
        return loss_pers, torch.zeros_like(loss_pers)

    # The alignment branch starts from the personalized model's one-step clean estimate x̂0 of this very forward
    # pass, re-noised under stop-gradient: x̂_t2 = a_t2 · sg(x̂0) + b_t2 · ε2. Everything in it is gradient-free.
    eps_hat = process.epsilon(model_output.float(), x_t1.float(), t1)
    with torch.no_grad():
        x0_hat = process.original_sample(model_output.float(), x_t1.float(), t1)
        x_t2 = process.add_noise(x0_hat, noise2.float(), t2).to(latents.dtype)
        batch = latents.shape[0]
        if config.mode == "class_delta":
            # Both terms from the pre-trained model (the same UNet, LoRA off), on [y_c, ỹ_P] in one batched call.
            with lora_disabled(base_unet):
                eps_clean, eps_class = batched_epsilon(
                    base_unet,
                    x_t2,
                    t2,
                    [cond_clean.expand(batch), Conditioning.of(cond_class).for_alignment()],
                    process,
                )
            direction = class_delta_direction(eps_clean, eps_class, config.guidance_scale_pretrained)
        else:
            # g_pre = ε^α of the pre-trained model (LoRA off) on [y_c, ∅], one batched call; the teacher sees the
            # target prompt with the learned token in place of y_c.
            cond_pre = Conditioning.of(cond_teacher).detach() if config.mode == "teacher" else cond_clean
            with lora_disabled(base_unet):
                g_pre = guided_epsilon(
                    base_unet,
                    x_t2,
                    t2,
                    cond_pre.expand(batch),
                    uncond,
                    config.guidance_scale_pretrained,
                    process,
                )
            g_per = None
            if config.mode in ("dds", "class_source", "teacher"):
                # g_per = ε^β of the personalized model on [y_P, ∅] (only y_P when β = 1), without LoRA dropout;
                # class_source gives it ỹ_P instead of y_P.
                source = cond_class if config.mode == "class_source" else cond_personal
                with lora_dropout_off(base_unet):
                    g_per = guided_epsilon(
                        base_unet,
                        x_t2,
                        t2,
                        Conditioning.of(source).for_alignment(),
                        uncond,
                        config.guidance_scale_personalized,
                        process,
                    )
            direction = alignment_direction(config.mode, g_pre, g_per, noise2.float())
        if config.projection in ("identity", "identity_region"):
            with lora_dropout_off(base_unet):
                eps_personal, eps_class = batched_epsilon(
                    base_unet,
                    x_t2,
                    t2,
                    [cond_personal.for_alignment(), Conditioning.of(cond_class).for_alignment()],
                    process,
                )
            if config.projection == "identity":
                direction = project_off_direction(direction, eps_personal - eps_class)
            else:
                direction = direction * identity_region_weight(eps_personal - eps_class)
        if config.projection == "residual":
            direction = project_off_residual(direction, eps_hat - noise.float())
        if config.normalization == "personalization":
            direction = normalize_direction(direction, 2 * (eps_hat - noise.float()))
        if config.normalization == "calibrated":
            direction = direction * calibration.factor(direction, 2 * (eps_hat - noise.float()))
    weight = alignment_timestep_weight(process, t2, config.weighting)
    loss_align = palp_alignment_loss(eps_hat, direction, process, t1, weight, config.rescale)
    return loss_pers, loss_align


def timestep_bounds(num_train_timesteps, min_ratio, max_ratio):
    """[t_min, t_max] of t1 and t2, both inside the schedule's indices 0 … T-1."""
    last = num_train_timesteps - 1
    t_min = min(int(round(min_ratio * num_train_timesteps)), last)
    t_max = min(int(round(max_ratio * num_train_timesteps)), last)
    return t_min, max(t_min, t_max)


def sample_step_noise(latent_shape, process, t_bounds, config, generator, t2_bounds=None):
    """ε, t1, t2 and ε2 for one step, all from the step's own generator (so a resumed run draws the same).
    ``t2_bounds`` (default: ``t_bounds``) is the alignment branch's own range. t1 and t2 are independent draws of the
    process's rule (uniform for DDPM, the SD3 density for rectified flow), each over its own range."""
    batch = latent_shape[0]
    noise = torch.randn(latent_shape, generator=generator)
    t1 = process.sample_timesteps(batch, t_bounds, generator)
    t2 = process.sample_timesteps(batch, t2_bounds or t_bounds, generator)
    noise2 = torch.randn(latent_shape, generator=generator)
    if config.timestep == "same":
        t2 = t1
    if config.noise == "same":
        noise2 = noise
    return noise, t1, t2, noise2


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and the placeholder token
# ----------------------------------------------------------------------------------------------------------------------


def format_prompt(template, token):
    return template.replace("{token}", token)


def class_phrase_prompt(prompt, tokens, class_names):
    """ỹ_P: a prompt with each placeholder token replaced by its class phrase ('a photo of <t>' → 'a photo of a
    cat'), as :func:`default_clean_prompt` writes y_c."""
    for token, class_name in zip(tokens, class_names):
        if token in prompt:
            prompt = default_clean_prompt(prompt, token, class_name)
    return prompt


def default_clean_prompt(target_prompt, token, class_name):
    """y_c: the target prompt with [V] replaced by 'a <class>' ('A sketch of <t> in Paris' → 'A sketch of a cat in
    Paris'); an article already in front of the token is kept ('a <t>' → 'a cat')."""
    article = "an" if class_name[:1].lower() in "aeiou" else "a"
    escaped = re.escape(token)
    prompt = re.sub(rf"\b(a|an|the|A|An|The) {escaped}", rf"\1 {class_name}", target_prompt)
    return prompt.replace(token, f"{article} {class_name}")


def vector_tokens(token, num_vectors):
    """The tokens of a placeholder's N embedding rows: '<t>', '<t>_1', …, '<t>_{N-1}', the names diffusers'
    ``load_textual_inversion`` gives the rows of a multi-vector embedding."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_placeholders(prompt, tokens, num_vectors):
    """The prompt with each placeholder '<t>' written as its N tokens '<t> <t>_1 … <t>_{N-1}', the text replacement
    diffusers' ``TextualInversionLoaderMixin.maybe_convert_prompt`` makes before tokenizing: training then encodes
    the ids a stock pipeline encodes at inference. With one vector the prompt is unchanged."""
    for token in tokens:
        prompt = prompt.replace(token, " ".join(vector_tokens(token, num_vectors)))
    return prompt


class PlaceholderEmbedding(torch.nn.Module):
    """The text encoder's token embedding with trainable rows for the new tokens only.

    The frozen matrix is never touched, so every other row stays bit-identical, and the optimizer holds state for
    the new rows alone (not for the whole 49k × 768 matrix).
    """

    def __init__(self, base, token_ids, init_rows):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.as_tensor(token_ids, dtype=torch.long), persistent=False)
        self.rows = torch.nn.Parameter(init_rows.detach().clone().float())

    def forward(self, input_ids):
        embeds = self.base(input_ids)
        match = input_ids.unsqueeze(-1) == self.token_ids  # [..., num_new]; no data-dependent branch (no GPU sync)
        rows = (match.to(self.rows.dtype) @ self.rows).to(embeds.dtype)
        return torch.where(match.any(-1, keepdim=True), rows, embeds)


def add_placeholder_tokens(tokenizer, text_encoder, tokens, class_names, num_vectors=1):
    """Add N tokens per subject (:func:`vector_tokens`), each row initialised from the mean embedding of its class
    noun; return the ids (subject by subject, its N rows together) and the PlaceholderEmbedding that now serves as
    the text encoder's input embedding."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        # "cat" is stored as "cat</w>": a word is known when it already encodes to a single token.
        if token in vocab or len(tokenizer.encode(token, add_special_tokens=False)) == 1:
            raise UserInputError(
                f"--placeholder_token {token!r} is already in the tokenizer's vocabulary: pick a new word, e.g. "
                f"'<my-{token.strip('<>')}>'."
            )
        for name in vector_tokens(token, num_vectors)[1:]:
            if name in vocab or len(tokenizer.encode(name, add_special_tokens=False)) == 1:
                raise UserInputError(
                    f"--placeholder_token {token!r} with --num_vectors {num_vectors} adds the tokens "
                    f"{vector_tokens(token, num_vectors)}, and {name!r} is already in the tokenizer's vocabulary: "
                    "pick another placeholder word."
                )
    names = [name for token in tokens for name in vector_tokens(token, num_vectors)]
    if tokenizer.add_tokens(names) != len(names):
        raise UserInputError(
            f"Could not add the placeholder tokens {names} to the tokenizer; use new, distinct words."
        )
    token_ids = tokenizer.convert_tokens_to_ids(names)
    for name, token_id in zip(names, token_ids):
        if tokenizer.encode(name, add_special_tokens=False) != [token_id]:
            raise UserInputError(
                f"--placeholder_token {name!r} does not tokenize to one token (the tokenizer lowercases its input): "
                "use a lowercase word such as '<my-cat>'."
            )
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    base = text_encoder.get_input_embeddings()
    init_rows = []
    for class_name in class_names:
        class_ids = tokenizer.encode(class_name, add_special_tokens=False)
        if not class_ids:
            raise UserInputError(f"--class_name {class_name!r} gives no tokens; use a noun such as 'cat'.")
        init_rows += [base.weight.data[class_ids].float().mean(dim=0)] * num_vectors
    init_rows = torch.stack(init_rows)
    with torch.no_grad():
        base.weight[token_ids] = init_rows.to(base.weight.dtype)
    base.requires_grad_(False)
    embedding = PlaceholderEmbedding(base, token_ids, init_rows)
    text_encoder.set_input_embeddings(embedding)
    return token_ids, embedding


def tokenize(tokenizer, prompts):
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(text_encoder, input_ids):
    return text_encoder(input_ids)[0]


class TextConditioner:
    """What differs between model families, in one place: how prompts become the denoiser's conditioning (whose
    :meth:`Conditioning.denoise` calls the denoiser), what ∅ is, which denoiser, schedule and noise process the model
    has, where its LoRA goes, which files hold the embedding and which pipeline loads the result. This class is SD
    1.x/2.x: one CLIP text encoder, its last hidden state, a UNet on a DDPM schedule; ∅ is the encoded empty prompt;
    the embedding file is ``{token: [N, dim]}`` (N = --num_vectors).

    It owns the tokenizers, the text encoders (``text_encoders`` may be replaced by their accelerate-prepared
    versions), one PlaceholderEmbedding per encoder, and the placeholder tokens with their number of vectors, which
    :meth:`tokenize` expands in every prompt.
    """

    pipeline_class = StableDiffusionPipeline
    tokenizer_folders = ("tokenizer",)
    encoder_folders = ("text_encoder",)
    encoder_classes = (CLIPTextModel,)
    embedding_keys = None  # None: the file's key is the token itself
    load_imports = ""  # what the model card's snippet imports besides diffusers
    guidance_scale = 7.5  # the pipeline's default, validation's unless --validation_guidance_scale says otherwise
    card_tags = ("stable-diffusion",)
    denoiser_class, denoiser_folder = UNet2DConditionModel, "unet"
    scheduler_class = DDPMScheduler  # the training schedule, read from the model's scheduler config
    lora_target_modules = LORA_TARGET_MODULES
    kohya_lora = True  # a kohya/WebUI copy of the LoRA is written too

    def configure(self, args):
        """Settings of the family's own flags, checked before any weights load (SD and SDXL have none)."""

    def call_kwargs(self):
        """Arguments of the family's pipeline call that training's conditioning depends on (validation and card)."""
        return {}

    def __init__(self, tokenizers, model_index=None):
        self.tokenizers = list(tokenizers)
        self.model_index = model_index or {}
        self.text_encoders, self.embeddings = [], []
        self.placeholder_tokens, self.num_vectors = [], 1
        self.resolution = None

    @classmethod
    def load_tokenizers(cls, path, model_index, **common):
        """The constructor's tokenizer arguments, loaded from the model folder."""
        return {
            "tokenizers": [
                CLIPTokenizer.from_pretrained(path, subfolder=folder, **common) for folder in cls.tokenizer_folders
            ]
        }

    @property
    def zero_uncond(self):
        return False

    def load_text_encoders(self, path, variant=None, **common):
        self.text_encoders = [
            model_class.from_pretrained(path, subfolder=folder, variant=variant, **common).requires_grad_(False)
            for model_class, folder in zip(self.encoder_classes, self.encoder_folders)
        ]
        return self.text_encoders

    @property
    def frozen_encoders(self):
        """Text encoders that get no placeholder token (none here; SD3's T5): frozen, never prepared by accelerate."""
        return []

    def noise_process(self, noise_scheduler, device=None):
        """The training noise process of the model's schedule."""
        return ddpm_process(noise_scheduler, device)

    def validation_scheduler(self, noise_scheduler):
        """The sampler of validation images: a fast multistep solver on the model's own schedule."""
        return DPMSolverMultistepScheduler.from_config(noise_scheduler.config)

    def add_placeholder_tokens(self, tokens, class_names, num_vectors=1):
        """[V]'s N tokens in every tokenizer and encoder, each row initialised from its own encoder's class-noun
        rows."""
        self.embeddings = [
            add_placeholder_tokens(tokenizer, encoder, tokens, class_names, num_vectors)[1]
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders)
        ]
        self.placeholder_tokens, self.num_vectors = list(tokens), num_vectors
        return self.embeddings

    @property
    def trainable_rows(self):
        return [embedding.rows for embedding in self.embeddings]

    def expand(self, prompts):
        """The prompts as the text encoders read them: each placeholder written as its N tokens."""
        return [expand_placeholders(prompt, self.placeholder_tokens, self.num_vectors) for prompt in prompts]

    def inference_prompt(self, prompt):
        """The prompt to hand the family's pipeline. SD and SDXL pipelines expand a multi-vector token themselves
        (``TextualInversionLoaderMixin.maybe_convert_prompt``) and must get it unexpanded, or they would expand it
        twice; SD3's pipeline has no textual-inversion support and gets it expanded."""
        if issubclass(self.pipeline_class, TextualInversionLoaderMixin):
            return prompt
        return self.expand([prompt])[0]

    def tokenize(self, prompts):
        return tuple(tokenize(tokenizer, self.expand(prompts)) for tokenizer in self.tokenizers)

    def image_geometry(self, original_size, crop, resolution):
        """What the family conditions on about a training photo besides its pixels: nothing here; SDXL's time_ids."""
        return None

    def encode(self, input_ids, image_geometry=None):
        """Conditioning of the token ids from :meth:`tokenize`; ``image_geometry`` stacks :meth:`image_geometry` of
        each photo (None for a family without one)."""
        return Conditioning(encode_prompts(self.text_encoders[0], input_ids[0]))

    def encode_fixed(self, clean_prompt, device, dtype):
        """y_c and ∅, encoded once (no learned token in them), batch dimension 1, with the time_ids of inference.
        ∅ is what the pipeline uses at inference without a negative prompt."""
        return self.encode_fixed_ids(self.tokenize([clean_prompt, ""]), device, dtype)

    def encode_fixed_ids(self, input_ids, device, dtype):
        """:meth:`encode_fixed` from the token ids of [y_c, ∅], one [2, 77] tensor per tokenizer."""
        with torch.no_grad():
            fixed = self.encode(tuple(i.to(device) for i in input_ids)).to(dtype).for_alignment()
        cond_clean, uncond = fixed._map(lambda v: v[:1]), fixed._map(lambda v: v[1:])
        return cond_clean, uncond.zeroed() if self.zero_uncond else uncond

    def keys_for(self, token):
        return list(self.embedding_keys or [token])

    def token_rows(self, index):
        """Where the N rows of the ``index``-th token sit in each PlaceholderEmbedding."""
        return slice(index * self.num_vectors, (index + 1) * self.num_vectors)

    def embedding_state(self, index, token):
        """The safetensors dict of one token: its N rows ([N, dim]) per text encoder."""
        return {
            key: embedding.rows[self.token_rows(index)].detach().float().cpu().contiguous()
            for key, embedding in zip(self.keys_for(token), self.embeddings)
        }

    def load_embedding_state(self, index, token, state):
        with torch.no_grad():
            for key, embedding in zip(self.keys_for(token), self.embeddings):
                saved = state[key].shape[0]
                if saved != self.num_vectors:
                    raise ValueError(
                        f"it holds {saved} vector(s) of {token!r}: it was trained with --num_vectors {saved}, not "
                        f"{self.num_vectors}"
                    )
                embedding.rows[self.token_rows(index)].copy_(state[key].to(embedding.rows.dtype))

    def pipeline(self, vae, unet, scheduler, text_encoders=None):
        """The family's inference pipeline around the training modules themselves (no copies)."""
        return self.pipeline_class(
            vae=vae,
            text_encoder=(text_encoders or self.text_encoders)[0],
            tokenizer=self.tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def load_code(self, repo, files_and_tokens):
        """The lines of the model card's snippet that load the embeddings into ``pipe``."""
        return "\n".join(
            f'pipe.load_textual_inversion("{repo}", weight_name="{file}")' for file, _ in files_and_tokens
        )


class SDXLTextConditioner(TextConditioner):
    """SDXL: the penultimate hidden states of both CLIP encoders, concatenated, the second encoder's pooled
    (projected) embedding and ``time_ids``, as ``StableDiffusionXLPipeline.encode_prompt`` builds them. ∅ is zeros
    when the model says ``force_zeros_for_empty_prompt``. The embedding file is ``{"clip_l": …, "clip_g": …}``."""

    pipeline_class = StableDiffusionXLPipeline
    tokenizer_folders = ("tokenizer", "tokenizer_2")
    encoder_folders = ("text_encoder", "text_encoder_2")
    encoder_classes = (CLIPTextModel, CLIPTextModelWithProjection)
    embedding_keys = ("clip_l", "clip_g")
    load_imports = "from huggingface_hub import hf_hub_download\nfrom safetensors.torch import load_file\n"
    guidance_scale = 5.0
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers", "template:sd-lora")

    @property
    def zero_uncond(self):
        return bool(self.model_index.get("force_zeros_for_empty_prompt", True))

    def encode(self, input_ids, image_geometry=None):
        hidden = []
        for encoder, ids in zip(self.text_encoders, input_ids):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        # The pooled embedding comes from the last encoder, pooled where its config says (end-of-text token, or
        # the argmax of the ids in old configs): the very forward pass the pipeline runs.
        pooled = out.text_embeds
        time_ids = None if image_geometry is None else image_geometry.to(pooled.device, pooled.dtype)
        alignment_time_ids = self.inference_time_ids(pooled.shape[0], pooled.device).to(pooled.dtype)
        return SDXLConditioning(torch.cat(hidden, dim=-1), pooled, time_ids, alignment_time_ids)

    def image_geometry(self, original_size, crop, resolution):
        """SDXL's micro-conditioning of a photo: original (height, width), crop (top, left) and target size."""
        return torch.tensor([[*original_size, *crop, resolution, resolution]], dtype=torch.float32)

    def inference_time_ids(self, batch, device):
        res = self.resolution
        return torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=device).expand(batch, 6)

    def pipeline(self, vae, unet, scheduler, text_encoders=None):
        encoders = text_encoders or self.text_encoders
        return self.pipeline_class(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=self.tokenizers[0],
            tokenizer_2=self.tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=self.zero_uncond,
            add_watermarker=False,
        )

    def load_code(self, repo, files_and_tokens):
        lines = []
        for file, token in files_and_tokens:
            lines.append(f'state = load_file(hf_hub_download("{repo}", "{file}"))  # a local folder: load_file(path)')
            lines.append(
                f'pipe.load_textual_inversion(state["clip_l"], token="{token}", text_encoder=pipe.text_encoder, '
                "tokenizer=pipe.tokenizer)"
            )
            lines.append(
                f'pipe.load_textual_inversion(state["clip_g"], token="{token}", text_encoder=pipe.text_encoder_2, '
                "tokenizer=pipe.tokenizer_2)"
            )
        return "\n".join(lines)


class SD3TextConditioner(TextConditioner):
    """Stable Diffusion 3 / 3.5, conditioned as ``StableDiffusion3Pipeline.encode_prompt`` conditions it: the
    penultimate hidden states of CLIP-L and CLIP-G, concatenated and zero-padded to T5's width, followed by T5's
    sequence (zeros when the model has no ``text_encoder_3``), and both CLIP pooled embeddings, concatenated. ∅ is the
    encoded empty prompt. The denoiser is the MMDiT transformer, trained on rectified flow.

    The placeholder token lives in both CLIP encoders; T5 stays frozen and without it, so T5 reads [V] as the plain
    text of the token (a few character pieces of "<my-cat>"): PALP learns [V] through CLIP alone. The embedding file
    is ``{"clip_l": …, "clip_g": …}``; the pipeline has no ``load_textual_inversion``, so the model card's snippet
    adds the token to both tokenizers and sets its rows.
    """

    pipeline_class = StableDiffusion3Pipeline
    tokenizer_folders = ("tokenizer", "tokenizer_2")
    encoder_folders = ("text_encoder", "text_encoder_2")
    encoder_classes = (CLIPTextModelWithProjection, CLIPTextModelWithProjection)
    embedding_keys = ("clip_l", "clip_g")
    load_imports = "from huggingface_hub import hf_hub_download\nfrom safetensors.torch import load_file\n"
    guidance_scale = 7.0
    card_tags = ("sd3", "sd3-diffusers", "template:sd-lora")
    denoiser_class, denoiser_folder = SD3Transformer2DModel, "transformer"
    scheduler_class = FlowMatchEulerDiscreteScheduler
    # The attention projections of both streams of every joint block: diffusers' SD3 DreamBooth-LoRA default.
    lora_target_modules = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ]
    kohya_lora = False  # no kohya naming for the MMDiT: the diffusers file is the one output
    max_sequence_length = 256  # T5's length in the pipeline's default call

    def __init__(self, tokenizers, model_index=None, t5_tokenizer=None):
        super().__init__(tokenizers, model_index)
        self.t5_tokenizer, self.t5 = t5_tokenizer, None
        self.joint_attention_dim = None
        self.t5_cache = {}  # T5's sequence per distinct prompt: T5 is frozen and never sees the token

    @classmethod
    def load_tokenizers(cls, path, model_index, **common):
        """Both CLIP tokenizers, and T5's when model_index.json lists a ``text_encoder_3``."""
        loaded = super().load_tokenizers(path, model_index, **common)
        if (model_index.get("text_encoder_3") or [None])[-1] is not None:
            loaded["t5_tokenizer"] = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", **common)
        return loaded

    def load_text_encoders(self, path, variant=None, **common):
        super().load_text_encoders(path, variant, **common)
        if self.t5_tokenizer is not None:
            self.t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", variant=variant, **common)
            self.t5.requires_grad_(False)
        self.joint_attention_dim = SD3Transformer2DModel.load_config(path, subfolder="transformer", **common)[
            "joint_attention_dim"
        ]
        return self.text_encoders

    @property
    def frozen_encoders(self):
        return [] if self.t5 is None else [self.t5]

    def noise_process(self, noise_scheduler, device=None):
        """Rectified flow on the scheduler's shifted σ table, with the personalization loss of diffusers' SD3
        DreamBooth-LoRA script (preconditioned outputs, logit-normal t)."""
        return RectifiedFlowProcess.from_scheduler(noise_scheduler, precondition_outputs=True)

    def validation_scheduler(self, noise_scheduler):
        """The pipeline's own Euler flow sampler."""
        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    def tokenize(self, prompts):
        """CLIP-L and CLIP-G ids (77 each), then T5's (padded to ``max_sequence_length``) when the model has T5. T5
        reads the expanded prompt too: the pipeline, which does not expand it, is given it expanded."""
        ids = super().tokenize(prompts)
        if self.t5_tokenizer is None:
            return ids
        t5_ids = self.t5_tokenizer(
            self.expand(prompts),
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return (*ids, t5_ids)

    def encode(self, input_ids, image_geometry=None):
        hidden, pooled = [], []
        for encoder, ids in zip(self.text_encoders, input_ids):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        if self.t5 is None:
            shape = (clip.shape[0], self.max_sequence_length, self.joint_attention_dim)
            t5 = torch.zeros(shape, device=clip.device, dtype=clip.dtype)
        else:
            t5 = self.t5_states(input_ids[2]).to(clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return SD3Conditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def t5_states(self, ids):
        """T5's last hidden states of each row of ``ids``, computed once per distinct prompt and reused: y_P's T5 part
        is the same every step, so the large frozen encoder runs once per prompt, not once per step."""
        rows = []
        for row in ids:
            key = tuple(row.tolist())
            if key not in self.t5_cache:
                with torch.no_grad():
                    self.t5_cache[key] = self.t5(row[None])[0]
            rows.append(self.t5_cache[key])
        return torch.cat(rows)

    def pipeline(self, vae, unet, scheduler, text_encoders=None):
        encoders = text_encoders or self.text_encoders
        return self.pipeline_class(
            transformer=unet,
            scheduler=scheduler,
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=self.tokenizers[0],
            text_encoder_2=encoders[1],
            tokenizer_2=self.tokenizers[1],
            text_encoder_3=self.t5,
            tokenizer_3=self.t5_tokenizer,
        )

    def configure(self, args):
        if args.max_sequence_length < 0 or (self.t5_tokenizer is not None and args.max_sequence_length == 0):
            raise UserInputError(
                f"--max_sequence_length must be {'at least 1 with a T5 encoder' if self.t5_tokenizer else 'at least 0'}"
                f", got {args.max_sequence_length}."
            )
        self.max_sequence_length = args.max_sequence_length

    def call_kwargs(self):
        return {"max_sequence_length": self.max_sequence_length}

    def load_code(self, repo, files_and_tokens):
        lines = ["# [V] goes into both CLIP tokenizers and encoders; T5 reads it as plain text, as in training."]
        if self.num_vectors > 1:
            lines.append(
                f"# {self.num_vectors} vectors per token: unlike the SD and SDXL pipelines this one does not expand a "
                "token into them in a prompt, so the prompt below writes them all."
            )
        for file, token in files_and_tokens:
            names = vector_tokens(token, self.num_vectors)
            if len(names) == 1:
                added, rows, value = f'"{token}"', "row", "state[key][0]"
            else:
                added, rows, value = "[" + ", ".join(f'"{name}"' for name in names) + "]", "rows", "state[key]"
            lines += [
                f'state = load_file(hf_hub_download("{repo}", "{file}"))  # a local folder: load_file(path)',
                'for key, encoder, tokenizer in [("clip_l", pipe.text_encoder, pipe.tokenizer),',
                '                                ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)]:',
                f"    tokenizer.add_tokens({added})",
                "    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)",
                f"    {rows} = tokenizer.convert_tokens_to_ids({added})",
                f"    encoder.get_input_embeddings().weight.data[{rows}] = {value}.to(encoder.device, encoder.dtype)",
            ]
        return "\n".join(lines)


# The model families PALP trains, keyed by model_index.json's _class_name.
TEXT_CONDITIONERS = {
    "StableDiffusionPipeline": TextConditioner,
    "StableDiffusionXLPipeline": SDXLTextConditioner,
    "StableDiffusion3Pipeline": SD3TextConditioner,
}
# Pipelines PALP recognises and cannot train, with the reason.
UNTRAINABLE_PIPELINES = {
    "FluxPipeline": (
        "FLUX.1 is guidance-distilled: the guidance scale is an input of the model, which has no unconditional "
        "prediction ε(∅), so PALP's classifier-free-guided predictions (α for the pre-trained model, β for the "
        "personalized one) cannot be formed"
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_image(path_or_image):
    """An RGB PIL image with EXIF orientation applied; transparency is composited on white."""
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_instance_images(folder, flag="--instance_data_dir"):
    """Every readable image in ``folder``; unreadable ones are skipped with a warning naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{flag} {str(folder)!r} is not a folder.")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(load_image(image))
        except Exception as error:  # PIL raises many types for broken files
            warnings.warn(f"Skipping {path}: not a readable image ({error}).", stacklevel=2)
    if not images:
        raise UserInputError(
            f"{flag} {str(folder)!r} holds no readable image ({', '.join(IMAGE_EXTENSIONS)}); add the subject photos."
        )
    return images


def saved_to_disk(path):
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, told apart
    by the files ``datasets.load_from_disk`` itself looks for."""
    path = Path(path)
    dataset_files = (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    return dataset_files or (path / "dataset_dict.json").is_file()


def load_dataset_images(dataset_name, config_name, image_column, cache_dir):
    """The images of --dataset_name's train split: a folder written by ``save_to_disk``, or anything
    ``datasets.load_dataset`` reads (a Hub id, a local image folder, data files)."""
    import datasets  # installed: validate_args checked it

    try:
        if saved_to_disk(dataset_name):
            if config_name is not None:
                raise UserInputError("--dataset_config_name does not apply to a folder written by save_to_disk.")
            dataset = datasets.load_from_disk(dataset_name)
            if isinstance(dataset, datasets.DatasetDict):
                if "train" not in dataset:
                    raise UserInputError(f"--dataset_name {dataset_name!r} has no 'train' split: {list(dataset)}.")
                dataset = dataset["train"]
        else:
            dataset = datasets.load_dataset(dataset_name, config_name, cache_dir=cache_dir, split="train")
    except FileNotFoundError as error:
        raise UserInputError(f"--dataset_name {dataset_name!r} was not found: {error}") from error
    if image_column not in dataset.column_names:
        raise UserInputError(
            f"--image_column {image_column!r} is not a column of {dataset_name!r} (columns: {dataset.column_names})."
        )
    images = [load_image(image) for image in dataset[image_column]]
    if not images:
        raise UserInputError(f"--dataset_name {dataset_name!r} has no images.")
    return images


def resize_shorter_side(image, resolution):
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def image_to_tensor(image, resolution, center_crop, random_flip, generator):
    """Resized (shorter side = resolution) PIL image → cropped, maybe flipped tensor in [-1, 1], shape [3, H, W],
    and the crop's top-left corner (top, left) in the resized image as it is finally seen (flip included)."""
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and torch.rand(1, generator=generator).item() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = width - left - resolution
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1), (top, left)


def step_generator(seed, rank, micro_step):
    """A generator for one micro-step, derived from (seed, rank, step) alone: a resumed run draws exactly what the
    uninterrupted run drew, with no random state to save."""
    state = np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def seed_global_rng(seed, rank, micro_step):
    """LoRA dropout draws from torch's global RNG, which no checkpoint holds: seeding it per micro-step from
    (seed, rank, step) makes a resumed --lora_dropout run draw the same masks as the uninterrupted one."""
    state = np.random.SeedSequence([seed, rank, micro_step, 1]).generate_state(1)[0]
    torch.manual_seed(int(state))


def batch_indices(num_images, batch_size, micro_step, seed, rank, world_size):
    """Image indices of one rank's micro-batch: epochs are seeded permutations of the images, consumed in order,
    the global batch split across ranks."""
    start = (micro_step * world_size + rank) * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_images)
        permutation = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(permutation[offset]))
    return indices


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def check_model_folder(path, folders=("model_index.json", "unet", "vae", "scheduler")):
    """A local --pretrained_model_name_or_path must look like a diffusers pipeline folder holding ``folders``."""
    folder = Path(path).expanduser()
    if not folder.exists():
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise UserInputError(
                f"--pretrained_model_name_or_path {path!r} is neither a local folder nor a Hub id like "
                "'stable-diffusion-v1-5/stable-diffusion-v1-5'."
            )
        return  # a Hub id; from_pretrained reports problems with it
    missing = [name for name in folders if not (folder / name).exists()]
    if missing:
        raise UserInputError(
            f"--pretrained_model_name_or_path {path!r} is not a Stable Diffusion folder in the diffusers layout "
            f"(missing: {', '.join(missing)})."
        )


def read_model_index(args):
    """model_index.json of --pretrained_model_name_or_path, from the local folder or the Hub."""
    path = args.pretrained_model_name_or_path
    try:
        if Path(path).expanduser().is_dir():
            file = Path(path).expanduser() / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, "model_index.json", revision=args.revision, cache_dir=args.cache_dir)
        return json.loads(Path(file).read_text())
    except Exception as error:  # network, auth, missing file and bad JSON all end the same way
        raise UserInputError(
            f"--pretrained_model_name_or_path {path!r}: could not read its model_index.json ({error}). Check the "
            "name, your network and `hf auth login`, or give a local folder."
        ) from error


def load_text_conditioner(args):
    """The model family of --pretrained_model_name_or_path, picked from its model_index.json, with its tokenizers.
    Anything but a Stable Diffusion 1.x/2.x or SDXL text-to-image base model fails here, naming what was found."""
    path = args.pretrained_model_name_or_path
    check_model_folder(path, ("model_index.json",))
    model_index = read_model_index(args)
    found = model_index.get("_class_name")
    if found in UNTRAINABLE_PIPELINES:
        raise UserInputError(
            f"--pretrained_model_name_or_path {path!r} is a {found} model, which PALP cannot train: "
            f"{UNTRAINABLE_PIPELINES[found]}. Give a model with classifier-free guidance: SD 1.x/2.x, SDXL or SD3/3.5."
        )
    family = TEXT_CONDITIONERS.get(found)
    if family is None:
        raise UserInputError(
            f"--pretrained_model_name_or_path {path!r} is a {found} model; PALP trains text-to-image base models: "
            f"{' or '.join(TEXT_CONDITIONERS)}. An SDXL refiner, an inpainting model or another pipeline cannot be "
            "personalized: give the base model (e.g. 'stabilityai/stable-diffusion-xl-base-1.0')."
        )
    clip = family.tokenizer_folders + family.encoder_folders
    absent = [name for name in clip if (model_index.get(name) or [None])[-1] is None]
    if absent:
        raise UserInputError(
            f"--pretrained_model_name_or_path {path!r}: its model_index.json has no {', '.join(absent)}. PALP learns "
            f"the placeholder token in the model's CLIP text encoders ({', '.join(family.encoder_folders)}), so a "
            f"{found} model needs them all: give the complete model folder."
        )
    check_model_folder(path, (family.denoiser_folder, "vae", "scheduler") + clip)
    check_ddpm_model(args, model_index)
    try:
        loaded = family.load_tokenizers(path, model_index, revision=args.revision, cache_dir=args.cache_dir)
    except OSError as error:
        raise UserInputError(
            f"--pretrained_model_name_or_path {path!r}: could not load its tokenizer ({error}). Check the name, "
            "your network and `hf auth login`, or give a local folder."
        ) from error
    conditioner = family(model_index=model_index, **loaded)
    conditioner.configure(args)
    return conditioner


def check_ddpm_model(args, model_index):
    """PALP's mathematics here is DDPM ε/v-prediction on the model's ᾱ_t schedule (or SD3's rectified flow), with
    latents scaled by the VAE's ``scaling_factor`` (and shifted by its ``shift_factor`` on SD3). An EDM-style model (Playground v2.5: an EDM scheduler and a VAE whose config normalises
    latents with ``latents_mean`` / ``latents_std``) would train silently with DDPM betas and unnormalised latents:
    it fails here, from its configs alone, naming what was found."""
    path, vae_path = args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    scheduler = read_config(DDPMScheduler, "--pretrained_model_name_or_path", path, subfolder="scheduler", **common)
    schedulers = {(model_index.get("scheduler") or [None])[-1], scheduler.get("_class_name")}
    found = [f"scheduler {name}" for name in sorted(filter(None, schedulers)) if "EDM" in name]
    if vae_path:
        vae = read_config(AutoencoderKL, "--pretrained_vae_model_name_or_path", vae_path, cache_dir=args.cache_dir)
    else:
        vae = read_config(AutoencoderKL, "--pretrained_model_name_or_path", path, subfolder="vae", **common)
    statistics = [key for key in ("latents_mean", "latents_std") if vae.get(key) is not None]
    if statistics:
        where = f"--pretrained_vae_model_name_or_path {vae_path!r}" if vae_path else "its VAE"
        found.append(f"{' and '.join(statistics)} in the config of {where}")
    if scheduler.get("use_dynamic_shifting"):
        raise UserInputError(
            f"--pretrained_model_name_or_path {path!r}: its scheduler shifts σ by resolution (use_dynamic_shifting), "
            "so its noise levels have no fixed training table; give a model whose scheduler has a fixed `shift` "
            "(SD3 and SD3.5 do)."
        )
    if found:
        raise UserInputError(
            f"--pretrained_model_name_or_path {path!r}: an EDM-style model ({'; '.join(found)}), as Playground v2.5 "
            "is. PALP's mathematics here is DDPM ε/v-prediction on the model's ᾱ_t schedule with latents scaled by "
            "the VAE's scaling_factor alone, so it would train this model with the wrong noise schedule and "
            "unnormalised latents: give a DDPM-trained base model (SD 1.x/2.x or SDXL) or a rectified-flow one (SD3, "
            "SD3.5) and a VAE without latents statistics."
        )


def ddpm_process(noise_scheduler, device=None):
    """The DDPM noise process of a DDPMScheduler: its ᾱ_t (as float32, on ``device``) and its prediction type."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    return DDPMProcess(alphas_cumprod, noise_scheduler.config.prediction_type)


def read_config(model_class, flag, path, subfolder=None, **kwargs):
    """One component's config, without its weights; a missing or broken one fails naming the flag."""
    try:
        return model_class.load_config(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as error:
        raise UserInputError(f"{flag} {path!r}: could not read its {subfolder or 'VAE'} config ({error}).") from error


def load_models(args, conditioner, weight_dtype=torch.float32, device="cpu"):
    """Text encoders (into the conditioner), VAE, the denoiser (UNet or SD3's transformer) and the training noise
    schedule; all frozen. With --base_quantization the denoiser is quantized as it loads, straight onto ``device``, in
    ``weight_dtype``."""
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    path = args.pretrained_model_name_or_path
    noise_scheduler = conditioner.scheduler_class.from_pretrained(path, subfolder="scheduler", **common)
    conditioner.load_text_encoders(path, variant=args.variant, **common)
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)
    quantization_config = base_quantization_config(args.base_quantization, weight_dtype)
    if quantization_config is not None:
        # A quantized model cannot be cast or moved after loading: it is placed and typed here, once.
        common.update(quantization_config=quantization_config, torch_dtype=weight_dtype, device_map={"": device})
    folder = conditioner.denoiser_folder
    unet = conditioner.denoiser_class.from_pretrained(path, subfolder=folder, variant=args.variant, **common)
    if unet.config.in_channels != vae.config.latent_channels:
        raise UserInputError(
            f"--pretrained_model_name_or_path {path!r}: its {folder} takes {unet.config.in_channels} input channels, "
            f"its VAE gives {vae.config.latent_channels} (an inpainting or image-conditioned UNet?). PALP trains "
            "text-to-image base models: give one."
        )
    for model in (vae, unet):
        model.requires_grad_(False)
    return vae, unet, noise_scheduler


def native_resolution(unet, vae):
    """The size the model was trained at: UNet sample_size × VAE scale factor (512, 768 or 1024)."""
    return unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(resolution, unet, vae):
    """A transformer cuts the latents into patch_size × patch_size patches (SD3: 2, so images in multiples of 16
    pixels); a UNet takes any latent size, so the multiple of 8 that --resolution already has is enough there."""
    multiple = 2 ** (len(vae.config.block_out_channels) - 1) * (unet.config.get("patch_size") or 1)
    if resolution % multiple:
        raise UserInputError(
            f"--resolution {resolution} must be a multiple of {multiple} for this model (VAE scale factor × the "
            f"transformer's patch size), e.g. {resolution - resolution % multiple + multiple}."
        )


def add_lora(unet, rank, alpha, dropout, target_modules=LORA_TARGET_MODULES):
    """LoRA on the attention projections: a UNet's self- and cross-attention (to_q, to_k, to_v, to_out.0), as in the
    paper; SD3's joint attention, both streams (``SD3TextConditioner.lora_target_modules``)."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )
    unet.add_adapter(config)
    return config


def resolved_lora_alpha(args):
    """--lora_alpha, or --rank when it is left out; 0 is kept (it switches the LoRA's effect off)."""
    return args.rank if args.lora_alpha is None else args.lora_alpha


def resolved_validation_guidance_scale(args, conditioner):
    """--validation_guidance_scale, or the model family's pipeline default."""
    if args.validation_guidance_scale is not None:
        return args.validation_guidance_scale
    return conditioner.guidance_scale


def weight_dtype_for(mixed_precision):
    # Keyed on accelerator.mixed_precision, so a precision chosen with `accelerate config` counts too.
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def build_optimizer(args, lora_params, embedding_params, num_processes):
    scale = args.train_batch_size * args.gradient_accumulation_steps * num_processes if args.scale_lr else 1
    lr = args.learning_rate * scale
    # 0 is a real choice (a frozen token: the LoRA-only baseline), so only None falls back to --learning_rate.
    embedding_lr = args.learning_rate if args.embedding_learning_rate is None else args.embedding_learning_rate
    embedding_lr = embedding_lr * scale
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        [{"params": lora_params, "lr": lr}, {"params": embedding_params, "lr": embedding_lr}],
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Saving: LoRA (diffusers and kohya formats), embeddings, checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def lora_state_dict(unet):
    """The UNet's LoRA in PEFT naming (``...to_q.lora_A.weight``), as fp32 tensors on the CPU."""
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def fold_lora_scale(peft_state, rank, alpha):
    """The LoRA's scale alpha/rank multiplied into its up-weights (lora_B): with alpha = rank recorded, every loader
    applies the same ΔW = (alpha/rank)·B·A, including those that ignore the file's metadata and assume alpha = rank
    (older diffusers, ComfyUI and WebUI reading the diffusers file)."""
    scale = alpha / rank
    return {k: (v * scale if ".lora_B." in k else v).contiguous() for k, v in peft_state.items()}


def save_lora(
    output_dir,
    unet,
    lora_config,
    kohya=True,
    fold_scale=True,
    pipeline_class=StableDiffusionPipeline,
    target_modules=LORA_TARGET_MODULES,
):
    """``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights`` and, optionally, a kohya/WebUI copy. The
    LoRA goes under the pipeline's denoiser name: ``unet`` (SD, SDXL) or ``transformer`` (SD3).

    Outputs carry the scale folded into the up-weights (alpha = rank in the metadata and the kohya ``.alpha``
    entries); checkpoints keep the raw weights and the true alpha (``fold_scale=False``), so a resume is bit-exact.
    """
    peft_state = lora_state_dict(unet)
    alpha = lora_config.lora_alpha
    if fold_scale:
        peft_state, alpha = fold_lora_scale(peft_state, lora_config.r, lora_config.lora_alpha), lora_config.r
    metadata = {"r": lora_config.r, "lora_alpha": alpha, "target_modules": target_modules}
    denoiser = getattr(pipeline_class, "unet_name", None) or pipeline_class.transformer_name
    # As diffusers' own LoRA scripts write them, and so as each loader reads them: a UNet's LoRA in diffusers naming
    # (``lora.down``/``lora.up``), a transformer's in PEFT naming (``lora_A``/``lora_B``).
    layers = convert_state_dict_to_diffusers(peft_state) if denoiser == "unet" else peft_state
    pipeline_class.save_lora_weights(
        output_dir,
        weight_name=LORA_NAME,
        **{f"{denoiser}_lora_layers": layers, f"{denoiser}_lora_adapter_metadata": metadata},
    )
    if kohya:
        kohya_state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
        kohya_state = {
            k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in kohya_state.items()
        }
        save_file(kohya_state, os.path.join(output_dir, KOHYA_LORA_NAME))


def load_lora(unet, folder):
    """Load a checkpoint's LoRA (raw weights, saved by :func:`save_lora` with ``fold_scale=False``) into the
    denoiser's existing adapter, whose alpha is the run's own. Keys start with the denoiser's name ("unet.",
    "transformer."), which goes."""
    state = load_file(os.path.join(folder, LORA_NAME))
    state = convert_unet_state_dict_to_peft({k.partition(".")[2]: v for k, v in state.items()})
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA keys that do not fit this UNet: {unexpected[:3]}")


def embedding_file_name(token, single=True):
    if single:
        return EMBEDDINGS_NAME
    slug = re.sub(r"[^A-Za-z0-9_-]+", "", token) or "token"
    return f"learned_embeds_{slug}.safetensors"


def save_embeddings(output_dir, tokens, conditioner):
    """One safetensors file per token in the family's format, N = --num_vectors rows each: ``{token: [N, dim]}``
    (SD 1.x/2.x), or ``{"clip_l": [N, 768], "clip_g": [N, 1280]}`` (SDXL, SD3), the forms
    ``pipe.load_textual_inversion`` loads (it adds the tokens <t>_1 … of a multi-vector embedding itself)."""
    paths = []
    for index, token in enumerate(tokens):
        path = os.path.join(output_dir, embedding_file_name(token, single=len(tokens) == 1))
        # The token goes into the metadata too: SDXL's {"clip_l", "clip_g"} keys do not name it.
        save_file(conditioner.embedding_state(index, token), path, metadata={"placeholder_token": token})
        paths.append(path)
    return paths


def load_embeddings(folder, tokens, conditioner):
    for index, token in enumerate(tokens):
        state = load_file(os.path.join(folder, embedding_file_name(token, single=len(tokens) == 1)))
        conditioner.load_embedding_state(index, token, state)


def save_optimizer(folder, optimizer):
    """Optimizer state as safetensors (tensors) + JSON (everything else): no pickle in a checkpoint.

    A parameter's state may nest dicts (bitsandbytes' 8-bit AdamW keeps its quantization maps and absmax blocks in
    one): nested keys are joined with dots. Tensors are cloned because bitsandbytes shares one quantization map among
    all parameters, and safetensors refuses tensors that share memory.
    """

    def flatten(prefix, values):
        for key, value in values.items():
            if isinstance(value, dict):
                yield from flatten(f"{prefix}.{key}", value)
            else:
                yield f"{prefix}.{key}", value

    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in flatten(param_id, param_state):
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().clone().contiguous()
            else:
                scalars[name] = value
    save_file(tensors, os.path.join(folder, OPTIMIZER_TENSORS_NAME))
    return {"param_groups": state_dict["param_groups"], "scalars": scalars}


def load_optimizer(folder, optimizer, saved):
    state = {}
    for name, value in list(load_file(os.path.join(folder, OPTIMIZER_TENSORS_NAME)).items()) + list(
        saved["scalars"].items()
    ):
        param_id, *keys = name.split(".")
        node = state.setdefault(int(param_id), {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def checkpoint_step(path):
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir):
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    found = [p for p in found if (p / CHECKPOINT_STATE_NAME).exists()]  # complete ones only
    return sorted(found, key=checkpoint_step)


def save_checkpoint(
    output_dir,
    step,
    unet,
    lora_config,
    tokens,
    conditioner,
    optimizer,
    lr_scheduler,
    scaler,
    seed,
    total_limit=None,
    calibration=None,
):
    """Write ``checkpoint-<step>`` atomically: into a temporary folder, renamed when complete."""
    existing = list_checkpoints(output_dir)
    if total_limit is not None and len(existing) >= total_limit:
        for old in existing[: len(existing) - total_limit + 1]:
            shutil.rmtree(old)
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora(
        tmp,
        unet,
        lora_config,
        kohya=False,
        fold_scale=False,
        pipeline_class=conditioner.pipeline_class,
        target_modules=conditioner.lora_target_modules,
    )
    save_embeddings(tmp, tokens, conditioner)
    state = {
        "global_step": step,
        "seed": seed,
        "placeholder_tokens": list(tokens),
        "optimizer": save_optimizer(tmp, optimizer),
        "lr_scheduler": lr_scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "alignment_calibration": calibration.state_dict() if calibration is not None else None,
    }
    (tmp / CHECKPOINT_STATE_NAME).write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def resolve_checkpoint(output_dir, resume_from_checkpoint):
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    # A bare name ('checkpoint-500') lives in --output_dir, as in diffusers' scripts; a path is taken as given.
    path = Path(resume_from_checkpoint)
    if len(path.parts) == 1 and (Path(output_dir) / path).is_dir():
        path = Path(output_dir) / path
    if not path.is_dir():
        raise UserInputError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder (neither a path nor a "
            f"folder of --output_dir {str(output_dir)!r}); 'latest' picks the newest one there."
        )
    return path


def read_checkpoint_state(path):
    try:
        return json.loads((Path(path) / CHECKPOINT_STATE_NAME).read_text())
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Checkpoint {str(path)!r} is damaged or incomplete ({error}). "
            "Delete it, or pass another folder to --resume_from_checkpoint."
        ) from error


def load_checkpoint(path, unet, tokens, conditioner, optimizer, lr_scheduler, scaler):
    """Restore LoRA, token rows, optimizer, schedule and step; return the saved state (step, seed)."""
    state = read_checkpoint_state(path)
    try:
        if state["placeholder_tokens"] != list(tokens):
            raise ValueError(f"it was trained for tokens {state['placeholder_tokens']}, not {list(tokens)}")
        load_lora(unet, path)
        load_embeddings(path, tokens, conditioner)
        load_optimizer(path, optimizer, state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
    except Exception as error:
        raise UserInputError(
            f"Checkpoint {str(path)!r} is damaged or incomplete ({type(error).__name__}: {error}). "
            "Delete it, or pass another folder to --resume_from_checkpoint."
        ) from error
    return state


# ----------------------------------------------------------------------------------------------------------------------
# Validation, model card, Hub
# ----------------------------------------------------------------------------------------------------------------------


def generate_images(
    pipeline,
    prompt,
    num_images,
    resolution,
    guidance_scale,
    num_inference_steps,
    seed,
    device,
    autocast,
    call_kwargs=None,
):
    """Sample with a pipeline around the training modules themselves (no copy, no dtype cast of shared weights):
    denoise under the training's ``autocast``, decode outside it (:func:`decode_latents`). ``call_kwargs``: the
    family's own pipeline arguments (:meth:`TextConditioner.call_kwargs`)."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        with autocast:
            latents = [
                pipeline(
                    prompt,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=generator,
                    output_type="latent",
                    **(call_kwargs or {}),
                ).images
                for _ in range(num_images)
            ]
        decoded = [decode_latents(pipeline.vae, x) for x in latents]
    return [image for x in decoded for image in pipeline.image_processor.postprocess(x)]


def decode_latents(vae, latents):
    """The pipeline's last step, outside autocast and in the VAE's own dtype: under fp16 autocast even an fp32 VAE
    convolves in fp16, and the SDXL VAE overflows there (black or NaN images). A VAE whose config says
    ``force_upcast`` is already in fp32 here (``prepare_models``), the dtype SDXL's pipeline decodes it in.
    Returns images in [-1, 1]."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.autocast(latents.device.type, enabled=False):
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]


def log_validation(accelerator, images, prompt, step, folder, name):
    """Save images under ``folder`` and log them to the trackers."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = os.path.join(folder, f"{name}_{index}.png")
        image.save(path)
        paths.append(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(i, caption=f"{index}: {prompt}") for index, i in enumerate(images)]})
    return paths


def public_config(args, **resolved):
    """The run's settings for training_config.json and the trackers; the hub token never leaves the process."""
    config = {k: v for k, v in vars(args).items() if k != "hub_token"}
    config.update(resolved)
    return config


def hub_base_model(name_or_path):
    """The Hub id of the base model, or None: the card's ``base_model`` must be a repo id, never a local path (the Hub
    rejects the upload otherwise). A local folder gives the id it records: a Hub-cache snapshot
    (``…/models--owner--name/snapshots/…``) or a ``_name_or_path`` in its configs."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    def repo_id(text):
        if not isinstance(text, str) or text.count("/") != 1 or Path(text).expanduser().exists():
            return None
        try:
            validate_repo_id(text)
        except HFValidationError:
            return None
        return text

    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        return repo_id(name_or_path)
    for part in folder.resolve().parts:
        match = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if match and repo_id(f"{match[1]}/{match[2]}"):
            return f"{match[1]}/{match[2]}"
    for name in ("model_index.json", "unet/config.json", "transformer/config.json", "text_encoder/config.json"):
        try:
            recorded = json.loads((folder / name).read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if repo_id(recorded):
            return recorded
    return None


def card_metadata(base_model, instance_prompt, family_tags):
    """The model card's YAML header, written by huggingface_hub's own card classes so the Hub accepts it;
    ``family_tags`` are the model family's (``TextConditioner.card_tags``), as diffusers' DreamBooth-LoRA scripts
    tag their cards."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        license="other",
        tags=["text-to-image", "diffusers", "lora", "textual-inversion", "palp", *family_tags],
        instance_prompt=instance_prompt,
    )
    return f"---\n{data.to_yaml()}\n---"


def card_vae(config, base):
    """The VAE that encoded the training photos, as the card names it: --pretrained_vae_model_name_or_path (its Hub
    id, or a local folder's name) or the base model's own."""
    vae = config.get("pretrained_vae_model_name_or_path")
    if not vae:
        return f"the base model's (`{base}`)"
    return f"`{hub_base_model(vae) or Path(vae).name}` (`--pretrained_vae_model_name_or_path`)"


def webui_usage(target_prompt, tokens, single):
    """How to write each token in AUTOMATIC1111 and ComfyUI: both name an embedding after its file, not after the
    token stored inside, so the trigger word there is the file's name."""
    names = {token: Path(embedding_file_name(token, single)).stem for token in tokens}
    a1111, comfy = target_prompt, target_prompt
    for token, name in names.items():
        a1111, comfy = a1111.replace(token, name), comfy.replace(token, f"embedding:{name}")
    files = ", ".join(f"`{name}.safetensors` for `{token}`" for token, name in names.items())
    return f"""## Use it in AUTOMATIC1111 / ComfyUI

Both name a textual-inversion embedding after its **file**, so the word to type is the file's name, not the
token: {files}.

- AUTOMATIC1111: copy `{KOHYA_LORA_NAME}` to `models/Lora/` and the embedding file(s) to `embeddings/`, then prompt
  `{a1111} <lora:{Path(KOHYA_LORA_NAME).stem}:1>`.
- ComfyUI: copy `{KOHYA_LORA_NAME}` to `models/loras/` (load it with a LoraLoader node) and the embedding file(s)
  to `models/embeddings/`, then prompt `{comfy}`.

Renaming an embedding file renames its trigger word in both."""


def shareable_config(config):
    """training_config.json as uploaded: a local path becomes its last component (the folder name), so nothing of
    the training machine's file system is published; the base model becomes its Hub id where one is known."""

    def share(value):
        if isinstance(value, dict):
            return {k: share(v) for k, v in value.items()}
        if isinstance(value, list):
            return [share(v) for v in value]
        if isinstance(value, str) and value and (os.path.isabs(value) or os.path.exists(value)):
            return Path(value).name
        return value

    shared = share(config)
    base = config.get("pretrained_model_name_or_path")
    if base is not None:
        shared["pretrained_model_name_or_path"] = hub_base_model(base) or share(base)
    return shared


def vectors_note(token, num_vectors):
    """What the model card adds about a multi-vector token (nothing for one vector)."""
    if num_vectors == 1:
        return ""
    return f", {num_vectors} embedding vectors (`{' '.join(vector_tokens(token, num_vectors))}`)"


def model_card(config, image_paths, output_dir, conditioner):
    """README.md for the output folder / Hub repo; its snippet loads the result into the model family's pipeline."""
    token = config["placeholder_token"]
    repo = "path/or/repo-of-this-folder"
    pipeline_name = conditioner.pipeline_class.__name__
    images = "\n".join(f"![sample]({os.path.relpath(p, output_dir)})" for p in image_paths)
    settings = "\n".join(
        f"| `{key}` | `{config[key]}` |"
        for key in (
            "alignment_mode",
            "guidance_scale_pretrained",
            "guidance_scale_personalized",
            "alignment_weight",
            "alignment_noise",
            "alignment_timestep",
            "alignment_weighting",
            "rescale",
            "timestep_min_ratio",
            "timestep_max_ratio",
            "alignment_timestep_min_ratio",
            "alignment_timestep_max_ratio",
            "alignment_warmup_steps",
            "alignment_normalization",
            "alignment_calibration_steps",
            "alignment_projection",
            "rank",
            "lora_alpha",
            "num_vectors",
            "learning_rate",
            "embedding_learning_rate",
            "max_train_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "resolution",
            "mixed_precision",
            "seed",
        )
    )
    hub_id = hub_base_model(config["pretrained_model_name_or_path"])
    base = hub_id or Path(config["pretrained_model_name_or_path"]).name  # a local path stays off the card
    metadata = card_metadata(hub_id, config["personalization_prompt_resolved"], conditioner.card_tags)
    return f"""{metadata}

# PALP personalization: `{token}` ({config["class_name"]})

LoRA + textual-inversion embedding trained with PALP (Prompt Aligned Personalization, Arar et al., 2024) on
`{base}` for one target prompt.

- Target prompt: `{config["target_prompt"]}`
- Clean prompt (pre-trained model's view, y_c): `{config["clean_prompt_resolved"]}`
- Personalization prompt (y_P): `{config["personalization_prompt_resolved"]}`
- Placeholder token: `{token}`, class `{config["class_name"]}`{vectors_note(token, conditioner.num_vectors)}
- Base model: `{base}`
- VAE used in training: {card_vae(config, base)}

## Use it with diffusers

```python
import torch
from diffusers import {pipeline_name}
{conditioner.load_imports}
pipe = {pipeline_name}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{repo}")
{conditioner.load_code(repo, [(EMBEDDINGS_NAME, token)])}
image = pipe("{conditioner.inference_prompt(config["target_prompt"])}"{"".join(f", {k}={v!r}" for k, v in conditioner.call_kwargs().items())}).images[0]
```

{webui_usage(config["target_prompt"], [token], single=True) if conditioner.kohya_lora else ""}

## Training settings

| setting | value |
|---|---|
{settings}

## Samples (`{config["validation_prompt_resolved"]}`, guidance scale {config["validation_guidance_scale"]})

{images}
"""


def create_hub_repo(args):
    """Create (or find) the Hub repo before training, so a bad token or name fails in seconds, not after it."""
    from huggingface_hub import create_repo

    return create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token).repo_id


def hub_ignore_patterns(output_dir, logging_dir):
    """What never goes to the Hub: checkpoints (optimizer states), partial files, the run's lock file and the
    tracker logs, wherever --logging_dir put them inside --output_dir."""
    patterns = ["checkpoint-*", ".checkpoint-*", "*.tmp", "*events.out.tfevents*", "wandb/*", LOCK_NAME]
    logs = Path(output_dir, logging_dir).resolve()
    if logs.is_relative_to(Path(output_dir).resolve()) and logs != Path(output_dir).resolve():
        patterns.append(f"{logs.relative_to(Path(output_dir).resolve()).as_posix()}/*")
    return patterns


def push_to_hub(output_dir, repo_id, token, config, logging_dir):
    """Upload the outputs in one commit, from a staging copy: without checkpoints, logs or partial files, and with a
    training_config.json that holds no local path (:func:`shareable_config`)."""
    import tempfile

    from huggingface_hub import upload_folder
    from huggingface_hub.utils import filter_repo_objects

    output_dir = Path(output_dir)
    files = [p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file()]
    files = filter_repo_objects(files, ignore_patterns=hub_ignore_patterns(output_dir, logging_dir) + [CONFIG_NAME])
    with tempfile.TemporaryDirectory(prefix="palp-upload-") as staging:
        for name in files:
            Path(staging, name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(output_dir / name, Path(staging, name))
        Path(staging, CONFIG_NAME).write_text(json.dumps(shareable_config(config), indent=2, default=str))
        upload_folder(repo_id=repo_id, folder_path=staging, commit_message="PALP personalization", token=token)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


class StopRequest:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and stop at the end of the current optimizer step."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGINT/SIGTERM while training; the previous handlers come back afterwards."""
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self) for sig in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def output_dir_lock(output_dir, is_main_process):
    """One run per --output_dir: the main process holds an exclusive flock on a file there until the run ends.

    Two runs in one folder would overwrite each other's checkpoints and outputs (and rotate each other's
    checkpoints away), so a second one stops at once, before it loads a model or writes or deletes anything. The
    kernel drops the lock with the process however it ends, SIGKILL included: a stale lock file holds no lock.
    """
    try:
        import fcntl
    except ImportError:  # Windows has no flock; the folder goes unguarded there.
        fcntl = None
    if not is_main_process or fcntl is None:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(Path(output_dir) / LOCK_NAME, "a+") as handle:  # "a+": a refused run must not truncate the file
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserInputError(
                f"--output_dir {str(output_dir)!r} is in use by another training run (process {holder}): wait for "
                "it to end or stop it, or choose another --output_dir. Once it has stopped, "
                "--resume_from_checkpoint latest continues it."
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def setup_accelerator(args):
    import logging

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    return accelerator


def resolve_seed(args, checkpoint_state):
    if checkpoint_state is not None:
        if args.seed is not None and args.seed != checkpoint_state["seed"]:
            logger.warning(
                f"--seed {args.seed} differs from the checkpoint's seed {checkpoint_state['seed']}; using the latter."
            )
        return checkpoint_state["seed"]
    if args.seed is not None:
        return args.seed
    return int(np.random.SeedSequence().generate_state(1)[0] % (2**31))


class LatentSampler:
    """VAE latents of the subject images and what the model family conditions on about each photo
    (``image_geometry(original_size, crop, resolution)``: SDXL's time_ids, None for the others). Latents are
    normalised as the family's pipeline expects them, (z - shift_factor) · scaling_factor (SD3's VAE has a shift, the
    others none). With a deterministic crop (``--center_crop`` without ``--random_flip``) each image's posterior is
    computed once and only its sample is drawn per step. The VAE runs in its own dtype (fp32 when it must be upcast);
    the latents come out in the training dtype."""

    def __init__(self, vae, images, resolution, center_crop, random_flip, device, dtype, image_geometry):
        self.vae, self.device, self.dtype, self.image_geometry = vae, device, dtype, image_geometry
        self.original_sizes = [(image.height, image.width) for image in images]
        self.images = [resize_shorter_side(image, resolution) for image in images]
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.cache = {} if center_crop and not random_flip else None

    def posterior(self, index, generator):
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        pixels, crop = image_to_tensor(
            self.images[index], self.resolution, self.center_crop, self.random_flip, generator
        )
        with torch.no_grad():
            dist = self.vae.encode(pixels[None].to(self.device, dtype=self.vae.dtype)).latent_dist
        geometry = self.image_geometry(self.original_sizes[index], crop, self.resolution)
        entry = (dist.mean.float(), dist.std.float(), geometry)
        if self.cache is not None:
            self.cache[index] = entry
        return entry

    def __call__(self, indices, generator):
        mean, std, geometry = zip(*(self.posterior(i, generator) for i in indices))
        mean, std = torch.cat(mean), torch.cat(std)
        sample = mean + std * torch.randn(mean.shape, generator=generator).to(self.device)
        latents = (sample - (getattr(self.vae.config, "shift_factor", None) or 0.0)) * self.vae.config.scaling_factor
        return latents.to(self.dtype), None if geometry[0] is None else torch.cat(geometry)


def stop_requested(accelerator, stop):
    """Every rank stops at the same step, whichever of them received the signal."""
    if accelerator.num_processes == 1:
        return stop.signal is not None
    flag = torch.tensor([float(stop.signal is not None)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def prepare_models(args, accelerator, conditioner, tokens, class_names):
    """Frozen models in the training dtype, the placeholder rows and the LoRA in fp32; the resolution resolved."""
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    vae, unet, noise_scheduler = load_models(args, conditioner, weight_dtype, accelerator.device)
    conditioner.add_placeholder_tokens(tokens, class_names, args.num_vectors)
    # The SDXL VAE overflows in fp16: a VAE stays in fp32 unless its config says it need not (force_upcast false,
    # as in an fp16-safe VAE given with --pretrained_vae_model_name_or_path).
    vae.to(accelerator.device, dtype=torch.float32 if vae.config.force_upcast else weight_dtype)
    quantized = args.base_quantization != "none"  # then the UNet was loaded on the device, in the training dtype
    encoders = [*conditioner.text_encoders, *conditioner.frozen_encoders]
    for model in encoders if quantized else (unet, *encoders):
        model.to(accelerator.device, dtype=weight_dtype)
    lora_config = add_lora(
        unet, args.rank, resolved_lora_alpha(args), args.lora_dropout, conditioner.lora_target_modules
    )
    # Mixed precision computes in fp16/bf16, but what trains (LoRA, the token rows) is stored in fp32.
    cast_training_params([unet, *conditioner.text_encoders], dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in conditioner.text_encoders:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    conditioner.resolution = args.resolution or native_resolution(unet, vae)
    check_resolution(conditioner.resolution, unet, vae)
    return vae, unet, noise_scheduler, lora_config, weight_dtype


def only_one(values, name):
    """The single item of ``values``; a model family with several (one per text encoder) names where they are."""
    if len(values) != 1:
        raise ValueError(f"This model family has {len(values)} text encoders: use {name}, one item per encoder.")
    return values[0]


@dataclass
class TrainingRun:
    """Everything the training loop touches, built once by ``main``."""

    accelerator: Accelerator
    args: argparse.Namespace
    seed: int
    tokens: list
    conditioner: TextConditioner  # tokenizers, text encoders as prepared by accelerate, placeholder rows
    unet: torch.nn.Module  # as prepared by accelerate (maybe distributed)
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    lora_config: LoraConfig
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    weight_dtype: torch.dtype
    alignment: AlignmentConfig
    cond_clean: Conditioning  # y_c, encoded once: it holds no learned token
    uncond: Conditioning  # ∅, encoded once
    sample_batch: object  # (micro_step, generator) -> (latents, image geometry, y_P token ids) of a micro-batch
    validation_prompt: str
    config: dict
    global_step: int = 0
    hub_repo_id: str = None
    class_conditioning: object = None  # y_P token ids -> ỹ_P Conditioning, when the alignment needs ỹ_P
    teacher_ids: tuple = None  # token ids of [target prompt, ∅], for --alignment_mode teacher
    calibration: DirectionCalibration = None  # D's factor, for --alignment_normalization calibrated

    @property
    def base_unet(self):
        return self.accelerator.unwrap_model(self.unet)

    @property
    def base_text_encoders(self):
        return [self.accelerator.unwrap_model(encoder) for encoder in self.conditioner.text_encoders]

    @property
    def base_text_encoder(self):
        """The text encoder of a one-encoder family (SD 1.x/2.x), unwrapped; SDXL's and SD3's are in
        ``base_text_encoders``."""
        return only_one(self.base_text_encoders, "base_text_encoders")

    @property
    def embedding(self):
        """The placeholder rows of a one-encoder family (SD 1.x/2.x); SDXL and SD3 have one per CLIP encoder, in
        ``conditioner.embeddings``."""
        return only_one(self.conditioner.embeddings, "conditioner.embeddings")

    @property
    def resolution(self):
        return self.conditioner.resolution

    @functools.cached_property
    def trainable(self):
        """The LoRA parameters and the token rows; collected once, not on every step's gradient clipping."""
        return [p for p in self.base_unet.parameters() if p.requires_grad] + self.conditioner.trainable_rows

    @functools.cached_property
    def alignment_parameters(self):
        """What the alignment loss updates under --alignment_gradient lora|token."""
        lora = [p for p in self.base_unet.parameters() if p.requires_grad]
        return {"all": self.trainable, "lora": lora, "token": self.conditioner.trainable_rows}[self.alignment.gradient]

    @functools.cached_property
    def noise_process(self):
        """The model family's noise process (DDPM for SD 1.x/2.x and SDXL, rectified flow for SD3), its tables on the
        training device, built once rather than every step."""
        return self.conditioner.noise_process(self.noise_scheduler, self.accelerator.device)

    @functools.cached_property
    def t_bounds(self):
        return timestep_bounds(
            self.noise_scheduler.config.num_train_timesteps, self.args.timestep_min_ratio, self.args.timestep_max_ratio
        )

    @functools.cached_property
    def t2_bounds(self):
        return timestep_bounds(self.noise_scheduler.config.num_train_timesteps, *alignment_timestep_ratios(self.args))


def training_step(run, micro_step):
    """One micro-batch: draw it, compute L_pers + λ·L_align, back-propagate once, step when accumulation is done."""
    accelerator = run.accelerator
    device = accelerator.device
    with accelerator.accumulate(run.unet, *run.conditioner.text_encoders):
        generator = step_generator(run.seed, accelerator.process_index, micro_step)
        seed_global_rng(run.seed, accelerator.process_index, micro_step)
        latents, geometry, personal_ids = run.sample_batch(micro_step, generator)
        process = run.noise_process
        noise, t1, t2, noise2 = sample_step_noise(
            latents.shape, process, run.t_bounds, run.alignment, generator, run.t2_bounds
        )
        with accelerator.autocast():
            cond_personal = run.conditioner.encode(tuple(ids.to(device) for ids in personal_ids), geometry)
            cond_class = run.class_conditioning(personal_ids) if run.class_conditioning else None
            cond_teacher = None
            if run.teacher_ids is not None:
                # The target prompt with the token as it is now: re-encoded every step, gradient-free.
                cond_teacher = run.conditioner.encode_fixed_ids(run.teacher_ids, device, run.weight_dtype)[0]
            loss_pers, loss_align = palp_losses(
                run.unet,
                run.base_unet,
                latents,
                noise.to(device, run.weight_dtype),
                t1.to(device),
                t2.to(device),
                noise2.to(device, run.weight_dtype),
                cond_personal,
                run.cond_clean,
                run.uncond,
                process,
                run.alignment,
                cond_class,
                cond_teacher,
                run.calibration,
            )
        weight = run.alignment.weight * alignment_ramp(run.global_step, run.alignment.warmup_steps)
        loss = loss_pers + weight * loss_align
        if run.alignment.gradient == "all" or not loss_align.requires_grad:
            accelerator.backward(loss)
        else:
            # --alignment_gradient lora|token: L_pers reaches every trainable parameter, L_align only its share.
            accelerator.backward(loss_pers, retain_graph=True)
            accelerator.backward(weight * loss_align, inputs=run.alignment_parameters)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.trainable, run.args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, loss_pers, loss_align


def train_loop(run):
    """Optimizer steps until --max_train_steps, with logging, checkpoints, validation and clean stops on signals."""
    accelerator, args = run.accelerator, run.args
    progress = tqdm(
        range(args.max_train_steps),
        initial=run.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    micro_step = run.global_step * args.gradient_accumulation_steps
    set_training_mode(run)
    step_losses = []
    with StopRequest().installed() as stop:
        while run.global_step < args.max_train_steps:
            losses = training_step(run, micro_step)
            step_losses.append(torch.stack([value.detach().float() for value in losses]))
            micro_step += 1
            if not accelerator.sync_gradients:
                continue
            run.global_step += 1
            progress.update(1)
            values = mean_step_losses(accelerator, step_losses)
            step_losses = []
            logs = dict(zip(("loss", "loss_pers", "loss_align"), values), lr=run.lr_scheduler.get_last_lr()[0])
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(
                    f"The loss became {logs['loss']} at step {run.global_step} (L_pers={logs['loss_pers']}, "
                    f"L_align={logs['loss_align']}); nothing was saved. Try --mixed_precision bf16 instead of fp16, "
                    "a lower --learning_rate, or a lower --alignment_weight."
                )
            progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
            accelerator.log(logs, step=run.global_step)
            stopping = stop_requested(accelerator, stop)
            if accelerator.is_main_process and (run.global_step % args.checkpointing_steps == 0 or stopping):
                path = save_checkpoint(
                    args.output_dir,
                    run.global_step,
                    run.base_unet,
                    run.lora_config,
                    run.tokens,
                    run.conditioner,
                    run.optimizer,
                    run.lr_scheduler,
                    accelerator.scaler,
                    run.seed,
                    args.checkpoints_total_limit,
                    run.calibration,
                )
                logger.info(f"Saved checkpoint {path}")
            if stopping:
                accelerator.wait_for_everyone()
                accelerator.end_training()
                raise SystemExit(
                    f"Stopped by a signal at step {run.global_step}; checkpoint-{run.global_step} is saved in "
                    f"{args.output_dir}. Resume with --resume_from_checkpoint latest."
                )
            if (
                args.validation_steps
                and run.global_step % args.validation_steps == 0
                and run.global_step < args.max_train_steps
                and args.num_validation_images > 0
                and accelerator.is_main_process
            ):
                validate(run, f"step-{run.global_step}")
                set_training_mode(run)


def mean_step_losses(accelerator, step_losses):
    """(loss, L_pers, L_align) of one optimizer step: the mean over its accumulation micro-steps and over the
    processes, as the gradient averages them; one device→host copy for the three numbers."""
    mean = torch.stack(step_losses).mean(dim=0)
    if accelerator.num_processes > 1:
        mean = accelerator.reduce(mean, reduction="mean")
    return mean.tolist()


def set_training_mode(run):
    """The UNet trains; with --gradient_checkpointing the text encoder is put in training mode too, because
    transformers checkpoints a module only while it is training (CLIP's text encoders have no active dropout, so
    nothing else changes)."""
    run.unet.train()
    if run.args.gradient_checkpointing:
        for encoder in run.conditioner.text_encoders:
            encoder.train()


def validate(run, name):
    args = run.args
    run.base_unet.eval()
    for encoder in run.base_text_encoders:
        encoder.eval()
    scheduler = run.conditioner.validation_scheduler(run.noise_scheduler)
    images = generate_images(
        run.conditioner.pipeline(run.vae, run.base_unet, scheduler, run.base_text_encoders),
        run.conditioner.inference_prompt(run.validation_prompt),
        args.num_validation_images,
        run.resolution,
        resolved_validation_guidance_scale(args, run.conditioner),
        args.validation_num_inference_steps,
        run.seed,
        run.accelerator.device,
        run.accelerator.autocast(),
        run.conditioner.call_kwargs(),
    )
    folder = os.path.join(args.output_dir, "samples")
    return log_validation(run.accelerator, images, run.validation_prompt, run.global_step, folder, name)


def save_outputs(run):
    """Final files: embeddings, LoRA (diffusers + kohya), samples, config, and the model card last."""
    args = run.args
    save_embeddings(args.output_dir, run.tokens, run.conditioner)
    save_lora(
        args.output_dir,
        run.base_unet,
        run.lora_config,
        kohya=run.conditioner.kohya_lora,
        pipeline_class=run.conditioner.pipeline_class,
        target_modules=run.conditioner.lora_target_modules,
    )
    image_paths = validate(run, "final") if args.num_validation_images > 0 else []
    Path(args.output_dir, CONFIG_NAME).write_text(json.dumps(run.config, indent=2, default=str))
    Path(args.output_dir, "README.md").write_text(
        model_card(run.config, image_paths, args.output_dir, run.conditioner)
    )
    logger.info(f"Saved the LoRA and the embedding to {args.output_dir}")
    if args.push_to_hub:
        push_to_hub(args.output_dir, run.hub_repo_id, args.hub_token, run.config, args.logging_dir)
        logger.info(f"Uploaded to https://huggingface.co/{run.hub_repo_id}")


def class_phrase_table(conditioner, personal_prompts, tokens, class_names, device, dtype):
    """A function from a micro-batch's y_P token ids to its ỹ_P Conditioning (the class phrase for each token).

    ỹ_P holds no learned token, so each distinct y_P's is encoded once, gradient-free, with the time_ids of
    inference (the alignment passes see prompts as inference does)."""
    prompts = sorted(set(personal_prompts))
    first_ids = conditioner.tokenize(prompts)[0]
    encoded = [
        conditioner.encode_fixed(class_phrase_prompt(p, tokens, class_names), device, dtype)[0] for p in prompts
    ]

    def lookup(personal_ids):
        rows = [(first_ids == ids).all(dim=1).nonzero()[0].item() for ids in personal_ids[0].cpu()]
        return Conditioning.cat([encoded[row] for row in rows])

    return lookup


def build_run(
    args, accelerator, conditioner, tokens, class_names, images, clean_prompt, config, draw_indices, batch_prompts
):
    """Models, optimizer, schedule and data for ``train_loop``; resumes from a checkpoint when asked.

    ``draw_indices(micro_step, seed, rank, world_size)`` picks the images of a rank's micro-batch and
    ``batch_prompts(indices)`` gives their y_P prompts.
    """
    resume_path = (
        resolve_checkpoint(args.output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    )
    seed = resolve_seed(args, read_checkpoint_state(resume_path) if resume_path else None)
    set_seed(seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    hub_repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            hub_repo_id = create_hub_repo(args)

    vae, unet, noise_scheduler, lora_config, weight_dtype = prepare_models(
        args, accelerator, conditioner, tokens, class_names
    )
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    for ratios, flag in (
        ((args.timestep_min_ratio, args.timestep_max_ratio), "--timestep_max_ratio"),
        (alignment_timestep_ratios(args), "--alignment_timestep_max_ratio"),
    ):
        bounds = timestep_bounds(num_train_timesteps, *ratios)
        conditioner.noise_process(noise_scheduler).check_timestep_bounds(bounds, flag)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(args, lora_params, conditioner.trainable_rows, accelerator.num_processes)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    unet, *text_encoders, optimizer, lr_scheduler = accelerator.prepare(
        unet, *conditioner.text_encoders, optimizer, lr_scheduler
    )
    conditioner.text_encoders = text_encoders
    cond_clean, uncond = conditioner.encode_fixed(clean_prompt, accelerator.device, weight_dtype)
    latents_of = LatentSampler(
        vae,
        images,
        conditioner.resolution,
        args.center_crop,
        args.random_flip,
        accelerator.device,
        weight_dtype,
        conditioner.image_geometry,
    )

    def sample_batch(micro_step, generator):
        indices = draw_indices(micro_step, seed, accelerator.process_index, accelerator.num_processes)
        return (*latents_of(indices, generator), conditioner.tokenize(batch_prompts(indices)))

    alignment = AlignmentConfig.from_args(args)
    class_conditioning = None
    if alignment.needs_class_prompt:
        class_conditioning = class_phrase_table(
            conditioner, batch_prompts(range(len(images))), tokens, class_names, accelerator.device, weight_dtype
        )
    teacher_ids = conditioner.tokenize([args.target_prompt, ""]) if alignment.mode == "teacher" else None
    calibration = None
    if alignment.normalization == "calibrated":
        calibration = DirectionCalibration(
            alignment.calibration_steps * args.gradient_accumulation_steps,
            reduce=lambda sizes: accelerator.reduce(sizes, reduction="mean"),
        )

    run = TrainingRun(
        accelerator=accelerator,
        args=args,
        seed=seed,
        tokens=list(tokens),
        conditioner=conditioner,
        unet=unet,
        vae=vae,
        noise_scheduler=noise_scheduler,
        lora_config=lora_config,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        weight_dtype=weight_dtype,
        alignment=alignment,
        cond_clean=cond_clean,
        uncond=uncond,
        sample_batch=sample_batch,
        validation_prompt=config["validation_prompt_resolved"],
        class_conditioning=class_conditioning,
        teacher_ids=teacher_ids,
        calibration=calibration,
        config={**config, "seed": seed, "resolution": conditioner.resolution},
        hub_repo_id=hub_repo_id,
    )
    if resume_path is not None:
        state = load_checkpoint(
            resume_path, run.base_unet, run.tokens, conditioner, optimizer, lr_scheduler, accelerator.scaler
        )
        run.global_step = state["global_step"]
        if calibration is not None and state.get("alignment_calibration"):
            calibration.load_state_dict(state["alignment_calibration"])
        logger.info(f"Resumed from {resume_path} at step {run.global_step}")
    elif args.resume_from_checkpoint:
        logger.info("No checkpoint to resume from; starting a new run.")
    return run


def main(args):
    accelerator = setup_accelerator(args)
    # Before anything is loaded, written or deleted: a second run into a folder that a live run holds stops here.
    with output_dir_lock(args.output_dir, accelerator.is_main_process):
        # Inputs first: everything a user can get wrong fails here, before a model is loaded.
        images = (
            load_instance_images(args.instance_data_dir)
            if args.instance_data_dir
            else load_dataset_images(args.dataset_name, args.dataset_config_name, args.image_column, args.cache_dir)
        )
        conditioner = load_text_conditioner(args)
        token = args.placeholder_token
        personalization_prompt = format_prompt(args.personalization_prompt, token)
        clean_prompt = args.clean_prompt or default_clean_prompt(args.target_prompt, token, args.class_name)
        config = public_config(
            args,
            clean_prompt_resolved=clean_prompt,
            personalization_prompt_resolved=personalization_prompt,
            validation_prompt_resolved=args.validation_prompt or args.target_prompt,
            lora_alpha=resolved_lora_alpha(args),
            validation_guidance_scale=resolved_validation_guidance_scale(args, conditioner),
            pipeline_class=conditioner.pipeline_class.__name__,
        )

        run = build_run(
            args,
            accelerator,
            conditioner,
            [token],
            [args.class_name],
            images,
            clean_prompt,
            config,
            draw_indices=lambda step, seed, rank, world: batch_indices(
                len(images), args.train_batch_size, step, seed, rank, world
            ),
            batch_prompts=lambda indices: [personalization_prompt] * len(indices),
        )
        if accelerator.is_main_process:
            accelerator.init_trackers(
                "palp", config={k: v for k, v in run.config.items() if isinstance(v, (int, float, str, bool))}
            )
        logger.info(
            f"PALP: {len(images)} image(s), y_P={personalization_prompt!r}, y_c={clean_prompt!r}, "
            f"mode={run.alignment.mode}, α={args.guidance_scale_pretrained}, β={args.guidance_scale_personalized}, "
            f"seed={run.seed}"
        )
        train_and_save(run)
    return run


def train_and_save(run):
    """Train, check that every process ended with the same weights, and write the outputs once."""
    train_loop(run)
    run.accelerator.wait_for_everyone()
    check_replicas_in_sync(run.accelerator, run.trainable)
    try:
        if run.accelerator.is_main_process:
            save_outputs(run)
    finally:
        # Every rank leaves together: a rank that tears its process group down while the main one is still writing
        # the outputs can leave the main one blocked in its own teardown, and a failed upload on the main one must
        # not leave the others waiting here.
        run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


def check_replicas_in_sync(accelerator, parameters):
    """With several processes every rank must end with the same weights; a cheap checksum proves it."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in parameters]).to(accelerator.device)
    gathered = accelerator.gather(checksum[None]).reshape(accelerator.num_processes, -1)
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-6, atol=1e-8):
        raise RuntimeError("The processes ended with different weights; the distributed setup is broken.")
    logger.info(f"Trained weights are identical on all {accelerator.num_processes} processes.")


def cli(input_args=None):
    try:
        args = parse_args(input_args)
        main(args)
    except (UserInputError, FloatingPointError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    cli()
