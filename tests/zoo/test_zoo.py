import pytest
import torch

from legonet.artifact import load_weights
from legonet.data import load_images
from legonet.errors import ArchitectureError
from legonet.evaluate import top1, wilson_interval
from legonet.io.checkpoints import read_state_dict
from legonet.zoo import ZOO, build, get_arch


@pytest.mark.parametrize("name, params", [("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet50_cifar", 23.5e6)])
def test_parameter_counts(name, params):
    n = sum(p.numel() for p in build(name).parameters())
    assert abs(n - params) / params < 0.02


def test_forward_shapes():
    for name in ("resnet20", "resnet32"):
        assert build(name)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bundled_resnet20_reaches_its_published_accuracy(resnet20_path, images_path):
    model = build("resnet20")
    load_weights(model, read_state_dict(resnet20_path))
    spec = get_arch("resnet20")
    acc = top1(model, load_images(images_path), spec.mean, spec.std)
    # 81.03 % on the full 10,000-image JPEG test set; 1,000 images give about +-2.5 points
    lo, hi = wilson_interval(acc, 1000)
    assert lo < 0.8103 < hi


def test_unknown_arch_and_import_path():
    with pytest.raises(ArchitectureError, match="unknown architecture"):
        get_arch("resnet21")
    with pytest.raises(ArchitectureError, match="cannot import"):
        get_arch("no_such_module:fn")
    assert get_arch("tests.conftest:TinyNet").build()(torch.randn(1, 3, 8, 8)).shape == (1, 5)
    assert set(ZOO) >= {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet50_cifar"}


def test_architecture_from_a_python_file_with_its_normalisation(tmp_path):
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2))\n"
        "net.legonet_mean = (0.5,)\n"
        "net.legonet_std = (0.25,)\n"
        "net.legonet_input_size = (1, 12, 12)\n")
    spec = get_arch(f"{tmp_path}/mynet.py:net")
    assert (spec.mean, spec.std, spec.input_size) == ((0.5,), (0.25,), (1, 12, 12))
    assert isinstance(build(f"{tmp_path}/mynet.py:net"), torch.nn.Sequential)
    with pytest.raises(ArchitectureError, match="has no 'nope'"):
        get_arch(f"{tmp_path}/mynet.py:nope")
    with pytest.raises(ArchitectureError, match="is not a file"):
        get_arch(f"{tmp_path}/absent.py:net")
    (tmp_path / "broken.py").write_text("raise RuntimeError('bad file')\n")
    with pytest.raises(ArchitectureError, match="RuntimeError: bad file"):
        get_arch(f"{tmp_path}/broken.py:net")
    (tmp_path / "oddnorm.py").write_text("def net():\n    pass\nnet.legonet_std = (0.0, 1.0, 1.0)\n")
    with pytest.raises(ArchitectureError, match="std > 0"):
        get_arch(f"{tmp_path}/oddnorm.py:net")
