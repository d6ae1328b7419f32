"""SDXL in train_palp.py on a tiny offline SDXL pipeline: detection, conditioning as the pipeline builds it, ∅, the
pooled embedding of the new token, time_ids, VAE precision, outputs that load into StableDiffusionXLPipeline."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, EDMEulerScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import train_palp as tp
from conftest import REPO_ROOT, build_tiny_sdxl, write_instance_images
from test_train_palp import TARGET, TOKEN, base_args, train


def generate(pipe, prompt):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt, num_inference_steps=2, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images


def load_into(pipe, out):
    """The model card's two load_textual_inversion calls."""
    state = load_file(out / "learned_embeds.safetensors")
    pipe.load_textual_inversion(
        state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )


@pytest.fixture(scope="module")
def trained(tiny_sdxl_path, tmp_path_factory):
    """One short SDXL run, shared by the tests that only read its results."""
    tmp = tmp_path_factory.mktemp("sdxl-run")
    instance = write_instance_images(tmp / "instance")
    out = tmp / "out"
    run = train(tiny_sdxl_path, str(instance), out, "--max_train_steps", "3", "--num_validation_images", "0")
    return run, out


def test_sdxl_model_is_detected_and_both_encoders_get_the_token(trained):
    run, out = trained
    assert isinstance(run.conditioner, tp.SDXLTextConditioner)
    assert run.config["pipeline_class"] == "StableDiffusionXLPipeline"
    state = load_file(out / "learned_embeds.safetensors")
    assert set(state) == {"clip_l", "clip_g"}
    assert state["clip_l"].shape == (1, 16) and state["clip_g"].shape == (1, 32)
    for embedding, key in zip(run.conditioner.embeddings, ("clip_l", "clip_g")):
        # Each row started from its own encoder's class-noun rows and was trained.
        class_id = run.conditioner.tokenizers[0].encode("cat", add_special_tokens=False)
        initial = embedding.base.weight[class_id].float().mean(0)
        assert (state[key][0] - initial).abs().max() > 0
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card
    assert 'text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)' in card
    assert 'state["clip_l"]' in card and 'state["clip_g"]' in card
    assert all(k.startswith("lora_unet_") for k in load_file(out / "pytorch_lora_weights_kohya.safetensors"))


def test_training_encoding_equals_the_pipeline_encode_prompt(trained, tiny_sdxl_path):
    run, out = trained
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    load_into(pipe, out)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(TARGET, device="cpu")
        ours = run.conditioner.encode(run.conditioner.tokenize([TARGET]))
    torch.testing.assert_close(ours.hidden, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.text_embeds, pooled, atol=1e-5, rtol=1e-5)
    # ∅ as the pipeline has it (force_zeros_for_empty_prompt: zeros), with inference time_ids.
    torch.testing.assert_close(run.uncond.hidden, negative, atol=0, rtol=0)
    torch.testing.assert_close(run.uncond.text_embeds, negative_pooled, atol=0, rtol=0)
    assert run.uncond.hidden.abs().sum() == 0
    assert run.uncond.time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]


def test_the_fixtures_tokenizers_pad_as_sdxls_and_validation_encodes_as_training(trained):
    """SDXL's tokenizer_2 pads with "!", its tokenizer with <|endoftext|>: the fixture does too, so a tokenizer
    mix-up in training or in the validation pipeline changes the conditioning."""
    run, _ = trained
    first, second = run.conditioner.tokenizers
    assert (first.pad_token, second.pad_token) == ("<|endoftext|>", "!") and first.pad_token_id != second.pad_token_id
    ids = run.conditioner.tokenize([TARGET])
    assert int(ids[0][0, -1]) == first.pad_token_id and int(ids[1][0, -1]) == second.pad_token_id
    pipe = run.conditioner.pipeline(run.vae, run.base_unet, None, run.base_text_encoders)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(TARGET, device="cpu", do_classifier_free_guidance=False)
        ours = run.conditioner.encode(ids)
        swapped = run.conditioner.encode((ids[1], ids[0]))
    torch.testing.assert_close(embeds, ours.hidden, atol=0, rtol=0)
    torch.testing.assert_close(pooled, ours.text_embeds, atol=0, rtol=0)
    assert (swapped.hidden - ours.hidden).abs().max() > 1e-4


@pytest.mark.parametrize("legacy_pooling", [False, True], ids=["eos-pooling", "argmax-pooling"])
def test_uncond_and_pooled_embedding_agree_with_the_pipeline(tmp_path, legacy_pooling):
    """Without force_zeros_for_empty_prompt ∅ is the encoded empty prompt; with an old config the second encoder pools
    at the argmax of the ids, which is the new token (it has the highest id): training must pool where inference
    does."""
    model = tmp_path / "model"
    build_tiny_sdxl(model, force_zeros_for_empty_prompt=False, legacy_pooling=legacy_pooling)
    out = tmp_path / "out"
    run = train(str(model), str(write_instance_images(tmp_path / "i")), out, "--max_train_steps", "2",
                "--num_validation_images", "0")  # fmt: skip
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    load_into(pipe, out)
    ids = run.conditioner.tokenize([TARGET])
    token_id = run.conditioner.tokenizers[1].convert_tokens_to_ids(TOKEN)
    assert token_id == int(ids[1].max())  # the new token has the highest id
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(TARGET, device="cpu")
        ours = run.conditioner.encode(ids)
        eos = run.conditioner.text_encoders[1].config.eos_token_id
        last = run.conditioner.text_encoders[1].text_model(ids[1]).last_hidden_state
    torch.testing.assert_close(ours.text_embeds, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run.uncond.hidden, negative, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run.uncond.text_embeds, negative_pooled, atol=1e-5, rtol=1e-5)
    assert run.uncond.hidden.abs().sum() > 0
    pooled_at = (ids[1][0] == token_id).nonzero()[0, 0] if legacy_pooling else (ids[1][0] == eos).nonzero()[0, 0]
    projection = run.conditioner.text_encoders[1].text_projection
    torch.testing.assert_close(ours.text_embeds[0], projection(last[0, pooled_at]).detach(), atol=1e-5, rtol=1e-5)


def test_lora_off_gives_the_base_model_exactly(trained, tiny_sdxl_path):
    run, _ = trained
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    kwargs = run.cond_clean.unet_kwargs()
    with torch.no_grad(), tp.lora_disabled(run.base_unet):
        off = run.base_unet(x, t, **kwargs).sample
    with torch.no_grad():
        expected = base(x, t, **kwargs).sample
        on = run.base_unet(x, t, **kwargs).sample
    torch.testing.assert_close(off, expected, atol=0, rtol=0)
    assert (on - off).abs().max() > 0


def test_time_ids_real_geometry_for_personalization_inference_for_alignment(tiny_sdxl_path, tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "wide"
    folder.mkdir()
    Image.new("RGB", (60, 24), (200, 30, 30)).save(folder / "wide.png")
    seen = []
    original = tp.palp_losses

    def recording(unet, base_unet, *rest):
        handle = base_unet.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"].tolist()), with_kwargs=True
        )
        try:
            return original(unet, base_unet, *rest)
        finally:
            handle.remove()

    monkeypatch.setattr(tp, "palp_losses", recording)
    train(tiny_sdxl_path, str(folder), tmp_path / "out", "--max_train_steps", "1", "--num_validation_images", "0")
    personal, *alignment = seen
    height, width, top, left, h, w = personal[0]
    assert (height, width, top, h, w) == (24, 60, 0, 32, 32) and 0 <= left <= 80 - 32
    assert len(alignment) == 2
    assert all(row == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0] for call in alignment for row in call)


@pytest.mark.parametrize("family", ["tiny_sd_path", "tiny_sdxl_path"])
def test_native_resolution_is_the_default_of_both_families(family, request, tmp_path):
    model = request.getfixturevalue(family)
    argv = [a for a in base_args(model, str(write_instance_images(tmp_path / "i")), tmp_path / "a")]
    index = argv.index("--resolution")
    del argv[index : index + 2]
    run = tp.main(tp.parse_args([*argv, "--max_train_steps", "1", "--num_validation_images", "0"]))
    assert run.resolution == 16 and run.config["resolution"] == 16  # sample_size 8 × VAE scale factor 2


def test_vae_upcast_rule_and_native_resolution(tiny_sdxl_path, tmp_path):
    instance = str(write_instance_images(tmp_path / "i"))
    argv = [a for a in base_args(tiny_sdxl_path, instance, tmp_path / "a") if a not in ("--resolution", "32")]
    run = tp.main(tp.parse_args([*argv, "--max_train_steps", "1", "--num_validation_images", "0",
                                 "--mixed_precision", "bf16"]))  # fmt: skip
    assert run.vae.dtype == torch.float32  # force_upcast: the VAE stays in fp32
    assert run.resolution == 16 and run.config["resolution"] == 16  # sample_size 8 × VAE scale factor 2
    safe_vae = tmp_path / "fp16-safe-vae"
    vae = AutoencoderKL.from_pretrained(tiny_sdxl_path, subfolder="vae")
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(safe_vae)
    from conftest import reset_accelerate_state

    reset_accelerate_state()
    run = train(tiny_sdxl_path, instance, tmp_path / "b", "--max_train_steps", "1", "--num_validation_images", "0",
                "--mixed_precision", "bf16", "--pretrained_vae_model_name_or_path", str(safe_vae))  # fmt: skip
    assert run.vae.dtype == torch.bfloat16


def test_resume_is_bit_exact(tiny_sdxl_path, tmp_path):
    instance = str(write_instance_images(tmp_path / "i"))
    common = ("--checkpointing_steps", "2", "--num_validation_images", "0")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_sdxl_path, instance, full, *common)
    train(tiny_sdxl_path, instance, resumed, *common, "--max_train_steps", "2")
    for name in ("pytorch_lora_weights.safetensors", "README.md"):
        (resumed / name).unlink()
    assert set(load_file(resumed / "checkpoint-2" / "learned_embeds.safetensors")) == {"clip_l", "clip_g"}
    train(tiny_sdxl_path, instance, resumed, *common, "--resume_from_checkpoint", "latest")
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _without_text_encoder_2(model, tmp_path):
    folder = tmp_path / "no-te2"
    shutil.copytree(model, folder)
    shutil.rmtree(folder / "text_encoder_2")
    return folder


def _with_class(class_name):
    def change(model, tmp_path):
        folder = tmp_path / class_name
        shutil.copytree(model, folder)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
        return folder

    return change


def _inpainting_unet(model, tmp_path):
    folder = tmp_path / "nine-channels"
    shutil.copytree(model, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    config = {**unet.config, "in_channels": 9}
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize(
    "change,expected",
    [
        (_without_text_encoder_2, "missing: text_encoder_2"),
        (_with_class("StableDiffusionXLImg2ImgPipeline"), "is a StableDiffusionXLImg2ImgPipeline model"),
        (_with_class("StableDiffusionXLInpaintPipeline"), "is a StableDiffusionXLInpaintPipeline model"),
        (_with_class("KandinskyPipeline"), "is a KandinskyPipeline model"),
        (_inpainting_unet, "9 input channels"),
    ],
    ids=["no text_encoder_2", "refiner", "inpainting pipeline", "unknown pipeline", "inpainting unet"],
)
def test_models_palp_cannot_train_fail_with_one_clear_message(tiny_sdxl_path, tmp_path, change, expected):
    model = change(tiny_sdxl_path, tmp_path)
    argv = base_args(str(model), str(write_instance_images(tmp_path / "i")), tmp_path / "out")
    with pytest.raises(SystemExit) as info:
        tp.cli(argv)
    message = str(info.value)
    assert message.startswith("error: --pretrained_model_name_or_path") and expected in message
    assert message.count("\n") == 0


def _edm_scheduler_only(model, tmp_path):
    folder = tmp_path / "edm-scheduler"
    shutil.copytree(model, folder)
    EDMEulerScheduler().save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EDMEulerScheduler"]}))
    return folder, []


def _edm_model(model, tmp_path):
    build_tiny_sdxl(tmp_path / "edm", edm=True)
    return tmp_path / "edm", []


def _edm_vae(model, tmp_path):
    build_tiny_sdxl(tmp_path / "edm", edm=True)
    return model, ["--pretrained_vae_model_name_or_path", str(tmp_path / "edm" / "vae")]


@pytest.mark.parametrize("script", ["train_palp", "train_palp_multi_subject"])
@pytest.mark.parametrize(
    "change,found",
    [
        (_edm_model, "scheduler EDMDPMSolverMultistepScheduler; latents_mean and latents_std in the config of its"),
        (_edm_scheduler_only, "scheduler EDMEulerScheduler)"),
        (_edm_vae, "latents_mean and latents_std in the config of --pretrained_vae_model_name_or_path '"),
    ],
    ids=["playground-style model", "EDM scheduler", "VAE with latents statistics"],
)
def test_edm_style_models_are_refused_before_any_weights_load(
    tiny_sdxl_path, tmp_path, monkeypatch, script, change, found
):
    """PALP's mathematics here is DDPM ε/v on ᾱ_t with latents scaled by scaling_factor alone; an EDM-style SDXL
    model would train silently with DDPM betas and unnormalised latents."""
    import importlib

    from test_multi_subject import common_flags, subject_flags

    module = importlib.import_module(script)
    model, extra = change(tiny_sdxl_path, tmp_path)
    monkeypatch.setattr(module, "load_models", lambda *a, **k: pytest.fail("weights loaded before the check"))
    instance = str(write_instance_images(tmp_path / "i"))
    if script == "train_palp":
        argv = base_args(str(model), instance, tmp_path / "out", *extra)
    else:
        argv = [*subject_flags(instance, instance), *common_flags(str(model), tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as info:
        module.cli(argv)
    message = str(info.value)
    assert message.startswith(f"error: --pretrained_model_name_or_path {str(model)!r}: an EDM-style model (")
    assert found in message and "DDPM ε/v-prediction" in message and message.count("\n") == 0


def test_accelerate_launch_sdxl_outputs_load_into_a_fresh_pipeline(tiny_sdxl_path, instance_dir, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train_palp.py"),
        *base_args(tiny_sdxl_path, instance_dir, out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "samples" / "final_0.png").is_file()

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    base_image = generate(pipe, TARGET.replace(TOKEN, "a cat"))
    pipe.load_lora_weights(out)
    load_into(pipe, out)
    assert TOKEN in pipe.tokenizer.get_vocab() and TOKEN in pipe.tokenizer_2.get_vocab()
    image = generate(pipe, TARGET)
    assert image.shape == (1, 32, 32, 3)
    assert abs(image - base_image).max() > 1e-3


def test_multi_subject_script_on_sdxl_writes_one_loadable_file_per_token(tiny_sdxl_path, tmp_path):
    from test_multi_subject import ART, CAT, common_flags, subject_flags

    import train_palp_multi_subject as tpm

    cat = write_instance_images(tmp_path / "cat", n=2)
    art = write_instance_images(tmp_path / "art", n=1, seed=7)
    out = tmp_path / "out"
    flags = [*subject_flags(str(cat), str(art)), *common_flags(tiny_sdxl_path, out), "--max_train_steps", "2"]
    run = tpm.main(tpm.parse_args(flags))
    assert isinstance(run.conditioner, tpm.SDXLTextConditioner)
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card
    assert "- VAE used in training: the base model's" in card and "- stable-diffusion-xl-diffusers" in card
    assert "guidance scale 5.0)" in card and json.loads((out / "training_config.json").read_text())[
        "validation_guidance_scale"] == 5.0  # fmt: skip
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    for index, token in enumerate((CAT, ART)):
        name = tpm.embedding_file_name(token, single=False)
        assert f'"{name}"' in card and f'token="{token}", text_encoder=pipe.text_encoder_2' in card
        state = load_file(out / name)
        assert state["clip_l"].shape == (1, 16) and state["clip_g"].shape == (1, 32)
        pipe.load_textual_inversion(
            state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                        (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):  # fmt: skip
            row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)]
            torch.testing.assert_close(row, state[key][0])
            torch.testing.assert_close(run.conditioner.embeddings[("clip_l", "clip_g").index(key)].rows[index], row)


def test_sample_palp_loads_an_sdxl_run(trained, tiny_sdxl_path, tmp_path):
    from conftest import load_example

    sample_palp = load_example("sample_palp")
    run, out = trained
    assert sample_palp.read_embedding_token(out / "learned_embeds.safetensors") == TOKEN
    args = ["--trained_dir", str(out), "--output_dir", str(tmp_path / "samples"), "--resolution", "32",
            "--num_inference_steps", "2", "--device", "cpu", "--seeds", "0"]  # fmt: skip
    rows = sample_palp.main(sample_palp.parse_args(args))
    assert rows[0][0].size == (32, 32)
    pipe = sample_palp.load_pipeline(tiny_sdxl_path, None, [out / "learned_embeds.safetensors"], "cpu", torch.float32)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    state = load_file(out / "learned_embeds.safetensors")
    for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                    (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):  # fmt: skip
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        torch.testing.assert_close(row, state[key][0])
