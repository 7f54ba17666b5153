"""Plain-torch SCL building blocks (no Lightning imports): estimators, masked layers, stats."""

from scl_lightning.nn.collapse import LayerCollapseGuard, LayerCollapseWarning
from scl_lightning.nn.masked import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLayer,
    MaskedLinear,
)
from scl_lightning.nn.normalize import NORMALIZERS, normalize_per_feature
from scl_lightning.nn.sparsify import (
    MASKED_CLASSES,
    export_pruned,
    maskable_modules,
    masked_modules,
    sparsify,
)
from scl_lightning.nn.stats import (
    Connectivity,
    LayerConnectivity,
    connection_count,
    connectivity,
    global_sparsity,
    global_sparsity_including_dense,
    layer_connectivity,
    layer_sparsity,
    total_connections,
)
from scl_lightning.nn.ste import (
    STE,
    HardtanhSTE,
    IdentitySTE,
    LeakyReLUSTE,
    SoftplusSTE,
    available_stes,
    get_ste,
    heaviside,
    masked_weight,
    register_ste,
    step,
)

__all__ = [
    "MASKED_CLASSES",
    "NORMALIZERS",
    "STE",
    "Connectivity",
    "HardtanhSTE",
    "IdentitySTE",
    "LayerCollapseGuard",
    "LayerCollapseWarning",
    "LayerConnectivity",
    "LeakyReLUSTE",
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedLayer",
    "MaskedLinear",
    "SoftplusSTE",
    "available_stes",
    "connection_count",
    "connectivity",
    "export_pruned",
    "get_ste",
    "global_sparsity",
    "global_sparsity_including_dense",
    "heaviside",
    "layer_connectivity",
    "layer_sparsity",
    "maskable_modules",
    "masked_modules",
    "masked_weight",
    "normalize_per_feature",
    "register_ste",
    "sparsify",
    "step",
    "total_connections",
]
