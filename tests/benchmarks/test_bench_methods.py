"""The target-mode entries of LEGONET_METHODS meet their ratio in real file bytes."""

from benchmarks.methods import LEGONET_METHODS
from tests.benchmarks.conftest import TINY


def _fp32(sd):
    return sum(4 * v.numel() if v.is_floating_point() else v.numel() * v.element_size() for v in sd.values())


def test_target_methods_meet_the_ratio(tiny_sd, tiny_images):
    out = LEGONET_METHODS["legonet-target"](tiny_sd, TINY, None, ratio=3.0)
    assert _fp32(tiny_sd) / out.file_bytes >= 3.0 and set(out.state_dict) == set(tiny_sd)
    out = LEGONET_METHODS["legonet-target-calib"](tiny_sd, TINY, tiny_images, ratio=3.0, images=32)
    assert _fp32(tiny_sd) / out.file_bytes >= 3.0 and out.info["scale_bytes"] > 0
