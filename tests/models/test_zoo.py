"""The model zoo: LeNet-5, CIFAR ResNets and VGGs, ImageNet ResNets, torchvision:/timm: names."""

import math
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import scl_lightning as scl
from scl_lightning.models import (
    CifarResNet,
    CifarVGG,
    LeNet5,
    ResNet,
    create_model,
    list_models,
    register_model,
)
from scl_lightning.models import external as external_module
from scl_lightning.models.resnet_cifar import ZeroPadShortcut
from scl_lightning.models.resnet_imagenet import Bottleneck
from scl_lightning.nn.flops import count_flops

CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)
IMAGENET_SMALL = (3, 64, 64)  # the ImageNet networks take any size; 64x64 keeps tests fast

# name, extra factory kwargs, input shape used in the tests
ZOO = [
    ("lenet5", {}, MNIST),
    ("resnet20", {}, CIFAR),
    ("resnet32", {}, CIFAR),
    ("resnet44", {}, CIFAR),
    ("resnet56", {}, CIFAR),
    ("resnet110", {}, CIFAR),
    ("vgg16", {}, CIFAR),
    ("vgg16", {"classifier": "mlp"}, CIFAR),
    ("vgg19", {}, CIFAR),
    ("resnet18", {}, IMAGENET_SMALL),
    ("resnet50", {}, IMAGENET_SMALL),
]
ZOO_IDS = [name + ("-" + "-".join(map(str, kw.values())) if kw else "") for name, kw, _ in ZOO]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_has_the_zoo_and_no_prefixed_names():
    names = list_models()
    assert {name for name, _, _ in ZOO} <= set(names)
    assert not any(":" in name for name in names)


@pytest.mark.parametrize(("name", "kwargs", "shape"), ZOO, ids=ZOO_IDS)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_output_shape(name, kwargs, shape, num_classes):
    model = create_model(name, num_classes=num_classes, input_shape=shape, **kwargs)
    assert model(torch.randn(2, *shape)).shape == (2, num_classes)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("lenet5", (1, 32, 32)),  # fc1 gets 50 * 5 * 5 inputs
        ("lenet5", (3, 16, 20)),  # the smallest height that works
        ("resnet20", (1, 28, 28)),
        ("resnet20", (3, 7, 5)),  # odd sizes: the shortcut's subsample matches the strided conv
        ("vgg16", (3, 64, 48)),
        ("vgg19", (1, 16, 16)),
        ("resnet18", (1, 33, 33)),
    ],
)
def test_other_input_shapes(name, shape):
    model = create_model(name, num_classes=5, input_shape=shape)
    assert model(torch.randn(2, *shape)).shape == (2, 5)


def test_lenet5_layers_follow_caffe():
    model = create_model("lenet5", input_shape=MNIST)
    assert isinstance(model, LeNet5)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "conv1.weight": (20, 1, 5, 5),
        "conv1.bias": (20,),
        "conv2.weight": (50, 20, 5, 5),
        "conv2.bias": (50,),
        "fc1.weight": (500, 800),
        "fc1.bias": (500,),
        "fc2.weight": (10, 500),
        "fc2.bias": (10,),
    }
    assert create_model("lenet5", input_shape=(1, 32, 32)).fc1.in_features == 50 * 5 * 5


# Every number below was computed with this code and checked by hand; CIFAR/MNIST models with 10
# classes, ImageNet ones with 1000.
#   lenet5: 20*25+20 + 50*20*25+50 + 800*500+500 + 500*10+10 = 431,080 (Han et al. 2015: 431K).
#   resnet(6n+2): convs 16*3*9 + n*2*(16*16*9) + (32*16*9 + (2n-1)*32*32*9)
#                 + (64*32*9 + (2n-1)*64*64*9), BN 2 per channel, fc 64*10+10;
#                 n=9 (resnet56): 848,016 + 4,352 + 650 = 853,018 (He et al. 2016: 0.85M).
#   vgg16: convs 14,710,464 (no bias) + BN 8,448 + fc 5,130 = 14,724,042.
#   vgg16 "mlp": + 512*512+512 + BN1d 1,024 instead of 5,130 -> 14,987,722.
#   vgg19: convs 20,018,880 + BN 11,008 + fc 5,130 = 20,035,018 (network slimming: 20.04M).
#   resnet18 / resnet50: 11,689,512 / 25,557,032, torchvision's documented counts.
PARAMS = {
    "lenet5": 431_080,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "vgg16": 14_724_042,
    "vgg16-mlp": 14_987_722,
    "vgg19": 20_035_018,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
}


@pytest.mark.parametrize(("name", "kwargs", "shape"), ZOO, ids=ZOO_IDS)
def test_param_counts(name, kwargs, shape):
    num_classes = 1000 if name in ("resnet18", "resnet50") else 10
    model = create_model(name, num_classes=num_classes, input_shape=shape, **kwargs)
    key = name + ("-" + kwargs["classifier"] if kwargs else "")
    assert _num_params(model) == PARAMS[key]


@pytest.mark.parametrize(
    ("name", "num_classes", "literature"),
    [("resnet56", 10, 0.85e6), ("resnet50", 1000, 25.56e6)],
)
def test_param_counts_match_literature(name, num_classes, literature):
    model = create_model(name, num_classes=num_classes)
    assert _num_params(model) == pytest.approx(literature, rel=0.01)


# FLOPs as counted by count_flops (fvcore: one multiply-add = one FLOP, and it also counts
# eval-mode batch norm as 2 FLOPs per element and adaptive average pooling as 1 per input
# element; max-pools, ReLUs, additions and the option-A padding are not counted). "conv_fc" is
# the convolution and Linear multiply-adds alone: the figure the pruning literature reports.
#   resnet56 conv+fc: 16*27*1024 + 18*16*16*9*1024 + (32*16*9 + 17*32*32*9)*256
#                     + (64*32*9 + 17*64*64*9)*64 + 64*10 = 125,485,696 (HRank: 125.49M);
#   batch norm adds 2 * (19*16*1024 + 18*32*256 + 18*64*64) = 1,064,960, the pool 64*8*8.
FLOPS = {  # name: (input, total by count_flops, conv + fc multiply-adds)
    "lenet5": (MNIST, 2_293_000, 2_293_000),
    "resnet20": (CIFAR, 40_931_968, 40_551_040),
    "resnet32": (CIFAR, 69_472_896, 68_862_592),
    "resnet44": (CIFAR, 98_013_824, 97_174_144),
    "resnet56": (CIFAR, 126_554_752, 125_485_696),
    "resnet110": (CIFAR, 254_988_928, 252_887_680),
    "vgg16": (CIFAR, 313_756_672, 313_201_664),
    "vgg16-mlp": (CIFAR, 314_019_840, 313_463_808),
    "vgg19": (CIFAR, 398_744_576, 398_136_320),
    "resnet18": ((3, 224, 224), 1_819_065_856, 1_814_073_344),  # 1000 classes
}


@pytest.mark.parametrize("key", list(FLOPS))
def test_flops(key):
    shape, total, conv_fc = FLOPS[key]
    name, _, classifier = key.partition("-")
    kwargs = {"classifier": classifier} if classifier else {}
    num_classes = 1000 if name == "resnet18" else 10
    model = create_model(name, num_classes=num_classes, input_shape=shape, **kwargs)
    counts = count_flops(model, torch.zeros(1, *shape))
    assert counts.total == total
    assert sum(counts.layers.values()) == conv_fc


def test_resnet56_flops_match_literature():
    counts = count_flops(create_model("resnet56", num_classes=10), torch.zeros(1, *CIFAR))
    assert sum(counts.layers.values()) == pytest.approx(125.49e6, rel=1e-4)
    assert counts.total == pytest.approx(125.49e6, rel=0.01)  # +0.85%: batch norm and pool


def test_resnet50_flops_match_literature():
    model = create_model("resnet50", num_classes=1000)
    counts = count_flops(model, torch.zeros(1, 3, 224, 224))
    assert counts.total == 4_111_512_576  # +0.53% over 4.09G: batch norm and pool
    assert counts.total == pytest.approx(4.09e9, rel=0.01)
    assert sum(counts.layers.values()) == 4_089_184_256
    assert sum(counts.layers.values()) == pytest.approx(4.09e9, rel=1e-3)


# Keys and shapes of torchvision's resnet50 / resnet18 state_dicts (torchvision.models.resnet).
TORCHVISION_RESNET50 = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.weight": (64,),
    "bn1.running_mean": (64,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.running_var": (256,),
    "layer1.2.bn3.bias": (256,),
    "layer2.0.conv1.weight": (128, 256, 1, 1),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (512, 256, 1, 1),
    "layer2.3.conv3.weight": (512, 128, 1, 1),
    "layer3.0.downsample.0.weight": (1024, 512, 1, 1),
    "layer3.5.bn3.weight": (1024,),
    "layer4.0.conv2.weight": (512, 512, 3, 3),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer4.2.bn3.running_var": (2048,),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}
TORCHVISION_RESNET18 = {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn2.running_mean": (64,),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.num_batches_tracked": (),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer4.1.bn2.running_var": (512,),
    "fc.weight": (1000, 512),
    "fc.bias": (1000,),
}
# Entry counts: a conv contributes 1 entry (weight, no bias), a BatchNorm 5 (weight, bias,
# running_mean, running_var, num_batches_tracked), fc 2.
#   resnet50: stem 1 + 5; a Bottleneck 3 convs + 3 BNs = 18, plus 6 for a downsample block;
#             16 blocks (3+4+6+3), 4 with downsample: 16*18 + 4*6 = 312; total 6 + 312 + 2 = 320.
#   resnet18: stem 6; a BasicBlock 2 + 10 = 12, 8 blocks = 96; downsample in layer2..4: 3 * 6 =
#             18; total 6 + 96 + 18 + 2 = 122.
TORCHVISION_ENTRIES = {"resnet50": 320, "resnet18": 122}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet50", TORCHVISION_RESNET50), ("resnet18", TORCHVISION_RESNET18)],
)
def test_imagenet_resnet_state_dict_matches_torchvision(name, expected):
    model = create_model(name, num_classes=1000)
    state = model.state_dict()
    assert len(state) == TORCHVISION_ENTRIES[name]
    assert {k: tuple(state[k].shape) for k in expected if k in state} == expected
    # torchvision's top-level modules, in order (the order of the state_dict's keys)
    top = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    assert [n for n, _ in model.named_children()] == [*top, "fc"]
    assert next(iter(state)) == "conv1.weight" and list(state)[-2:] == ["fc.weight", "fc.bias"]


def test_resnet50_stride_on_the_3x3_conv():
    model = create_model("resnet50", num_classes=1000)
    assert isinstance(model, ResNet)
    for stage in (model.layer2, model.layer3, model.layer4):
        first = stage[0]
        assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
        assert first.downsample[0].stride == (2, 2)


def test_exported_pruned_resnet_keeps_torchvision_keys():
    model = create_model("resnet18", num_classes=1000)
    plain_keys = list(model.state_dict())
    scl.sparsify(model)
    exported = scl.export_pruned(model)
    assert list(exported.state_dict()) == plain_keys
    create_model("resnet18", num_classes=1000).load_state_dict(exported.state_dict(), strict=True)


@pytest.mark.parametrize(("name", "kwargs", "shape"), ZOO, ids=ZOO_IDS)
def test_sparsify_masks_every_layer_and_keeps_outputs(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, input_shape=shape, **kwargs).eval()
    weight_layers = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    # Every parameter lives in a conv, a Linear or a BatchNorm: nothing (such as a shortcut)
    # escapes the masks except normalization layers, which SCL never masks.
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    owned = sum(_num_params(m) for m in weight_layers + norms)
    assert owned == _num_params(model)

    x = torch.randn(2, *shape)
    with torch.no_grad():
        before = model(x)
    scl.sparsify(model)
    with torch.no_grad():
        after = model(x)
    assert len(list(scl.masked_modules(model))) == len(weight_layers)
    assert scl.global_sparsity(model) == 0.0
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_option_a_shortcut_is_subsample_plus_zero_channels():
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    assert list(ZeroPadShortcut(16, 32, 2).parameters()) == []

    model = create_model("resnet20")
    assert isinstance(model, CifarResNet)
    shortcuts = [b.shortcut for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    assert [type(s).__name__ for s in shortcuts].count("ZeroPadShortcut") == 2
    assert sum(isinstance(s, nn.Identity) for s in shortcuts) == 7


def test_vgg_layouts():
    vgg16 = create_model("vgg16")
    assert isinstance(vgg16, CifarVGG)
    convs = [m for m in vgg16.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128] + [256] * 3 + [512] * 6
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg16.features) == 4
    assert isinstance(vgg16.classifier, nn.Linear) and vgg16.classifier.in_features == 512
    assert len([m for m in create_model("vgg19").modules() if isinstance(m, nn.Conv2d)]) == 16
    mlp = create_model("vgg16", classifier="mlp", hidden=256)
    assert [type(m).__name__ for m in mlp.classifier] == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
    ]
    assert mlp.classifier[0].out_features == 256


def _std(t: torch.Tensor) -> float:
    return t.detach().float().std().item()


def test_initialization_follows_reference_implementations():
    torch.manual_seed(0)
    # CIFAR ResNet (akamaster): kaiming_normal_ with fan-in on convs and the Linear layer
    cifar = create_model("resnet56")
    w = cifar.layer3[1].conv1.weight
    assert _std(w) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert _std(cifar.fc.weight) == pytest.approx(math.sqrt(2 / 64), rel=0.2)
    # ImageNet ResNet (torchvision): kaiming_normal_ with fan-out on convs, BN ones / zeros
    imagenet = create_model("resnet50", num_classes=1000)
    w = imagenet.layer4[0].conv2.weight
    assert _std(w) == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.05)
    assert torch.all(imagenet.layer1[0].bn3.weight == 1) and torch.all(imagenet.bn1.bias == 0)
    # VGG (network slimming / torchvision): fan-out convs, N(0, 0.01) Linear with zero bias
    vgg = create_model("vgg16", classifier="mlp")
    w = vgg.features[0].weight
    assert _std(w) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)
    assert _std(vgg.classifier[0].weight) == pytest.approx(0.01, rel=0.05)
    assert torch.all(vgg.classifier[3].bias == 0)
    # LeNet-5 (Caffe xavier): U(-sqrt(3 / fan_in), sqrt(3 / fan_in)), zero bias
    lenet = create_model("lenet5")
    bound = math.sqrt(3 / 800)
    assert lenet.fc1.weight.abs().max().item() <= bound
    assert lenet.fc1.weight.abs().max().item() == pytest.approx(bound, rel=0.01)
    assert torch.all(lenet.conv2.bias == 0)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("lenet5", {"input_shape": (1, 15, 28)}, r"lenet5 needs images of at least 16x16"),
        ("lenet5", {"num_classes": 0}, r"num_classes must be a positive integer, got 0"),
        ("resnet56", {"input_shape": (32, 32)}, r"input_shape must be \(channels, height, width\)"),
        ("resnet20", {"input_shape": (3, 0, 32)}, r"got \(3, 0, 32\)"),
        ("vgg16", {"input_shape": (3, 8, 8)}, r"vgg16 needs images of at least 16x16"),
        ("vgg16", {"classifier": "conv"}, r"classifier must be 'linear' or 'mlp', got 'conv'"),
        ("vgg19", {"hidden": 0}, r"hidden must be a positive integer, got 0"),
        ("resnet50", {"num_classes": 1.5}, r"num_classes must be a positive integer, got 1.5"),
        ("resnet18", {"input_shape": (3, 64, 64, 1)}, r"input_shape must be"),
    ],
)
def test_factory_argument_validation(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


def test_class_argument_validation():
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 2 .* got 21"):
        CifarResNet(depth=21)
    with pytest.raises(ValueError, match=r"cfg must contain at least one conv layer"):
        CifarVGG(("M",))
    with pytest.raises(ValueError, match=r"every conv width in cfg must be a positive integer"):
        CifarVGG((64, "X"))
    with pytest.raises(ValueError, match=r"block must be BasicBlock or Bottleneck"):
        ResNet(nn.Identity, (2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"layers must be four positive integers"):
        ResNet(Bottleneck, (2, 2))
    with pytest.raises(ValueError, match=r"out_channels must be at least in_channels \(32\)"):
        ZeroPadShortcut(32, 16)


# ---- torchvision:NAME and timm:NAME --------------------------------------------------------


def test_external_library_missing(monkeypatch):
    # None in sys.modules makes `import` fail, whether or not the library is installed here.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install 'scl-lightning\[vision\]'"):
        create_model("torchvision:resnet18", num_classes=10)
    with pytest.raises(ImportError, match=r"'timm:resnet18' needs .* `pip install timm`"):
        create_model("timm:resnet18", num_classes=10)


def test_external_library_broken_install(monkeypatch):
    def broken(name):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(external_module.importlib, "import_module", broken)
    with pytest.raises(ImportError, match=r"RuntimeError: operator torchvision::nms .*\[vision\]"):
        create_model("torchvision:resnet18")


def test_external_bad_names():
    with pytest.raises(ValueError, match=r"unknown model source 'keras' in 'keras:vgg16'"):
        create_model("keras:vgg16")
    with pytest.raises(ValueError, match=r"model name missing after 'timm:'"):
        create_model("timm:")
    with pytest.raises(ValueError, match=r"contains ':', which is reserved"):
        register_model("mine:net")


def test_timm_names_build_through_timm(monkeypatch):
    calls = []

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs))
        return nn.Linear(4, kwargs["num_classes"])

    fake = types.ModuleType("timm")
    fake.create_model = fake_create_model
    monkeypatch.setitem(sys.modules, "timm", fake)

    model = create_model(
        "timm:convnext_atto", num_classes=7, input_shape=(1, 28, 28), drop_rate=0.1
    )
    assert isinstance(model, nn.Linear) and model.out_features == 7
    model = create_model("timm:resnet18", num_classes=3, pretrained=True, in_chans=3)
    assert calls == [
        ("convnext_atto", {"num_classes": 7, "pretrained": False, "in_chans": 1, "drop_rate": 0.1}),
        ("resnet18", {"num_classes": 3, "pretrained": True, "in_chans": 3}),
    ]
    assert "timm:resnet18" not in list_models()


def test_torchvision_names_build_through_get_model(monkeypatch):
    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        return nn.Linear(4, kwargs["num_classes"])

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=get_model)
    monkeypatch.setitem(sys.modules, "torchvision", fake)

    model = create_model("torchvision:resnet18", num_classes=5, input_shape=(3, 32, 32))
    assert isinstance(model, nn.Linear) and model.out_features == 5
    create_model("torchvision:resnet50", num_classes=1000, weights="IMAGENET1K_V2", progress=False)
    assert calls == [
        ("resnet18", {"num_classes": 5, "weights": None}),
        ("resnet50", {"num_classes": 1000, "weights": "IMAGENET1K_V2", "progress": False}),
    ]


def test_external_factory_must_return_a_module(monkeypatch):
    fake = types.ModuleType("timm")
    fake.create_model = lambda name, **kwargs: "not a model"
    monkeypatch.setitem(sys.modules, "timm", fake)
    with pytest.raises(TypeError, match=r"timm returned a str for 'timm:x', not an nn.Module"):
        create_model("timm:x")


def test_package_import_never_imports_torchvision_or_timm():
    # A fresh interpreter in which importing either library fails loudly.
    code = (
        "import sys\n"
        "sys.modules['torchvision'] = None\n"
        "sys.modules['timm'] = None\n"
        "import scl_lightning\n"
        "from scl_lightning.models import create_model\n"
        "create_model('resnet18', input_shape=(3, 64, 64))\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
