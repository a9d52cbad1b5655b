"""``legonet compress`` and ``legonet recipe`` on a tiny network built in code: every option reaches
:func:`legonet.compress`, and what the command writes and prints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

import legonet
from legonet.cli import main
from legonet.config import TargetConfig
from tests.nets import cli_net

ARCH = "tests.nets:cli_net"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def fp32_bytes(sd) -> int:
    return sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size() for t in sd.values())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    sd = {k: v.contiguous() for k, v in cli_net().state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(d / "net.safetensors"))
    rng = np.random.default_rng(0)
    photos = d / "photos"
    photos.mkdir()
    for i in range(12):  # photos of other sizes than the network's input: resized and cropped
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(photos / f"p{i:02d}.png")
    np.savez(d / "calib.npz", x=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    return d


def test_one_setting_with_flags_and_a_recipe(files, tmp_path):
    out = tmp_path / "a.lego"
    text = ok(run("compress", files / "net.safetensors", "-o", out, "--block", "2", "-k", "8", "--per-tensor"))
    assert "compression ratio (file)" in text and "2x2 K=8" in text and f"wrote {out}" in text
    recipe = tmp_path / "r.toml"
    recipe.write_text('[lego]\nscope = "layer"\nscales = "row"\nscale_stat = "absmax"\nunshrink = true\n'
                      'clusters = 4\ninclude = ["3.*", "6.*"]\n')
    ok(run("compress", files / "net.safetensors", "-o", out, "--recipe", recipe, "-q"))
    cm = legonet.load(out)
    assert cm.config.scope == "layer" and cm.config.scale_stat == "absmax" and cm.config.unshrink
    assert set(cm.clustered) == {"3.weight", "6.weight"} and len(cm.codebooks) == 2  # include patterns
    assert cm.codebooks[0].shape[0] == 4  # from the recipe; --clusters would win
    ok(run("compress", files / "net.safetensors", "-o", out, "--recipe", recipe, "-k", "2", "-q"))
    assert legonet.load(out).codebooks[0].shape[0] == 2


def test_target_mode_without_architecture_meets_the_ratio(files, tmp_path):
    out = tmp_path / "t.lego"
    text = ok(run("compress", files / "net.safetensors", "-o", out, "--target-ratio", "3"))
    assert fp32_bytes(load_file(files / "net.safetensors")) / out.stat().st_size >= 3
    assert "time: estimating settings:" in text and "clustering:" in text


def test_data_free_target_mode_with_an_architecture_from_code(files, tmp_path):
    out = tmp_path / "df.lego"
    text = ok(run("compress", files / "net.safetensors", "-o", out, "--target-ratio", "3", "--arch", ARCH))
    assert "data-free bias correction: corrected" in text and "bias correction:" in text.split("time:")[1]
    # the 'SAME' Conv2d subclass is covered by the passes, and said so
    assert "treated as the layers they derive from" in text and "BatchNorm scales moved into the row gains of" in text
    sd = load_file(files / "net.safetensors")
    assert fp32_bytes(sd) / out.stat().st_size >= 3
    back = legonet.load(out).to_state_dict()
    assert set(back) == set(sd) and all(back[k].dtype == sd[k].dtype for k in sd)  # the checkpoint's keys, dtypes


@pytest.mark.parametrize("calib", ["photos", "calib.npz"])
def test_calibrated_target_mode_from_photos_or_npz(files, tmp_path, calib, monkeypatch):
    import legonet.calibrate.pipeline as pipeline

    seen = {}
    real = pipeline.calibrated_compress

    def spy(model, ratio, batches, *, config, **kw):
        seen.update(samples=batches.samples, shape=tuple(batches.batches[0].shape), config=config)
        return real(model, ratio, batches, config=config, **kw)

    monkeypatch.setattr(pipeline, "calibrated_compress", spy)
    recipe = tmp_path / "r.toml"
    recipe.write_text("[target]\ngroup_channels = false\n[target.refine]\nepochs = 1\nbatch_size = 4\n"
                      "[calib]\nimages = 8\n")
    out = tmp_path / "c.lego"
    text = ok(run("compress", files / "net.safetensors", "-o", out, "--target-ratio", "3", "--arch", ARCH,
                  "--calib", files / calib, "--recipe", recipe))
    assert seen["samples"] == 8 and seen["shape"][1:] == (3, 16, 16)  # [calib] images, resized to the input
    assert seen["config"].refine.epochs == 1 and not seen["config"].group_channels
    assert "refinement:" in text.split("time:")[1] and "refined codebooks on 8 calibration samples" in text
    assert fp32_bytes(load_file(files / "net.safetensors")) / out.stat().st_size >= 3


def test_several_ratios_write_one_file_each(files, tmp_path):
    ok(run("compress", files / "net.safetensors", "-o", tmp_path / "m.lego", "--target-ratio", "2,3", "-q"))
    sizes = [(tmp_path / f"m-{r}x.lego").stat().st_size for r in (2, 3)]
    assert sizes[0] > sizes[1] and not (tmp_path / "m.lego").exists()
    ok(run("compress", files / "net.safetensors", "-o", tmp_path / "n{ratio}.lego", "--target-ratio", "2,2.5", "-q"))
    assert (tmp_path / "n2.lego").exists() and (tmp_path / "n2.5.lego").exists()


@pytest.mark.parametrize("args, says", [
    (["--target-ratio", "3", "--calib", "x.npz"], "--calib needs --target-ratio and --arch"),
    (["--calib", "x.npz", "--arch", ARCH], "--calib needs --target-ratio and --arch"),
    (["--target-ratio", "3", "--block", "2"], "--block and --clusters are for one setting"),
    (["--target-ratio", "0.5"], "must be > 1"),
    (["--target-ratio", "3,3"], "given twice"),
    (["--target-ratio", "eight"], "expected a ratio"),
    (["--device", "cpu"], "--device needs --calib"),
    (["--target-ratio", "3", "--arch", ARCH, "--calib", "x.npz", "--device", "nope"], "not a device PyTorch knows"),
    (["--target-ratio", "3", "--arch", ARCH, "--calib", "x.npz", "--device", "mps"], "only 'cpu' and 'cuda[:N]'"),
])
def test_usage_errors_before_any_work(files, tmp_path, args, says):
    r = run("compress", files / "net.safetensors", "-o", tmp_path / "x.lego", *args)
    assert r.exit_code == 2 and says in r.output and not (tmp_path / "x.lego").exists(), r.output


@pytest.mark.parametrize("text, says", [
    ("[lego]\nbogus = 1\n", "unknown legonet config key(s): bogus"),
    ("[target]\nrefine = {epochs = 0}\n", "refine epochs must be in"),
    ("[tagret]\n", "unknown section(s) tagret"),
    ("[lego\n", "not a valid TOML file"),
])
def test_bad_recipes_are_one_line_naming_the_file(files, tmp_path, text, says):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    r = run("compress", files / "net.safetensors", "-o", tmp_path / "x.lego", "--recipe", recipe)
    assert r.exit_code == 1 and says in r.output and str(recipe) in r.output and r.output.count("\n") == 1


def test_bad_photos_are_named_before_any_work(files, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (16, 16)).save(photos / "good.png")
    (photos / "bad.jpg").write_text("not a photo")
    r = run("compress", files / "net.safetensors", "-o", tmp_path / "x.lego", "--target-ratio", "3", "--arch", ARCH,
            "--calib", photos)
    assert r.exit_code == 1 and "bad.jpg" in r.output and r.output.count("\n") == 1


def test_recipe_prints_defaults_that_read_back(tmp_path):
    text = ok(run("recipe"))
    assert "[target.refine]" in text and "[lego]" in text and "[calib]" in text
    ok(run("recipe", "-o", tmp_path / "r.toml"))
    from legonet.recipe import Recipe, read_recipe

    assert read_recipe(tmp_path / "r.toml") == Recipe()
    assert Recipe().target == TargetConfig()


def test_help_fits_a_screen():
    lines = ok(run("compress", "--help")).splitlines()
    assert len(lines) <= 45
    assert "--recipe" in "\n".join(lines) and "--refine" not in "\n".join(lines)


def test_console_script_entry_point():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "legonet", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "compress" in r.stdout


def test_progress_shows_the_steps(files, tmp_path, monkeypatch):
    import contextlib

    import legonet.progress as progress

    seen = []

    @contextlib.contextmanager
    def recording(enabled=True):  # noqa: ARG001
        yield lambda task, done, total: seen.append((task, done, total))

    monkeypatch.setattr(progress, "progress_bars", recording)
    ok(run("compress", files / "net.safetensors", "-o", tmp_path / "p.lego", "--target-ratio", "3", "-q"))
    assert {"estimating settings", "clustering"} <= {t for t, _, _ in seen}
    assert all(0 <= d <= t for _, d, t in seen if t)


@pytest.mark.parametrize("bad_threads", ["0", "-1"])
def test_threads_must_be_positive(files, tmp_path, bad_threads):
    r = run("compress", files / "net.safetensors", "-o", tmp_path / "x.lego", "--threads", bad_threads)
    assert r.exit_code == 2


def test_device_with_calibration_runs_there(files, tmp_path, monkeypatch):
    import legonet.calibrate.pipeline as pipeline

    seen = []
    real = pipeline.calibrated_compress

    def spy(model, ratio, batches, **kw):
        seen.append(next(model.parameters()).device.type)
        return real(model, ratio, batches, **kw)

    monkeypatch.setattr(pipeline, "calibrated_compress", spy)
    recipe = tmp_path / "r.toml"
    recipe.write_text("[target]\nrefine = false\nlayer_fit = false\n[calib]\nimages = 4\n")
    ok(run("compress", files / "net.safetensors", "-o", tmp_path / "d.lego", "--target-ratio", "3", "--arch", ARCH,
           "--calib", files / "calib.npz", "--device", "cpu", "--recipe", recipe, "-q"))
    assert seen == ["cpu"]
    if not torch.cuda.is_available():
        r = run("compress", files / "net.safetensors", "-o", tmp_path / "d.lego", "--target-ratio", "3", "--arch", ARCH,
                "--calib", files / "calib.npz", "--device", "cuda", "--recipe", recipe, "-q")
        assert r.exit_code == 2 and "no CUDA device is available" in r.output
