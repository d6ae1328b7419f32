"""The alignment mechanisms aimed at the part of D that erodes the subject's identity: DDS from the class phrase, the
class-cancelling D, the identity-bearing teacher (and its inverted token), the projection off the identity direction
and D kept off the subject's region, where the alignment gradient lands, and the calibrated normalisation."""

import re

import pytest
import torch
from safetensors.torch import load_file
from test_palp_math import _inputs, _lora_params, _process, lora_unet  # noqa: F401  (lora_unet is a fixture)

import train_palp as tp
import train_palp_multi_subject as tpm
from conftest import reset_accelerate_state
from test_train_palp import TOKEN, train


def test_class_phrase_prompt_replaces_each_token_by_its_class():
    assert tp.class_phrase_prompt("a photo of <t>", ["<t>"], ["cat"]) == "a photo of a cat"
    assert tp.class_phrase_prompt("a photo of the <t>", ["<t>"], ["owl"]) == "a photo of the owl"
    assert tp.class_phrase_prompt("<a> beside <b>", ["<a>", "<b>"], ["cat", "apple"]) == "a cat beside an apple"
    assert tp.class_phrase_prompt("no token here", ["<t>"], ["cat"]) == "no token here"


def test_class_delta_is_the_difference_of_two_guided_predictions_and_does_not_see_the_unconditional():
    g = torch.Generator().manual_seed(0)
    eps_clean, eps_class, eps_u1, eps_u2 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(4))
    d = tp.class_delta_direction(eps_clean, eps_class, 15.0)
    for eps_uncond in (eps_u1, eps_u2):
        guided = lambda cond: tp.classifier_free_guidance(eps_uncond, cond, 15.0)  # noqa: E731
        torch.testing.assert_close(d, guided(eps_clean) - guided(eps_class), atol=1e-4, rtol=1e-5)
    assert torch.equal(tp.class_delta_direction(eps_clean, eps_clean, 15.0), torch.zeros_like(eps_clean))


def _step(unet, latents, noise, cond, t1, t2):
    """x_t1, ε̂ (with gradient) and the re-noised x̂_t2 of PALP's step, computed here step by step."""
    process = _process()
    x_t1 = process.add_noise(latents, noise, t1)
    eps_hat = unet(x_t1, t1, encoder_hidden_states=cond).sample
    with torch.no_grad():
        x_t2 = process.add_noise(process.predicted_original_sample(x_t1, eps_hat, t1), noise, t2)
    return eps_hat, x_t2


def _losses(unet, config, latents, noise, cond, cond_clean, uncond, t1, t2, **extra):
    return tp.palp_losses(unet, unet, latents, noise, t1, t2, noise, cond, cond_clean, uncond, _process(), config,
                          **extra)


def _class_phrase_loss(unet, mode, seed, t1, t2):
    """L_align of a mode that reads ỹ_P, on the math tests' inputs; the inputs too (y_P's with gradient)."""
    latents, noise, cond, cond_clean, uncond = _inputs(seed=seed)
    cond_class = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(seed + 7))
    cond = cond.requires_grad_(True)
    config = tp.AlignmentConfig(mode=mode)
    _, loss_align = _losses(unet, config, latents, noise, cond, cond_clean, uncond, t1, t2, cond_class=cond_class)
    return loss_align, (latents, noise, cond, cond_clean, uncond, cond_class)


def test_class_delta_loss_matches_a_direct_computation_and_reaches_the_token(lora_unet):  # noqa: F811
    t1, t2 = torch.tensor([100, 900]), torch.tensor([600, 300])
    loss_align, (latents, noise, cond, cond_clean, uncond, cond_class) = _class_phrase_loss(
        lora_unet, "class_delta", 2, t1, t2
    )

    eps_hat, x_t2 = _step(lora_unet, latents, noise, cond.detach(), t1, t2)
    with torch.no_grad(), tp.lora_disabled(lora_unet):
        eps_clean = lora_unet(x_t2, t2, encoder_hidden_states=cond_clean.expand(2, -1, -1)).sample
        eps_class = lora_unet(x_t2, t2, encoder_hidden_states=cond_class).sample
    d = 15.0 * (eps_clean - eps_class)
    expected = -(d * eps_hat.detach()).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss_align.detach(), expected, atol=1e-5, rtol=1e-4)
    # Not the DDS loss of the same inputs, and its gradient reaches the token's conditioning.
    _, dds = _losses(lora_unet, tp.AlignmentConfig(), latents, noise, cond, cond_clean, uncond, t1, t2)
    assert not torch.allclose(loss_align.detach(), dds.detach())
    (grad,) = torch.autograd.grad(loss_align, cond)
    assert grad.abs().sum() > 0


def test_class_source_is_dds_with_the_class_phrase_for_the_personalized_prediction(lora_unet):  # noqa: F811
    """D = ε^α_pre(y_c) - ε^β_per(ỹ_P): PALP's D plus β·(ε_per(y_P) - ε_per(ỹ_P)), computed here step by step."""
    t1, t2 = torch.tensor([150, 850]), torch.tensor([650, 250])
    loss_align, (latents, noise, cond, cond_clean, uncond, cond_class) = _class_phrase_loss(
        lora_unet, "class_source", 4, t1, t2
    )
    config = tp.AlignmentConfig(mode="class_source")

    eps_hat, x_t2 = _step(lora_unet, latents, noise, cond.detach(), t1, t2)
    with torch.no_grad():
        eps = lambda c: lora_unet(x_t2, t2, encoder_hidden_states=c).sample  # noqa: E731
        eps_personal, eps_class, eps_uncond_per = eps(cond.detach()), eps(cond_class), eps(uncond.expand(2, -1, -1))
        with tp.lora_disabled(lora_unet):
            g_pre = tp.classifier_free_guidance(eps(uncond.expand(2, -1, -1)), eps(cond_clean.expand(2, -1, -1)), 15.0)
    d = g_pre - tp.classifier_free_guidance(eps_uncond_per, eps_class, 7.5)
    loss = lambda direction: -(direction * eps_hat.detach()).flatten(1).mean(1).mean()  # noqa: E731
    torch.testing.assert_close(loss_align.detach(), loss(d), atol=1e-5, rtol=1e-4)
    # PALP's D differs from it by exactly -β·u, u the personalized model's identity direction at x̂_t2.
    _, dds = _losses(lora_unet, tp.AlignmentConfig(), latents, noise, cond, cond_clean, uncond, t1, t2)
    torch.testing.assert_close(dds.detach(), loss(d - 7.5 * (eps_personal - eps_class)), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(loss_align.detach(), dds.detach())
    # Given ỹ_P = y_P it is DDS; its gradient reaches the token's conditioning through ε̂.
    _, same = _losses(lora_unet, config, latents, noise, cond, cond_clean, uncond, t1, t2, cond_class=cond.detach())
    assert torch.equal(same, dds)
    (grad,) = torch.autograd.grad(loss_align, cond)
    assert grad.abs().sum() > 0


def test_teacher_inversion_adds_the_frozen_models_loss_which_reaches_only_the_token(lora_unet):  # noqa: F811
    """L_pers gains textual inversion's loss on the pre-trained model (LoRA off): its value is that model's loss at
    the same x_t1 and ε, its gradient reaches y_P's conditioning and no LoRA weight, and the LoRA stays trainable."""
    latents, noise, cond, cond_clean, uncond = _inputs(seed=5)
    cond = cond.requires_grad_(True)
    t1, t2 = torch.tensor([300, 700]), torch.tensor([500, 200])
    teacher = tp.AlignmentConfig(mode="teacher")
    inverted = tp.AlignmentConfig(mode="teacher", teacher_inversion=True)
    plain, _ = _losses(lora_unet, teacher, latents, noise, cond, cond_clean, uncond, t1, t2, cond_teacher=cond_clean)
    both, _ = _losses(lora_unet, inverted, latents, noise, cond, cond_clean, uncond, t1, t2, cond_teacher=cond_clean)
    process = _process()
    with torch.no_grad(), tp.lora_disabled(lora_unet):
        x_t1 = process.add_noise(latents, noise, t1)
        frozen = lora_unet(x_t1, t1, encoder_hidden_states=cond.detach()).sample
    torch.testing.assert_close((both - plain).detach(), (frozen - noise).pow(2).mean(), atol=1e-6, rtol=1e-5)
    lora = _lora_params(lora_unet)
    extra = torch.autograd.grad(both - plain, [cond, *lora], allow_unused=True, retain_graph=True)
    assert extra[0].abs().sum() > 0
    assert all(g is None or torch.count_nonzero(g) == 0 for g in extra[1:])
    assert lora and all(p.requires_grad for p in lora)
    (lora_grad,) = torch.autograd.grad(both, lora[:1])
    assert lora_grad.abs().sum() > 0


def test_teacher_given_the_clean_prompt_is_dds_and_otherwise_differs(lora_unet):  # noqa: F811
    latents, noise, cond, cond_clean, uncond = _inputs(seed=3)
    t1, t2 = torch.tensor([200, 700]), torch.tensor([500, 400])
    _, dds = _losses(lora_unet, tp.AlignmentConfig(), latents, noise, cond, cond_clean, uncond, t1, t2)
    teacher = tp.AlignmentConfig(mode="teacher")
    _, same = _losses(lora_unet, teacher, latents, noise, cond, cond_clean, uncond, t1, t2, cond_teacher=cond_clean)
    assert torch.equal(same, dds)
    _, other = _losses(lora_unet, teacher, latents, noise, cond, cond_clean, uncond, t1, t2, cond_teacher=cond[:1])
    assert not torch.allclose(other, dds)


def test_projection_off_an_axis():
    g = torch.Generator().manual_seed(0)
    axis = torch.randn(3, 4, 2, 2, generator=g)
    direction = torch.randn(3, 4, 2, 2, generator=g)
    out = tp.project_off_direction(direction, axis)
    overlap = (out * axis).flatten(1).sum(1)
    torch.testing.assert_close(overlap, torch.zeros(3), atol=1e-5, rtol=0)
    # Only the axis component went: direction - out is parallel to the axis.
    removed = (direction - out).flatten(1)
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(removed, axis.flatten(1)).abs(), torch.ones(3))
    axis[1] = 0  # a zero axis (the token changes nothing yet) keeps D, finite
    out = tp.project_off_direction(direction, axis)
    assert torch.equal(out[1], direction[1]) and torch.isfinite(out).all()


def test_identity_projected_loss_matches_a_direct_computation(lora_unet):  # noqa: F811
    latents, noise, cond, cond_clean, uncond = _inputs(seed=4)
    cond_class = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(11))
    t1, t2 = torch.tensor([300, 800]), torch.tensor([250, 650])
    config = tp.AlignmentConfig(projection="identity")
    _, loss_align = _losses(lora_unet, config, latents, noise, cond, cond_clean, uncond, t1, t2, cond_class=cond_class)

    process = _process()
    eps_hat, x_t2 = _step(lora_unet, latents, noise, cond, t1, t2)
    with torch.no_grad():
        with tp.lora_disabled(lora_unet):
            g_pre = tp.guided_epsilon(lora_unet, x_t2, t2, cond_clean.expand(2, -1, -1), uncond, 15.0, process)
        g_per = tp.guided_epsilon(lora_unet, x_t2, t2, cond, uncond, 7.5, process)
        u = (lora_unet(x_t2, t2, encoder_hidden_states=cond).sample
             - lora_unet(x_t2, t2, encoder_hidden_states=cond_class).sample)
        d = g_pre - g_per
        coefficient = (d * u).flatten(1).sum(1) / u.pow(2).flatten(1).sum(1)
        assert (coefficient.abs() > 1e-3).all()  # the projection has something to remove here
        d = d - coefficient.view(-1, 1, 1, 1) * u
        expected = -(d * eps_hat).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss_align.detach(), expected, atol=1e-5, rtol=1e-4)


def test_identity_region_weight_fades_where_the_token_changes_the_prediction():
    axis = torch.zeros(2, 4, 2, 3)
    axis[0, :, 0, 0] = 2.0  # the subject's position: RMS over channels 2
    axis[0, :2, 1, 2] = 1.0  # half the channels at another: RMS √0.5
    weight = tp.identity_region_weight(axis)
    assert weight.shape == (2, 1, 2, 3)
    expected = torch.ones(2, 3)
    expected[0, 0], expected[1, 2] = 0.0, 1 - 0.5**0.5 / 2
    torch.testing.assert_close(weight[0, 0], expected)
    # A zero axis (the token changes nothing yet) keeps D everywhere; the weight is per sample, not per batch.
    assert torch.equal(weight[1], torch.ones(1, 2, 3))
    torch.testing.assert_close(tp.identity_region_weight(10 * axis), weight)


def test_identity_region_loss_matches_a_direct_computation(lora_unet):  # noqa: F811
    latents, noise, cond, cond_clean, uncond = _inputs(seed=5)
    cond_class = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(12))
    t1, t2 = torch.tensor([400, 700]), torch.tensor([350, 600])
    config = tp.AlignmentConfig(projection="identity_region")
    _, loss_align = _losses(lora_unet, config, latents, noise, cond, cond_clean, uncond, t1, t2, cond_class=cond_class)

    process = _process()
    eps_hat, x_t2 = _step(lora_unet, latents, noise, cond, t1, t2)
    with torch.no_grad():
        with tp.lora_disabled(lora_unet):
            g_pre = tp.guided_epsilon(lora_unet, x_t2, t2, cond_clean.expand(2, -1, -1), uncond, 15.0, process)
        g_per = tp.guided_epsilon(lora_unet, x_t2, t2, cond, uncond, 7.5, process)
        u = (lora_unet(x_t2, t2, encoder_hidden_states=cond).sample
             - lora_unet(x_t2, t2, encoder_hidden_states=cond_class).sample)
        size = u.pow(2).mean(1, keepdim=True).sqrt()
        weight = 1 - size / size.amax(dim=(1, 2, 3), keepdim=True)
        assert weight.min() == 0 and weight.mean() < 0.9  # the weight has something to keep D off here
        expected = -((g_pre - g_per) * weight * eps_hat).flatten(1).mean(1).mean()
        _, dds = _losses(lora_unet, tp.AlignmentConfig(), latents, noise, cond, cond_clean, uncond, t1, t2)
    torch.testing.assert_close(loss_align.detach(), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(loss_align.detach(), dds.detach())


def _trained(tiny_sd_path, instance_dir, out, *extra):
    reset_accelerate_state()
    # No clipping: a clipped step would couple the token's update to the LoRA's gradient norm.
    train(tiny_sd_path, instance_dir, out, "--max_train_steps", "1", "--num_validation_images", "0",
          "--max_grad_norm", "1e9", *extra)
    return load_file(str(out / "pytorch_lora_weights.safetensors")), load_file(str(out / "learned_embeds.safetensors"))


def test_alignment_gradient_lands_where_asked(tiny_sd_path, instance_dir, tmp_path):
    """One step: with the alignment gradient on the LoRA only, the token moves exactly as TI+DB's does and the LoRA
    does not; on the token only, the converse; by default both differ from TI+DB."""
    lora_ti, token_ti = _trained(tiny_sd_path, instance_dir, tmp_path / "ti", "--alignment_mode", "none")
    lora_l, token_l = _trained(tiny_sd_path, instance_dir, tmp_path / "l", "--alignment_gradient", "lora")
    lora_t, token_t = _trained(tiny_sd_path, instance_dir, tmp_path / "t", "--alignment_gradient", "token")
    lora_a, token_a = _trained(tiny_sd_path, instance_dir, tmp_path / "a")
    same = lambda x, y: all(torch.equal(x[k], y[k]) for k in x)  # noqa: E731
    assert same(token_l, token_ti) and not same(lora_l, lora_ti)
    assert same(lora_t, lora_ti) and not same(token_t, token_ti)
    assert not same(lora_a, lora_ti) and not same(token_a, token_ti)
    # Each half of the full step (up to the order of floating-point sums in the two backward passes).
    for full, half in ((lora_a, lora_l), (token_a, token_t)):
        for key in full:
            torch.testing.assert_close(full[key], half[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        ["--alignment_mode", "class_delta"],
        ["--alignment_mode", "class_source"],
        ["--alignment_mode", "teacher"],
        ["--alignment_mode", "teacher", "--teacher_inversion"],
        ["--alignment_projection", "identity", "--alignment_normalization", "none"],
        ["--alignment_projection", "identity_region", "--alignment_normalization", "none"],
    ],
)
def test_mechanisms_train_and_save(tiny_sd_path, instance_dir, tmp_path, extra):
    import json

    reset_accelerate_state()
    out = tmp_path / "out"
    run = train(tiny_sd_path, instance_dir, out, "--max_train_steps", "2", "--num_validation_images", "0", *extra)
    assert run.global_step == 2
    config = json.loads((out / "training_config.json").read_text())
    assert config["alignment_mode"] == (extra[1] if extra[0] == "--alignment_mode" else "dds")
    assert load_file(str(out / "learned_embeds.safetensors"))[TOKEN].isfinite().all()


@pytest.mark.parametrize("extra", [["--alignment_mode", "class_delta"], ["--alignment_projection", "identity_region"]])
def test_class_phrase_table_gives_each_image_its_own_subjects_class_prompt(tiny_sd_path, tmp_path, extra):
    """Multi-subject: ỹ_P of each image of a batch is its own subject's personalization prompt with the class (the
    class-cancelling D and the identity region both read it)."""
    from test_multi_subject import ART, CAT, common_flags, subject_flags

    from conftest import write_instance_images

    tmp_path = tmp_path / extra[-1]  # one folder per parametrization, whoever calls the test
    cat = write_instance_images(tmp_path / "cat", n=2, seed=0)
    art = write_instance_images(tmp_path / "art", n=1, seed=7)
    reset_accelerate_state()
    argv = subject_flags(str(cat), str(art)) + common_flags(tiny_sd_path, tmp_path / "out")
    run = tpm.main(tpm.parse_args([*argv, *extra, "--max_train_steps", "1", "--num_validation_images", "0"]))
    assert run.global_step == 1
    conditioner = run.conditioner
    prompts = [f"A photo of {CAT}", f"An oil painting of {ART}", f"A photo of {CAT}"]
    cond = run.class_conditioning(conditioner.tokenize(prompts))
    expected = [conditioner.encode_fixed(p, run.accelerator.device, run.weight_dtype)[0].hidden
                for p in ("A photo of a cat", "An oil painting of a painting", "A photo of a cat")]
    torch.testing.assert_close(cond.hidden, torch.cat(expected))


def test_calibration_averages_the_first_calls_then_holds_the_factor():
    g = torch.Generator().manual_seed(0)
    calibration = tp.DirectionCalibration(calls=2)
    r1, d1 = torch.randn(3, 4, 2, 2, generator=g), 5 * torch.randn(3, 4, 2, 2, generator=g)
    r2, d2 = 0.5 * torch.randn(3, 4, 2, 2, generator=g), 2 * torch.randn(3, 4, 2, 2, generator=g)
    rms = lambda x: x.flatten(1).pow(2).mean(1).sqrt().mean().item()  # noqa: E731
    assert calibration.factor(d1, r1) == pytest.approx(rms(r1) / rms(d1), rel=1e-6)
    held = calibration.factor(d2, r2)
    assert held == pytest.approx((rms(r1) + rms(r2)) / (rms(d1) + rms(d2)), rel=1e-6)
    # Held from now on: a shrinking residual does not fade the push, a near-zero D is not blown up.
    assert calibration.factor(1e-9 * d2, 1e-3 * r2) == held and calibration.count == 2
    # A checkpoint's JSON brings back the same factor.
    import json

    restored = tp.DirectionCalibration(calls=2)
    restored.load_state_dict(json.loads(json.dumps(calibration.state_dict())))
    assert restored.factor(d1, r1) == held


def test_calibrated_loss_is_the_papers_times_the_calibrated_factor(lora_unet):  # noqa: F811
    latents, noise, cond, cond_clean, uncond = _inputs(seed=5)
    t1, t2 = torch.tensor([150, 850]), torch.tensor([450, 700])
    _, paper = _losses(lora_unet, tp.AlignmentConfig(), latents, noise, cond, cond_clean, uncond, t1, t2)
    calibration = tp.DirectionCalibration(calls=1)
    calibrated = tp.AlignmentConfig(normalization="calibrated")
    _, loss = _losses(lora_unet, calibrated, latents, noise, cond, cond_clean, uncond, t1, t2, calibration=calibration)
    factor = calibration.factor(torch.ones(1, 1), torch.ones(1, 1))  # held after one call
    torch.testing.assert_close(loss, factor * paper, rtol=1e-5, atol=1e-7)
    eps_hat, _ = _step(lora_unet, latents, noise, cond, t1, t2)
    reference = (2 * (eps_hat - noise)).flatten(1).pow(2).mean(1).sqrt().mean().item()
    assert calibration.reference_sum == pytest.approx(reference, rel=1e-5)
    assert factor != pytest.approx(1.0, abs=0.05)  # the factor does something here
    # Per-sample normalisation gives each sample the residual's size; the calibrated D keeps their ratio.
    _, per_sample = _losses(lora_unet, tp.AlignmentConfig(normalization="personalization"), latents, noise, cond,
                            cond_clean, uncond, t1, t2)
    assert not torch.allclose(per_sample, loss, rtol=1e-3)


def test_calibrated_run_checkpoints_its_factor_and_resumes_bit_exact(tiny_sd_path, instance_dir, tmp_path):
    """Checkpoint 2 falls inside the 3-step calibration: the resumed run carries on the same running means."""
    import json

    common = ("--checkpointing_steps", "2", "--num_validation_images", "0", "--alignment_normalization",
              "calibrated", "--alignment_calibration_steps", "3", "--gradient_accumulation_steps", "2")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    reset_accelerate_state()
    train(tiny_sd_path, instance_dir, full, *common)
    reset_accelerate_state()
    train(tiny_sd_path, instance_dir, resumed, *common, "--max_train_steps", "2")
    state = json.loads((resumed / "checkpoint-2" / tp.CHECKPOINT_STATE_NAME).read_text())
    assert state["alignment_calibration"]["count"] == 4  # 2 steps × 2 micro-batches
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    reset_accelerate_state()
    run = train(tiny_sd_path, instance_dir, resumed, *common, "--resume_from_checkpoint", "checkpoint-2")
    assert run.calibration.count == 6  # held after 3 steps
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Without its saved running means the resumed run would differ: the factor is part of the state.
    assert json.loads((full / "checkpoint-4" / tp.CHECKPOINT_STATE_NAME).read_text())["alignment_calibration"] == (
        run.calibration.state_dict()
    )


def _multi_argv(tiny_sd_path, instance_dir, tmp_path, *extra):
    from test_multi_subject import common_flags, subject_flags

    return [*subject_flags(str(instance_dir), str(instance_dir)), *common_flags(tiny_sd_path, tmp_path / "m"), *extra]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--alignment_calibration_steps", "0"], "--alignment_calibration_steps must be a positive integer"),
        (["--teacher_inversion"], "--teacher_inversion trains the token for the identity-bearing teacher: it needs "
                                  "--alignment_mode teacher, got 'dds'"),
    ],
    ids=["calibration steps", "teacher inversion without the teacher"],
)  # fmt: skip
def test_mechanism_flags_fail_early_with_one_clear_message(tiny_sd_path, instance_dir, tmp_path, extra, message):
    from test_train_palp import base_args

    argv = base_args(tiny_sd_path, instance_dir, tmp_path / "o", *extra)
    for script in (tp, tpm):
        with pytest.raises(script.UserInputError, match=re.escape(message)):
            script.parse_args(argv if script is tp else _multi_argv(tiny_sd_path, instance_dir, tmp_path, *extra))
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()
