"""The shapes world: its captions, the shipped pre-trained model, train_palp.py on it, and the probe."""

import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

WORLD_DIR = REPO_ROOT / "examples" / "shapes_world"
if str(WORLD_DIR) not in sys.path:
    sys.path.insert(0, str(WORLD_DIR))

import world  # noqa: E402

MODEL = WORLD_DIR / "model"
PROBE = WORLD_DIR / "probe"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_full_captions_name_exactly_the_scene_attributes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = world.random_scene(rng)
        parsed = world.parse_caption(world.caption(scene))
        expected = {k: scene[k] for k in ("style", "shape", "colour", "background")}
        if scene["pattern"] != "plain":
            expected["pattern"] = scene["pattern"]
        if scene["companion"] != "none":
            expected["companion"] = scene["companion"]
        if scene["night"]:
            expected["night"] = "night"
        assert parsed == expected, world.caption(scene)


def test_captions_with_dropped_words_never_contradict_the_scene():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = world.random_scene(rng)
        text = world.caption(scene, rng, p_drop_colour=0.5, p_drop_pattern=0.5, p_drop_background=0.5)
        labels = {**scene, "night": "night" if scene["night"] else "day"}
        for key, value in world.parse_caption(text).items():
            assert labels[key] == value, text
        assert text.startswith(f"a {scene['style']} of a ")


def test_pretraining_scenes_never_show_the_subjects_appearances():
    rng = np.random.default_rng(2)
    seen = {(s["colour"], s["pattern"]) for s in (world.random_scene(rng) for _ in range(2000))}
    assert not {c for c, _ in seen} & set(world.HIDDEN_COLOURS)
    assert not {p for _, p in seen} & set(world.HIDDEN_PATTERNS)
    for subject in world.SUBJECTS.values():
        assert subject["colour"] in world.HIDDEN_COLOURS or subject["pattern"] in world.HIDDEN_PATTERNS


def test_every_world_word_is_one_token():
    tokenizer = world.build_tokenizer()
    for word in world.VOCABULARY:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    # A placeholder is spelled out until train_palp.py adds it.
    assert len(tokenizer.tokenize("<checkered-star>")) > 1


def test_rendering_is_deterministic_and_styles_differ():
    scene = world.random_scene(np.random.default_rng(3), style="photo", night=False)
    a, b = np.asarray(world.render(scene)), np.asarray(world.render(scene))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    sketch = np.asarray(world.render({**scene, "style": "sketch"}))
    night = np.asarray(world.render({**scene, "night": True}))
    assert np.abs(a.astype(int) - sketch).mean() > 10
    assert night.mean() < 0.7 * a.mean()


def test_subject_prompts_change_the_context_and_clean_prompts_name_the_class():
    for name, subject in world.SUBJECTS.items():
        pairs = world.target_prompts(name)
        assert len(pairs) >= 5
        for target, clean in pairs:
            assert subject["token"] in target and subject["token"] not in clean
            elements = world.parse_caption(clean)
            assert elements["shape"] == subject["shape"]
            # Every target asks for something the training photos (photo, grey, alone, day) do not show.
            assert (elements["style"] != "photo" or elements.get("background", "grey") != "grey"
                    or "companion" in elements or "night" in elements)


def test_shipped_model_loads_in_float32_and_samples():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL))
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.float32
    assert pipe.tokenizer.tokenize("a sketch of a star") == ["a</w>", "sketch</w>", "of</w>", "a</w>", "star</w>"]
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red star on a blue background", num_inference_steps=2, height=32, width=32,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_train_palp_runs_on_the_shipped_model(tmp_path):
    import evaluate

    import train_palp

    subject = world.SUBJECTS["checkered_star"]
    train_palp.cli([
        "--pretrained_model_name_or_path", str(MODEL),
        "--instance_data_dir", str(WORLD_DIR / "subjects" / "checkered_star"),
        "--placeholder_token", subject["token"],
        "--class_name", subject["shape"],
        "--target_prompt", f"a sketch of {subject['token']} on a blue background",
        "--personalization_prompt", "a photo of {token}",
        "--resolution", "32", "--max_train_steps", "3", "--rank", "4", "--learning_rate", "1e-3",
        "--seed", "0", "--num_validation_images", "0", "--report_to", "none",
        "--output_dir", str(tmp_path / "run"),
    ])
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
    pipe = evaluate.load_personalized(str(MODEL), tmp_path / "run")
    images = evaluate.sample(pipe, f"a sketch of {subject['token']} on a blue background", 2, 0, 5.0, 2)
    assert images.shape == (2, 32, 32, 3)

    # evaluate.py's report as the quickstart writes it: one row per run, both probes, per-method means.
    run = str(tmp_path / "run")
    evaluate.main(evaluate.parse_args(["--runs", run, run, "--labels", "a", "b", "--methods", "M", "M",
                                       "--num_samples", "2", "--num_inference_steps", "2",
                                       "--output_dir", str(tmp_path / "eval")]))
    import json

    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    base, a, b = report["results"]
    assert base["label"] == "base, clean prompt" and 0 <= a["probe_b_subject_fidelity"] <= 1
    assert a["subject_fidelity"] == b["subject_fidelity"]  # the same run, the same sample seeds
    mean = report["methods"]["M"]
    assert mean["runs"] == 2 and mean["subject_fidelity"]["mean"] == pytest.approx(a["subject_fidelity"])
    assert mean["colour"]["mean"] == pytest.approx(a["identity"]["colour"])
    assert "| M | 2 |" in (tmp_path / "eval" / "metrics.md").read_text()


def test_report_means_per_method():
    import evaluate

    def result(label, fidelity, colour):
        return {"label": label, "prompt_alignment": 1.0, "subject_fidelity": fidelity, "identity_exact": 0.0,
                "identity": {"colour": colour, "pattern": 0.0, "shape": 1.0}}

    results = [result("base, clean prompt", 0.3, 0.0), result("x0", 0.5, 0.25), result("y0", 0.6, 1.0),
               result("x1", 0.7, 0.75)]
    summary = evaluate.method_means(results, ["X", "Y", "X"])
    assert list(summary) == ["X", "Y"] and summary["X"]["runs"] == 2
    assert summary["X"]["subject_fidelity"] == {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7}
    assert summary["X"]["colour"]["mean"] == pytest.approx(0.5) and summary["Y"]["colour"]["mean"] == 1.0
    assert "probe_b_subject_fidelity" not in summary["X"]  # not measured: left out, not invented
    with pytest.raises(ValueError, match="--methods"):
        evaluate.method_means(results, ["X"])


def test_probe_reads_rendered_scenes_of_known_attributes():
    import probe as probe_lib

    probe = probe_lib.load_probe(PROBE)
    rng = np.random.default_rng(123)
    scenes = [world.random_scene(rng, hidden=True) for _ in range(64)]
    scenes += [world.subject_scene(name, rng, style="sketch", background="blue") for name in world.SUBJECTS]
    preds = probe_lib.classify(probe, [world.render(s) for s in scenes])
    for attribute in world.ATTRIBUTES:
        truth = [world.ATTRIBUTES[attribute][world.scene_labels(s)[attribute]] for s in scenes]
        accuracy = np.mean([p[attribute] == t for p, t in zip(preds, truth)])
        assert accuracy >= 0.9, (attribute, accuracy)


def test_shipped_autoencoder_keeps_each_subjects_identity():
    """A subject the autoencoder cannot encode cannot be personalized: its photos, encoded to the posterior mean and
    decoded, must still show the subject's class, colour and pattern to the probe."""
    import probe as probe_lib
    from diffusers import AutoencoderKL
    from PIL import Image

    probe = probe_lib.load_probe(PROBE)
    vae = AutoencoderKL.from_pretrained(str(MODEL), subfolder="vae").eval()
    for name, subject in world.SUBJECTS.items():
        photos = np.stack([np.asarray(Image.open(p).convert("RGB"))
                           for p in sorted((WORLD_DIR / "subjects" / name).glob("*.png"))])
        round_trip = probe_lib.autoencoder_round_trip(vae, photos)
        assert round_trip.shape == photos.shape and round_trip.dtype == np.uint8
        preds = probe_lib.classify(probe, round_trip)
        for attribute in probe_lib.IDENTITY:
            hits = np.mean([p[attribute] == subject[attribute] for p in preds])
            assert hits >= 0.6, (name, attribute, hits)


def test_metrics_count_prompt_elements_and_identity():
    import probe as probe_lib

    pred = {"style": "sketch", "shape": "star", "colour": "yellow", "pattern": "checkered",
            "background": "grey", "companion": "none", "night": "day"}
    # Style and class right, background wrong, night missing: 2 of 4 elements.
    assert probe_lib.prompt_alignment(pred, "a sketch of a star on a blue background at night") == 0.5
    assert probe_lib.subject_fidelity(pred, {"shape": "star", "colour": "yellow", "pattern": "checkered"}) == 1.0
    assert probe_lib.subject_fidelity(pred, {"shape": "star", "colour": "orange", "pattern": "striped"}) == pytest.approx(1 / 3)
