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
        # One token vector and the paper's λ: what every test here was written for (train_palp.py's defaults are
        # 4 and 0.1, tested in test_multi_vector.py).
        "--num_vectors",
        "1",
        "--alignment_weight",
        "1",
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
        f'from_pretrained("{Path(tiny_sd_path).name}"',
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


def _fake_hub(monkeypatch):
    """create_repo and upload_folder replaced by recorders of what would be uploaded (file names and contents)."""
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "someone/palp-cat"

    def create_repo(repo_id, exist_ok, token):
        calls["create"] = (repo_id, exist_ok, token)
        return Repo()

    def upload_folder(repo_id, folder_path, token, **kwargs):
        folder = Path(folder_path)
        calls["files"] = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls["repo"], calls["kwargs"] = repo_id, kwargs

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def check_uploaded_card_and_config(files, local_paths):
    """The card's metadata is valid for the Hub (parsed by huggingface_hub, base_model absent or a repo id) and no
    uploaded text file holds a local path of the training machine."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    card = ModelCard(files["README.md"].decode())
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "diffusers" and "palp" in metadata["tags"]
    if "base_model" in metadata:
        validate_repo_id(metadata["base_model"])
    config = json.loads(files["training_config.json"])
    for name, content in files.items():
        if name.endswith((".json", ".md")):
            for path in local_paths:
                assert str(path).encode() not in content, (name, path)
    return metadata, config


def test_push_to_hub_uploads_outputs_without_checkpoints_logs_or_local_paths(
    tiny_sd_path, instance_dir, tmp_path, monkeypatch
):
    calls = _fake_hub(monkeypatch)
    out = tmp_path / "palp-cat"
    train(tiny_sd_path, instance_dir, out, "--push_to_hub", "--checkpointing_steps", "2", "--report_to",
          "tensorboard", "--logging_dir", "runs/tb")  # fmt: skip
    assert list((out / "runs" / "tb").rglob("events.out.tfevents.*"))  # the logs are there locally...
    uploaded = set(calls["files"])
    assert calls["create"] == ("palp-cat", True, None) and calls["repo"] == "someone/palp-cat"
    assert {
        "pytorch_lora_weights.safetensors",
        "learned_embeds.safetensors",
        "README.md",
        "training_config.json",
        "pytorch_lora_weights_kohya.safetensors",
        "samples/final_0.png",
    } <= uploaded
    assert not any(f.startswith(("checkpoint-", "runs/")) or "optimizer" in f or "tfevents" in f for f in uploaded)
    assert (out / tp.LOCK_NAME).is_file() and tp.LOCK_NAME not in uploaded
    metadata, config = check_uploaded_card_and_config(calls["files"], [tiny_sd_path, instance_dir, tmp_path])
    assert "base_model" not in metadata  # a local folder that records no Hub id
    assert config["pretrained_model_name_or_path"] == Path(tiny_sd_path).name
    assert config["instance_data_dir"] == Path(instance_dir).name
    local = json.loads((out / "training_config.json").read_text())
    assert local["pretrained_model_name_or_path"] == tiny_sd_path  # the local copy keeps what sample_palp reads
    card = calls["files"]["README.md"].decode()
    assert TOKEN in card and TARGET in card


def test_card_base_model_is_a_hub_id_or_nothing(tmp_path):
    assert tp.hub_base_model("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    snapshot = tmp_path / "hub" / "models--someone--sd-model" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert tp.hub_base_model(str(snapshot)) == "someone/sd-model"
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "model_index.json").write_text(json.dumps({"_name_or_path": "owner/base"}))
    assert tp.hub_base_model(str(recorded)) == "owner/base"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert tp.hub_base_model(str(plain)) is None
    from huggingface_hub import ModelCard

    for base in (None, "owner/base"):
        card = ModelCard(tp.card_metadata(base, "A photo of <t>", tp.TextConditioner.card_tags) + "\n\n# x\n")
        assert card.data.to_dict().get("base_model") == base
        assert card.data.to_dict()["instance_prompt"] == "A photo of <t>"


def test_card_says_what_to_type_in_webuis(tiny_sd_path, instance_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd_path, instance_dir, out, "--max_train_steps", "1", "--num_validation_images", "0")
    card = (out / "README.md").read_text()
    assert "`A sketch of learned_embeds in Paris <lora:pytorch_lora_weights_kohya:1>`" in card
    assert "`A sketch of embedding:learned_embeds in Paris`" in card


def _unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, cond = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=cond).sample


def test_saved_lora_gives_the_same_model_to_loaders_that_ignore_its_alpha(tiny_sd_path, instance_dir, tmp_path):
    """--lora_alpha 8 with --rank 4: diffusers (reading the metadata), a loader assuming alpha = rank, and the kohya
    file all give the trained UNet."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    out = tmp_path / "out"
    run = train(tiny_sd_path, instance_dir, out, "--lora_alpha", "8", "--max_train_steps", "2",
                "--num_validation_images", "0", "--checkpointing_steps", "1")  # fmt: skip
    assert run.lora_config.lora_alpha == 8
    trained = _unet_output(run.base_unet)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base = _unet_output(pipe.unet)
    pipe.load_lora_weights(out)
    via_diffusers = _unet_output(pipe.unet)

    naive = StableDiffusionPipeline.from_pretrained(tiny_sd_path).unet  # alpha = rank, metadata never read
    naive.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=tp.LORA_TARGET_MODULES))
    state = load_file(out / "pytorch_lora_weights.safetensors")
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert not set_peft_model_state_dict(naive, state, adapter_name="default").unexpected_keys
    via_naive = _unet_output(naive)

    assert (trained - base).abs().max() > 1e-4  # the LoRA has an effect to get right
    torch.testing.assert_close(via_diffusers, trained, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(via_naive, trained, atol=1e-5, rtol=1e-4)
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    up = {k: v for k, v in kohya.items() if k.endswith("lora_up.weight")}
    diffusers_up = {k: v for k, v in load_file(out / "pytorch_lora_weights.safetensors").items() if "lora.up" in k or "lora_B" in k}
    assert len(up) == len(diffusers_up) and sorted(v.norm().item() for v in up.values()) == pytest.approx(
        sorted(v.norm().item() for v in diffusers_up.values())
    )
    # Checkpoints keep the raw weights and the true alpha, so a resume continues from exactly the trained state.
    raw = load_file(out / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert max((2 * raw[k] - load_file(out / "pytorch_lora_weights.safetensors")[k]).abs().max().item()
               for k in raw if "lora.up" in k or "lora_B" in k) < 1e-6  # fmt: skip


def test_zero_is_a_value_for_the_embedding_learning_rate_and_lora_alpha(tiny_sd_path, instance_dir, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    run = train(tiny_sd_path, instance_dir, tmp_path / "frozen", "--embedding_learning_rate", "0",
                "--max_train_steps", "2", "--num_validation_images", "0")  # fmt: skip
    assert [group["lr"] for group in run.optimizer.param_groups] == [1e-3, 0.0]
    base = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").get_input_embeddings().weight
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    init = base[tokenizer.encode("cat", add_special_tokens=False)].mean(0)
    assert torch.equal(load_file(tmp_path / "frozen" / "learned_embeds.safetensors")[TOKEN][0], init)

    run = train(tiny_sd_path, instance_dir, tmp_path / "no-lora", "--lora_alpha", "0", "--max_train_steps", "1",
                "--num_validation_images", "0")  # fmt: skip
    assert run.lora_config.lora_alpha == 0
    assert json.loads((tmp_path / "no-lora" / "training_config.json").read_text())["lora_alpha"] == 0


def test_bare_checkpoint_name_resolves_against_the_output_dir(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert tp.resolve_checkpoint(out, "checkpoint-2") == out / "checkpoint-2"
    assert tp.resolve_checkpoint(out, str(out / "checkpoint-2")) == out / "checkpoint-2"  # a full path still works
    with pytest.raises(tp.UserInputError, match="--resume_from_checkpoint 'checkpoint-3'"):
        tp.resolve_checkpoint(out, "checkpoint-3")


def test_logged_loss_is_the_mean_over_accumulation_steps(tiny_sd_path, instance_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append((step, values)))
    original = tp.training_step

    def known_losses(run, micro_step):
        original(run, micro_step)
        return tuple(torch.tensor(float(10 * micro_step + k)) for k in range(3))

    monkeypatch.setattr(tp, "training_step", known_losses)
    train(tiny_sd_path, instance_dir, tmp_path / "out", "--gradient_accumulation_steps", "2",
          "--max_train_steps", "2", "--num_validation_images", "0")  # fmt: skip
    losses = [(step, values["loss"], values["loss_pers"], values["loss_align"]) for step, values in logged]
    assert losses == [(1, 5.0, 6.0, 7.0), (2, 25.0, 26.0, 27.0)]  # micro-steps (0, 1) and (2, 3)


def test_lora_dropout_run_resumes_bit_exact(tiny_sd_path, instance_dir, tmp_path):
    common = ("--checkpointing_steps", "2", "--num_validation_images", "0", "--lora_dropout", "0.5")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_sd_path, instance_dir, full, *common)
    train(tiny_sd_path, instance_dir, resumed, *common, "--max_train_steps", "2")
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    train(tiny_sd_path, instance_dir, resumed, *common, "--resume_from_checkpoint", "checkpoint-2")
    a = load_file(full / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_8bit_adam_checkpoints_its_quantized_state_and_resumes_bit_exact(tiny_sd_path, instance_dir, tmp_path):
    """--use_8bit_adam runs bitsandbytes' AdamW8bit (its CPU backend here). At rank 128 the tiny UNet's 32-wide LoRA
    matrices have 4096 elements, enough for 8-bit state; the 16-wide ones and the token row keep 32-bit state. A
    checkpoint holds both kinds (uint8 moments with their quantization maps and absmax blocks), and a run resumed from
    it ends with the weights and the optimizer state of the uninterrupted run, bit for bit."""
    import bitsandbytes as bnb

    common = ("--use_8bit_adam", "--rank", "128", "--checkpointing_steps", "2", "--num_validation_images", "0")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run = train(tiny_sd_path, instance_dir, full, *common)
    assert isinstance(run.optimizer.optimizer, bnb.optim.AdamW8bit)
    train(tiny_sd_path, instance_dir, resumed, *common, "--max_train_steps", "2")
    state = load_file(resumed / "checkpoint-2" / "optimizer.safetensors")
    eight_bit = {name.split(".")[0] for name, value in state.items() if value.dtype == torch.uint8}
    thirty_two_bit = {name.split(".")[0] for name, value in state.items() if name.endswith(".state1")} - eight_bit
    assert eight_bit and thirty_two_bit
    for param_id in eight_bit:
        quant = {name.rsplit(".", 1)[1]: value for name, value in state.items() if name.startswith(f"{param_id}.")}
        assert {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"} <= quant.keys()
        assert quant["qmap1"].shape == (256,) and quant["absmax1"].abs().max() > 0  # a real map, a real moment
    saved_step2 = load_file(resumed / "checkpoint-2" / "learned_embeds.safetensors")[TOKEN]
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    train(tiny_sd_path, instance_dir, resumed, *common, "--resume_from_checkpoint", "checkpoint-2")
    compared = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "checkpoint-4/optimizer.safetensors")
    for name in compared:
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(load_file(resumed / "learned_embeds.safetensors")[TOKEN], saved_step2)


def test_gradient_checkpointing_reaches_the_text_encoder(tiny_sd_path, instance_dir, tmp_path, monkeypatch):
    """transformers checkpoints a layer only in training mode: with the flag, the first encoder layer runs again in
    the backward pass (recomputation), once per step on top of its forward."""
    calls = []
    original = tp.training_step

    def counted(run, micro_step):
        layer = next(m for m in run.base_text_encoder.modules() if type(m).__name__ == "CLIPEncoderLayer")
        # A pre-hook inside the layer: the recomputation runs the layer's forward (not its hooks) and may stop early.
        handle = layer.layer_norm1.register_forward_pre_hook(lambda *a: calls.append(micro_step))
        try:
            return original(run, micro_step)
        finally:
            handle.remove()

    monkeypatch.setattr(tp, "training_step", counted)
    run = train(tiny_sd_path, instance_dir, tmp_path / "out", "--gradient_checkpointing", "--max_train_steps", "2",
                "--num_validation_images", "0")  # fmt: skip
    assert calls == [0, 0, 1, 1]
    assert run.base_unet.is_gradient_checkpointing


def dataset_argv(model, dataset, output_dir, *extra):
    """base_args with --dataset_name in place of --instance_data_dir; one step, no validation."""
    argv = base_args(model, "unused", output_dir, "--max_train_steps", "1", "--num_validation_images", "0", *extra)
    return argv[:2] + ["--dataset_name", str(dataset)] + argv[4:]


def pixels(images):
    import numpy as np

    return [np.asarray(image) for image in images]


def test_dataset_name_reads_a_local_image_folder(tiny_sd_path, tmp_path):
    """A local folder of images is what `datasets.load_dataset` reads as an `imagefolder` dataset: its `image` column
    holds the photos, pixel for pixel, and a run trains on them."""
    from PIL import Image

    folder = write_instance_images(tmp_path / "imagefolder", n=2)
    cache = str(tmp_path / "cache")
    photos = [Image.open(path) for path in sorted(folder.glob("*.png"))]
    loaded = tp.load_dataset_images(str(folder), None, "image", cache)
    assert len(loaded) == 2 and all((a == b).all() for a, b in zip(pixels(loaded), pixels(photos)))
    run = tp.main(tp.parse_args(dataset_argv(tiny_sd_path, folder, tmp_path / "out", "--cache_dir", cache)))
    assert run.global_step == 1 and (tmp_path / "out" / "learned_embeds.safetensors").is_file()
    with pytest.raises(tp.UserInputError, match=r"--image_column 'pixels' is not a column .*\['image'\]"):
        tp.load_dataset_images(str(folder), None, "pixels", cache)
    with pytest.raises(tp.UserInputError, match="--dataset_name .* was not found"):
        tp.load_dataset_images(str(tmp_path / "nope"), None, "image", cache)


def test_dataset_name_reads_a_folder_written_by_save_to_disk(tiny_sd_path, tmp_path):
    """A Dataset saved with `save_to_disk` (here with a `picture` column) is read with `datasets.load_from_disk`; a
    DatasetDict gives its train split; a run trains on it."""
    import datasets
    from PIL import Image

    def photos(seed):
        folder = write_instance_images(tmp_path / f"photos-{seed}", n=2, seed=seed)
        return [Image.open(path) for path in sorted(folder.glob("*.png"))]

    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})

    def dataset(images):
        return datasets.Dataset.from_dict({"picture": images, "caption": ["a cat"] * len(images)}, features=features)

    train_photos, test_photos = photos(0), photos(1)
    dataset(train_photos).save_to_disk(tmp_path / "saved")
    both_splits = datasets.DatasetDict({"test": dataset(test_photos), "train": dataset(train_photos)})
    both_splits.save_to_disk(tmp_path / "dict")
    datasets.DatasetDict({"test": dataset(test_photos)}).save_to_disk(tmp_path / "no-train")
    for name in ("saved", "dict"):
        loaded = tp.load_dataset_images(str(tmp_path / name), None, "picture", None)
        assert len(loaded) == 2 and all((a == b).all() for a, b in zip(pixels(loaded), pixels(train_photos))), name
    with pytest.raises(tp.UserInputError, match=r"has no 'train' split: \['test'\]"):
        tp.load_dataset_images(str(tmp_path / "no-train"), None, "picture", None)
    with pytest.raises(tp.UserInputError, match="--dataset_config_name does not apply"):
        tp.load_dataset_images(str(tmp_path / "saved"), "default", "picture", None)
    run = tp.main(tp.parse_args(dataset_argv(tiny_sd_path, tmp_path / "saved", tmp_path / "out", "--image_column",
                                             "picture")))  # fmt: skip
    assert run.global_step == 1 and (tmp_path / "out" / "learned_embeds.safetensors").is_file()


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


@pytest.mark.parametrize(
    "package, flags",
    [("bitsandbytes", ["--use_8bit_adam"]), ("datasets", ["--dataset_name", "imagefolder"])],
)
def test_error_optional_package_missing(tiny_sd_path, instance_dir, tmp_path, monkeypatch, package, flags):
    """The optional packages are needed only by their flag; without them the run stops before anything is loaded."""
    monkeypatch.setitem(sys.modules, package, None)  # what an uninstalled package looks like to the import system
    argv = base_args(tiny_sd_path, instance_dir, tmp_path / "out", *flags)
    if package == "datasets":
        argv = argv[:2] + argv[4:]  # --dataset_name replaces --instance_data_dir
    with pytest.raises(SystemExit) as info:
        tp.cli(argv)
    assert f"{flags[0]} needs the '{package}' package: `pip install {package}`" in str(info.value)
    assert not (tmp_path / "out").exists()


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


def test_logged_loss_is_averaged_over_processes_too():
    class TwoProcesses:
        num_processes = 2

        def reduce(self, tensor, reduction):
            assert reduction == "mean"
            return (tensor + torch.tensor([3.0, 5.0, 7.0])) / 2  # the other rank's step mean

    steps = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 4.0, 5.0])]
    assert tp.mean_step_losses(TwoProcesses(), steps) == [2.5, 4.0, 5.5]


def test_a_failed_upload_does_not_leave_the_other_processes_at_the_barrier(monkeypatch):
    """The main process meets the final barrier even when writing or uploading the outputs fails, so the other ranks
    are released (and exit) instead of waiting there for the collective timeout."""
    calls = []

    class Accelerator:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            calls.append("barrier")

        def end_training(self):
            calls.append("end")

    def failing_upload(run):
        calls.append("save")
        raise RuntimeError("the Hub refused the upload")

    monkeypatch.setattr(tp, "train_loop", lambda run: calls.append("train"))
    monkeypatch.setattr(tp, "save_outputs", failing_upload)
    run = type("Run", (), {"accelerator": Accelerator(), "trainable": []})()
    with pytest.raises(RuntimeError, match="refused"):
        tp.train_and_save(run)
    assert calls == ["train", "barrier", "save", "barrier"]
