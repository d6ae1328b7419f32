"""Eight SIGKILLs at random moments of one 300-step tiny run, each followed by --resume_from_checkpoint latest; the
final LoRA and token must be bit-identical to the uninterrupted run's.

    python utils/sigkill_check.py [WORK_FOLDER]   # default: a new temporary folder; a few minutes on a CPU; prints "kills: 8 bit-identical: True"
"""

import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import build_tiny_sd, write_instance_images  # noqa: E402

root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="palp-sigkill-")).resolve()
shutil.rmtree(root, ignore_errors=True)
root.mkdir(parents=True)
build_tiny_sd(root / "model")
write_instance_images(root / "images", n=3, seed=0)


def argv(out):
    return [
        sys.executable,
        str(REPO / "train_palp.py"),
        "--pretrained_model_name_or_path",
        str(root / "model"),
        "--instance_data_dir",
        str(root / "images"),
        "--output_dir",
        str(out),
        "--placeholder_token",
        "<t>",
        "--class_name",
        "cat",
        "--target_prompt",
        "a sketch of <t>",
        "--resolution",
        "32",
        "--max_train_steps",
        "300",
        "--checkpointing_steps",
        "10",
        "--checkpoints_total_limit",
        "2",
        "--seed",
        "0",
        "--num_validation_images",
        "0",
        "--report_to",
        "none",
        "--learning_rate",
        "1e-3",
    ]


t0 = time.time()
subprocess.run(argv(root / "full"), check=True, capture_output=True)
full_s = time.time() - t0
print(f"uninterrupted run: {full_s:.0f} s", flush=True)
rng = random.Random(0)
kills = 0
out = root / "killed"
while True:
    p = subprocess.Popen(
        argv(out) + (["--resume_from_checkpoint", "latest"] if out.exists() else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if kills < 8:
        try:
            p.wait(timeout=rng.uniform(5, full_s / 3))
            print("finished before the kill", flush=True)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            print(f"kill {kills}: checkpoints {sorted(x.name for x in out.glob('checkpoint-*'))}", flush=True)
            continue
    else:
        assert p.wait() == 0
    if (out / "pytorch_lora_weights.safetensors").exists():
        break
same = all(
    all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    for a, b in (
        (load_file(root / "full" / f), load_file(out / f))
        for f in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors")
    )
)
print(f"kills: {kills} bit-identical: {same}")
