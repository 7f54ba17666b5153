"""A mask acts wherever its weight is read (the layer's forward, a functional read of
``module.weight``, MultiheadAttention's read of ``out_proj.weight``), writes through ``weight``
fail loudly, and weights held by two modules are left dense."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scl_lightning.nn import (
    DenseLayersWarning,
    MaskedConv2d,
    MaskedLinear,
    export_pruned,
    mask_spec,
    masked_modules,
    sparsify,
    sparsify_like,
    tied_weights,
    total_connections,
)


class WindowAttention(nn.Module):
    """Swin's pattern: the block reads its projections' weights itself, never calling them."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, c)
        return F.linear(out, self.proj.weight, self.proj.bias)


class FunctionalConv(nn.Module):
    """A convolution whose weight another method reads (weight standardization style code)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)


class TinyLM(nn.Module):
    """GPT-2's tie: the output layer's weight is the token embedding's."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.mlp = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mlp(self.wte(ids))))


def _prune_half(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.mask.copy_(
                torch.where(torch.rand(layer.mask.shape, generator=gen) < 0.5, -1.0, 1.0)
            )


@pytest.mark.parametrize(
    ("make", "shape"), [(WindowAttention, (2, 5, 8)), (FunctionalConv, (2, 3, 6, 6))]
)
def test_functional_reads_see_the_mask(make, shape):
    torch.manual_seed(0)
    model = sparsify(make())
    x = torch.randn(shape)
    _prune_half(model)
    with torch.no_grad():
        for _, layer in masked_modules(model):
            dense = copy.deepcopy(layer.raw_weight)
            assert not torch.equal(layer.weight, dense)  # the read is masked
    # the same function as the plain network with w * H(m) baked in
    torch.testing.assert_close(model(x), export_pruned(model)(x))


def test_functional_reads_pass_the_task_gradient_to_the_mask():
    torch.manual_seed(0)
    model = sparsify(WindowAttention())
    model(torch.randn(2, 5, 8)).square().sum().backward()
    for name, layer in masked_modules(model):
        assert layer.mask.grad is not None and layer.mask.grad.abs().sum() > 0, name
        assert layer.raw_weight.grad is not None, name


def test_every_mask_changes_the_output_of_a_functional_reader():
    torch.manual_seed(0)
    model = sparsify(WindowAttention())
    x = torch.randn(2, 5, 8)
    ref = model(x).detach()
    for name, layer in masked_modules(model):
        with torch.no_grad():
            layer.mask.fill_(-1.0)
            assert not torch.allclose(model(x), ref), name
            layer.mask.fill_(1.0)


def test_multihead_attention_reads_a_masked_out_proj():
    """MultiheadAttention never calls ``out_proj``; it reads ``out_proj.weight``."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    masked = MaskedLinear(8, 8)
    masked.load_state_dict({**mha.out_proj.state_dict(), "mask": masked.mask.detach()})
    x = torch.randn(2, 4, 8)
    ref, _ = mha(x, x, x)
    mha.out_proj = masked
    out, _ = mha(x, x, x)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        masked.mask.fill_(-1.0)
    out, _ = mha(x, x, x)
    torch.testing.assert_close(out, masked.bias.expand_as(out))


def test_state_dict_keys_and_strict_reload_are_unchanged():
    model = sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Conv1d(3, 2, 1)))
    assert list(model.state_dict()) == [
        "0.weight", "0.bias", "0.mask", "2.weight", "2.bias", "2.mask",
    ]  # fmt: skip
    assert model[0].weight is not model[0].raw_weight
    assert model[0].raw_weight is dict(model.named_parameters())["0.weight"]
    _prune_half(model)
    fresh = sparsify_like(
        nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Conv1d(3, 2, 1)), mask_spec(model)
    )
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 4, 1).transpose(1, 2).squeeze(-1)
    torch.testing.assert_close(fresh[0](x), model[0](x))
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Conv1d(3, 2, 1))
    assert plain.load_state_dict(export_pruned(model).state_dict(), strict=True)


def test_writing_through_weight_raises_and_raw_weight_takes_writes():
    layer = MaskedConv2d(2, 3, 3)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="inference tensor"):
            layer.weight.copy_(torch.zeros_like(layer.raw_weight))
        with pytest.raises(RuntimeError, match="inference tensor"):
            layer.weight[0] = 0
        layer.raw_weight.zero_()
    assert not layer.weight.any()
    with pytest.raises(ValueError, match="non-leaf"):
        torch.optim.SGD([layer.weight], lr=0.1)


def test_reset_parameters_initializes_the_stored_weight_and_keeps_the_mask():
    torch.manual_seed(0)
    layer = MaskedLinear(6, 4)
    with torch.no_grad():
        layer.raw_weight.zero_()
        layer.mask[0] = -2.0
    layer.reset_parameters()
    assert layer.raw_weight.abs().sum() > 0
    assert (layer.mask[0] == -2.0).all() and (layer.mask[1:] == 1.0).all()


def test_a_failing_mask_read_is_an_error_not_the_stored_weight():
    layer = MaskedLinear(3, 2)
    del layer.ste  # the mask cannot be applied
    with pytest.raises(RuntimeError, match=r"MaskedLinear\.weight"):
        layer(torch.ones(1, 3))


def test_a_layer_called_twice_reads_its_mask_each_time_and_counts_once():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    model = sparsify(Twice())
    model.fc.reset_mask_reads()
    _prune_half(model)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), export_pruned(model)(x))
    assert model.fc.mask_reads == 2
    assert total_connections(model) == 16


def test_tied_weights_are_found():
    model = TinyLM()
    assert tied_weights(model) == {"lm_head": "wte.weight"}
    shared = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    shared.append(shared[0])  # one module under two names: not a tie
    assert tied_weights(shared) == {}


def test_sparsify_leaves_a_tied_layer_dense_with_one_line():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 11, (2, 7))
    with pytest.warns(
        DenseLayersWarning,
        match=r"Left dense: .*weight tied to another module \[1, 0.0%\]: lm_head \(tied to "
        r"wte.weight\)",
    ) as rec:
        sparsify(model)
    assert len([w for w in rec if "Left dense" in str(w.message)]) == 1
    assert [name for name, _ in masked_modules(model)] == ["mlp"]
    assert model.lm_head.weight is model.wte.weight
    _prune_half(model)
    plain = export_pruned(model)
    assert plain.lm_head.weight is plain.wte.weight
    torch.testing.assert_close(plain(ids), model(ids))
    assert total_connections(model) == 36  # mlp only: the tie is not counted as maskable


def test_only_tied_layers_is_an_error_naming_them():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5)
            self.out.weight = self.emb.weight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ValueError,
            match=r"\(2 weight layer\(s\) left dense: emb \(not a Linear or convolution: "
            r"Embedding\), out \(weight tied to another module: tied to emb.weight\)\)",
        ):
            sparsify(Head())


def test_export_pruned_refuses_a_masked_tied_layer():
    model = TinyLM()
    MaskedLinear.from_dense(model.lm_head)  # masked by hand, tie and all
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight with wte\.weight"):
        export_pruned(model)


def test_flops_of_a_layer_read_functionally_are_its_own():
    """fvcore books a functional read's multiply-adds to the caller; the layer gets them, so
    the FLOPs penalty prices its mask and effective FLOPs drop when it is pruned."""
    from scl_lightning.nn.flops import count_flops

    model = sparsify(nn.Sequential(WindowAttention(), nn.Linear(8, 4)))
    counts = count_flops(model, torch.randn(1, 5, 8))
    assert counts.layers == {"0.qkv": 5 * 24 * 8, "0.proj": 5 * 8 * 8, "1": 5 * 8 * 4}
    assert counts.modules["0.qkv"] == 960
    off = {"0.qkv": 0.0, "0.proj": 0.0, "1": 1.0}
    assert counts.effective(off)[0] == counts.total - 960 - 320
    assert counts.effective_module("0", off) == counts.modules["0"] - 960 - 320


def test_a_weight_made_by_a_hook_is_left_dense_and_named():
    """spectral_norm keeps ``weight_orig`` and recomputes ``weight`` before every forward."""
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(DenseLayersWarning, match=r"weight made by a hook \[1, .*\]: 0 \(made by"):
        sparsify(model)
    assert [name for name, _ in masked_modules(model)] == ["2"]
    assert type(model[0]) is nn.Linear
    model(torch.randn(3, 4))  # still runs
    with pytest.raises(TypeError, match="absent or computed by a hook"):
        MaskedLinear.from_dense(model[0])
    assert type(model[0]) is nn.Linear


def test_flops_of_a_convolution_read_functionally_are_its_own():
    from scl_lightning.nn.flops import count_flops

    model = sparsify(FunctionalConv())
    counts = count_flops(model, torch.randn(1, 3, 6, 6))
    assert counts.layers == {"conv": 4 * 6 * 6 * 3 * 3 * 3}  # outputs x fan-in
    assert counts.total == counts.layers["conv"]
