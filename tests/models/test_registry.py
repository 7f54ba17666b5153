import pytest
import torch
from torch import nn

from scl_lightning.models import (
    LeNet300100,
    SmallCNN,
    create_model,
    list_models,
    register_model,
)
from scl_lightning.models import registry as registry_module


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_sorted_and_contains_builtins():
    names = list_models()
    assert {"lenet_300_100", "small_cnn"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", ["lenet_300_100", "small_cnn"])
@pytest.mark.parametrize("num_classes", [10, 3])
def test_create_model_output_shape(name, num_classes):
    model = create_model(name, num_classes=num_classes, input_shape=(1, 8, 8))
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, num_classes)


def test_create_model_types_and_input_shape():
    mlp = create_model("lenet_300_100", input_shape=[1, 8, 8])
    assert isinstance(mlp, LeNet300100) and mlp.in_features == 64
    cnn = create_model("small_cnn", input_shape=(3, 32, 32))
    assert isinstance(cnn, SmallCNN) and cnn.in_channels == 3
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lenet_param_count_784():
    model = create_model("lenet_300_100")
    # 784*300 + 300 + 300*100 + 100 + 100*10 + 10 = 235200 + 300 + 30000 + 100 + 1000 + 10
    assert _num_params(model) == 266_610
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_lenet_param_count_digits():
    model = create_model("lenet_300_100", input_shape=(1, 8, 8))
    # 64*300 + 300 + 300*100 + 100 + 100*10 + 10 = 19200 + 300 + 30000 + 100 + 1000 + 10
    assert _num_params(model) == 50_610
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 300), (300, 100), (100, 10)]


def test_lenet_custom_hidden():
    model = create_model("lenet_300_100", input_shape=(1, 8, 8), hidden=(32,))
    # 64*32 + 32 + 32*10 + 10
    assert _num_params(model) == 2048 + 32 + 320 + 10
    logistic = LeNet300100(in_features=64, hidden=())
    assert _num_params(logistic) == 64 * 10 + 10


def test_small_cnn_structure_and_tiny_input():
    model = create_model("small_cnn", input_shape=(1, 8, 8))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 16, (3, 3)),
        (16, 32, (3, 3)),
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert model(torch.randn(2, 1, 2, 2)).shape == (2, 10)


def test_unknown_model_error_lists_available():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; available: .*lenet_300_100"):
        create_model("nope")
    with pytest.raises(ValueError) as exc:
        create_model("nope")
    assert str(exc.value) == f"unknown model 'nope'; available: {', '.join(list_models())}"


def test_register_and_duplicate_registration():
    name = "_test_tmp_model"
    try:

        @register_model(name)
        def _factory(*, num_classes=10, input_shape=None, width=4):
            return nn.Linear(width, num_classes)

        assert name in list_models()
        model = create_model(name, num_classes=3, width=5)
        assert isinstance(model, nn.Linear) and (model.in_features, model.out_features) == (5, 3)

        with pytest.raises(ValueError, match=r"model '_test_tmp_model' is already registered"):
            register_model(name)
        with pytest.raises(ValueError, match="already registered"):
            register_model("lenet_300_100")
    finally:
        registry_module._MODELS.pop(name, None)
    assert name not in list_models()


@pytest.mark.parametrize("bad", ["", None, 3])
def test_register_bad_name(bad):
    with pytest.raises(ValueError, match="model name must be a non-empty string"):
        register_model(bad)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("lenet_300_100", {"num_classes": 0}, r"num_classes must be a positive integer, got 0"),
        ("lenet_300_100", {"hidden": (300, 0)}, r"every hidden width must be .* got 0"),
        ("lenet_300_100", {"input_shape": (1, 0, 8)}, r"input_shape must be .* got \(1, 0, 8\)"),
        ("small_cnn", {"num_classes": -1}, r"num_classes must be a positive integer, got -1"),
        ("small_cnn", {"channels": ()}, r"channels must be a non-empty sequence"),
        ("small_cnn", {"input_shape": (8, 8)}, r"input_shape must be \(channels, height, width\)"),
        ("small_cnn", {"input_shape": (1, 1, 8)}, r"at least 2x2 pixels"),
    ],
)
def test_factory_argument_validation(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)
