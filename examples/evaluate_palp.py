#!/usr/bin/env python
"""Measure a PALP model the way the paper does: text alignment with the clean prompt and image alignment with
the subject's photos.

The script either generates ``--num_images`` images of ``--target_prompt`` (base model + the LoRA and learned
token embeddings found in ``--trained_dir``, seeds ``--seed``, ``--seed + 1``, ...) or reads an existing folder of
images (``--image_dir``), then writes ``metrics.json`` and ``metrics.md`` to ``--output_dir``. Flags left out
(base model, target and clean prompts, instance folder) are read from ``--trained_dir/training_config.json``, so

    python examples/evaluate_palp.py --trained_dir palp-cat-sketch --prompt_elements "style=a sketch" "ambiance=Paris"

evaluates a run on the prompt it was trained for.

Metrics (all raw cosine similarities in [-1, 1], no ×100 or ×2.5 rescaling; the paper reports e.g. 0.340):

- ``clip_t``: mean over generated images g of cos(CLIP_img(g), CLIP_txt(y_c)), where y_c is the **clean** prompt
  (the target prompt with the learned token replaced by the class noun: "A sketch of a cat in Paris").
  CLIP_img / CLIP_txt are the projected embeddings of ``CLIPModel.get_image_features`` /
  ``get_text_features``; images go through the CLIP model's own image processor.
- ``clip_t_elements[name]``: the same mean, against the text of one prompt element (the paper's Table 2
  columns: style, class, ambiance, ...), given as ``--prompt_elements "style=a sketch" "ambiance=Paris"``.
- ``clip_i``: mean over all (generated g, instance r) pairs of cos(CLIP_img(g), CLIP_img(r)), r running over the
  images of every ``--instance_data_dir`` (per folder as well in ``clip_i_per_subject`` when there are several).
- ``dino`` (only with ``--dino_model_name_or_path``, e.g. ``facebook/dino-vits16``, the DreamBench metric): mean
  over the same pairs of the cosine between the ViT [CLS] features (last hidden state, position 0), images going
  through the DINO model's own image processor.

The paper uses CLIP ViT-B/32 (``openai/clip-vit-base-patch32``), SD v1.4, 8 samples per prompt.
"""

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
from PIL import Image

# Loading a trained folder is the sampling script's job; the two example scripts live side by side.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_palp import (  # noqa: E402
    find_trained_weights,
    load_pipeline,
    lora_scale_kwargs,
    pipeline_prompt,
    read_embedding_token,
    resolve_device_and_dtype,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METRIC_DEFINITIONS = {
    "clip_t": "mean_g cos(CLIP_img(g), CLIP_txt(clean_prompt)), raw cosine",
    "clip_t_elements": "mean_g cos(CLIP_img(g), CLIP_txt(element text)), raw cosine, one value per element",
    "clip_i": "mean over (generated g, instance r) pairs of cos(CLIP_img(g), CLIP_img(r)), raw cosine",
    "dino": "mean over (generated g, instance r) pairs of cos(DINO_cls(g), DINO_cls(r)), raw cosine",
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description=(
            "Evaluate a PALP model. CLIP-T = mean over generated images of the raw cosine between the CLIP image "
            "embedding and the CLIP text embedding of --clean_prompt (and of each --prompt_elements text). "
            "CLIP-I = mean over all (generated, instance image) pairs of the raw cosine between CLIP image "
            "embeddings. DINO (optional) = the same pairwise mean with the [CLS] features of a DINO ViT. "
            "Raw cosines, on the scale of the paper's tables (e.g. CLIP-T 0.340). "
            "Writes metrics.json and metrics.md to --output_dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # What to evaluate.
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help=(
            "Base model (Hub id or local folder: SD 1.x/2.x, SDXL or SD 3/3.5) the PALP model was trained on. "
            "Required to generate images; default: the one recorded in --trained_dir/training_config.json."
        ),
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the base model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the base model files, e.g. 'fp16'.")
    parser.add_argument(
        "--trained_dir",
        type=str,
        default=None,
        help=(
            "Training output folder (train_palp.py's --output_dir): its LoRA (--lora_weight_name) and every "
            "learned_embeds*.safetensors in it are loaded; its training_config.json supplies defaults for the flags "
            "left out. With --image_dir only the defaults and the learned tokens (for checks) are used. Leave out to "
            "evaluate the base model alone."
        ),
    )
    parser.add_argument(
        "--lora_weight_name",
        type=str,
        default="pytorch_lora_weights.safetensors",
        help="File name of the LoRA weights inside --trained_dir.",
    )
    parser.add_argument(
        "--embedding",
        type=str,
        action="append",
        default=[],
        help="Extra learned-token embedding file (one key: the token, value [1, dim]); repeat the flag for several.",
    )
    parser.add_argument(
        "--image_dir",
        type=str,
        default=None,
        help="Evaluate the images in this folder instead of generating them (no diffusion model is loaded).",
    )
    parser.add_argument(
        "--image_glob",
        type=str,
        default="*",
        help="With --image_dir: only files matching this pattern, e.g. 'prompt00_seed*.png' for one prompt of a sample_palp.py folder.",
    )
    # Prompts.
    parser.add_argument(
        "--target_prompt",
        type=str,
        default=None,
        help=(
            "Prompt with the learned token used to generate, e.g. 'A sketch of <palp-cat> in Paris'. Required to "
            "generate images; default: the target prompt recorded in --trained_dir/training_config.json."
        ),
    )
    parser.add_argument(
        "--clean_prompt",
        type=str,
        default=None,
        help=(
            "The target prompt with the learned token replaced by the class noun, e.g. 'A sketch of a cat in Paris'. "
            "CLIP-T is measured against it. Default: the clean prompt recorded in --trained_dir/training_config.json."
        ),
    )
    parser.add_argument(
        "--prompt_elements",
        type=str,
        nargs="*",
        default=[],
        help=(
            "Prompt elements for per-element CLIP-T, each 'name=text' (e.g. 'style=a sketch' 'class=a cat' "
            "'ambiance=Paris') or just 'text' (then the text is the name)."
        ),
    )
    parser.add_argument(
        "--instance_data_dir",
        type=str,
        action="append",
        default=None,
        help=(
            "Folder of the subject's training images for CLIP-I (and DINO); repeat the flag for several subjects. "
            "Default: the folder recorded in --trained_dir/training_config.json."
        ),
    )
    # Metric models.
    parser.add_argument(
        "--clip_model_name_or_path",
        type=str,
        default="openai/clip-vit-base-patch32",
        help="CLIP model (Hub id or local folder with model, tokenizer and image processor). The paper's choice is the default.",
    )
    parser.add_argument(
        "--dino_model_name_or_path",
        type=str,
        default=None,
        help="DINO ViT for the DreamBench image similarity, e.g. 'facebook/dino-vits16' (Hub id or local folder). Not computed when left out.",
    )
    # Generation.
    parser.add_argument(
        "--num_images",
        type=int,
        default=8,
        help="Images to generate (the paper: 8 per prompt). Seeds are --seed, --seed + 1, ...",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first generated image.")
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=50,
        help="Denoising steps (ours; the paper does not state its sampler settings).",
    )
    parser.add_argument(
        "--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale (ours, the SD default)."
    )
    parser.add_argument("--negative_prompt", type=str, default=None, help="Negative prompt (none by default).")
    parser.add_argument(
        "--lora_scale", type=float, default=1.0, help="Weight of the LoRA: 0 gives the base UNet, 1 the trained one."
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Height and width of the generated images; default: the base model's (512 for SD 1.x).",
    )
    parser.add_argument(
        "--device", type=str, default=None, help="Device, e.g. 'cuda' or 'cpu'; default: cuda if available, else cpu."
    )
    parser.add_argument(
        "--dtype",
        type=str,
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="Diffusion model dtype; 'auto' = float16 on cuda, float32 otherwise. The metric models always run in float32.",
    )
    # Output.
    parser.add_argument(
        "--output_dir",
        type=str,
        default="palp-evaluation",
        help="Where metrics.json, metrics.md and the generated images go.",
    )
    parser.add_argument(
        "--label",
        type=str,
        default=None,
        help="Row name in the markdown table; default: the --trained_dir folder name.",
    )
    parser.add_argument(
        "--save_images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Save the generated images to --output_dir/images.",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Images per forward pass of the metric models.")

    args = parser.parse_args(input_args)
    return args


def list_images(folder, pattern="*"):
    return sorted(p for p in Path(folder).glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def parse_prompt_elements(elements):
    """'name=text' or 'text' → {name: text}, in command-line order."""
    parsed = {}
    for element in elements:
        name, sep, text = element.partition("=")
        name, text = (name.strip(), text.strip()) if sep else (element.strip(), element.strip())
        if not name or not text:
            raise ValueError(f"--prompt_elements entry {element!r} should be 'name=text' or 'text'.")
        if name in parsed:
            raise ValueError(f"--prompt_elements names must be unique; {name!r} appears twice.")
        parsed[name] = text
    return parsed


def fill_from_training_config(args):
    """Flags left out are taken from --trained_dir/training_config.json (written by train_palp.py), so that
    ``--trained_dir`` alone evaluates a run on the prompt and photos it was trained with."""
    path = Path(args.trained_dir or "", "training_config.json")
    if args.trained_dir is None or not path.is_file():
        return
    config = json.loads(path.read_text())
    instance_dirs = config.get("instance_data_dir")
    defaults = {
        "pretrained_model_name_or_path": config.get("pretrained_model_name_or_path"),
        "target_prompt": config.get("target_prompt"),
        # train_palp.py records the clean prompt it derived (class noun in place of the token) separately.
        "clean_prompt": config.get("clean_prompt_resolved") or config.get("clean_prompt"),
        "instance_data_dir": [instance_dirs] if isinstance(instance_dirs, str) else instance_dirs,
    }
    if args.image_dir is not None:
        # Nothing is generated: the base model and the target prompt would not be used.
        del defaults["pretrained_model_name_or_path"], defaults["target_prompt"]
    for name, value in defaults.items():
        if getattr(args, name) is None and value:
            setattr(args, name, value)
            logger.info(f"--{name} not given: using {value!r} from {path}.")


def check_inputs(args):
    """Catch every mistake a user can make before any model loads; returns what the run needs."""
    fill_from_training_config(args)
    inputs = {"generated_paths": None}
    if args.clean_prompt is None:
        raise ValueError(
            "--clean_prompt is required (e.g. 'A sketch of a cat in Paris'), unless --trained_dir has a training_config.json."
        )
    if not args.instance_data_dir:
        raise ValueError("--instance_data_dir is required, unless --trained_dir has a training_config.json.")
    if args.image_dir is not None:
        if not Path(args.image_dir).is_dir():
            raise ValueError(f"--image_dir {args.image_dir} is not a folder.")
        inputs["generated_paths"] = list_images(args.image_dir, args.image_glob)
        if not inputs["generated_paths"]:
            raise ValueError(f"--image_dir {args.image_dir} has no images matching --image_glob {args.image_glob!r}.")
    else:
        if args.pretrained_model_name_or_path is None:
            raise ValueError("--pretrained_model_name_or_path is required to generate images (or pass --image_dir).")
        if args.target_prompt is None:
            raise ValueError("--target_prompt is required to generate images (or pass --image_dir).")
        if args.num_images < 1:
            raise ValueError("--num_images must be at least 1.")

    lora_path, embedding_paths = find_trained_weights(args.trained_dir, args.lora_weight_name, args.embedding)
    tokens = [read_embedding_token(path) for path in embedding_paths]
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        raise ValueError(
            f"Token(s) {duplicates} come from more than one embedding file; check --trained_dir and --embedding."
        )
    if args.image_dir is None and tokens and not any(t in args.target_prompt for t in tokens):
        logger.warning(f"--target_prompt {args.target_prompt!r} contains none of the learned tokens {tokens}.")
    leaked = [t for t in tokens if t in args.clean_prompt]
    if leaked:
        raise ValueError(
            f"--clean_prompt contains the learned token(s) {leaked}; it must name the class instead (e.g. 'a cat'), "
            "since CLIP has never seen the token."
        )
    inputs.update(lora_path=lora_path, embedding_paths=embedding_paths, tokens=tokens)

    inputs["elements"] = parse_prompt_elements(args.prompt_elements)
    inputs["instance_paths"] = {}
    for folder in args.instance_data_dir:
        if not Path(folder).is_dir():
            raise ValueError(f"--instance_data_dir {folder} is not a folder.")
        paths = list_images(folder)
        if not paths:
            raise ValueError(f"--instance_data_dir {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
        inputs["instance_paths"][folder] = paths
    return inputs


def generate_images(pipe, args, seeds):
    images = []
    for seed in seeds:
        # A CPU generator per image: the same seed gives the same starting noise on any device and batch layout.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        image = pipe(
            pipeline_prompt(pipe, args.target_prompt),
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            height=args.resolution,
            width=args.resolution,
            generator=generator,
            **lora_scale_kwargs(pipe, args.lora_scale),
        ).images[0]
        images.append(image)
        logger.info(f"Generated image {len(images)}/{len(seeds)} (seed {seed}).")
    return images


def load_images(paths):
    return [Image.open(path).convert("RGB") for path in paths]


def _features(output):
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x returned a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(name_or_path, device):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    # float32 whatever the checkpoint's dtype: the metric should not depend on how the weights were stored.
    model = CLIPModel.from_pretrained(name_or_path).to(device, torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(name_or_path), AutoImageProcessor.from_pretrained(name_or_path)


@torch.no_grad()
def clip_text_embeddings(model, tokenizer, texts, device):
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
    return _features(model.get_text_features(**inputs)).float().cpu()


@torch.no_grad()
def clip_image_embeddings(model, processor, images, device, batch_size):
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=images[start : start + batch_size], return_tensors="pt").pixel_values.to(device)
        chunks.append(_features(model.get_image_features(pixel_values=pixels)).float().cpu())
    return torch.cat(chunks)


def load_dino(name_or_path, device):
    from transformers import AutoImageProcessor, ViTModel

    # DINO is compared on [CLS] features, not on a pooler head (the checkpoint has none).
    model = ViTModel.from_pretrained(name_or_path, add_pooling_layer=False).to(device, torch.float32).eval()
    return model, AutoImageProcessor.from_pretrained(name_or_path)


@torch.no_grad()
def dino_image_embeddings(model, processor, images, device, batch_size):
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=images[start : start + batch_size], return_tensors="pt").pixel_values.to(device)
        chunks.append(model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
    return torch.cat(chunks)


def cosine_matrix(a, b):
    """cos(a_i, b_j) for every pair of rows: shape [len(a), len(b)]."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T


def image_alignment(generated_embeds, instance_embeds_per_subject):
    """Per generated image: mean cosine with all instance images (union of subjects), and the per-subject means."""
    all_instances = torch.cat(list(instance_embeds_per_subject.values()))
    per_image = cosine_matrix(generated_embeds, all_instances).mean(dim=1)
    per_subject = {
        name: cosine_matrix(generated_embeds, embeds).mean().item()
        for name, embeds in instance_embeds_per_subject.items()
    }
    return per_image, per_subject


def load_metric_models(args, device):
    """CLIP, and DINO when asked for. Loaded before any image is generated, so a model that cannot be found
    (e.g. a Hub id with no network) fails the run at once rather than after the sampling."""
    models = {"clip": load_clip(args.clip_model_name_or_path, device), "dino": None}
    if args.dino_model_name_or_path is not None:
        models["dino"] = load_dino(args.dino_model_name_or_path, device)
    return models


def compute_metrics(args, inputs, generated, models, device):
    """All metrics on PIL images; returns (summary metrics, per-image metrics)."""
    instance_images = {folder: load_images(paths) for folder, paths in inputs["instance_paths"].items()}
    texts = [args.clean_prompt] + list(inputs["elements"].values())

    model, tokenizer, processor = models["clip"]
    text_embeds = clip_text_embeddings(model, tokenizer, texts, device)
    gen_embeds = clip_image_embeddings(model, processor, generated, device, args.batch_size)
    inst_embeds = {
        folder: clip_image_embeddings(model, processor, images, device, args.batch_size)
        for folder, images in instance_images.items()
    }
    text_scores = cosine_matrix(gen_embeds, text_embeds)  # [images, 1 + elements]
    clip_i_per_image, clip_i_per_subject = image_alignment(gen_embeds, inst_embeds)

    dino_per_image, dino_per_subject = None, None
    if models["dino"] is not None:
        dino, dino_processor = models["dino"]
        gen_dino = dino_image_embeddings(dino, dino_processor, generated, device, args.batch_size)
        inst_dino = {
            folder: dino_image_embeddings(dino, dino_processor, images, device, args.batch_size)
            for folder, images in instance_images.items()
        }
        dino_per_image, dino_per_subject = image_alignment(gen_dino, inst_dino)

    element_names = list(inputs["elements"])
    per_image = []
    for i in range(len(generated)):
        per_image.append(
            {
                "clip_t": text_scores[i, 0].item(),
                "clip_t_elements": {name: text_scores[i, 1 + j].item() for j, name in enumerate(element_names)},
                "clip_i": clip_i_per_image[i].item(),
                "dino": None if dino_per_image is None else dino_per_image[i].item(),
            }
        )
    metrics = {
        "clip_t": text_scores[:, 0].mean().item(),
        "clip_t_std": text_scores[:, 0].std(unbiased=False).item(),
        "clip_t_elements": {name: text_scores[:, 1 + j].mean().item() for j, name in enumerate(element_names)},
        "clip_i": clip_i_per_image.mean().item(),
        "clip_i_std": clip_i_per_image.std(unbiased=False).item(),
        "dino": None if dino_per_image is None else dino_per_image.mean().item(),
    }
    if len(inst_embeds) > 1:
        metrics["clip_i_per_subject"] = clip_i_per_subject
        if dino_per_subject is not None:
            metrics["dino_per_subject"] = dino_per_subject
    return metrics, per_image


def format_markdown(results):
    """One-row markdown table (rows of several runs can be pasted together) plus the texts measured against."""
    metrics = results["metrics"]
    elements = results["prompt_elements"]

    def fmt(value):
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    header = ["run", "images", "CLIP-T (clean)"] + [f"CLIP-T {name}" for name in elements] + ["CLIP-I", "DINO"]
    row = [results["label"], str(results["num_generated_images"]), fmt(metrics["clip_t"])]
    row += [fmt(metrics["clip_t_elements"][name]) for name in elements]
    row += [fmt(metrics["clip_i"]), fmt(metrics["dino"])]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        "| " + " | ".join(row) + " |",
        "",
        f'Clean prompt: "{results["clean_prompt"]}"',
    ]
    if results.get("target_prompt"):
        lines.append(f'Target prompt: "{results["target_prompt"]}"')
    for name, text in elements.items():
        lines.append(f'- element `{name}`: "{text}"')
    lines.append(
        f"CLIP model: `{results['clip_model']}`"
        + (f"; DINO model: `{results['dino_model']}`" if results["dino_model"] else "")
        + ". All values are raw cosine similarities (CLIP-T: image vs text; CLIP-I and DINO: mean over generated × instance pairs)."
    )
    return "\n".join(lines) + "\n"


def main(args):
    inputs = check_inputs(args)
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    models = load_metric_models(args, device)

    if inputs["generated_paths"] is not None:
        seeds = None
        generated = load_images(inputs["generated_paths"])
        image_files = [str(p) for p in inputs["generated_paths"]]
    else:
        seeds = list(range(args.seed, args.seed + args.num_images))
        pipe = load_pipeline(
            args.pretrained_model_name_or_path,
            inputs["lora_path"],
            inputs["embedding_paths"],
            device,
            dtype,
            revision=args.revision,
            variant=args.variant,
            safety_checker=False,
        )
        generated = generate_images(pipe, args, seeds)
        del pipe
        image_files = [None] * len(generated)
        if args.save_images:
            (output_dir / "images").mkdir(exist_ok=True)
            image_files = []
            for seed, image in zip(seeds, generated):
                path = output_dir / "images" / f"seed{seed}.png"
                image.save(path)
                image_files.append(str(path))

    metrics, per_image = compute_metrics(args, inputs, generated, models, device)
    for i, entry in enumerate(per_image):
        entry["file"] = image_files[i]
        entry["seed"] = None if seeds is None else seeds[i]

    label = args.label or Path(args.trained_dir or args.image_dir or "base model").name
    results = {
        "label": label,
        "metrics": metrics,
        "definitions": METRIC_DEFINITIONS,
        "clean_prompt": args.clean_prompt,
        "target_prompt": args.target_prompt if args.image_dir is None else None,
        "prompt_elements": inputs["elements"],
        "clip_model": args.clip_model_name_or_path,
        "dino_model": args.dino_model_name_or_path,
        "num_generated_images": len(generated),
        "num_instance_images": {folder: len(paths) for folder, paths in inputs["instance_paths"].items()},
        "learned_tokens": inputs["tokens"],
        "generation": None
        if args.image_dir is not None
        else {
            "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
            "trained_dir": args.trained_dir,
            "embeddings": [str(p) for p in inputs["embedding_paths"]],
            "seeds": seeds,
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "negative_prompt": args.negative_prompt,
            "lora_scale": args.lora_scale,
            "resolution": args.resolution,
            "dtype": str(dtype).replace("torch.", ""),
        },
        "image_dir": args.image_dir,
        "per_image": per_image,
    }
    with open(output_dir / "metrics.json", "w") as f:
        json.dump(results, f, indent=2)
    markdown = format_markdown(results)
    with open(output_dir / "metrics.md", "w") as f:
        f.write(markdown)
    logger.info("\n" + markdown)
    return results


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    main(parse_args())
