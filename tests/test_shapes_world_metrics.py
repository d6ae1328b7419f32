"""The shapes world's metrics and diagnostics (issue 10): the (α − β) decomposition of D, the second probe, and the
counterfactual audit's key facts. Dev subjects only."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

WORLD_DIR = Path(__file__).resolve().parent.parent / "examples" / "shapes_world"
if str(WORLD_DIR) not in sys.path:
    sys.path.insert(0, str(WORLD_DIR))

import diagnostics  # noqa: E402
import probe as probe_lib  # noqa: E402
import world  # noqa: E402

PROBE_B = WORLD_DIR / "probe_b"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def probe_b():
    return probe_lib.load_probe(PROBE_B)


def test_dds_parts_sum_to_the_direction_of_train_palp():
    """D = ε^α_pre(y_c) − ε^β_per(y_P), built by train_palp's own functions, equals the sum of its three parts."""
    sys.path.insert(0, str(WORLD_DIR.parent.parent))
    import train_palp

    gen = torch.Generator().manual_seed(0)
    eps_c, eps_u, eps_p, eps_pu = (torch.randn(3, 8, 4, 4, generator=gen) for _ in range(4))
    alpha, beta = 15.0, 7.5
    direction = train_palp.alignment_direction(
        "dds",
        train_palp.classifier_free_guidance(eps_u, eps_c, alpha),
        train_palp.classifier_free_guidance(eps_pu, eps_p, beta),
    )
    parts = diagnostics.dds_parts(eps_c, eps_u, eps_p, eps_pu, alpha, beta)
    torch.testing.assert_close(sum(parts.values()), direction, rtol=0, atol=1e-5)
    # A personalized model identical to the pre-trained one, prompted with y_c: only the class pull is left.
    same = diagnostics.dds_parts(eps_c, eps_u, eps_c, eps_u, alpha, beta)
    assert same["guidance_gap"].abs().max() == 0 and same["uncond_gap"].abs().max() == 0
    torch.testing.assert_close(same["class_pull"], (alpha - beta) * (eps_c - eps_u))


def test_share_along_and_rms():
    u = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    d = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    assert diagnostics.share_along(d, u).item() == pytest.approx(9 / 25)
    assert diagnostics.rms(d).item() == pytest.approx(2.5)


def test_blur_and_pale_keep_the_images_shape_and_range():
    rng = np.random.default_rng(0)
    images = np.stack([np.asarray(world.render(world.subject_scene("checkered_star", rng))) for _ in range(2)])
    for out in (diagnostics.box_blur(images, 4), diagnostics.gaussian_blur(images, 1.5),
                diagnostics.pale(images, 0.5), diagnostics.low_contrast(images, 0.4)):
        assert out.shape == images.shape and out.dtype == np.uint8
    # Blur ÷4 wipes the 3-pixel check: the fill's local contrast drops.
    assert diagnostics.box_blur(images, 4).astype(float).std() < images.astype(float).std()


def test_context_of_a_clean_prompt():
    ctx = diagnostics.context_of("a sketch of a star with a small circle at night")
    assert ctx == {"style": "sketch", "companion": "circle", "night": True}
    assert diagnostics.context_of("a photo of a star on a blue background")["background"] == "blue"


def test_probe_b_reads_ground_truth_renders(probe_b):
    images, labels = probe_lib.render_set(64, seed=12345)
    acc = probe_lib.accuracy(probe_b, images, labels)
    assert min(acc.values()) >= 0.9, acc
    # The dev subjects' own photos, in their training context: the whole identity.
    for name, subject in world.SUBJECTS.items():
        photos = diagnostics.render_subject(name, 8, seed=7)
        rates = diagnostics.attribute_rates(probe_lib.classify(probe_b, photos), subject)
        assert rates["identity_exact"] >= 0.85, (name, rates)


def pale_plain(name, subject, n, seed):
    """The subject with its pattern removed, filled with its pale mean fill colour (a blurred copy's colour)."""
    world.OBJECT_RGB["_mean_fill"] = diagnostics.mean_fill_colour(subject)
    try:
        return diagnostics.render_subject(name, n, seed=seed, pattern="plain", colour="_mean_fill")
    finally:
        del world.OBJECT_RGB["_mean_fill"]


def test_no_probe_reads_a_plain_subject_coloured_shape_as_the_subjects_pattern(probe_b):
    probes = {"A": probe_lib.load_probe(), "B": probe_b}
    for name, subject in world.SUBJECTS.items():
        plain = diagnostics.render_subject(name, 16, seed=3, pattern="plain")
        for label, p in probes.items():
            rates = diagnostics.attribute_rates(probe_lib.classify(p, plain), subject)
            assert rates["pattern_hit"] <= 0.1 and rates["colour_hit"] >= 0.9, (label, name, rates)


def test_the_shipped_probe_does_not_read_a_plain_pale_yellow_star_as_checkered():
    """Issue 10's suspicion, measured: a plain star of the checkered star's pale mean fill colour is not 'checkered'
    for the shipped probe (the audit: 0 of 32). (Probe B does call it checkered in most of them: see audit.md.)"""
    subject = world.SUBJECTS["checkered_star"]
    images = pale_plain("checkered_star", subject, 16, seed=3)
    for batch in (images, diagnostics.box_blur(images, 2)):
        preds = probe_lib.classify(probe_lib.load_probe(), batch)
        assert diagnostics.attribute_rates(preds, subject)["pattern_hit"] <= 0.1


def test_probe_b_reports_plain_where_blur_wipes_the_pattern(probe_b):
    """Area-downsampled to 8 px the checks and rings are gone; probe B was trained to call that fill plain (the
    shipped probe still reports the subject's pattern in about half of them: see audit.md)."""
    preds = []
    for name in ("checkered_star", "ringed_circle", "checkered_triangle"):
        preds += probe_lib.classify(probe_b, diagnostics.box_blur(diagnostics.render_subject(name, 16, seed=5), 4))
    assert np.mean([p["pattern"] == "plain" for p in preds]) >= 0.8


def test_gradient_diagnostics_run_on_the_shipped_model():
    """diagnostics.py's gradient measurement builds the models as train_palp.py does and reproduces palp_losses'
    alignment term from D (it raises if not): one draw on the shipped model, at step 0."""
    import types

    train_palp = diagnostics.import_train_palp()
    args = types.SimpleNamespace(model=str(WORLD_DIR / "model"), tidb_steps=1, alpha=15.0, beta=7.5)
    models = diagnostics.build_models(train_palp, args, "checkered_star")
    records, grads = diagnostics.measure_draws(train_palp, models, "checkered_star", 1, 15.0, 7.5, 1.0, seed=0)
    (record,) = records
    assert record["rms_pers_grad"] > 0 and record["rms_lambda_D"] > 0
    assert 0.0 <= record["class_pull_share"] <= 1.0
    # Step 0: the LoRA is zero, so its gradient comes from B alone; both terms reach it and the token row.
    assert all(torch.isfinite(g).all() and g.norm() > 0 for g in grads[0])
    # The balance diagnostics (normalised D, with and without the projection) on the same models, one batch of 2.
    (balance,) = diagnostics.measure_balance(train_palp, models, "checkered_star", 1, 2, 15.0, 7.5, seed=0)
    assert {k for _, k in diagnostics.BALANCE_COLUMNS} <= set(balance)
    assert all(np.isfinite(v) for v in balance.values())
    assert balance["lora_ratio"] > 0 and balance["projected_lora_ratio"] > 0
    assert -1 <= balance["cos_D_residual"] <= 1 and balance["share_conflicting"] in (0.0, 0.5, 1.0)
