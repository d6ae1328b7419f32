"""Tests of examples/evaluate_palp.py: its numbers against a direct CLIP/DINO computation, on tiny random models."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny_clip_tokenizer, load_example, write_fake_training_output, write_instance_images

TOKEN = "<palp-cat>"


evaluate_palp = load_example("evaluate_palp")


@pytest.fixture(scope="module")
def trained_dir(tiny_sd_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("palp-out")
    write_fake_training_output(tiny_sd_path, out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory):
    """A random CLIP (32×32 images, 8×8 patches) saved like a Hub checkpoint: model, tokenizer, image processor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_tiny_clip_tokenizer()
    common = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            max_position_embeddings=77,
            **common,
        ),
        vision_config=dict(image_size=32, patch_size=8, **common),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dino_path(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    path = tmp_path_factory.mktemp("tiny-dino")
    torch.manual_seed(1)
    config = ViTConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def load_images(paths):
    return [Image.open(p).convert("RGB") for p in paths]


@torch.no_grad()
def direct_clip_cosines(clip_path, images, texts, reference_images):
    """Cosines from CLIPModel.forward (its logits are 100·cos): [images × texts] and [images × references]."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_path).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(clip_path), AutoImageProcessor.from_pretrained(clip_path)
    text_inputs = tokenizer(texts, padding=True, return_tensors="pt")
    out = model(**text_inputs, pixel_values=processor(images=images, return_tensors="pt").pixel_values)
    text_cos = out.logits_per_image / model.logit_scale.exp()
    ref = model(**text_inputs, pixel_values=processor(images=reference_images, return_tensors="pt").pixel_values)
    image_cos = out.image_embeds @ ref.image_embeds.T
    return text_cos, image_cos


@torch.no_grad()
def direct_dino_cosines(dino_path, images, reference_images):
    from transformers import AutoImageProcessor, ViTModel

    model = ViTModel.from_pretrained(dino_path, add_pooling_layer=False).eval()
    processor = AutoImageProcessor.from_pretrained(dino_path)

    def cls(imgs):
        return model(pixel_values=processor(images=imgs, return_tensors="pt").pixel_values).last_hidden_state[:, 0]

    a, b = cls(images), cls(reference_images)
    return torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)


def test_generate_and_score_matches_direct_computation(
    tiny_sd_path, trained_dir, tiny_clip_path, instance_dir, tmp_path
):
    out = tmp_path / "eval"
    args = evaluate_palp.parse_args(
        [
            "--pretrained_model_name_or_path",
            tiny_sd_path,
            "--trained_dir",
            trained_dir,
            "--target_prompt",
            f"a sketch of {TOKEN} in paris",
            "--clean_prompt",
            "a sketch of a cat in paris",
            "--prompt_elements",
            "style=a sketch",
            "class=a cat",
            "paris",
            "--instance_data_dir",
            instance_dir,
            "--clip_model_name_or_path",
            tiny_clip_path,
            "--num_images",
            "3",
            "--seed",
            "7",
            "--num_inference_steps",
            "2",
            "--resolution",
            "32",
            "--device",
            "cpu",
            "--output_dir",
            str(out),
        ]
    )
    evaluate_palp.main(args)
    results = json.loads((out / "metrics.json").read_text())

    generated_paths = [out / "images" / f"seed{s}.png" for s in (7, 8, 9)]
    assert [e["file"] for e in results["per_image"]] == [str(p) for p in generated_paths]
    assert [e["seed"] for e in results["per_image"]] == [7, 8, 9]
    generated = load_images(generated_paths)
    assert all(im.size == (32, 32) for im in generated)
    assert not np.array_equal(np.asarray(generated[0]), np.asarray(generated[1]))
    assert results["learned_tokens"] == [TOKEN]

    instances = load_images(sorted(Path(instance_dir).glob("*.png")))
    texts = ["a sketch of a cat in paris", "a sketch", "a cat", "paris"]
    text_cos, image_cos = direct_clip_cosines(tiny_clip_path, generated, texts, instances)

    metrics = results["metrics"]
    assert metrics["clip_t"] == pytest.approx(text_cos[:, 0].mean().item(), abs=1e-5)
    assert list(metrics["clip_t_elements"]) == ["style", "class", "paris"]
    for j, name in enumerate(["style", "class", "paris"]):
        assert metrics["clip_t_elements"][name] == pytest.approx(text_cos[:, 1 + j].mean().item(), abs=1e-5)
    assert metrics["clip_i"] == pytest.approx(image_cos.mean().item(), abs=1e-5)
    for i, entry in enumerate(results["per_image"]):
        assert entry["clip_t"] == pytest.approx(text_cos[i, 0].item(), abs=1e-5)
        assert entry["clip_i"] == pytest.approx(image_cos[i].mean().item(), abs=1e-5)
    # A random model still gives distinct numbers per text, so a mixed-up column would show.
    assert len({round(v, 6) for v in [metrics["clip_t"], *metrics["clip_t_elements"].values()]}) == 4
    assert metrics["dino"] is None

    markdown = (out / "metrics.md").read_text()
    header, _, row = markdown.splitlines()[:3]
    assert header.split("|")[1:-1] == [
        " run ",
        " images ",
        " CLIP-T (clean) ",
        " CLIP-T style ",
        " CLIP-T class ",
        " CLIP-T paris ",
        " CLIP-I ",
        " DINO ",
    ]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0] == Path(trained_dir).name and cells[1] == "3"
    assert cells[2] == f"{metrics['clip_t']:.4f}" and cells[6] == f"{metrics['clip_i']:.4f}" and cells[7] == "–"


def test_generation_matches_sampling_cli(tiny_sd_path, trained_dir, tiny_clip_path, instance_dir, tmp_path):
    """The evaluated images are the ones a user would get from sample_palp.py with the same settings."""
    sample_palp = load_example("sample_palp")
    prompt = f"a photo of {TOKEN}"
    common = [
        "--pretrained_model_name_or_path",
        tiny_sd_path,
        "--trained_dir",
        trained_dir,
        "--num_inference_steps",
        "2",
        "--resolution",
        "32",
        "--device",
        "cpu",
        "--guidance_scale",
        "3",
        "--negative_prompt",
        "red",
        "--lora_scale",
        "0.7",
    ]
    evaluate_palp.main(
        evaluate_palp.parse_args(
            common
            + [
                "--target_prompt",
                prompt,
                "--clean_prompt",
                "a photo of a cat",
                "--instance_data_dir",
                instance_dir,
                "--clip_model_name_or_path",
                tiny_clip_path,
                "--num_images",
                "1",
                "--seed",
                "3",
                "--output_dir",
                str(tmp_path / "eval"),
            ]
        )
    )
    sample_palp.main(
        sample_palp.parse_args(common + ["--prompts", prompt, "--seeds", "3", "--output_dir", str(tmp_path / "s")])
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "eval" / "images" / "seed3.png")),
        np.asarray(Image.open(tmp_path / "s" / "prompt00_seed3.png")),
    )


def test_image_dir_with_dino_and_two_subjects(tiny_clip_path, tiny_dino_path, tmp_path):
    generated_dir = write_instance_images(tmp_path / "generated", n=4, size=40, seed=3)
    Image.new("RGB", (40, 40), "white").save(generated_dir / "grid.png")  # excluded by --image_glob
    cat_dir = write_instance_images(tmp_path / "cat", n=2, seed=1)
    dog_dir = write_instance_images(tmp_path / "dog", n=3, seed=2)
    out = tmp_path / "eval"
    args = evaluate_palp.parse_args(
        [
            "--image_dir",
            str(generated_dir),
            "--image_glob",
            "subject_*",
            "--clean_prompt",
            "a 19th century portrait of a cat and a dog",
            "--instance_data_dir",
            str(cat_dir),
            "--instance_data_dir",
            str(dog_dir),
            "--clip_model_name_or_path",
            tiny_clip_path,
            "--dino_model_name_or_path",
            tiny_dino_path,
            "--device",
            "cpu",
            "--output_dir",
            str(out),
            "--batch_size",
            "3",
            "--label",
            "palp",
        ]
    )
    evaluate_palp.main(args)
    results = json.loads((out / "metrics.json").read_text())
    metrics = results["metrics"]

    generated = load_images(sorted(generated_dir.glob("subject_*.png")))
    cats, dogs = load_images(sorted(cat_dir.glob("*.png"))), load_images(sorted(dog_dir.glob("*.png")))
    text_cos, image_cos = direct_clip_cosines(tiny_clip_path, generated, [args.clean_prompt], cats + dogs)
    dino_cos = direct_dino_cosines(tiny_dino_path, generated, cats + dogs)

    assert results["num_generated_images"] == 4 and results["generation"] is None
    assert metrics["clip_t"] == pytest.approx(text_cos[:, 0].mean().item(), abs=1e-5)
    # Union of subjects: the mean over all 4 × 5 pairs, not the mean of the two per-subject means.
    assert metrics["clip_i"] == pytest.approx(image_cos.mean().item(), abs=1e-5)
    assert metrics["clip_i_per_subject"][str(cat_dir)] == pytest.approx(image_cos[:, :2].mean().item(), abs=1e-5)
    assert metrics["clip_i_per_subject"][str(dog_dir)] == pytest.approx(image_cos[:, 2:].mean().item(), abs=1e-5)
    assert metrics["dino"] == pytest.approx(dino_cos.mean().item(), abs=1e-5)
    assert metrics["dino_per_subject"][str(dog_dir)] == pytest.approx(dino_cos[:, 2:].mean().item(), abs=1e-5)
    assert metrics["dino"] != pytest.approx(metrics["clip_i"], abs=1e-4)
    row = (out / "metrics.md").read_text().splitlines()[2]
    assert row.startswith("| palp | 4 |") and f"{metrics['dino']:.4f}" in row


def test_definitions_in_help(capsys):
    with pytest.raises(SystemExit):
        evaluate_palp.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "raw cosine" in text and "--clean_prompt" in text and "(generated, instance image) pairs" in text
    assert "openai/clip-vit-base-patch32" in text and "facebook/dino-vits16" in text


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--trained_dir", "{tmp}/missing"], "--trained_dir"),
        (["--trained_dir", "{tmp}"], "--trained_dir"),  # a folder without the LoRA
        (["--trained_dir", "{trained}", "--instance_data_dir", "{tmp}/missing"], "--instance_data_dir"),
        (["--trained_dir", "{trained}", "--instance_data_dir", "{tmp}"], "--instance_data_dir"),  # no images in it
        (["--trained_dir", "{trained}", "--clean_prompt", "a sketch of <palp-cat>"], "--clean_prompt"),
        (["--trained_dir", "{trained}", "--prompt_elements", "style="], "--prompt_elements"),
        (["--image_dir", "{tmp}"], "--image_dir"),  # no images in it
        (["--target_prompt", None], "--target_prompt"),
    ],
)
def test_user_errors_name_the_flag_before_loading(extra, flag, trained_dir, instance_dir, tmp_path):
    values = {
        "--target_prompt": f"a sketch of {TOKEN}",
        "--clean_prompt": "a sketch of a cat",
        "--instance_data_dir": instance_dir,
        # Paths that do not exist: reaching a model loader would raise something else.
        "--pretrained_model_name_or_path": str(tmp_path / "no-model"),
        "--clip_model_name_or_path": str(tmp_path / "no-clip"),
        "--output_dir": str(tmp_path / "out"),
    }
    for name, value in zip(extra[::2], extra[1::2]):
        values[name] = None if value is None else value.format(tmp=tmp_path, trained=trained_dir)
    argv = [item for name, value in values.items() if value is not None for item in (name, value)]
    with pytest.raises(ValueError, match=flag):
        evaluate_palp.main(evaluate_palp.parse_args(argv))
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_target_prompt_without_token_warns(trained_dir, instance_dir, caplog):
    args = evaluate_palp.parse_args(
        [
            "--pretrained_model_name_or_path",
            "unused",
            "--trained_dir",
            trained_dir,
            "--target_prompt",
            "a sketch of cat",
            "--clean_prompt",
            "a sketch of a cat",
            "--instance_data_dir",
            instance_dir,
        ]
    )
    with caplog.at_level(logging.WARNING):
        inputs = evaluate_palp.check_inputs(args)
    assert inputs["tokens"] == [TOKEN]
    assert any("none of the learned tokens" in r.getMessage() for r in caplog.records)


def test_defaults_from_training_config(trained_dir, instance_dir, tmp_path):
    import shutil

    run_dir = shutil.copytree(trained_dir, tmp_path / "run")
    config = {
        "pretrained_model_name_or_path": "/models/sd",
        "instance_data_dir": instance_dir,
        "target_prompt": f"a sketch of {TOKEN} in paris",
        "clean_prompt": None,
        "clean_prompt_resolved": "a sketch of a cat in paris",
    }
    (run_dir / "training_config.json").write_text(json.dumps(config))

    args = evaluate_palp.parse_args(["--trained_dir", str(run_dir)])
    inputs = evaluate_palp.check_inputs(args)
    assert args.pretrained_model_name_or_path == "/models/sd"
    assert args.target_prompt == config["target_prompt"] and args.clean_prompt == "a sketch of a cat in paris"
    assert list(inputs["instance_paths"]) == [instance_dir] and len(inputs["instance_paths"][instance_dir]) == 3

    # Flags given on the command line win.
    args = evaluate_palp.parse_args(["--trained_dir", str(run_dir), "--clean_prompt", "a cat"])
    evaluate_palp.check_inputs(args)
    assert args.clean_prompt == "a cat"

    (run_dir / "training_config.json").unlink()
    with pytest.raises(ValueError, match="--clean_prompt"):
        evaluate_palp.check_inputs(evaluate_palp.parse_args(["--trained_dir", str(run_dir)]))


@pytest.mark.parametrize("base", ["tiny_sd3_path", "tiny_sd3_no_t5_path"], ids=["with-t5", "text_encoder_3=None"])
def test_sd3_run_is_generated_as_sample_palp_samples_it_and_scored(
    base, request, tiny_clip_path, instance_dir, tmp_path
):
    """An SD3 output (LoRA on the transformer, {"clip_l", "clip_g"} token file) is evaluated on the images
    sample_palp.py gives for the same settings, the LoRA scale reaching the transformer; the scores are the direct
    CLIP cosines."""
    sample_palp = load_example("sample_palp")
    base_path = request.getfixturevalue(base)
    trained = tmp_path / "trained"
    write_fake_training_output(base_path, trained)
    prompt = f"a photo of {TOKEN}"
    common = ["--pretrained_model_name_or_path", base_path, "--trained_dir", str(trained), "--num_inference_steps",
              "2", "--resolution", "32", "--device", "cpu", "--guidance_scale", "3"]  # fmt: skip
    evaluation = ["--target_prompt", prompt, "--clean_prompt", "a photo of a cat", "--instance_data_dir", instance_dir,
                  "--clip_model_name_or_path", tiny_clip_path, "--num_images", "2", "--seed", "3"]  # fmt: skip
    results = evaluate_palp.main(evaluate_palp.parse_args(common + evaluation + ["--output_dir", str(tmp_path / "e")]))
    sample_palp.main(
        sample_palp.parse_args(
            common + ["--prompts", prompt, "--seeds", "3", "4", "--output_dir", str(tmp_path / "s")]
        )
    )
    generated = load_images([tmp_path / "e" / "images" / f"seed{seed}.png" for seed in (3, 4)])
    for seed, image in zip((3, 4), generated):
        assert image.size == (32, 32)
        np.testing.assert_array_equal(
            np.asarray(image), np.asarray(Image.open(tmp_path / "s" / f"prompt00_seed{seed}.png"))
        )
    assert results["learned_tokens"] == [TOKEN]
    instances = load_images(sorted(Path(instance_dir).glob("*.png")))
    text_cos, image_cos = direct_clip_cosines(tiny_clip_path, generated, ["a photo of a cat"], instances)
    assert results["metrics"]["clip_t"] == pytest.approx(text_cos[:, 0].mean().item(), abs=1e-5)
    assert results["metrics"]["clip_i"] == pytest.approx(image_cos.mean().item(), abs=1e-5)

    # --lora_scale reaches the transformer: scale 0 gives other images than scale 1.
    scale0 = evaluate_palp.main(
        evaluate_palp.parse_args(common + evaluation + ["--lora_scale", "0", "--output_dir", str(tmp_path / "e0")])
    )
    assert scale0["metrics"]["clip_i"] != results["metrics"]["clip_i"]
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "e0" / "images" / "seed3.png")), np.asarray(generated[0])
    )
