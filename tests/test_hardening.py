"""Bad input, interruptions, damaged checkpoints, NaN losses, two processes and safe files."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_palp as tp
from conftest import REPO_ROOT, folder_snapshot, reset_accelerate_state, write_instance_images
from test_train_palp import TOKEN, base_args, train

# ------------------------------------------------------------------------------------------------ bad input


def _zero_byte_folder(tmp_path):
    folder = tmp_path / "zero"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    return str(folder)


def _truncated_folder(tmp_path):
    folder = write_instance_images(tmp_path / "truncated", n=1)
    path = next(folder.iterdir())
    path.write_bytes(path.read_bytes()[:40])
    return str(folder)


def _no_model(tmp_path):
    return str(tmp_path / "missing-model")


def _zero_terminal_snr_model(tmp_path):
    """The tiny model with a zero-terminal-SNR schedule (ᾱ_{T-1} = 0), as SD 2.x fine-tunes ship it."""
    import json

    from conftest import build_tiny_sd

    path = tmp_path / "zero-snr"
    build_tiny_sd(path)
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_file.write_text(json.dumps(config))
    return str(path)


def _edm_sdxl_model(tmp_path):
    """A tiny SDXL model in Playground v2.5's form: EDM scheduler, VAE with latents_mean / latents_std."""
    from conftest import build_tiny_sdxl

    build_tiny_sdxl(tmp_path / "edm-sdxl", edm=True)
    return str(tmp_path / "edm-sdxl")


def _vae_with_latents_statistics(tmp_path):
    return str(Path(_edm_sdxl_model(tmp_path)) / "vae")


# (id, how to change the arguments, text the error must contain)
BAD_INPUTS = [
    ("missing folder", {"--instance_data_dir": lambda p: str(p / "nope")}, "--instance_data_dir"),
    ("zero-byte image only", {"--instance_data_dir": _zero_byte_folder}, "no readable image"),
    ("truncated image only", {"--instance_data_dir": _truncated_folder}, "no readable image"),
    ("token with space", {"--placeholder_token": "<my cat>", "--target_prompt": "A <my cat>"}, "without spaces"),
    ("token already a word", {"--placeholder_token": "dog", "--target_prompt": "A sketch of dog"}, "already in the"),
    ("target without token", {"--target_prompt": "A sketch of a cat"}, "--target_prompt"),
    ("personalization without token", {"--personalization_prompt": "A photo"}, "--personalization_prompt"),
    ("clean prompt with token", {"--clean_prompt": f"A {TOKEN}"}, "--clean_prompt"),
    ("resolution not multiple of 8", {"--resolution": "36"}, "multiple of 8"),
    ("resolution zero", {"--resolution": "0"}, "--resolution"),
    ("resolution negative", {"--resolution": "-64"}, "--resolution"),
    ("negative alpha", {"--guidance_scale_pretrained": "-1"}, "--guidance_scale_pretrained"),
    ("negative beta", {"--guidance_scale_personalized": "-0.5"}, "--guidance_scale_personalized"),
    ("negative lambda", {"--alignment_weight": "-1"}, "--alignment_weight"),
    ("zero steps", {"--max_train_steps": "0"}, "--max_train_steps"),
    ("zero rank", {"--rank": "0"}, "--rank"),
    ("model path missing", {"--pretrained_model_name_or_path": _no_model}, "--pretrained_model_name_or_path"),
    ("model folder not SD", {"--pretrained_model_name_or_path": lambda p: str(p)}, "diffusers layout"),
    (
        "timestep range reversed",
        {"--timestep_min_ratio": "0.9", "--timestep_max_ratio": "0.1"},
        "--timestep_min_ratio",
    ),
    ("timestep min ratio 1", {"--timestep_min_ratio": "1.0", "--timestep_max_ratio": "1.0"}, "--timestep_min_ratio"),
    (
        "last step of a zero-terminal-SNR schedule",
        {"--pretrained_model_name_or_path": _zero_terminal_snr_model, "--timestep_max_ratio": "1.0"},
        "--timestep_max_ratio 0.998 or lower",
    ),
    (
        "alignment timestep min ratio 1",
        {"--alignment_timestep_min_ratio": "1.0", "--alignment_timestep_max_ratio": "1.0"},
        "--alignment_timestep_min_ratio",
    ),
    (
        "t2 at the last step of a zero-terminal-SNR schedule",
        {"--pretrained_model_name_or_path": _zero_terminal_snr_model, "--alignment_timestep_max_ratio": "1.0"},
        "--alignment_timestep_max_ratio 0.998 or lower",
    ),
    ("negative embedding learning rate", {"--embedding_learning_rate": "-0.0001"}, "--embedding_learning_rate"),
    ("negative lora alpha", {"--lora_alpha": "-4"}, "--lora_alpha"),
    ("wandb with hub token", {"--report_to": "wandb", "--hub_token": "hf_x"}, "--hub_token"),
    ("empty class", {"--class_name": " "}, "--class_name"),
    (
        "EDM-style SDXL model",
        {"--pretrained_model_name_or_path": _edm_sdxl_model},
        "EDM-style model (scheduler EDMDPMSolverMultistepScheduler; latents_mean and latents_std in the config of "
        "its VAE)",
    ),
    (
        "VAE with latents statistics",
        {"--pretrained_vae_model_name_or_path": _vae_with_latents_statistics},
        "EDM-style model (latents_mean and latents_std in the config of --pretrained_vae_model_name_or_path",
    ),
    (
        "checkpoint path missing",
        {"--resume_from_checkpoint": lambda p: str(p / "no-ckpt")},
        "--resume_from_checkpoint",
    ),
]


def _apply(argv, changes, tmp_path):
    argv = list(argv)
    for flag, value in changes.items():
        value = value(tmp_path) if callable(value) else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("changes,expected", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_fails_early_with_one_clear_message(tiny_sd_path, instance_dir, tmp_path, changes, expected):
    out = tmp_path / "out"
    argv = _apply(base_args(tiny_sd_path, instance_dir, out), changes, tmp_path)
    with pytest.raises(SystemExit) as info:
        tp.cli(argv)
    message = str(info.value)
    assert message.startswith("error: ") and expected in message
    assert "Traceback" not in message and message.count("\n") == 0
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert not {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "README.md"} & set(leftovers)


def test_one_corrupt_image_among_good_ones_is_skipped(tiny_sd_path, tmp_path):
    folder = write_instance_images(tmp_path / "mixed", n=2)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.warns(UserWarning, match="corrupt.jpg"):
        run = train(
            tiny_sd_path, str(folder), tmp_path / "out", "--max_train_steps", "1", "--num_validation_images", "0"
        )
    assert run.global_step == 1


# ------------------------------------------------------------------------------------------------ interruptions


def test_signal_saves_a_checkpoint_and_resume_matches_uninterrupted(tiny_sd_path, instance_dir, tmp_path, monkeypatch):
    common = ("--num_validation_images", "0", "--checkpointing_steps", "100", "--lr_scheduler", "cosine")
    full = tmp_path / "full"
    train(tiny_sd_path, instance_dir, full, *common)

    original_step = tp.training_step

    def step_then_signal(run, micro_step):
        result = original_step(run, micro_step)
        if micro_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(tp, "training_step", step_then_signal)
    handlers_before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit, match="Stopped by a signal at step 2"):
        train(tiny_sd_path, instance_dir, stopped, *common)
    assert (stopped / "checkpoint-2" / "training_state.json").is_file()
    assert not (stopped / "pytorch_lora_weights.safetensors").exists()
    assert {sig: signal.getsignal(sig) for sig in handlers_before} == handlers_before  # the training one is gone
    monkeypatch.setattr(tp, "training_step", original_step)

    reset_accelerate_state()
    train(tiny_sd_path, instance_dir, stopped, *common, "--resume_from_checkpoint", "latest")
    a = load_file(full / "pytorch_lora_weights.safetensors")
    b = load_file(stopped / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_latest_ignores_half_written_checkpoints(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "training_state.json").write_text("{}")
    (tmp_path / "checkpoint-5").mkdir()  # no training_state.json: never completed
    (tmp_path / ".checkpoint-6.tmp").mkdir()
    assert tp.resolve_checkpoint(tmp_path, "latest").name == "checkpoint-2"
    assert tp.resolve_checkpoint(tmp_path / "empty", "latest") is None


def test_damaged_checkpoint_gives_a_clear_error(tiny_sd_path, instance_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd_path, instance_dir, out, "--checkpointing_steps", "2", "--num_validation_images", "0")
    shutil.rmtree(out / "checkpoint-4")
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        (out / name).unlink()
    (out / "checkpoint-2" / "optimizer.safetensors").write_bytes(b"\x00\x01 not safetensors")
    reset_accelerate_state()
    argv = base_args(
        tiny_sd_path, instance_dir, out, "--resume_from_checkpoint", "latest", "--num_validation_images", "0"
    )
    with pytest.raises(SystemExit) as info:
        tp.cli(argv)
    assert "checkpoint-2" in str(info.value) and "damaged or incomplete" in str(info.value)


def test_nan_loss_stops_without_saving(tiny_sd_path, instance_dir, tmp_path, monkeypatch):
    original = tp.palp_losses

    def nan_losses(*args, **kwargs):
        loss_pers, loss_align = original(*args, **kwargs)
        return loss_pers * float("nan"), loss_align

    monkeypatch.setattr(tp, "palp_losses", nan_losses)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        tp.cli(base_args(tiny_sd_path, instance_dir, out, "--checkpointing_steps", "1"))
    message = str(info.value)
    assert "step 1" in message and "bf16" in message and "--learning_rate" in message
    assert not list(out.glob("checkpoint-*")) and not (out / "pytorch_lora_weights.safetensors").exists()


# ------------------------------------------------------------------------------------------------ one run per folder


def _wait_for(condition, process, log, timeout=300):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_second_launch_into_a_held_output_dir_stops_and_a_run_after_sigkill_resumes(
    tiny_sd_path, instance_dir, tmp_path
):
    """Two launches into one --output_dir: the first trains, the second stops with the error and leaves every file
    as it was (even with --overwrite_output_dir). SIGKILL frees the folder: the next run takes it and resumes."""
    out, log = tmp_path / "out", tmp_path / "first.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = str(REPO_ROOT / "train_palp.py")
    common = ("--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--num_validation_images", "0")
    with open(log, "w") as stream:
        first = subprocess.Popen(
            [sys.executable, script, *base_args(tiny_sd_path, instance_dir, out, *common, "--max_train_steps", "100000")],
            stdout=stream, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        lock = out / tp.LOCK_NAME
        held = f"{first.pid}\n"
        _wait_for(lambda: lock.is_file() and lock.read_text() == held and tp.list_checkpoints(out), first, log)
        os.kill(first.pid, signal.SIGSTOP)  # frozen, so that any change to the folder is the second launch's
        before = folder_snapshot(out)
        second = subprocess.run(
            [sys.executable, script, *base_args(tiny_sd_path, instance_dir, out, *common, "--overwrite_output_dir")],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert second.returncode == 1
        error = second.stderr.strip().splitlines()[-1]
        assert error == (
            f"error: --output_dir {str(out)!r} is in use by another training run (process {first.pid}): wait for it "
            "to end or stop it, or choose another --output_dir. Once it has stopped, --resume_from_checkpoint "
            "latest continues it."
        )
        assert folder_snapshot(out) == before
    finally:
        first.kill()  # SIGKILL: no handler runs, the checkpoints stay as they were
        first.wait()
    step = tp.checkpoint_step(tp.list_checkpoints(out)[-1])
    run = train(tiny_sd_path, instance_dir, out, *common, "--max_train_steps", str(step + 1),
                "--resume_from_checkpoint", "latest")  # fmt: skip
    assert run.global_step == step + 1 and (out / "pytorch_lora_weights.safetensors").is_file()
    assert lock.read_text() == f"{os.getpid()}\n"


def test_the_output_dir_lock_is_released_on_any_exit_and_taken_by_the_main_process_only(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with tp.output_dir_lock(tmp_path / "out", is_main_process=True):
            with pytest.raises(tp.UserInputError, match="--output_dir .* is in use by another training run"):
                with tp.output_dir_lock(tmp_path / "out", is_main_process=True):
                    pass
            raise RuntimeError("boom")
    with tp.output_dir_lock(tmp_path / "out", is_main_process=True):  # free again after the error
        with tp.output_dir_lock(tmp_path / "out", is_main_process=False):  # other ranks neither wait nor write
            pass
    with tp.output_dir_lock(tmp_path / "other", is_main_process=False):
        assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------------------------ two processes


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_on_cpu(tiny_sd_path, instance_dir, tmp_path):
    out = tmp_path / "out"
    secret = "hf_do_not_leak_123"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(REPO_ROOT / "train_palp.py"),
        *base_args(tiny_sd_path, instance_dir, out, "--checkpointing_steps", "2", "--hub_token", secret,
                   "--report_to", "tensorboard"),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical on all 2 processes" in done.stderr
    assert done.stderr.count("Saved checkpoint") == 2  # written once each, by the main process
    assert len(list((out / "samples").glob("final_*.png"))) == 1  # validation on the main process only
    assert secret not in done.stdout + done.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert load_file(out / "learned_embeds.safetensors")[TOKEN].isfinite().all()


# ------------------------------------------------------------------------------------------------ safe files


@pytest.mark.parametrize("script", ["train_palp.py", "train_palp_multi_subject.py"])
def test_scripts_never_unpickle_or_run_remote_code(script):
    path = REPO_ROOT / script
    if not path.exists():
        pytest.fail(f"{script} is missing")
    source = path.read_text()
    for forbidden in (
        "torch.load(",
        "import pickle",
        "pickle.load",
        "trust_remote_code=True",
        "save_state(",
        "load_state(",
    ):
        assert forbidden not in source, forbidden


def test_everything_written_is_safetensors_json_or_images(tiny_sd_path, instance_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd_path, instance_dir, out, "--checkpointing_steps", "2", "--report_to", "none")
    assert (out / tp.LOCK_NAME).is_file()  # the run's lock, not an output
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file() and p.name != tp.LOCK_NAME}
    assert suffixes <= {".safetensors", ".json", ".md", ".png"}, suffixes
    for path in out.rglob("*.safetensors"):
        load_file(path)  # every file loads without pickle
    assert torch.is_tensor(load_file(out / "checkpoint-2" / "optimizer.safetensors")["0.exp_avg"])


def test_the_hub_client_is_offline_for_the_whole_suite():
    """conftest sets HF_HUB_OFFLINE before huggingface_hub is imported; the library reads it only then."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
