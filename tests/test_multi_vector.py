"""--num_vectors: a placeholder token with N embedding rows, <t> <t>_1 … <t>_{N-1}, in both training scripts.

Each family's outputs load into a fresh stock pipeline (load_textual_inversion for SD and SDXL, the model card's lines
for SD3), whose prompt encoding equals training's for a prompt that holds <t>; resume is bit-exact; one vector writes
the one-row file it always wrote; bad values fail before any model loads.
"""

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import TextualInversionLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file

import train_palp as tp
import train_palp_multi_subject as tpm
from conftest import build_tiny_clip_tokenizer, load_example, write_instance_images
from test_train_palp import TARGET, TOKEN, base_args, train

N = 3
EXPANDED = TARGET.replace(TOKEN, f"{TOKEN} {TOKEN}_1 {TOKEN}_2")
sample_palp = load_example("sample_palp")


def trained_run(model, tmp_path_factory, name, *extra):
    tmp = tmp_path_factory.mktemp(name)
    out = tmp / "out"
    run = train(model, str(write_instance_images(tmp / "instance")), out, "--num_vectors", str(N),
                "--max_train_steps", "2", *extra)  # fmt: skip
    return run, out


def check_rows_trained(run, state, keys):
    """N rows per encoder, each started from the class noun and moved by training, as the run holds them."""
    for embedding, tokenizer, key in zip(run.conditioner.embeddings, run.conditioner.tokenizers, keys):
        assert state[key].shape == (N, embedding.rows.shape[1])
        torch.testing.assert_close(state[key], embedding.rows.detach().float(), atol=0, rtol=0)
        initial = embedding.base.weight[tokenizer.encode("cat", add_special_tokens=False)].float().mean(0)
        assert all((row - initial).abs().max() > 0 for row in state[key])


def test_defaults_are_the_measured_ones_in_train_palp_and_the_papers_in_the_multi_subject_script(
    tiny_sd_path, tmp_path
):
    """train_palp.py trains 4 vectors at λ = 0.1 unless told otherwise, and its file loads as 4 rows into a stock
    pipeline; the multi-subject script keeps one vector and λ = 1."""
    from test_multi_subject import common_flags, subject_flags

    photos, out = str(write_instance_images(tmp_path / "instance")), tmp_path / "out"
    pinned = base_args(tiny_sd_path, photos, out)
    for flag in ("--num_vectors", "--alignment_weight"):
        i = pinned.index(flag)
        del pinned[i : i + 2]
    defaults = tp.parse_args(pinned)
    assert (defaults.num_vectors, defaults.alignment_weight) == (4, 0.1)
    multi = tpm.parse_args([*subject_flags(photos, photos), *common_flags(tiny_sd_path, tmp_path / "m")])
    assert (multi.num_vectors, multi.alignment_weight) == (1, 1.0)

    tp.main(tp.parse_args(pinned + ["--max_train_steps", "2", "--num_validation_images", "0"]))
    state = load_file(out / "learned_embeds.safetensors")
    assert list(state) == [TOKEN] and state[TOKEN].shape == (4, 32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    assert pipe.tokenizer.convert_tokens_to_ids([f"{TOKEN}_3"])[0] != pipe.tokenizer.unk_token_id


# ------------------------------------------------------------------------------------------------- SD 1.x/2.x
@pytest.fixture(scope="module")
def sd_run(tiny_sd_path, tmp_path_factory):
    return trained_run(tiny_sd_path, tmp_path_factory, "mv-sd")


def test_sd_file_holds_n_rows_and_every_prompt_holds_the_n_tokens(sd_run):
    run, out = sd_run
    state = load_file(out / tp.EMBEDDINGS_NAME)
    assert list(state) == [TOKEN]
    check_rows_trained(run, state, [TOKEN])
    tokenizer = run.conditioner.tokenizers[0]
    ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"])
    assert run.embedding.token_ids.tolist() == ids
    # y_P and the target prompt carry the three tokens in a row; y_c and ∅ hold none.
    for prompt in (f"A photo of {TOKEN}", TARGET):
        row = run.conditioner.tokenize([prompt])[0][0].tolist()
        start = row.index(ids[0])
        assert row[start : start + N] == ids and sum(i in ids for i in row) == N
    assert run.conditioner.expand([f"A photo of {TOKEN}", "A sketch of a cat in Paris", ""]) == [
        f"A photo of {TOKEN} {TOKEN}_1 {TOKEN}_2", "A sketch of a cat in Paris", ""]  # fmt: skip
    assert (out / "samples" / "final_0.png").is_file()
    card = (out / "README.md").read_text()
    assert f"{N} embedding vectors (`{TOKEN} {TOKEN}_1 {TOKEN}_2`)" in card and "| `num_vectors` | `3` |" in card
    # The pipeline expands the token itself: its call in the card holds it as the user writes it.
    assert f'image = pipe("{TARGET}")' in card


def test_sd_outputs_load_into_a_stock_pipeline_that_encodes_as_training(sd_run, tiny_sd_path):
    run, out = sd_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion(out / tp.EMBEDDINGS_NAME)
    assert pipe.maybe_convert_prompt(TARGET, pipe.tokenizer) == EXPANDED == run.conditioner.expand([TARGET])[0]
    ids = pipe.tokenizer(EXPANDED, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, run.conditioner.tokenize([TARGET])[0])
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(TARGET, "cpu", 1, False)
        ours = run.conditioner.encode(run.conditioner.tokenize([TARGET])).hidden
    torch.testing.assert_close(embeds, ours, atol=1e-6, rtol=1e-6)
    # examples/sample_palp.py loads it the same way, and leaves the expansion to the pipeline.
    lora, embeddings = sample_palp.find_trained_weights(str(out), tp.LORA_NAME, [])
    loaded = sample_palp.load_pipeline(tiny_sd_path, lora, embeddings, "cpu", torch.float32)
    assert sample_palp.pipeline_prompt(loaded, TARGET) == TARGET
    assert loaded.maybe_convert_prompt(TARGET, loaded.tokenizer) == EXPANDED


def test_resume_with_n_vectors_is_bit_exact(tiny_sd_path, tmp_path):
    instance = str(write_instance_images(tmp_path / "i"))
    common = ("--num_vectors", str(N), "--checkpointing_steps", "2", "--num_validation_images", "0")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_sd_path, instance, full, *common)
    train(tiny_sd_path, instance, resumed, *common, "--max_train_steps", "2")
    (resumed / tp.LORA_NAME).unlink()
    saved = load_file(resumed / "checkpoint-2" / tp.EMBEDDINGS_NAME)[TOKEN]
    assert saved.shape == (N, 32)
    train(tiny_sd_path, instance, resumed, *common, "--resume_from_checkpoint", "latest")
    for name in (tp.LORA_NAME, tp.EMBEDDINGS_NAME, "checkpoint-4/" + tp.EMBEDDINGS_NAME,
                 "checkpoint-4/" + tp.OPTIMIZER_TENSORS_NAME):  # fmt: skip
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (load_file(resumed / tp.EMBEDDINGS_NAME)[TOKEN] - saved).abs().max() > 0


def test_a_checkpoint_of_another_num_vectors_is_refused_clearly(tiny_sd_path, tmp_path):
    instance = str(write_instance_images(tmp_path / "i"))
    common = ("--checkpointing_steps", "1", "--num_validation_images", "0")
    train(tiny_sd_path, instance, tmp_path / "out", *common, "--max_train_steps", "1")
    with pytest.raises(SystemExit, match=r"checkpoint-1.*trained with --num_vectors 1, not 3"):
        tp.cli(base_args(tiny_sd_path, instance, tmp_path / "out", *common, "--num_vectors", str(N),
                         "--resume_from_checkpoint", "latest", "--overwrite_output_dir"))  # fmt: skip


def test_one_vector_writes_the_one_row_file_it_always_wrote(tiny_sd_path, tmp_path):
    from transformers import CLIPTokenizer

    instance = str(write_instance_images(tmp_path / "i"))
    common = ("--max_train_steps", "1", "--num_validation_images", "0")
    run = train(tiny_sd_path, instance, tmp_path / "default", *common)
    train(tiny_sd_path, instance, tmp_path / "one", *common, "--num_vectors", "1")
    default, one = (tmp_path / name / tp.EMBEDDINGS_NAME for name in ("default", "one"))
    assert default.read_bytes() == one.read_bytes()
    with safe_open(str(default), framework="pt") as f:
        assert list(f.keys()) == [TOKEN] and f.get_tensor(TOKEN).shape == (1, 32)
        assert f.metadata() == {"placeholder_token": TOKEN}
    base = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    tokenizer = run.conditioner.tokenizers[0]
    assert len(tokenizer) == len(base) + 1 and f"{TOKEN}_1" not in tokenizer.get_vocab()
    assert run.conditioner.expand([TARGET]) == [TARGET] and tp.expand_placeholders(TARGET, [TOKEN], 1) == TARGET
    card = (tmp_path / "default" / "README.md").read_text()
    assert "embedding vectors" not in card
    # SD3's card lines for one vector are the ones it always wrote.
    assert tp.SD3TextConditioner([]).load_code("repo", [("f.safetensors", TOKEN)]).splitlines()[1:] == [
        'state = load_file(hf_hub_download("repo", "f.safetensors"))  # a local folder: load_file(path)',
        'for key, encoder, tokenizer in [("clip_l", pipe.text_encoder, pipe.tokenizer),',
        '                                ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)]:',
        f'    tokenizer.add_tokens("{TOKEN}")',
        "    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)",
        f'    row = tokenizer.convert_tokens_to_ids("{TOKEN}")',
        "    encoder.get_input_embeddings().weight.data[row] = state[key][0].to(encoder.device, encoder.dtype)",
    ]


# ------------------------------------------------------------------------------------------------- SDXL
def test_sdxl_outputs_load_with_two_load_textual_inversion_calls_and_encode_as_training(
    tiny_sdxl_path, tmp_path_factory
):
    run, out = trained_run(tiny_sdxl_path, tmp_path_factory, "mv-sdxl")
    state = load_file(out / tp.EMBEDDINGS_NAME)
    assert set(state) == {"clip_l", "clip_g"}
    check_rows_trained(run, state, ("clip_l", "clip_g"))
    assert (out / "samples" / "final_0.png").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_lora_weights(out)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert pipe.maybe_convert_prompt(TARGET, tokenizer) == EXPANDED
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(TARGET, device="cpu", do_classifier_free_guidance=False)
        ours = run.conditioner.encode(run.conditioner.tokenize([TARGET]))
    torch.testing.assert_close(embeds, ours.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ours.text_embeds, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- SD3
def card_load(pipe, out, card):
    """The model card's lines, run as written, with the download replaced by the local file."""
    code = card.split("```python\n")[1].split("```")[0].splitlines()
    start = next(i for i, line in enumerate(code) if line.startswith("state = load_file(hf_hub_download("))
    end = next(i for i, line in enumerate(code) if line.startswith("image = pipe("))
    exec("\n".join(code[start + 1 : end]), {"pipe": pipe, "state": load_file(out / tp.EMBEDDINGS_NAME)})
    return code[end]


def test_sd3_card_adds_the_n_tokens_and_its_expanded_prompt_encodes_as_training(tiny_sd3_path, tmp_path_factory):
    run, out = trained_run(tiny_sd3_path, tmp_path_factory, "mv-sd3")
    state = load_file(out / tp.EMBEDDINGS_NAME)
    check_rows_trained(run, state, ("clip_l", "clip_g"))
    assert (out / "samples" / "final_0.png").is_file()
    # T5 has no token and reads the expanded prompt as text, as the stock pipeline given it does.
    assert f"{TOKEN}_1" not in run.conditioner.t5_tokenizer.get_vocab()
    card = (out / "README.md").read_text()
    assert run.conditioner.inference_prompt(TARGET) == EXPANDED
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    assert card_load(pipe, out, card).startswith(f'image = pipe("{EXPANDED}", max_sequence_length=')
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(EXPANDED, None, None, device="cpu")
        ours = run.conditioner.encode(run.conditioner.tokenize([TARGET]))
    torch.testing.assert_close(ours.hidden, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, atol=1e-5, rtol=1e-5)
    # examples/sample_palp.py adds the same tokens and rows and expands prompts as maybe_convert_prompt would.
    lora, embeddings = sample_palp.find_trained_weights(str(out), tp.LORA_NAME, [])
    loaded = sample_palp.load_pipeline(tiny_sd3_path, lora, embeddings, "cpu", torch.float32)
    for tokenizer, encoder, card_tokenizer, card_encoder in (
        (loaded.tokenizer, loaded.text_encoder, pipe.tokenizer, pipe.text_encoder),
        (loaded.tokenizer_2, loaded.text_encoder_2, pipe.tokenizer_2, pipe.text_encoder_2),
    ):
        assert tokenizer.get_vocab() == card_tokenizer.get_vocab()
        torch.testing.assert_close(encoder.get_input_embeddings().weight, card_encoder.get_input_embeddings().weight)
    assert sample_palp.pipeline_prompt(loaded, TARGET) == EXPANDED
    assert TextualInversionLoaderMixin._maybe_convert_prompt(loaded, TARGET, loaded.tokenizer) == EXPANDED
    samples = sample_palp.main(sample_palp.parse_args([
        "--trained_dir", str(out), "--output_dir", str(out.parent / "samples"), "--resolution", "32",
        "--num_inference_steps", "2", "--device", "cpu", "--seeds", "0"]))  # fmt: skip
    assert samples[0][0].size == (32, 32)


# ------------------------------------------------------------------------------------------------- multi-subject
def test_multi_subject_script_with_two_vectors_per_token(tiny_sd_path, tmp_path):
    from test_multi_subject import ART, CAT, common_flags, subject_flags
    from test_multi_subject import TARGET as MULTI_TARGET

    cat = write_instance_images(tmp_path / "cat", n=2)
    art = write_instance_images(tmp_path / "art", n=1, seed=7)
    out = tmp_path / "out"
    flags = [*subject_flags(str(cat), str(art)), *common_flags(tiny_sd_path, out), "--max_train_steps", "2",
             "--num_vectors", "2", "--num_validation_images", "0"]  # fmt: skip
    run = tpm.main(tpm.parse_args(flags))
    assert run.embedding.rows.shape == (4, 32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.load_lora_weights(out)
    for index, token in enumerate((CAT, ART)):
        state = load_file(out / tpm.embedding_file_name(token, single=False))
        assert list(state) == [token] and state[token].shape == (2, 32)
        torch.testing.assert_close(state[token], run.embedding.rows[2 * index : 2 * index + 2].detach())
        pipe.load_textual_inversion(out / tpm.embedding_file_name(token, single=False))
    expanded = MULTI_TARGET.replace(CAT, f"{CAT} {CAT}_1").replace(ART, f"{ART} {ART}_1")
    assert pipe.maybe_convert_prompt(MULTI_TARGET, pipe.tokenizer) == expanded
    assert run.conditioner.expand([MULTI_TARGET]) == [expanded]
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(MULTI_TARGET, "cpu", 1, False)
        ours = run.conditioner.encode(run.conditioner.tokenize([MULTI_TARGET])).hidden
    torch.testing.assert_close(embeds, ours, atol=1e-6, rtol=1e-6)
    card = (out / "README.md").read_text()
    assert f"- Embedding vectors per token: 2 (`{CAT} {CAT}_1`, …)" in card


def test_multi_subject_tokens_that_contain_one_another_are_refused_with_several_vectors(tmp_path):
    cat = str(write_instance_images(tmp_path / "cat", n=1))
    flags = ["--instance_data_dir", cat, "--placeholder_token", "<cat>", "--class_name", "cat",
             "--instance_data_dir", cat, "--placeholder_token", "<cat>2", "--class_name", "cat",
             "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--target_prompt", "<cat> and <cat>2",
             "--clean_prompt", "a cat and a cat", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    tpm.parse_args(flags)  # one vector each: nothing is rewritten
    with pytest.raises(tpm.UserInputError, match=r"'<cat>2' contains '<cat>'.*--num_vectors 2"):
        tpm.parse_args([*flags, "--num_vectors", "2"])


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("value", ["0", "-2"])
def test_num_vectors_below_one_fails_before_any_model_loads(tmp_path, value):
    instance = str(write_instance_images(tmp_path / "i", n=1))
    missing_model = str(tmp_path / "no-model")  # loading anything would fail on it with another message
    with pytest.raises(SystemExit) as info:
        tp.cli(base_args(missing_model, instance, tmp_path / "out", "--num_vectors", value))
    assert str(info.value) == f"error: --num_vectors must be a positive integer, got {value}."
    flags = ["--instance_data_dir", instance, "--placeholder_token", TOKEN, "--class_name", "cat",
             "--pretrained_model_name_or_path", missing_model, "--target_prompt", TARGET, "--clean_prompt", "a cat",
             "--output_dir", str(tmp_path / "out"), "--num_vectors", value]  # fmt: skip
    with pytest.raises(SystemExit, match=f"--num_vectors must be a positive integer, got {value}"):
        tpm.cli(flags)


def test_vector_token_names_already_in_the_vocabulary_are_refused(tiny_sd_path, tmp_path):
    tokenizer = build_tiny_clip_tokenizer()
    tokenizer.add_tokens([f"{TOKEN}_2"])
    size = len(tokenizer)
    with pytest.raises(tp.UserInputError, match=rf"--num_vectors 3 adds the tokens .*'{TOKEN}_2' is already in"):
        tp.add_placeholder_tokens(tokenizer, None, [TOKEN], ["cat"], num_vectors=3)
    assert len(tokenizer) == size  # refused before anything was added
    # End to end: a model whose tokenizer already holds <my-cat>_1 stops with the message, nothing written.
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_path, model)
    saved = build_tiny_clip_tokenizer()
    saved.add_tokens([f"{TOKEN}_1"])
    saved.save_pretrained(model / "tokenizer")
    instance = str(write_instance_images(tmp_path / "i", n=1))
    with pytest.raises(SystemExit, match=rf"'{TOKEN}_1' is already in the tokenizer's vocabulary"):
        tp.cli(base_args(str(model), instance, tmp_path / "out", "--num_vectors", "2"))
    assert not (tmp_path / "out" / tp.LORA_NAME).exists() and Path(model / "model_index.json").is_file()
