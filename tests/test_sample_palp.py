"""Tests of examples/sample_palp.py on the tiny offline pipeline with a hand-made training output."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, load_example, write_fake_training_output

TOKEN = "<palp-cat>"


sample_palp = load_example("sample_palp")


@pytest.fixture(scope="module")
def trained(tiny_sd_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("palp-out")
    row = write_fake_training_output(tiny_sd_path, out)
    return str(out), row


def run(base, out_dir, *extra):
    args = sample_palp.parse_args(
        [
            "--pretrained_model_name_or_path",
            base,
            "--output_dir",
            str(out_dir),
            "--resolution",
            "32",
            "--num_inference_steps",
            "2",
            "--device",
            "cpu",
            *extra,
        ]
    )
    return sample_palp.main(args)


def pixels(path):
    return np.asarray(Image.open(path))


def test_grid_files_and_reproducibility(tiny_sd_path, trained, tmp_path):
    trained_dir, _ = trained
    prompts = [f"a sketch of {TOKEN} in paris", f"a photo of {TOKEN}"]
    rows = run(
        tiny_sd_path,
        tmp_path / "a",
        "--trained_dir",
        trained_dir,
        "--prompts",
        *prompts,
        "--seeds",
        "0",
        "1",
        "2",
        "--batch_size",
        "2",
    )

    out = tmp_path / "a"
    names = sorted(p.name for p in out.glob("prompt*.png"))
    assert names == [f"prompt{i:02d}_seed{s}.png" for i in range(2) for s in range(3)]
    for name in names:
        assert Image.open(out / name).size == (32, 32)
    grid = pixels(out / "grid.png")
    assert grid.shape == (2 * 32, 3 * 32, 3)
    # Row = prompt, column = seed.
    np.testing.assert_array_equal(grid[32:64, 64:96], pixels(out / "prompt01_seed2.png"))
    np.testing.assert_array_equal(pixels(out / "prompt00_seed1.png"), np.asarray(rows[0][1]))

    config = json.loads((out / "sampling_config.json").read_text())
    assert config["prompts"] == prompts and config["seeds"] == [0, 1, 2]
    assert config["learned_tokens"] == [TOKEN]
    assert len(config["images"]) == 6

    # Seeds give different images; the same seed in another run (batched differently) gives the same pixels.
    assert not np.array_equal(pixels(out / "prompt00_seed0.png"), pixels(out / "prompt00_seed1.png"))
    run(tiny_sd_path, tmp_path / "b", "--trained_dir", trained_dir, "--prompts", prompts[0], "--seeds", "1")
    np.testing.assert_allclose(
        pixels(tmp_path / "b" / "prompt00_seed1.png").astype(int),
        pixels(out / "prompt00_seed1.png").astype(int),
        atol=1,
    )
    # Same settings, same seed: the very same pixels.
    run(tiny_sd_path, tmp_path / "c", "--trained_dir", trained_dir, "--prompts", prompts[0], "--seeds", "1")
    np.testing.assert_array_equal(
        pixels(tmp_path / "c" / "prompt00_seed1.png"), pixels(tmp_path / "b" / "prompt00_seed1.png")
    )


def test_lora_scale(tiny_sd_path, trained, tmp_path):
    trained_dir, _ = trained
    # No learned token in the prompt, so only the LoRA separates the two models.
    common = ["--prompts", "a photo of cat", "--seeds", "5"]
    base = np.asarray(run(tiny_sd_path, tmp_path / "base", *common)[0][0])
    scale0 = np.asarray(
        run(tiny_sd_path, tmp_path / "s0", "--trained_dir", trained_dir, "--lora_scale", "0", *common)[0][0]
    )
    scale1 = np.asarray(run(tiny_sd_path, tmp_path / "s1", "--trained_dir", trained_dir, *common)[0][0])
    half = np.asarray(
        run(tiny_sd_path, tmp_path / "s05", "--trained_dir", trained_dir, "--lora_scale", "0.5", *common)[0][0]
    )
    np.testing.assert_array_equal(scale0, base)
    assert np.abs(scale1.astype(int) - base.astype(int)).max() > 10
    assert (
        0 < np.abs(half.astype(int) - base.astype(int)).mean() < np.abs(scale1.astype(int) - base.astype(int)).mean()
    )


def test_loads_lora_and_embedding(tiny_sd_path, trained):
    trained_dir, row = trained
    lora_path, embedding_paths = sample_palp.find_trained_weights(trained_dir, "pytorch_lora_weights.safetensors", [])
    pipe = sample_palp.load_pipeline(tiny_sd_path, lora_path, embedding_paths, "cpu", torch.float32)
    token_id = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
    # One token, not spelled out letter by letter.
    assert pipe.tokenizer(f"a photo of {TOKEN}").input_ids[4] == token_id
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id], row)
    assert "palp" in pipe.unet.peft_config


def test_finds_every_embedding_file(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    save_file({"<v1>": torch.zeros(1, 32)}, tmp_path / "learned_embeds_cat.safetensors")
    save_file({"<v2>": torch.zeros(1, 32)}, tmp_path / "learned_embeds_dog.safetensors")
    extra = tmp_path / "elsewhere.safetensors"
    save_file({"<v3>": torch.zeros(1, 32)}, extra)
    lora, embeddings = sample_palp.find_trained_weights(
        str(tmp_path), "pytorch_lora_weights.safetensors", [str(extra)]
    )
    assert lora == tmp_path / "pytorch_lora_weights.safetensors"
    assert [sample_palp.read_embedding_token(p) for p in embeddings] == ["<v1>", "<v2>", "<v3>"]

    args = sample_palp.parse_args(
        [
            "--pretrained_model_name_or_path",
            "unused",
            "--trained_dir",
            str(tmp_path),
            "--embedding",
            str(tmp_path / "learned_embeds_cat.safetensors"),
            "--prompts",
            "a photo of <v1>",
        ]
    )
    with pytest.raises(ValueError, match="more than one embedding file"):
        sample_palp.check_inputs(args)


def test_prompt_without_learned_token_warns(trained, caplog):
    trained_dir, _ = trained
    args = sample_palp.parse_args(
        [
            "--pretrained_model_name_or_path",
            "unused",
            "--trained_dir",
            trained_dir,
            "--prompts",
            f"a sketch of {TOKEN} in paris",
            "a sketch of cat in paris",
            "a sketch of <palp-kat> in paris",
        ]
    )
    with caplog.at_level(logging.WARNING):
        prompts, _, _, tokens = sample_palp.check_inputs(args)
    assert tokens == [TOKEN] and len(prompts) == 3
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not any("Prompt 0" in m for m in messages)
    assert any("Prompt 1" in m and "none of the learned tokens" in m for m in messages)
    assert any("Prompt 2" in m and "<palp-kat>" in m and "not a learned token" in m for m in messages)


@pytest.mark.parametrize(
    "make_extra, flag",
    [
        (lambda tmp, trained_dir: ["--trained_dir", str(tmp / "missing")], "--trained_dir"),
        (lambda tmp, trained_dir: ["--trained_dir", str(tmp)], "--trained_dir"),  # a folder without the LoRA
        (
            lambda tmp, trained_dir: ["--trained_dir", trained_dir, "--embedding", str(tmp / "nope.safetensors")],
            "--embedding",
        ),
        (lambda tmp, trained_dir: ["--prompt_file", str(tmp / "prompts.txt")], "--prompt_file"),
        (lambda tmp, trained_dir: ["--prompts", "a", "--seeds", "1", "1"], "--seeds"),
    ],
)
def test_user_errors_name_the_flag_before_loading(make_extra, flag, trained, tmp_path):
    trained_dir, _ = trained
    extra = make_extra(tmp_path, trained_dir)
    if "--prompts" not in extra and "--prompt_file" not in extra:
        extra += ["--prompts", "a photo of cat"]
    # A base model path that does not exist: reaching the model loader would raise something else.
    args = sample_palp.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "no-model"), *extra])
    with pytest.raises(ValueError, match=flag):
        sample_palp.main(args)


def test_no_prompts_is_an_error(tmp_path):
    args = sample_palp.parse_args(["--pretrained_model_name_or_path", str(tmp_path)])
    with pytest.raises(ValueError, match="--prompts"):
        sample_palp.main(args)


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of cat\n\n  a sketch of dog  \n")
    assert sample_palp.read_prompts(["first"], str(path)) == ["first", "a photo of cat", "a sketch of dog"]


def test_cli_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "sample_palp.py"), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "--guidance_scale",
        "--num_inference_steps",
        "--negative_prompt",
        "--lora_scale",
        "--seeds",
        "--dtype",
    ):
        assert flag in result.stdout


def test_defaults_from_training_config(trained, tmp_path):
    import shutil

    trained_dir = shutil.copytree(trained[0], tmp_path / "run")
    config = {"pretrained_model_name_or_path": "/models/sd", "target_prompt": f"a sketch of {TOKEN} in paris"}
    (trained_dir / "training_config.json").write_text(json.dumps(config))

    args = sample_palp.parse_args(["--trained_dir", str(trained_dir)])
    prompts, _, _, _ = sample_palp.check_inputs(args)
    assert args.pretrained_model_name_or_path == "/models/sd" and prompts == [config["target_prompt"]]

    # Flags given on the command line win.
    args = sample_palp.parse_args(
        ["--trained_dir", str(trained_dir), "--pretrained_model_name_or_path", "other", "--prompts", "a photo of cat"]
    )
    prompts, _, _, _ = sample_palp.check_inputs(args)
    assert args.pretrained_model_name_or_path == "other" and prompts == ["a photo of cat"]

    (trained_dir / "training_config.json").unlink()
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path"):
        sample_palp.check_inputs(sample_palp.parse_args(["--trained_dir", str(trained_dir)]))


@pytest.fixture(scope="module")
def trained_sd3(tiny_sd3_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("palp-sd3-out")
    state = write_fake_training_output(tiny_sd3_path, out)
    return str(out), state


def test_sd3_loads_the_lora_and_the_token_as_the_model_card_does(tiny_sd3_path, trained_sd3):
    """SD3's pipeline has no load_textual_inversion: the token goes into both CLIP tokenizers and encoders, with the
    very rows and ids the model card's lines (train_palp.py's SD3TextConditioner.load_code) give."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    import train_palp as tp

    trained_dir, state = trained_sd3
    lora_path, embedding_paths = sample_palp.find_trained_weights(trained_dir, "pytorch_lora_weights.safetensors", [])
    pipe = sample_palp.load_pipeline(tiny_sd3_path, lora_path, embedding_paths, "cpu", torch.float32)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is not None
    assert "palp" in pipe.transformer.peft_config

    card_pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    card_lines = tp.SD3TextConditioner([]).load_code("repo", [("learned_embeds.safetensors", TOKEN)]).splitlines()
    exec("\n".join(card_lines[2:]), {"pipe": card_pipe, "state": load_file(embedding_paths[0])})
    for key, encoder, tokenizer, card_encoder, card_tokenizer in (
        ("clip_l", pipe.text_encoder, pipe.tokenizer, card_pipe.text_encoder, card_pipe.tokenizer),
        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2, card_pipe.text_encoder_2, card_pipe.tokenizer_2),
    ):
        token_id = tokenizer.convert_tokens_to_ids(TOKEN)
        assert (
            token_id == card_tokenizer.convert_tokens_to_ids(TOKEN)
            and tokenizer(f"a photo of {TOKEN}").input_ids[4] == token_id
        )
        torch.testing.assert_close(encoder.get_input_embeddings().weight[token_id], state[key][0])
        torch.testing.assert_close(encoder.get_input_embeddings().weight, card_encoder.get_input_embeddings().weight)
    assert TOKEN not in pipe.tokenizer_3.get_vocab()  # T5 reads it as plain text, as in training


@pytest.mark.parametrize("base", ["tiny_sd3_path", "tiny_sd3_no_t5_path"], ids=["with-t5", "text_encoder_3=None"])
def test_sd3_samples_and_the_lora_and_the_token_change_the_image(base, request, tmp_path, tmp_path_factory):
    base_path = request.getfixturevalue(base)
    trained_dir = str(tmp_path_factory.mktemp("palp-sd3"))
    write_fake_training_output(base_path, trained_dir)
    prompt = ["--prompts", f"a photo of {TOKEN}", "--seeds", "4"]
    rows = run(base_path, tmp_path / "trained", "--trained_dir", trained_dir, *prompt)
    assert Image.open(tmp_path / "trained" / "prompt00_seed4.png").size == (32, 32)
    assert pixels(tmp_path / "trained" / "grid.png").shape == (32, 32, 3)
    trained = np.asarray(rows[0][0]).astype(int)
    token_only = np.asarray(
        run(base_path, tmp_path / "s0", "--trained_dir", trained_dir, "--lora_scale", "0", *prompt)[0][0]
    ).astype(int)
    base_image = np.asarray(run(base_path, tmp_path / "base", *prompt)[0][0]).astype(int)
    # The LoRA changes the image (scale 1 vs 0, same token), and so does the token (the base spells it out).
    assert np.abs(trained - token_only).max() > 10
    assert np.abs(token_only - base_image).max() > 0
    # Without the token in the prompt, LoRA scale 0 is the base model exactly.
    common = ["--prompts", "a photo of cat", "--seeds", "4"]
    np.testing.assert_array_equal(
        np.asarray(run(base_path, tmp_path / "c0", "--trained_dir", trained_dir, "--lora_scale", "0", *common)[0][0]),
        np.asarray(run(base_path, tmp_path / "cb", *common)[0][0]),
    )


def test_embedding_of_another_family_is_refused_with_the_file_named(tiny_sd_path, tiny_sd3_path, tmp_path):
    from safetensors.torch import save_file

    one_row = tmp_path / "sd1.safetensors"
    save_file({TOKEN: torch.zeros(1, 32)}, one_row)
    with pytest.raises(ValueError, match=r"sd1\.safetensors.*SD3 model needs"):
        sample_palp.load_pipeline(tiny_sd3_path, None, [one_row], "cpu", torch.float32)
    two_rows = tmp_path / "sd3.safetensors"
    save_file({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 16)}, two_rows)
    with pytest.raises(ValueError, match=r"sd3\.safetensors.*SDXL or SD3 base model"):
        sample_palp.load_pipeline(tiny_sd_path, None, [two_rows], "cpu", torch.float32)
