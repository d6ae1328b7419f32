"""Smoke tests of examples/benchmark_palp.py on the tiny layout: it runs, reports every figure, and what it times is
what train_palp.py computes. No timing thresholds: the figures depend on the machine."""

import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

import benchmark_palp as bench  # noqa: E402

import train_palp as tp  # noqa: E402


def tiny_run(seed=0, alignment=None, with_frozen_copy=False, model="tiny"):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="no", cpu=True)
    models = bench.build_models(model, 4, accelerator.device, torch.float32, seed, with_frozen_copy)
    run = bench.build_run(accelerator, models, 64, 2, alignment or tp.AlignmentConfig(), torch.float32, seed)
    run.unet.train()
    return run, models


def lora_state(run):
    return {name: p.detach().clone() for name, p in run.base_unet.named_parameters() if p.requires_grad}


def test_benchmark_reports_every_figure(tmp_path, capsys):
    output = tmp_path / "bench.json"
    args = bench.parse_args(
        [
            "--model",
            "tiny",
            "--resolution",
            "64",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--rank",
            "4",
            "--variants",
            "core",
            "before_unbatched_cfg",
            "before_frozen_copy",
            "--output_json",
            str(output),
        ]
    )
    bench.main(args)
    printed = capsys.readouterr().out
    for label in ("floor ratio", "floor ratio β=1", "memory ratio", "before/after", "machine:"):
        assert label in printed

    report = json.loads(output.read_text())
    assert report["machine"]["cpus_available"] > 0 and report["machine"]["torch"]
    (setting,) = report["settings"]
    assert setting["resolution"] == 64 and setting["latent_size"] == 8 and setting["batch_size"] == 1
    assert set(setting["variants"]) == {*bench.CORE_VARIANTS, "before_unbatched_cfg", "before_frozen_copy"}
    for name, entry in setting["variants"].items():
        assert len(entry["times_s"]) == 1 and entry["median_s"] > 0, name
        assert entry["increment_bytes"] > 0 and entry["peak_bytes"] > entry["resident_bytes"] > 0, name
    for ratio in ("floor_ratio", "floor_ratio_beta1", "memory_ratio", "memory_increment_ratio"):
        assert setting["ratios"][ratio] > 0, ratio
    # One floor ratio per timed round, besides the ratio of the medians.
    assert len(setting["ratios"]["floor_ratio_per_round"]) == 1
    assert setting["ratios"]["floor_ratio_round_median"] == pytest.approx(setting["ratios"]["floor_ratio"])
    pairs = {(entry["before"], entry["after"]) for entry in setting["before_after"]}
    assert pairs == {("before_unbatched_cfg", "palp"), ("before_frozen_copy", "palp")}
    assert all(entry["speedup"] > 0 for entry in setting["before_after"])
    # The separate fp32 copy of the pre-trained UNet is resident memory the script's step does not have.
    variants = setting["variants"]
    assert variants["before_frozen_copy"]["resident_bytes"] > variants["palp"]["resident_bytes"]
    assert variants["palp"]["resident_bytes"] == variants["ti_db"]["resident_bytes"]


def test_scaling_table_has_one_line_per_setting(capsys):
    args = bench.parse_args(
        ["--model", "tiny", "--rank", "4", "--sizes", "64x1", "64x4", "--warmup", "0", "--repeats", "1"]
        + ["--variants", "ti_db", "palp", "passes"]
    )
    report = bench.main(args)
    sizes = [(s["resolution"], s["batch_size"]) for s in report["settings"]]
    assert sizes == [(64, 1), (64, 4)]
    table = capsys.readouterr().out.split("== scaling ==")[1]
    assert len([line for line in table.splitlines() if line.strip() and line.split()[0].isdigit()]) == 2
    # Four times the batch: the step needs more memory.
    small, large = (s["variants"]["palp"]["increment_bytes"] for s in report["settings"])
    assert large > small


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl", "tiny_sd3"])
@pytest.mark.parametrize("mode", ["dds", "none"])
def test_benchmark_step_is_training_step(mode, model):
    """The timed step computes what train_palp.training_step computes: same losses, same updated LoRA."""
    alignment = tp.AlignmentConfig(mode=mode)
    run_script, _ = tiny_run(alignment=alignment, model=model)
    run_bench, _ = tiny_run(alignment=alignment, model=model)
    for micro_step in (0, 1):
        expected = tp.training_step(run_script, micro_step)
        got = bench.benchmark_step(run_bench, micro_step)
        for a, b in zip(expected, got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    after_script, after_bench = lora_state(run_script), lora_state(run_bench)
    assert after_script.keys() == after_bench.keys()
    for name in after_script:
        torch.testing.assert_close(after_script[name], after_bench[name], rtol=0, atol=0)


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl", "tiny_sd3"])
def test_before_variants_compute_the_same_losses(model):
    """A 'before' differs from the script in cost only: same L_pers and L_align (up to float rounding)."""
    run, models = tiny_run(with_frozen_copy=True, model=model)
    beta1 = bench.replace(run, alignment=tp.AlignmentConfig(guidance_scale_personalized=1.0))
    reencode = bench.fixed_prompt_ids(models)
    cases = [
        (run, bench.StepOptions(losses=bench.palp_losses_with(bench.guided_epsilon_unbatched))),
        (run, bench.StepOptions(reencode_ids=reencode)),
        (run, bench.StepOptions(losses=bench.palp_losses_with(pretrained_unet=models.frozen_copy))),
        (
            run,
            bench.StepOptions(hoisted={"process": run.noise_process, "t_bounds": (20, 980)}),
        ),
        (beta1, bench.StepOptions(losses=bench.palp_losses_with(bench.guided_epsilon_no_skip))),
    ]
    for case_run, options in cases:
        # No optimizer step between the two: compare the losses on the same weights.
        reference = bench.benchmark_step(case_run, 5, bench.StepOptions(losses=no_update(tp.palp_losses)))
        candidate = bench.benchmark_step(case_run, 5, bench.replace(options, losses=no_update(options.losses)))
        for a, b in zip(reference, candidate):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            assert torch.isfinite(a)


def no_update(losses):
    """The losses with their gradient cut, so that the benchmark step's AdamW update leaves the weights alone."""

    def detached(*args, **kwargs):
        loss_pers, loss_align = losses(*args, **kwargs)
        return loss_pers.detach().requires_grad_(), loss_align.detach()

    return detached


@pytest.mark.parametrize("model, channels", [("tiny", 4), ("tiny_sd3", 16)])
def test_passes_alone_match_the_steps_direction(model, channels):
    """The 'passes alone' variant makes the calls palp_losses makes: same D for the same x_t2."""
    run, _ = tiny_run(model=model)
    inputs = bench.passes_inputs(run, [0])[0]
    x_t2, t2, process, cond_personal = inputs
    direction = bench.alignment_passes(run, inputs, run.alignment.guidance_scale_personalized)
    with torch.no_grad():
        with tp.lora_disabled(run.base_unet):
            g_pre = tp.guided_epsilon(run.base_unet, x_t2, t2, run.cond_clean.expand(2), run.uncond, 15.0, process)
        g_per = tp.guided_epsilon(run.base_unet, x_t2, t2, cond_personal, run.uncond, 7.5, process)
    torch.testing.assert_close(direction, g_pre - g_per)
    assert direction.shape == (2, channels, 8, 8)


def test_cpu_memory_probe_sees_an_allocation():
    one_mib = 2**20

    def allocate():
        x = torch.ones(one_mib // 4, dtype=torch.float32)
        y = x * 2  # a second MiB while x is alive
        return float(y[0])

    increment = bench.step_memory_increment(allocate, torch.device("cpu"))
    assert 2 * one_mib <= increment < 3 * one_mib


@pytest.mark.parametrize(
    "flags",
    [["--sizes", "256"], ["--resolution", "100"], ["--repeats", "0"], ["--mixed_precision", "fp16"]],
)
def test_bad_flags_are_refused(flags):
    with pytest.raises(SystemExit):
        bench.parse_args(flags)


def test_variant_selection_adds_only_what_a_comparison_needs():
    assert bench.selected_variants(["core"]) == list(bench.CORE_VARIANTS)
    assert bench.selected_variants(["before_beta1_no_skip"]) == ["palp_beta1", "before_beta1_no_skip"]
    assert bench.selected_variants(["hoisted"]) == ["palp", "hoisted"]
    assert set(bench.selected_variants(["all"])) == set(bench.ALL_VARIANTS)


def test_alternating_rounds_reverse_every_other_timed_round():
    order = []
    variants = [bench.Variant(name, lambda step, name=name: order.append((step, name))) for name in ("ti_db", "palp")]
    times = bench.time_interleaved(variants, [0, 1, 2], 1, torch.device("cpu"), "alternating")
    # The first timed round runs forwards, the next backwards; the warm-up round before them alternates too.
    assert order == [(0, "palp"), (0, "ti_db"), (1, "ti_db"), (1, "palp"), (2, "palp"), (2, "ti_db")]
    assert {name: len(values) for name, values in times.items()} == {"ti_db": 2, "palp": 2}


@pytest.mark.parametrize("model", ["tiny", "tiny_sd3"])
def test_memory_options_measure_quantized_base_and_8bit_adam_in_one_run(model, capsys):
    """--base_quantization and --use_8bit_adam: every combination measured in one run, as ratios of the
    full-precision base with AdamW; the quantized denoiser's resident bytes count bitsandbytes' scales too."""
    import bitsandbytes as bnb

    args = bench.parse_args(
        ["--model", model, "--rank", "4", "--resolution", "64", "--warmup", "0", "--repeats", "1"]
        + ["--variants", "ti_db", "palp", "--use_8bit_adam", "both", "--base_quantization", "none", "nf4"]
    )
    report = bench.main(args)
    assert "== memory: base quantization × optimizer" in capsys.readouterr().out
    rows = {(row["base_quantization"], row["optimizer"]): row for row in report["memory_options"]}
    assert set(rows) == {(b, o) for b in ("none", "nf4") for o in ("AdamW", "AdamW8bit")}
    assert rows["none", "AdamW"]["palp_peak_ratio"] == 1.0
    # NF4 stores the linear weights in half a byte (plus a 4-byte scale per 64): less resident memory.
    assert rows["nf4", "AdamW"]["palp_resident_bytes"] < rows["none", "AdamW"]["palp_resident_bytes"]
    assert rows["nf4", "AdamW"]["palp_peak_ratio"] < 1.0
    split = report["settings"][0]["unet_parameters"]
    assert 0 < split["quantized_weights"] < split["total"]

    models = bench.build_models(model, 4, torch.device("cpu"), torch.float32, 0, False, base_quantization="nf4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in models.unet.modules())
    scales = bench.quantization_state_tensors(models.unet)
    assert scales and bench.tensor_bytes(scales) > 0


def test_sd3_layout_is_trained_as_train_palp_trains_sd3():
    """--model tiny_sd3 / sd3: the MMDiT with SD3.5's dual attention and RMS q/k norm, 16 latent channels, rectified
    flow with preconditioned outputs, LoRA on both streams' attention, T5's part of the sequence as zeros."""
    from diffusers import SD3Transformer2DModel

    run, models = tiny_run(model="tiny_sd3")
    assert isinstance(run.base_unet, SD3Transformer2DModel)
    assert run.base_unet.config.in_channels == 16 and run.base_unet.config.qk_norm == "rms_norm"
    assert run.base_unet.transformer_blocks[0].attn2 is not None and run.base_unet.transformer_blocks[1].attn2 is None
    process = run.noise_process
    assert isinstance(process, tp.RectifiedFlowProcess) and process.precondition_outputs
    lora = {name for name, p in run.base_unet.named_parameters() if p.requires_grad}
    assert any(".attn.add_q_proj.lora_A" in name for name in lora) and any(
        ".attn.to_q.lora_A" in name for name in lora
    )
    cond = run.conditioner.encode(models.prompt_ids["personal"])
    assert cond.hidden.shape == (1, 77 + 256, 64) and cond.pooled.shape == (1, 16 + 32)
    assert cond.hidden[:, 77:].abs().sum() == 0 and cond.hidden[:, :77, 48:].abs().sum() == 0


def test_sd35_medium_config_builds_the_published_size():
    """The real-size config, built on the meta device (no memory): 2.24 B parameters + the 384² × 1536 positional
    table = 2.47 B, the 2.5 B published for SD3.5 Medium; pooled width = CLIP-L + CLIP-G projections."""
    from diffusers import SD3Transformer2DModel

    config = bench.SD35_MEDIUM_TRANSFORMER_CONFIG
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    parameters = sum(p.numel() for p in model.parameters())
    table = sum(b.numel() for b in model.buffers())
    assert 2.4e9 < parameters + table < 2.6e9
    _, _, (clip_l, clip_g), _ = bench.ARCHITECTURES["sd3"]
    assert config["pooled_projection_dim"] == clip_l["projection_dim"] + clip_g["projection_dim"]
    assert config["caption_projection_dim"] == config["num_attention_heads"] * config["attention_head_dim"]
    assert sum(isinstance(block.attn2, torch.nn.Module) for block in model.transformer_blocks) == 13


def test_sd3_benchmark_reports_the_ratios(capsys):
    report = bench.main(
        bench.parse_args(
            [
                "--model",
                "tiny_sd3",
                "--resolution",
                "48",
                "--rank",
                "4",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--variants",
                "core",
            ]
        )  # fmt: skip
    )
    (setting,) = report["settings"]
    assert setting["resolution"] == 48 and setting["latent_size"] == 6
    for ratio in ("floor_ratio", "floor_ratio_beta1", "memory_ratio"):
        assert setting["ratios"][ratio] > 0, ratio
    assert "floor ratio" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "tiny_sd3", "--resolution", "40"])  # not a multiple of 16
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "tiny", "--resolution", "48"])  # a UNet needs a multiple of 64
