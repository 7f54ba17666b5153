"""Any model a user brings (slow tier): ``bench/model_matrix.py``'s checks on each of its
architectures (Swin-, ViT-, GPT-, ConvNeXt- and MobileNet-style patterns and an EfficientNet
with timm's fused ``BatchNormAct2d`` or separate norms and activations written there, and GPT-2,
BERT and ViT from ``transformers`` configs where it imports): train with the drop-in callback,
every mask changes the output, reload, every export format, channel compaction. Each cell is
PASS or a one-line refusal; a mismatch or a traceback fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import model_matrix  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", list(model_matrix.MODELS))
def test_model_matrix_row(name, tmp_path):
    why = model_matrix.available(name)
    if why is not None:
        pytest.skip(why)
    cells = model_matrix.check(name, tmp_path)
    failed = {column: cell for column, cell in cells.items() if cell.startswith("FAIL")}
    assert not failed, failed
    if not name.startswith("hf_"):  # the patterns written here all train and keep every mask
        assert cells["train"].startswith("PASS") and cells["masks used"].startswith("PASS")


def test_masks_used_check_catches_a_mask_that_is_not_read(tmp_path, monkeypatch):
    """The matrix's own check fails a model whose attention reads the stored weight (the bug
    of issue 22), so a PASS in its table means something."""
    import torch.nn.functional as F

    def stored_weight_read(self, x):
        n, t, c = x.shape
        stored = self.qkv._parameters["weight"]
        q, k, v = (
            F.linear(x, stored, self.qkv.bias)
            .reshape(n, t, 3, self.heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        out = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(n, t, c)
        return F.linear(out, self.proj.weight, self.proj.bias)

    monkeypatch.setattr(model_matrix.WindowAttention, "forward", stored_weight_read)
    cells = model_matrix.check("swin_like", tmp_path)
    assert cells["train"].startswith("FAIL") and "attn.qkv" in cells["train"]
    assert cells["masks used"] == "FAIL: masks with no effect: attn.qkv"
