#!/usr/bin/env python
# coding=utf-8
# Copyright 2026 The PALP training scripts authors. Licensed under the Apache License, Version 2.0.
"""What a PALP training step costs, measured against the TI + DreamBooth-LoRA step of the same script.

PALP adds gradient-free forward passes to a DreamBooth step (the pre-trained model on [y_c, ∅] and the personalized
model on [y_P, ∅]) and nothing else: no second backward pass, no second copy of the UNet. This script checks that
claim on random-weight models built from their configs (nothing is downloaded):

* seconds per step and peak memory of ``train_palp.py``'s step in mode ``none`` (TI+DB) and ``dds`` (PALP);
* the **floor ratio** PALP / (TI+DB + the gradient-free passes timed alone): the alignment branch should cost no
  more than its forward passes (goal ≤ 1.05); the **memory ratio** PALP / TI+DB (goal ≤ 1.10);
* the same with β = 1, where the personalized unconditional pass is skipped;
* "before" variants of the step's optimisations, implemented here only: classifier-free guidance as two calls
  instead of one batched call, y_c and ∅ re-encoded every step instead of once, β = 1 without skipping the
  unconditional pass, the pre-trained model as a separate fp32 UNet copy instead of the training UNet with its LoRA
  switched off, and (a GPU matter) per-step host work that can be hoisted.

Every variant runs on the same models and the same inputs (micro-step ``i`` of every variant draws the same noise
and timesteps). Repetitions are interleaved (a, b, c, a, b, c, ...) after warm-up and medians are reported, so a
busy machine slows every variant alike; the floor ratio is also given per round. ``--round_order alternating``
(a, b, c, c, b, a, ...) also cancels a load that drifts during the minutes a full-size CPU round takes.

The step is ``train_palp.training_step``'s body (text encoder forward for y_P with gradient to the token row,
``palp_losses``, one backward, gradient clipping, AdamW step); ``tests/test_benchmark_palp.py`` checks that it
computes exactly what ``training_step`` computes.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one step minus the memory allocated when it starts; on
the CPU, the peak of (bytes allocated − bytes freed) during one step, from ``torch.profiler``'s memory events. Both
are the step's *increment*; the reported *peak* adds the resident bytes of what the step keeps between steps
(models, optimizer state, fixed prompt embeddings), counted from the tensors themselves, so the two devices report
the same quantity.

    # tiny model, seconds
    python examples/benchmark_palp.py --model tiny --resolution 64 --output_json bench-tiny.json
    # Stable Diffusion 1.5 architecture, random weights, 256 px, with and without gradient checkpointing
    python examples/benchmark_palp.py --model sd15 --resolution 256 --gradient_checkpointing both --num_threads 1 \
      --round_order alternating --repeats 4
    # how the cost grows with resolution and batch size
    python examples/benchmark_palp.py --model tiny --sizes 128x1 256x1 256x2 256x4 --variants core
    # on a GPU, at real size
    python examples/benchmark_palp.py --model sd15 --device cuda --mixed_precision fp16 --resolution 512
    # Stable Diffusion 3.5 Medium's MMDiT and both CLIP encoders (rectified flow), on a GPU
    python examples/benchmark_palp.py --model sd3 --device cuda --mixed_precision bf16 --resolution 512

``--model sd3`` / ``tiny_sd3`` build Stable Diffusion 3.5 Medium's transformer (or a tiny one of the same kind: MMDiT
joint blocks with SD3.5's dual attention and RMS q/k norm, 16 latent channels) with its two CLIP text encoders and
train it as train_palp.py trains an SD3 model: rectified flow with preconditioned outputs on the shifted σ table, the
LoRA on both streams' attention. T5 is left out, as with ``text_encoder_3=None``: its part of the sequence is zeros
of T5's width, 256 rows long, which costs the transformer exactly what T5's states cost. With T5, train_palp.py runs
it once per distinct prompt (it never sees the token), so T5 adds resident memory (4.7 B parameters) to both steps
and no time per step; the memory ratio here leaves it out of both sides.
"""

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from transformers import CLIPTextConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import train_palp as tp  # noqa: E402

# The gradient-free passes are the time PALP is allowed to add (floor ratio) and its memory must stay close to TI+DB.
FLOOR_RATIO_GOAL = 1.05
MEMORY_RATIO_GOAL = 1.10

CORE_VARIANTS = ("ti_db", "palp", "passes", "palp_beta1", "passes_beta1")
BEFORE_VARIANTS = ("before_unbatched_cfg", "before_reencode_prompts", "before_beta1_no_skip", "before_frozen_copy")
HOISTED_VARIANTS = ("hoisted",)
ALL_VARIANTS = CORE_VARIANTS + BEFORE_VARIANTS + HOISTED_VARIANTS
VARIANT_DESCRIPTIONS = {
    "ti_db": "TI+DB step (--alignment_mode none)",
    "palp": "PALP step (dds, α, β)",
    "passes": "gradient-free passes alone (α, β)",
    "palp_beta1": "PALP step, β = 1",
    "passes_beta1": "gradient-free passes alone, β = 1",
    "before_unbatched_cfg": "before: cond and uncond as two calls",
    "before_reencode_prompts": "before: y_c and ∅ encoded every step",
    "before_beta1_no_skip": "before: β = 1, uncond pass still run",
    "before_frozen_copy": "before: pre-trained UNet as fp32 copy",
    "hoisted": "PALP step, per-step host work hoisted",
}
# (before, after) pairs of the step optimisations. 'hoisted' is a further "after" of the script's own step.
BEFORE_AFTER_PAIRS = (
    ("before_unbatched_cfg", "palp"),
    ("before_reencode_prompts", "palp"),
    ("before_beta1_no_skip", "palp_beta1"),
    ("before_frozen_copy", "palp"),
    ("palp", "hoisted"),
)

# Stable Diffusion 1.5's UNet and CLIP text encoder; the weights are random, the shapes (and so the cost) are real.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_TEXT_CONFIG = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    vocab_size=49408,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# The test suite's tiny Stable Diffusion layout: the same code paths in milliseconds.
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=1000,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# SDXL base: its UNet and its two text encoders, CLIP ViT-L (as SD 1.5's) and OpenCLIP ViT-bigG with projection.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT_CONFIG_2 = dict(
    SD15_TEXT_CONFIG,
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
    hidden_act="gelu",
)
# The test suite's tiny SDXL layout: two encoders of different widths, text_time added conditioning.
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 24,
    cross_attention_dim=16 + 32,
    norm_num_groups=8,
)
TINY_SDXL_TEXT_CONFIGS = (
    dict(TINY_TEXT_CONFIG, hidden_size=16),
    dict(TINY_TEXT_CONFIG, hidden_size=32, projection_dim=24),
)
# Stable Diffusion 3.5 Medium's MMDiT. Written from the published transformer/config.json of
# stabilityai/stable-diffusion-3.5-medium as we remember it (no download here); checked against diffusers'
# SD3Transformer2DModel: every key is one of its arguments, the joint width num_attention_heads · attention_head_dim
# = 1536 equals caption_projection_dim as the blocks require, pooled_projection_dim = 768 + 1280 (CLIP-L ‖ CLIP-G
# pooled), and diffusers' own comment gives dual_attention_layers = 0 … 12 for SD3.5. From memory only: num_layers 24,
# num_attention_heads 24, pos_embed_max_size 384 and sample_size 128. With them the model has 2.24 B parameters plus a
# 0.23 B-entry positional-embedding table (384² × 1536), 2.47 B in all: the 2.5 B Stability AI gives for SD3.5 Medium.
SD35_MEDIUM_TRANSFORMER_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# SD3's scheduler: FlowMatchEulerDiscreteScheduler with the shift 3.0 of SD3 Medium's and SD3.5's configs.
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
# A tiny MMDiT of the same kind: 16 latent channels, a dual-attention block, RMS q/k norm; CLIP widths 16 and 32.
TINY_SD3_TRANSFORMER_CONFIG = dict(
    SD35_MEDIUM_TRANSFORMER_CONFIG,
    sample_size=8,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=64,
    caption_projection_dim=16,
    pooled_projection_dim=16 + 32,
    pos_embed_max_size=32,
    dual_attention_layers=(0,),
)
TINY_SD3_TEXT_CONFIGS = (
    dict(TINY_TEXT_CONFIG, hidden_size=16, projection_dim=16),
    dict(TINY_TEXT_CONFIG, hidden_size=32, projection_dim=32),
)
DDPM_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)
# model -> (text conditioner of the family, denoiser config, one text config per CLIP encoder, scheduler config);
# the family gives the denoiser's and the scheduler's classes.
ARCHITECTURES = {
    "tiny": (tp.TextConditioner, TINY_UNET_CONFIG, (TINY_TEXT_CONFIG,), DDPM_SCHEDULER_CONFIG),
    "sd15": (tp.TextConditioner, SD15_UNET_CONFIG, (SD15_TEXT_CONFIG,), DDPM_SCHEDULER_CONFIG),
    "tiny_sdxl": (tp.SDXLTextConditioner, TINY_SDXL_UNET_CONFIG, TINY_SDXL_TEXT_CONFIGS, DDPM_SCHEDULER_CONFIG),
    "sdxl": (tp.SDXLTextConditioner, SDXL_UNET_CONFIG, (SD15_TEXT_CONFIG, SDXL_TEXT_CONFIG_2), DDPM_SCHEDULER_CONFIG),
    "tiny_sd3": (tp.SD3TextConditioner, TINY_SD3_TRANSFORMER_CONFIG, TINY_SD3_TEXT_CONFIGS, SD3_SCHEDULER_CONFIG),
    # SD3's CLIP-L and CLIP-G are SDXL's two encoders, both with their projection.
    "sd3": (
        tp.SD3TextConditioner,
        SD35_MEDIUM_TRANSFORMER_CONFIG,
        (SD15_TEXT_CONFIG, SDXL_TEXT_CONFIG_2),
        SD3_SCHEDULER_CONFIG,
    ),
}
LATENT_SCALE_FACTOR = 8  # every family's VAE: 512 px images are 64×64 latents


def resolution_multiple(model):
    """Pixels a resolution must be a multiple of: 64 for a UNet (latents a multiple of 8, for its down-sampling),
    16 for SD3's transformer (latents a multiple of its 2×2 patches)."""
    family = ARCHITECTURES[model][0]
    return LATENT_SCALE_FACTOR * (8 if family.denoiser_folder == "unet" else 2)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Seconds per step and peak memory of a PALP step against the TI+DreamBooth-LoRA step of "
        "train_palp.py, on random-weight models built from their configs (nothing is downloaded).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        type=str,
        default="tiny",
        choices=list(ARCHITECTURES),
        help="'sd15': Stable Diffusion 1.5's UNet and CLIP text encoder architecture with random weights; 'sdxl': "
        "SDXL base's UNet and both text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), random weights, about 14 GB "
        "in fp32; 'sd3': Stable Diffusion 3.5 Medium's MMDiT transformer (about 2.5 B parameters) and both CLIP "
        "encoders, random weights, rectified flow, without T5 (see the module docstring), about 14 GB in fp32; "
        "'tiny' / 'tiny_sdxl' / 'tiny_sd3': tiny layouts of each family (seconds, for smoke runs).",
    )
    parser.add_argument(
        "--device",
        type=str,
        default="cpu",
        choices=["cpu", "cuda"],
        help="Where to run; 'cuda' also reports torch.cuda.max_memory_allocated and the host-device "
        "synchronisations of one step.",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "fp16", "bf16"],
        help="Training precision, as train_palp.py's flag: frozen weights in this dtype, LoRA and token row in fp32. "
        "fp16 needs --device cuda.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=256,
        help="Image resolution in pixels; latents are resolution / 8. A multiple of 64 for a UNet, of 16 for SD3.",
    )
    parser.add_argument("--train_batch_size", type=int, default=1, help="Images per step.")
    parser.add_argument(
        "--sizes",
        type=str,
        nargs="+",
        default=None,
        help="Several RESOLUTIONxBATCH settings (e.g. 128x1 256x1 256x4), each measured in turn, for the scaling "
        "table. Default: --resolution x --train_batch_size.",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        type=str,
        default="off",
        choices=["off", "on", "both"],
        help="Gradient checkpointing of the UNet and the text encoder, as train_palp.py's flag; 'both' measures "
        "without, then with.",
    )
    parser.add_argument(
        "--use_8bit_adam",
        type=str,
        default="off",
        choices=["off", "on", "both"],
        help="The optimizer, as train_palp.py's flag: 'on' is bitsandbytes' AdamW8bit (runs on the CPU too); 'both' "
        "measures AdamW, then AdamW8bit.",
    )
    parser.add_argument(
        "--base_quantization",
        type=str,
        nargs="+",
        default=["none"],
        choices=["none", "nf4", "int8"],
        help="The frozen UNet, as train_palp.py's flag: loaded through diffusers' BitsAndBytesConfig. Several values "
        "are measured in turn, each on its own models (e.g. 'none nf4'). On --device cpu diffusers' quantizer refuses "
        "to run (its environment check asks for a GPU); the benchmark lifts that one check while it loads the UNet, "
        "and bitsandbytes quantizes and computes on the CPU.",
    )
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (train_palp.py's default: 32).")
    parser.add_argument(
        "--guidance_scale_pretrained", type=float, default=15.0, help="α of the PALP step (train_palp.py: 15.0)."
    )
    parser.add_argument(
        "--guidance_scale_personalized", type=float, default=7.5, help="β of the PALP step (train_palp.py: 7.5)."
    )
    parser.add_argument(
        "--variants",
        type=str,
        nargs="+",
        default=["core", "before"],
        choices=["core", "before", "hoisted", "all", *ALL_VARIANTS],
        help=f"What to time. 'core': {', '.join(CORE_VARIANTS)}; 'before': {', '.join(BEFORE_VARIANTS)} (the "
        "'before' of each step optimisation); 'hoisted': per-step host work moved out of the step (shows on a GPU "
        "only); 'all'; or variant names.",
    )
    parser.add_argument("--warmup", type=int, default=1, help="Untimed interleaved rounds before the timed ones.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed interleaved rounds; medians are reported.")
    parser.add_argument(
        "--round_order",
        type=str,
        default="fixed",
        choices=["fixed", "alternating"],
        help="'fixed': every round runs the variants in the same order (a, b, c, a, b, c); 'alternating': every "
        "other timed round runs them backwards (a, b, c, c, b, a), which cancels a load that drifts steadily during "
        "long rounds (full-size CPU runs). Use an even --repeats with 'alternating'.",
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also measure the peak memory of one step of each variant (an extra, untimed step each).",
    )
    parser.add_argument(
        "--num_threads", type=int, default=None, help="torch.set_num_threads for CPU runs. Default: torch's choice."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and of every step's draws.")
    parser.add_argument("--output_json", type=str, default=None, help="Also write every figure to this JSON file.")
    args = parser.parse_args(input_args)
    validate_args(args)
    return args


def validate_args(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device.")
    if args.mixed_precision == "fp16" and args.device != "cuda":
        raise SystemExit("error: --mixed_precision fp16 needs --device cuda (use bf16 or no on the CPU).")
    needs_bitsandbytes = args.use_8bit_adam != "off" or set(args.base_quantization) != {"none"}
    if needs_bitsandbytes and importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit(
            "error: --use_8bit_adam and --base_quantization need bitsandbytes: `pip install bitsandbytes`."
        )
    if args.warmup < 0 or args.repeats < 1:
        raise SystemExit("error: --warmup must be >= 0 and --repeats >= 1.")
    multiple = resolution_multiple(args.model)
    for resolution, batch in parse_sizes(args):
        if resolution <= 0 or resolution % multiple or batch <= 0:
            raise SystemExit(
                f"error: size {resolution}x{batch}: the resolution must be a positive multiple of {multiple} for "
                f"--model {args.model} (a UNet's latents a multiple of 8, for its down-sampling; SD3's a multiple of "
                "its 2×2 patches) and the batch positive."
            )


def parse_sizes(args):
    if not args.sizes:
        return [(args.resolution, args.train_batch_size)]
    sizes = []
    for size in args.sizes:
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if match is None:
            raise SystemExit(f"error: --sizes {size!r} is not RESOLUTIONxBATCH, e.g. 256x1.")
        sizes.append((int(match.group(1)), int(match.group(2))))
    return sizes


def selected_variants(names):
    groups = {"core": CORE_VARIANTS, "before": BEFORE_VARIANTS, "hoisted": HOISTED_VARIANTS, "all": ALL_VARIANTS}
    chosen = set()
    for name in names:
        chosen.update(groups.get(name, (name,)))
    # The ratios need the core variants that the comparisons refer to.
    # A comparison needs the core variant it refers to; choosing a core variant does not add its comparisons.
    for pair in BEFORE_AFTER_PAIRS:
        if chosen & set(pair):
            chosen.update(name for name in pair if name in CORE_VARIANTS)
    return [name for name in ALL_VARIANTS if name in chosen]


# ----------------------------------------------------------------------------------------------------------------------
# Models and inputs: built from configs, random weights, prepared as train_palp.prepare_models prepares them
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Models:
    unet: torch.nn.Module  # the denoiser: a UNet, or SD3's transformer
    conditioner: tp.TextConditioner  # the family's text encoders, each with its placeholder row
    lora_config: object
    noise_scheduler: DDPMScheduler
    frozen_copy: torch.nn.Module  # the pre-trained UNet as a separate fp32 copy, for 'before_frozen_copy' only
    prompt_ids: dict  # token ids of y_P, y_c and ∅: one [1, 77] tensor per text encoder each
    unet_parameters: dict = None  # unet_parameter_split of the unquantized UNet


def fixed_prompt_ids(models):
    """The token ids of [y_c, ∅], one [2, 77] tensor per text encoder."""
    return tuple(torch.cat(pair) for pair in zip(models.prompt_ids["clean"], models.prompt_ids["empty"]))


def prompt_token_ids(word_ids, bos, eos, pad, length=77):
    ids = [bos, *word_ids, eos]
    return torch.tensor([ids + [pad] * (length - len(ids))])


def build_models(model, rank, device, weight_dtype, seed, with_frozen_copy, base_quantization="none"):
    """Denoiser (UNet or SD3 transformer) + LoRA and text encoders + placeholder rows, as
    ``train_palp.prepare_models`` prepares them.

    No tokenizer is needed: prompts are fixed token ids of the right length (77, the cost does not depend on the
    words): y_P = "a photo of [V]", y_c = "a sketch of a cat in paris", ∅ = "". With ``base_quantization`` the
    random UNet is written to a temporary folder and loaded back quantized, as train_palp.py loads a model.
    """
    family, unet_config, text_configs, scheduler_config = ARCHITECTURES[model]
    torch.manual_seed(seed)
    unet = family.denoiser_class(**unet_config)
    text_encoders = [
        encoder_class(CLIPTextConfig(**config)) for encoder_class, config in zip(family.encoder_classes, text_configs)
    ]
    noise_scheduler = family.scheduler_class(**scheduler_config)
    for module in (unet, *text_encoders):
        module.requires_grad_(False)

    # The placeholder token [V]: one new row per encoder, initialised from the class word, as add_placeholder_tokens.
    text_config = text_configs[0]
    vocab_size = text_config["vocab_size"]
    placeholder_id, class_id = vocab_size, 400
    conditioner = family(tokenizers=[None] * len(text_encoders))
    conditioner.text_encoders = text_encoders
    if family is tp.SD3TextConditioner:
        conditioner.joint_attention_dim = unet_config["joint_attention_dim"]  # no T5: zeros of its width
    for text_encoder in text_encoders:
        text_encoder.resize_token_embeddings(vocab_size + 1, mean_resizing=False)
        base = text_encoder.get_input_embeddings()
        init_rows = base.weight.data[[class_id]].float()
        with torch.no_grad():
            base.weight[placeholder_id] = init_rows[0]
        base.requires_grad_(False)
        conditioner.embeddings.append(tp.PlaceholderEmbedding(base, [placeholder_id], init_rows))
        text_encoder.set_input_embeddings(conditioner.embeddings[-1])

    words = {name: 300 + index for index, name in enumerate("a photo of sketch in paris".split())}
    special = (text_config["bos_token_id"], text_config["eos_token_id"], text_config["pad_token_id"])
    ids = {
        "personal": prompt_token_ids([words["a"], words["photo"], words["of"], placeholder_id], *special),
        "clean": prompt_token_ids(
            [words["a"], words["sketch"], words["of"], words["a"], class_id, words["in"], words["paris"]], *special
        ),
        "empty": prompt_token_ids([], *special),
    }
    prompt_ids = {name: (value,) * len(text_encoders) for name, value in ids.items()}

    unet_parameters = unet_parameter_split(unet)
    frozen_copy = None
    if with_frozen_copy:
        frozen_copy = copy.deepcopy(unet).to(device, dtype=torch.float32).eval()
    for module in text_encoders:
        module.to(device, dtype=weight_dtype)
    if base_quantization == "none":
        unet.to(device, dtype=weight_dtype)
    else:
        # Written out and loaded back quantized, as train_palp.load_models loads a model; the full-precision UNet is
        # freed first, so only one of the two is ever in memory.
        with tempfile.TemporaryDirectory() as folder:
            unet.save_pretrained(folder)
            del unet
            unet = load_quantized_unet(family.denoiser_class, folder, base_quantization, weight_dtype, device)
    lora_config = tp.add_lora(unet, rank, rank, 0.0, target_modules=family.lora_target_modules)
    cast_training_params([unet, *text_encoders], dtype=torch.float32)
    return Models(unet, conditioner, lora_config, noise_scheduler, frozen_copy, prompt_ids, unet_parameters)


def load_quantized_unet(denoiser_class, folder, mode, weight_dtype, device):
    """The denoiser of ``folder`` through diffusers' BitsAndBytesConfig, as train_palp.load_models loads it."""
    with cpu_quantizer() if device.type == "cpu" else contextlib.nullcontext():
        quantized = denoiser_class.from_pretrained(
            folder,
            quantization_config=tp.base_quantization_config(mode, weight_dtype),
            torch_dtype=weight_dtype,
            device_map={"": device},
        )
    return quantized.requires_grad_(False)


@contextlib.contextmanager
def cpu_quantizer():
    """diffusers' bitsandbytes quantizers refuse a machine without a GPU in ``validate_environment``; bitsandbytes
    itself quantizes and computes on the CPU. For a CPU measurement only, that one check is lifted while loading."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer

    saved = {cls: cls.validate_environment for cls in (BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer)}
    for cls in saved:
        cls.validate_environment = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        for cls, method in saved.items():
            cls.validate_environment = method


def unet_parameter_split(unet):
    """Parameters of the UNet in total and in the weights bitsandbytes quantizes (every nn.Linear's weight; its bias,
    the convolutions and the norms keep the training dtype)."""
    linear = sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear))
    return {"total": sum(p.numel() for p in unet.parameters()), "quantized_weights": linear}


def set_gradient_checkpointing(models, enabled):
    if enabled:
        models.unet.enable_gradient_checkpointing()
        for text_encoder in models.conditioner.text_encoders:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        models.unet.disable_gradient_checkpointing()
        for text_encoder in models.conditioner.text_encoders:
            text_encoder.gradient_checkpointing_disable()


def build_run(accelerator, models, resolution, batch_size, alignment, weight_dtype, seed, use_8bit_adam=False):
    """A ``train_palp.TrainingRun`` around the models: what ``training_step`` reads, with a fixed latent batch (the
    VAE is not part of a step's cost once latents are cached) and the default optimizer and schedule."""
    train_args = argparse.Namespace(
        train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        scale_lr=False,
        learning_rate=5e-5,
        embedding_learning_rate=None,
        use_8bit_adam=use_8bit_adam,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_weight_decay=1e-2,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        timestep_min_ratio=0.02,
        timestep_max_ratio=0.98,
        alignment_timestep_min_ratio=None,  # t2 follows t1's range, as on the command line by default
        alignment_timestep_max_ratio=None,
    )
    lora_params = [p for p in models.unet.parameters() if p.requires_grad]
    optimizer = tp.build_optimizer(
        train_args, lora_params, models.conditioner.trainable_rows, accelerator.num_processes
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, *text_encoders, optimizer, lr_scheduler = accelerator.prepare(
        models.unet, *models.conditioner.text_encoders, optimizer, lr_scheduler
    )
    device = accelerator.device
    conditioner = copy.copy(models.conditioner)
    conditioner.text_encoders, conditioner.resolution = text_encoders, resolution
    cond_clean, uncond = conditioner.encode_fixed_ids(fixed_prompt_ids(models), device, weight_dtype)
    latent_size = resolution // LATENT_SCALE_FACTOR
    channels = models.unet.config.in_channels  # 4 for SD and SDXL, 16 for SD3
    mean_latents = torch.randn(
        (batch_size, channels, latent_size, latent_size), generator=torch.Generator().manual_seed(seed)
    )
    personal_ids = tuple(ids.repeat(batch_size, 1) for ids in models.prompt_ids["personal"])
    # Square photos of the training resolution, uncropped: SDXL's time_ids (the SD families ignore them).
    geometry = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size).float()

    def sample_batch(micro_step, generator):
        # As LatentSampler with cached posteriors: one draw of the step's generator, moved to the device.
        sample = mean_latents + 0.1 * torch.randn(mean_latents.shape, generator=generator)
        return sample.to(device, weight_dtype), geometry, personal_ids

    return tp.TrainingRun(
        accelerator=accelerator,
        args=train_args,
        seed=seed,
        tokens=["<benchmark-token>"],
        conditioner=conditioner,
        unet=unet,
        vae=None,
        noise_scheduler=models.noise_scheduler,
        lora_config=models.lora_config,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        weight_dtype=weight_dtype,
        alignment=alignment,
        cond_clean=cond_clean,
        uncond=uncond,
        sample_batch=sample_batch,
        validation_prompt="",
        config={},
    )


# ----------------------------------------------------------------------------------------------------------------------
# The step and its "before" variants
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StepOptions:
    """The seams of ``benchmark_step``; the defaults give ``train_palp.training_step`` exactly."""

    losses: Callable = tp.palp_losses
    reencode_ids: tuple = None  # token ids of [y_c, ∅] per encoder: encode them inside every step ('before')
    hoisted: dict = None  # precomputed noise process (its ᾱ_t on the device) and timestep bounds ('hoisted')


def benchmark_step(run, micro_step, options=None):
    """One micro-batch, as ``train_palp.training_step``: draw it, L_pers + λ·L_align, one backward, clip, AdamW."""
    options = options or StepOptions()
    accelerator, scheduler = run.accelerator, run.noise_scheduler
    device = accelerator.device
    with accelerator.accumulate(run.unet, *run.conditioner.text_encoders):
        generator = tp.step_generator(run.seed, accelerator.process_index, micro_step)
        latents, geometry, personal_ids = run.sample_batch(micro_step, generator)
        if options.hoisted is not None:
            t_bounds, process = options.hoisted["t_bounds"], options.hoisted["process"]
        else:
            t_bounds = tp.timestep_bounds(
                scheduler.config.num_train_timesteps, run.args.timestep_min_ratio, run.args.timestep_max_ratio
            )
            process = run.conditioner.noise_process(scheduler, device)
        noise, t1, t2, noise2 = tp.sample_step_noise(latents.shape, process, t_bounds, run.alignment, generator)
        # Pinned host memory lets the copies run without stopping the host until the device is idle.
        non_blocking = options.hoisted is not None and device.type == "cuda"
        if non_blocking:
            noise, t1, t2, noise2 = (x.pin_memory() for x in (noise, t1, t2, noise2))
        with accelerator.autocast():
            cond_personal = run.conditioner.encode(
                tuple(ids.to(device, non_blocking=non_blocking) for ids in personal_ids), geometry
            )
            cond_clean, uncond = run.cond_clean, run.uncond
            if options.reencode_ids is not None:
                cond_clean, uncond = run.conditioner.encode_fixed_ids(options.reencode_ids, device, run.weight_dtype)
            loss_pers, loss_align = options.losses(
                run.unet,
                run.base_unet,
                latents,
                noise.to(device, run.weight_dtype, non_blocking=non_blocking),
                t1.to(device, non_blocking=non_blocking),
                t2.to(device, non_blocking=non_blocking),
                noise2.to(device, run.weight_dtype, non_blocking=non_blocking),
                cond_personal,
                cond_clean,
                uncond,
                process,
                run.alignment,
            )
        loss = loss_pers + run.alignment.weight * loss_align
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.trainable, run.args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, loss_pers, loss_align


def guided_epsilon_unbatched(unet, x_t, t, cond, uncond, scale, process):
    """'before' of the batched CFG pair: ε(y) and ε(∅) as two UNet calls."""
    if scale == 1.0:
        return tp.guided_epsilon(unet, x_t, t, cond, uncond, scale, process)
    cond = tp.Conditioning.of(cond)
    uncond = tp.Conditioning.of(uncond).to(cond.hidden.dtype).expand(x_t.shape[0])
    eps_cond = process.epsilon(cond.denoise(unet, x_t, t).float(), x_t.float(), t)
    eps_uncond = process.epsilon(uncond.denoise(unet, x_t, t).float(), x_t.float(), t)
    return tp.classifier_free_guidance(eps_uncond, eps_cond, scale)


def guided_epsilon_no_skip(unet, x_t, t, cond, uncond, scale, process):
    """'before' of the β = 1 shortcut: the batched pair runs even though ε^1 = ε(cond)."""
    batch = x_t.shape[0]
    cond = tp.Conditioning.of(cond)
    both = tp.Conditioning.cat([cond, tp.Conditioning.of(uncond).to(cond.hidden.dtype).expand(batch)])
    out = both.denoise(unet, torch.cat([x_t, x_t]), torch.cat([t, t]))
    eps = process.epsilon(out.float(), torch.cat([x_t, x_t]).float(), torch.cat([t, t]))
    eps_cond, eps_uncond = eps.chunk(2)
    return tp.classifier_free_guidance(eps_uncond, eps_cond, scale)


def palp_losses_with(guided=tp.guided_epsilon, pretrained_unet=None):
    """``train_palp.palp_losses`` with its guided-ε function and its pre-trained model as seams.

    With the defaults it computes exactly what ``palp_losses`` computes (checked by the tests). ``pretrained_unet``
    is a separate fp32 copy of the base UNet: the 'before' of running the frozen branch as the training UNet with its
    LoRA switched off, in the training dtype.
    """

    def losses(
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
    ):
        cond_personal, cond_clean = tp.Conditioning.of(cond_personal), tp.Conditioning.of(cond_clean)
        x_t1 = process.add_noise(latents, noise, t1)
        model_output = cond_personal.denoise(unet, x_t1, t1)
        loss_pers = process.personalization_loss(model_output, latents, noise, t1)
        if config.mode == "none" or config.weight == 0:
            return loss_pers, torch.zeros_like(loss_pers)
        eps_hat = process.epsilon(model_output.float(), x_t1.float(), t1)
        with torch.no_grad():
            x0_hat = process.original_sample(model_output.float(), x_t1.float(), t1)
            x_t2 = process.add_noise(x0_hat, noise2.float(), t2).to(latents.dtype)
            batch = latents.shape[0]
            clean = cond_clean.expand(batch)
            if pretrained_unet is None:
                with tp.lora_disabled(base_unet):
                    g_pre = guided(base_unet, x_t2, t2, clean, uncond, config.guidance_scale_pretrained, process)
            else:
                with torch.autocast(x_t2.device.type, enabled=False):
                    g_pre = guided(
                        pretrained_unet,
                        x_t2.float(),
                        t2,
                        clean.to(torch.float32),
                        tp.Conditioning.of(uncond).to(torch.float32),
                        config.guidance_scale_pretrained,
                        process,
                    )
            g_per = None
            if config.mode == "dds":
                g_per = guided(
                    base_unet,
                    x_t2,
                    t2,
                    cond_personal.for_alignment(),
                    uncond,
                    config.guidance_scale_personalized,
                    process,
                )
            direction = tp.alignment_direction(config.mode, g_pre, g_per, noise2.float())
        weight = tp.alignment_timestep_weight(process, t2, config.weighting)
        loss_align = tp.palp_alignment_loss(eps_hat, direction, process, t1, weight, config.rescale)
        return loss_pers, loss_align

    return losses


def passes_inputs(run, micro_steps):
    """For each micro-step, the inputs of the gradient-free passes as the step would have them: x_t2 (from the
    step's latents, ε2 and t2), t2, the noise process and y_P's embedding."""
    device, scheduler = run.accelerator.device, run.noise_scheduler
    process = run.conditioner.noise_process(scheduler, device)
    t_bounds = tp.timestep_bounds(
        scheduler.config.num_train_timesteps, run.args.timestep_min_ratio, run.args.timestep_max_ratio
    )
    inputs = {}
    for micro_step in micro_steps:
        generator = tp.step_generator(run.seed, run.accelerator.process_index, micro_step)
        latents, geometry, personal_ids = run.sample_batch(micro_step, generator)
        _, _, t2, noise2 = tp.sample_step_noise(latents.shape, process, t_bounds, run.alignment, generator)
        t2 = t2.to(device)
        with torch.no_grad(), run.accelerator.autocast():
            personal = run.conditioner.encode(tuple(ids.to(device) for ids in personal_ids), geometry)
            cond_personal = personal.for_alignment()
        x_t2 = process.add_noise(latents.float(), noise2.to(device).float(), t2).to(latents.dtype)
        inputs[micro_step] = (x_t2, t2, process, cond_personal)
    return inputs


def alignment_passes(run, inputs, guidance_scale_personalized):
    """The gradient-free calls ``palp_losses`` makes, alone: the pre-trained model on [y_c, ∅] (LoRA off) and the
    personalized model on [y_P, ∅] (one call when β = 1)."""
    x_t2, t2, process, cond_personal = inputs
    with torch.no_grad(), run.accelerator.autocast():
        batch = x_t2.shape[0]
        with tp.lora_disabled(run.base_unet):
            g_pre = tp.guided_epsilon(
                run.base_unet,
                x_t2,
                t2,
                run.cond_clean.expand(batch),
                run.uncond,
                run.alignment.guidance_scale_pretrained,
                process,
            )
        g_per = tp.guided_epsilon(
            run.base_unet, x_t2, t2, cond_personal, run.uncond, guidance_scale_personalized, process
        )
        return tp.alignment_direction("dds", g_pre, g_per)


@dataclass
class Variant:
    name: str
    run_once: Callable  # micro_step -> None
    resident_modules: list = field(default_factory=list)  # modules that only this variant keeps in memory


def build_variants(names, run, models, alpha, beta, micro_steps):
    dds = tp.AlignmentConfig(mode="dds", guidance_scale_pretrained=alpha, guidance_scale_personalized=beta)
    runs = {
        "none": replace(run, alignment=replace(dds, mode="none")),
        "dds": replace(run, alignment=dds),
        "dds_beta1": replace(run, alignment=replace(dds, guidance_scale_personalized=1.0)),
    }
    inputs = passes_inputs(runs["dds"], micro_steps) if {"passes", "passes_beta1"} & set(names) else {}
    device = run.accelerator.device
    reencode_ids = fixed_prompt_ids(models)
    hoisted = {
        "process": run.conditioner.noise_process(run.noise_scheduler, device),
        "t_bounds": tp.timestep_bounds(
            run.noise_scheduler.config.num_train_timesteps, run.args.timestep_min_ratio, run.args.timestep_max_ratio
        ),
    }

    def step(run_, options=None):
        return lambda micro_step: benchmark_step(run_, micro_step, options)

    factories = {
        "ti_db": lambda: Variant("ti_db", step(runs["none"])),
        "palp": lambda: Variant("palp", step(runs["dds"])),
        "passes": lambda: Variant("passes", lambda i: alignment_passes(runs["dds"], inputs[i], beta)),
        "palp_beta1": lambda: Variant("palp_beta1", step(runs["dds_beta1"])),
        "passes_beta1": lambda: Variant("passes_beta1", lambda i: alignment_passes(runs["dds"], inputs[i], 1.0)),
        "before_unbatched_cfg": lambda: Variant(
            "before_unbatched_cfg", step(runs["dds"], StepOptions(losses=palp_losses_with(guided_epsilon_unbatched)))
        ),
        "before_reencode_prompts": lambda: Variant(
            "before_reencode_prompts", step(runs["dds"], StepOptions(reencode_ids=reencode_ids))
        ),
        "before_beta1_no_skip": lambda: Variant(
            "before_beta1_no_skip",
            step(runs["dds_beta1"], StepOptions(losses=palp_losses_with(guided_epsilon_no_skip))),
        ),
        "before_frozen_copy": lambda: Variant(
            "before_frozen_copy",
            step(runs["dds"], StepOptions(losses=palp_losses_with(pretrained_unet=models.frozen_copy))),
            resident_modules=[models.frozen_copy],
        ),
        "hoisted": lambda: Variant("hoisted", step(runs["dds"], StepOptions(hoisted=hoisted))),
    }
    return [factories[name]() for name in names]


# ----------------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants, micro_steps, warmup, device, round_order="fixed"):
    """Rounds a, b, c, a, b, c, ...: every variant of a round runs micro-step i (same draws); the first ``warmup``
    rounds are not kept. With ``round_order="alternating"`` every other round runs backwards (a, b, c, c, b, a, ...):
    when the machine's load drifts during a round, the variants late in one round are early in the next."""
    times = {variant.name: [] for variant in variants}
    for round_index, micro_step in enumerate(micro_steps):
        backwards = round_order == "alternating" and (round_index - warmup) % 2 == 1
        for variant in reversed(variants) if backwards else variants:
            synchronize(device)
            start = time.perf_counter()
            variant.run_once(micro_step)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[variant.name].append(elapsed)
            # Progress on stderr: a full-size CPU round takes minutes.
            kind = "warm-up" if round_index < warmup else "timed"
            print(
                f"  {kind} round {round_index + 1}/{len(micro_steps)} {variant.name}: {elapsed:.3f} s", file=sys.stderr
            )
    return times


def tensor_bytes(tensors):
    """Bytes of the distinct storages behind ``tensors`` (tied or shared weights count once)."""
    storages = {}
    for tensor in tensors:
        if torch.is_tensor(tensor):
            storage = tensor.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def resident_tensors(run, modules):
    """What a step keeps between steps: weights, buffers, optimizer state and the fixed prompt embeddings."""
    tensors = []
    for cond in (run.cond_clean, run.uncond):
        tensors += cond.tensors()
    for module in (run.base_unet, *run.base_text_encoders, *modules):
        tensors += list(module.parameters()) + list(module.buffers())
        tensors += quantization_state_tensors(module)
    for state in run.optimizer.state_dict()["state"].values():
        tensors += [value for value in state.values() if torch.is_tensor(value)]
    return tensors


def quantization_state_tensors(module):
    """What bitsandbytes keeps beside a quantized weight, outside parameters and buffers: the NF4 block scales and
    code (``weight.quant_state``), the int8 row scales (``weight.SCB``)."""
    tensors = []
    for param in module.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            tensors += [state.absmax, state.code, getattr(state, "offset", None)]
            state = getattr(state, "state2", None)
        tensors.append(getattr(param, "SCB", None))
    return tensors


def step_memory_increment(fn, device, cuda_peaks=None):
    """Peak bytes allocated above what was allocated when ``fn`` started.

    CUDA: the caching allocator's own peak counter (its raw value is appended to ``cuda_peaks``). CPU:
    torch.profiler records every allocation and free of the CPU allocator with its size; the running sum of those
    events, in time order, peaks at the step's increment.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        if cuda_peaks is not None:
            cuda_peaks.append(peak)
        return peak - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def count_host_syncs(fn, device):
    """Host-device synchronisations of one call of ``fn`` (CUDA only): each one stops the host until the GPU has
    finished everything queued, so the next kernels cannot be queued ahead."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(warning.message) for warning in caught)


def median(values):
    return statistics.median(values) if values else None


def summarize(times, memory, syncs):
    """Per-variant medians and memory, then the ratios the benchmark exists for."""
    variants = {}
    for name, values in times.items():
        variants[name] = {
            "description": VARIANT_DESCRIPTIONS[name],
            "times_s": values,
            "median_s": median(values),
            "min_s": min(values),
            "max_s": max(values),
        }
        if name in memory:
            variants[name].update(memory[name])
        if syncs.get(name) is not None:
            variants[name]["host_syncs_per_step"] = syncs[name]
    med = {name: entry["median_s"] for name, entry in variants.items()}
    ratios = {}
    for suffix, step, passes in (("", "palp", "passes"), ("_beta1", "palp_beta1", "passes_beta1")):
        if not {"ti_db", step, passes} <= med.keys():
            continue
        ratios[f"floor_ratio{suffix}"] = med[step] / (med["ti_db"] + med[passes])
        ratios[f"{step}_over_ti_db_time"] = med[step] / med["ti_db"]
        # The same ratio within each round, where a drifting machine load hits the three variants alike.
        per_round = [b / (a + c) for a, b, c in zip(times["ti_db"], times[step], times[passes])]
        ratios[f"floor_ratio{suffix}_per_round"] = per_round
        ratios[f"floor_ratio{suffix}_round_median"] = median(per_round)
    if "ti_db" in memory:
        for name in ("palp", "palp_beta1"):
            if name in memory:
                suffix = "" if name == "palp" else "_beta1"
                ratios[f"memory_ratio{suffix}"] = memory[name]["peak_bytes"] / memory["ti_db"]["peak_bytes"]
                ratios[f"memory_increment_ratio{suffix}"] = (
                    memory[name]["increment_bytes"] / memory["ti_db"]["increment_bytes"]
                )
    before_after = []
    for before, after in BEFORE_AFTER_PAIRS:
        if before in med and after in med:
            entry = {
                "before": before,
                "after": after,
                "before_s": med[before],
                "after_s": med[after],
                "speedup": med[before] / med[after],
            }
            if before in memory and after in memory:
                entry["before_peak_bytes"] = memory[before]["peak_bytes"]
                entry["after_peak_bytes"] = memory[after]["peak_bytes"]
            before_after.append(entry)
    return variants, ratios, before_after


def measure_setting(accelerator, models, setting, args, names):
    device = accelerator.device
    set_gradient_checkpointing(models, setting["gradient_checkpointing"])
    run = build_run(
        accelerator,
        models,
        setting["resolution"],
        setting["batch_size"],
        tp.AlignmentConfig(),
        setting["weight_dtype"],
        args.seed,
        setting["use_8bit_adam"],
    )
    run.unet.train()
    micro_steps = list(range(args.warmup + args.repeats))
    # The memory and synchronisation probes run one more micro-step: the same draws for every variant.
    probe_step = len(micro_steps)
    variants = build_variants(
        names,
        run,
        models,
        args.guidance_scale_pretrained,
        args.guidance_scale_personalized,
        micro_steps + [probe_step],
    )
    times = time_interleaved(variants, micro_steps, args.warmup, device, args.round_order)
    memory, syncs = {}, {}
    for variant in variants:
        if args.memory:
            cuda_peaks = []
            increment = step_memory_increment(lambda: variant.run_once(probe_step), device, cuda_peaks)
            resident = tensor_bytes(resident_tensors(run, variant.resident_modules))
            memory[variant.name] = {
                "increment_bytes": increment,
                "resident_bytes": resident,
                "peak_bytes": resident + increment,
            }
            if cuda_peaks:
                memory[variant.name]["cuda_max_memory_allocated_bytes"] = cuda_peaks[0]
        syncs[variant.name] = count_host_syncs(lambda: variant.run_once(probe_step), device)
    variants_summary, ratios, before_after = summarize(times, memory, syncs)
    return {
        "model": args.model,
        "device": device.type,
        "mixed_precision": args.mixed_precision,
        "resolution": setting["resolution"],
        "latent_size": setting["resolution"] // LATENT_SCALE_FACTOR,
        "batch_size": setting["batch_size"],
        "gradient_checkpointing": setting["gradient_checkpointing"],
        "use_8bit_adam": setting["use_8bit_adam"],
        "base_quantization": setting["base_quantization"],
        "unet_parameters": models.unet_parameters,
        "rank": args.rank,
        "guidance_scale_pretrained": args.guidance_scale_pretrained,
        "guidance_scale_personalized": args.guidance_scale_personalized,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "round_order": args.round_order,
        "variants": variants_summary,
        "ratios": ratios,
        "before_after": before_after,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def machine_info(device):
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def mib(nbytes):
    return nbytes / 2**20


def format_setting(result):
    lines = [
        f"== {result['model']} | {result['resolution']} px ({result['latent_size']}×{result['latent_size']} latents) "
        f"| batch {result['batch_size']} | gradient checkpointing {'on' if result['gradient_checkpointing'] else 'off'} "
        f"| {'AdamW8bit' if result['use_8bit_adam'] else 'AdamW'} | base {result['base_quantization']} "
        f"| {result['device']} {result['mixed_precision']} | α={result['guidance_scale_pretrained']} "
        f"β={result['guidance_scale_personalized']} | medians of {result['repeats']} interleaved rounds ==",
        f"{'variant':<24}{'what':<42}{'median s':>10}{'min s':>9}{'max s':>9}{'peak MiB':>11}{'step MiB':>10}"
        f"{'syncs':>7}",
    ]
    for name, entry in result["variants"].items():
        peak = f"{mib(entry['peak_bytes']):.1f}" if "peak_bytes" in entry else "-"
        step = f"{mib(entry['increment_bytes']):.1f}" if "increment_bytes" in entry else "-"
        syncs = str(entry.get("host_syncs_per_step", "-"))
        lines.append(
            f"{name:<24}{entry['description']:<42}{entry['median_s']:>10.4f}{entry['min_s']:>9.4f}"
            f"{entry['max_s']:>9.4f}{peak:>11}{step:>10}{syncs:>7}"
        )
    ratios = result["ratios"]
    for suffix, step, label in (("", "palp", "floor ratio      "), ("_beta1", "palp_beta1", "floor ratio β=1  ")):
        if f"floor_ratio{suffix}" not in ratios:
            continue
        ratio = ratios[f"floor_ratio{suffix}"]
        verdict = "meets" if ratio <= FLOOR_RATIO_GOAL else "misses"
        rounds = ", ".join(f"{value:.3f}" for value in ratios[f"floor_ratio{suffix}_per_round"])
        lines.append(
            f"{label} PALP / (TI+DB + passes alone) = {ratio:.3f} ({verdict} the goal ≤ {FLOOR_RATIO_GOAL}); "
            f"per round: {rounds} (median {ratios[f'floor_ratio{suffix}_round_median']:.3f}); "
            f"PALP / TI+DB = {ratios[f'{step}_over_ti_db_time']:.2f}×"
        )
    if "memory_ratio" in ratios:
        verdict = "meets" if ratios["memory_ratio"] <= MEMORY_RATIO_GOAL else "misses"
        lines.append(
            f"memory ratio      PALP / TI+DB peak = {ratios['memory_ratio']:.3f}  ({verdict} the goal ≤ "
            f"{MEMORY_RATIO_GOAL}); step increment only: {ratios['memory_increment_ratio']:.3f}"
        )
    for entry in result["before_after"]:
        memory = ""
        if "before_peak_bytes" in entry:
            memory = f"; peak {mib(entry['before_peak_bytes']):.1f} → {mib(entry['after_peak_bytes']):.1f} MiB"
        lines.append(
            f"before/after      {entry['before']} {entry['before_s']:.4f} s → {entry['after']} {entry['after_s']:.4f} s "
            f"(speed-up {entry['speedup']:.2f}×{memory})"
        )
    return "\n".join(lines)


def format_scaling(results):
    """One line per setting: how the step and its overhead grow with resolution and batch size."""
    lines = [
        "== scaling ==",
        f"{'res':>5}{'batch':>6}{'ckpt':>6}{'TI+DB s':>10}{'PALP s':>10}{'passes s':>10}{'PALP/TI+DB':>12}"
        f"{'floor':>8}{'by round':>10}{'TI+DB MiB':>11}{'PALP MiB':>10}{'mem ratio':>11}",
    ]
    for result in results:
        variants, ratios = result["variants"], result["ratios"]
        if not {"ti_db", "palp", "passes"} <= variants.keys():
            continue
        ti_db_mib = f"{mib(variants['ti_db']['peak_bytes']):.1f}" if "peak_bytes" in variants["ti_db"] else "-"
        palp_mib = f"{mib(variants['palp']['peak_bytes']):.1f}" if "peak_bytes" in variants["palp"] else "-"
        memory_ratio = f"{ratios['memory_ratio']:.3f}" if "memory_ratio" in ratios else "-"
        lines.append(
            f"{result['resolution']:>5}{result['batch_size']:>6}{'on' if result['gradient_checkpointing'] else 'off':>6}"
            f"{variants['ti_db']['median_s']:>10.4f}{variants['palp']['median_s']:>10.4f}"
            f"{variants['passes']['median_s']:>10.4f}{ratios['palp_over_ti_db_time']:>12.2f}"
            f"{ratios['floor_ratio']:>8.3f}{ratios['floor_ratio_round_median']:>10.3f}{ti_db_mib:>11}{palp_mib:>10}{memory_ratio:>11}"
        )
    return "\n".join(lines)


def memory_options(results):
    """Peak memory of each (base quantization, optimizer) setting as a ratio of the full-precision base with AdamW
    at the same resolution, batch and checkpointing: all measured in one run."""
    key = lambda r: (r["resolution"], r["batch_size"], r["gradient_checkpointing"])  # noqa: E731
    baselines = {key(r): r for r in results if r["base_quantization"] == "none" and not r["use_8bit_adam"]}
    rows = []
    for result in results:
        baseline = baselines.get(key(result))
        row = {
            "base_quantization": result["base_quantization"],
            "optimizer": "AdamW8bit" if result["use_8bit_adam"] else "AdamW",
            "resolution": result["resolution"],
            "batch_size": result["batch_size"],
            "gradient_checkpointing": result["gradient_checkpointing"],
        }
        for name in ("palp", "ti_db"):
            entry = result["variants"].get(name, {})
            if "peak_bytes" not in entry:
                continue
            row[f"{name}_peak_bytes"] = entry["peak_bytes"]
            row[f"{name}_resident_bytes"] = entry["resident_bytes"]
            row[f"{name}_increment_bytes"] = entry["increment_bytes"]
            base_entry = baseline["variants"].get(name, {}) if baseline else {}
            if "peak_bytes" in base_entry:
                row[f"{name}_peak_ratio"] = entry["peak_bytes"] / base_entry["peak_bytes"]
        rows.append(row)
    return rows


def format_memory_options(results):
    lines = [
        "== memory: base quantization × optimizer (peak ratio against the full-precision base with AdamW) ==",
        f"{'base':>6}{'optimizer':>11}{'res':>6}{'batch':>6}{'ckpt':>6}{'PALP peak MiB':>15}{'resident MiB':>14}"
        f"{'step MiB':>10}{'ratio':>8}{'TI+DB MiB':>11}{'ratio':>8}",
    ]
    for row in memory_options(results):
        if "palp_peak_bytes" not in row:
            continue
        ti_db = f"{mib(row['ti_db_peak_bytes']):.1f}" if "ti_db_peak_bytes" in row else "-"
        ti_db_ratio = f"{row['ti_db_peak_ratio']:.3f}" if "ti_db_peak_ratio" in row else "-"
        ratio = f"{row['palp_peak_ratio']:.3f}" if "palp_peak_ratio" in row else "-"
        lines.append(
            f"{row['base_quantization']:>6}{row['optimizer']:>11}{row['resolution']:>6}{row['batch_size']:>6}"
            f"{'on' if row['gradient_checkpointing'] else 'off':>6}{mib(row['palp_peak_bytes']):>15.1f}"
            f"{mib(row['palp_resident_bytes']):>14.1f}{mib(row['palp_increment_bytes']):>10.1f}{ratio:>8}"
            f"{ti_db:>11}{ti_db_ratio:>8}"
        )
    split = results[0].get("unet_parameters")
    if split:
        lines.append(
            f"Denoiser: {split['total'] / 1e6:.1f} M parameters, {split['quantized_weights'] / 1e6:.1f} M of them "
            f"({split['quantized_weights'] / split['total']:.1%}) in the linear weights that bitsandbytes quantizes"
        )
    return "\n".join(lines)


def main(args):
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    device = accelerator.device
    weight_dtype = tp.weight_dtype_for(accelerator.mixed_precision)
    names = selected_variants(args.variants)
    load_before = os.getloadavg()
    started = time.time()
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    optimizers = {"off": [False], "on": [True], "both": [False, True]}[args.use_8bit_adam]
    results = []
    for base_quantization in args.base_quantization:
        # One set of models at a time: the previous one (and accelerate's references to it) is freed first.
        models = None
        accelerator.free_memory()
        models = build_models(
            args.model,
            args.rank,
            device,
            weight_dtype,
            args.seed,
            with_frozen_copy="before_frozen_copy" in names,
            base_quantization=base_quantization,
        )
        for use_8bit_adam in optimizers:
            for gradient_checkpointing in checkpointing:
                for resolution, batch_size in parse_sizes(args):
                    setting = {
                        "resolution": resolution,
                        "batch_size": batch_size,
                        "gradient_checkpointing": gradient_checkpointing,
                        "use_8bit_adam": use_8bit_adam,
                        "base_quantization": base_quantization,
                        "weight_dtype": weight_dtype,
                    }
                    result = measure_setting(accelerator, models, setting, args, names)
                    results.append(result)
                    print(format_setting(result), flush=True)
                    print(flush=True)
    if len(results) > 1 and len(args.base_quantization) == 1 and args.use_8bit_adam != "both":
        print(format_scaling(results), flush=True)
    if len(args.base_quantization) > 1 or args.use_8bit_adam == "both":
        print(format_memory_options(results), flush=True)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(device),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_time_s": time.time() - started,
        "memory_method": "cuda: torch.cuda.max_memory_allocated - memory_allocated at step start"
        if device.type == "cuda"
        else "cpu: peak running sum of torch.profiler [memory] events (allocations - frees) during one step",
        "peak_definition": "resident bytes (weights, buffers, optimizer state, fixed embeddings) + step increment",
        "goals": {"floor_ratio": FLOOR_RATIO_GOAL, "memory_ratio": MEMORY_RATIO_GOAL},
        "settings": results,
        "memory_options": memory_options(results),
    }
    print(
        f"machine: {report['machine']['cpu_model']}, {report['machine']['cpus_available']} CPUs available, "
        f"{report['machine']['torch_threads']} torch threads, torch {report['machine']['torch']}"
        + (f", {report['machine']['gpu']}" if "gpu" in report["machine"] else "")
        + f"; load average {load_before[0]:.2f} before, {report['load_average_after'][0]:.2f} after; "
        f"{report['wall_time_s']:.0f} s"
    )
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main(parse_args())
