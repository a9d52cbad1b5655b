import torch

from legonet.zoo import build, get_arch


def test_vgg16_matches_torchvision_layout():
    with torch.device("meta"):
        model = build("vgg16")
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    sd = model.state_dict()
    assert sum(t.numel() for t in sd.values()) == 138_357_544
    assert sd["features.0.weight"].shape == (64, 3, 3, 3)
    assert sd["features.28.weight"].shape == (512, 512, 3, 3)
    assert sd["classifier.0.weight"].shape == (4096, 25088)
    assert sd["classifier.6.weight"].shape == (1000, 4096)
    spec = get_arch("vgg16")
    assert spec.input_size == (3, 224, 224) and spec.mean == (0.485, 0.456, 0.406)
