#!/usr/bin/env python
"""Sample a trained PALP model: base model (Stable Diffusion 1.x/2.x, XL or 3/3.5) + the LoRA + the learned token
embedding(s).

    python examples/sample_palp.py \\
        --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --trained_dir palp-cat \\
        --prompts "A sketch of <palp-cat> in Paris" "An oil painting of <palp-cat>" \\
        --seeds 0 1 2 3

``--trained_dir`` is the ``--output_dir`` of train_palp.py: its ``pytorch_lora_weights.safetensors`` is loaded
with ``pipe.load_lora_weights`` and every ``learned_embeds*.safetensors`` in it (one file per placeholder token)
with ``pipe.load_textual_inversion`` (SD 3/3.5, whose pipeline has none: the token is added to both CLIP tokenizers
and its rows set, as the model card's lines do); ``--embedding`` adds more files. A multi-vector embedding
(train_palp.py's ``--num_vectors N``: N rows per text encoder) becomes the tokens ``<t>, <t>_1, …, <t>_{N-1}``, and
every prompt writes ``<t>`` as all of them: the SD and SDXL pipelines do so themselves, SD3 prompts are expanded here
the same way. Without ``--pretrained_model_name_or_path`` or ``--prompts``, the base model and the target prompt
recorded in its ``training_config.json`` are used. The base model's ``model_index.json`` says its family: SD 1.x/2.x, SDXL or SD3.

Writes one PNG per (prompt, seed), named ``prompt{i:02d}_seed{seed}.png`` (``i`` = position of the prompt in
the list), ``grid.png`` (rows = prompts, columns = seeds) and ``sampling_config.json`` (prompts and settings).

A prompt that contains none of the learned tokens is sampled anyway (comparing with and without the token is a
common check) but logs a warning, and so does a ``<...>`` word that is not a learned token (usually a typo of
the placeholder, which the tokenizer would silently spell out letter by letter).
"""

import argparse
import json
import logging
import re
from pathlib import Path

import torch
from PIL import Image

logger = logging.getLogger(__name__)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Generate a grid of images (rows = prompts, columns = seeds) from a base model plus a PALP LoRA and learned token embeddings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help=(
            "Base model (Hub id or local folder: SD 1.x/2.x, SDXL or SD 3/3.5) the PALP model was trained on. "
            "Default: the one recorded in --trained_dir/training_config.json."
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
            "learned_embeds*.safetensors in it are loaded; its training_config.json supplies the base model and "
            "the target prompt when --pretrained_model_name_or_path / --prompts are left out. Leave out to sample "
            "the base model."
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
        help="Extra learned-token embedding file (one key: the token, value [N, dim] for N vectors; or SDXL/SD3's "
        "{'clip_l', 'clip_g'}); repeat the flag for several.",
    )
    parser.add_argument(
        "--prompts",
        type=str,
        nargs="+",
        default=None,
        help=(
            "Prompts, one grid row each, e.g. 'A sketch of <palp-cat> in Paris'. Default (without --prompt_file): "
            "the target prompt recorded in --trained_dir/training_config.json."
        ),
    )
    parser.add_argument(
        "--prompt_file",
        type=str,
        default=None,
        help="Text file with one prompt per line (blank lines skipped); added after --prompts.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="Seeds, one grid column each.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=7.5,
        help="Classifier-free guidance scale (SD 1.x's default; SDXL's pipeline defaults to 5.0, SD3's to 7.0).",
    )
    parser.add_argument(
        "--negative_prompt", type=str, default=None, help="Negative prompt, used for every prompt (none by default)."
    )
    parser.add_argument(
        "--lora_scale",
        type=float,
        default=1.0,
        help="Weight of the LoRA update: 0 gives the base UNet / transformer (the learned tokens still apply), 1 the "
        "trained model.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Height and width of the images; default: the base model's (512 for SD 1.x, 1024 for SDXL and SD3).",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=1,
        help="Seeds per pipeline call. More is faster on a GPU, but pixels may differ by rounding from batch size 1.",
    )
    parser.add_argument(
        "--device", type=str, default=None, help="Device, e.g. 'cuda' or 'cpu'; default: cuda if available, else cpu."
    )
    parser.add_argument(
        "--dtype",
        type=str,
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="Model dtype; 'auto' = float16 on cuda, float32 otherwise.",
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default="palp-samples",
        help="Where the images, grid.png and sampling_config.json go.",
    )

    args = parser.parse_args(input_args)
    return args


def find_trained_weights(trained_dir, lora_weight_name, extra_embeddings):
    """The LoRA file and the embedding files of a training output folder (plus any given explicitly)."""
    lora_path = None
    embedding_paths = []
    if trained_dir is not None:
        trained_dir = Path(trained_dir)
        if not trained_dir.is_dir():
            raise ValueError(f"--trained_dir {trained_dir} is not a folder; pass the --output_dir of train_palp.py.")
        lora_path = trained_dir / lora_weight_name
        if not lora_path.is_file():
            raise ValueError(
                f"--trained_dir {trained_dir} has no {lora_weight_name}; pass the folder train_palp.py wrote "
                "(or set --lora_weight_name)."
            )
        # The single-subject script writes learned_embeds.safetensors, the multi-subject one learned_embeds_<slug>.
        embedding_paths = sorted(trained_dir.glob("learned_embeds*.safetensors"))
    for path in extra_embeddings:
        if not Path(path).is_file():
            raise ValueError(f"--embedding {path} does not exist.")
        embedding_paths.append(Path(path))
    return lora_path, embedding_paths


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


def read_embedding_token(path):
    """The placeholder token of an embedding file, read without loading any model (safetensors only: a pickled .bin
    from elsewhere is never unpickled). SD 1.x/2.x files hold one key, the token; SDXL files hold one row per text
    encoder (``clip_l``, ``clip_g``) and name the token in their metadata, or else by their file name (WebUI)."""
    from safetensors import safe_open

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"Embedding file {path} is not a .safetensors file; only safetensors embeddings are loaded.")
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata() or {}
    if sorted(keys) == sorted(SDXL_EMBEDDING_KEYS):
        return metadata.get("placeholder_token") or Path(path).stem
    if len(keys) != 1:
        raise ValueError(
            f"Embedding file {path} should hold one key (the token) or {list(SDXL_EMBEDDING_KEYS)}, found {keys}."
        )
    return keys[0]


def vector_rows(tensor):
    """An embedding as [N, dim]: N = 1 for a single vector, whether stored as [dim] or [1, dim]."""
    return tensor.reshape(-1, tensor.shape[-1])


def add_token_to_sd3_pipeline(pipe, token, state):
    """The SD3 model card's lines (``SD3TextConditioner.load_code`` of train_palp.py): [V]'s N tokens <t>, <t>_1, …
    (N rows in the file, the names ``load_textual_inversion`` gives them) go into both CLIP tokenizers and encoders
    and their rows are set; T5 reads the prompt as plain text, as in training."""
    rows = {key: vector_rows(state[key]) for key in SDXL_EMBEDDING_KEYS}
    count = len(rows["clip_l"])
    if len(rows["clip_g"]) != count:
        raise ValueError(f"Embedding of {token!r}: clip_l has {count} vector(s), clip_g {len(rows['clip_g'])}.")
    names = [token] + [f"{token}_{i}" for i in range(1, count)]
    for key, encoder, tokenizer in [("clip_l", pipe.text_encoder, pipe.tokenizer),
                                    ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)]:  # fmt: skip
        known = [name for name in names if name in tokenizer.get_vocab()]
        if known:
            raise ValueError(f"Token(s) {known} of {token!r} are already in the tokenizer's vocabulary.")
        tokenizer.add_tokens(names)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        ids = tokenizer.convert_tokens_to_ids(names)
        encoder.get_input_embeddings().weight.data[ids] = rows[key].to(encoder.device, encoder.dtype)


def pipeline_prompt(pipe, prompt):
    """The prompt to hand ``pipe``, with each multi-vector token <t> written as '<t> <t>_1 … <t>_{N-1}'. SD and SDXL
    pipelines do this themselves (``maybe_convert_prompt``) and get the prompt as it is; SD3's has no
    textual-inversion support, so its prompt is expanded here as ``maybe_convert_prompt`` would expand it."""
    if hasattr(pipe, "maybe_convert_prompt"):
        return prompt
    tokenizer = pipe.tokenizer
    for token in set(tokenizer.tokenize(prompt)):
        if token in tokenizer.added_tokens_encoder:
            names, i = [token], 1
            while f"{token}_{i}" in tokenizer.added_tokens_encoder:
                names.append(f"{token}_{i}")
                i += 1
            prompt = prompt.replace(token, " ".join(names))
    return prompt


def load_embedding(pipe, path):
    """``pipe.load_textual_inversion`` once (SD 1.x/2.x), or once per text encoder for an SDXL file; an SD3 pipeline
    (no ``load_textual_inversion``) gets the token by :func:`add_token_to_sd3_pipeline`."""
    from safetensors.torch import load_file

    token = read_embedding_token(path)
    state = load_file(str(path))
    if set(state) != set(SDXL_EMBEDDING_KEYS):
        if is_sd3(pipe):
            raise ValueError(
                f"Embedding file {path} holds one row ({list(state)}); an SD3 model needs the "
                f"{list(SDXL_EMBEDDING_KEYS)} file that train_palp.py writes for it."
            )
        pipe.load_textual_inversion(str(path))
        return
    if getattr(pipe, "text_encoder_2", None) is None:
        raise ValueError(
            f"Embedding file {path} has one row per text encoder {list(SDXL_EMBEDDING_KEYS)}; use it with the SDXL "
            "or SD3 base model it was trained on."
        )
    if is_sd3(pipe):
        add_token_to_sd3_pipeline(pipe, token, state)
        return
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )


def is_sd3(pipe):
    return hasattr(pipe, "transformer") and hasattr(pipe, "text_encoder_3")


def lora_scale_kwargs(pipe, scale):
    """The call argument that scales every LoRA update for one call (PEFT backend): the UNet pipelines read
    ``cross_attention_kwargs``, SD3's ``joint_attention_kwargs``."""
    return {"joint_attention_kwargs" if is_sd3(pipe) else "cross_attention_kwargs": {"scale": scale}}


def fill_from_training_config(args):
    """The base model and the target prompt of the run, from --trained_dir/training_config.json (written by
    train_palp.py), when their flags are left out: ``--trained_dir`` alone samples what the run was trained for."""
    path = Path(args.trained_dir or "", "training_config.json")
    if args.trained_dir is None or not path.is_file():
        return
    config = json.loads(path.read_text())
    if args.pretrained_model_name_or_path is None and config.get("pretrained_model_name_or_path"):
        args.pretrained_model_name_or_path = config["pretrained_model_name_or_path"]
        logger.info(
            f"--pretrained_model_name_or_path not given: using {args.pretrained_model_name_or_path!r} from {path}."
        )
    if args.prompts is None and args.prompt_file is None and config.get("target_prompt"):
        args.prompts = [config["target_prompt"]]
        logger.info(f"--prompts not given: using the target prompt {config['target_prompt']!r} from {path}.")


def read_prompts(prompts, prompt_file):
    prompts = list(prompts or [])
    if prompt_file is not None:
        if not Path(prompt_file).is_file():
            raise ValueError(f"--prompt_file {prompt_file} does not exist.")
        prompts += [line.strip() for line in Path(prompt_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("No prompts: pass --prompts and/or --prompt_file.")
    return prompts


def warn_about_tokens(prompts, tokens):
    """Warn about prompts that will not show the learned subject(s)."""
    for i, prompt in enumerate(prompts):
        if tokens and not any(token in prompt for token in tokens):
            logger.warning(f"Prompt {i} {prompt!r} contains none of the learned tokens {tokens}.")
        unknown = [word for word in re.findall(r"<[^<>\s]+>", prompt) if word not in tokens]
        if unknown:
            logger.warning(
                f"Prompt {i} {prompt!r} has {unknown}, which is not a learned token (learned: {tokens}); "
                "the tokenizer will spell it out instead."
            )


def check_inputs(args):
    """Catch every mistake a user can make before any model loads; returns what the run needs."""
    fill_from_training_config(args)
    if args.pretrained_model_name_or_path is None:
        raise ValueError(
            "--pretrained_model_name_or_path is required, unless --trained_dir has a training_config.json."
        )
    prompts = read_prompts(args.prompts, args.prompt_file)
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds has duplicates: {args.seeds}.")
    if args.batch_size < 1:
        raise ValueError("--batch_size must be at least 1.")
    lora_path, embedding_paths = find_trained_weights(args.trained_dir, args.lora_weight_name, args.embedding)
    tokens = [read_embedding_token(path) for path in embedding_paths]
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        raise ValueError(
            f"Token(s) {duplicates} come from more than one embedding file; check --trained_dir and --embedding."
        )
    warn_about_tokens(prompts, tokens)
    return prompts, lora_path, embedding_paths, tokens


def resolve_device_and_dtype(device, dtype):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def load_pipeline(
    pretrained_model_name_or_path,
    lora_path,
    embedding_paths,
    device,
    dtype,
    revision=None,
    variant=None,
    safety_checker=True,
):
    """Base model (Stable Diffusion 1.x/2.x, SDXL or SD 3/3.5, as its model_index.json says) + the PALP LoRA (adapter
    "palp") + every learned token. ``safety_checker=False`` drops the checker of SD 1.x/2.x (evaluation does: a
    blacked-out image would be scored as if the model had drawn it); SDXL and SD3 pipelines have none. An SD3 folder
    saved without T5 (``"text_encoder_3": [null, null]``) is loaded without it, as it was trained."""
    from diffusers import (
        DiffusionPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    config = DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision)
    class_name = config.get("_class_name")
    if class_name == "StableDiffusionXLPipeline":
        pipeline_class, extra = StableDiffusionXLPipeline, {}
    elif class_name == "StableDiffusion3Pipeline":
        pipeline_class, extra = StableDiffusion3Pipeline, {}
        if (config.get("text_encoder_3") or [None])[-1] is None:
            extra = {"text_encoder_3": None, "tokenizer_3": None}
    else:
        pipeline_class = StableDiffusionPipeline
        extra = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    pipe = pipeline_class.from_pretrained(
        pretrained_model_name_or_path, revision=revision, variant=variant, dtype=dtype, **extra
    )
    if lora_path is not None:
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="palp")
    for path in embedding_paths:
        load_embedding(pipe, path)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, prompts, seeds, args):
    """rows[i][j] = the image of prompts[i] with seeds[j]."""
    rows = []
    for i, prompt in enumerate(prompts):
        row = []
        for start in range(0, len(seeds), args.batch_size):
            batch_seeds = seeds[start : start + args.batch_size]
            # One CPU generator per image: an image depends only on (prompt, seed), on any device.
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in batch_seeds]
            row += pipe(
                [pipeline_prompt(pipe, prompt)] * len(batch_seeds),
                negative_prompt=None if args.negative_prompt is None else [args.negative_prompt] * len(batch_seeds),
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                height=args.resolution,
                width=args.resolution,
                generator=generators,
                # With the PEFT backend the denoiser multiplies every LoRA update by this for the call only.
                **lora_scale_kwargs(pipe, args.lora_scale),
            ).images
        logger.info(f"Prompt {i + 1}/{len(prompts)} done: {prompt!r}")
        rows.append(row)
    return rows


def make_grid(rows):
    """Paste rows of equally sized images into one image, rows top to bottom."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image, (j * width, i * height))
    return grid


def save_samples(rows, prompts, seeds, tokens, args):
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, row in enumerate(rows):
        for seed, image in zip(seeds, row):
            path = output_dir / f"prompt{i:02d}_seed{seed}.png"
            image.save(path)
            files.append({"file": path.name, "prompt_index": i, "prompt": prompts[i], "seed": seed})
    make_grid(rows).save(output_dir / "grid.png")
    config = {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "trained_dir": args.trained_dir,
        "learned_tokens": tokens,
        "prompts": prompts,
        "seeds": seeds,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "lora_scale": args.lora_scale,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "images": files,
    }
    with open(output_dir / "sampling_config.json", "w") as f:
        json.dump(config, f, indent=2)
    return files


def main(args):
    prompts, lora_path, embedding_paths, tokens = check_inputs(args)
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    pipe = load_pipeline(
        args.pretrained_model_name_or_path, lora_path, embedding_paths, device, dtype, args.revision, args.variant
    )
    rows = generate(pipe, prompts, args.seeds, args)
    save_samples(rows, prompts, args.seeds, tokens, args)
    logger.info(f"Saved {len(prompts) * len(args.seeds)} images and grid.png to {args.output_dir}")
    return rows


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    main(parse_args())
