"""Validation images: sampled under the training's autocast, decoded outside it in the VAE's own dtype, and equal to
what the family's pipeline gives on its own."""

import contextlib

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

import train_palp as tp
from conftest import write_instance_images
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
