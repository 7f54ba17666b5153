"""compact() through fused norm-activation modules (timm's ``BatchNormAct2d``, ``GroupNormAct``):
a channel-pruned EfficientNet built with them shrinks as much as one with separate BatchNorm and
activation modules. The EfficientNet and ``BatchNormAct2d`` are ``bench/model_matrix.py``'s (its
``efficientnet_fused`` and ``efficientnet_plain`` rows)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scl_lightning import export_pruned, sparsify
from scl_lightning.deploy.compact import compact

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from model_matrix import BatchNormAct2d, TinyEfficientNet  # noqa: E402

# --- timm's GroupNormAct (timm/layers/norm_act.py), written out: timm is not a dependency


class GroupNormAct(nn.GroupNorm):
    """GroupNorm, then dropout and an activation, in one module (as timm's)."""

    def __init__(
        self,
        num_channels,
        num_groups=32,
        eps=1e-5,
        affine=True,
        apply_act=True,
        act_layer=nn.ReLU,
        inplace=True,
        drop_layer=None,
    ):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


def _twin_networks() -> tuple[nn.Module, nn.Module]:
    """The fused and the separate network, with the same (non-trivial) weights and statistics."""
    torch.manual_seed(0)
    fused = TinyEfficientNet(fused=True)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    separate = TinyEfficientNet(fused=False)
    separate.load_state_dict(fused.state_dict())
    return fused, separate


def _kill_channels(model: nn.Module, fraction: float = 0.3, seed: int = 1) -> nn.Module:
    """Channel masks with the same random units of every layer pruned, then the pruned plain
    network (``w * H(m)`` baked in), in eval mode."""
    model = sparsify(model, granularity="channel")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(model.named_modules(), key=lambda item: item[0]):
            if hasattr(m, "mask"):
                out = m.mask.shape[0]
                dead = torch.randperm(out, generator=generator)[: int(out * fraction)]
                m.mask[dead] = -1.0
    return export_pruned(model).eval()


def test_fused_efficientnet_compacts_like_the_separate_one():
    fused, separate = _twin_networks()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), separate.eval()(x))
    pruned = {"fused": _kill_channels(fused), "separate": _kill_channels(separate)}
    reports = {}
    for name, model in pruned.items():
        small, reports[name] = compact(model, x[:2])
        with torch.no_grad():
            torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    fused_report, separate_report = reports["fused"], reports["separate"]
    assert fused_report.params_before == separate_report.params_before
    # the same chains in both: through the fused norms as through BatchNorm then SiLU
    assert fused_report.params_after == separate_report.params_after
    assert fused_report.removed == separate_report.removed
    assert fused_report.folded == separate_report.folded
    for chained in ("blocks.1.conv_pwl.0", "blocks.4.conv_pwl.0", "head.0"):
        before, after = fused_report.removed[chained]
        assert after < before
    assert fused_report.params_after < fused_report.params_before
    # what neither compacts yet: outputs tied by a residual addition, expansions read by a
    # depthwise (grouped) convolution
    assert "blocks.0.conv_pwl.0" in fused_report.kept
    assert "blocks.0.conv_pwl.0" in separate_report.kept
    assert "blocks.1.conv_pw.0" in fused_report.kept


@pytest.mark.parametrize(
    "norm",
    [
        lambda: BatchNormAct2d(6, act_layer=nn.SiLU),
        lambda: BatchNormAct2d(6, act_layer=nn.Hardswish, inplace=False, drop_layer=nn.Dropout),
        lambda: BatchNormAct2d(6, apply_act=False),
        lambda: GroupNormAct(6, num_groups=6, act_layer=nn.SiLU),
        lambda: nn.GroupNorm(6, 6),
        lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
    ],
    ids=["bnact", "bnact-drop", "bn-no-act", "gnact-per-channel", "groupnorm", "instancenorm"],
)
def test_a_channel_wise_norm_is_shrunk_with_its_producer(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm(), nn.Conv2d(6, 4, 1))
    with torch.no_grad():
        net[0].bias.uniform_(-1.0, 1.0)
        for name in ("weight", "bias", "running_mean"):
            if getattr(net[1], name, None) is not None:
                getattr(net[1], name).uniform_(-1.0, 1.0)
        if getattr(net[1], "running_var", None) is not None:
            net[1].running_var.uniform_(0.5, 2.0)
        net[2].weight[:, 4] = 0.0  # channel 4 is never read
    model = sparsify(net, granularity="channel").eval()
    with torch.no_grad():
        model[0].mask[2] = -1.0  # channel 2 computes from nothing: a constant, folded
    example = torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    small, report = compact(model, example)
    assert torch.equal(torch.get_rng_state(), rng)  # the check on a random input used its own
    assert report.removed["0"] == (6, 4)
    assert report.folded["2"] == 1
    shrunk = small.get_submodule("1")
    assert type(shrunk) is type(net[1])
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(shrunk, name, None) is not None:
            assert getattr(shrunk, name).shape == (4,)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_group_norm_act_with_larger_groups_keeps_the_channels_and_says_why():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), GroupNormAct(8, num_groups=2), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        net[2].weight[:, 5] = 0.0  # unread, but normalized with channels 4, 6 and 7
    model = sparsify(net, granularity="channel").eval()
    with torch.no_grad():
        model[0].mask[1] = -1.0
    small, report = compact(model, torch.randn(2, 3, 6, 6))
    assert report.removed.get("0", (8, 8)) == (8, 8)
    assert "groups of 4" in report.kept["0"]
    assert small.get_submodule("1").num_channels == 8
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


class BatchNormThenConv(nn.BatchNorm2d):
    """A norm subclass with a channel-mixing child: not a fused norm-activation."""

    def __init__(self, channels):
        super().__init__(channels)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias)
        return self.mix(x)


class FlippedBatchNorm(nn.BatchNorm2d):
    """A norm subclass without children whose forward reverses the channels."""

    def forward(self, x):
        return super().forward(x).flip(1)


@pytest.mark.parametrize("norm", [BatchNormThenConv, FlippedBatchNorm])
def test_a_norm_subclass_that_mixes_channels_is_not_followed(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 1), norm(6), nn.Conv2d(6, 4, 1))
    with torch.no_grad():
        net[2].weight[:, 4] = 0.0  # would be removed if the norm were channel-wise
    model = sparsify(net, granularity="channel").eval()
    small, report = compact(model, torch.randn(2, 3, 5, 5))
    assert report.removed.get("0", (6, 6)) == (6, 6)
    assert "0" in report.kept
    if norm is FlippedBatchNorm:
        assert "from that channel alone" in report.kept["0"]
    else:  # traced through: its convolution is a layer of the chain to the next one
        assert report.removed["1.mix"] == (6, 5)
    assert small.get_submodule("1").num_features == 6
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
