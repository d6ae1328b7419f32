"""Measure before changing (issue 10): why PALP's alignment term costs subject fidelity in the shapes world.

Four measurements, each a sub-command writing a JSON file and a markdown table to ``--output_dir``
(default ``results/diagnostics/``). Only the dev split is used (``world.SUBJECTS``, ``world.TARGET_TEMPLATES``).

- ``gradients``: the two PALP terms on the shipped model, at the world's settings (batch 4, LoRA rank 8, α = 15,
  β = 7.5, λ = 1, same noise, rescale on, t1, t2 drawn as training draws them over [0.02T, 0.98T]). Per draw: the
  rms of λ·D and of 2(ε̂ − ε) (the per-element gradients of the two terms on ε̂, up to the common 1/N), the LoRA- and
  token-row-gradient norms of each term (one backward pass per term, for the diagnostic only) and their cosines, and
  how much of D is the (α − β)·(ε_c − ε_∅) term of the pre-trained model. Binned by t1 and by t2 (σ1 and σ2 on the
  flow world); at step 0 (LoRA zero, token = class noun) and after 100 TI+DB steps (``train_palp.py
  --alignment_mode none``, run in this process). Runs on either world model: the noise process, the conditioning
  and the token rows are train_palp's (``--model model_flow`` writes ``gradients_flow.*``).
- ``cfg``: the base model's probe accuracy on held-out captions at CFG 5, 7.5, 10, 15 (``probe.py evaluate``), and its
  prompt alignment on the dev clean prompts at those scales.
- ``ceiling``: each dev subject rendered in each of its target contexts, raw and after the autoencoder, scored with
  both probes: what each prompt allows at best.
- ``audit``: counterfactual images of the dev subjects (pattern removed, another colour, blurred, pale, a plain pale
  star of the subject's mean colour, ...) and what each probe reports.

    OMP_NUM_THREADS=1 python examples/shapes_world/diagnostics.py gradients
    OMP_NUM_THREADS=1 python examples/shapes_world/diagnostics.py gradients --model examples/shapes_world/model_flow
    OMP_NUM_THREADS=1 python examples/shapes_world/diagnostics.py cfg
    OMP_NUM_THREADS=1 python examples/shapes_world/diagnostics.py ceiling
    OMP_NUM_THREADS=1 python examples/shapes_world/diagnostics.py audit

The PALP mathematics is not re-implemented here: the losses come from ``train_palp.palp_losses`` and D from
``train_palp.guided_epsilon`` / ``alignment_direction``, and every draw checks that ``palp_alignment_loss`` of that D
reproduces ``palp_losses``' alignment term.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import probe as probe_lib
import torch
import torch.nn.functional as F
import world

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
DEFAULT_OUTPUT = HERE / "results" / "diagnostics"
PROBE_B = HERE / "probe_b"
APPEARANCE = ("colour", "pattern")


def import_train_palp():
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_palp

    return train_palp


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/test_shapes_world_metrics.py)


def dds_parts(eps_c, eps_u, eps_p, eps_pu, alpha, beta):
    """D = ε^α_pre(y_c) − ε^β_per(y_P) split into three parts that sum to it exactly:

    - ``class_pull`` = (α − β)·(ε_c − ε_∅) of the pre-trained model: it does not cancel even when the personalized
      model equals the pre-trained one and y_P means y_c (an SDS-like pull towards a generic class member);
    - ``guidance_gap`` = β·((ε_c − ε_∅) − (ε'_P − ε'_∅)): the difference of the two models' guidance directions;
    - ``uncond_gap`` = ε_∅ − ε'_∅: the difference of their unconditional predictions.
    (ε = pre-trained, ε' = personalized.)"""
    delta_pre = eps_c - eps_u
    delta_per = eps_p - eps_pu
    return {
        "class_pull": (alpha - beta) * delta_pre,
        "guidance_gap": beta * (delta_pre - delta_per),
        "uncond_gap": eps_u - eps_pu,
    }


def rms(x):
    """Per-sample root mean square over all but the first dimension."""
    return x.float().flatten(1).pow(2).mean(1).sqrt()


def share_along(d, u):
    """Per sample: the fraction of ‖d‖² along u, cos²(d, u)."""
    d, u = d.float().flatten(1), u.float().flatten(1)
    return (F.cosine_similarity(d, u, dim=1, eps=1e-12)) ** 2


def cosine(a, b):
    return float(F.cosine_similarity(a.flatten()[None], b.flatten()[None], eps=1e-20)[0])


def box_blur(images, factor):
    """uint8 (N, 32, 32, 3) images area-downsampled by ``factor`` and bilinear-upsampled back."""
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    small = F.interpolate(x, scale_factor=1 / factor, mode="area")
    out = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out.round().clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


def gaussian_blur(images, sigma):
    from PIL import Image, ImageFilter

    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(sigma))) for im in images])


def pale(images, amount, towards=255.0):
    """Blend the whole image towards white (255) or grey (128) by ``amount``."""
    return ((1 - amount) * images.astype(np.float32) + amount * towards).round().clip(0, 255).astype(np.uint8)


def low_contrast(images, factor):
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return ((x - mean) * factor + mean).round().clip(0, 255).astype(np.uint8)


def bin_edges(lo, hi, n):
    return np.linspace(lo, hi + 1, n + 1)


def attribute_rates(preds, subject):
    """Fractions of images whose predicted class / colour / pattern is the subject's, and derived metrics."""
    out = {f"{k}_hit": float(np.mean([p[k] == subject[k] for p in preds])) for k in probe_lib.IDENTITY}
    out["subject_fidelity"] = float(np.mean([probe_lib.subject_fidelity(p, subject) for p in preds]))
    out["appearance_fidelity"] = float(np.mean([np.mean([p[k] == subject[k] for k in APPEARANCE]) for p in preds]))
    out["identity_exact"] = float(np.mean([all(p[k] == subject[k] for k in probe_lib.IDENTITY) for p in preds]))
    return out


def pattern_histogram(preds):
    names = world.ATTRIBUTES["pattern"]
    return {n: round(float(np.mean([p["pattern"] == n for p in preds])), 3) for n in names}


def load_probes(probe_b=PROBE_B):
    probes = {"A (shipped)": probe_lib.load_probe()}
    if Path(probe_b, "probe.safetensors").exists():
        probes["B"] = probe_lib.load_probe(probe_b)
    return probes


def write_outputs(output_dir, name, data, markdown):
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(data, indent=1))
    (output_dir / f"{name}.md").write_text(markdown)
    print(markdown, flush=True)


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# (1a) gradients of the two terms


def base_train_args(train_palp, args, subject_name, target, out):
    from experiment import model_args

    subject = world.SUBJECTS[subject_name]
    return [
        "--pretrained_model_name_or_path", str(args.model),
        "--instance_data_dir", str(HERE / "subjects" / subject_name),
        "--placeholder_token", subject["token"],
        "--class_name", subject["shape"],
        "--target_prompt", target,
        "--personalization_prompt", "a photo of {token}",
        "--resolution", "32",
        "--max_train_steps", str(args.tidb_steps),
        "--learning_rate", "3e-3",
        "--train_batch_size", "4",
        "--rank", "8",
        "--guidance_scale_pretrained", str(args.alpha),
        "--guidance_scale_personalized", str(args.beta),
        "--alignment_weight", "1",  # the paper's λ and one token vector, as every diagnostic figure was measured
        "--num_vectors", "1",
        "--seed", "0",
        "--num_validation_images", "0",
        "--report_to", "none",
        "--checkpointing_steps", "1000000",
        "--output_dir", str(out),
        "--overwrite_output_dir",
    ] + model_args(str(args.model))


def resolved_work_dir(args):
    if args.work_dir is not None:
        return Path(args.work_dir)
    return Path("runs/diagnostics_flow" if probe_lib.is_flow_model(args.model) else "runs/diagnostics")


def train_tidb(train_palp, args, subject_name, out, extra=("--alignment_mode", "none")):
    """``args.tidb_steps`` TI+DB steps (or, with ``extra``, another configuration) with train_palp.py's own ``cli``
    in this process (as ablation.py's ``train_run``), on the subject's first dev prompt."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if (Path(out) / "pytorch_lora_weights.safetensors").exists() and not args.retrain:
        return
    target = world.target_prompts(subject_name)[0][0]
    try:
        train_palp.cli(base_train_args(train_palp, args, subject_name, target, out) + list(extra))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def build_models(train_palp, args, subject_name, lora_dir=None):
    """The models as train_palp.py builds them (load_models, add_placeholder_tokens, add_lora), fp32 on CPU, and
    the run's noise process (``conditioner.noise_process``: DDPM for the UNet world, rectified flow for the flow
    world); with ``lora_dir`` the LoRA and token rows of a finished run are loaded."""
    subject = world.SUBJECTS[subject_name]
    target = world.target_prompts(subject_name)[0][0]
    targs = train_palp.parse_args(base_train_args(train_palp, args, subject_name, target, "/tmp/unused"))
    conditioner = train_palp.load_text_conditioner(targs)
    vae, unet, scheduler = train_palp.load_models(targs, conditioner)
    conditioner.add_placeholder_tokens([subject["token"]], [subject["shape"]])
    train_palp.add_lora(unet, 8, 8, 0.0, conditioner.lora_target_modules)
    if lora_dir is not None:
        train_palp.load_lora(unet, lora_dir)
        train_palp.load_embeddings(lora_dir, [subject["token"]], conditioner)
    images = train_palp.load_instance_images(str(HERE / "subjects" / subject_name))
    sampler = train_palp.LatentSampler(
        vae, images, 32, False, False, "cpu", torch.float32, conditioner.image_geometry
    )
    return dict(targs=targs, conditioner=conditioner, vae=vae, unet=unet, scheduler=scheduler,
                process=conditioner.noise_process(scheduler), sampler=sampler, num_images=len(images))


def is_flow(train_palp, process):
    return isinstance(process, train_palp.RectifiedFlowProcess)


def noise_levels(train_palp, process, t1, t2, like):
    """Where a draw sits on the process's noise axis. DDPM: the timestep indices t1, t2 and √ᾱ_t2. Rectified flow:
    the model's timesteps σ·T, σ1, σ2, and the balance ω(σ1)·σ1²/(1 − σ1)² (``alignment_balance``) that both terms'
    per-element gradients on ε̂ carry, so that their ratio is the ε-model's (the rms columns leave it out, the LoRA
    and token norms include it)."""
    if is_flow(train_palp, process):
        return {"t1": float(t1), "t2": float(t2), "sigma_t1": float(process.sigma(t1)),
                "sigma_t2": float(process.sigma(t2)), "balance_t1": float(process.alignment_balance(t1))}
    return {"t1": int(t1), "t2": int(t2), "sqrt_alpha_bar_t2": float(process.coefficients(t2, like)[0])}


FLOW_NOTE = (
    "Flow matching (rectified flow, the SD3 loss with preconditioned outputs, train_palp's `RectifiedFlowProcess`): "
    "ε̂ = x_t + (1 − σ)·v̂ and D is in ε units, as on the UNet. Per element, both terms' gradients on ε̂ carry the "
    "balance ω(σ1)·σ1²/(1 − σ1)² (ω = 1 for the logit-normal density), so rms λ·D and rms 2(ε̂ − ε) leave it out "
    "and their ratio is the gradients' ratio, as on the UNet; the LoRA and token norms include it, so draws at large "
    "σ1 weigh more in their means. σ1 and σ2 replace t1 and t2 (equal-width σ bins, drawn from the logit-normal "
    "density, so the outer bins hold fewer draws); the JSON holds σ1, σ2 and the balance per draw in place of "
    "√ᾱ_t2. The token row is both CLIP encoders' rows, concatenated.\n")


def time_axis(train_palp, process, t_bounds, bins):
    """How draws are binned and how their timesteps are described (title, settings, a note on what differs from the
    UNet world): DDPM by the index t over [t_min, t_max] (drawn uniformly); rectified flow by σ over the training
    table's [σ(t_min), σ(t_max)] (drawn from the SD3 logit-normal density, so the outer bins hold fewer draws)."""
    lo, hi = t_bounds
    if is_flow(train_palp, process):
        s_lo, s_hi = float(process.sigmas[lo]), float(process.sigmas[hi])
        edges = np.linspace(s_lo, s_hi, bins + 1)
        edges[-1] = np.nextafter(s_hi, np.inf)
        return {"keys": ("sigma_t1", "sigma_t2"), "names": ("σ1", "σ2"), "edges": edges,
                "label": lambda a, b, last: f"[{a:.3f}, {s_hi:.3f}]" if last else f"[{a:.3f}, {b:.3f})",
                "draw": f"σ1, σ2 ~ logit-normal on [{s_lo:.3f}, {s_hi:.3f}]",
                "range": {"sigma_range": [s_lo, s_hi], "t_density": process.weighting_scheme}, "note": FLOW_NOTE}
    return {"keys": ("t1", "t2"), "names": ("t1", "t2"), "edges": bin_edges(lo, hi, bins),
            "label": lambda a, b, last: f"[{int(a)}, {int(b) - 1}]" if last else f"[{int(a)}, {int(b)})",
            "draw": f"t1, t2 ~ U[{lo}, {hi}]", "range": {}, "note": None}


def measure_draws(train_palp, models, subject_name, draws, alpha, beta, weight, seed):
    """``draws`` single-image PALP steps (batch 1 each; a batch of 4 is the mean of 4 of them), on the run's noise
    process and conditioning (train_palp's ``noise_process``, ``Conditioning.denoise``), everything in ε: ε̂ =
    ``process.epsilon`` of the model's output. Returns per-draw statistics and the per-draw gradient vectors (LoRA,
    token rows of every text encoder, concatenated) of each term, for batch-level aggregation."""
    unet, conditioner, process = models["unet"], models["conditioner"], models["process"]
    subject = world.SUBJECTS[subject_name]
    config = train_palp.AlignmentConfig(mode="dds", guidance_scale_pretrained=alpha, guidance_scale_personalized=beta,
                                        weight=weight, noise="same", timestep="independent", rescale=True)
    t_bounds = train_palp.timestep_bounds(models["scheduler"].config.num_train_timesteps, 0.02, 0.98)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    trainable = lora_params + conditioner.trainable_rows
    personal_ids = conditioner.tokenize([f"a photo of {subject['token']}"])
    prompts = world.target_prompts(subject_name)
    fixed = [conditioner.encode_fixed(clean, "cpu", torch.float32) for _, clean in prompts]
    records, grads = [], []
    for i in range(draws):
        # Distinct draws per subject (its index in world.SUBJECTS), the same ones in every state.
        gen = torch.Generator().manual_seed((seed * 1000 + list(world.SUBJECTS).index(subject_name)) * 100003 + i)
        index = int(torch.randint(0, models["num_images"], (1,), generator=gen))
        latents, _ = models["sampler"]([index], gen)
        noise, t1, t2, noise2 = train_palp.sample_step_noise(latents.shape, process, t_bounds, config, gen)
        cond_clean, uncond = fixed[i % len(prompts)]
        cond_personal = conditioner.encode(personal_ids)
        loss_pers, loss_align = train_palp.palp_losses(
            unet, unet, latents, noise, t1, t2, noise2, cond_personal, cond_clean, uncond, process, config)
        g_pers = torch.autograd.grad(loss_pers, trainable, retain_graph=True)
        g_align = torch.autograd.grad(weight * loss_align, trainable)
        flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
        n = len(lora_params)
        gp_lora, ga_lora, gp_tok, ga_tok = flat(g_pers[:n]), flat(g_align[:n]), flat(g_pers[n:]), flat(g_align[n:])

        # D and its parts, from train_palp's own pure functions, gradient-free.
        with torch.no_grad():
            x_t1 = process.add_noise(latents, noise, t1)
            output = cond_personal.denoise(unet, x_t1, t1).float()
            eps_hat = process.epsilon(output, x_t1, t1)
            x0_hat = process.original_sample(output, x_t1, t1)
            x_t2 = process.add_noise(x0_hat, noise2, t2)
            ge = lambda c, s: train_palp.guided_epsilon(unet, x_t2, t2, c, uncond, s, process)  # noqa: E731
            with train_palp.lora_disabled(unet):
                g_pre, eps_c, eps_u = ge(cond_clean, alpha), ge(cond_clean, 1.0), ge(cond_clean, 0.0)
            g_per, eps_p, eps_pu = ge(cond_personal, beta), ge(cond_personal, 1.0), ge(cond_personal, 0.0)
            direction = train_palp.alignment_direction("dds", g_pre, g_per)
            w2 = train_palp.alignment_timestep_weight(process, t2, config.weighting)
            check = train_palp.palp_alignment_loss(eps_hat, direction, process, t1, w2, config.rescale)
            if not torch.allclose(check, loss_align.detach(), rtol=1e-3, atol=1e-6):
                raise RuntimeError(f"D does not reproduce palp_losses' alignment term: {check} vs {loss_align}")
            parts = dds_parts(eps_c, eps_u, eps_p, eps_pu, alpha, beta)
            pers_grad = 2 * (eps_hat - noise)
        records.append({
            **noise_levels(train_palp, process, t1, t2, latents),
            "rms_lambda_D": float(weight * rms(direction)),
            "rms_pers_grad": float(rms(pers_grad)),
            "rms_class_pull": float(rms(parts["class_pull"])),
            "rms_guidance_gap": float(rms(parts["guidance_gap"])),
            "rms_uncond_gap": float(rms(parts["uncond_gap"])),
            "rms_pre_guidance": float(rms(alpha * (eps_c - eps_u))),
            "rms_per_guidance": float(rms(beta * (eps_p - eps_pu))),
            "class_pull_share": float(share_along(direction, parts["class_pull"])),
            "class_pull_projection": float(
                (direction * parts["class_pull"]).sum() / parts["class_pull"].pow(2).sum().clamp_min(1e-20)),
            "lora_norm_pers": float(gp_lora.norm()), "lora_norm_align": float(ga_lora.norm()),
            "lora_cosine": cosine(gp_lora, ga_lora),
            "token_norm_pers": float(gp_tok.norm()), "token_norm_align": float(ga_tok.norm()),
            "token_cosine": cosine(gp_tok, ga_tok),
        })
        grads.append((gp_lora, ga_lora, gp_tok, ga_tok))
    return records, grads


def batch_stats(grads, batch=4):
    """Norms and cosine of the two terms' gradients for batches of ``batch`` consecutive draws (batch mean)."""
    out = []
    for i in range(0, len(grads) - batch + 1, batch):
        group = grads[i : i + batch]
        mean = [torch.stack([g[k] for g in group]).mean(0) for k in range(4)]
        out.append({"lora_norm_pers": float(mean[0].norm()), "lora_norm_align": float(mean[1].norm()),
                    "lora_cosine": cosine(mean[0], mean[1]), "token_norm_pers": float(mean[2].norm()),
                    "token_norm_align": float(mean[3].norm()), "token_cosine": cosine(mean[2], mean[3])})
    return out


def summarise_records(records):
    r = {k: np.array([x[k] for x in records]) for k in records[0]}
    return {
        "n": len(records),
        "rms_lambda_D": float(r["rms_lambda_D"].mean()),
        "rms_pers_grad": float(r["rms_pers_grad"].mean()),
        "rms_ratio_D_over_pers": float(r["rms_lambda_D"].mean() / r["rms_pers_grad"].mean()),
        "median_rms_ratio": float(np.median(r["rms_lambda_D"] / r["rms_pers_grad"])),
        "class_pull_rms_over_D": float(r["rms_class_pull"].mean() / r["rms_lambda_D"].mean()),
        "class_pull_share_of_D2": float(r["class_pull_share"].mean()),
        "class_pull_projection": float(r["class_pull_projection"].mean()),
        "guidance_gap_rms_over_D": float(r["rms_guidance_gap"].mean() / r["rms_lambda_D"].mean()),
        "uncond_gap_rms_over_D": float(r["rms_uncond_gap"].mean() / r["rms_lambda_D"].mean()),
        "pre_guidance_rms_over_D": float(r["rms_pre_guidance"].mean() / r["rms_lambda_D"].mean()),
        "per_guidance_rms_over_D": float(r["rms_per_guidance"].mean() / r["rms_lambda_D"].mean()),
        "lora_norm_pers": float(r["lora_norm_pers"].mean()),
        "lora_norm_align": float(r["lora_norm_align"].mean()),
        "lora_norm_ratio": float(r["lora_norm_align"].mean() / r["lora_norm_pers"].mean()),
        "lora_cosine": float(r["lora_cosine"].mean()),
        "token_norm_pers": float(r["token_norm_pers"].mean()),
        "token_norm_align": float(r["token_norm_align"].mean()),
        "token_norm_ratio": float(r["token_norm_align"].mean() / r["token_norm_pers"].mean()),
        "token_cosine": float(r["token_cosine"].mean()),
    }


def binned(records, key, edges, label):
    """Summaries of the records whose ``key`` falls in each [edges[i], edges[i + 1]); ``label(lo, hi, last)``
    names a bin."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [x for x in records if lo <= x[key] < hi]
        if sel:
            out.append({"bin": label(lo, hi, hi == edges[-1]), **summarise_records(sel)})
    return out


GRAD_COLUMNS = [("n", "n"), ("rms λ·D", "rms_lambda_D"), ("rms 2(ε̂−ε)", "rms_pers_grad"),
                ("ratio", "rms_ratio_D_over_pers"), ("(α−β) rms / D rms", "class_pull_rms_over_D"),
                ("(α−β) share of ‖D‖²", "class_pull_share_of_D2"),
                ("β·gap rms / D", "guidance_gap_rms_over_D"), ("∅-gap rms / D", "uncond_gap_rms_over_D"),
                ("α(ε_c−ε_∅) rms / D", "pre_guidance_rms_over_D"), ("β(ε'_P−ε'_∅) rms / D", "per_guidance_rms_over_D"),
                ("‖∇LoRA‖ pers", "lora_norm_pers"),
                ("‖∇LoRA‖ align", "lora_norm_align"), ("align/pers", "lora_norm_ratio"),
                ("cos LoRA", "lora_cosine"), ("‖∇tok‖ align/pers", "token_norm_ratio"), ("cos tok", "token_cosine")]


def grad_rows(label_rows):
    return [[label] + [s[k] if isinstance(s[k], float) else s[k] for _, k in GRAD_COLUMNS] for label, s in label_rows]


def default_output_name(model):
    return "gradients_flow" if probe_lib.is_flow_model(model) else "gradients"


def run_gradients(args):
    torch.set_num_threads(args.num_threads)
    train_palp = import_train_palp()
    subjects = args.subjects
    work_dir = resolved_work_dir(args)
    result = {"settings": {"alpha": args.alpha, "beta": args.beta, "lambda": args.weight, "draws_per_subject":
                           args.draws, "t_range": [0.02, 0.98], "noise": "same", "rescale": True, "rank": 8,
                           "tidb_steps": args.tidb_steps, "subjects": subjects}, "states": {}}
    axis = None
    for state in ("step 0", f"after {args.tidb_steps} TI+DB steps"):
        all_records, all_batches, per_subject = [], [], {}
        for name in subjects:
            start = time.time()
            lora_dir = None
            if state != "step 0":
                lora_dir = work_dir / f"tidb_{name}"
                train_tidb(train_palp, args, name, lora_dir)
            models = build_models(train_palp, args, name, lora_dir)
            if axis is None:
                t_bounds = train_palp.timestep_bounds(models["scheduler"].config.num_train_timesteps, 0.02, 0.98)
                axis = time_axis(train_palp, models["process"], t_bounds, args.bins)
                result["settings"].update(axis["range"])
            records, grads = measure_draws(train_palp, models, name, args.draws, args.alpha, args.beta, args.weight,
                                           args.seed)
            for x in records:
                x["subject"] = name
            all_records += records
            all_batches += batch_stats(grads)
            per_subject[name] = summarise_records(records)
            print(f"{state} {name}: {len(records)} draws in {time.time() - start:.0f}s", flush=True)
        result["states"][state] = {
            "overall": summarise_records(all_records),
            "batch_of_4": {k: float(np.mean([b[k] for b in all_batches])) for k in all_batches[0]},
            "per_subject": per_subject,
            **{f"by_{t}": binned(all_records, key, axis["edges"], axis["label"])
               for t, key in zip(("t1", "t2"), axis["keys"])},
            "draws": all_records,
        }
    md = [f"# PALP's two terms, per-term gradients ({len(subjects)} dev subjects × {args.draws} draws, α = "
          f"{args.alpha}, β = {args.beta}, λ = {args.weight}, same noise, rescale, {axis['draw']})\n",
          "Per draw (one image): rms over elements of the per-element gradients on ε̂ of λ·L_align (λ·D) and of "
          "L_pers (2(ε̂ − ε)); the norm of each term's gradient on the LoRA and on the token row (separate backward "
          "passes) and their cosine; the (α − β)·(ε_c − ε_∅) part of D (pre-trained model): its rms over D's, and "
          "cos²(D, it), the fraction of ‖D‖² along it; β·gap = β·((ε_c − ε_∅) − (ε'_P − ε'_∅)) and ∅-gap = "
          "ε_∅ − ε'_∅ are the other two parts (D = the sum of the three). Means over draws.\n"]
    if axis["note"]:
        md.append("\n" + axis["note"])
    header = ["rows"] + [c for c, _ in GRAD_COLUMNS]
    for state, s in result["states"].items():
        md.append(f"\n## {state}\n")
        rows = [("all", s["overall"])] + [(n, v) for n, v in s["per_subject"].items()]
        md.append(md_table(header, grad_rows(rows)))
        b = s["batch_of_4"]
        md.append(f"\nBatch of 4 (mean of 4 draws' gradients): ‖∇LoRA‖ pers {b['lora_norm_pers']:.3g}, align "
                  f"{b['lora_norm_align']:.3g} (ratio {b['lora_norm_align'] / b['lora_norm_pers']:.2f}), cosine "
                  f"{b['lora_cosine']:.3f}; token row: ratio {b['token_norm_align'] / b['token_norm_pers']:.2f}, "
                  f"cosine {b['token_cosine']:.3f}.\n")
        for key, title in zip(("by_t1", "by_t2"), axis["names"]):
            md.append(f"\nBy {title}:\n\n")
            md.append(md_table([title] + header[1:], grad_rows([(x["bin"], x) for x in s[key]])))
    write_outputs(args.output_dir, args.output_name or default_output_name(args.model), result, "".join(md))


# ----------------------------------------------------------------------------------------------------------------
# (1a') the balance with the defaults: normalised D, and D projected off the personalization residual


def measure_balance(train_palp, models, subject_name, batches, batch, alpha, beta, seed):
    """Per batch of ``batch`` photos (the world's training batch), on the subject's first dev prompt: the two terms'
    gradients on the LoRA and the token row with train_palp's default normalised D, with and without
    ``--alignment_projection residual``, and cos(D, ε̂ − ε) per sample (> 0: D asks the model to reproduce its photo
    worse)."""
    unet, conditioner = models["unet"], models["conditioner"]
    text_encoder, tokenizer = conditioner.text_encoders[0], conditioner.tokenizers[0]
    embedding = train_palp.only_one(conditioner.embeddings, "conditioner.embeddings")
    subject = world.SUBJECTS[subject_name]
    alphas = models["scheduler"].alphas_cumprod.float()
    process = train_palp.DDPMProcess(alphas, "epsilon")
    t_bounds = train_palp.timestep_bounds(models["scheduler"].config.num_train_timesteps, 0.02, 0.98)
    trainable = [p for p in unet.parameters() if p.requires_grad] + [embedding.rows]
    personal_ids = train_palp.tokenize(tokenizer, [f"a photo of {subject['token']}"] * batch)
    cond_clean, uncond = models["conditioner"].encode_fixed(world.target_prompts(subject_name)[0][1], "cpu",
                                                            torch.float32)
    configs = {p: train_palp.AlignmentConfig(guidance_scale_pretrained=alpha, guidance_scale_personalized=beta,
                                             normalization="personalization", projection=p)
               for p in ("none", "residual")}
    records = []
    for i in range(batches):
        gen = torch.Generator().manual_seed((seed * 1000 + list(world.SUBJECTS).index(subject_name)) * 100003 + i)
        indices = torch.randint(0, models["num_images"], (batch,), generator=gen).tolist()
        latents, _ = models["sampler"](indices, gen)
        noise, t1, t2, noise2 = train_palp.sample_step_noise(latents.shape, process, t_bounds, configs["none"], gen)
        record = {}
        for name, config in configs.items():
            cond_personal = train_palp.encode_prompts(text_encoder, personal_ids)
            loss_pers, loss_align = train_palp.palp_losses(unet, unet, latents, noise, t1, t2, noise2, cond_personal,
                                                           cond_clean, uncond, process, config)
            g_pers = torch.autograd.grad(loss_pers, trainable, retain_graph=True)
            g_align = torch.autograd.grad(loss_align, trainable)
            flat = lambda gs: torch.cat([g.flatten() for g in gs[:-1]])  # noqa: E731
            tag = "" if name == "none" else "projected_"
            record[tag + "lora_ratio"] = float(flat(g_align).norm() / flat(g_pers).norm())
            record[tag + "lora_cosine"] = cosine(flat(g_pers), flat(g_align))
            record[tag + "token_ratio"] = float(g_align[-1].norm() / g_pers[-1].norm())
            record[tag + "token_cosine"] = cosine(g_pers[-1].flatten(), g_align[-1].flatten())
        with torch.no_grad():
            x_t1 = process.add_noise(latents, noise, t1)
            cond_personal = train_palp.encode_prompts(text_encoder, personal_ids)
            eps_hat = unet(x_t1, t1, encoder_hidden_states=cond_personal).sample.float()
            x_t2 = process.add_noise(process.predicted_original_sample(x_t1, eps_hat, t1), noise2, t2)
            with train_palp.lora_disabled(unet):
                g_pre = train_palp.guided_epsilon(unet, x_t2, t2, cond_clean.expand(batch), uncond, alpha, process)
            g_per = train_palp.guided_epsilon(unet, x_t2, t2, cond_personal, uncond, beta, process)
            direction, residual = (g_pre - g_per).flatten(1), (eps_hat - noise).flatten(1)
            cos = torch.nn.functional.cosine_similarity(direction, residual)
        record["cos_D_residual"] = float(cos.mean())
        record["share_conflicting"] = float((cos > 0).float().mean())
        records.append(record)
    return records


BALANCE_COLUMNS = [("‖∇LoRA‖ align / pers", "lora_ratio"), ("cos LoRA", "lora_cosine"),
                   ("‖∇token‖ align / pers", "token_ratio"), ("cos token", "token_cosine"),
                   ("cos(D, ε̂ − ε)", "cos_D_residual"), ("share with cos > 0", "share_conflicting"),
                   ("projected: ‖∇LoRA‖ ratio", "projected_lora_ratio"), ("projected: cos LoRA", "projected_lora_cosine"),
                   ("projected: cos token", "projected_token_cosine")]


def run_balance(args):
    if probe_lib.is_flow_model(args.model):
        raise SystemExit("diagnostics.py balance measures the UNet world (--model examples/shapes_world/model); "
                         "`gradients` measures both.")
    torch.set_num_threads(args.num_threads)
    train_palp = import_train_palp()
    states = {"step 0": None, f"TI+DB, {args.tidb_steps} steps": ("--alignment_mode", "none"),
              f"PALP (defaults), {args.tidb_steps} steps": ("--alignment_mode", "dds")}
    result = {"settings": {"normalization": "personalization", "alpha": args.alpha, "beta": args.beta, "lambda": 1.0,
                           "batch": args.batch, "batches_per_subject": args.batches, "steps": args.tidb_steps,
                           "subjects": args.subjects}, "states": {}}
    for state, extra in states.items():
        records = []
        for name in args.subjects:
            lora_dir = None
            if extra is not None:
                lora_dir = resolved_work_dir(args) / f"balance_{extra[1]}_{args.tidb_steps}_{name}"
                train_tidb(train_palp, args, name, lora_dir, extra)
            models = build_models(train_palp, args, name, lora_dir)
            records += [dict(r, subject=name) for r in measure_balance(train_palp, models, name, args.batches,
                                                                       args.batch, args.alpha, args.beta, args.seed)]
            print(f"{state} {name}: {args.batches} batches", flush=True)
        result["states"][state] = {"mean": {k: float(np.mean([r[k] for r in records])) for _, k in BALANCE_COLUMNS},
                                   "batches": records}
    md = [f"# The balance with the defaults (normalised D, λ = 1, α = {args.alpha}, β = {args.beta}), "
          f"{len(args.subjects)} dev subjects "
          f"× {args.batches} batches of {args.batch}\n\n",
          "Gradients of the two terms on the LoRA and on the token row (separate backward passes), their norm ratio "
          "and cosine, without and with `--alignment_projection residual`; cos(D, ε̂ − ε) per sample. Means over "
          "batches.\n\n"]
    rows = [[state] + [s["mean"][k] for _, k in BALANCE_COLUMNS] for state, s in result["states"].items()]
    md.append(md_table(["state"] + [c for c, _ in BALANCE_COLUMNS], rows))
    write_outputs(args.output_dir, "balance", result, "".join(md))


# ----------------------------------------------------------------------------------------------------------------
# (1b) the base model across CFG scales


def run_cfg(args):
    torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    probes = load_probes(args.probe_b)
    held_out_captions = {}
    for label, path in (("A (shipped)", probe_lib.DEFAULT_PROBE), ("B", args.probe_b)):
        if label not in probes:
            continue
        eargs = probe_lib.parse_args(["evaluate", "--probe", str(path), "--num_samples", str(args.num_samples),
                                      "--guidance_scales", *[str(s) for s in args.guidance_scales],
                                      "--output", str(out / f"cfg_heldout_captions_probe_{label[0]}.json")])
        held_out_captions[label] = probe_lib.evaluate_base(eargs)
    pipe = probe_lib.load_pipeline(str(args.model))
    dev = {}
    for scale in args.guidance_scales:
        per_probe = {label: {"alignment": [], "elements": {}} for label in probes}
        for name in world.SUBJECTS:
            for j, (_, clean) in enumerate(world.target_prompts(name)):
                images = probe_lib.generate(pipe, [clean] * args.dev_samples, seed=100 + j, guidance_scale=scale)
                for label, p in probes.items():
                    preds = probe_lib.classify(p, images)
                    per_probe[label]["alignment"] += [probe_lib.prompt_alignment(x, clean) for x in preds]
                    for k, v in probe_lib.prompt_elements(clean).items():
                        per_probe[label]["elements"].setdefault(k, []).extend([x[k] == v for x in preds])
        dev[str(scale)] = {label: {"prompt_alignment": float(np.mean(v["alignment"])),
                                   **{k: float(np.mean(h)) for k, h in v["elements"].items()}}
                           for label, v in per_probe.items()}
        print(scale, json.dumps(dev[str(scale)]), flush=True)
    data = {"held_out_captions": held_out_captions, "dev_clean_prompts": dev, "num_samples": args.num_samples,
            "dev_samples_per_prompt": args.dev_samples}
    md = ["# The base model across CFG scales (20 DPM-Solver++ steps)\n\n",
          f"Held-out captions ({args.num_samples} samples, every attribute named; `probe.py evaluate`): per-attribute "
          "probe accuracy.\n\n"]
    attrs = list(world.ATTRIBUTES) + ["all_attributes_right"]
    for label, res in held_out_captions.items():
        md.append(f"Probe {label}:\n\n")
        md.append(md_table(["CFG"] + attrs, [[k.removeprefix("guidance_")] + [v[a] for a in attrs]
                                             for k, v in res.items()]))
        md.append("\n")
    md.append(f"Dev clean prompts (the y_c of the 24 dev subject × prompt pairs, {args.dev_samples} samples each): "
              "prompt alignment and per-element hit rates.\n\n")
    elements = ["style", "shape", "background", "companion", "night"]
    rows = []
    for scale, res in dev.items():
        for label, v in res.items():
            rows.append([scale, label, v["prompt_alignment"]] + [v.get(e, float("nan")) for e in elements])
    md.append(md_table(["CFG", "probe", "prompt alignment"] + elements, rows))
    write_outputs(out, "cfg", data, "".join(md))


# ----------------------------------------------------------------------------------------------------------------
# (1c) ceiling rows


def context_of(clean_prompt):
    """The render context a clean prompt asks for; what it does not name stays the subject's training context."""
    e = world.parse_caption(clean_prompt)
    ctx = {"style": e["style"]}
    if "background" in e:
        ctx["background"] = e["background"]
    ctx["companion"] = e.get("companion", "none")
    ctx["night"] = e.get("night") == "night"
    return ctx


def run_ceiling(args):
    torch.set_num_threads(args.num_threads)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(Path(args.model) / "vae")).eval()
    probes = load_probes(args.probe_b)
    rows, data = [], []
    for name, subject in world.SUBJECTS.items():
        for j, (_, clean) in enumerate(world.target_prompts(name)):
            rng = np.random.default_rng(1000 + j)
            ctx = context_of(clean)
            raw = np.stack([np.asarray(world.render(world.subject_scene(name, rng, **ctx)))
                            for _ in range(args.num_samples)])
            for kind, images in (("raw", raw), ("autoencoder", probe_lib.autoencoder_round_trip(vae, raw))):
                for label, p in probes.items():
                    preds = probe_lib.classify(p, images)
                    entry = {"subject": name, "prompt_index": j, "clean_prompt": clean, "images": kind,
                             "probe": label,
                             "prompt_alignment": float(np.mean([probe_lib.prompt_alignment(x, clean) for x in preds])),
                             **attribute_rates(preds, subject)}
                    data.append(entry)
    md = [f"# Ceiling rows: each dev subject rendered in each of its target contexts ({args.num_samples} poses "
          "each), raw and after the autoencoder round trip\n\n",
          "What each prompt allows at best. Means over the 24 subject × prompt pairs; per pair in `ceiling.json`.\n\n"]
    cols = ["prompt_alignment", "subject_fidelity", "appearance_fidelity", "colour_hit", "pattern_hit",
            "shape_hit", "identity_exact"]
    for kind in ("raw", "autoencoder"):
        for label in probes:
            sel = [d for d in data if d["images"] == kind and d["probe"] == label]
            rows.append([kind, label] + [float(np.mean([d[c] for d in sel])) for c in cols])
    md.append(md_table(["images", "probe"] + cols, rows))
    md.append("\nPer prompt template (autoencoder round trip; mean over the 4 subjects, the class written X):\n\n")
    trow = []
    for j, template in enumerate(world.TARGET_TEMPLATES):
        for label in probes:
            sel = [d for d in data if d["prompt_index"] == j and d["images"] == "autoencoder" and d["probe"] == label]
            trow.append([template.format("X", blue="blue", yellow="yellow", green="green", white="white",
                                         companion="companion"), label]
                        + [float(np.mean([d[c] for d in sel])) for c in cols])
    md.append(md_table(["template", "probe"] + cols, trow))
    md.append("\nPer subject (autoencoder round trip), pattern hit by style:\n\n")
    prow = []
    for name in world.SUBJECTS:
        for label in probes:
            r = [name, label]
            for style in world.STYLES:
                sel = [d for d in data if d["subject"] == name and d["probe"] == label and d["images"] ==
                       "autoencoder" and context_of(d["clean_prompt"])["style"] == style]
                r += [float(np.mean([d["pattern_hit"] for d in sel])), float(np.mean([d["colour_hit"] for d in sel]))]
            prow.append(r)
    md.append(md_table(["subject", "probe", "photo: pattern", "photo: colour", "sketch: pattern", "sketch: colour"],
                       prow))
    write_outputs(args.output_dir, "ceiling", data, "".join(md))


# ----------------------------------------------------------------------------------------------------------------
# (2a) probe audit with counterfactuals


def render_subject(name, n, seed, **overrides):
    """``n`` training-context photos of subject ``name`` (poses from ``seed``), with attributes overridden."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = world.subject_scene(name, rng)
        scene.update(overrides)
        out.append(np.asarray(world.render(scene)))
    return np.stack(out)


def mean_fill_colour(subject):
    """The mean colour of the subject's fill: its colour and the pattern's white, weighted by area (a blurred copy
    of it is a plain shape of this colour)."""
    if subject["pattern"] == "plain":
        return world.OBJECT_RGB[subject["colour"]]
    c = np.array(world.OBJECT_RGB[subject["colour"]], dtype=np.float32)
    mask = world.pattern_mask(subject["pattern"], 16, 16, 9, 0.0, 32)
    disc = world.shape_mask("circle", 16, 16, 9, 0.0, 32)
    frac = float((mask * disc).sum() / disc.sum())
    return tuple(int(v) for v in frac * c + (1 - frac) * 250.0)


def counterfactuals(name, subject, n, seed):
    """(label, images, which identity attributes the images truly show) for one dev subject."""
    base = render_subject(name, n, seed)
    plain = render_subject(name, n, seed, pattern="plain")
    world.OBJECT_RGB["_mean_fill"] = mean_fill_colour(subject)
    try:
        plain_mean = render_subject(name, n, seed, pattern="plain", colour="_mean_fill")
    finally:
        del world.OBJECT_RGB["_mean_fill"]
    other_colours = [c for c in world.COLOURS if c != subject["colour"]]
    recolour = np.concatenate([render_subject(name, max(1, n // len(other_colours)), seed + k, colour=c)
                               for k, c in enumerate(other_colours)])
    other_patterns = [p for p in world.PATTERNS if p not in (subject["pattern"], "plain")]
    repattern = np.concatenate([render_subject(name, max(1, n // len(other_patterns)), seed + k, pattern=p)
                                for k, p in enumerate(other_patterns)])
    cases = [
        ("photo (as trained)", base, {"colour", "pattern"}),
        ("pattern removed (plain)", plain, {"colour"}),
        ("other pattern", repattern, {"colour"}),
        ("other colour", recolour, {"pattern"}),
        ("plain, subject's mean fill colour (pale)", plain_mean, set()),
        ("plain, mean fill colour, blur ÷2", box_blur(plain_mean, 2), set()),
        ("plain, pale 40% white, blur ÷2", box_blur(pale(plain, 0.4), 2), {"colour"}),
        ("blur ÷2 (area 16 px)", box_blur(base, 2), {"colour", "pattern?"}),
        ("blur ÷4 (area 8 px)", box_blur(base, 4), {"colour"}),
        ("Gaussian blur σ 1", gaussian_blur(base, 1.0), {"colour", "pattern?"}),
        ("Gaussian blur σ 1.5", gaussian_blur(base, 1.5), {"colour"}),
        ("Gaussian blur σ 2.5", gaussian_blur(base, 2.5), {"colour"}),
        ("pale: 40% white", pale(base, 0.4), {"colour", "pattern"}),
        ("pale: 60% white", pale(base, 0.6), {"colour", "pattern"}),
        ("pale: 50% grey", pale(base, 0.5, 128.0), {"colour", "pattern"}),
        ("low contrast ×0.4", low_contrast(base, 0.4), {"colour", "pattern"}),
        ("blur ÷2 + pale 40% white", pale(box_blur(base, 2), 0.4), {"colour", "pattern?"}),
        ("blur σ 1.5 + pale 40% white", pale(gaussian_blur(base, 1.5), 0.4), {"colour"}),
    ]
    return cases


def run_audit(args):
    torch.set_num_threads(args.num_threads)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(Path(args.model) / "vae")).eval()
    probes = load_probes(args.probe_b)
    data, grid_rows = [], []
    for name, subject in world.SUBJECTS.items():
        cases = counterfactuals(name, subject, args.num_samples, seed=500)
        cases.append(("photo after the autoencoder", probe_lib.autoencoder_round_trip(vae, cases[0][1]),
                      {"colour", "pattern?"}))
        for label_case, images, truth in cases:
            row = np.full((8, 32, 32, 3), 255, dtype=np.uint8)
            row[: min(8, len(images))] = images[:8]
            grid_rows.append(row)
            for label, p in probes.items():
                preds = probe_lib.classify(p, images)
                data.append({"subject": name, "case": label_case, "probe": label, "truly_shows": sorted(truth),
                             **attribute_rates(preds, subject), "pattern_read_as": pattern_histogram(preds)})
    probe_lib.save_grid(np.concatenate(grid_rows), str(Path(args.output_dir) / "audit_counterfactuals.png"), cols=8)
    case_names = list(dict.fromkeys(d["case"] for d in data))
    md = [f"# Probe audit: counterfactual images of the dev subjects ({args.num_samples} per case and subject, "
          "training context: photo, grey, day, alone)\n\n",
          "Fraction of images where the probe reports the subject's own colour / pattern (mean over the 4 dev "
          "subjects). 'truly shows': which of the subject's appearance attributes the image really has "
          "('pattern?': blurred, the pattern is faint). A probe is fooled where it reports an attribute the image "
          "does not show. Grid: `audit_counterfactuals.png` (per subject, one row of 8 per case, in this order).\n\n"]
    rows = []
    for case in case_names:
        truth = next(d["truly_shows"] for d in data if d["case"] == case)
        row = [case, ", ".join(truth) or "neither"]
        for label in probes:
            sel = [d for d in data if d["case"] == case and d["probe"] == label]
            row += [float(np.mean([d["colour_hit"] for d in sel])), float(np.mean([d["pattern_hit"] for d in sel])),
                    float(np.mean([d["shape_hit"] for d in sel]))]
        rows.append(row)
    header = ["case", "truly shows"] + [f"{lab}: {k}" for lab in probes for k in ("colour", "pattern", "class")]
    md.append(md_table(header, rows))
    md.append("\nPer subject, pattern hit (subject's own pattern reported):\n\n")
    rows = []
    for case in case_names:
        row = [case]
        for label in probes:
            for name in world.SUBJECTS:
                d = next(d for d in data if d["case"] == case and d["probe"] == label and d["subject"] == name)
                row.append(d["pattern_hit"])
        rows.append(row)
    md.append(md_table(["case"] + [f"{lab[0]}: {n}" for lab in probes for n in world.SUBJECTS], rows))
    write_outputs(args.output_dir, "audit", data, "".join(md))


# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Diagnostics of PALP's fidelity loss in the shapes world (dev only).")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name, help=text) for name, text in (
        ("gradients", "Per-term gradient magnitudes, binned by t1 and t2, at step 0 and after TI+DB steps."),
        ("balance", "The two terms' gradients with the defaults (normalised D), with and without the projection."),
        ("cfg", "The base model's probe accuracy and dev prompt alignment at several CFG scales."),
        ("ceiling", "Each dev subject rendered in each target context, raw and after the autoencoder."),
        ("audit", "The probes' answers on counterfactual images of the dev subjects."))}
    for name, p in commands.items():
        p.add_argument("--model", type=str, default=str(HERE / "model"), help="The shapes-world base model.")
        p.add_argument("--probe_b", type=str, default=str(PROBE_B), help="The second probe's folder.")
        p.add_argument("--output_dir", type=str, default=str(DEFAULT_OUTPUT), help="Where figures are written.")
        p.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    for name, steps in (("gradients", 100), ("balance", 200)):
        p = commands[name]
        p.add_argument("--subjects", type=str, nargs="+", default=list(world.SUBJECTS), choices=list(world.SUBJECTS),
                       help="Dev subjects.")
        p.add_argument("--alpha", type=float, default=15.0, help="α (paper).")
        p.add_argument("--beta", type=float, default=7.5, help="β (paper).")
        p.add_argument("--tidb_steps", type=int, default=steps, help="Training steps of the trained state(s).")
        p.add_argument("--seed", type=int, default=0, help="Seed of the draws.")
        p.add_argument("--work_dir", type=str, default=None,
                       help="Where the trained runs are written (default: runs/diagnostics, runs/diagnostics_flow for "
                            "a flow model, so that one world's runs are never loaded into the other's model).")
        p.add_argument("--retrain", action="store_true", help="Retrain the runs even if present.")
    g = commands["gradients"]
    g.add_argument("--draws", type=int, default=96, help="Single-image draws per subject and state.")
    g.add_argument("--bins", type=int, default=5, help="Bins of t1 and t2 over [0.02T, 0.98T] (of σ1, σ2 for flow).")
    g.add_argument("--output_name", type=str, default=None,
                   help="Name of the JSON and markdown files (default: gradients, gradients_flow for a flow model).")
    g.add_argument("--weight", type=float, default=1.0, help="λ.")
    b = commands["balance"]
    b.add_argument("--batches", type=int, default=12, help="Batches per subject and state.")
    b.add_argument("--batch", type=int, default=4, help="Photos per batch (the world's training batch).")
    c = commands["cfg"]
    c.add_argument("--guidance_scales", type=float, nargs="+", default=[5.0, 7.5, 10.0, 15.0], help="CFG scales.")
    c.add_argument("--num_samples", type=int, default=128, help="Held-out captions sampled per scale.")
    c.add_argument("--dev_samples", type=int, default=8, help="Samples per dev clean prompt and scale.")
    for name in ("ceiling", "audit"):
        commands[name].add_argument("--num_samples", type=int, default=32, help="Images per case.")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    args = parse_args()
    {"gradients": run_gradients, "balance": run_balance, "cfg": run_cfg, "ceiling": run_ceiling, "audit": run_audit}[args.command](args)
