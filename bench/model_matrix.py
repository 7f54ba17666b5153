"""Any model a user brings: the drop-in callback, reload and every export on architectures
nobody here designed, as a table of PASS or a named refusal.

The patterns that broke masks or exports silently (issue 22), as small architectures written
here: attention that reads its projections' weights itself (Swin), ``nn.MultiheadAttention``
(ViT), an output layer tied to the embedding (GPT-2) with a ``dict`` output, a dataclass output,
Linear layers over the last dimension of ``(N, T, C)`` tokens and of channels-last activations
with layer scale (ConvNeXt), depthwise and grouped convolutions with squeeze-excitation
(MobileNet), and an EfficientNet in miniature (MBConv blocks: expand, depthwise,
squeeze-excitation, project, residual) whose norms and SiLU are timm's fused ``BatchNormAct2d``
(``efficientnet_fused``, a norm subclass with its own ``F.batch_norm`` forward) or the same
network with separate ``nn.BatchNorm2d`` and ``nn.SiLU`` (``efficientnet_plain``); and, where
``transformers`` imports, GPT-2, BERT and ViT built from their configs (random init, nothing
downloaded). timm and torchvision need a torchvision that cannot be imported next to this CPU
torch, so they are not run here: their patterns are written out instead.

The rows: ``swin_like``, ``vit_like``, ``gpt_like``, ``convnext_like``, ``mobilenet_se``,
``efficientnet_fused``, ``efficientnet_plain``, ``hf_gpt2``, ``hf_bert``, ``hf_vit``.

For each model, the columns:

- **train**: a user's own LightningModule (AdamW) with the drop-in ``SparseConnectivityLearning``
  trains 4 steps and checkpoints; no warning about unread masks. The cell says what
  ``scl_lightning.nn.coverage`` finds after training: the masked layers, the masked share of the
  parameters, and the weight layers left dense with why (the first four).
- **masks used**: after training, a random ~half of every mask is turned off; then, layer by
  layer, switching the whole mask off changes the output (eval mode). A mask that does not is
  a FAIL: it would be counted as pruned while the network still uses its weights.
- **reload**: ``scl.load_sparse(Module, last.ckpt)`` computes what the trained module does.
- **dense, compact, sparse, onnx**: ``export_model`` then ``load_export``; the loaded model's
  outputs equal the masked model's (every leaf of a structured output), or the export is refused
  with one line (``refused: ...``) and leaves no file.
- **channel**: the same architecture masked with ``granularity="channel"``, units cut off at
  random, ``compact``: equal outputs, with the parameters before and after.

A mismatch or a traceback is a FAIL. ``tests/models/test_model_matrix.py`` (slow tier) asserts
there is none.

    PYTHONPATH=src python bench/model_matrix.py [--models swin_like gpt_like ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COLUMNS = ("train", "masks used", "reload", "dense", "compact", "sparse", "onnx", "channel")
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}

# -- architectures written here --------------------------------------------------------------


class WindowAttention(nn.Module):
    """Swin: the block reads its projections' weights (``F.linear(x, self.qkv.weight)``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, c)
        return F.linear(out, self.proj.weight, self.proj.bias)


class TokenMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinLike(nn.Module):
    """Patch embedding, windowed attention with functional weight reads, token MLP."""

    def __init__(self, num_classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TokenMLP(dim, 2 * dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, T, C)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class ViTLike(nn.Module):
    """``nn.MultiheadAttention`` and a token MLP, with a class token."""

    def __init__(self, num_classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TokenMLP(dim, 2 * dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


class GPTLike(nn.Module):
    """GPT-2's tie (``lm_head.weight = wte.weight``) and a Hugging Face-style dict output."""

    def __init__(self, vocab: int = 32, dim: int = 16, positions: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(positions, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = TokenMLP(dim, 4 * dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> dict[str, Tensor]:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.wte(ids) + self.wpe(pos)
        h = h + self.mlp(self.norm(h))
        return {"logits": self.lm_head(h), "hidden_states": h}


@dataclasses.dataclass
class ClassifierOutput:
    logits: Tensor
    features: Tensor


class ConvNeXtLike(nn.Module):
    """Depthwise conv, channels-last Linear MLP with layer scale, residual; dataclass output."""

    def __init__(self, num_classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> ClassifierOutput:
        x = self.stem(x)
        h = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        h = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        x = x + h.permute(0, 3, 1, 2)
        features = x.mean((2, 3))
        return ClassifierOutput(self.head(features), features)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation as timm writes it: pooled channels, 1x1 reduce, activation, 1x1
    expand, sigmoid gate on the input."""

    def __init__(
        self, channels: int, reduced: int, act_layer: Callable[..., nn.Module] = nn.ReLU
    ) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.conv_expand(self.act(self.conv_reduce(s))))


class MobileNetLike(nn.Module):
    """Inverted residual: pointwise expand, depthwise, squeeze-excitation, grouped project;
    returns a tuple (logits, features)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.expand = nn.Sequential(
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6()
        )
        self.se = SqueezeExcite(32, 8)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, groups=2, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stem(x)
        x = x + self.project(self.se(self.depthwise(self.expand(x))))
        features = x.mean((2, 3))
        return self.head(features), features


# timm's fused norm-activation (timm/layers/norm_act.py), written out: timm is not a dependency


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d, then dropout and an activation, in one module (as timm's): a norm subclass
    whose forward calls ``F.batch_norm`` itself."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # cut & paste of torch.nn.BatchNorm2d.forward, as timm does
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # exponential moving average
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


def _conv_norm_act(
    cin: int, cout: int, kernel: int, stride: int, groups: int, fused: bool, act: bool = True
) -> nn.Sequential:
    """``Sequential(conv, norm[, act])``: the norm at index 1 either way, so the fused and the
    plain network have the same state dict keys."""
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    if fused:
        return nn.Sequential(conv, BatchNormAct2d(cout, apply_act=act, act_layer=nn.SiLU))
    return nn.Sequential(conv, nn.BatchNorm2d(cout), *([nn.SiLU(inplace=True)] if act else []))


class MBConv(nn.Module):
    """1x1 expand, depthwise 3x3, optional squeeze-excitation, 1x1 project (no activation),
    residual where the shapes match."""

    def __init__(
        self, cin: int, cout: int, stride: int, expand: int, se: bool, fused: bool
    ) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = _conv_norm_act(cin, mid, 1, 1, 1, fused) if expand > 1 else nn.Identity()
        self.conv_dw = _conv_norm_act(mid, mid, 3, stride, mid, fused)
        self.se = SqueezeExcite(mid, max(1, cin // 4), nn.SiLU) if se else nn.Identity()
        self.conv_pwl = _conv_norm_act(mid, cout, 1, 1, 1, fused, act=False)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return x + shortcut if self.has_skip else x


class TinyEfficientNet(nn.Module):
    """An EfficientNet in miniature for 3x32x32 images: its norms and SiLU fused in timm's
    ``BatchNormAct2d`` (``fused=True``) or separate ``nn.BatchNorm2d`` and ``nn.SiLU``
    modules; the same parameters either way."""

    def __init__(self, fused: bool, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_norm_act(3, 16, 3, 2, 1, fused)
        self.blocks = nn.Sequential(
            MBConv(16, 16, 1, 1, True, fused),  # residual
            MBConv(16, 24, 2, 4, True, fused),  # its projection feeds the next expansion
            MBConv(24, 40, 2, 4, False, fused),
            MBConv(40, 40, 1, 4, True, fused),  # residual
            MBConv(40, 64, 1, 4, True, fused),  # its projection feeds the head
        )
        self.head = _conv_norm_act(64, 128, 1, 1, 1, fused)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.flatten(self.pool(x)))


@dataclasses.dataclass(frozen=True)
class Spec:
    build: Callable[[], nn.Module]
    example: Callable[[torch.Generator], Tensor]
    #: the labels of a batch of ``n`` inputs: classes (n,) or next tokens (n, T)
    tokens: bool = False


def _images(gen: torch.Generator, n: int = 4) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=gen)


def _ids(gen: torch.Generator, n: int = 4, vocab: int = 32) -> Tensor:
    return torch.randint(0, vocab, (n, 8), generator=gen)


def _hf(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        small = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        if name == "gpt2":
            cfg = tf.GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=32, n_positions=16,
                bos_token_id=0, eos_token_id=0, use_cache=False,
            )  # fmt: skip
            return tf.GPT2LMHeadModel(cfg)
        if name == "bert":
            cfg = tf.BertConfig(
                num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                vocab_size=32, max_position_embeddings=16, num_labels=10, **small,
            )  # fmt: skip
            return tf.BertForSequenceClassification(cfg)
        cfg = tf.ViTConfig(
            image_size=32, patch_size=8, num_channels=3, num_hidden_layers=2, hidden_size=32,
            num_attention_heads=2, intermediate_size=64, num_labels=10, **small,
        )  # fmt: skip
        return tf.ViTForImageClassification(cfg)

    return build


MODELS: dict[str, Spec] = {
    "swin_like": Spec(SwinLike, _images),
    "vit_like": Spec(ViTLike, _images),
    "gpt_like": Spec(GPTLike, _ids, tokens=True),
    "convnext_like": Spec(ConvNeXtLike, _images),
    "mobilenet_se": Spec(MobileNetLike, _images),
    "efficientnet_fused": Spec(functools.partial(TinyEfficientNet, fused=True), _images),
    "efficientnet_plain": Spec(functools.partial(TinyEfficientNet, fused=False), _images),
    "hf_gpt2": Spec(_hf("gpt2"), _ids, tokens=True),
    "hf_bert": Spec(_hf("bert"), _ids),
    "hf_vit": Spec(_hf("vit"), _images),
}
THIRD_PARTY = {"hf_gpt2": "transformers", "hf_bert": "transformers", "hf_vit": "transformers"}


def available(name: str) -> str | None:
    """``None`` if model ``name`` can be built here, else why not."""
    package = THIRD_PARTY.get(name)
    if package is None:
        return None
    try:
        __import__(package)
    except ImportError as err:
        return f"{package} does not import here ({err})"
    return None


# -- the checks ------------------------------------------------------------------------------


def logits_of(out: Any) -> Tensor:
    """The logits of a model's output: a tensor, a ``logits`` key or attribute, or the first
    element of a tuple."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _leaves(out: Any) -> list[Tensor]:
    from scl_lightning.nn.outputs import named_outputs

    return [leaf for _, leaf in named_outputs(out) if isinstance(leaf, Tensor)]


def same_outputs(a: Any, b: Any) -> str | None:
    """``None`` if every tensor leaf of ``a`` equals ``b``'s (allclose), else what differs."""
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return f"{len(la)} output tensors against {len(lb)}"
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        if x.shape != y.shape:
            return f"output {i}: shape {tuple(x.shape)} against {tuple(y.shape)}"
        if not torch.allclose(x.float(), y.float(), **TOLERANCE):
            return f"output {i} differs by {(x.float() - y.float()).abs().max().item():.3g}"
    return None


def _module_class() -> type:
    import lightning.pytorch as pl

    class UserModule(pl.LightningModule):
        """What a user writes: their network, cross-entropy, AdamW; no SCL in sight."""

        def __init__(self, arch: str) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = MODELS[arch].build()

        def forward(self, x: Tensor) -> Any:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            logits = logits_of(self.net(x))
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return UserModule


_USER_MODULE: type | None = None


def user_module() -> type:
    global _USER_MODULE
    if _USER_MODULE is None:
        _USER_MODULE = _module_class()
    return _USER_MODULE


def _loader(spec: Spec, gen: torch.Generator) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.cat([spec.example(gen) for _ in range(4)])
    if spec.tokens:  # next-token labels over the vocabulary
        y = torch.randint(0, 32, (x.shape[0], x.shape[1]), generator=gen)
    else:
        y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _prune_randomly(net: nn.Module, gen: torch.Generator, off: float = 0.5) -> None:
    from scl_lightning.nn import masked_modules

    with torch.no_grad():
        for _, layer in masked_modules(net):
            layer.mask.copy_(
                torch.where(torch.rand(layer.mask.shape, generator=gen) < off, -1.0, 1.0)
            )
            if layer.mask.shape[0] > 2:  # a dead unit or two
                layer.mask[torch.randperm(layer.mask.shape[0], generator=gen)[:2]] = -1.0


@contextlib.contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    import logging

    level = logging.getLogger("lightning.pytorch").level
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            yield rec
    finally:
        logging.getLogger("lightning.pytorch").setLevel(level)


def _refusal(err: Exception) -> str:
    """A one-line ValueError or TypeError is a refusal; anything else (another exception, or a
    multi-line wall) is a FAIL."""
    text = str(err).strip()
    if isinstance(err, (ValueError, TypeError)) and text and "\n" not in text:
        return f"refused: {text}"
    return f"FAIL: {type(err).__name__}: {text.splitlines()[0] if text else ''}"


def check(name: str, workdir: Path, seed: int = 0) -> dict[str, str]:
    """Every column for model ``name``: ``PASS...``, ``refused: ...`` or ``FAIL: ...``."""
    import lightning.pytorch as pl

    import scl_lightning as scl
    from scl_lightning.callbacks import SparseConnectivityLearning
    from scl_lightning.deploy import compact, export_model, load_export
    from scl_lightning.deploy.compact import stored_parameters
    from scl_lightning.nn import masked_modules

    spec = MODELS[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    result: dict[str, str] = {}
    module_cls = user_module()

    # train
    module = module_cls(name)
    trainer = pl.Trainer(
        max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=workdir, accelerator="cpu", limit_val_batches=0,
        callbacks=[
            SparseConnectivityLearning(lam=1e-4, mask_lr=0.05),
            pl.callbacks.ModelCheckpoint(dirpath=workdir / "ckpt", save_last=True),
        ],
    )  # fmt: skip
    try:
        with _quiet() as rec:
            trainer.fit(module, _loader(spec, gen))
    except Exception as err:
        refused = _refusal(err)
        return {c: refused if c == "train" else "not run: nothing trained" for c in COLUMNS}
    unread = [str(w.message) for w in rec if "not computed through their mask" in str(w.message)]
    layers = list(masked_modules(module.net))
    if not layers:
        return {c: "FAIL: nothing masked" for c in COLUMNS}
    result["train"] = f"FAIL: {unread[0]}" if unread else f"PASS ({_covered(module.net)})"

    # masks used: turning a whole mask off changes the output
    net = module.net.eval()
    _prune_randomly(net, gen)
    x = spec.example(gen)
    with torch.no_grad():
        ref = net(x)
        unused = []
        for layer_name, layer in layers:
            kept = layer.mask.detach().clone()
            layer.mask.fill_(-1.0)
            # bit-identical outputs: the mask is not read (a small effect still counts)
            if all(torch.equal(a, b) for a, b in zip(_leaves(net(x)), _leaves(ref), strict=True)):
                unused.append(layer_name)
            layer.mask.copy_(kept)
    result["masks used"] = (
        f"FAIL: masks with no effect: {', '.join(unused)}"
        if unused
        else f"PASS ({len(layers)}/{len(layers)})"
    )

    # reload
    ckpt = workdir / "pruned.ckpt"
    trainer.save_checkpoint(ckpt)
    try:
        with _quiet():
            reloaded = scl.load_sparse(module_cls, ckpt)
        with torch.no_grad():
            diff = same_outputs(reloaded.net(x), ref)
        result["reload"] = "PASS" if diff is None else f"FAIL: {diff}"
    except Exception as err:
        result["reload"] = _refusal(err)

    # every export format
    for fmt in ("dense", "compact", "sparse", "onnx"):
        path = workdir / f"model_{fmt}"
        try:
            with _quiet():
                report = export_model(net, path.with_suffix(_suffix(fmt)), fmt, x)
                loaded = load_export(
                    report.path, model=MODELS[name].build() if fmt == "dense" else None
                )
            with torch.no_grad():
                diff = same_outputs(loaded(x), ref)
            result[fmt] = "PASS" if diff is None else f"FAIL: {diff}"
        except Exception as err:
            result[fmt] = _refusal(err)
            leftovers = [p.name for p in workdir.glob(f"model_{fmt}*")]
            if leftovers and not result[fmt].startswith("FAIL"):
                result[fmt] = f"FAIL: refused but left {leftovers}"

    # channel granularity and compact
    try:
        torch.manual_seed(seed)
        with _quiet():
            channel = scl.sparsify(spec.build(), granularity="channel").eval()
        _prune_randomly(channel, gen, off=0.3)
        with torch.no_grad():
            want = channel(x)
        with _quiet():
            small, report = compact(channel, x)
        with torch.no_grad():
            diff = same_outputs(small(x), want)
        before, after = stored_parameters(scl.export_pruned(channel)), stored_parameters(small)
        result["channel"] = (
            f"PASS ({before} -> {after} params)" if diff is None else f"FAIL: {diff}"
        )
    except Exception as err:
        result["channel"] = _refusal(err)
    return result


def _covered(net: nn.Module, shown: int = 4) -> str:
    """What SCL covers after training, from :func:`~scl_lightning.nn.coverage`: the masked
    layers, their share of the parameters, and the first ``shown`` layers left dense with why."""
    from scl_lightning.nn import coverage

    cov = coverage(net)
    text = (
        f"{len(cov.masked)} masked, "
        f"{cov.masked_parameters / max(cov.parameters, 1):.1%} of parameters"
    )
    if cov.dense:
        text += "; dense: " + ", ".join(
            f"{d.name or '(root)'} ({d.reason})" for d in cov.dense[:shown]
        )
        if len(cov.dense) > shown:
            text += f" and {len(cov.dense) - shown} more"
    return text


def _suffix(fmt: str) -> str:
    from scl_lightning.deploy.formats import SUFFIXES

    return SUFFIXES[fmt]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    print(
        f"CPU ({os.cpu_count()} cores); Python {platform.python_version()}, torch "
        f"{torch.__version__}",
        flush=True,
    )
    rows = []
    t0 = time.perf_counter()
    for name in args.models:
        why = available(name)
        if why is not None:
            rows.append((name, {c: f"not run: {why}" for c in COLUMNS}))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            rows.append((name, check(name, Path(tmp))))
        print(f"  {name}: {time.perf_counter() - t:.0f} s", flush=True)
    print()
    print("| model | " + " | ".join(COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 1) + "|")
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells[c] for c in COLUMNS) + " |")
    failed = sum(v.startswith("FAIL") for _, cells in rows for v in cells.values())
    print(f"\n{failed} FAIL cell(s); total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
