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
        assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / "samples" / f"{sample}.png").is_file()
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
