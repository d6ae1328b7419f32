"""The shapes world's flow-matching model (SD3 architecture): the shipped ``model_flow/`` folder, and the pieces of
``pretrain_flow.py`` that decide what it learns (σ sampling, the flow-matching pair, the prompt encoding)."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

WORLD_DIR = REPO_ROOT / "examples" / "shapes_world"
if str(WORLD_DIR) not in sys.path:
    sys.path.insert(0, str(WORLD_DIR))

import pretrain_flow  # noqa: E402
import probe as probe_lib  # noqa: E402

MODEL_FLOW = WORLD_DIR / "model_flow"


@pytest.fixture(scope="module")
def flow_pipe():
    from diffusers import StableDiffusion3Pipeline

    # Without T5 an SD3 folder is loaded the way diffusers documents for dropping T5: text_encoder_3=None.
    pipe = StableDiffusion3Pipeline.from_pretrained(str(MODEL_FLOW), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_flow_model_is_sd3_with_two_clip_encoders_of_different_widths_and_no_t5():
    index = json.loads((MODEL_FLOW / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        config = json.loads((MODEL_FLOW / name / "config.json").read_text())
        assert config["architectures"] == ["CLIPTextModelWithProjection"]
        widths.append((config["hidden_size"], config["projection_dim"]))
    assert widths[0][0] != widths[1][0]
    transformer = json.loads((MODEL_FLOW / "transformer" / "config.json").read_text())
    # The pipeline concatenates both encoders' hidden states (and their projections) on the feature axis.
    assert transformer["joint_attention_dim"] == widths[0][0] + widths[1][0]
    assert transformer["pooled_projection_dim"] == widths[0][1] + widths[1][1]
    vae = json.loads((MODEL_FLOW / "vae" / "config.json").read_text())
    assert vae["shift_factor"] is not None and vae["scaling_factor"] > 0
    size = sum(f.stat().st_size for f in MODEL_FLOW.rglob("*") if f.is_file())
    assert size < 15e6


def test_shipped_flow_model_samples_a_non_constant_image(flow_pipe):
    assert flow_pipe.text_encoder_3 is None
    assert flow_pipe.transformer.dtype == torch.float32 and flow_pipe.text_encoder.dtype == torch.float32
    image = flow_pipe("a photo of a red star on a blue background", num_inference_steps=2, height=32, width=32,
                      guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0),
                      **probe_lib.sampling_kwargs(flow_pipe)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert image.std() > 0.02


def test_training_prompt_encoding_is_the_pipelines(flow_pipe):
    """The transformer is trained on exactly the conditioning the pipeline gives it at sampling time, the empty
    prompt (classifier-free guidance's unconditional branch) included."""
    prompts = ["a sketch of a green dotted square at night", ""]
    ids = pretrain_flow.tokenize(flow_pipe.tokenizer, prompts)
    with torch.no_grad():
        embeds, pooled = pretrain_flow.encode_prompt([flow_pipe.text_encoder, flow_pipe.text_encoder_2], ids)
        ref_embeds, _, ref_pooled, _ = flow_pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                               **probe_lib.sampling_kwargs(flow_pipe))
    assert embeds.shape == ref_embeds.shape and pooled.shape == ref_pooled.shape
    torch.testing.assert_close(embeds, ref_embeds)
    torch.testing.assert_close(pooled, ref_pooled)
    assert not torch.allclose(embeds[0], embeds[1])


def test_flow_matching_pair_is_the_straight_path_and_its_velocity():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 8, 8, 8, generator=gen), torch.randn(3, 8, 8, 8, generator=gen)
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    xt, v = pretrain_flow.flow_matching_pair(x0, noise, sigmas)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(v, noise - x0)
    # The Euler step the sampler takes with a perfect velocity lands on the data from any σ.
    torch.testing.assert_close(xt - sigmas.view(-1, 1, 1, 1) * v, x0)


def test_sigmas_are_logit_normal_and_shift_moves_them_towards_noise():
    n = 20000
    plain = pretrain_flow.build_scheduler(1.0)
    sigmas, timesteps = pretrain_flow.sample_sigmas(plain, n, "logit_normal", 0.0, 1.0, 1.29,
                                                    torch.Generator().manual_seed(0))
    assert sigmas.shape == (n,) and 0 < sigmas.min() and sigmas.max() <= 1
    # The transformer's timestep is σ on the scheduler's 1000-step scale, as the pipeline passes it.
    torch.testing.assert_close(timesteps, sigmas * 1000)
    # σ = sigmoid(z), z ~ N(0, 1): median 1/2, and 68% of σ within sigmoid(±1) = (0.269, 0.731).
    assert abs(sigmas.median().item() - 0.5) < 0.01
    inside = ((sigmas > 0.269) & (sigmas < 0.731)).float().mean().item()
    assert abs(inside - 0.683) < 0.015
    uniform, _ = pretrain_flow.sample_sigmas(plain, n, "none", 0.0, 1.0, 1.29, torch.Generator().manual_seed(0))
    assert abs(((uniform > 0.269) & (uniform < 0.731)).float().mean().item() - 0.462) < 0.015
    shifted, _ = pretrain_flow.sample_sigmas(pretrain_flow.build_scheduler(3.0), n, "logit_normal", 0.0, 1.0, 1.29,
                                             torch.Generator().manual_seed(0))
    # shift s maps σ to sσ / (1 + (s − 1)σ): the median 1/2 goes to 3/4.
    assert abs(shifted.median().item() - 0.75) < 0.01


def test_latent_normalization_gives_zero_mean_unit_std():
    latents = 0.3 + 2.5 * torch.randn(500, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    shift, scale = pretrain_flow.latent_normalization(latents)
    normalized = (latents - shift) * scale
    assert abs(normalized.mean().item()) < 1e-4 and abs(normalized.std().item() - 1.0) < 1e-4
    assert abs(shift - 0.3) < 0.02 and abs(scale - 0.4) < 0.01


def test_train_palp_runs_on_the_flow_world_as_the_experiments_run_it(tmp_path):
    """experiment.py's train_palp.py command on model_flow (no T5 tokens, as the model was trained), and the run
    loaded back by evaluate.py: the LoRA on the transformer and the token in both CLIP encoders change the image."""
    import evaluate
    import experiment
    import world

    import train_palp

    subject = world.SUBJECTS["checkered_star"]
    target = f"a sketch of {subject['token']} on a blue background"
    command = experiment.train_command(str(MODEL_FLOW), WORLD_DIR / "subjects" / "checkered_star", subject, target,
                                       3, 3, 0, tmp_path / "run")  # fmt: skip
    assert command[-2:] == ["--max_sequence_length", "0"]
    assert "--max_sequence_length" not in experiment.train_command(str(WORLD_DIR / "model"), "", subject, target,
                                                                   3, 3, 0, tmp_path / "x")  # fmt: skip
    train_palp.cli(command)
    pipe = evaluate.load_personalized(str(MODEL_FLOW), tmp_path / "run")
    assert subject["token"] in pipe.tokenizer.get_vocab() and subject["token"] in pipe.tokenizer_2.get_vocab()
    images = evaluate.sample(pipe, target, 2, 0, 5.0, 2)
    base = evaluate.sample(probe_lib.load_pipeline(str(MODEL_FLOW)), target, 2, 0, 5.0, 2)
    assert images.shape == base.shape == (2, 32, 32, 3) and np.abs(images.astype(int) - base.astype(int)).max() > 0


def test_gradient_diagnostics_run_on_the_flow_world(monkeypatch):
    """diagnostics.py gradients on model_flow: the draws come from train_palp's rectified-flow process (σ on its
    table, both terms weighted by the balance σ1²/(1 − σ1)²), every CLIP encoder's token row gets both terms'
    gradients, and D reproduces palp_losses' alignment term (measure_draws raises if not; a palp_losses whose
    alignment term is off by 1% is caught)."""
    import diagnostics

    import train_palp

    args = diagnostics.parse_args(["gradients", "--model", str(MODEL_FLOW), "--draws", "2", "--tidb_steps", "1"])
    assert diagnostics.default_output_name(args.model) == "gradients_flow"
    assert diagnostics.resolved_work_dir(args).name == "diagnostics_flow"
    models = diagnostics.build_models(train_palp, args, "checkered_star")
    process = models["process"]
    assert isinstance(process, train_palp.RectifiedFlowProcess) and process.precondition_outputs
    records, grads = diagnostics.measure_draws(train_palp, models, "checkered_star", 2, 15.0, 7.5, 1.0, seed=0)
    widths = sum(rows.shape[-1] for rows in models["conditioner"].trainable_rows)
    for record, (gp_lora, ga_lora, gp_tok, ga_tok) in zip(records, grads):
        sigma = record["sigma_t1"]
        assert 0.02 < sigma < 0.99 and record["t1"] == pytest.approx(1000 * sigma)
        assert record["balance_t1"] == pytest.approx(sigma**2 / (1 - sigma) ** 2, rel=1e-4)
        assert "sqrt_alpha_bar_t2" not in record
        assert all(np.isfinite(v) for v in record.values())
        assert record["rms_pers_grad"] > 0 and record["rms_lambda_D"] > 0 and 0 <= record["class_pull_share"] <= 1
        assert gp_tok.numel() == ga_tok.numel() == widths
        assert all(g.norm() > 0 for g in (gp_lora, ga_lora, gp_tok, ga_tok))
    axis = diagnostics.time_axis(train_palp, process, (20, 980), 5)
    assert axis["keys"] == ("sigma_t1", "sigma_t2") and axis["edges"][-1] > float(process.sigmas[980])

    palp_losses = train_palp.palp_losses

    def off_by_one_percent(*a, **k):
        loss_pers, loss_align = palp_losses(*a, **k)
        return loss_pers, 1.01 * loss_align

    monkeypatch.setattr(train_palp, "palp_losses", off_by_one_percent)
    with pytest.raises(RuntimeError, match="does not reproduce palp_losses' alignment term"):
        diagnostics.measure_draws(train_palp, models, "checkered_star", 1, 15.0, 7.5, 1.0, seed=0)
