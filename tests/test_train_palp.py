"""train_palp.py end to end on the tiny offline pipeline: outputs, precision, checkpoints, resume, Hub upload, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import train_palp as tp
from conftest import REPO_ROOT, write_instance_images

TOKEN = "<my-cat>"
TARGET = f"A sketch of {TOKEN} in Paris"


def base_args(model, instance_dir, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path",
        model,
        "--instance_data_dir",
        instance_dir,
        "--placeholder_token",
        TOKEN,
        "--class_name",
        "cat",
        "--target_prompt",
        TARGET,
        "--output_dir",
        str(output_dir),
        "--resolution",
        "32",
        "--rank",
        "4",
        "--max_train_steps",
        "4",
        "--seed",
        "0",
        "--num_validation_images",
        "1",
        "--validation_num_inference_steps",
        "2",
        "--report_to",
        "none",
        "--learning_rate",
        "1e-3",
        *extra,
    ]


def train(model, instance_dir, output_dir, *extra):
    return tp.main(tp.parse_args(base_args(model, instance_dir, output_dir, *extra)))


def generate(pipe, prompt):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_only_the_placeholder_row_changes(tiny_sd_path, instance_dir, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    result = train(tiny_sd_path, instance_dir, tmp_path / "out")
    base = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").get_input_embeddings().weight
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    trained = result.embedding
    # Every pre-existing row of the matrix is bit-identical; the new row has moved away from its class-word init.
    assert torch.equal(trained.base.weight[: base.shape[0]], base)
    init = base[tokenizer.encode("cat", add_special_tokens=False)].mean(0)
    saved = load_file(tmp_path / "out" / "learned_embeds.safetensors")
    assert list(saved) == [TOKEN] and saved[TOKEN].shape == (1, 32)
    assert (saved[TOKEN][0] - init).abs().max() > 1e-5
    torch.testing.assert_close(saved[TOKEN][0], trained.rows[0].detach())


def test_bf16_keeps_trainable_parameters_in_fp32(tiny_sd_path, instance_dir, tmp_path):
    result = train(tiny_sd_path, instance_dir, tmp_path / "out", "--mixed_precision", "bf16", "--max_train_steps", "2")
    lora = [p for n, p in result.base_unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    frozen = [p for n, p in result.base_unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    assert result.embedding.rows.dtype == torch.float32
    assert result.embedding.base.weight.dtype == torch.bfloat16
    assert torch.isfinite(load_file(tmp_path / "out" / "learned_embeds.safetensors")[TOKEN]).all()


def test_outputs_files_card_and_config(tiny_sd_path, instance_dir, tmp_path):
    out = tmp_path / "out"
    train(
        tiny_sd_path,
        instance_dir,
        out,
        "--hub_token",
        "hf_secret_never_written",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "2",
        "--report_to",
        "tensorboard",
    )
    assert (out / "samples" / "step-2_0.png").is_file()  # mid-training validation
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    for name in (
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_kohya.safetensors",
        "learned_embeds.safetensors",
        "training_config.json",
        "README.md",
        "samples/final_0.png",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "training_config.json").read_text())
    assert config["clean_prompt_resolved"] == "A sketch of a cat in Paris"
    assert config["personalization_prompt_resolved"] == f"A photo of {TOKEN}"
    assert config["seed"] == 0 and config["lora_alpha"] == 4
    card = (out / "README.md").read_text()
    for text in (
        TARGET,
        "A sketch of a cat in Paris",
        TOKEN,
        tiny_sd_path,
        "load_lora_weights",
        "samples/final_0.png",
        "guidance_scale_pretrained",
    ):
        assert text in card, text
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".safetensors"):
            assert b"hf_secret_never_written" not in path.read_bytes(), path
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("mode", ["dds", "sds", "none"])
def test_accelerate_launch_outputs_load_into_a_fresh_pipeline(tiny_sd_path, instance_dir, tmp_path, mode):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO_ROOT / "train_palp.py"),
        *base_args(tiny_sd_path, instance_dir, out, "--alignment_mode", mode),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"mode={mode}" in done.stderr

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base_image = generate(pipe, TARGET.replace(TOKEN, "a cat"))
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion(out / "learned_embeds.safetensors")
    assert TOKEN in pipe.tokenizer.get_vocab()
    image = generate(pipe, TARGET)
    assert image.shape == (1, 32, 32, 3)
    assert abs(image - base_image).max() > 1e-3


def test_v_prediction_model_trains(tiny_sd_vpred_path, instance_dir, tmp_path):
    result = train(tiny_sd_vpred_path, instance_dir, tmp_path / "out", "--max_train_steps", "2")
    assert result.global_step == 2
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_single_image_subject(tiny_sd_path, tmp_path):
    one = write_instance_images(tmp_path / "one", n=1)
    result = train(tiny_sd_path, str(one), tmp_path / "out", "--max_train_steps", "2", "--train_batch_size", "2")
    assert result.global_step == 2


def test_same_seed_same_result(tiny_sd_path, instance_dir, tmp_path):
    train(tiny_sd_path, instance_dir, tmp_path / "a", "--max_train_steps", "2", "--num_validation_images", "0")
    train(tiny_sd_path, instance_dir, tmp_path / "b", "--max_train_steps", "2", "--num_validation_images", "0")
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_rotation(tiny_sd_path, instance_dir, tmp_path):
    out = tmp_path / "out"
    train(
        tiny_sd_path,
        instance_dir,
        out,
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "2",
        "--num_validation_images",
        "0",
    )
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".checkpoint-*"))


def test_resume_matches_uninterrupted_run(tiny_sd_path, instance_dir, tmp_path):
    common = (
        "--checkpointing_steps",
        "2",
        "--num_validation_images",
        "0",
        "--lr_scheduler",
        "linear",
        "--gradient_accumulation_steps",
        "2",
    )
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_sd_path, instance_dir, full, *common)
    train(tiny_sd_path, instance_dir, resumed, *common)
    # Simulate a run that died after checkpoint-2: drop everything written later, then resume.
    for name in (
        "checkpoint-4",
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_kohya.safetensors",
        "learned_embeds.safetensors",
        "README.md",
        "training_config.json",
    ):
        path = resumed / name
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    saved_step2 = load_file(resumed / "checkpoint-2" / "learned_embeds.safetensors")[TOKEN]
    result = train(tiny_sd_path, instance_dir, resumed, *common, "--resume_from_checkpoint", "latest")
    assert result.global_step == 4
    a = load_file(full / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ea = load_file(full / "learned_embeds.safetensors")[TOKEN]
    eb = load_file(resumed / "learned_embeds.safetensors")[TOKEN]
    assert (ea - eb).abs().max().item() <= 1e-6
    assert (eb - saved_step2).abs().max() > 0  # it really trained after resuming


def test_push_to_hub_uploads_outputs_without_checkpoints(tiny_sd_path, instance_dir, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    class Repo:
        repo_id = "someone/palp-cat"

    def create_repo(repo_id, exist_ok, token):
        calls["create"] = (repo_id, exist_ok, token)
        return Repo()

    def upload_folder(repo_id, folder_path, ignore_patterns, token, **kwargs):
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        calls["uploaded"] = set(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        calls["repo"] = repo_id

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    train(
        tiny_sd_path,
        instance_dir,
        tmp_path / "palp-cat",
        "--push_to_hub",
        "--checkpointing_steps",
        "2",
        "--report_to",
        "tensorboard",
    )
    assert calls["create"] == ("palp-cat", True, None) and calls["repo"] == "someone/palp-cat"
    assert {
        "pytorch_lora_weights.safetensors",
        "learned_embeds.safetensors",
        "README.md",
        "training_config.json",
        "pytorch_lora_weights_kohya.safetensors",
        "samples/final_0.png",
    } <= calls["uploaded"]
    assert not any(f.startswith(("checkpoint-", "logs/")) or "optimizer" in f for f in calls["uploaded"])
    assert TOKEN in calls["card"] and TARGET in calls["card"]


# ------------------------------------------------------------------------------------------------- errors
def _error(model, instance_dir, tmp_path, *extra, replace=None):
    argv = base_args(model, instance_dir, tmp_path / "out", *extra)
    for flag, value in (replace or {}).items():
        argv[argv.index(flag) + 1] = value
    with pytest.raises(SystemExit) as info:
        tp.cli(argv)
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    return str(info.value)


def test_error_missing_instance_folder(tiny_sd_path, tmp_path):
    message = _error(tiny_sd_path, str(tmp_path / "nope"), tmp_path)
    assert "--instance_data_dir" in message and "not a folder" in message


def test_error_instance_folder_without_images(tiny_sd_path, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    message = _error(tiny_sd_path, str(empty), tmp_path)
    assert "--instance_data_dir" in message and "no readable image" in message


def test_unreadable_image_is_skipped_with_a_warning(tmp_path):
    folder = write_instance_images(tmp_path / "mixed", n=2)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        images = tp.load_instance_images(folder)
    assert len(images) == 2 and all(image.mode == "RGB" and image.size == (24, 24) for image in images)
    messages = " ".join(str(w.message) for w in caught)
    assert "broken.png" in messages and "empty.jpg" in messages


def test_images_are_oriented_and_converted_to_rgb(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent → white
    rgba.save(tmp_path / "a.png")
    Image.new("L", (2, 2), 77).save(tmp_path / "b.png")
    exif_rotated = Image.new("RGB", (6, 3), (0, 0, 255))
    exif = exif_rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    exif_rotated.save(tmp_path / "c.jpg", exif=exif)
    a, b, c = tp.load_instance_images(tmp_path)
    assert a.mode == b.mode == c.mode == "RGB"
    assert a.getpixel((0, 0)) == (255, 255, 255) and b.getpixel((0, 0)) == (77, 77, 77)
    assert c.size == (3, 6)


def test_error_token_already_in_vocabulary(tiny_sd_path, instance_dir, tmp_path):
    message = _error(
        tiny_sd_path,
        instance_dir,
        tmp_path,
        replace={"--placeholder_token": "cat", "--target_prompt": "A sketch of cat in Paris"},
    )
    assert "--placeholder_token" in message and "already in the tokenizer" in message


def test_error_target_prompt_without_token(tiny_sd_path, instance_dir, tmp_path):
    message = _error(tiny_sd_path, instance_dir, tmp_path, replace={"--target_prompt": "A sketch of a cat"})
    assert "--target_prompt" in message and TOKEN in message


def test_error_resolution_not_multiple_of_8(tiny_sd_path, instance_dir, tmp_path):
    message = _error(tiny_sd_path, instance_dir, tmp_path, replace={"--resolution": "30"})
    assert "--resolution" in message and "multiple of 8" in message


def test_error_xformers_missing(tiny_sd_path, instance_dir, tmp_path, monkeypatch):
    import diffusers.utils.import_utils as import_utils

    monkeypatch.setattr(import_utils, "is_xformers_available", lambda: False)
    message = _error(tiny_sd_path, instance_dir, tmp_path, "--enable_xformers_memory_efficient_attention")
    assert "--enable_xformers_memory_efficient_attention" in message and "pip install xformers" in message


def test_error_clean_prompt_with_token(tiny_sd_path, instance_dir, tmp_path):
    message = _error(tiny_sd_path, instance_dir, tmp_path, "--clean_prompt", f"A sketch of {TOKEN}")
    assert "--clean_prompt" in message


def test_error_not_a_model_folder(instance_dir, tmp_path):
    bogus = tmp_path / "model"
    bogus.mkdir()
    message = _error(str(bogus), instance_dir, tmp_path)
    assert "--pretrained_model_name_or_path" in message and "diffusers layout" in message


def test_error_finished_output_dir_is_not_overwritten(tiny_sd_path, instance_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"previous run")
    argv = base_args(tiny_sd_path, instance_dir, out)
    with pytest.raises(SystemExit, match="--overwrite_output_dir"):
        tp.cli(argv)
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"previous run"


def test_help_documents_every_flag():
    parser_help = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_palp.py"), "--help"], capture_output=True, text=True, timeout=300
    ).stdout
    for flag in (
        "--alignment_mode",
        "--guidance_scale_pretrained",
        "--guidance_scale_personalized",
        "--alignment_weight",
        "--alignment_noise",
        "--alignment_timestep",
        "--alignment_weighting",
        "--no-rescale",
        "--clean_prompt",
        "--personalization_prompt",
        "--push_to_hub",
        "--resume_from_checkpoint",
        "--mixed_precision",
    ):
        assert flag in parser_help, flag
    assert "(ours" in parser_help and "(paper" in parser_help
