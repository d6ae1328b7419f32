"""SD3's pieces of train_palp.py on the tiny SD3 pipelines, without training: the PALP losses on the MMDiT against
the flow formulas with autograd, the conditioning against StableDiffusion3Pipeline.encode_prompt, and the VAE latents
against the pipeline's decoding. Each test builds only what it calls (seconds), so test_mutations.py runs them against
mutated copies of train_palp.py: they must reach ``train_palp`` through this module's ``tp``."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image

import train_palp as tp

PROMPT = "a sketch of cat in paris"


def sd3_conditioner(path):
    """The SD3 conditioner of a model folder, as train_palp.py loads it (tokenizers, CLIP encoders, T5 if any)."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    conditioner = tp.SD3TextConditioner(**tp.SD3TextConditioner.load_tokenizers(path, index), model_index=index)
    conditioner.load_text_encoders(path)
    return conditioner


@pytest.mark.parametrize("with_t5", [True, False], ids=["with-t5", "text_encoder_3=None"])
def test_sd3_conditioning_and_empty_prompt_are_the_pipelines(with_t5, request):
    """y and ∅ as encode_prompt gives them: CLIP-L ‖ CLIP-G penultimate states padded to T5's width, then T5's 256
    rows (zeros without T5), and the CLIP pooled embeddings concatenated, CLIP-L first."""
    path = request.getfixturevalue("tiny_sd3_path" if with_t5 else "tiny_sd3_no_t5_path")
    extra = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **extra)
    conditioner = sd3_conditioner(path)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, None, None, device="cpu")
        ours = conditioner.encode(conditioner.tokenize([PROMPT]))
        clean, uncond = conditioner.encode_fixed(PROMPT, "cpu", torch.float32)
    assert isinstance(ours, tp.SD3Conditioning) and ours.hidden.shape == (1, 77 + 256, 32)
    for got, want in ((ours.hidden, embeds), (ours.pooled, pooled), (clean.hidden, embeds), (clean.pooled, pooled),
                      (uncond.hidden, negative), (uncond.pooled, negative_pooled)):  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert uncond.hidden.abs().sum() > 0  # ∅ is the encoded empty prompt, not zeros
    assert (ours.hidden[0, 77:].abs().sum() == 0) == (not with_t5)


def test_sd3_denoise_calls_the_transformer_as_the_pipeline_does(tiny_sd3_path):
    """The pipeline calls the MMDiT with the scheduler's timestep σ·1000, the joint sequence and the pooled
    projections; denoise at t = σ·T is that call."""
    model = SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    cond = tp.SD3Conditioning(torch.randn(2, 20, 32, generator=g), torch.randn(2, 24, generator=g))
    x = torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.25, 0.8])
    process = tp.SD3TextConditioner([]).noise_process(tp.FlowMatchEulerDiscreteScheduler(shift=3.0))
    t = sigma * process.num_train_timesteps
    with torch.no_grad():
        got = cond.denoise(model, x, t)
        want = model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.hidden,
                     pooled_projections=cond.pooled, return_dict=False)[0]  # fmt: skip
        without_pooled = model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.hidden,
                               pooled_projections=torch.zeros_like(cond.pooled), return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(process.sigma(t), sigma)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (want - without_pooled).abs().max() > 1e-4  # the pooled projections matter to this model


def test_sd3_latents_are_shifted_then_scaled_and_decoded_back(tiny_sd3_path):
    """Training latents are (z - shift_factor) · scaling_factor; decode_latents undoes both, as the pipeline
    decodes."""
    vae = AutoencoderKL.from_pretrained(tiny_sd3_path, subfolder="vae")
    assert vae.config.shift_factor == 0.0609 and vae.config.scaling_factor == 1.5035
    sampler = tp.LatentSampler(vae, [Image.new("RGB", (32, 32), (200, 30, 30))], 32, True, False, "cpu",
                               torch.float32, lambda *_: None)  # fmt: skip
    latents, _ = sampler([0], torch.Generator().manual_seed(0))
    mean, std, _ = sampler.posterior(0, None)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, (z - 0.0609) * 1.5035)
    with torch.no_grad():
        torch.testing.assert_close(tp.decode_latents(vae, latents), vae.decode(z).sample)


# ------------------------------------------------------------------------------------------------ PALP's losses on SD3
def _sd3_reference_losses(model, inputs, config):
    """The PALP terms on SD3 written out from the formulas alone: x_t = (1 - σ)x0 + σε; the SD3 DreamBooth-LoRA loss
    with its defaults (logit-normal: ω = 1; preconditioned outputs: the model's x̂0 = x_t - σv̂ against x0); CFG on
    velocities; D = (1 - σ2)(v^α_pre - v^β_per) in ε units; the coefficient c = σ1²/(1 - σ1)² (the balance of the
    weight σ1² on ‖v̂ - v‖²) times (1 - σ1)/σ1 with the rescale. Returns L_pers, the DDS loss through x̂0 whose
    gradient is c·D·∂x̂0/∂θ, and the value of the surrogate -mean(c·σ1/(1 - σ1)·D·ε̂) with ε̂ = x_t + (1 - σ1)v̂."""
    latents, noise, noise2, cond, cond_clean, uncond, t1, t2 = inputs
    s1, s2 = (t1 / 1000).view(-1, 1, 1, 1), (t2 / 1000).view(-1, 1, 1, 1)

    def velocity(x, t, hidden, pooled):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled,
                     return_dict=False)[0]  # fmt: skip

    x_t1 = (1 - s1) * latents + s1 * noise
    v_hat = velocity(x_t1, t1, cond.hidden, cond.pooled)
    x0_hat = x_t1 - s1 * v_hat
    loss_pers = ((x0_hat - latents) ** 2).mean()
    eps_hat = x_t1 + (1 - s1) * v_hat
    with torch.no_grad():
        x_t2 = (1 - s2) * x0_hat + s2 * noise2

        def guided(c, scale, lora):
            if not lora:
                model.disable_adapters()
            try:
                v_c = velocity(x_t2, t2, c.hidden.expand(2, -1, -1), c.pooled.expand(2, -1))
                v_u = velocity(x_t2, t2, uncond.hidden.expand(2, -1, -1), uncond.pooled.expand(2, -1))
            finally:
                model.enable_adapters()
            return v_u + scale * (v_c - v_u)

        direction = (1 - s2) * (
            guided(cond_clean, config.guidance_scale_pretrained, False)
            - guided(cond.detach(), config.guidance_scale_personalized, True)
        )
    c = s1**2 / (1 - s1) ** 2 * ((1 - s1) / s1 if config.rescale else 1)
    dds = (c * direction * x0_hat).sum() / latents[0].numel() / latents.shape[0]
    surrogate = -(c * s1 / (1 - s1) * direction * eps_hat).flatten(1).mean(1).mean()
    return loss_pers, dds, surrogate.detach()


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "no rescale"])
def test_palp_losses_on_a_tiny_sd3_transformer_match_an_independent_reference(tiny_sd3_path, rescale):
    """palp_losses on the MMDiT with its SD3 conditioning and the SD3 noise process: L_pers, L_align's value and the
    gradient of L_pers + λ·L_align on the LoRA, on the token's path into the prompt (hidden states) and on the pooled
    projection, against the flow formulas with autograd through x̂0."""
    from test_palp_math import _assert_losses_match_reference

    torch.manual_seed(0)
    model = SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer").requires_grad_(False)
    tp.add_lora(model, 4, 4, 0.0, tp.SD3TextConditioner.lora_target_modules)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    process = tp.SD3TextConditioner([]).noise_process(tp.FlowMatchEulerDiscreteScheduler(shift=3.0))
    config = tp.AlignmentConfig(rescale=rescale, weight=0.5)
    g = torch.Generator().manual_seed(6)
    latents, noise, noise2 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))

    def conditioning(batch):
        return tp.SD3Conditioning(torch.randn(batch, 20, 32, generator=g), torch.randn(batch, 24, generator=g))

    cond, cond_clean, uncond = conditioning(2), conditioning(1), conditioning(1)
    cond.hidden.requires_grad_(True)
    cond.pooled.requires_grad_(True)
    t1, t2 = torch.tensor([0.3, 0.85]) * 1000, torch.tensor([0.7, 0.25]) * 1000
    params = [p for p in model.parameters() if p.requires_grad] + [cond.hidden, cond.pooled]
    losses = tp.palp_losses(model, model, latents, noise, t1, t2, noise2, cond, cond_clean, uncond, process, config)
    inputs = (latents, noise, noise2, cond, cond_clean, uncond, t1, t2)
    reference = _sd3_reference_losses(model, inputs, config)
    _assert_losses_match_reference(losses, reference, params, config.weight)
