"""What ``sparsify`` masks in the networks people bring: masked layers and the masked share of
the parameters, for GPT-2 small and BERT-base (``transformers`` configs, random init, nothing
downloaded) and a ViT-B/16 written here as torchvision writes it (``nn.MultiheadAttention``).

The counts are the script's own, so that the same script measures any version of the package
(issue 23's before/after): a *weight layer* is a module holding a parameter of 2 or more
dimensions of its own (Linear, convolution, Conv1D, embedding, ``MultiheadAttention``'s
``in_proj_weight``); the *masked share* is the masked weights over all parameters (masks left
out), each parameter counted once.

    PYTHONPATH=src python bench/coverage.py              # this tree
    PYTHONPATH=/path/to/other/src python bench/coverage.py   # another version, same figures
"""

from __future__ import annotations

import argparse
import platform
import warnings

import torch
from torch import Tensor, nn


class EncoderBlock(nn.Module):
    """torchvision's ``vit_b_16`` encoder block."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViTB16(nn.Module):
    """torchvision's ``vit_b_16`` layout: 12 blocks of width 768, 224x224 images."""

    def __init__(self, layers: int = 12, dim: int = 768, classes: int = 1000) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, 16, stride=16)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 197, dim))
        self.layers = nn.Sequential(*(EncoderBlock(dim, 12, 4 * dim) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.heads(x[:, 0])


def _models() -> dict[str, object]:
    builders: dict[str, object] = {"vit_b16 (nn.MultiheadAttention)": ViTB16}
    try:
        import transformers as tf
    except ImportError:
        print("transformers not importable: GPT-2 and BERT rows skipped")
        return builders
    builders["gpt2 small (transformers)"] = lambda: tf.GPT2LMHeadModel(tf.GPT2Config())
    builders["bert-base (transformers)"] = lambda: tf.BertForSequenceClassification(tf.BertConfig())
    return builders


def measure(model: nn.Module) -> dict[str, object]:
    import scl_lightning as scl
    from scl_lightning.nn import masked_modules

    weight_layers = sum(
        1
        for m in model.modules()
        if any(p is not None and p.dim() >= 2 for p in m._parameters.values())
    )
    refused = None
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            scl.sparsify(model)
        except ValueError as err:
            refused = str(err)
    layers = list(masked_modules(model))
    masks = {id(layer.mask) for _, layer in layers}
    params = {id(p): p.numel() for p in model.parameters() if id(p) not in masks}
    masked = {id(layer.raw_weight): layer.raw_weight.numel() for _, layer in layers}
    lines = [str(w.message) for w in rec if "masked" in str(w.message) or "dense" in str(w.message)]
    return {
        "masked layers": f"{len(layers)} of {weight_layers}",
        "masked share": sum(masked.values()) / sum(params.values()),
        "parameters": sum(params.values()),
        "said": refused or (lines[0] if lines else "nothing"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    import scl_lightning

    print(f"scl_lightning from {scl_lightning.__file__}; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    print("| model | parameters | masked layers | masked share of parameters |")
    print("| --- | --- | --- | --- |")
    said = []
    for name, build in _models().items():
        torch.manual_seed(0)
        row = measure(build())  # type: ignore[operator]
        print(f"| {name} | {row['parameters']:,} | {row['masked layers']} | "
              f"{row['masked share']:.1%} |")  # fmt: skip
        said.append(f"{name}: {row['said']}")
    print()
    print("\n".join(said))


if __name__ == "__main__":
    main()
