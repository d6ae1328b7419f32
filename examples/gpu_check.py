#!/usr/bin/env python
# coding=utf-8
# Copyright 2026 The PALP training scripts authors. Licensed under the Apache License, Version 2.0.
"""One command that checks train_palp.py on one GPU, with nothing downloaded.

    python examples/gpu_check.py                      # one CUDA device, SD 1.5 architecture, 512 px
    python examples/gpu_check.py --model sdxl         # SDXL base's architecture
    python examples/gpu_check.py --model sd3          # SD3.5 Medium's architecture (rectified flow), without T5
    python examples/gpu_check.py --model sd3 --dry_run                # print the plan, build and run nothing
    python examples/gpu_check.py --device cpu --model tiny --resolution 64 --max_train_steps 2   # smoke run

It builds a pipeline of the chosen architecture with random weights from configs (denoiser, VAE, CLIP text
encoder(s) and generated CLIP BPE tokenizers of the real vocabulary size), writes it to a folder and runs
``train_palp.py`` on it, in this process, as a user would. The architectures are benchmark_palp.py's: Stable
Diffusion 1.5; SDXL base (its UNet, CLIP ViT-L and OpenCLIP ViT-bigG, the 4-channel VAE); SD3.5 Medium (its MMDiT,
both CLIP encoders, the 16-channel VAE with ``shift_factor``, the shifted flow-matching scheduler). SD3 is built
without T5 (``text_encoder_3=None``, as the README advises for small GPUs): T5 is frozen and never sees the token, so
it adds memory but no code path that PALP touches. ``tiny``, ``tiny_sdxl`` and ``tiny_sd3`` are tiny layouts of
each family for a CPU smoke run. The runs:

1. fp16 (``no`` on the CPU) with ``--gradient_checkpointing``, plus ``--use_8bit_adam`` when bitsandbytes is
   installed and ``--enable_xformers_memory_efficient_attention`` when xformers is (CUDA only), one
   ``--validation_steps`` validation half-way and a checkpoint half-way;
2. the same run resumed from that checkpoint into another folder: it must end with the uninterrupted run's weights
   (bit-exact on the CPU; on CUDA within a few Adam steps' size, because CUDA attention kernels are not deterministic);
3. bf16 (where the device supports it).

After each run: every logged loss is finite, the LoRA and the token row are fp32 while the frozen weights are in the
training dtype, the mid-run validation image exists, every validation image decodes finite and not constant (the
VAE decodes outside autocast), and the outputs load into a fresh pipeline of the family as sample_palp.py loads them
(``load_lora_weights``, then ``load_textual_inversion``, or SD3's model-card lines) and sample a finite image. Last,
``benchmark_palp.py`` measures the floor ratio (PALP step / (TI+DB step + the gradient-free passes alone)) and the
memory ratio (PALP / TI+DB peak) at the same resolution in fp16 (bf16 for SD3). A summary is printed and every
figure goes to ``--output_json``.
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES.parent
for folder in (REPO_ROOT, EXAMPLES):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import benchmark_palp as bench  # noqa: E402
import sample_palp  # noqa: E402

import train_palp as tp  # noqa: E402

TOKEN = "<palp-check>"
TARGET_PROMPT = f"A sketch of {TOKEN} in Paris"
# Words the generated tokenizer knows as single tokens; everything else falls back to bytes, as with CLIP's.
WORDS = "a an the photo of sketch in paris cat".split()

SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    sample_size=512,
)
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    sample_size=16,
)
# SDXL's VAE: SD's layout with its own scaling factor (and force_upcast, diffusers' default, for fp16).
SDXL_VAE_CONFIG = dict(SD15_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025)
# SD3's VAE: 16 latent channels, no quant convs, latents (z - shift_factor) · scaling_factor.
SD3_VAE_CONFIG = dict(
    SD15_VAE_CONFIG,
    latent_channels=16,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.0609,
    scaling_factor=1.5305,
)
TINY_SD3_VAE_CONFIG = dict(
    TINY_VAE_CONFIG,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.0609,
    scaling_factor=1.5305,
)
# --model -> (pipeline class name, benchmark_palp.py architecture, VAE config, real CLIP vocabularies)
MODELS = {
    "sd15": ("StableDiffusionPipeline", "sd15", SD15_VAE_CONFIG, True),
    "sdxl": ("StableDiffusionXLPipeline", "sdxl", SDXL_VAE_CONFIG, True),
    "sd3": ("StableDiffusion3Pipeline", "sd3", SD3_VAE_CONFIG, True),
    "tiny": ("StableDiffusionPipeline", "tiny", TINY_VAE_CONFIG, False),
    "tiny_sdxl": ("StableDiffusionXLPipeline", "tiny_sdxl", TINY_VAE_CONFIG, False),
    "tiny_sd3": ("StableDiffusion3Pipeline", "tiny_sd3", TINY_SD3_VAE_CONFIG, False),
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Check train_palp.py end to end on one GPU (fp16, bf16, checkpointing, 8-bit Adam, xformers, "
        "validation, resume) and print the benchmark's floor and memory ratios; nothing is downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", type=str, default="cuda", choices=["cuda", "cpu"], help="Where to train.")
    parser.add_argument(
        "--model",
        type=str,
        default="sd15",
        choices=list(MODELS),
        help="'sd15', 'sdxl', 'sd3': Stable Diffusion 1.5's, SDXL base's or SD3.5 Medium's architecture (SD3 without "
        "T5) with random weights; 'tiny', 'tiny_sdxl', 'tiny_sd3': tiny layouts of each family (a smoke run of the "
        "same checks in seconds).",
    )
    parser.add_argument("--resolution", type=int, default=512, help="Training and benchmark resolution in pixels.")
    parser.add_argument(
        "--max_train_steps", type=int, default=6, help="Optimizer steps per run (even: the checkpoint is half-way)."
    )
    parser.add_argument(
        "--benchmark", action=argparse.BooleanOptionalAction, default=True, help="Also run the benchmark's ratios."
    )
    parser.add_argument(
        "--work_dir", type=str, default=None, help="Where the model and runs go (default: a temp dir)."
    )
    parser.add_argument("--output_json", type=str, default=None, help="Also write every figure to this JSON file.")
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="Print the plan (model, precisions, flags, runs, checks, benchmark command) and stop; builds nothing "
        "and needs no GPU.",
    )
    args = parser.parse_args(input_args)
    multiple = bench.resolution_multiple(MODELS[args.model][1])
    if args.resolution <= 0 or args.resolution % multiple:
        parser.error(
            f"--resolution must be a positive multiple of {multiple} for --model {args.model} (the benchmark's "
            f"{'UNet down-sampling' if multiple == 64 else 'transformer patches'}), e.g. "
            f"{max(multiple, args.resolution // multiple * multiple)}."
        )
    if args.max_train_steps < 2 or args.max_train_steps % 2:
        parser.error("--max_train_steps must be an even number ≥ 2 (the resume starts half-way).")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        parser.error("--device cuda: no CUDA device is visible; use --device cpu --model tiny for a smoke run.")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# A random-weight pipeline, nothing downloaded
# ----------------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode():
    """The byte → printable-unicode table of GPT-2/CLIP byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(vocab_size):
    """A CLIP byte-level BPE tokenizer: bytes, ``WORDS`` as single tokens, unused fillers up to ``vocab_size - 2``,
    then <|startoftext|> and <|endoftext|> at the end, where CLIP has them (49406, 49407 for SD 1.5)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    for index in range(len(vocab), vocab_size - 2):
        vocab[f"<unused-{index}>"] = index
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_model_folder(path, model):
    """Write a random-weight pipeline of ``model``'s family in the diffusers layout to ``path``."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextConfig

    pipeline_name, architecture, vae_config, real_vocabulary = MODELS[model]
    family, denoiser_config, text_configs, scheduler_config = bench.ARCHITECTURES[architecture]
    torch.manual_seed(0)
    tokenizer = build_tokenizer(
        text_configs[0]["vocab_size"] if real_vocabulary else len(_bytes_to_unicode()) * 2 + 64
    )
    text_encoders = []
    for encoder_class, config in zip(family.encoder_classes, text_configs):
        config = dict(config, vocab_size=len(tokenizer), pad_token_id=tokenizer.eos_token_id)
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        text_encoders.append(encoder_class(CLIPTextConfig(**config)))
    denoiser = family.denoiser_class(**denoiser_config)
    vae = AutoencoderKL(**vae_config)
    ddpm = dict(scheduler_config, clip_sample=False, steps_offset=1)
    if pipeline_name == "StableDiffusionPipeline":
        pipe = StableDiffusionPipeline(
            unet=denoiser,
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizer,
            scheduler=DDPMScheduler(**ddpm),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif pipeline_name == "StableDiffusionXLPipeline":
        pipe = StableDiffusionXLPipeline(
            unet=denoiser,
            vae=vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tokenizer,
            tokenizer_2=build_tokenizer(len(tokenizer)),
            # SDXL base's sampler on the same ᾱ schedule (train_palp.py reads it as its DDPM training schedule).
            scheduler=EulerDiscreteScheduler(**dict(scheduler_config, steps_offset=1)),
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusion3Pipeline(
            transformer=denoiser,
            vae=vae,
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=tokenizer,
            tokenizer_2=build_tokenizer(len(tokenizer)),
            text_encoder_3=None,
            tokenizer_3=None,
            scheduler=family.scheduler_class(**scheduler_config),
        )
    pipe.save_pretrained(path)
    return path


def write_subject_images(folder, resolution, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(n):
        image = np.full((resolution, resolution, 3), 128, dtype=np.uint8)
        lo, hi = resolution // 4, 3 * resolution // 4
        image[lo:hi, lo:hi] = rng.integers(0, 255, size=3, dtype=np.uint8)
        Image.fromarray(image).save(folder / f"subject_{index}.png")
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# Runs and checks
# ----------------------------------------------------------------------------------------------------------------------


def reset_accelerate_state():
    """accelerate keeps process-wide singletons; the next in-process run needs them cleared."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def optional_flags(device):
    """The speed and memory flags a GPU user would add, where their packages are installed."""
    import importlib.util

    flags = ["--gradient_checkpointing"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        flags.append("--use_8bit_adam")
    if device == "cuda" and importlib.util.find_spec("xformers") is not None:
        flags.append("--enable_xformers_memory_efficient_attention")
    return flags


@contextmanager
def recorded_losses():
    """Every micro-step's (loss, L_pers, L_align), taken from train_palp.training_step as the loop calls it."""
    losses = []
    original = tp.training_step

    def recording(run, micro_step):
        result = original(run, micro_step)
        losses.append([float(value.detach().float()) for value in result])
        return result

    tp.training_step = recording
    try:
        yield losses
    finally:
        tp.training_step = original


@contextmanager
def recorded_validation_images():
    """Every validation image as train_palp.decode_latents returns it: in [-1, 1] and in float, before the PNG's
    quantisation turns a NaN into black."""
    images = []
    original = tp.decode_latents

    def recording(vae, latents):
        decoded = original(vae, latents)
        images.extend(decoded.detach().float().cpu())
        return decoded

    tp.decode_latents = recording
    try:
        yield images
    finally:
        tp.decode_latents = original


def train(argv):
    reset_accelerate_state()
    started = time.time()
    with recorded_losses() as losses, recorded_validation_images() as images:
        run = tp.main(tp.parse_args(argv))
    return run, losses, images, time.time() - started


def check_run(run, losses, out, weight_dtype, validation_step):
    """Finite losses, fp32 trainables over frozen weights in the training dtype, the mid-run validation image."""
    assert losses and all(math.isfinite(v) for step in losses for v in step), f"non-finite loss in {losses}"
    lora = [p for n, p in run.base_unet.named_parameters() if "lora_" in n]
    frozen = [p for n, p in run.base_unet.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora), "LoRA is not fp32"
    assert all(rows.dtype == torch.float32 for rows in run.conditioner.trainable_rows), "the token row is not fp32"
    assert all(p.dtype == weight_dtype and not p.requires_grad for p in frozen), "frozen weights in the wrong dtype"
    if validation_step is not None:
        assert (out / "samples" / f"step-{validation_step}_0.png").is_file(), "no mid-run validation image"


def check_validation_images(images, expected):
    """The validation images as decoded: as many as asked for, every one finite and not constant (an fp16 VAE
    overflow gives NaN, which the saved PNG shows as a black square)."""
    assert len(images) == expected, f"{len(images)} validation images decoded, expected {expected}"
    for index, image in enumerate(images):
        assert torch.isfinite(image).all(), f"validation image {index} is non-finite"
        assert image.amax() > image.amin(), f"validation image {index} is constant ({image.amin().item()})"


def check_outputs_load(model_dir, out, device, resolution, dtype):
    """The outputs in a fresh pipeline of the family, loaded as sample_palp.py loads them (the LoRA, then the token
    by ``load_textual_inversion`` or SD3's model-card lines); one sampled image must be finite."""
    pipe = sample_palp.load_pipeline(
        str(model_dir), out / tp.LORA_NAME, [out / tp.EMBEDDINGS_NAME], device, dtype, safety_checker=False
    )
    image = pipe(
        sample_palp.pipeline_prompt(pipe, TARGET_PROMPT),
        num_inference_steps=4,
        height=resolution,
        width=resolution,
        output_type="np",
        generator=torch.Generator(device=device).manual_seed(0),
    ).images
    assert np.isfinite(image).all(), "the loaded outputs sample a non-finite image"
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()


def max_difference(a_dir, b_dir):
    from safetensors.torch import load_file

    a, b = load_file(a_dir / tp.LORA_NAME), load_file(b_dir / tp.LORA_NAME)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def precisions(device, bf16_supported=None):
    if device == "cpu":
        return ["no", "bf16"]
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return ["fp16", "bf16"] if bf16_supported else ["fp16"]


def benchmark_flags(args):
    """benchmark_palp.py's command line for the ratios at this resolution: fp16 on CUDA (bf16 for SD3, the precision
    its README trains in), fp32 on the CPU."""
    architecture = MODELS[args.model][1]
    precision = "no" if args.device == "cpu" else ("bf16" if MODELS[args.model][0].endswith("3Pipeline") else "fp16")
    return ["--model", architecture, "--device", args.device, "--mixed_precision", precision, "--resolution",
            str(args.resolution), "--variants", "core", "--repeats", "3"]  # fmt: skip


def plan(args, bf16_supported=None):
    """What a run of this script does, as printable lines: ``--dry_run`` prints them and stops."""
    pipeline_name, architecture, _, _ = MODELS[args.model]
    family = bench.ARCHITECTURES[architecture][0]
    if args.device == "cuda" and bf16_supported is None and not torch.cuda.is_available():
        bf16_supported = True  # planned on a machine without the GPU: bf16 runs where the GPU supports it
    runs = precisions(args.device, bf16_supported)
    half = args.max_train_steps // 2
    lines = [
        f"model: {args.model} ({pipeline_name}, {family.denoiser_class.__name__} + {len(family.encoder_classes)} "
        f"CLIP encoder(s){', no T5' if family is tp.SD3TextConditioner else ''}), random weights, nothing downloaded",
        f"device: {args.device}; resolution {args.resolution} px; {args.max_train_steps} steps per run",
        f"flags (those whose packages are installed here): {' '.join(optional_flags(args.device))}",
        f"noise process: {'rectified flow' if family is tp.SD3TextConditioner else 'DDPM'}; LoRA on "
        f"{', '.join(family.lora_target_modules)}",
    ]
    for index, precision in enumerate(runs):
        lines.append(
            f"run {precision}: train with a validation and a checkpoint at step {half}; check losses finite, "
            "LoRA and token rows fp32, validation images finite and not constant, outputs load and sample"
        )
        if index == 0:
            lines.append(
                f"run {precision}-resumed: resume from checkpoint-{half}; must end with the uninterrupted run's LoRA"
            )
    if args.benchmark:
        lines.append("benchmark: python examples/benchmark_palp.py " + " ".join(benchmark_flags(args)))
    return lines


def main(args):
    import os

    if args.dry_run:
        for line in plan(args):
            print(line, flush=True)
        return {"plan": plan(args)}
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # train on the CPU even where a GPU is visible
    started = time.time()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="palp-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_folder(work / "model", args.model)
    images = write_subject_images(work / "subject", max(args.resolution, 64))
    half = args.max_train_steps // 2
    learning_rate = 5e-5
    extra = optional_flags(args.device)
    report = {"device": args.device, "model": args.model, "resolution": args.resolution, "flags": extra, "runs": {}}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)

    def argv(out, mixed_precision, *more):
        return [
            "--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(images),
            "--placeholder_token", TOKEN, "--class_name", "cat", "--target_prompt", TARGET_PROMPT,
            "--output_dir", str(out), "--resolution", str(args.resolution), "--max_train_steps",
            str(args.max_train_steps), "--checkpointing_steps", str(half), "--mixed_precision", mixed_precision,
            "--learning_rate", str(learning_rate), "--seed", "0", "--num_validation_images", "1",
            "--validation_num_inference_steps", "4", "--report_to", "none", *extra, *more,
        ]  # fmt: skip

    for index, mixed_precision in enumerate(precisions(args.device)):
        out = work / f"run-{mixed_precision}"
        shutil.rmtree(out, ignore_errors=True)
        run, losses, decoded, seconds = train(argv(out, mixed_precision, "--validation_steps", str(half)))
        weight_dtype = tp.weight_dtype_for(run.accelerator.mixed_precision)
        check_run(run, losses, out, weight_dtype, half)
        check_validation_images(decoded, expected=2)  # half-way and final
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        del run
        check_outputs_load(model_dir, out, args.device, args.resolution, weight_dtype)
        figures = {"seconds": round(seconds, 1), "first_loss": losses[0], "last_loss": losses[-1]}
        if args.device == "cuda":
            figures["peak_gib"] = round(peak, 2)
        if index == 0:  # resume the first precision from its half-way checkpoint
            resumed = work / f"run-{mixed_precision}-resumed"
            shutil.rmtree(resumed, ignore_errors=True)
            run, resumed_losses, decoded, _ = train(argv(resumed, mixed_precision, "--resume_from_checkpoint",
                                                         str(out / f"checkpoint-{half}")))  # fmt: skip
            check_validation_images(decoded, expected=1)
            assert run.global_step == args.max_train_steps and len(resumed_losses) == args.max_train_steps - half
            del run
            check_outputs_load(model_dir, resumed, args.device, args.resolution, weight_dtype)
            difference = max_difference(out, resumed)
            # Bit-exact on the CPU; on CUDA, nondeterministic attention kernels may move each Adam step by up to a
            # few learning rates.
            bound = 0.0 if args.device == "cpu" else 4 * learning_rate * (args.max_train_steps - half)
            assert difference <= bound, f"resume differs from the uninterrupted run by {difference} (> {bound})"
            figures["resume_max_difference"] = difference
        report["runs"][mixed_precision] = figures
        print(f"[{mixed_precision}] ok: {figures}", flush=True)

    if args.benchmark:
        report["benchmark"] = benchmark_ratios(args)
    report["wall_time_s"] = round(time.time() - started, 1)
    print(json.dumps({"summary": report}, indent=2, default=str), flush=True)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(report, indent=2, default=str))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def benchmark_ratios(args):
    """benchmark_palp.py's floor and memory ratios at this resolution (see :func:`benchmark_flags`)."""
    flags = benchmark_flags(args)
    precision = flags[flags.index("--mixed_precision") + 1]
    reset_accelerate_state()
    result = bench.main(bench.parse_args(flags))["settings"][0]
    ratios = result["ratios"]
    figures = {
        "mixed_precision": precision,
        "floor_ratio": ratios["floor_ratio"],
        "floor_ratio_goal": bench.FLOOR_RATIO_GOAL,
        "memory_ratio": ratios.get("memory_ratio"),
        "memory_ratio_goal": bench.MEMORY_RATIO_GOAL,
        "palp_over_ti_db_time": ratios["palp_over_ti_db_time"],
    }
    print(f"[benchmark] {figures}", flush=True)
    return figures


if __name__ == "__main__":
    main(parse_args())
