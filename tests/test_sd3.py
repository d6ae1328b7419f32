"""Stable Diffusion 3 in train_palp.py on tiny offline SD3 pipelines (with and without T5): detection, conditioning as
StableDiffusion3Pipeline.encode_prompt builds it after training, outputs that load into a stock
StableDiffusion3Pipeline, resume, the multi-subject script, and the models PALP refuses. The pieces that need no
training (the PALP losses on the MMDiT, the conditioning, the latents) are in test_sd3_math.py, which the mutation
check runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file

import train_palp as tp
from conftest import REPO_ROOT, write_instance_images
from test_train_palp import TARGET, TOKEN, base_args, generate, train


def load_pipeline(path):
    """A fresh pipeline; a model saved without T5 is loaded as the pipeline documents it, text_encoder_3=None."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    if (index.get("text_encoder_3") or [None])[-1] is None:
        return StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    return StableDiffusion3Pipeline.from_pretrained(path)


def load_into(pipe, out, token=TOKEN, file=tp.EMBEDDINGS_NAME):
    """The model card's snippet, run as written, with its first line (the download) replaced by the local file."""
    card_lines = tp.SD3TextConditioner([]).load_code("repo", [(file, token)]).splitlines()
    assert card_lines[1].startswith("state = load_file(hf_hub_download(")
    exec("\n".join(card_lines[2:]), {"pipe": pipe, "state": load_file(Path(out) / file)})


@pytest.fixture(scope="module")
def trained(tiny_sd3_path, tmp_path_factory):
    """One short SD3 run with T5 and a validation image, shared by the tests that only read its results."""
    tmp = tmp_path_factory.mktemp("sd3-run")
    out = tmp / "out"
    run = train(tiny_sd3_path, str(write_instance_images(tmp / "instance")), out, "--max_train_steps", "3")
    return run, out


def test_sd3_is_detected_and_both_clip_encoders_get_the_token(trained):
    run, out = trained
    assert isinstance(run.conditioner, tp.SD3TextConditioner) and run.conditioner.t5 is not None
    assert isinstance(run.base_unet, SD3Transformer2DModel)
    assert isinstance(run.noise_process, tp.RectifiedFlowProcess) and run.noise_process.precondition_outputs
    assert run.config["pipeline_class"] == "StableDiffusion3Pipeline"
    assert run.config["validation_guidance_scale"] == 7.0  # the pipeline's default
    with pytest.raises(ValueError, match="2 text encoders: use conditioner.embeddings"):
        run.embedding  # one row per CLIP encoder: no "first one" stands for them
    state = load_file(out / "learned_embeds.safetensors")
    assert set(state) == {"clip_l", "clip_g"}
    assert state["clip_l"].shape == (1, 8) and state["clip_g"].shape == (1, 16)
    for embedding, tokenizer, key in zip(run.conditioner.embeddings, run.conditioner.tokenizers, ("clip_l", "clip_g")):
        # Each row started from its own encoder's class-noun rows and was trained.
        initial = embedding.base.weight[tokenizer.encode("cat", add_special_tokens=False)].float().mean(0)
        assert (state[key][0] - initial).abs().max() > 0
    # T5 is frozen and has no token; its vocabulary is unchanged.
    assert TOKEN not in run.conditioner.t5_tokenizer.get_vocab()
    assert not any(p.requires_grad for p in run.conditioner.t5.parameters())
    assert run.conditioner.t5.get_input_embeddings().weight.shape[0] == len(run.conditioner.t5_tokenizer)
    # LoRA on the attention of both streams, under "transformer"; no kohya copy for the MMDiT.
    lora = load_file(out / tp.LORA_NAME)
    assert all(k.startswith("transformer.") for k in lora)
    for module in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                   "attn.add_v_proj", "attn.to_add_out"):  # fmt: skip
        assert any(f".{module}.lora" in k for k in lora), module
    assert not (out / tp.KOHYA_LORA_NAME).exists()
    assert (out / "samples" / "final_0.png").is_file()
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "- sd3" in card
    assert 'tokenizer.add_tokens("<my-cat>")' in card and "AUTOMATIC1111" not in card


@pytest.fixture(scope="module")
def trained_without_t5(tiny_sd3_no_t5_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3-no-t5-run")
    out = tmp / "out"
    run = train(tiny_sd3_no_t5_path, str(write_instance_images(tmp / "instance")), out, "--max_train_steps", "2",
                "--num_validation_images", "0")  # fmt: skip
    return run, out


@pytest.mark.parametrize("which", ["trained", "trained_without_t5"], ids=["with-t5", "text_encoder_3=None"])
def test_training_conditioning_equals_the_pipeline_encode_prompt(which, request, tiny_sd3_path, tiny_sd3_no_t5_path):
    """y_P with the learned token, loaded into a stock pipeline by the card's lines, and ∅ (the encoded empty prompt,
    not zeros) are what encode_prompt gives; without T5 its part of the sequence is zeros, 256 rows long."""
    run, out = request.getfixturevalue(which)
    path = tiny_sd3_path if which == "trained" else tiny_sd3_no_t5_path
    pipe = load_pipeline(path)
    load_into(pipe, out)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(TARGET, None, None, device="cpu")
        ours = run.conditioner.encode(tuple(ids for ids in run.conditioner.tokenize([TARGET])))
    assert isinstance(ours, tp.SD3Conditioning) and ours.hidden.shape == (1, 77 + 256, 32)
    torch.testing.assert_close(ours.hidden, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run.uncond.hidden, negative, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run.uncond.pooled, negative_pooled, atol=1e-5, rtol=1e-5)
    assert run.uncond.hidden.abs().sum() > 0 and run.uncond.pooled.shape == (1, 8 + 16)
    assert ours.hidden[0, :77, 24:].abs().sum() == 0  # CLIP-L ‖ CLIP-G (24 wide) zero-padded to T5's 32
    t5_part = ours.hidden[0, 77:]
    assert (t5_part.abs().sum() == 0) == (which == "trained_without_t5")


def test_t5_runs_once_per_distinct_prompt(tiny_sd3_path, tmp_path, monkeypatch):
    """y_P's T5 part never changes (T5 is frozen and has no token): T5 encodes y_P, y_c and ∅ once each, whatever
    the number of steps."""
    calls = []
    original = tp.SD3TextConditioner.load_text_encoders

    def counting(self, *args, **kwargs):
        encoders = original(self, *args, **kwargs)
        self.t5.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
        return encoders

    monkeypatch.setattr(tp.SD3TextConditioner, "load_text_encoders", counting)
    run = train(tiny_sd3_path, str(write_instance_images(tmp_path / "i")), tmp_path / "out", "--max_train_steps", "3",
                "--num_validation_images", "0", "--train_batch_size", "2")  # fmt: skip
    assert calls == [1, 1, 1] and len(run.conditioner.t5_cache) == 3


def test_outputs_load_into_a_fresh_pipeline_and_change_its_image(trained, tiny_sd3_path):
    run, out = trained
    pipe = load_pipeline(tiny_sd3_path)
    base_image = generate(pipe, TARGET.replace(TOKEN, "a cat"))
    pipe.load_lora_weights(out)
    load_into(pipe, out)
    assert "default_0" in pipe.transformer.peft_config
    assert TOKEN in pipe.tokenizer.get_vocab() and TOKEN in pipe.tokenizer_2.get_vocab()
    state = load_file(out / "learned_embeds.safetensors")
    for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                    (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):  # fmt: skip
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        torch.testing.assert_close(row, state[key][0])
    image = generate(pipe, TARGET)
    assert image.shape == (1, 32, 32, 3)
    assert abs(image - base_image).max() > 1e-3
    # The loaded LoRA is the trained one: the transformer's output matches the run's own with the same input.
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([700.0])
    with torch.no_grad():
        torch.testing.assert_close(
            run.cond_clean.denoise(pipe.transformer, x, t), run.cond_clean.denoise(run.base_unet, x, t),
            atol=1e-5, rtol=1e-5,
        )  # fmt: skip


def test_accelerate_launch_sd3_outputs_load_into_a_fresh_pipeline(tiny_sd3_path, instance_dir, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train_palp.py"),
        *base_args(tiny_sd3_path, instance_dir, out, "--max_train_steps", "2"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "samples" / "final_0.png").is_file()
    pipe = load_pipeline(tiny_sd3_path)
    base_image = generate(pipe, TARGET)
    pipe.load_lora_weights(out)
    load_into(pipe, out)
    assert abs(generate(pipe, TARGET) - base_image).max() > 1e-3


def test_lora_off_gives_the_base_model_exactly(trained, tiny_sd3_path):
    run, _ = trained
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer")
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    with torch.no_grad(), tp.lora_disabled(run.base_unet):
        off = run.cond_clean.denoise(run.base_unet, x, t)
    with torch.no_grad():
        expected = run.cond_clean.denoise(base, x, t)
        on = run.cond_clean.denoise(run.base_unet, x, t)
    torch.testing.assert_close(off, expected, atol=0, rtol=0)
    assert (on - off).abs().max() > 0


def test_latents_are_shifted_and_scaled_as_the_pipeline_decodes_them(trained):
    """(z - shift_factor) · scaling_factor in training; decode_latents inverts it as the pipeline does."""
    run, _ = trained
    vae = run.vae
    assert vae.config.shift_factor == 0.0609 and vae.config.scaling_factor == 1.5035
    sampler = tp.LatentSampler(vae, [Image.new("RGB", (32, 32), (200, 30, 30))], 32, True, False, "cpu",
                               torch.float32, run.conditioner.image_geometry)  # fmt: skip
    latents, geometry = sampler([0], torch.Generator().manual_seed(0))
    assert geometry is None  # SD3 has no SDXL-style micro-conditioning
    mean, std, _ = sampler.posterior(0, None)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, (z - 0.0609) * 1.5035)
    with torch.no_grad():
        torch.testing.assert_close(tp.decode_latents(vae, latents), vae.decode(z).sample)


def test_resume_is_bit_exact(tiny_sd3_path, tmp_path):
    instance = str(write_instance_images(tmp_path / "i"))
    common = ("--checkpointing_steps", "2", "--num_validation_images", "0", "--max_train_steps", "3")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_sd3_path, instance, full, *common)
    train(tiny_sd3_path, instance, resumed, *common[:-1], "2")
    for name in (tp.LORA_NAME, "README.md"):
        (resumed / name).unlink()
    assert set(load_file(resumed / "checkpoint-2" / "learned_embeds.safetensors")) == {"clip_l", "clip_g"}
    assert all(k.startswith("transformer.") for k in load_file(resumed / "checkpoint-2" / tp.LORA_NAME))
    train(tiny_sd3_path, instance, resumed, *common, "--resume_from_checkpoint", "latest")
    for name in (tp.LORA_NAME, "learned_embeds.safetensors"):
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_multi_subject_script_on_sd3_writes_one_loadable_file_per_token(tiny_sd3_no_t5_path, tmp_path):
    from test_multi_subject import ART, CAT, common_flags, subject_flags

    import train_palp_multi_subject as tpm

    cat = write_instance_images(tmp_path / "cat", n=2)
    art = write_instance_images(tmp_path / "art", n=1, seed=7)
    out = tmp_path / "out"
    flags = [*subject_flags(str(cat), str(art)), *common_flags(tiny_sd3_no_t5_path, out), "--max_train_steps", "2"]
    run = tpm.main(tpm.parse_args(flags))
    assert isinstance(run.conditioner, tpm.SD3TextConditioner)
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "AUTOMATIC1111" not in card
    pipe = load_pipeline(tiny_sd3_no_t5_path)
    pipe.load_lora_weights(out)
    for index, token in enumerate((CAT, ART)):
        name = tpm.embedding_file_name(token, single=False)
        assert f'"{name}"' in card and f'tokenizer.add_tokens("{token}")' in card
        load_into(pipe, out, token, name)
        for encoder, tokenizer, embedding in zip((pipe.text_encoder, pipe.text_encoder_2),
                                                 (pipe.tokenizer, pipe.tokenizer_2), run.conditioner.embeddings):  # fmt: skip
            row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)]
            torch.testing.assert_close(embedding.rows[index], row)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(f"{CAT} next to {ART}", None, None, device="cpu")
        ours = run.conditioner.encode(run.conditioner.tokenize([f"{CAT} next to {ART}"]))
    torch.testing.assert_close(ours.hidden, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ models PALP refuses
def _edited_copy(model, folder, config_file, **changes):
    """A copy of ``model`` in ``folder`` whose JSON ``config_file`` has ``changes`` merged in."""
    shutil.copytree(model, folder)
    config = json.loads((folder / config_file).read_text())
    (folder / config_file).write_text(json.dumps({**config, **changes}))
    return folder


def _without_clip_g(model, tmp_path):
    folder = _edited_copy(model, tmp_path / "no-clip-g", "model_index.json", text_encoder_2=[None, None])
    shutil.rmtree(folder / "text_encoder_2")
    return folder


def _flux(model, tmp_path):
    return _edited_copy(model, tmp_path / "flux", "model_index.json", _class_name="FluxPipeline")


def _dynamic_shift(model, tmp_path):
    return _edited_copy(model, tmp_path / "dynamic-shift", "scheduler/scheduler_config.json", use_dynamic_shifting=True)


def _unknown(model, tmp_path):
    return _edited_copy(model, tmp_path / "unknown", "model_index.json", _class_name="StableDiffusion3Img2ImgPipeline")


@pytest.mark.parametrize("script", ["train_palp", "train_palp_multi_subject"])
@pytest.mark.parametrize(
    "change,expected",
    [
        (_without_clip_g, "its model_index.json has no text_encoder_2. PALP learns the placeholder token in the "
                          "model's CLIP text encoders (text_encoder, text_encoder_2)"),
        (_flux, "is a FluxPipeline model, which PALP cannot train: FLUX.1 is guidance-distilled"),
        (_unknown, "is a StableDiffusion3Img2ImgPipeline model; PALP trains text-to-image base models"),
        (_dynamic_shift, "its scheduler shifts σ by resolution (use_dynamic_shifting)"),
    ],
    ids=["no CLIP-G", "FLUX", "unknown pipeline", "dynamic shift"],
)  # fmt: skip
def test_models_palp_cannot_train_fail_with_one_clear_message_before_any_weights_load(
    tiny_sd3_no_t5_path, tmp_path, monkeypatch, script, change, expected
):
    import importlib

    from test_multi_subject import common_flags, subject_flags

    module = importlib.import_module(script)
    monkeypatch.setattr(module, "load_models", lambda *a, **k: pytest.fail("weights loaded before the check"))
    model = str(change(tiny_sd3_no_t5_path, tmp_path))
    instance = str(write_instance_images(tmp_path / "i"))
    if script == "train_palp":
        argv = base_args(model, instance, tmp_path / "out")
    else:
        argv = [*subject_flags(instance, instance), *common_flags(model, tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        module.cli(argv)
    message = str(info.value)
    assert message.startswith(f"error: --pretrained_model_name_or_path {model!r}") and expected in message
    assert message.count("\n") == 0
    if change is _flux:
        assert "no unconditional prediction" in message and "SD3/3.5" in message


def test_resolution_must_fit_the_transformers_patches(tmp_path):
    """VAE scale 8 × patch size 2: 24 px (a multiple of 8) gives 3 × 3 latents, which 2 × 2 patches cannot tile."""
    from conftest import build_tiny_sd3

    build_tiny_sd3(tmp_path / "model", with_t5=False, vae_blocks=4)
    argv = base_args(str(tmp_path / "model"), str(write_instance_images(tmp_path / "i")), tmp_path / "out")
    argv[argv.index("--resolution") + 1] = "24"
    with pytest.raises(SystemExit) as info:
        tp.cli(argv)
    assert str(info.value) == (
        "error: --resolution 24 must be a multiple of 16 for this model (VAE scale factor × the transformer's patch "
        "size), e.g. 32."
    )


@pytest.mark.parametrize("which", ["trained", "trained_without_t5"], ids=["with-t5", "text_encoder_3=None"])
def test_sample_palp_samples_an_sd3_run(which, request, tmp_path):
    """A real SD3 run, sampled from its training_config.json alone (base model and target prompt): the transformer's
    LoRA and both CLIP rows are the run's, and the LoRA changes the image."""
    from conftest import load_example

    sample_palp = load_example("sample_palp")
    run, out = request.getfixturevalue(which)
    common = ["--trained_dir", str(out), "--resolution", "32", "--num_inference_steps", "2", "--device", "cpu",
              "--seeds", "0"]  # fmt: skip
    rows = sample_palp.main(sample_palp.parse_args(common + ["--output_dir", str(tmp_path / "s1")]))
    scale0 = sample_palp.main(
        sample_palp.parse_args(common + ["--output_dir", str(tmp_path / "s0"), "--lora_scale", "0"])
    )
    assert rows[0][0].size == (32, 32) and (tmp_path / "s1" / "grid.png").is_file()
    assert json.loads((tmp_path / "s1" / "sampling_config.json").read_text())["prompts"] == [TARGET]
    assert np.abs(np.asarray(rows[0][0], dtype=int) - np.asarray(scale0[0][0], dtype=int)).max() > 0
    lora_path, embedding_paths = sample_palp.find_trained_weights(str(out), tp.LORA_NAME, [])
    path = run.config["pretrained_model_name_or_path"]
    pipe = sample_palp.load_pipeline(path, lora_path, embedding_paths, "cpu", torch.float32)
    assert isinstance(pipe, StableDiffusion3Pipeline) and (pipe.text_encoder_3 is None) == (which != "trained")
    for embedding, encoder, tokenizer in zip(run.conditioner.embeddings, (pipe.text_encoder, pipe.text_encoder_2),
                                             (pipe.tokenizer, pipe.tokenizer_2)):  # fmt: skip
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        torch.testing.assert_close(row, embedding.rows[0].detach().float())
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([700.0])
    with torch.no_grad():
        torch.testing.assert_close(run.cond_clean.denoise(pipe.transformer, x, t),
                                   run.cond_clean.denoise(run.base_unet, x, t), atol=1e-5, rtol=1e-5)  # fmt: skip


def test_max_sequence_length_sets_t5s_part_as_the_pipeline_call_does(tiny_sd3_no_t5_path, tmp_path):
    """--max_sequence_length 0 on a model without T5: no zero rows after CLIP's 77, as encode_prompt gives with
    max_sequence_length=0; validation and the card's call pass the same value."""
    out = tmp_path / "out"
    run = train(tiny_sd3_no_t5_path, str(write_instance_images(tmp_path / "instance")), out, "--max_train_steps", "1",
                "--num_validation_images", "1", "--max_sequence_length", "0")  # fmt: skip
    pipe = load_pipeline(tiny_sd3_no_t5_path)
    load_into(pipe, out)
    with torch.no_grad():
        embeds, negative, *_ = pipe.encode_prompt(TARGET, None, None, device="cpu", max_sequence_length=0)
        ours = run.conditioner.encode(tuple(run.conditioner.tokenize([TARGET])))
    assert ours.hidden.shape == run.uncond.hidden.shape == (1, 77, 32)
    torch.testing.assert_close(ours.hidden, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run.uncond.hidden, negative, atol=1e-5, rtol=1e-5)
    assert run.conditioner.call_kwargs() == {"max_sequence_length": 0}
    assert "max_sequence_length=0).images[0]" in (out / "README.md").read_text()


@pytest.mark.parametrize("which,value,message", [
    ("tiny_sd3_path", "0", "--max_sequence_length must be at least 1 with a T5 encoder, got 0."),
    ("tiny_sd3_no_t5_path", "-1", "--max_sequence_length must be at least 0, got -1."),
], ids=["zero with T5", "negative"])  # fmt: skip
def test_max_sequence_length_out_of_range_fails_before_any_weights_load(
    request, tmp_path, monkeypatch, which, value, message
):
    monkeypatch.setattr(tp, "load_models", lambda *a, **k: pytest.fail("weights loaded before the check"))
    argv = base_args(request.getfixturevalue(which), str(write_instance_images(tmp_path / "i")), tmp_path / "out",
                     "--max_sequence_length", value)  # fmt: skip
    with pytest.raises(SystemExit) as info:
        tp.cli(argv)
    assert str(info.value) == f"error: {message}"
    leftovers = {p.name for p in (tmp_path / "out").iterdir()} if (tmp_path / "out").exists() else set()
    assert not {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "README.md"} & leftovers
