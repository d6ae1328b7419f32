"""--base_quantization: the frozen UNet (or SD3 transformer) loaded quantized by bitsandbytes through diffusers' BitsAndBytesConfig.

The training scripts load the quantized UNet exactly as on a GPU: ``UNet2DConditionModel.from_pretrained(...,
quantization_config=BitsAndBytesConfig(...), torch_dtype=<training dtype>, device_map={"": accelerator.device})``.
On this CPU machine two things stand in the way, and the ``cpu_quantizer`` fixture patches them for these tests only:

* ``BnB4BitDiffusersQuantizer.validate_environment`` and ``BnB8BitDiffusersQuantizer.validate_environment``
  (diffusers.quantizers.bitsandbytes.bnb_quantizer) raise "No GPU found. A GPU is needed for quantization." when
  torch sees no CUDA/XPU/MPS device; the fixture replaces both with a no-op. Everything else is diffusers' and
  bitsandbytes' own code: the layers are really replaced by ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` and quantized
  on the CPU by bitsandbytes' CPU kernels. ``update_device_map``, the other method that asks CUDA for a device, is
  not reached, because the scripts pass ``device_map`` themselves.
* On a CPU with AVX512-BF16, ``bnb.nn.Linear4bit.forward`` repacks its weight for a CPU inference kernel the first
  time it runs in eval mode without gradients (validation), and that repacking assumes an input width that is a
  multiple of the 4-bit block (64): every Stable Diffusion layer meets it (320 … 2816), the tiny test models' 16- and
  32-wide layers do not ("shape '[64, 0]' is invalid"). The fixture makes ``Linear4bit`` see a CPU without
  AVX512-BF16, so the suite takes the same bitsandbytes path on every CI machine; a GPU never takes either.

The runs use mixed precision "no" (NF4 computes in fp32, LLM.int8() in fp16, as bitsandbytes does); bf16 autocast on
the CPU is not exercised (torch's CPU group_norm rejects the fp32 output of a quantized layer next to bf16 norm
weights, which CUDA autocast does not meet because it runs group_norm in fp32).
"""

import json

import bitsandbytes as bnb
import pytest
import torch
from diffusers import (
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file
from test_multi_subject import common_flags, subject_flags
from test_sd3 import load_into as load_sd3_embedding
from test_sd3 import load_pipeline as load_sd3_pipeline
from test_sdxl import load_into

import train_palp as tp
import train_palp_multi_subject as tpm
from conftest import write_instance_images
from test_train_palp import TARGET, TOKEN, base_args, generate, train

QUANTIZED_LAYER = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


@pytest.fixture
def cpu_quantizer(monkeypatch):
    """Lift diffusers' "No GPU found" check and bitsandbytes' AVX512-BF16 repacking (see the module doc)."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer

    for quantizer in (BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(quantizer, "validate_environment", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)


def quantized_unet(path, mode):
    """The base UNet quantized as the scripts load it, without a LoRA."""
    return UNet2DConditionModel.from_pretrained(
        path,
        subfolder="unet",
        quantization_config=tp.base_quantization_config(mode, torch.float32),
        torch_dtype=torch.float32,
        device_map={"": torch.device("cpu")},
    )


def lora_layers(unet):
    return [module for module in unet.modules() if hasattr(module, "lora_A") and len(module.lora_A) > 0]


@pytest.mark.parametrize(
    "family, mode",
    [("sd", "nf4"), ("sd", "int8"), ("sdxl", "nf4"), ("sdxl", "int8"), ("sd3", "nf4"), ("sd3", "int8")],
    ids=lambda value: value,
)
def test_quantized_base_outputs_load_into_an_unquantized_pipeline(
    family, mode, cpu_quantizer, tiny_sd_path, tiny_sdxl_path, tiny_sd3_no_t5_path, instance_dir, tmp_path
):
    path, pipeline_class = {
        "sd": (tiny_sd_path, StableDiffusionPipeline),
        "sdxl": (tiny_sdxl_path, StableDiffusionXLPipeline),
        "sd3": (tiny_sd3_no_t5_path, StableDiffusion3Pipeline),
    }[family]
    plain_out, out = tmp_path / "plain", tmp_path / "quantized"
    train(path, instance_dir, plain_out, "--max_train_steps", "1", "--num_validation_images", "0")
    run = train(path, instance_dir, out, "--base_quantization", mode, "--max_train_steps", "3")

    # The run really trained on a quantized base: every LoRA sits on a bitsandbytes layer, the LoRA and token rows
    # are fp32 and were trained.
    layers = lora_layers(run.base_unet)
    assert layers and all(isinstance(layer.base_layer, QUANTIZED_LAYER[mode]) for layer in layers)
    assert all(p.dtype == torch.float32 for p in run.trainable)
    assert json.loads((out / tp.CONFIG_NAME).read_text())["base_quantization"] == mode
    assert (out / "samples").is_dir() and any((out / "samples").iterdir())  # validation sampled the quantized UNet

    # The saved LoRA is plain fp32 tensors with exactly the keys of an unquantized run: nothing of the quantization.
    lora = load_file(out / tp.LORA_NAME)
    assert lora.keys() == load_file(plain_out / tp.LORA_NAME).keys()
    assert all(value.dtype == torch.float32 for value in lora.values())
    assert max(value.abs().max() for key, value in lora.items() if "lora_B" in key or "lora.up" in key) > 0

    # A stock, unquantized pipeline takes the LoRA and the embedding, and they change its image.
    pipe = load_sd3_pipeline(path) if family == "sd3" else pipeline_class.from_pretrained(path)
    base_image = generate(pipe, TARGET.replace(TOKEN, "a cat"))
    pipe.load_lora_weights(out)
    assert len(lora_layers(pipe.transformer if family == "sd3" else pipe.unet)) == len(layers)
    if family == "sd":
        pipe.load_textual_inversion(out / "learned_embeds.safetensors")
    else:
        (load_sd3_embedding if family == "sd3" else load_into)(pipe, out)
    image = generate(pipe, TARGET)
    assert abs(image - base_image).max() > 1e-3


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_pretrained_prediction_is_the_quantized_unet_with_its_lora_off(
    mode, cpu_quantizer, tiny_sd_path, instance_dir, tmp_path, monkeypatch
):
    """PALP's ε^α_pre is the quantized base model itself: the alignment branch's pre-trained prediction, replayed on a
    freshly loaded quantized UNet without any LoRA, is identical; the full-precision UNet gives another one."""
    calls = []
    guided_epsilon = tp.guided_epsilon

    def recording(unet, *args):
        result = guided_epsilon(unet, *args)
        lora_off = all(layer.disable_adapters for layer in lora_layers(unet))
        calls.append((lora_off, [a.clone() if torch.is_tensor(a) else a for a in args], result.clone()))
        return result

    monkeypatch.setattr(tp, "guided_epsilon", recording)
    run = train(
        tiny_sd_path, instance_dir, tmp_path / "out", "--base_quantization", mode, "--num_validation_images", "0"
    )
    pretrained = [(args, result) for lora_off, args, result in calls if lora_off]
    personalized = [(args, result) for lora_off, args, result in calls if not lora_off]
    assert len(pretrained) == len(personalized) == run.global_step

    # In the mode the training UNet is in: on the CPU, bitsandbytes' int8 layer computes differently while training
    # (dequantized weights in fp32) and in eval mode (int8 matmul on fp16-cast inputs).
    fresh = quantized_unet(tiny_sd_path, mode).train()
    full_precision = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    with torch.no_grad():
        for args, result in pretrained:
            assert torch.equal(guided_epsilon(fresh, *args), result)
            assert (guided_epsilon(full_precision, *args) - result).abs().max() > 1e-4
        # With the LoRA on, the personalized model differs from the base (the LoRA trained after step 1).
        args, result = personalized[-1]
        assert (guided_epsilon(fresh, *args) - result).abs().max() > 0


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_quantized_base_run_resumes_bit_exact(
    family, cpu_quantizer, tiny_sd_path, tiny_sd3_no_t5_path, instance_dir, tmp_path
):
    path = {"sd": tiny_sd_path, "sd3": tiny_sd3_no_t5_path}[family]
    common = ("--base_quantization", "nf4", "--checkpointing_steps", "2", "--num_validation_images", "0")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(path, instance_dir, full, *common)
    train(path, instance_dir, resumed, *common, "--max_train_steps", "2")
    saved_step2 = load_file(resumed / "checkpoint-2" / tp.LORA_NAME)
    assert all(value.dtype == torch.float32 for value in saved_step2.values())
    (resumed / tp.LORA_NAME).unlink()
    result = train(path, instance_dir, resumed, *common, "--resume_from_checkpoint", "checkpoint-2")
    assert result.global_step == 4
    for name in (tp.LORA_NAME, tp.EMBEDDINGS_NAME):  # the LoRA, and the token rows (one file per encoder's key)
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(load_file(full / tp.LORA_NAME)[next(iter(saved_step2))], next(iter(saved_step2.values())))


def test_multi_subject_script_trains_on_a_quantized_base(cpu_quantizer, tiny_sd_path, tmp_path):
    cat = write_instance_images(tmp_path / "cat", n=2, seed=0)
    art = write_instance_images(tmp_path / "art", n=1, seed=7)
    out = tmp_path / "out"
    flags = common_flags(tiny_sd_path, out) + subject_flags(str(cat), str(art))
    run = tpm.main(tpm.parse_args(flags + ["--base_quantization", "nf4", "--num_validation_images", "0"]))
    layers = lora_layers(run.base_unet)
    assert layers and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers)
    assert all(value.dtype == torch.float32 for value in load_file(out / tp.LORA_NAME).values())
    assert run.global_step == 4


def test_base_quantization_without_a_gpu_stops_before_loading(tiny_sd_path, instance_dir, tmp_path, monkeypatch):
    """Unpatched, diffusers' own environment check speaks, turned into one line that names the flag."""
    for backend in (torch.cuda, torch.xpu, torch.mps):
        monkeypatch.setattr(backend, "is_available", lambda: False)
    with pytest.raises(tp.UserInputError, match=r"--base_quantization nf4: No GPU found.*Drop the flag"):
        tp.parse_args(base_args(tiny_sd_path, instance_dir, tmp_path / "out", "--base_quantization", "nf4"))


def test_base_quantization_without_bitsandbytes_names_the_package(tiny_sd_path, instance_dir, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    with pytest.raises(tp.UserInputError, match=r"--base_quantization needs the 'bitsandbytes' package"):
        tp.parse_args(base_args(tiny_sd_path, instance_dir, tmp_path / "out", "--base_quantization", "int8"))
    # Without the flag, bitsandbytes is not asked for.
    assert tp.parse_args(base_args(tiny_sd_path, instance_dir, tmp_path / "out")).base_quantization == "none"
