import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import legonet
from legonet.calibrate.refine import RefineConfig
from legonet.cli import main
from tests.marks import needs_cuda


@pytest.fixture
def run():
    runner = CliRunner()

    def _run(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return _run


def test_tiny_model_end_to_end(run, tmp_path, tiny_model):
    src = tmp_path / "tiny.safetensors"
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(sd, src)
    out = tmp_path / "tiny.lego"
    r = run("compress", src, "-o", out, "--block", "2", "--clusters", "8", "--scope", "layer", "--quiet")
    assert r.exit_code == 0 and out.exists()
    gains = tmp_path / "gains.lego"
    r = run("compress", src, "-o", gains, "--block", "2", "--clusters", "8", "--scales", "row",
            "--scale-stat", "absmax", "--unshrink", "--quiet")
    assert r.exit_code == 0
    r = run("info", gains, "--json")
    assert '"scale_stat": "absmax"' in r.output and '"unshrink": true' in r.output
    compact = tmp_path / "compact.lego"
    r = run("compress", src, "-o", compact, "--block", "2", "--clusters", "2", "--scope", "layer", "--scales", "row",
            "--compact-storage", "--quiet")
    assert r.exit_code == 0
    r = run("info", compact)
    assert "8-bit log codes for" in r.output
    assert legonet.load(compact).config.compact_storage
    sparse = tmp_path / "sparse.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"w.weight": torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) < 0.1)}, sparse)
    coded, packed = tmp_path / "coded.lego", tmp_path / "packed.lego"
    for path, extra in ((coded, ["--entropy-coding"]), (packed, [])):
        r = run("compress", sparse, "-o", path, "--block", "2", "--clusters", "16", *extra, "--quiet")
        assert r.exit_code == 0, r.output
    assert coded.stat().st_size < packed.stat().st_size and legonet.load(coded).config.entropy_coding
    assert "(entropy-coded for 1 tensors)" in run("info", coded).output
    r = run("info", out, "--per-tensor")
    assert r.exit_code == 0 and "compression ratio" in r.output and "fc.weight" in r.output
    dense = tmp_path / "dense.safetensors"
    r = run("decompress", out, "-o", dense)
    assert r.exit_code == 0
    back = load_file(dense)
    assert set(back) == set(sd) and all(back[k].shape == sd[k].shape and back[k].dtype == sd[k].dtype for k in sd)


def test_bundled_resnet20(run, tmp_path, resnet20_path, images_path):
    out = tmp_path / "r20.lego"
    r = run("compress", resnet20_path, "-o", out, "--block", "4", "--clusters", "32")
    assert r.exit_code == 0, r.output
    assert "compression ratio (file)" in r.output
    # the bar: at least 30x smaller than the fp32 weights, file bytes counted
    fp32 = sum(v.numel() * 4 for v in load_file(resnet20_path).values())
    assert fp32 / out.stat().st_size >= 30
    r = run("eval", "--arch", "resnet20", "--weights", resnet20_path, "--data", images_path, "--limit", "200")
    assert r.exit_code == 0 and "on 200 images" in r.output
    before = float(r.output.split()[1])
    r = run("eval", "--arch", "resnet20", "--weights", out, "--data", images_path, "--limit", "200")
    assert r.exit_code == 0
    assert 0.0 <= float(r.output.split()[1]) <= before  # paper's setting loses accuracy here


@pytest.mark.parametrize("args, msg", [
    (["compress", "{missing}", "-o", "{tmp}/x.lego"], "no such file"),
    (["compress", "{notckpt}", "-o", "{tmp}/x.lego"], "not a checkpoint"),
    (["compress", "{r20}", "-o", "{tmp}/x.lego", "--clusters", "0"], "clusters (K) must be"),
    (["compress", "{r20}", "-o", "{tmp}/x.lego", "--clusters", "100000"], "clusters (K) must be"),
    (["compress", "{r20}", "-o", "{tmp}/x.lego", "--exclude", "layer9.*"], "matches no tensor"),
    (["info", "{notckpt}"], "not a .lego file"),
    (["eval", "--arch", "resnet21", "--weights", "{r20}", "--data", "{npz}"], "unknown architecture"),
    (["eval", "--arch", "resnet56", "--weights", "{r20}", "--data", "{npz}"], "do not fit the architecture"),
    (["eval", "--arch", "resnet20", "--weights", "{r20}", "--data", "{notckpt}"], "not a readable npz"),
])
def test_bad_input_one_line_error(run, tmp_path, resnet20_path, images_path, args, msg):
    notckpt = tmp_path / "notes.txt"
    notckpt.write_text("just some text, definitely not weights")
    subs = {"missing": tmp_path / "missing.safetensors", "notckpt": notckpt, "tmp": tmp_path,
            "r20": resnet20_path, "npz": images_path}
    r = run(*[a.format(**subs) for a in args])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("legonet: error:") and msg in lines[0], r.output
    assert not (tmp_path / "x.lego").exists()


def test_nan_weights_named(run, tmp_path):
    p = tmp_path / "nan.safetensors"
    save_file({"w": torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])}, p)
    r = run("compress", p, "-o", tmp_path / "x.lego", "--block", "1", "--clusters", "2")
    assert r.exit_code == 1 and "'w'" in r.output and "non-finite" in r.output


def test_console_script_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "legonet", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "compress" in r.stdout


def test_target_ratio_mode(run, tmp_path):
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(256, 32))
    src = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, src)
    out = tmp_path / "m.lego"
    r = run("compress", src, "-o", out, "--target-ratio", "10", "--quiet")
    assert r.exit_code == 0, r.output
    fp32 = sum(4 * v.numel() if v.is_floating_point() else v.numel() * v.element_size() for v in m.state_dict().values())
    assert fp32 / out.stat().st_size >= 10
    r = run("compress", src, "-o", out, "--target-ratio", "10", "--calib", tmp_path / "c.npz")
    assert r.exit_code == 2 and "--calib needs --target-ratio and --arch" in r.output


def test_datafree_target_mode_says_which_layers_bias_correction_left(run, tmp_path, resnet20_path):
    out = tmp_path / "r20.lego"
    r = run("compress", resnet20_path, "-o", out, "--target-ratio", "8", "--arch", "resnet20")
    assert r.exit_code == 0, r.output
    fp32 = 4 * sum(v.numel() for v in load_file(resnet20_path).values())
    assert fp32 / out.stat().st_size >= 8
    # the stem's input is images, whose mean the checkpoint does not store
    assert "data-free bias correction: corrected 19 of 20 clustered layers; left as they are" in r.output
    assert r.output.splitlines()[-2].endswith(": conv1.weight")


def test_calibrated_target_mode_refines(run, tmp_path, resnet20_path, images_path):
    out = tmp_path / "r20.lego"
    r = run("compress", resnet20_path, "-o", out, "--target-ratio", "12", "--arch", "resnet20", "--calib", images_path,
            "--calib-images", "32", "--refine-epochs", "1", "--quiet")
    assert r.exit_code == 0, r.output
    fp32 = 4 * sum(v.numel() for v in load_file(resnet20_path).values())
    assert fp32 / out.stat().st_size >= 12
    r = run("compress", resnet20_path, "-o", out, "--target-ratio", "12", "--refine-epochs", "1")
    assert r.exit_code == 2 and "--refine-epochs needs --calib" in r.output


def test_refine_feature_weight_reaches_refinement_and_needs_calib(run, tmp_path, resnet20_path, images_path):
    out = tmp_path / "r20.lego"
    common = ("compress", resnet20_path, "-o", out, "--target-ratio", "12")
    calibrated = ("--arch", "resnet20", "--calib", images_path, "--calib-images", "32", "--refine-epochs", "1")
    files = []
    for weight in ("0", "10"):
        r = run(*common, *calibrated, "--refine-feature-weight", weight, "--quiet")
        assert r.exit_code == 0, r.output
        files.append(out.read_bytes())
    assert files[0] != files[1]  # the feature term changes what refinement tunes
    r = run(*common, "--refine-feature-weight", "1")
    assert r.exit_code == 2 and "--refine-feature-weight needs --calib" in r.output
    r = run(*common, *calibrated, "--refine-feature-weight", "-1")
    assert r.exit_code == 2 and "-1" in r.output


# flag, the RefineConfig field it sets, two values it accepts, one it refuses
REFINE_OPTIONS = (
    ("--refine-feature-fallback", "feature_fallback", ("none", "cosine"), "l2"),
    ("--refine-average", "average", ("0", "0.5"), "1"),
    ("--refine-precision", "precision", ("bfloat16", "float32"), "float16"),
    ("--refine-boundary-share", "boundary_share", ("0", "0.25"), "1.5"),
)


def test_refinement_options_reach_refinement_and_need_calib(run, tmp_path, resnet20_path, images_path, monkeypatch):
    import legonet.calibrate.pipeline as pipeline

    seen = []
    real = pipeline.refine_codebooks

    def spy(model, cm, calib, config, **kw):
        seen.append(config)
        return real(model, cm, calib, config, **kw)

    monkeypatch.setattr(pipeline, "refine_codebooks", spy)
    out = tmp_path / "r20.lego"
    common = ("compress", resnet20_path, "-o", out, "--target-ratio", "12")
    calibrated = ("--arch", "resnet20", "--calib", images_path, "--calib-images", "32", "--refine-epochs", "1")
    # every option in each run: three pipeline runs in all rather than three per option
    for i in (0, 1, None):
        extra = () if i is None else tuple(a for flag, _, values, _ in REFINE_OPTIONS for a in (flag, values[i]))
        r = run(*common, *calibrated, *extra, "--quiet")
        assert r.exit_code == 0, r.output
    for flag, field, values, bad in REFINE_OPTIONS:
        parse = float if field in ("average", "boundary_share") else str
        assert [getattr(c, field) for c in seen] == [*(parse(v) for v in values), getattr(RefineConfig(), field)]
        r = run(*common, flag, values[0])
        assert r.exit_code == 2 and f"{flag} needs --calib" in r.output
        r = run(*common, *calibrated, flag, bad)
        assert r.exit_code == 2 and bad in r.output


def _r20_12x_files(run, out, resnet20_path, images_path, variants: dict) -> tuple[tuple, tuple, dict]:
    """``(compress command, its calibration options, {name: file bytes})``: ResNet-20 compressed to
    12x with 32 calibration images and no refinement, once per ``variants`` entry (name -> extra options)."""
    common = ("compress", resnet20_path, "-o", out, "--target-ratio", "12")
    calibrated = ("--arch", "resnet20", "--calib", images_path, "--calib-images", "32", "--refine-epochs", "0")
    files = {}
    for name, extra in variants.items():
        r = run(*common, *calibrated, *extra, "--quiet")
        assert r.exit_code == 0, r.output
        files[name] = out.read_bytes()
    return common, calibrated, files


def test_norm_statistics_reach_the_pipeline_and_need_calib(run, tmp_path, resnet20_path, images_path):
    variants = {mode: ("--norm-statistics", mode) for mode in ("relative", "replace")}
    common, calibrated, files = _r20_12x_files(run, tmp_path / "r20.lego", resnet20_path, images_path,
                                               {**variants, None: ()})
    assert files["relative"] != files["replace"]  # the folded BatchNorm biases differ
    assert files[None] == files["relative"]  # the default
    r = run(*common, "--norm-statistics", "replace")
    assert r.exit_code == 2 and "--norm-statistics needs --calib" in r.output
    r = run(*common, *calibrated, "--norm-statistics", "fresh")
    assert r.exit_code == 2 and "fresh" in r.output


def test_channel_grouping_reaches_the_pipeline_and_needs_calib(run, tmp_path, resnet20_path, images_path):
    variants = {flag: (flag,) for flag in ("--group-channels", "--no-group-channels")}
    common, _, files = _r20_12x_files(run, tmp_path / "r20.lego", resnet20_path, images_path, {**variants, None: ()})
    assert files["--group-channels"] != files["--no-group-channels"]
    assert files[None] == files["--group-channels"]  # the default
    r = run(*common, "--no-group-channels")
    assert r.exit_code == 2 and "needs --calib" in r.output


def test_device_option_reaches_the_pipeline_and_is_checked(run, tmp_path, resnet20_path, images_path, monkeypatch):
    import legonet.calibrate.pipeline as pipeline

    seen = []
    real = pipeline.refine_codebooks

    def spy(model, cm, calib, config, **kw):
        seen.append(next(model.parameters()).device.type)
        return real(model, cm, calib, config, **kw)

    monkeypatch.setattr(pipeline, "refine_codebooks", spy)
    out = tmp_path / "r20.lego"
    common = ("compress", resnet20_path, "-o", out, "--target-ratio", "12")
    calibrated = ("--arch", "resnet20", "--calib", images_path, "--calib-images", "32", "--refine-epochs", "1")
    r = run(*common, *calibrated, "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    assert seen == ["cpu"]
    for bad, says in (("nope", "not a device PyTorch knows"), ("mps", "only 'cpu' and 'cuda[:N]'"),
                      ("cuda:64", "CUDA device" if torch.cuda.is_available() else "no CUDA device is available")):
        out.unlink(missing_ok=True)
        r = run(*common, *calibrated, "--device", bad, "--quiet")
        assert r.exit_code == 2 and says in r.output and not out.exists(), r.output
    r = run(*common, "--device", "cpu")
    assert r.exit_code == 2 and "--device needs --calib" in r.output


@needs_cuda
def test_device_cuda_runs_the_calibrated_pipeline_on_the_gpu(run, tmp_path, resnet20_path, images_path):
    common = ("--target-ratio", "12", "--arch", "resnet20", "--calib", images_path, "--calib-images", "64",
              "--refine-epochs", "2", "--quiet")
    for device in ("cpu", "cuda"):
        r = run("compress", resnet20_path, "-o", tmp_path / f"{device}.lego", *common, "--device", device)
        assert r.exit_code == 0, r.output
    on_cpu, on_gpu = (legonet.load(tmp_path / f"{d}.lego") for d in ("cpu", "cuda"))
    assert (tmp_path / "cuda.lego").stat().st_size <= resnet20_path.stat().st_size / 12
    for name, ct in on_cpu.clustered.items():  # float rounding differs between devices, not the method
        assert on_gpu.clustered[name].sqnr_db == pytest.approx(ct.sqnr_db, abs=1.0)
