"""The PALP mathematics of train_palp.py, checked against independent computations on a tiny UNet with LoRA."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

import train_palp as tp


def _unet_with_lora(model_path):
    """The model's UNet with a rank-4 LoRA that is not the identity, so "LoRA on" and "LoRA off" differ."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet")
    unet.requires_grad_(False)
    tp.add_lora(unet, rank=4, alpha=4, dropout=0.0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return unet


@pytest.fixture(scope="module")
def lora_unet(tiny_sd_path):
    return _unet_with_lora(tiny_sd_path)


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    cond = torch.randn(batch, 77, 32, generator=g)
    cond_clean = torch.randn(1, 77, 32, generator=g)
    uncond = torch.randn(1, 77, 32, generator=g)
    return latents, noise, cond, cond_clean, uncond


def _lora_params(unet):
    return [p for p in unet.parameters() if p.requires_grad]


def _alphas():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def _process(prediction_type="epsilon"):
    """SD's DDPM noise process."""
    return tp.DDPMProcess(_alphas(), prediction_type)


def test_noise_and_x0_are_inverse():
    process = _process()
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([20, 500, 980])
    x_t = process.add_noise(x0, eps, t)
    a = _alphas()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(process.predicted_original_sample(x_t, eps, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(process.original_sample(eps, x_t, t), x0, atol=1e-4, rtol=1e-4)
    # Per-sample broadcasting: sample 0 at t=20 is almost clean, sample 2 at t=980 almost pure noise.
    assert (x_t[0] - x0[0]).abs().mean() < 0.2 < (x_t[2] - x0[2]).abs().mean()


def test_v_prediction_is_converted_to_epsilon():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    process = _process("v_prediction")
    x_t = process.add_noise(x0, eps, t)
    s = _alphas()[t].sqrt().view(-1, 1, 1, 1)
    v = s * eps - (1 - s**2).sqrt() * x0
    torch.testing.assert_close(process.epsilon(v, x_t, t), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(process.original_sample(v, x_t, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(process.target(x0, eps, t), v)
    assert _process("epsilon").epsilon(v, x_t, t) is v
    with pytest.raises(ValueError, match="sample"):
        tp.DDPMProcess(_alphas(), "sample")


def test_classifier_free_guidance_formula():
    uncond, cond = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(tp.classifier_free_guidance(uncond, cond, 7.5), torch.tensor([16.0, -13.0]))
    torch.testing.assert_close(tp.classifier_free_guidance(uncond, cond, 1.0), cond)


@pytest.mark.parametrize("rescale", [True, False])
def test_alignment_gradient_equals_rescaled_dds_gradient_through_x0(lora_unet, rescale):
    """∇_θ L_align must equal the DDS gradient D · ∂x̂0/∂θ, rescaled by √ᾱ/√(1-ᾱ) when the rescale is on,
    computed here independently by autograd through x̂0."""
    alphas, process = _alphas(), _process()
    latents, noise, cond, _, _ = _inputs()
    t1 = torch.tensor([150, 800])
    a1 = alphas[t1]
    x_t1 = process.add_noise(latents, noise, t1)
    direction = torch.randn_like(latents)
    weight = torch.tensor([1.0, 0.5])
    params = _lora_params(lora_unet)

    eps_hat = lora_unet(x_t1, t1, encoder_hidden_states=cond).sample
    loss = tp.palp_alignment_loss(eps_hat, direction, process, t1, weight, rescale=rescale)
    grads = torch.autograd.grad(loss, params)

    eps_hat = lora_unet(x_t1, t1, encoder_hidden_states=cond).sample
    s = a1.sqrt().view(-1, 1, 1, 1)
    x0_hat = (x_t1 - (1 - s**2).sqrt() * eps_hat) / s
    factor = (s / (1 - s**2).sqrt()) if rescale else torch.ones_like(s)
    per_element = latents[0].numel()
    # The DDS loss whose gradient on x̂0 is w · D (divided by the element count as the mean is).
    dds = (weight.view(-1, 1, 1, 1) * factor * direction * x0_hat).sum() / per_element / latents.shape[0]
    expected = torch.autograd.grad(dds, params)

    assert max(g.abs().max().item() for g in grads) > 0
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_rescale_changes_the_gradient_by_the_timestep_factor(lora_unet):
    alphas, process = _alphas(), _process()
    latents, noise, cond, _, _ = _inputs(batch=1)
    t1 = torch.tensor([900])
    a1 = alphas[t1]
    x_t1 = process.add_noise(latents, noise, t1)
    direction = torch.randn_like(latents)
    eps_hat = lora_unet(x_t1, t1, encoder_hidden_states=cond).sample
    on = tp.palp_alignment_loss(eps_hat, direction, process, t1, torch.ones(1), rescale=True)
    off = tp.palp_alignment_loss(eps_hat, direction, process, t1, torch.ones(1), rescale=False)
    torch.testing.assert_close(off / on, ((1 - a1) / a1).sqrt()[0], rtol=1e-5, atol=0)


def test_descent_step_moves_x0_against_direction(lora_unet):
    """Sign: a small gradient-descent step on the LoRA moves x̂0 along -D (towards the pre-trained model's picture
    of the clean prompt)."""
    process = _process()
    latents, noise, cond, _, _ = _inputs(seed=3)
    t1 = torch.tensor([300, 600])
    x_t1 = process.add_noise(latents, noise, t1)
    direction = torch.randn_like(latents)
    params = _lora_params(lora_unet)
    backup = [p.detach().clone() for p in params]

    def x0():
        with torch.no_grad():
            return process.predicted_original_sample(x_t1, lora_unet(x_t1, t1, encoder_hidden_states=cond).sample, t1)

    before = x0()
    eps_hat = lora_unet(x_t1, t1, encoder_hidden_states=cond).sample
    loss = tp.palp_alignment_loss(eps_hat, direction, process, t1, torch.ones(2))
    grads = torch.autograd.grad(loss, params)
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 1e-2 * g
        moved = x0() - before
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
    assert (moved * direction).sum() < 0
    assert (moved * -direction).sum() > 0


def test_direction_is_detached_inside_the_loss():
    eps_hat = torch.randn(1, 4, 2, 2, requires_grad=True)
    direction = torch.randn(1, 4, 2, 2, requires_grad=True)
    loss = tp.palp_alignment_loss(eps_hat, direction, _process(), torch.tensor([500]), torch.ones(1))
    loss.backward()
    assert direction.grad is None
    torch.testing.assert_close(eps_hat.grad, -direction.detach() / direction.numel())


def test_pretrained_prediction_ignores_lora_weights(lora_unet):
    latents, _, cond, _, _ = _inputs()
    t = torch.tensor([500, 500])
    with torch.no_grad(), tp.lora_disabled(lora_unet):
        off_before = lora_unet(latents, t, encoder_hidden_states=cond).sample
    on_before = lora_unet(latents, t, encoder_hidden_states=cond).sample.detach()
    params = _lora_params(lora_unet)
    backup = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.1)
            with tp.lora_disabled(lora_unet):
                off_after = lora_unet(latents, t, encoder_hidden_states=cond).sample
            on_after = lora_unet(latents, t, encoder_hidden_states=cond).sample
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
    torch.testing.assert_close(off_after, off_before, atol=0, rtol=0)
    assert (on_after - on_before).abs().max() > 1e-4
    assert (on_before - off_before).abs().max() > 1e-4  # the LoRA really was switched off


def test_guided_epsilon_batches_cond_and_uncond(lora_unet):
    latents, _, cond, _, uncond = _inputs()
    t = torch.tensor([400, 700])
    with torch.no_grad():
        guided = tp.guided_epsilon(lora_unet, latents, t, cond, uncond, 7.5, _process())
        c = lora_unet(latents, t, encoder_hidden_states=cond).sample
        u = lora_unet(latents, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        single = tp.guided_epsilon(lora_unet, latents, t, cond, uncond, 1.0, _process())
    torch.testing.assert_close(guided, u + 7.5 * (c - u), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(single, c, atol=1e-6, rtol=0)


class CallRecorder:
    """Records, per UNet call, the batch size, whether the output carries a gradient and whether LoRA was on."""

    def __init__(self, unet):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.calls = []
        self.lora_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self.handle = unet.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.calls.append(
            {
                "batch": args[0].shape[0],
                "grad": output.sample.requires_grad,
                "lora": not self.lora_layers[0].disable_adapters,
            }
        )


def _run_losses(unet, config, seed=0, prediction_type="epsilon"):
    alphas = _alphas()
    latents, noise, cond, cond_clean, uncond = _inputs(seed)
    cond = cond.requires_grad_(True)
    t1, t2 = torch.tensor([100, 900]), torch.tensor([600, 300])
    noise2 = noise if config.noise == "same" else torch.randn_like(noise)
    recorder = CallRecorder(unet)
    try:
        loss_pers, loss_align = tp.palp_losses(
            unet, unet, latents, noise, t1, t2, noise2, cond, cond_clean, uncond, _process(prediction_type), config
        )
    finally:
        recorder.handle.remove()
    return loss_pers, loss_align, recorder.calls, (alphas, latents, noise, noise2, cond, cond_clean, uncond, t1, t2)


def test_dds_runs_one_gradient_pass_and_two_batched_gradient_free_passes(lora_unet):
    config = tp.AlignmentConfig()
    loss_pers, loss_align, calls, _ = _run_losses(lora_unet, config)
    assert calls == [
        {"batch": 2, "grad": True, "lora": True},  # personalization forward: the only one with a graph
        {"batch": 4, "grad": False, "lora": False},  # pre-trained on [y_c, ∅], one batched call
        {"batch": 4, "grad": False, "lora": True},  # personalized on [y_P, ∅], one batched call
    ]
    assert loss_pers.requires_grad and loss_align.requires_grad


def test_beta_one_skips_the_personalized_unconditional_pass(lora_unet):
    config = tp.AlignmentConfig(guidance_scale_personalized=1.0)
    _, _, calls, _ = _run_losses(lora_unet, config)
    assert [c["batch"] for c in calls] == [2, 4, 2]


def test_dds_loss_matches_a_direct_computation(lora_unet):
    config = tp.AlignmentConfig(weighting="one_minus_alpha_bar")
    _, loss_align, _, inputs = _run_losses(lora_unet, config)
    alphas, latents, noise, noise2, cond, cond_clean, uncond, t1, t2 = inputs
    with torch.no_grad():
        process = _process()
        x_t1 = process.add_noise(latents, noise, t1)
        eps_hat = lora_unet(x_t1, t1, encoder_hidden_states=cond).sample
        x_t2 = process.add_noise(process.predicted_original_sample(x_t1, eps_hat, t1), noise2, t2)

        def eps(c, lora):
            if lora:
                return lora_unet(x_t2, t2, encoder_hidden_states=c).sample
            with tp.lora_disabled(lora_unet):
                return lora_unet(x_t2, t2, encoder_hidden_states=c).sample

        g_pre = eps(uncond.expand(2, -1, -1), False) + 15.0 * (
            eps(cond_clean.expand(2, -1, -1), False) - eps(uncond.expand(2, -1, -1), False)
        )
        g_per = eps(uncond.expand(2, -1, -1), True) + 7.5 * (eps(cond, True) - eps(uncond.expand(2, -1, -1), True))
        w = (1 - alphas[t2]).view(-1, 1, 1, 1)
        expected = -(w * (g_pre - g_per) * eps_hat).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss_align.detach(), expected, atol=1e-5, rtol=1e-4)


def test_sds_uses_pretrained_minus_noise_and_skips_the_personalized_pass(lora_unet):
    config = tp.AlignmentConfig(mode="sds")
    _, loss_align, calls, inputs = _run_losses(lora_unet, config)
    assert [(c["batch"], c["lora"]) for c in calls] == [(2, True), (4, False)]
    alphas, latents, noise, noise2, cond, cond_clean, uncond, t1, t2 = inputs
    with torch.no_grad():
        process = _process()
        x_t1 = process.add_noise(latents, noise, t1)
        eps_hat = lora_unet(x_t1, t1, encoder_hidden_states=cond).sample
        x_t2 = process.add_noise(process.predicted_original_sample(x_t1, eps_hat, t1), noise2, t2)
        with tp.lora_disabled(lora_unet):
            g_pre = tp.guided_epsilon(
                lora_unet, x_t2, t2, cond_clean.expand(2, -1, -1), uncond, 15.0, process
            )
        expected = -((g_pre - noise2) * eps_hat).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss_align.detach(), expected, atol=1e-5, rtol=1e-4)


def test_none_mode_is_the_plain_personalization_loss(lora_unet):
    config = tp.AlignmentConfig(mode="none")
    loss_pers, loss_align, calls, inputs = _run_losses(lora_unet, config)
    alphas, latents, noise, _, cond, *_, t1, _ = inputs
    assert len(calls) == 1
    assert loss_align.item() == 0.0
    with torch.no_grad():
        pred = lora_unet(_process().add_noise(latents, noise, t1), t1, encoder_hidden_states=cond).sample
    torch.testing.assert_close(loss_pers.detach(), torch.nn.functional.mse_loss(pred, noise), atol=1e-6, rtol=1e-5)


def test_v_prediction_personalization_target_is_velocity(lora_unet):
    config = tp.AlignmentConfig(mode="none")
    loss_pers, _, _, inputs = _run_losses(lora_unet, config, prediction_type="v_prediction")
    alphas, latents, noise, _, cond, *_, t1, _ = inputs
    a = alphas[t1].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = lora_unet(_process().add_noise(latents, noise, t1), t1, encoder_hidden_states=cond).sample
    velocity = a.sqrt() * noise - (1 - a).sqrt() * latents
    torch.testing.assert_close(loss_pers.detach(), torch.nn.functional.mse_loss(pred, velocity), atol=1e-6, rtol=1e-5)


def test_step_noise_options():
    bounds, process = (20, 980), _process()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    same = tp.sample_step_noise((2, 4, 8, 8), process, bounds, tp.AlignmentConfig(), g())
    fresh = tp.sample_step_noise(
        (2, 4, 8, 8), process, bounds, tp.AlignmentConfig(noise="fresh", timestep="same"), g()
    )
    noise, t1, t2, noise2 = same
    assert noise2 is noise and not torch.equal(t1, t2)
    noise_f, t1_f, t2_f, noise2_f = fresh
    assert torch.equal(noise_f, noise) and torch.equal(t1_f, t1)  # the same draws, only the reuse differs
    assert torch.equal(t2_f, t1_f) and not torch.equal(noise2_f, noise_f)
    many = tp.sample_step_noise((4096, 1, 1, 1), process, bounds, tp.AlignmentConfig(), g())
    assert many[1].min() >= 20 and many[1].max() <= 980 and many[1].min() < 40 and many[1].max() > 960
    assert tp.timestep_bounds(1000, 0.02, 0.98) == (20, 980)


def test_alignment_weighting():
    process, t = tp.DDPMProcess(torch.tensor([0.9, 0.1])), torch.tensor([0, 1])
    torch.testing.assert_close(tp.alignment_timestep_weight(process, t, "uniform"), torch.ones(2))
    torch.testing.assert_close(
        tp.alignment_timestep_weight(process, t, "one_minus_alpha_bar"), torch.tensor([0.1, 0.9])
    )


@pytest.mark.parametrize(
    "target,expected",
    [
        ("A sketch of <t> in Paris", "A sketch of a cat in Paris"),
        ("a <t> on the rock", "a cat on the rock"),
        ("The <t> at night", "The cat at night"),
        ("<t> as an oil painting", "a cat as an oil painting"),
    ],
)
def test_default_clean_prompt(target, expected):
    assert tp.default_clean_prompt(target, "<t>", "cat") == expected


def test_default_clean_prompt_uses_an_before_vowels():
    assert tp.default_clean_prompt("A photo of <t>", "<t>", "owl") == "A photo of an owl"


def test_batch_indices_cover_each_epoch_and_split_ranks():
    seen = [tp.batch_indices(5, 1, step, seed=7, rank=0, world_size=1)[0] for step in range(10)]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:]) == list(range(5))
    rank0 = [tp.batch_indices(4, 1, s, 7, 0, 2)[0] for s in range(2)]
    rank1 = [tp.batch_indices(4, 1, s, 7, 1, 2)[0] for s in range(2)]
    assert sorted(rank0 + rank1) == [0, 1, 2, 3]  # one epoch split between the two ranks
    assert tp.batch_indices(5, 2, 3, 7, 0, 1) == tp.batch_indices(5, 2, 3, 7, 0, 1)


def test_step_generator_depends_on_seed_rank_and_step_only():
    draw = lambda *key: torch.rand(3, generator=tp.step_generator(*key))  # noqa: E731
    assert torch.equal(draw(1, 0, 5), draw(1, 0, 5))
    assert not torch.equal(draw(1, 0, 5), draw(1, 0, 6))
    assert not torch.equal(draw(1, 0, 5), draw(1, 1, 5))
    assert not torch.equal(draw(1, 0, 5), draw(2, 0, 5))


# ------------------------------------------------------------------------------------------------ palp_losses by value
def _reference_losses(unet, inputs, config, prediction_type):
    """The PALP terms written out independently of train_palp: separate (unbatched) CFG calls, x̂0 from the raw model
    output. Returns L_pers, the DDS loss through x̂0 whose gradient is w·c·D·∂x̂0/∂θ (c: the rescale √ᾱ1/√(1-ᾱ1), or
    1 without it, times the v-prediction balance 1/ᾱ1), and the value of the surrogate -mean(w·c·D·ε̂)·√(1-ᾱ1)/√ᾱ1
    that train_palp minimises in its place."""
    alphas, latents, noise, noise2, cond, cond_clean, uncond, t1, t2 = inputs
    a1, a2 = alphas[t1].view(-1, 1, 1, 1), alphas[t2].view(-1, 1, 1, 1)
    x_t1 = a1.sqrt() * latents + (1 - a1).sqrt() * noise
    out = unet(x_t1, t1, encoder_hidden_states=cond).sample
    if prediction_type == "v_prediction":
        target = a1.sqrt() * noise - (1 - a1).sqrt() * latents
        x0_hat = a1.sqrt() * x_t1 - (1 - a1).sqrt() * out
    else:
        target = noise
        x0_hat = (x_t1 - (1 - a1).sqrt() * out) / a1.sqrt()
    loss_pers = ((out - target) ** 2).mean()
    with torch.no_grad():
        x_t2 = a2.sqrt() * x0_hat + (1 - a2).sqrt() * noise2

        def eps(c, lora):
            if not lora:
                unet.disable_adapters()
            try:
                o = unet(x_t2, t2, encoder_hidden_states=c.expand(2, -1, -1)).sample
            finally:
                unet.enable_adapters()
            return a2.sqrt() * o + (1 - a2).sqrt() * x_t2 if prediction_type == "v_prediction" else o

        def guided(c, scale, lora):
            return eps(uncond, lora) + scale * (eps(c, lora) - eps(uncond, lora))

        g_pre = guided(cond_clean, config.guidance_scale_pretrained, False)
        other = guided(cond, config.guidance_scale_personalized, True) if config.mode == "dds" else noise2
        direction = g_pre - other
        if config.normalization == "personalization":
            eps_hat_ref = a1.sqrt() * out + (1 - a1).sqrt() * x_t1 if prediction_type == "v_prediction" else out
            reference = 2 * (eps_hat_ref - noise)
            rms = lambda x: x.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)  # noqa: E731
            direction = direction * rms(reference) / rms(direction)
    w = (1 - a2) if config.weighting == "one_minus_alpha_bar" else torch.ones_like(a2)
    c = a1.sqrt() / (1 - a1).sqrt() if config.rescale else torch.ones_like(a1)
    if prediction_type == "v_prediction":
        c = c / a1
    dds = (w * c * direction * x0_hat).sum() / latents[0].numel() / latents.shape[0]
    eps_hat = a1.sqrt() * out + (1 - a1).sqrt() * x_t1 if prediction_type == "v_prediction" else out
    # ∂x̂0/∂ε̂ = -√(1-ᾱ1)/√ᾱ1: the surrogate in ε̂ with the same gradient as the DDS loss through x̂0.
    surrogate = -(w * c * (1 - a1).sqrt() / a1.sqrt() * direction * eps_hat).flatten(1).mean(1).mean()
    return loss_pers, dds, surrogate.detach()


PALP_LOSS_CASES = {
    "defaults": dict(),
    "no rescale": dict(rescale=False),
    "fresh noise": dict(noise="fresh"),
    "fresh noise, no rescale": dict(noise="fresh", rescale=False),
    "timestep same": dict(timestep="same", rescale=False),
    "one minus alpha bar": dict(weighting="one_minus_alpha_bar", rescale=False),
    "lambda 0.5, beta 1": dict(weight=0.5, guidance_scale_personalized=1.0, guidance_scale_pretrained=4.0),
    "sds": dict(mode="sds", rescale=False, noise="fresh"),
    "normalized D": dict(normalization="personalization", rescale=False, guidance_scale_personalized=1.0),
    "normalized D, fresh noise": dict(normalization="personalization", noise="fresh"),
}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", list(PALP_LOSS_CASES), ids=list(PALP_LOSS_CASES))
def test_palp_losses_gradient_matches_an_independent_reference(lora_unet, case, prediction_type):
    """The gradient of L_pers + λ·L_align from palp_losses itself, on the LoRA and on y_P (the [V] path), against
    autograd through x̂0 of an independent implementation."""
    config = tp.AlignmentConfig(**PALP_LOSS_CASES[case])
    alphas = _alphas()
    latents, noise, cond, cond_clean, uncond = _inputs(seed=5)
    cond = cond.requires_grad_(True)
    t1 = torch.tensor([150, 850])
    t2 = t1.clone() if config.timestep == "same" else torch.tensor([700, 250])
    noise2 = noise if config.noise == "same" else torch.randn(noise.shape, generator=torch.Generator().manual_seed(9))
    params = _lora_params(lora_unet) + [cond]
    inputs = (alphas, latents, noise, noise2, cond, cond_clean, uncond, t1, t2)

    process = _process(prediction_type)
    losses = tp.palp_losses(
        lora_unet, lora_unet, latents, noise, t1, t2, noise2, cond, cond_clean, uncond, process, config
    )
    reference = _reference_losses(lora_unet, inputs, config, prediction_type)
    _assert_losses_match_reference(losses, reference, params, config.weight)


def _assert_losses_match_reference(losses, reference, params, weight):
    """palp_losses' (L_pers, L_align) against a reference's (L_pers, the DDS loss through x̂0, the surrogate's value):
    both values, and the gradient of L_pers + λ·L_align on ``params``, to which the alignment term contributes."""
    (loss_pers, loss_align), (ref_pers, ref_dds, ref_surrogate) = losses, reference
    got = torch.autograd.grad(loss_pers + weight * loss_align, params)
    want = torch.autograd.grad(ref_pers + weight * ref_dds, params, retain_graph=True)
    align_only = torch.autograd.grad(ref_dds, params)
    torch.testing.assert_close(loss_pers.detach(), ref_pers.detach(), atol=1e-6, rtol=1e-5)
    # The value goes through v-prediction's 1/ᾱ1 and 1/√ᾱ2 factors, which magnify float32 rounding (batched and
    # single calls reduce in a thread-count-dependent order) to about 1e-4 of it; the gradients below stay at 1e-4.
    torch.testing.assert_close(loss_align.detach(), ref_surrogate, atol=1e-6, rtol=1e-3)
    assert max(g.abs().max().item() for g in align_only) > 1e-4  # the alignment term really contributes
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_zero_lambda_returns_no_alignment_and_skips_its_passes(lora_unet):
    loss_pers, loss_align, calls, _ = _run_losses(lora_unet, tp.AlignmentConfig(weight=0.0))
    assert len(calls) == 1 and loss_align.item() == 0.0 and loss_pers.item() > 0


# ------------------------------------------------------------------------------------------------ v-prediction balance
def test_v_prediction_balance_restores_the_epsilon_ratio_of_the_two_gradients():
    """Per element, (∂L_align/∂output) / (∂L_pers/∂output) must be the same for a v-model as for an ε-model that
    predicts the same ε̂, at every t1: the paper's uniform balance carried over to v-prediction."""
    alphas = _alphas()
    g = torch.Generator().manual_seed(1)
    x0, eps, eps_hat = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    direction = torch.randn(3, 4, 4, 4, generator=g)
    t1 = torch.tensor([20, 500, 980])
    a1 = alphas[t1]
    a = a1.view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    ratios = {}
    for prediction_type in ("epsilon", "v_prediction"):
        if prediction_type == "epsilon":
            output, target = eps_hat.clone().requires_grad_(True), eps
        else:  # the v that gives the same ε̂, and the true v
            output = ((eps_hat - (1 - a).sqrt() * x_t) / a.sqrt()).requires_grad_(True)
            target = a.sqrt() * eps - (1 - a).sqrt() * x0
        process = _process(prediction_type)
        converted = process.epsilon(output, x_t, t1)
        torch.testing.assert_close(converted, eps_hat, atol=1e-4, rtol=1e-4)
        (d_pers,) = torch.autograd.grad(F.mse_loss(output, target), output)
        align = tp.palp_alignment_loss(converted, direction, process, t1, torch.ones(3), True)
        (d_align,) = torch.autograd.grad(align, output)
        ratios[prediction_type] = d_align / d_pers
    torch.testing.assert_close(ratios["v_prediction"], ratios["epsilon"], atol=1e-3, rtol=1e-3)


def test_v_prediction_balance_is_one_over_alpha_bar_at_t1():
    a1, t1 = torch.tensor([0.9, 0.05]), torch.tensor([0, 1])
    v_process, eps_process = tp.DDPMProcess(a1, "v_prediction"), tp.DDPMProcess(a1, "epsilon")
    torch.testing.assert_close(v_process.alignment_balance(t1), 1 / a1)
    torch.testing.assert_close(eps_process.alignment_balance(t1), torch.ones(2))
    eps_hat, direction = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    for rescale in (True, False):
        v = tp.palp_alignment_loss(eps_hat, direction, v_process, t1, torch.ones(2), rescale)
        e_per_sample = [
            tp.palp_alignment_loss(eps_hat[i : i + 1], direction[i : i + 1], eps_process, t1[i : i + 1],
                                   torch.ones(1), rescale)
            for i in range(2)
        ]
        torch.testing.assert_close(v, sum(e / a for e, a in zip(e_per_sample, a1)) / 2)


def test_v_prediction_alignment_branch_by_value(tiny_sd_vpred_path):
    """On a v-prediction UNet, palp_losses' L_align equals the independent computation (ε from v for ε̂ and for
    both guided passes, balance 1/ᾱ_t1)."""
    from diffusers import DDPMScheduler

    unet = _unet_with_lora(tiny_sd_vpred_path)
    scheduler = DDPMScheduler.from_pretrained(tiny_sd_vpred_path, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    alphas = scheduler.alphas_cumprod
    latents, noise, cond, cond_clean, uncond = _inputs(seed=2)
    t1, t2 = torch.tensor([100, 900]), torch.tensor([600, 300])
    config = tp.AlignmentConfig(rescale=False)
    _, loss_align = tp.palp_losses(
        unet, unet, latents, noise, t1, t2, noise, cond, cond_clean, uncond, tp.ddpm_process(scheduler), config
    )
    _, ref, ref_surrogate = _reference_losses(
        unet, (alphas, latents, noise, noise, cond, cond_clean, uncond, t1, t2), config, "v_prediction"
    )
    torch.testing.assert_close(loss_align.detach(), ref_surrogate, atol=1e-6, rtol=1e-3)
    params = _lora_params(unet)
    torch.testing.assert_close(
        torch.autograd.grad(loss_align, params, retain_graph=True)[0], torch.autograd.grad(ref, params)[0],
        atol=1e-6, rtol=1e-4,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ config and dropout
def test_alignment_config_from_args_round_trip(tmp_path):
    """Every AlignmentConfig field comes from its own flag: distinct non-default values survive from_args."""
    import dataclasses

    from conftest import write_instance_images

    flags = {
        "mode": ("--alignment_mode", "teacher"),
        "guidance_scale_pretrained": ("--guidance_scale_pretrained", "3.25"),
        "guidance_scale_personalized": ("--guidance_scale_personalized", "2.5"),
        "weight": ("--alignment_weight", "0.75"),
        "noise": ("--alignment_noise", "fresh"),
        "timestep": ("--alignment_timestep", "same"),
        "weighting": ("--alignment_weighting", "one_minus_alpha_bar"),
        "rescale": ("--no-rescale", None),
        "normalization": ("--alignment_normalization", "personalization"),
        "projection": ("--alignment_projection", "residual"),
        "gradient": ("--alignment_gradient", "lora"),
        "warmup_steps": ("--alignment_warmup_steps", "7"),
        "calibration_steps": ("--alignment_calibration_steps", "9"),
        "teacher_inversion": ("--teacher_inversion", None),
    }
    fields = [f.name for f in dataclasses.fields(tp.AlignmentConfig)]
    assert set(fields) == set(flags), f"give every AlignmentConfig field a flag in this test: {set(fields) ^ set(flags)}"
    argv = [
        "--pretrained_model_name_or_path", "some/model", "--instance_data_dir", str(write_instance_images(tmp_path)),
        "--placeholder_token", "<t>", "--class_name", "cat", "--target_prompt", "A <t>", "--output_dir",
        str(tmp_path / "out"),
    ]  # fmt: skip
    for flag, value in flags.values():
        argv += [flag] if value is None else [flag, value]
    config = tp.AlignmentConfig.from_args(tp.parse_args(argv))
    default = tp.AlignmentConfig()
    for name, (flag, value) in flags.items():
        got = getattr(config, name)
        expected = (not getattr(default, name)) if value is None else type(getattr(default, name))(value)
        assert got == expected != getattr(default, name), (name, flag, got)


def test_personalized_pass_runs_without_lora_dropout(tiny_sd_path):
    """With --lora_dropout > 0 the gradient pass drops LoRA activations, the gradient-free personalized pass must not:
    its output equals the same call with the dropout modules in eval mode."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    unet.requires_grad_(False)
    tp.add_lora(unet, rank=4, alpha=4, dropout=0.9)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    unet.train()
    dropouts = [m for n, m in unet.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Dropout) for m in dropouts)
    seen = []
    handle = unet.register_forward_hook(
        lambda module, args, output: seen.append((args[0].shape[0], [m.training for m in dropouts], args, output))
    )
    try:
        alphas = _alphas()
        latents, noise, cond, cond_clean, uncond = _inputs()
        config = tp.AlignmentConfig(guidance_scale_personalized=1.0)
        tp.palp_losses(unet, unet, latents, noise, torch.tensor([100, 900]), torch.tensor([600, 300]), noise, cond,
                       cond_clean, uncond, tp.DDPMProcess(alphas), config)  # fmt: skip
    finally:
        handle.remove()
    assert [all(flags) for _, flags, _, _ in seen] == [True, True, False]  # grad pass, pre-trained, personalized
    assert all(m.training for m in dropouts)  # restored afterwards
    (x_t2, t2), output = seen[2][2][:2], seen[2][3]
    for m in dropouts:
        m.eval()
    with torch.no_grad():
        clean = unet(x_t2, t2, encoder_hidden_states=cond).sample
    torch.testing.assert_close(output.sample, clean, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ timesteps
def test_timestep_bounds_stay_inside_the_schedule():
    assert tp.timestep_bounds(1000, 1.0, 1.0) == (999, 999)
    assert tp.timestep_bounds(1000, 0.0, 0.9996) == (0, 999)


def test_zero_terminal_snr_schedule_is_refused_at_its_last_step():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    alphas = scheduler.alphas_cumprod
    assert alphas[999] == 0
    process = tp.DDPMProcess(alphas)
    with pytest.raises(tp.UserInputError, match="--timestep_max_ratio 0.998 or lower"):
        process.check_timestep_bounds(tp.timestep_bounds(1000, 0.02, 1.0))
    process.check_timestep_bounds(tp.timestep_bounds(1000, 0.02, 0.98))  # the default is fine
    process.check_timestep_bounds(tp.timestep_bounds(1000, 0.02, 0.998))  # the suggested bound too


# ------------------------------------------------------------------------------------------------ saved LoRA scale
def test_fold_lora_scale_multiplies_only_the_up_weights():
    state = {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 2)}
    folded = tp.fold_lora_scale(state, rank=4, alpha=8)
    assert torch.equal(folded["a.lora_A.weight"], state["a.lora_A.weight"])
    assert torch.equal(folded["a.lora_B.weight"], 2 * state["a.lora_B.weight"])


def test_normalized_alignment_sets_the_ratio_on_a_v_models_output_too(lora_unet):
    """With D normalised to the personalization gradient, λ is the ratio of the two pushes on the model's own output
    for a v-prediction model as for an ε-model: the 1/ᾱ_t1 balance is what makes this hold at every t1."""
    latents, noise, cond, cond_clean, uncond = _inputs()
    t1, t2 = torch.tensor([30, 950]), torch.tensor([600, 300])
    rms = lambda x: x.pow(2).flatten(1).mean(1).sqrt()  # noqa: E731
    for prediction_type in ("epsilon", "v_prediction"):
        captured = {}

        def hook(module, args, output):
            if output.sample.requires_grad and "out" not in captured:
                captured["out"] = output.sample

        handle = lora_unet.register_forward_hook(hook)
        try:
            config = tp.AlignmentConfig(normalization="personalization", weight=0.5)
            loss_pers, loss_align = tp.palp_losses(lora_unet, lora_unet, latents, noise, t1, t2, noise, cond,
                                                   cond_clean, uncond, _process(prediction_type), config)  # fmt: skip
        finally:
            handle.remove()
        (g_pers,) = torch.autograd.grad(loss_pers, captured["out"], retain_graph=True)
        (g_align,) = torch.autograd.grad(config.weight * loss_align, captured["out"])
        torch.testing.assert_close(rms(g_align) / rms(g_pers), torch.full((2,), 0.5), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------------ rectified flow
def _flow_scheduler(shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def _flow_process(weighting_scheme="logit_normal", shift=3.0):
    return tp.RectifiedFlowProcess.from_scheduler(_flow_scheduler(shift), weighting_scheme=weighting_scheme)


def test_rectified_flow_noising_x0_and_epsilon_round_trip():
    """x_t = (1 - σ)x0 + σε as diffusers' scheduler noises; from the true velocity v = ε - x0 the process gives back
    ε and x0; from any v̂, x̂0 = x_t - σv̂ and ε̂ = x_t + (1 - σ)v̂ belong to each other."""
    scheduler, process = _flow_scheduler(), _flow_process()
    assert torch.equal(process.sigmas.flip(0), scheduler.sigmas)  # the training table, in ascending order
    g = torch.Generator().manual_seed(0)
    x0, eps, v_hat = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = scheduler.timesteps[[990, 500, 5]]  # σ small, middle, close to 1
    sigma = (t / 1000).view(-1, 1, 1, 1)
    x_t = process.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, t, eps))
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
    v = eps - x0
    torch.testing.assert_close(process.target(x0, eps, t), v)
    torch.testing.assert_close(process.epsilon(v, x_t, t), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(process.original_sample(v, x_t, t), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(process.predicted_original_sample(x_t, eps, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(process.original_sample(v_hat, x_t, t), x_t - sigma * v_hat)
    torch.testing.assert_close(process.epsilon(v_hat, x_t, t), x_t + (1 - sigma) * v_hat)
    eps_hat = process.epsilon(v_hat, x_t, t)
    torch.testing.assert_close(
        process.predicted_original_sample(x_t, eps_hat, t), process.original_sample(v_hat, x_t, t), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(process.noise_variance(t), (t / 1000) ** 2)
    torch.testing.assert_close(process.x0_epsilon_gain(t), (t / 1000) / (1 - t / 1000))


def test_rectified_flow_timesteps_follow_the_sd3_density():
    """On the full table the draw is diffusers' SD3 DreamBooth-LoRA draw for the same generator; narrower bounds keep
    it inside them; the step's generator alone decides it; shift moves the density towards noise."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler, process = _flow_scheduler(), _flow_process()
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    t = process.sample_timesteps(4096, (0, 999), g(0))
    assert t.shape == (4096,) and t.dtype == torch.float32
    u = compute_density_for_timestep_sampling("logit_normal", 4096, logit_mean=0.0, logit_std=1.0, generator=g(0))
    torch.testing.assert_close(t, scheduler.timesteps[(u * 1000).long()], atol=0, rtol=0)
    assert torch.equal(t, process.sample_timesteps(4096, (0, 999), g(0)))
    assert not torch.equal(t, process.sample_timesteps(4096, (0, 999), g(1)))
    inside = process.sample_timesteps(4096, (20, 980), g(0))
    assert inside.min() >= process.sigmas[20] * 1000 and inside.max() <= process.sigmas[980] * 1000
    assert inside.min() < process.sigmas[60] * 1000 and inside.max() > process.sigmas[940] * 1000
    # logit-normal: logit(σ) ~ N(0, 1) without shift (median σ = 0.5); shift 3 moves the median to 3·0.5/(1 + 2·0.5).
    plain = _flow_process(shift=1.0).sample_timesteps(4096, (0, 999), g(2)) / 1000
    assert abs(plain.median() - 0.5) < 0.03 and abs(torch.logit(plain).std() - 1.0) < 0.05
    assert abs((process.sample_timesteps(4096, (0, 999), g(2)) / 1000).median() - 0.75) < 0.03
    # In a step: t2 is drawn independently from the same density, or equals t1 with --alignment_timestep same.
    noise, t1, t2, noise2 = tp.sample_step_noise((2, 4, 8, 8), process, (20, 980), tp.AlignmentConfig(), g(3))
    assert noise2 is noise and not torch.equal(t1, t2) and t1.dtype == torch.float32
    same = tp.sample_step_noise((2, 4, 8, 8), process, (20, 980), tp.AlignmentConfig(timestep="same"), g(3))
    assert torch.equal(same[1], t1) and torch.equal(same[2], t1)


def test_rectified_flow_refuses_sigma_one():
    process = _flow_process()
    assert process.sigmas[999] == 1 and process.sigmas[998] < 1
    with pytest.raises(tp.UserInputError, match="--timestep_max_ratio 0.998 or lower"):
        process.check_timestep_bounds(tp.timestep_bounds(1000, 0.02, 1.0))
    process.check_timestep_bounds(tp.timestep_bounds(1000, 0.02, 0.98))  # the default is fine


@pytest.mark.parametrize("weighting_scheme", ["logit_normal", "sigma_sqrt"])
def test_rectified_flow_balance_restores_the_epsilon_ratio_of_the_two_gradients(weighting_scheme):
    """Per element, (∂L_align/∂v̂) / (∂L_pers/∂v̂) of a velocity model equals the ε-model's ratio for the same ε̂, at
    every σ1, with the flow-matching loss and its weighting as diffusers' SD3 script computes them."""
    g = torch.Generator().manual_seed(1)
    x0, eps, eps_hat, direction = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(4))
    flow, ddpm = _flow_process(weighting_scheme), _process()
    t = torch.tensor([0.05, 0.5, 0.95]) * 1000
    sigma = (t / 1000).view(-1, 1, 1, 1)
    x_t = flow.add_noise(x0, eps, t)
    v_hat = ((eps_hat - x_t) / (1 - sigma)).requires_grad_(True)  # the velocity that gives the same ε̂
    (d_pers,) = torch.autograd.grad(flow.personalization_loss(v_hat, x0, eps, t), v_hat)
    align = tp.palp_alignment_loss(flow.epsilon(v_hat, x_t, t), direction, flow, t, torch.ones(3), True)
    (d_align,) = torch.autograd.grad(align, v_hat)
    eps_out = eps_hat.clone().requires_grad_(True)
    t_ddpm = torch.tensor([50, 500, 950])
    (e_pers,) = torch.autograd.grad(ddpm.personalization_loss(eps_out, x0, eps, t_ddpm), eps_out)
    (e_align,) = torch.autograd.grad(
        tp.palp_alignment_loss(eps_out, direction, ddpm, t_ddpm, torch.ones(3), True), eps_out
    )
    torch.testing.assert_close(d_align / d_pers, e_align / e_pers, atol=1e-3, rtol=1e-3)


def _flow_reference_losses(unet, inputs, config, weighting_scheme):
    """The PALP terms for a velocity model written out from the flow formulas alone: x_t = (1 - σ)x0 + σε, the SD3
    flow-matching loss ω(σ)‖v̂ - (ε - x0)‖², x̂0 = x_t - σv̂, CFG on velocities, D = (1 - σ2)(v^α_pre - v^β_per) in ε
    units, w = σ2² for 'one_minus_alpha_bar', and the coefficient c = ω(σ1)/(1 - σ1)² · ((1 - σ1)/σ1 with the
    rescale). Returns L_pers, the DDS loss through x̂0 whose gradient is w·c·D·∂x̂0/∂θ, and the value of the surrogate
    -mean(w·c·σ1/(1 - σ1)·D·ε̂) with ε̂ = x_t + (1 - σ1)v̂."""
    latents, noise, noise2, cond, cond_clean, uncond, t1, t2 = inputs
    s1, s2 = (t1 / 1000).view(-1, 1, 1, 1), (t2 / 1000).view(-1, 1, 1, 1)
    omega = s1**-2 if weighting_scheme == "sigma_sqrt" else torch.ones_like(s1)
    x_t1 = (1 - s1) * latents + s1 * noise
    v_hat = unet(x_t1, t1, encoder_hidden_states=cond).sample
    loss_pers = (omega * (v_hat - (noise - latents)) ** 2).mean()
    x0_hat = x_t1 - s1 * v_hat
    eps_hat = x_t1 + (1 - s1) * v_hat
    with torch.no_grad():
        x_t2 = (1 - s2) * x0_hat + s2 * noise2

        def velocity(c, lora):
            if not lora:
                unet.disable_adapters()
            try:
                return unet(x_t2, t2, encoder_hidden_states=c.expand(2, -1, -1)).sample
            finally:
                unet.enable_adapters()

        def guided(c, scale, lora):
            return velocity(uncond, lora) + scale * (velocity(c, lora) - velocity(uncond, lora))

        v_pre = guided(cond_clean, config.guidance_scale_pretrained, False)
        if config.mode == "dds":
            direction = (1 - s2) * (v_pre - guided(cond, config.guidance_scale_personalized, True))
        else:  # sds: the pre-trained ε^α against the added noise
            direction = x_t2 + (1 - s2) * v_pre - noise2
        if config.normalization == "personalization":
            rms = lambda x: x.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)  # noqa: E731
            direction = direction * rms(2 * (eps_hat - noise)) / rms(direction)
    w = s2**2 if config.weighting == "one_minus_alpha_bar" else torch.ones_like(s2)
    c = omega / (1 - s1) ** 2 * ((1 - s1) / s1 if config.rescale else 1)
    dds = (w * c * direction * x0_hat).sum() / latents[0].numel() / latents.shape[0]
    surrogate = -(w * c * s1 / (1 - s1) * direction * eps_hat).flatten(1).mean(1).mean()
    return loss_pers, dds, surrogate.detach()


FLOW_LOSS_CASES = {
    "defaults": (dict(), "logit_normal"),
    "no rescale": (dict(rescale=False), "logit_normal"),
    "fresh noise, sigma² weighting": (dict(noise="fresh", weighting="one_minus_alpha_bar"), "logit_normal"),
    "timestep same": (dict(timestep="same", rescale=False), "logit_normal"),
    "lambda 0.5, beta 1": (dict(weight=0.5, guidance_scale_personalized=1.0, guidance_scale_pretrained=4.0), "mode"),
    "sds": (dict(mode="sds", noise="fresh"), "logit_normal"),
    "normalized D": (dict(normalization="personalization"), "logit_normal"),
    "sigma_sqrt loss weighting": (dict(), "sigma_sqrt"),
    "sigma_sqrt, no rescale": (dict(rescale=False), "sigma_sqrt"),
}


@pytest.mark.parametrize("case", list(FLOW_LOSS_CASES), ids=list(FLOW_LOSS_CASES))
def test_palp_losses_with_rectified_flow_match_an_independent_reference(lora_unet, case):
    """palp_losses on a velocity model (the tiny UNet standing in for it): L_pers, L_align's value and the gradient
    of L_pers + λ·L_align on the LoRA and on y_P, against the flow formulas with autograd through x̂0."""
    options, weighting_scheme = FLOW_LOSS_CASES[case]
    config = tp.AlignmentConfig(**options)
    process = _flow_process(weighting_scheme)
    latents, noise, cond, cond_clean, uncond = _inputs(seed=6)
    cond = cond.requires_grad_(True)
    t1 = torch.tensor([0.3, 0.85]) * 1000
    t2 = t1.clone() if config.timestep == "same" else torch.tensor([0.7, 0.25]) * 1000
    noise2 = noise if config.noise == "same" else torch.randn(noise.shape, generator=torch.Generator().manual_seed(9))
    params = _lora_params(lora_unet) + [cond]

    losses = tp.palp_losses(
        lora_unet, lora_unet, latents, noise, t1, t2, noise2, cond, cond_clean, uncond, process, config
    )
    inputs = (latents, noise, noise2, cond, cond_clean, uncond, t1, t2)
    reference = _flow_reference_losses(lora_unet, inputs, config, weighting_scheme)
    _assert_losses_match_reference(losses, reference, params, config.weight)
