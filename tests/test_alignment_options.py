"""The alignment options that balance PALP's two terms: a normalised D, D projected off the personalization residual,
a warm-up of λ and a t2 range of its own."""

import argparse

import pytest
import torch
from test_palp_math import _inputs, _process, _run_losses, lora_unet  # noqa: F401  (lora_unet is a fixture)

import train_palp as tp
from conftest import reset_accelerate_state
from test_train_palp import base_args, train


def test_normalized_direction_takes_the_reference_rms_per_sample():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([10.0, 0.1, 1.0]).view(-1, 1, 1, 1)
    reference = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([0.5, 2.0, 1.0]).view(-1, 1, 1, 1)
    out = tp.normalize_direction(direction, reference)
    rms = lambda x: x.pow(2).flatten(1).mean(1).sqrt()  # noqa: E731
    torch.testing.assert_close(rms(out), rms(reference), rtol=1e-5, atol=1e-6)
    # Only the size changes, per sample: the direction itself is kept.
    cosine = torch.nn.functional.cosine_similarity(out.flatten(1), direction.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(3))
    assert torch.isfinite(tp.normalize_direction(torch.zeros(1, 4), torch.ones(1, 4))).all()


def _direct_direction(unet, latents, noise, noise2, cond, cond_clean, uncond, t1, t2, alpha=15.0, beta=7.5):
    """ε̂ and the unnormalised D of PALP's step, computed here step by step (gradient-free)."""
    process = _process()
    x_t1 = process.add_noise(latents, noise, t1)
    eps_hat = unet(x_t1, t1, encoder_hidden_states=cond).sample
    x_t2 = process.add_noise(process.predicted_original_sample(x_t1, eps_hat, t1), noise2, t2)
    with tp.lora_disabled(unet):
        g_pre = tp.guided_epsilon(unet, x_t2, t2, cond_clean.expand(len(latents), -1, -1), uncond, alpha, process)
    return eps_hat, g_pre - tp.guided_epsilon(unet, x_t2, t2, cond, uncond, beta, process)


def test_normalized_alignment_loss_matches_a_direct_computation(lora_unet):  # noqa: F811
    config = tp.AlignmentConfig(normalization="personalization")
    _, loss_align, _, inputs = _run_losses(lora_unet, config)
    _, loss_plain, _, _ = _run_losses(lora_unet, tp.AlignmentConfig())
    alphas, latents, noise, noise2, cond, cond_clean, uncond, t1, t2 = inputs
    with torch.no_grad():
        eps_hat, d = _direct_direction(lora_unet, latents, noise, noise2, cond, cond_clean, uncond, t1, t2)
        reference = 2 * (eps_hat - noise)
        scale = reference.pow(2).flatten(1).mean(1).sqrt() / d.pow(2).flatten(1).mean(1).sqrt()
        expected = -((scale.view(-1, 1, 1, 1) * d) * eps_hat).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss_align.detach(), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(loss_align.detach(), loss_plain.detach())


def _gradients_on_eps_hat(unet, config, latents, noise, t1, t2, cond, cond_clean, uncond):
    """palp_losses' two terms and their gradients on ε̂ (the personalization forward's output), same noise."""
    captured = {}

    def hook(module, args, output):
        if output.sample.requires_grad and "eps" not in captured:
            captured["eps"] = output.sample
            output.sample.retain_grad()

    handle = unet.register_forward_hook(hook)
    try:
        loss_pers, loss_align = tp.palp_losses(unet, unet, latents, noise, t1, t2, noise, cond, cond_clean, uncond,
                                               _process(), config)
    finally:
        handle.remove()
    (g_pers,) = torch.autograd.grad(loss_pers, captured["eps"], retain_graph=True)
    (g_align,) = torch.autograd.grad(loss_align, captured["eps"])
    return loss_align, g_pers, g_align


def _rms(x):
    return x.pow(2).flatten(1).mean(1).sqrt()


def test_normalized_alignment_gradient_has_the_personalization_gradients_size(lora_unet):  # noqa: F811
    """With the normalisation, the two terms' gradients on ε̂ have the same RMS per sample (λ = 1)."""
    latents, noise, cond, cond_clean, uncond = _inputs()
    t1, t2 = torch.tensor([100, 900]), torch.tensor([600, 300])
    config = tp.AlignmentConfig(normalization="personalization")
    _, g_pers, g_align = _gradients_on_eps_hat(lora_unet, config, latents, noise, t1, t2, cond, cond_clean, uncond)
    torch.testing.assert_close(_rms(g_align), _rms(g_pers), rtol=1e-4, atol=1e-8)


def test_projection_removes_only_the_part_of_d_that_undoes_the_personalization():
    gen = torch.Generator().manual_seed(0)
    residual = torch.randn(3, 4, 2, 2, generator=gen)
    other = torch.randn(3, 4, 2, 2, generator=gen)
    other = other - (other * residual).flatten(1).sum(1).view(-1, 1, 1, 1) / residual.pow(2).flatten(1).sum(
        1).view(-1, 1, 1, 1) * residual  # ⟂ residual, per sample
    # Sample 0 pushes along +r (conflict), sample 1 along -r (helps), sample 2 has no r-part at all.
    direction = other + torch.tensor([2.0, -3.0, 0.0]).view(-1, 1, 1, 1) * residual
    out = tp.project_off_residual(direction, residual)
    torch.testing.assert_close(out[0], other[0], atol=1e-5, rtol=1e-5)  # the +r part is gone, the rest untouched
    torch.testing.assert_close(out[1:], direction[1:])  # kept where it does not oppose the personalization
    assert torch.isfinite(tp.project_off_residual(direction, torch.zeros_like(residual))).all()


def test_projected_alignment_never_pushes_against_the_personalization(lora_unet):  # noqa: F811
    """With the projection (then the normalisation), palp_losses' alignment term is the direct computation, its
    gradient on ε̂ has no component that increases ‖ε̂ − ε‖ to first order, per sample, and its size is still the
    personalization gradient's."""
    latents, noise, cond, cond_clean, uncond = _inputs(seed=1, batch=4)
    t1, t2 = torch.tensor([100, 900, 400, 700]), torch.tensor([600, 300, 800, 200])
    with torch.no_grad():
        eps_hat, d = _direct_direction(lora_unet, latents, noise, noise, cond, cond_clean, uncond, t1, t2)
        r = eps_hat - noise
        overlap = (d * r).flatten(1).sum(1)
        # These inputs exercise both branches: samples whose D opposes the personalization and samples whose D does not.
        assert (overlap > 0).any() and (overlap < 0).any()
        projected = d - (overlap.clamp_min(0) / r.pow(2).flatten(1).sum(1)).view(-1, 1, 1, 1) * r
        scaled = projected * (_rms(2 * r) / _rms(projected)).view(-1, 1, 1, 1)
        expected = -(scaled * eps_hat).flatten(1).mean(1).mean()

    config = tp.AlignmentConfig(normalization="personalization", projection="residual")
    loss_align, g_pers, g_align = _gradients_on_eps_hat(lora_unet, config, latents, noise, t1, t2, cond, cond_clean,
                                                        uncond)
    torch.testing.assert_close(loss_align.detach(), expected, atol=1e-5, rtol=1e-4)
    # Descent on L_align moves ε̂ along -g_align; against g_pers ∝ ε̂ − ε that is never uphill.
    cosine = torch.nn.functional.cosine_similarity(g_align.flatten(1), g_pers.flatten(1))
    assert (cosine >= -1e-5).all()
    assert (cosine[overlap > 0].abs() < 1e-4).all()  # projected samples: exactly orthogonal
    torch.testing.assert_close(_rms(g_align), _rms(g_pers), rtol=1e-4, atol=1e-8)


def test_alignment_ramp():
    assert [tp.alignment_ramp(s, 0) for s in (0, 5)] == [1.0, 1.0]
    assert [tp.alignment_ramp(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]


def test_t2_range_of_its_own():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    shape = (4096, 1, 1, 1)
    default = tp.sample_step_noise(shape, _process(), (20, 980), tp.AlignmentConfig(), g())
    narrow = tp.sample_step_noise(shape, _process(), (20, 980), tp.AlignmentConfig(), g(), t2_bounds=(20, 600))
    assert torch.equal(default[1], narrow[1])  # t1 is drawn as before
    assert narrow[2].max() <= 600 < default[2].max() and narrow[2].min() >= 20
    same = tp.sample_step_noise(shape, _process(), (20, 980), tp.AlignmentConfig(), g(), t2_bounds=(20, 980))
    assert all(torch.equal(a, b) for a, b in zip(default, same))
    args = argparse.Namespace(timestep_min_ratio=0.02, timestep_max_ratio=0.98, alignment_timestep_min_ratio=None,
                              alignment_timestep_max_ratio=0.6)
    assert tp.alignment_timestep_ratios(args) == (0.02, 0.6)


def test_config_and_card_record_the_alignment_options(tiny_sd_path, instance_dir, tmp_path):
    import json

    out = tmp_path / "out"
    train(tiny_sd_path, instance_dir, out, "--alignment_warmup_steps", "2", "--alignment_normalization",
          "personalization", "--alignment_timestep_max_ratio", "0.5", "--alignment_projection", "residual")
    config = json.loads((out / "training_config.json").read_text())
    assert (config["alignment_warmup_steps"], config["alignment_normalization"]) == (2, "personalization")
    assert config["alignment_timestep_max_ratio"] == 0.5 and config["alignment_projection"] == "residual"
    card = (out / "README.md").read_text()
    assert "| `alignment_normalization` | `personalization` |" in card
    assert "| `alignment_projection` | `residual` |" in card


def test_warm_up_starts_without_the_alignment_term(tiny_sd_path, instance_dir, tmp_path):
    """At step 0 the ramp is 0: one step of PALP with a warm-up trains exactly what TI+DB trains; without the
    warm-up it does not."""
    from safetensors.torch import load_file

    def lora_after_one_step(name, *extra):
        reset_accelerate_state()
        out = tmp_path / name
        train(tiny_sd_path, instance_dir, out, "--max_train_steps", "1", "--num_validation_images", "0", *extra)
        return load_file(str(out / "pytorch_lora_weights.safetensors"))

    ti_db = lora_after_one_step("ti_db", "--alignment_mode", "none")
    warm = lora_after_one_step("warm", "--alignment_warmup_steps", "10")
    cold = lora_after_one_step("cold")
    assert all(torch.equal(ti_db[k], warm[k]) for k in ti_db)
    assert not all(torch.equal(ti_db[k], cold[k]) for k in ti_db)


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--alignment_warmup_steps", "-1"], "--alignment_warmup_steps"),
        (["--alignment_timestep_max_ratio", "1.5"], "--alignment_timestep_max_ratio"),
        (["--alignment_timestep_min_ratio", "0.7", "--alignment_timestep_max_ratio", "0.5"],
         "--alignment_timestep_min_ratio"),
        (["--alignment_timestep", "same", "--alignment_timestep_max_ratio", "0.5"], "--alignment_timestep same"),
    ],
)
def test_bad_alignment_options_fail_early(tiny_sd_path, instance_dir, tmp_path, extra, expected):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        tp.cli(base_args(tiny_sd_path, instance_dir, out, *extra))
    message = str(info.value)
    assert message.startswith("error: ") and expected in message and "\n" not in message
    assert not out.exists()
