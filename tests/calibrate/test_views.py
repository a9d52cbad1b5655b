import pytest
import torch
from torch import nn

from legonet.calibrate.views import boundary_views, views_unsupported
from tests.nets import conv_bn_net


def _margin(z: torch.Tensor) -> torch.Tensor:
    top = z.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_a_linear_model_loses_exactly_the_share_of_its_margin(share):
    # the margin of a linear model is linear in its input (while the top two classes stay the
    # top two), so the linearised step is exact
    torch.manual_seed(0)
    model = nn.Linear(12, 5).double().eval()
    x = torch.randn(40, 12, dtype=torch.float64)
    made = boundary_views(model, x, share, batch_size=16)
    with torch.no_grad():
        before, z = _margin(model(x)), model(made.views)
        top = model(x).topk(2, dim=1).indices
    after = z.gather(1, top[:, :1]).squeeze(1) - z.gather(1, top[:, 1:]).squeeze(1)
    torch.testing.assert_close(after, (1 - share) * before, atol=1e-10, rtol=1e-10)
    assert made.views.shape == x.shape and made.views.dtype == x.dtype
    assert made.margin_after == pytest.approx((1 - share) * made.margin_before, rel=1e-9)
    assert made.relative_shift > 0


def test_views_of_a_network_sit_closer_to_its_boundary_and_leave_it_unchanged():
    model = conv_bn_net(16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(48, 3, 8, 8)
    made = boundary_views(model, x, 0.5, batch_size=32)
    with torch.no_grad():
        ratio = _margin(model(made.views)).median() / _margin(model(x)).median()
    assert 0.2 < float(ratio) < 0.8  # about half, to first order
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


def test_an_input_without_a_gradient_is_kept_as_it_is():
    # a constant model: the margin has no direction to move in
    model = nn.Linear(6, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = torch.randn(8, 6)
    made = boundary_views(model, x, 1.0)
    assert torch.equal(made.views, x) and made.relative_shift == 0.0


def test_views_are_deterministic():
    model, x = conv_bn_net(16), torch.randn(32, 3, 8, 8)
    assert torch.equal(boundary_views(model, x, 0.5).views, boundary_views(model, x, 0.5).views)


def test_models_views_cannot_serve_are_named():
    assert views_unsupported(torch.randn(4, 3), torch.randn(4, 10)) is None
    assert "floating point" in views_unsupported(torch.zeros(4, 7, dtype=torch.long), torch.randn(4, 10))
    assert "(N, classes >= 2)" in views_unsupported(torch.randn(4, 3), torch.randn(4, 1))
    assert "(N, classes >= 2)" in views_unsupported(torch.randn(4, 3), torch.randn(4, 5, 10))
