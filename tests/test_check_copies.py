"""utils/check_copies.py: the `# Copied from train_palp.<name>` blocks stay identical to their originals."""

import ast
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT

CHECKER = REPO_ROOT / "utils" / "check_copies.py"
SCRIPTS = ("train_palp.py", "train_palp_multi_subject.py")


def check(*args):
    return subprocess.run([sys.executable, str(CHECKER), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_the_multi_subject_script_is_in_sync_with_train_palp():
    done = check()
    assert done.returncode == 0, f"{done.stderr}\nRun `python utils/check_copies.py --fix_and_overwrite`."


def test_shared_code_is_marked_and_the_scripts_import_no_local_module():
    source = (REPO_ROOT / "train_palp_multi_subject.py").read_text()
    markers = [line.split(".", 1)[1] for line in source.splitlines() if line.startswith("# Copied from train_palp.")]
    # The PALP mathematics, the training loop and the outputs are shared, not rewritten.
    for name in ("palp_losses", "palp_alignment_loss", "train_loop", "build_run", "save_embeddings", "LORA_NAME"):
        assert name in markers, name
    local = {path.stem for path in REPO_ROOT.iterdir()} | {"utils", "tests", "examples"}
    for script in SCRIPTS:
        tree = ast.parse((REPO_ROOT / script).read_text())
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & local, (script, imported & local)


@pytest.fixture
def scripts(tmp_path):
    for name in SCRIPTS:
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    return tmp_path / "train_palp.py", tmp_path / "train_palp_multi_subject.py"


def plant(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_a_planted_drift_is_caught_and_fix_and_overwrite_resyncs_it(scripts):
    original, copy = scripts
    clean = copy.read_text()
    plant(copy, "    return -(scale * per_sample).mean()\n", "    return (scale * per_sample).mean()\n")
    plant(copy, 'LORA_NAME = "pytorch_lora_weights.safetensors"', 'LORA_NAME = "lora.safetensors"')

    done = check("--original", original, "--copy", copy)
    assert done.returncode == 1
    assert "'palp_alignment_loss' has drifted from train_palp.palp_alignment_loss" in done.stderr
    assert "'LORA_NAME' has drifted from train_palp.LORA_NAME" in done.stderr
    assert "-    return -(scale * per_sample).mean()" in done.stderr  # the diff shows what changed
    assert done.stderr.count("has drifted") == 2

    fixed = check("--original", original, "--copy", copy, "--fix_and_overwrite")
    assert fixed.returncode == 0, fixed.stderr
    assert "palp_alignment_loss" in fixed.stdout and "LORA_NAME" in fixed.stdout
    assert copy.read_text() == clean
    assert check("--original", original, "--copy", copy).returncode == 0


def test_a_change_to_the_original_is_propagated(scripts):
    original, copy = scripts
    plant(
        original,
        "def timestep_bounds(num_train_timesteps, min_ratio, max_ratio):\n",
        "def timestep_bounds(num_train_timesteps, min_ratio, max_ratio):\n    # clamp\n",
    )
    done = check("--original", original, "--copy", copy)
    assert done.returncode == 1 and "'timestep_bounds' has drifted" in done.stderr
    assert check("--original", original, "--copy", copy, "--fix_and_overwrite").returncode == 0
    assert "def timestep_bounds(num_train_timesteps, min_ratio, max_ratio):\n    # clamp\n" in copy.read_text()


def test_copies_with_replacement_decorators_and_marker_errors(tmp_path):
    original = tmp_path / "base.py"
    original.write_text(
        textwrap.dedent(
            """\
            import functools

            SUFFIX = "single"


            @functools.lru_cache
            def name_single(x):
                return f"{x}-single"


            def helper():
                return 1
            """
        )
    )
    copy = tmp_path / "other.py"
    body = textwrap.dedent(
        """\
        import functools

        # Copied from base.SUFFIX
        SUFFIX = "single"


        # Copied from base.name_single with single->multi
        @functools.lru_cache
        def name_multi(x):
            return f"{x}-multi"
        """
    )
    copy.write_text(body)
    assert check("--original", original, "--copy", copy).returncode == 0

    copy.write_text(body.replace("@functools.lru_cache\n", "@functools.cache\n"))  # decorators are part of a copy
    done = check("--original", original, "--copy", copy)
    assert done.returncode == 1 and "'name_multi' has drifted from base.name_single" in done.stderr
    assert check("--original", original, "--copy", copy, "--fix_and_overwrite").returncode == 0
    assert copy.read_text() == body

    copy.write_text(
        body
        + textwrap.dedent(
            """

            # Copied from base.missing
            def missing():
                pass

            # Copied from base.helper

            def helper():
                return 1
            """
        )
    )
    done = check("--original", original, "--copy", copy, "--fix_and_overwrite")
    assert done.returncode == 1  # nothing to rewrite these from: fixing cannot make them pass
    assert "defines no top-level 'missing'" in done.stderr
    assert "must sit directly above" in done.stderr

    copy.write_text(body + "\n\ndef helper():\n    return 1\n")
    done = check("--original", original, "--copy", copy)
    assert done.returncode == 1 and "'helper' is identical to base.helper but has no" in done.stderr
