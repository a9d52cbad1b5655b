import csv
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from legonet.artifact import load_weights
from legonet.zoo import build, get_arch
from legonet.zoo.efficientnet_lite import SameConv2d, same_padding
from legonet.zoo.mobilenet_v2 import make_divisible

SHARED = Path(__file__).resolve().parents[2].parent / "shared"

# (number of state-dict entries, sha256 prefix of the sorted "key:shape" lines) of the reference
# implementations: the PyPI port efficientnet-lite-pytorch 0.1.0 and torchvision's mobilenet_v2
LAYOUTS = {
    "efficientnet_lite0": (296, "61463ac4c150f2c6"),
    "efficientnet_lite1": (386, "dfa6f1b96dee5618"),
    "efficientnet_lite2": (386, "1f9bf4ad8514dff6"),
    "efficientnet_lite3": (440, "c32b4c273b737bf2"),
    "efficientnet_lite4": (548, "5b146538c8a74620"),
    "mobilenet_v2": (314, "8e46697c9016e576"),
}
PARAMETERS = {
    "efficientnet_lite0": 4_652_008,
    "efficientnet_lite1": 5_416_680,
    "efficientnet_lite2": 6_092_072,
    "efficientnet_lite3": 8_197_096,
    "efficientnet_lite4": 13_006_568,
    "mobilenet_v2": 3_504_872,
}
# last block index, its expanded width and the last stage's output channels
LITE_TAILS = {
    "efficientnet_lite0": (15, 1152, 320),
    "efficientnet_lite1": (20, 1152, 320),
    "efficientnet_lite2": (20, 1248, 352),
    "efficientnet_lite3": (23, 1392, 384),
    "efficientnet_lite4": (29, 1632, 448),
}


def _layout(sd: dict[str, torch.Tensor]) -> tuple[int, str]:
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(sd.items()))
    return len(sd), hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_dict_matches_the_reference_layout(name):
    with torch.device("meta"):
        model = build(name)
    sd = model.state_dict()
    assert _layout(sd) == LAYOUTS[name]
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


@pytest.mark.parametrize("name", sorted(LITE_TAILS))
def test_efficientnet_lite_spot_shapes(name):
    with torch.device("meta"):
        sd = build(name).state_dict()
    last, hidden, out = LITE_TAILS[name]
    first_out = 16 if name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2") else 24
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)  # the stem is not width-scaled
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert "_blocks.0._expand_conv.weight" not in sd  # expansion ratio 1
    assert sd["_blocks.0._project_conv.weight"].shape == (first_out, 32, 1, 1)
    assert sd["_blocks.1._expand_conv.weight"].shape == (6 * first_out, first_out, 1, 1)
    assert sd[f"_blocks.{last}._depthwise_conv.weight"].shape == (hidden, 1, 3, 3)
    assert sd[f"_blocks.{last}._project_conv.weight"].shape == (out, hidden, 1, 1)
    assert f"_blocks.{last + 1}._bn2.weight" not in sd
    assert sd["_conv_head.weight"].shape == (1280, out, 1, 1)  # nor is the head
    assert sd["_bn1.running_var"].shape == (1280,)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.bias"].shape == (1000,)


def test_mobilenet_v2_spot_shapes():
    with torch.device("meta"):
        sd = build("mobilenet_v2").state_dict()
    assert sd["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # no expansion in the first block
    assert sd["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    assert sd["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)
    assert sd["features.2.conv.1.0.weight"].shape == (96, 1, 3, 3)
    assert sd["features.17.conv.2.weight"].shape == (320, 960, 1, 1)
    assert sd["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert sd["classifier.1.weight"].shape == (1000, 1280)


def test_registered_inputs():
    for i, res in enumerate((224, 240, 260, 280, 300)):
        spec = get_arch(f"efficientnet_lite{i}")
        assert spec.input_size == (3, res, res)
        assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    spec = get_arch("mobilenet_v2")
    assert spec.input_size == (3, 224, 224)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_forward_gives_imagenet_logits(name):
    torch.manual_seed(0)
    model = build(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 72))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    with torch.device("meta"):  # the native resolution, shapes only
        assert build(name)(torch.empty(1, *get_arch(name).input_size)).shape == (1, 1000)


def test_residual_connections_follow_stride_and_width():
    model = build("efficientnet_lite0")
    residual = [b.use_residual for b in model._blocks]
    # stages of 1, 2, 2, 3, 3, 4, 1 blocks; the first of each changes stride or width
    assert residual == [False, False, True, False, True, False, True, True, False, True, True,
                        False, True, True, True, False]


def test_make_divisible():
    assert [make_divisible(c) for c in (16 * 1.4, 24 * 1.4, 16 * 1.2, 192 * 1.4, 3.0)] == [24, 32, 24, 272, 8]


def _tf_same_reference(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's documented rule, written independently of the library's."""
    k = (kernel - 1) * dilation + 1
    total = max(k - stride, 0) if size % stride == 0 else max(k - size % stride, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("dilation", [1, 2])
def test_same_conv_matches_explicit_padding(stride, kernel, dilation):
    torch.manual_seed(0)
    conv = SameConv2d(3, 4, kernel, stride, dilation=dilation)
    assert isinstance(conv, nn.Conv2d) and conv.padding == (0, 0)
    for h, w in ((15, 16), (16, 15), (7, 7), (8, 8)):
        x = torch.randn(2, 3, h, w)
        top, bottom = _tf_same_reference(h, kernel, stride, dilation)
        left, right = _tf_same_reference(w, kernel, stride, dilation)
        assert conv.padding_for(h, w) == (left, right, top, bottom)
        want = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride, 0, dilation)
        got = conv(x)
        assert got.shape[-2:] == (math.ceil(h / stride), math.ceil(w / stride))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_same_padding_puts_the_odd_pixel_after():
    assert same_padding(224, 3, 2) == (0, 1)  # even input, stride 2: TF pads bottom/right only
    assert same_padding(15, 5, 2) == (2, 2)
    assert same_padding(14, 5, 2) == (1, 2)
    assert same_padding(8, 3, 1) == (1, 1)
    assert same_padding(8, 1, 2) == (0, 0)
    # depthwise, stride 2: the asymmetric padding is not PyTorch's symmetric padding=1
    torch.manual_seed(0)
    conv = SameConv2d(4, 4, 3, 2, groups=4, bias=False)
    x = torch.randn(1, 4, 8, 8)
    symmetric = F.conv2d(x, conv.weight, None, 2, 1, 1, 4)
    assert conv(x).shape == symmetric.shape and not torch.allclose(conv(x), symmetric)


class _LeafSameConv(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SameConv2d) or super().is_leaf_module(m, qualname)


def test_fx_traces_with_same_conv_as_a_leaf():
    model = build("efficientnet_lite0").eval()
    graph = _LeafSameConv().trace(model)
    gm = fx.GraphModule(model, graph)
    convs = [n.target for n in graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), SameConv2d)]
    assert len(convs) == 2 + 15 * 3 + 2  # stem, head, 15 blocks of three convs, the first of two
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


FIXTURE = SHARED / "models" / "efficientnet_lite1_imagenet.safetensors"
EVAL = SHARED / "data" / "imagenet-dev" / "eval"
# every 28th photo of eval/labels.csv; the fixture's top-1 at 224x224 (15 of the 16 are right; the
# smallest top-1 margin is 1.3 logits, so the expectation does not hinge on rounding)
EXPECTED_TOP1 = [1, 292, 344, 420, 459, 515, 553, 593, 650, 711, 747, 776, 828, 880, 829, 947]


@pytest.mark.skipif(not FIXTURE.exists(), reason="../shared (development data) is absent")
def test_efficientnet_lite1_fixture_predictions():
    image = pytest.importorskip("PIL.Image")
    from safetensors.torch import load_file

    sd = load_file(FIXTURE)
    model = build("efficientnet_lite1").eval()
    load_weights(model, sd, FIXTURE.name)
    model.load_state_dict(sd, strict=True)
    rows = list(csv.DictReader(open(EVAL / "labels.csv")))[::28][:16]
    x = np.stack([np.asarray(image.open(EVAL / r["file"]).convert("RGB")) for r in rows])
    x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        assert model(x).argmax(1).tolist() == EXPECTED_TOP1
