"""examples/gpu_check.py: the same checks a GPU run makes, on the CPU with the tiny layout."""

import json

import pytest
import torch

from conftest import load_example


@pytest.fixture(scope="module")
def gpu_check():
    return load_example("gpu_check")


def test_cpu_smoke_run_trains_resumes_loads_and_benchmarks(gpu_check, tmp_path):
    report_file = tmp_path / "report.json"
    args = gpu_check.parse_args(["--device", "cpu", "--model", "tiny", "--resolution", "64", "--max_train_steps",
                                 "2", "--work_dir", str(tmp_path / "work"), "--output_json", str(report_file)])  # fmt: skip
    report = gpu_check.main(args)
    assert json.loads(report_file.read_text())["runs"].keys() == report["runs"].keys() == {"no", "bf16"}
    # bitsandbytes (a test requirement) runs 8-bit Adam on the CPU too; xformers is CUDA-only.
    assert report["flags"] == ["--gradient_checkpointing", "--use_8bit_adam"]
    first = report["runs"]["no"]
    assert first["resume_max_difference"] == 0.0  # bit-exact on the CPU
    for figures in report["runs"].values():
        assert all(0 < value < 10 for value in figures["first_loss"][:2])
    for name, sample in (("run-no", "step-1_0"), ("run-no-resumed", "final_0"), ("run-bf16", "step-1_0")):
        folder = tmp_path / "work" / name
        assert (folder / "pytorch_lora_weights.safetensors").is_file() and (
            folder / "samples" / f"{sample}.png"
        ).is_file()
    bench = report["benchmark"]
    assert bench["floor_ratio"] > 0 and bench["memory_ratio"] > 0 and bench["palp_over_ti_db_time"] > 1


def test_the_check_fails_on_what_it_checks(gpu_check):
    run = type("Run", (), {})()
    unet = torch.nn.Linear(2, 2)
    unet.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, dtype=torch.float16)))
    run.base_unet, run.embedding = unet, type("E", (), {"rows": torch.zeros(1, 2)})()
    with pytest.raises(AssertionError, match="non-finite"):
        gpu_check.check_run(run, [[1.0, float("nan"), 0.0]], None, torch.float32, None)
    with pytest.raises(AssertionError, match="LoRA is not fp32"):
        gpu_check.check_run(run, [[1.0, 1.0, 0.0]], None, torch.float32, None)
    good = torch.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4)
    gpu_check.check_validation_images([good, good], expected=2)
    with pytest.raises(AssertionError, match="1 validation images decoded, expected 2"):
        gpu_check.check_validation_images([good], expected=2)
    with pytest.raises(AssertionError, match="validation image 1 is non-finite"):
        gpu_check.check_validation_images([good, torch.full_like(good, float("nan"))], expected=2)
    with pytest.raises(AssertionError, match="validation image 0 is constant"):
        gpu_check.check_validation_images([torch.full_like(good, -1.0), good], expected=2)


def test_validation_images_are_recorded_as_train_palp_decodes_them(gpu_check):
    import train_palp as tp

    vae = type("VAE", (), {"dtype": torch.float32, "config": type("C", (), {"scaling_factor": 0.5})()})()
    vae.decode = lambda z, return_dict=False: (z * 2,)
    with gpu_check.recorded_validation_images() as images:
        decoded = tp.decode_latents(vae, torch.ones(2, 4, 3, 3))
    assert tp.decode_latents is not None and len(images) == 2
    torch.testing.assert_close(torch.stack(images), decoded)
    assert tp.decode_latents.__name__ == "decode_latents"  # the original is back


def test_the_sd15_tokenizer_has_clips_size_and_special_ids(gpu_check):
    tokenizer = gpu_check.build_tokenizer(49408)
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    assert len(tokenizer.encode("a photo of cat", add_special_tokens=False)) == 4


def test_cuda_is_required_unless_asked_for_the_cpu(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu", "--max_train_steps", "3"])


def test_tiny_sd3_smoke_run_trains_resumes_loads_and_benchmarks(gpu_check, tmp_path):
    """The SD3 path of the check on the CPU: a random SD3 pipeline without T5 (16-channel VAE with shift_factor,
    shifted flow scheduler) trains in fp32 and bf16, resumes bit-exactly, loads as sample_palp.py loads it and
    benchmarks on the flow process."""
    args = gpu_check.parse_args(["--device", "cpu", "--model", "tiny_sd3", "--resolution", "32", "--max_train_steps",
                                 "2", "--work_dir", str(tmp_path / "work")])  # fmt: skip
    report = gpu_check.main(args)
    assert report["runs"].keys() == {"no", "bf16"} and report["runs"]["no"]["resume_max_difference"] == 0.0
    model = tmp_path / "work" / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert json.loads((model / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    vae = json.loads((model / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and vae["shift_factor"] == 0.0609
    training = json.loads((tmp_path / "work" / "run-no" / "training_config.json").read_text())
    assert training["pipeline_class"] == "StableDiffusion3Pipeline"
    assert report["benchmark"]["mixed_precision"] == "no" and report["benchmark"]["floor_ratio"] > 0


@pytest.mark.parametrize(
    "model, expected",
    [
        ("sd15", ["StableDiffusionPipeline", "UNet2DConditionModel + 1 CLIP", "noise process: DDPM"]),
        ("sdxl", ["StableDiffusionXLPipeline", "UNet2DConditionModel + 2 CLIP", "noise process: DDPM"]),
        (
            "sd3",
            [
                "StableDiffusion3Pipeline",
                "SD3Transformer2DModel + 2 CLIP encoder(s), no T5",
                "rectified flow",
                "attn.add_q_proj",
                "--model sd3 --device cuda --mixed_precision bf16 --resolution 512",
            ],
        ),  # fmt: skip
    ],
)
def test_dry_run_prints_the_plan_without_a_gpu_and_builds_nothing(
    gpu_check, model, expected, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = gpu_check.parse_args(["--model", model, "--dry_run", "--work_dir", str(tmp_path / "work")])
    report = gpu_check.main(args)
    printed = capsys.readouterr().out
    for text in expected:
        assert text in printed, text
    # fp16 and the resume, then bf16 (planned where the GPU supports it), then the benchmark.
    runs = [line.split(":")[0] for line in report["plan"] if line.startswith("run ")]
    assert runs == ["run fp16", "run fp16-resumed", "run bf16"]
    assert report["plan"][-1].startswith("benchmark: python examples/benchmark_palp.py --model " + model)
    assert not (tmp_path / "work").exists()
    no_bench = gpu_check.main(gpu_check.parse_args(["--model", model, "--dry_run", "--no-benchmark"]))
    assert not any(line.startswith("benchmark") for line in no_bench["plan"])
    # On a GPU without bf16, only fp16 runs.
    assert gpu_check.plan(args, bf16_supported=False)[-2].startswith("run fp16-resumed")


@pytest.mark.parametrize(
    "model, resolution, ok",
    [("sd3", "528", True), ("sd3", "520", False), ("tiny_sd3", "32", True), ("sd15", "96", False),
     ("sdxl", "1024", True), ("tiny_sdxl", "80", False)],
)  # fmt: skip
def test_resolution_fits_the_models_denoiser(gpu_check, model, resolution, ok, capsys):
    flags = ["--model", model, "--resolution", resolution, "--dry_run"]
    if ok:
        assert gpu_check.parse_args(flags).resolution == int(resolution)
        return
    with pytest.raises(SystemExit):
        gpu_check.parse_args(flags)
    assert f"--resolution must be a positive multiple of {16 if 'sd3' in model else 64}" in capsys.readouterr().err


def test_each_models_vae_feeds_its_denoiser(gpu_check):
    import benchmark_palp as bench

    for model, (pipeline, architecture, vae_config, _) in gpu_check.MODELS.items():
        family, denoiser_config, _, _ = bench.ARCHITECTURES[architecture]
        assert family.pipeline_class.__name__ == pipeline, model
        assert vae_config["latent_channels"] == denoiser_config["in_channels"], model
        assert ("shift_factor" in vae_config) == (pipeline == "StableDiffusion3Pipeline"), model
