import torch
from torch import nn

from legonet.datafree.pipeline import datafree_compress
from legonet.runlog import RunLog
from tests.nets import conv_bn_net

MENU = (((4, 4), 16), ((2, 2), 16), ((1, 2), 64), ((1, 1), 16))


def test_pipeline_names_the_layers_it_could_not_correct():
    model = conv_bn_net(16)  # the Flatten of a 4x4 map hides the classifier's input mean
    log = RunLog()
    cm, _ = datafree_compress(model, 6.0, menu=MENU, log=log)
    line = next(m for m in log.notes if m.startswith("data-free bias correction"))
    assert "corrected 1 of 3 clustered layers" in line  # the second convolution, after BatchNorm + ReLU
    assert "0.weight" in line and "7.weight" in line  # the stem sees images, the classifier a flattened map
    assert cm.report().ratio >= 6.0


def test_pipeline_corrects_every_layer_after_relu6_but_the_stem():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.BatchNorm2d(64), nn.ReLU6(),
        nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
    log = RunLog()
    datafree_compress(model, 4.0, menu=MENU, log=log)
    line = next(m for m in log.notes if m.startswith("data-free bias correction"))
    assert line.endswith("corrected 3 of 4 clustered layers; left as they are (input mean not derivable, or no BatchNorm "
                         "or bias after them): 0.weight")
