"""Coverage of transformers models built from configs (slow tier; needs ``transformers``, the
``zoo`` extra): every projection of GPT-2 (transformers' ``Conv1D``) and BERT is masked, what
stays dense is named with why, and exports work or name what does in one line."""

from __future__ import annotations

import warnings

import pytest
import torch

tf = pytest.importorskip("transformers")

import scl_lightning as scl  # noqa: E402
from scl_lightning.deploy import export_model  # noqa: E402
from scl_lightning.nn import DenseLayersWarning, export_pruned, masked_modules  # noqa: E402

pytestmark = pytest.mark.slow


def _gpt2(use_cache: bool = False):
    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=32, n_positions=16,
        bos_token_id=0, eos_token_id=0, use_cache=use_cache,
    )  # fmt: skip
    return tf.GPT2LMHeadModel(cfg).eval()


def test_gpt2_masks_every_conv1d_and_names_the_embeddings_and_the_tied_head():
    model = _gpt2()
    with pytest.warns(DenseLayersWarning) as rec:
        scl.sparsify(model)
    line = str(rec[0].message)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "MaskedConv1D"]
    assert len(conv1d) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    assert [n for n, _ in masked_modules(model)] == conv1d
    assert "8 of 11 weight layers masked" in line
    assert "transformer.wte (Embedding)" in line and "lm_head (tied to transformer.wte" in line
    ids = torch.randint(0, 32, (2, 8))
    ref = model(ids).logits
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.mask[torch.rand(layer.mask.shape, generator=torch.Generator().manual_seed(1))
                       < 0.5] = -1.0  # fmt: skip
    pruned = model(ids).logits
    assert not torch.allclose(pruned, ref)
    torch.testing.assert_close(export_pruned(model)(ids).logits, pruned)


def test_bert_masks_every_linear_and_leaves_only_embeddings_dense():
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=32, max_position_embeddings=16, num_labels=10,
    )  # fmt: skip
    model = tf.BertForSequenceClassification(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseLayersWarning)  # nothing surprising is dense
        scl.sparsify(model)
    cover = scl.coverage(model)
    assert {d.reason for d in cover.dense} == {"other"}
    assert {d.type for d in cover.dense} == {"Embedding"}
    assert len(cover.masked) == 2 * 6 + 2  # q, k, v, out, intermediate, output; pooler, head


@pytest.mark.parametrize("fmt", ["compact", "sparse", "onnx"])
def test_gpt2_with_its_cache_exports_or_names_what_does(tmp_path, fmt):
    model = _gpt2(use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scl.sparsify(model)
    suffix = ".onnx" if fmt == "onnx" else ".pt2"
    with pytest.raises(ValueError, match=r"select_output\(model, 'logits'\), or the whole "):
        export_model(model, tmp_path / f"m{suffix}", fmt, torch.randint(0, 32, (2, 8)))
    assert list(tmp_path.iterdir()) == []
    report = export_model(model, tmp_path / "m.safetensors", "dense", torch.randint(0, 32, (2, 8)))
    assert report.path.exists()
