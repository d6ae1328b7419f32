"""Mutation check: each targeted mistake in train_palp.py's PALP code must make the PALP math tests fail.

A mutant is a list of exact text replacements, each of which must match train_palp.py exactly once. The mutated
script is imported under a fresh module name, and every math test (each test function of ``MATH_TEST_MODULES``, all
its parametrizations, with the same fixtures; end-to-end tests, those that train on ``instance_dir``, are left out)
runs against it until one fails; a mutant that survives them all is a mistake the math tests would let through.
Tests named in ``first`` run first, which only saves time.

To add a mutant (a new alignment flag, a new branch), append a ``Mutant`` to ``MUTANTS``; if no math test catches
it, add the math test that would.
"""

import importlib.util
import inspect
import itertools
import sys
from dataclasses import dataclass

import pytest
import test_alignment_mechanisms
import test_alignment_options
import test_palp_math
import test_sd3_math
from test_palp_math import lora_unet  # noqa: F401  (the math tests' fixture, for the runs below)

from conftest import REPO_ROOT

MATH_TEST_MODULES = (test_palp_math, test_alignment_options, test_alignment_mechanisms, test_sd3_math)
END_TO_END_FIXTURES = {"instance_dir"}  # a test that trains a whole run is not a math test


@dataclass(frozen=True)
class Mutant:
    name: str
    edits: tuple  # ((old, new), ...): exact text of train_palp.py and its replacement
    first: tuple = ()  # names of math tests likely to catch it, run before the others


MUTANTS = [
    Mutant("alignment loss sign", (("    return -(scale * per_sample).mean()", "    return (scale * per_sample).mean()"),),
           ("test_descent_step_moves_x0_against_direction",)),
    Mutant("DDS direction sign", (("        return guided_pretrained - guided_personalized",
                                   "        return guided_personalized - guided_pretrained"),),
           ("test_dds_loss_matches_a_direct_computation",)),
    Mutant("SDS direction sign", (("        return guided_pretrained - noise", "        return noise - guided_pretrained"),),
           ("test_sds_uses_pretrained_minus_noise_and_skips_the_personalized_pass",)),
    Mutant("y_P instead of y_c for the pre-trained model",
           (("                    cond_pre.expand(batch),", "                    cond_personal.detach(),"),),
           ("test_dds_loss_matches_a_direct_computation",)),
    Mutant("fresh noise drawn for --alignment_noise same",
           (('    if config.noise == "same":\n        noise2 = noise',
             '    if config.noise == "same":\n        noise2 = torch.randn(latent_shape, generator=generator)'),),
           ("test_step_noise_options",)),
    Mutant("stop-gradient on D removed",
           (("(direction.detach().float() * eps_hat)", "(direction.float() * eps_hat)"),),
           ("test_direction_is_detached_inside_the_loss",)),
    Mutant("alignment branch built with gradient",
           (("    with torch.no_grad():\n        x0_hat = process.original_sample",
             "    with contextlib.nullcontext():\n        x0_hat = process.original_sample"),),
           ("test_dds_runs_one_gradient_pass_and_two_batched_gradient_free_passes",)),
    Mutant("re-noising with noise, ignoring noise2",
           (("x_t2 = process.add_noise(x0_hat, noise2.float(), t2)",
             "x_t2 = process.add_noise(x0_hat, noise.float(), t2)"),),
           ("test_palp_losses_gradient_matches_an_independent_reference",)),
    Mutant("rescale taken at t2 instead of t1",
           (("palp_alignment_loss(eps_hat, direction, process, t1, weight, config.rescale)",
             "palp_alignment_loss(eps_hat, direction, process, t2, weight, config.rescale)"),),
           ("test_palp_losses_gradient_matches_an_independent_reference",)),
    Mutant("from_args swaps the two guidance scales",
           (("guidance_scale_pretrained=args.guidance_scale_pretrained,",
             "guidance_scale_pretrained=args.guidance_scale_personalized,"),
            ("guidance_scale_personalized=args.guidance_scale_personalized,",
             "guidance_scale_personalized=args.guidance_scale_pretrained,")),
           ("test_alignment_config_from_args_round_trip",)),
    Mutant("v-prediction balance left out",
           (("            return 1.0 / alpha_bar\n", "            return torch.ones_like(alpha_bar)\n"),),
           ("test_v_prediction_balance_restores_the_epsilon_ratio_of_the_two_gradients",)),
    Mutant("v-prediction balance 1/√ᾱ instead of 1/ᾱ",
           (("            return 1.0 / alpha_bar\n", "            return 1.0 / alpha_bar.sqrt()\n"),),
           ("test_v_prediction_balance_restores_the_epsilon_ratio_of_the_two_gradients",)),
    Mutant("rescale factor inverted",
           (("((1 - alpha_bar) / alpha_bar).sqrt()", "(alpha_bar / (1 - alpha_bar)).sqrt()"),),
           ("test_rescale_changes_the_gradient_by_the_timestep_factor",)),
    Mutant("1 - ᾱ weighting as ᾱ", (("        return 1 - self.alphas_cumprod[t]", "        return self.alphas_cumprod[t]"),),
           ("test_alignment_weighting",)),
    Mutant("--alignment_timestep same ignored",
           (('    if config.timestep == "same":\n        t2 = t1', '    if config.timestep == "same":\n        t2 = t2'),),
           ("test_step_noise_options",)),
    Mutant("pre-trained pass with the LoRA on",
           (("    unet.disable_adapters()\n    try:\n        yield", "    try:\n        yield"),),
           ("test_pretrained_prediction_ignores_lora_weights",)),
    Mutant("classifier-free guidance from the conditional prediction",
           (("    return eps_uncond + scale * (eps_cond - eps_uncond)", "    return eps_cond + scale * (eps_cond - eps_uncond)"),),
           ("test_classifier_free_guidance_formula",)),
    Mutant("LoRA dropout left on in the personalized pass",
           (("                with lora_dropout_off(base_unet):\n                    g_per = guided_epsilon(",
             "                with contextlib.nullcontext():\n                    g_per = guided_epsilon("),),
           ("test_personalized_pass_runs_without_lora_dropout",)),
    # The options that balance the two terms (--alignment_normalization, --alignment_warmup_steps, the t2 range).
    Mutant("D normalisation skipped",
           (('        if config.normalization == "personalization":\n            direction = normalize_direction',
             '        if False:\n            direction = normalize_direction'),),
           ("test_normalized_alignment_loss_matches_a_direct_computation",)),
    Mutant("D normalised over the whole batch instead of per sample",
           (("    dims = tuple(range(1, direction.ndim))", "    dims = tuple(range(direction.ndim))"),),
           ("test_normalized_direction_takes_the_reference_rms_per_sample",)),
    Mutant("D normalised to ε̂ − ε2 instead of ε̂ − ε",
           (("normalize_direction(direction, 2 * (eps_hat - noise.float()))",
             "normalize_direction(direction, 2 * (eps_hat - noise2.float()))"),),
           ("test_palp_losses_gradient_matches_an_independent_reference",)),
    Mutant("calibrated factor measured on every step instead of held after its steps",
           (("        if self.count < self.calls:\n            sizes = torch.stack(",
             "        if True:\n            sizes = torch.stack("),),
           ("test_calibration_averages_the_first_calls_then_holds_the_factor",)),
    # The mechanisms aimed at the identity (--alignment_mode class_delta / teacher, --alignment_projection identity).
    Mutant("class_source given y_P instead of ỹ_P",
           (('source = cond_class if config.mode == "class_source" else cond_personal',
             'source = cond_personal if config.mode == "class_source" else cond_personal'),),
           ("test_class_source_is_dds_with_the_class_phrase_for_the_personalized_prediction",)),
    Mutant("teacher inversion's loss taken with the LoRA on",
           (("        with lora_disabled(base_unet):\n            base_output = cond_personal.denoise",
             "        with contextlib.nullcontext():\n            base_output = cond_personal.denoise"),),
           ("test_teacher_inversion_adds_the_frozen_models_loss_which_reaches_only_the_token",)),
    Mutant("class-cancelling D with its sign flipped",
           (("    return scale * (eps_clean - eps_class)", "    return scale * (eps_class - eps_clean)"),),
           ("test_class_delta_is_the_difference_of_two_guided_predictions_and_does_not_see_the_unconditional",)),
    Mutant("teacher given the clean prompt instead of the learned token",
           (('Conditioning.of(cond_teacher).detach() if config.mode == "teacher" else cond_clean',
             'cond_clean if config.mode == "teacher" else cond_clean'),),
           ("test_teacher_given_the_clean_prompt_is_dds_and_otherwise_differs",)),
    Mutant("identity projection keeps the component along the axis",
           (("    return direction - coefficient * axis", "    return direction + 0 * coefficient * axis"),),
           ("test_projection_off_an_axis",)),
    Mutant("identity region weight not inverted (D kept on the subject instead of off it)",
           (("    return torch.where(peak > 0, 1 - size / peak", "    return torch.where(peak > 0, 0 + size / peak"),),
           ("test_identity_region_weight_fades_where_the_token_changes_the_prediction",)),
    Mutant("identity region weight from one channel instead of all",
           (("    size = axis.float().pow(2).mean(dim=1, keepdim=True).sqrt()",
             "    size = axis.float()[:, :1].abs()"),),
           ("test_identity_region_weight_fades_where_the_token_changes_the_prediction",)),
    Mutant("identity region computed but not applied",
           (("                direction = direction * identity_region_weight(eps_personal - eps_class)",
             "                direction = direction * identity_region_weight(0 * eps_class)"),),
           ("test_identity_region_loss_matches_a_direct_computation",)),
    Mutant("warm-up ramp one step ahead",
           (("    return min(1.0, step / warmup_steps)", "    return min(1.0, (step + 1) / warmup_steps)"),),
           ("test_alignment_ramp",)),
    Mutant("t2 range of its own ignored",
           (("process.sample_timesteps(batch, t2_bounds or t_bounds, generator)",
             "process.sample_timesteps(batch, t_bounds, generator)"),),
           ("test_t2_range_of_its_own",)),
    Mutant("--alignment_timestep_max_ratio ignored",
           (("    high = args.timestep_max_ratio if args.alignment_timestep_max_ratio is None else "
             "args.alignment_timestep_max_ratio", "    high = args.timestep_max_ratio"),),
           ("test_t2_range_of_its_own",)),
    Mutant("D projection skipped",
           (('        if config.projection == "residual":\n            direction = project_off_residual',
             '        if False:\n            direction = project_off_residual'),),
           ("test_projected_alignment_never_pushes_against_the_personalization",)),
    Mutant("D projection two-sided (also removes the part that helps the personalization)",
           (("    return direction - overlap.clamp_min(0) / size * residual",
             "    return direction - overlap / size * residual"),),
           ("test_projection_removes_only_the_part_of_d_that_undoes_the_personalization",)),
    Mutant("D projected after the normalisation",
           (('        if config.projection == "residual":\n            direction = project_off_residual(direction, '
             'eps_hat - noise.float())\n        if config.normalization == "personalization":\n            direction = '
             'normalize_direction(direction, 2 * (eps_hat - noise.float()))',
             '        if config.normalization == "personalization":\n            direction = normalize_direction('
             'direction, 2 * (eps_hat - noise.float()))\n        if config.projection == "residual":\n            '
             'direction = project_off_residual(direction, eps_hat - noise.float())'),),
           ("test_projected_alignment_never_pushes_against_the_personalization",)),
    Mutant("from_args drops --alignment_projection",
           (("projection=args.alignment_projection,", 'projection="none",'),),
           ("test_alignment_config_from_args_round_trip",)),
    Mutant("from_args drops --alignment_normalization",
           (("normalization=args.alignment_normalization,", 'normalization="none",'),),
           ("test_alignment_config_from_args_round_trip",)),
    # The rectified-flow process (velocity model): its conversions, loss, balance and timestep draw.
    Mutant("flow ε̂ with v̂ subtracted", (("        return x_t + a * model_output", "        return x_t - a * model_output"),),
           ("test_rectified_flow_noising_x0_and_epsilon_round_trip",)),
    Mutant("flow x̂0 scaled by 1 - σ instead of σ",
           (("        _, b = self.coefficients(t, x_t)\n        return x_t - b * model_output",
             "        b, _ = self.coefficients(t, x_t)\n        return x_t - b * model_output"),),
           ("test_rectified_flow_noising_x0_and_epsilon_round_trip",)),
    Mutant("flow target x0 - ε", (("        return noise - x0", "        return x0 - noise"),),
           ("test_palp_losses_with_rectified_flow_match_an_independent_reference",)),
    Mutant("flow balance 1/(1 - σ) instead of 1/(1 - σ)²",
           (("/ (1 - self.sigma(t1).float()) ** 2", "/ (1 - self.sigma(t1).float())"),),
           ("test_rectified_flow_balance_restores_the_epsilon_ratio_of_the_two_gradients",)),
    Mutant("flow balance without the loss weighting",
           (("        return self.output_weighting(t1) / (1 - self.sigma(t1).float()) ** 2",
             "        return 1 / (1 - self.sigma(t1).float()) ** 2"),),
           ("test_rectified_flow_balance_restores_the_epsilon_ratio_of_the_two_gradients",)),
    Mutant("flow w(t2) σ instead of σ²", (("        return self.sigma(t) ** 2", "        return self.sigma(t)"),),
           ("test_palp_losses_with_rectified_flow_match_an_independent_reference",)),
    Mutant("flow --no-rescale factor inverted",
           (("        return sigma / (1 - sigma)", "        return (1 - sigma) / sigma"),),
           ("test_palp_losses_with_rectified_flow_match_an_independent_reference",)),
    Mutant("flow timesteps read from the wrong end of the table",
           (("        index = t_max - (u * count).long().clamp(0, count - 1)",
             "        index = t_min + (u * count).long().clamp(0, count - 1)"),),
           ("test_rectified_flow_timesteps_follow_the_sd3_density",)),
    Mutant("flow timesteps not from the step's generator",
           (("            generator=generator,\n        )\n        count", "            generator=None,\n        )\n        count"),),
           ("test_rectified_flow_timesteps_follow_the_sd3_density",)),
    Mutant("flow σ = 1 accepted", (("        if self.sigmas[t_max] < 1:", "        if True:"),),
           ("test_rectified_flow_refuses_sigma_one",)),
    # SD3: how the MMDiT is called and conditioned, its latents and its personalization loss.
    Mutant("SD3 timestep passed as σ instead of σ·1000",
           (("            timestep=t,\n            encoder_hidden_states=self.hidden,",
             "            timestep=t / 1000,\n            encoder_hidden_states=self.hidden,"),),
           ("test_sd3_denoise_calls_the_transformer_as_the_pipeline_does",)),
    Mutant("SD3 pooled projections dropped",
           (("pooled_projections=self.pooled,", "pooled_projections=torch.zeros_like(self.pooled),"),),
           ("test_sd3_denoise_calls_the_transformer_as_the_pipeline_does",)),
    Mutant("SD3 pooled embeddings concatenated CLIP-G first",
           (("torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))",
             "torch.cat([clip, t5], dim=-2), torch.cat(pooled[::-1], dim=-1))"),),
           ("test_sd3_conditioning_and_empty_prompt_are_the_pipelines",)),
    Mutant("SD3 CLIP last hidden state instead of the penultimate",
           (("            hidden.append(out.hidden_states[-2])\n            pooled.append(out.text_embeds)",
             "            hidden.append(out.hidden_states[-1])\n            pooled.append(out.text_embeds)"),),
           ("test_sd3_conditioning_and_empty_prompt_are_the_pipelines",)),
    Mutant("SD3 CLIP states zero-padded in front instead of behind",
           (("clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))",
             "clip = F.pad(clip, (t5.shape[-1] - clip.shape[-1], 0))"),),
           ("test_sd3_conditioning_and_empty_prompt_are_the_pipelines",)),
    Mutant("SD3 VAE shift_factor not subtracted from the latents",
           (('latents = (sample - (getattr(self.vae.config, "shift_factor", None) or 0.0)) * self.vae.config.scaling_factor',
             "latents = sample * self.vae.config.scaling_factor"),),
           ("test_sd3_latents_are_shifted_then_scaled_and_decoded_back",)),
    Mutant("SD3 VAE shift_factor not added back before decoding",
           (("return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]",
             "return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]"),),
           ("test_sd3_latents_are_shifted_then_scaled_and_decoded_back",)),
    Mutant("SD3 personalization loss not preconditioned",
           (("RectifiedFlowProcess.from_scheduler(noise_scheduler, precondition_outputs=True)",
             "RectifiedFlowProcess.from_scheduler(noise_scheduler, precondition_outputs=False)"),),
           ("test_palp_losses_on_a_tiny_sd3_transformer_match_an_independent_reference",)),
]  # fmt: skip


def mutated_module(mutant, index):
    """train_palp.py with the mutant's edits, imported as a module of its own (train_palp itself is untouched)."""
    source = (REPO_ROOT / "train_palp.py").read_text()
    for old, new in mutant.edits:
        assert source.count(old) == 1, f"{mutant.name}: {old!r} matches {source.count(old)} times, not once"
        source = source.replace(old, new)
    name = f"train_palp_mutant_{index}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(REPO_ROOT / "train_palp.py")
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        exec(compile(source, f"<{mutant.name}>", "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


def parametrizations(function):
    """Every keyword set pytest would call ``function`` with for its @pytest.mark.parametrize marks."""
    axes = []
    for mark in getattr(function, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = []
        for value in values:
            value = value.values if hasattr(value, "values") and not isinstance(value, dict) else value
            rows.append(dict(zip(names, value if len(names) > 1 else (value,))))
        axes.append(rows)
    for combination in itertools.product(*axes):
        yield {k: v for part in combination for k, v in part.items()}


def math_tests(first):
    tests = [
        f
        for module in MATH_TEST_MODULES
        for name, f in vars(module).items()
        if name.startswith("test_")
        and inspect.isfunction(f)
        and f.__module__ == module.__name__
        and not END_TO_END_FIXTURES & set(inspect.signature(f).parameters)
        and "tpm" not in f.__code__.co_names  # the multi-subject script is not the one mutated
    ]
    order = {module.__name__: index for index, module in enumerate(MATH_TEST_MODULES)}
    tests.sort(key=lambda f: (f.__name__ not in first, order[f.__module__], f.__code__.co_firstlineno))
    return tests


def first_failure(request, mutant):
    """The first math test (and its parameters) that fails on the mutant, or None when every one passes."""
    for test in math_tests(mutant.first):
        for params in parametrizations(test):
            fixtures = {
                name: request.getfixturevalue(name)
                for name in inspect.signature(test).parameters
                if name not in params
            }
            try:
                test(**params, **fixtures)
            # An assertion, pytest.raises that saw nothing raised, or the mutant breaking the call: caught either way.
            except (Exception, pytest.fail.Exception) as error:
                return f"{test.__name__}{params or ''}: {type(error).__name__}"
    return None


def test_mutants_are_distinct_and_each_edit_matches_once():
    names = [mutant.name for mutant in MUTANTS]
    assert len(set(names)) == len(names)
    source = (REPO_ROOT / "train_palp.py").read_text()
    for mutant in MUTANTS:
        for old, new in mutant.edits:
            assert source.count(old) == 1 and old != new, (mutant.name, old)
        assert all(any(name in vars(m) for m in MATH_TEST_MODULES) for name in mutant.first), mutant.name


@pytest.mark.parametrize("index", range(len(MUTANTS)), ids=[mutant.name for mutant in MUTANTS])
def test_the_math_tests_catch_the_mutant(request, monkeypatch, index):
    mutant = MUTANTS[index]
    mutated = mutated_module(mutant, index)
    for module in MATH_TEST_MODULES:
        monkeypatch.setattr(module, "tp", mutated)
    caught_by = first_failure(request, mutant)
    assert caught_by is not None, f"no math test fails when train_palp.py has: {mutant.name}"


def test_the_unmutated_script_passes_the_same_runner(request):
    """The runner itself is sound: on train_palp.py as it is, every math test passes through it (a runner that
    broke the calls would otherwise 'catch' every mutant)."""
    assert first_failure(request, Mutant("unmutated", ())) is None
