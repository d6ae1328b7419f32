"""train_palp_multi_subject.py: balanced sampling, per-image y_P routing, errors, and two-subject runs end to end."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import train_palp_multi_subject as tpm
from conftest import REPO_ROOT, build_tiny_clip_tokenizer, folder_snapshot, write_instance_images

CAT, ART = "<my-cat>", "<wanderer>"
CAT_PROMPT, ART_PROMPT = f"A photo of {CAT}", f"An oil painting of {ART}"
TARGET = f"An oil painting of {CAT} inspired by {ART} painting"
CLEAN = "An oil painting of a cat sitting on a rock"
EXAMPLE = REPO_ROOT / "examples" / "art_inspiration"


@pytest.fixture
def subject_dirs(tmp_path):
    """A three-photo cat and a one-image artwork."""
    cat = write_instance_images(tmp_path / "cat", n=3, seed=0)
    art = write_instance_images(tmp_path / "art", n=1, seed=7)
    return str(cat), str(art)


def subject_flags(cat_dir, art_dir):
    return [
        "--instance_data_dir", cat_dir, "--placeholder_token", CAT, "--class_name", "cat",
        "--instance_data_dir", art_dir, "--placeholder_token", ART, "--class_name", "painting",
        "--personalization_prompt", "A photo of {token}", "--personalization_prompt", "An oil painting of {token}",
    ]  # fmt: skip


def common_flags(model, output_dir):
    return [
        "--pretrained_model_name_or_path", model, "--target_prompt", TARGET, "--clean_prompt", CLEAN,
        "--output_dir", str(output_dir), "--resolution", "32", "--rank", "4", "--max_train_steps", "4",
        "--seed", "0", "--num_validation_images", "1", "--validation_num_inference_steps", "2",
        "--report_to", "none", "--learning_rate", "1e-3",
    ]  # fmt: skip


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


# ------------------------------------------------------------------------------------------------- sampling
def subject_of(indices, image_counts):
    table = tpm.image_subjects(image_counts)
    return [table[i] for i in indices]


def draws(mode, image_counts, steps, batch_size=1, seed=0, rank=0, world_size=1):
    draw = tpm.subject_sampler(mode, image_counts, batch_size)
    return [i for step in range(steps) for i in draw(step, seed, rank, world_size)]


def test_balanced_sampling_gives_a_one_image_artwork_as_many_draws_as_a_six_image_subject():
    counts = [6, 1]
    balanced = draws("balanced", counts, steps=24)
    subjects = subject_of(balanced, counts)
    # Every round of two consecutive draws holds each subject once: balance at every scale, not just on average.
    assert all(sorted(subjects[i : i + 2]) == [0, 1] for i in range(0, 24, 2))
    # The six-image subject cycles through all its images: each of them twice in its 12 draws.
    assert Counter(i for i in balanced if i < 6) == {i: 2 for i in range(6)}
    assert balanced.count(6) == 12

    proportional = draws("proportional", counts, steps=28)
    assert Counter(proportional) == {i: 4 for i in range(7)}  # the artwork gets 1/7 of the draws


def test_balanced_sampling_with_three_subjects_and_a_batch():
    counts = [2, 5, 1]
    indices = draws("balanced", counts, steps=10, batch_size=3)
    assert Counter(subject_of(indices, counts)) == {0: 10, 1: 10, 2: 10}
    assert set(indices) == set(range(8))


@pytest.mark.parametrize("mode", ["balanced", "proportional"])
def test_sampling_depends_on_its_arguments_only_and_ranks_split_the_global_batch(mode):
    counts = [4, 1, 3]
    draw = tpm.subject_sampler(mode, counts, batch_size=2)
    # Same arguments, same draw: a resumed run sees exactly the images the uninterrupted run saw.
    assert [draw(5, 3, 0, 1) for _ in range(3)] == [draw(5, 3, 0, 1)] * 3
    # Two ranks at micro-step m draw, together, what one process draws at micro-steps 2m and 2m + 1.
    for step in range(6):
        assert draw(step, 3, 0, 2) + draw(step, 3, 1, 2) == draw(2 * step, 3, 0, 1) + draw(2 * step + 1, 3, 0, 1)
    assert draws(mode, counts, 12, seed=1) != draws(mode, counts, 12, seed=2)


# ------------------------------------------------------------------------------------------------- y_P routing
def test_each_image_of_a_batch_gets_its_own_subjects_prompt():
    counts = [3, 1]
    assert tpm.image_subjects(counts) == [0, 0, 0, 1]
    prompts = tpm.personalization_prompts_for([3, 0, 3, 2], tpm.image_subjects(counts), [CAT_PROMPT, ART_PROMPT])
    assert prompts == [ART_PROMPT, CAT_PROMPT, ART_PROMPT, CAT_PROMPT]

    tokenizer = build_tiny_clip_tokenizer()
    tokenizer.add_tokens([CAT, ART])
    cat_id, art_id = tokenizer.convert_tokens_to_ids([CAT, ART])
    ids = tpm.tokenize(tokenizer, tpm.personalization_batch(counts, [CAT_PROMPT, ART_PROMPT])([3, 0, 1, 3]))
    assert ids.shape == (4, 77)
    own = [art_id, cat_id, cat_id, art_id]
    for row, token_id in zip(ids.tolist(), own):
        assert token_id in row and ({cat_id, art_id} - {token_id}).isdisjoint(row)
    assert torch.equal(ids[0], ids[3]) and not torch.equal(ids[0], ids[1])


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records whether its LoRA was on and which text conditioning each call received."""

    def __init__(self):
        super().__init__()
        self.lora, self.calls = True, []

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append((self.lora, encoder_hidden_states.detach().clone()))
        return SimpleNamespace(sample=0.5 * x + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1))

    def disable_adapters(self):
        self.lora = False

    def enable_adapters(self):
        self.lora = True


@pytest.mark.parametrize("beta", [1.0, 7.5])
def test_each_images_prompt_reaches_the_personalization_and_the_personalized_branch(beta):
    batch = 3
    cond_personal = torch.stack([torch.full((77, 32), float(v)) for v in (1, 2, 1)])  # [V1], [V2], [V1]
    cond_clean, uncond = torch.full((1, 77, 32), 5.0), torch.full((1, 77, 32), -5.0)
    unet = RecordingUNet()
    config = tpm.AlignmentConfig(guidance_scale_pretrained=7.5, guidance_scale_personalized=beta)
    loss_pers, loss_align = tpm.palp_losses(
        unet,
        unet,
        torch.randn(batch, 4, 8, 8),
        torch.randn(batch, 4, 8, 8),
        torch.tensor([100, 500, 900]),
        torch.tensor([200, 300, 400]),
        torch.randn(batch, 4, 8, 8),
        cond_personal,
        cond_clean,
        uncond,
        tpm.DDPMProcess(torch.linspace(0.99, 0.01, 1000)),
        config,
    )
    assert torch.isfinite(loss_pers) and torch.isfinite(loss_align)
    (pers_lora, pers), (pre_lora, pre), (per_lora, per) = unet.calls
    assert pers_lora and torch.equal(pers, cond_personal)  # L_pers: each image under its own y_P
    assert not pre_lora and torch.equal(
        pre, torch.cat([cond_clean.expand(batch, -1, -1), uncond.expand(batch, -1, -1)])
    )
    assert per_lora and torch.equal(per[:batch], cond_personal)  # g_per: the same per-image y_P
    # β = 1: ε^1 = ε(y_P), the unconditional pass of the personalized model is skipped.
    assert per.shape[0] == (batch if beta == 1.0 else 2 * batch)


# ------------------------------------------------------------------------------------------------- command line
def test_defaults_and_both_ways_of_giving_subjects_agree(tmp_path, subject_dirs):
    cat, art = subject_dirs
    flags = tpm.parse_args([*subject_flags(cat, art), *common_flags("model", tmp_path / "out")])
    assert flags.guidance_scale_pretrained == 7.5 and flags.guidance_scale_personalized == 1.0
    assert flags.alignment_normalization == "none"  # the paper's D: the normalisation was not measured on composition
    assert flags.subject_sampling == "balanced"

    config = tmp_path / "art" / "subjects.json"  # relative folders are read from the file's own folder
    config.write_text(
        json.dumps(
            [
                {"instance_data_dir": "../cat", "placeholder_token": CAT, "class_name": "cat"},
                {
                    "instance_data_dir": ".",
                    "placeholder_token": ART,
                    "class_name": "painting",
                    "personalization_prompt": "An oil painting of {token}",
                },
            ]
        )
    )
    from_file = tpm.parse_args(["--subjects_config", str(config), *common_flags("model", tmp_path / "out")])
    for a, b in zip(tpm.read_subjects(flags), tpm.read_subjects(from_file), strict=True):
        assert os.path.samefile(a.instance_data_dir, b.instance_data_dir)
        assert (a.placeholder_token, a.class_name, a.prompt) == (b.placeholder_token, b.class_name, b.prompt)
    assert [s.prompt for s in tpm.read_subjects(from_file)] == [CAT_PROMPT, ART_PROMPT]


def _error(argv, match):
    with pytest.raises(SystemExit) as info:
        tpm.cli(argv)
    message = str(info.value)
    for text in match:
        assert text in message, message
    return message


def test_error_duplicate_tokens(tmp_path, subject_dirs):
    argv = subject_flags(*subject_dirs) + common_flags("model", tmp_path / "out")
    argv[argv.index(ART)] = CAT
    _error(argv, [CAT, "subject 2", "already the token of subject 1", "own token"])
    # Tokens that differ only in characters dropped from the embedding file name would overwrite each other's file.
    argv[argv.index(CAT, argv.index(CAT) + 1)] = "<my-cat!>"
    argv[argv.index(TARGET)] = f"{TARGET} <my-cat!>"
    _error(argv, ["<my-cat!>", "learned_embeds_my-cat.safetensors", "subject 1"])


def test_error_target_prompt_misses_a_token(tmp_path, subject_dirs):
    argv = subject_flags(*subject_dirs) + common_flags("model", tmp_path / "out")
    argv[argv.index(TARGET)] = f"An oil painting of {CAT}"
    _error(argv, ["--target_prompt", ART, "subject 2"])


def test_error_clean_prompt_with_a_token(tmp_path, subject_dirs):
    argv = subject_flags(*subject_dirs) + common_flags("model", tmp_path / "out")
    argv[argv.index(CLEAN)] = f"An oil painting of a cat inspired by {ART}"
    _error(argv, ["--clean_prompt", ART])


def test_error_subject_without_images(tiny_sd_path, tmp_path, subject_dirs):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    argv = subject_flags(subject_dirs[0], str(empty)) + common_flags(tiny_sd_path, tmp_path / "out")
    _error(argv, ["subject 2", "no readable image", str(empty)])
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--placeholder_token", "<extra>"], ["once per subject", "--placeholder_token × 3"]),
        (["--personalization_prompt", "A {token}"], ["--personalization_prompt", "3 times for 2 subjects"]),
    ],
)
def test_error_per_subject_flags_that_do_not_line_up(tmp_path, subject_dirs, flags, match):
    _error(subject_flags(*subject_dirs) + flags + common_flags("model", tmp_path / "out"), match)


def test_error_no_subjects_or_both_ways(tmp_path, subject_dirs):
    _error(common_flags("model", tmp_path / "out"), ["No subjects", "--subjects_config"])
    config = tmp_path / "subjects.json"
    config.write_text("[]")
    argv = ["--subjects_config", str(config), *subject_flags(*subject_dirs), *common_flags("model", tmp_path / "o")]
    _error(argv, ["either with --subjects_config", "not both"])


@pytest.mark.parametrize(
    "content, match",
    [
        ('[{"instance_data_dir": "cat", ', ["not valid JSON"]),
        ('{"instance_data_dir": "cat"}', ["non-empty JSON list"]),
        ("[]", ["non-empty JSON list"]),
        ('["cat"]', ["subject 1 is str"]),
        ('[{"instance_data_dir": "cat", "placeholder_token": "<my-cat>"}]', ["subject 1", "lacks ['class_name']"]),
        (
            '[{"instance_dir": "cat", "placeholder_token": "<my-cat>", "class_name": "cat"}]',
            ["unknown field(s) ['instance_dir']"],
        ),
        ('[{"instance_data_dir": "cat", "placeholder_token": 7, "class_name": "cat"}]', ["['placeholder_token']"]),
        ('[{"instance_data_dir": "nowhere", "placeholder_token": "<my-cat>", "class_name": "cat"}]', ["not a folder"]),
    ],
)
def test_error_malformed_subjects_file(tmp_path, content, match):
    write_instance_images(tmp_path / "cat", n=1)
    config = tmp_path / "subjects.json"
    config.write_text(content)
    argv = ["--subjects_config", str(config), *common_flags("model", tmp_path / "out")]
    argv[argv.index(TARGET)] = f"A painting of {CAT}"
    _error(argv, ["--subjects_config", *match])


def test_script_is_self_contained_and_documents_its_flags(tmp_path):
    # Copied alone into another folder, without train_palp.py next to it, the script still runs.
    shutil.copy(REPO_ROOT / "train_palp_multi_subject.py", tmp_path)
    done = subprocess.run(
        [sys.executable, "train_palp_multi_subject.py", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in ("--subjects_config", "--subject_sampling", "--clean_prompt", "--guidance_scale_personalized"):
        assert flag in done.stdout, flag
    assert "(ours" in done.stdout and "(paper" in done.stdout


# ------------------------------------------------------------------------------------------------- end to end
def test_two_subjects_end_to_end(tiny_sd_path, tmp_path, subject_dirs):
    from transformers import CLIPTextModel, CLIPTokenizer

    out = tmp_path / "out"
    argv = subject_flags(*subject_dirs) + common_flags(tiny_sd_path, out)
    # Without weight decay a token row can only move if its own images were trained under it.
    run = tpm.main(tpm.parse_args([*argv, "--adam_weight_decay", "0", "--checkpointing_steps", "4"]))
    assert run.global_step == 4

    base = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").get_input_embeddings().weight
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    assert torch.equal(run.embedding.base.weight[: base.shape[0]], base)  # every other row is bit-identical
    saved = {}
    for index, (token, class_name, file_name) in enumerate(
        [(CAT, "cat", "learned_embeds_my-cat.safetensors"), (ART, "painting", "learned_embeds_wanderer.safetensors")]
    ):
        state = load_file(out / file_name)
        assert list(state) == [token] and state[token].shape == (1, 32)
        init = base[tokenizer.encode(class_name, add_special_tokens=False)].mean(0)
        assert (state[token][0] - init).abs().max() > 1e-5, token  # each token's row moved
        torch.testing.assert_close(state[token][0], run.embedding.rows[index].detach())
        assert (out / "checkpoint-4" / file_name).is_file()
        saved[token] = state[token][0]

    config = json.loads((out / "training_config.json").read_text())
    assert [(s["placeholder_token"], s["num_images"], s["personalization_prompt"]) for s in config["subjects"]] == [
        (CAT, 3, CAT_PROMPT),
        (ART, 1, ART_PROMPT),
    ]
    assert config["guidance_scale_pretrained"] == 7.5 and config["guidance_scale_personalized"] == 1.0
    card = (out / "README.md").read_text()
    for text in (TARGET, CLEAN, f"| `{CAT}` | cat | 3 | `{CAT_PROMPT}`", f"| `{ART}` | painting | 1 | `{ART_PROMPT}`"):
        assert text in card, text
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "samples/final_0.png"):
        assert (out / name).is_file(), name

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base_image = generate(pipe, CLEAN)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion(
        [str(out / "learned_embeds_my-cat.safetensors"), str(out / "learned_embeds_wanderer.safetensors")]
    )
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    for token in (CAT, ART):
        torch.testing.assert_close(embeddings[pipe.tokenizer.convert_tokens_to_ids(token)], saved[token])
    image = generate(pipe, TARGET)
    assert image.shape == (1, 32, 32, 3) and abs(image - base_image).max() > 1e-3


def test_art_inspiration_example_runs_with_accelerate_launch(tiny_sd_path, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "MODEL": tiny_sd_path,
        "OUTPUT_DIR": str(out),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        "bash", str(EXAMPLE / "train.sh"), "--resolution", "32", "--rank", "4", "--max_train_steps", "2",
        "--mixed_precision", "no", "--num_validation_images", "1", "--validation_num_inference_steps", "2",
        "--report_to", "none",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "<wanderer> (1 image(s), y_P='An oil painting of <wanderer>')" in done.stderr
    assert "sampling=balanced" in done.stderr and "α=7.5, β=1.0" in done.stderr
    subjects = json.loads((out / "training_config.json").read_text())["subjects"]
    assert [os.path.relpath(s["instance_data_dir"], EXAMPLE) for s in subjects] == ["stand_in/cat", "stand_in/artwork"]
    for name in ("learned_embeds_my-cat.safetensors", "learned_embeds_wanderer.safetensors", "README.md"):
        assert (out / name).is_file(), name


OUTPUTS = (
    "pytorch_lora_weights.safetensors",
    "learned_embeds_my-cat.safetensors",
    "learned_embeds_wanderer.safetensors",
)


def check_resume_is_bit_exact(tiny_sd_path, tmp_path, subject_dirs, flags, compared=OUTPUTS):
    """Train 4 steps; train 2 steps into another folder and resume it from checkpoint-2: every file of ``compared``
    must be bit-identical in both. Returns the uninterrupted run and the resumed folder."""
    from conftest import reset_accelerate_state

    def main(output_dir, *extra):
        reset_accelerate_state()
        return tpm.main(tpm.parse_args(subject_flags(*subject_dirs) + common_flags(tiny_sd_path, output_dir)
                                       + ["--checkpointing_steps", "2", *flags, *extra]))  # fmt: skip

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run = main(full)
    main(resumed, "--max_train_steps", "2")
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    assert main(resumed, "--resume_from_checkpoint", "latest").global_step == 4
    for name in compared:
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    return run, resumed


def test_two_subject_run_resumes_to_the_uninterrupted_result(tiny_sd_path, tmp_path, subject_dirs):
    check_resume_is_bit_exact(tiny_sd_path, tmp_path, subject_dirs, ["--num_validation_images", "0",
                                                                     "--lora_dropout", "0.2"])  # fmt: skip


def test_two_subject_8bit_adam_run_resumes_bit_exact(tiny_sd_path, tmp_path, subject_dirs):
    """bitsandbytes' AdamW8bit (CPU backend) with 8-bit state on the rank-128 LoRA matrices: a resumed run ends with
    the uninterrupted run's LoRA, both token rows and optimizer state, bit for bit."""
    import bitsandbytes as bnb

    flags = ["--num_validation_images", "0", "--use_8bit_adam", "--rank", "128"]
    compared = (*OUTPUTS, "checkpoint-4/optimizer.safetensors")
    run, resumed = check_resume_is_bit_exact(tiny_sd_path, tmp_path, subject_dirs, flags, compared)
    assert isinstance(run.optimizer.optimizer, bnb.optim.AdamW8bit)
    state = load_file(resumed / "checkpoint-2" / "optimizer.safetensors")
    assert any(value.dtype == torch.uint8 for value in state.values()) and any(".absmax1" in name for name in state)


def test_a_run_into_an_output_dir_held_by_another_stops_and_touches_nothing(tiny_sd_path, tmp_path, subject_dirs):
    """While another run holds --output_dir, a launch stops before loading anything, and --overwrite_output_dir does
    not make it delete the other run's checkpoints; once the folder is free, a run takes it."""
    out = tmp_path / "out"
    argv = subject_flags(*subject_dirs) + common_flags(tiny_sd_path, out) + ["--num_validation_images", "0"]
    with tpm.output_dir_lock(out, is_main_process=True):  # another run's hold (flock conflicts within a process too)
        (out / "checkpoint-2").mkdir()
        (out / "checkpoint-2" / "training_state.json").write_text("{}")
        before = folder_snapshot(out)
        with pytest.raises(SystemExit, match=r"--output_dir .* is in use by another training run \(process \d+\)"):
            tpm.cli([*argv, "--overwrite_output_dir", "--checkpoints_total_limit", "1", "--checkpointing_steps", "1"])
        assert folder_snapshot(out) == before
    shutil.rmtree(out / "checkpoint-2")
    assert tpm.main(tpm.parse_args([*argv, "--max_train_steps", "1"])).global_step == 1
    assert (out / tpm.LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_two_subject_upload(tiny_sd_path, tmp_path, subject_dirs, monkeypatch):
    from test_train_palp import _fake_hub, check_uploaded_card_and_config

    calls = _fake_hub(monkeypatch)
    out = tmp_path / "palp-pair"
    tpm.main(tpm.parse_args(subject_flags(*subject_dirs) + common_flags(tiny_sd_path, out)
                            + ["--push_to_hub", "--checkpointing_steps", "2", "--report_to", "tensorboard"]))  # fmt: skip
    uploaded = set(calls["files"])
    assert {"learned_embeds_my-cat.safetensors", "learned_embeds_wanderer.safetensors", "README.md",
            "pytorch_lora_weights.safetensors", "training_config.json"} <= uploaded  # fmt: skip
    assert not any(f.startswith(("checkpoint-", "logs/")) for f in uploaded)
    metadata, config = check_uploaded_card_and_config(calls["files"], [tiny_sd_path, *subject_dirs, tmp_path])
    assert "base_model" not in metadata and metadata["instance_prompt"] == TARGET
    assert [s["instance_data_dir"] for s in config["subjects"]] == ["cat", "art"]
    card = calls["files"]["README.md"].decode()
    assert "`An oil painting of learned_embeds_my-cat inspired by learned_embeds_wanderer painting" in card
    assert "`An oil painting of embedding:learned_embeds_my-cat inspired by embedding:learned_embeds_wanderer" in card
