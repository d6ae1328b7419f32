"""Validation images: sampled under the training's autocast, decoded outside it in the VAE's own dtype, and equal to
what the family's pipeline gives on its own."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

import train_palp as tp
from conftest import reset_accelerate_state, write_instance_images
from test_train_palp import TARGET, train


@pytest.mark.parametrize("family", ["tiny_sd_path", "tiny_sdxl_path"])
def test_validation_decodes_outside_autocast_in_the_vaes_dtype(family, request, tmp_path, monkeypatch):
    """Under fp16 autocast even an fp32 VAE convolves in fp16 and the SDXL VAE overflows (black or NaN images); bf16
    autocast on the CPU shows where the decode runs."""
    seen = []
    original = AutoencoderKL.decode

    def recording(vae, z, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), z.dtype, vae.dtype))
        return original(vae, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", recording)
    model = request.getfixturevalue(family)
    out = tmp_path / "out"
    run = train(model, str(write_instance_images(tmp_path / "i")), out, "--mixed_precision", "bf16",
                "--max_train_steps", "1", "--num_validation_images", "2")  # fmt: skip
    assert run.accelerator.mixed_precision == "bf16"
    assert len(seen) == 2 and len(list((out / "samples").glob("final_*.png"))) == 2
    assert [autocast for autocast, _, _ in seen] == [False, False]
    assert all(z_dtype == vae_dtype == torch.float32 for _, z_dtype, vae_dtype in seen)


@pytest.mark.parametrize("family", ["tiny_sd_path", "tiny_sdxl_path"])
def test_validation_images_are_the_pipelines_own(family, request):
    """Decoding by hand unscales the latents and post-processes them as the pipeline does: without autocast the
    images are the plain pipeline's, pixel for pixel."""
    pipe = DiffusionPipeline.from_pretrained(request.getfixturevalue(family))
    pipe.set_progress_bar_config(disable=True)
    ours = tp.generate_images(pipe, TARGET, 2, 32, 5.0, 2, 0, "cpu", contextlib.nullcontext())
    generator = torch.Generator("cpu").manual_seed(0)
    plain = [
        pipe(TARGET, num_inference_steps=2, guidance_scale=5.0, height=32, width=32, generator=generator).images[0]
        for _ in range(2)
    ]
    assert [image.size for image in ours] == [(32, 32)] * 2
    for a, b in zip(ours, plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(ours[1]))


@pytest.mark.parametrize(
    "family,flags,guidance",
    [
        ("tiny_sd_path", [], 7.5),
        ("tiny_sdxl_path", [], 5.0),
        ("tiny_sdxl_path", ["--validation_guidance_scale", "3.5"], 3.5),
    ],
    ids=["sd default", "sdxl default", "sdxl flag"],
)
def test_validation_guidance_follows_the_familys_pipeline_unless_set(family, flags, guidance, request, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """StableDiffusionPipeline samples at 7.5 by default, StableDiffusionXLPipeline at 5.0; the value used is the
    one the config and the card record."""
    used = []
    original = tp.generate_images

    def recording(pipeline, prompt, num_images, resolution, guidance_scale, *rest):
        used.append(guidance_scale)
        return original(pipeline, prompt, num_images, resolution, guidance_scale, *rest)

    monkeypatch.setattr(tp, "generate_images", recording)
    out = tmp_path / "out"
    train(request.getfixturevalue(family), str(write_instance_images(tmp_path / "i")), out, "--max_train_steps", "1",
          *flags)  # fmt: skip
    assert used == [guidance]
    assert json.loads((out / "training_config.json").read_text())["validation_guidance_scale"] == guidance
    assert f"## Samples (`{TARGET}`, guidance scale {guidance})" in (out / "README.md").read_text()


@pytest.mark.parametrize("family", ["tiny_sd_path", "tiny_sdxl_path"])
def test_card_names_the_training_vae_and_carries_the_familys_tags(family, request, tmp_path):
    from huggingface_hub import ModelCard

    model = request.getfixturevalue(family)
    instance = str(write_instance_images(tmp_path / "i"))
    own = tmp_path / "own"
    train(model, instance, own, "--max_train_steps", "1", "--num_validation_images", "0")
    card = ModelCard((own / "README.md").read_text())
    sdxl_tags = {"stable-diffusion-xl", "stable-diffusion-xl-diffusers", "template:sd-lora"}
    if family == "tiny_sdxl_path":
        assert sdxl_tags <= set(card.data.tags) and "stable-diffusion" not in card.data.tags
    else:
        assert "stable-diffusion" in card.data.tags and not sdxl_tags & set(card.data.tags)
    assert {"text-to-image", "diffusers", "lora", "textual-inversion", "palp"} <= set(card.data.tags)
    assert f"- VAE used in training: the base model's (`{Path(model).name}`)" in card.text

    vae = tmp_path / "sdxl-vae-fp16-fix"
    AutoencoderKL.from_pretrained(model, subfolder="vae").save_pretrained(vae)
    reset_accelerate_state()
    other = tmp_path / "other"
    train(model, instance, other, "--max_train_steps", "1", "--num_validation_images", "0",
          "--pretrained_vae_model_name_or_path", str(vae))  # fmt: skip
    text = (other / "README.md").read_text()
    assert "- VAE used in training: `sdxl-vae-fp16-fix` (`--pretrained_vae_model_name_or_path`)" in text
    assert str(tmp_path) not in text
