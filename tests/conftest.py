"""Shared fixtures: tiny Stable Diffusion, SDXL and SD3 pipelines built from configs, saved to local folders.

Nothing here touches the Hugging Face Hub. The tokenizer is a real byte-level BPE CLIP tokenizer whose vocabulary
and merges are generated on the spot, so prompts tokenize exactly as they would with the real one (words of the
vocabulary become one token, anything else falls back to bytes).
"""

import json
import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub, transformers or datasets: they read these once, at import time. Any
# accidental Hub access then fails loudly instead of hanging on the closed network.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ["WANDB_MODE"] = "disabled"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Words the tiny vocabulary knows as single tokens (everything else is spelled out in bytes).
TINY_WORDS = (
    "a an the photo of sketch painting oil in paris on rock cat dog toy sitting inspired by portrait "
    "19th century red green blue background with and at night watercolor"
).split()


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


def build_tiny_clip_tokenizer(words=TINY_WORDS, model_max_length=77, pad_token="<|endoftext|>"):
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in words:
        # Left-to-right merges build the word one character at a time; the last piece carries "</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = (current, piece)
            if merge not in merges:
                merges.append(merge)
            current = current + piece
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)


def build_tiny_sd(path, prediction_type="epsilon", seed=0):
    """Write a tiny, randomly initialised Stable Diffusion 1.x-layout pipeline to ``path`` and return it."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return pipe


def build_tiny_sdxl(path, seed=0, force_zeros_for_empty_prompt=True, legacy_pooling=False, edm=False):
    """Write a tiny, randomly initialised SDXL pipeline to ``path`` and return it. The two text encoders have
    different widths (16 and 32, projection 24), so swapping them fails on shape; the second tokenizer pads with "!"
    as SDXL's tokenizer_2 does (the first with <|endoftext|>), so swapping the tokenizers changes the conditioning.
    The UNet takes the 48-wide concatenation and SDXL's ``text_time`` added conditioning. ``legacy_pooling`` gives the
    second encoder the old ``eos_token_id=2`` config, which pools at the argmax of the ids (the highest id: a newly
    added token). ``edm`` makes it EDM-style, as Playground v2.5 is: an EDM scheduler and a VAE whose config
    normalises latents with ``latents_mean`` / ``latents_std``."""
    from diffusers import (
        AutoencoderKL,
        EDMDPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer(pad_token="!")

    def text_config(width, **extra):
        return CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=width,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            **extra,
        )

    # Playground v2.5's VAE normalises latents per channel before its scaling factor.
    edm_latents = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.9, 1.1, 1.0, 0.8], scaling_factor=0.5)
    text_encoder = CLIPTextModel(text_config(16))
    config_2 = text_config(32, projection_dim=24)
    if legacy_pooling:
        config_2.eos_token_id = 2
    text_encoder_2 = CLIPTextModelWithProjection(config_2)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 24,
        cross_attention_dim=16 + 32,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        **(edm_latents if edm else {}),
    )
    if edm:
        scheduler = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    else:
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            timestep_spacing="leading",
        )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return pipe


def build_tiny_t5_tokenizer(words=TINY_WORDS):
    """A T5 tokenizer (SentencePiece-style unigram) over the tiny vocabulary, made on the spot: known words are one
    piece, anything else falls back to single characters."""
    from transformers import T5TokenizerFast

    chars = sorted({c for word in words for c in word} | set("<>-_!?.,'0123456789abcdefghijklmnopqrstuvwxyz"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -1.0) for word in words] + [(c, -5.0) for c in chars] + [(f"▁{c}", -5.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def build_tiny_sd3(path, seed=0, with_t5=True, vae_blocks=2):
    """Write a tiny, randomly initialised Stable Diffusion 3 pipeline to ``path`` and return it. The two CLIP encoders
    have different widths (8 and 16, projections 8 and 16, so swapping them fails on shape); CLIP's concatenation (24
    wide) is padded to T5's width 32 as the pipeline pads it. ``with_t5=False`` saves it without ``text_encoder_3``,
    whose part of the sequence is then zeros. The VAE has SD3's ``shift_factor`` and ``vae_blocks`` blocks (scale factor
    2 ** (vae_blocks - 1)); the scheduler is SD3's shifted FlowMatchEulerDiscreteScheduler."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer(pad_token="!")

    def clip(width):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                hidden_size=width,
                projection_dim=width,
                intermediate_size=37,
                layer_norm_eps=1e-5,
                num_attention_heads=2,
                num_hidden_layers=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
            )
        )

    text_encoder, text_encoder_2 = clip(8), clip(16)
    tokenizer_3 = text_encoder_3 = None
    if with_t5:
        tokenizer_3 = build_tiny_t5_tokenizer()
        config = T5Config(vocab_size=len(tokenizer_3), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4)
        text_encoder_3 = T5EncoderModel(config)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=8 + 16,
        out_channels=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16)[:vae_blocks],
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path)
    return pipe


def write_instance_images(folder, n=3, size=24, seed=0):
    """Write ``n`` small coloured-square photos (a stand-in subject) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.full((size, size, 3), 128, dtype=np.uint8)
        lo, hi = size // 4, 3 * size // 4
        arr[lo:hi, lo:hi] = rng.integers(0, 255, size=3, dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"subject_{i}.png")
    return folder


def load_example(name):
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_fake_training_output(base_path, out, token="<palp-cat>", seed=0):
    """What train_palp.py leaves in its --output_dir, made by hand: a diffusers-format LoRA with a visible effect and
    one token embedding. On SD 1.x the LoRA is the UNet's and the file ``{token: [1, 32]}``; on an SD3 base (its
    model_index.json says so) the LoRA is on the transformer's joint attention and the file ``{"clip_l", "clip_g"}``.
    Returns the embedding row (SD 1.x) or the embedding dict (SD3)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    out = Path(out)
    sd3 = json.loads((Path(base_path) / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    if sd3:
        pipe = StableDiffusion3Pipeline.from_pretrained(base_path, text_encoder_3=None, tokenizer_3=None)
        denoiser, targets = pipe.transformer, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj"]
    else:
        denoiser, targets = (
            StableDiffusionPipeline.from_pretrained(base_path).unet,
            ["to_q", "to_k", "to_v", "to_out.0"],
        )
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    with torch.no_grad():
        # LoRA B starts at zero (a no-op); make it large enough to change the images visibly.
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    layers = get_peft_model_state_dict(denoiser)
    if sd3:  # a transformer's LoRA in PEFT naming, a UNet's in diffusers naming, as train_palp.save_lora writes them
        StableDiffusion3Pipeline.save_lora_weights(out, transformer_lora_layers=layers)
        widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
        state = {key: torch.randn(1, width) for key, width in zip(("clip_l", "clip_g"), widths)}
        save_file(state, out / "learned_embeds.safetensors", metadata={"placeholder_token": token})
        return state
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(layers))
    row = torch.randn(32)
    save_file({token: row[None]}, out / "learned_embeds.safetensors")
    return row


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd_vpred_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd-vpred")
    build_tiny_sd(path, prediction_type="v_prediction")
    return str(path)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd3_no_t5_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3-no-t5")
    build_tiny_sd3(path, with_t5=False)
    return str(path)


@pytest.fixture
def instance_dir(tmp_path):
    return str(write_instance_images(tmp_path / "instance"))


def folder_snapshot(folder):
    """Every file below ``folder`` with its bytes and modification time, and every subfolder: equal snapshots mean
    nothing was written, created or deleted in between."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else None
        for path in folder.rglob("*")
    }


def reset_accelerate_state():
    """accelerate keeps process-wide singletons; a second in-process training run needs them cleared."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()
