"""Compaction: remove the units and channels a pruned network no longer uses.

A masked network after SCL still computes every unit: a unit whose incoming connections are all
pruned outputs a constant, and a unit whose outgoing connections are all pruned is computed and
never read. :func:`compact` removes both and shrinks the neighbouring layers, so the result is
an ordinary ``nn.Module`` with smaller ``Linear``/``Conv2d`` (and ``BatchNorm``) layers that
computes the same function.

How it works. The network (made dense with ``w * H(m)`` baked in) is traced with
``torch.fx`` and run once on the example input to record every activation's shape. A **chain**
is a weight layer ``P`` whose output reaches exactly one weight layer ``C`` through channel-wise
and layout operations only; then each input column of ``C`` reads one output feature of ``P``,
and

* if ``C`` reads nothing from a feature (its weights on it are all zero), the feature is
  removed from ``P``, from the BatchNorm between and from ``C``;
* if ``P`` computes a feature from nothing (its weights for it are all zero), the feature is a
  constant after the channel-wise operations; it is removed and its contribution folded into
  ``C``'s bias, which is exact when ``C`` is a ``Linear`` or a convolution whose padding keeps a
  constant constant (none, or not zeros); a zero-padded convolution gets a per-position
  ``bias_map`` instead (:class:`Conv2dWithBiasMap`). A feature that is not constant at ``C``'s
  input (an average pool over padding) is kept and reported.

**Where the features are.** A ``Linear`` computes and reads the **last** dim of its input, so
its features may be those of ``(N, C)``, of ``(N, T, C)`` tokens (ViT, Swin and BERT MLPs:
``fc1 -> GELU -> fc2``) or of channels-last ``(N, H, W, C)`` activations (ConvNeXt); a
``Conv2d`` computes and reads dim 1 of ``(N, C, H, W)``. The chain follows the producer's
features element by element through the operations between: elementwise activations, dropout
and identities leave them where they are; ``permute``, ``transpose``, ``flatten`` and
``view``/``reshape`` (with ``-1`` where the features go: a size written in the code would not
follow a smaller layer) move them; BatchNorm acts per index of dim 1, so it is channel-wise only
where dim 1 holds the features in order (``(N, C)`` or ``(N, C, H, W)``), and 2-d pooling only
where each plane of the last two dims holds one feature. The consumer must read, at each of its
input columns, one feature of the producer. So ``conv -> permute -> Linear``, ``Linear ->
permute -> conv`` and tokens flattened into a head are chains; a ``Linear`` on ``(N, T, C)``
followed by a ``BatchNorm1d`` (which normalizes T), by a pool over the features, by a reshape
that splits them over several dims, or read by a layer over another dim, is kept and reported.
LayerNorm is not channel-wise (it mixes the features): in a ConvNeXt block the MLP after it is
compacted, the depthwise convolution and the block output are kept.

**Norms.** BatchNorm, InstanceNorm and a GroupNorm with one channel per group normalize each
channel on its own; a GroupNorm with larger groups mixes them and ends the chain (reported).
A fused norm-activation module (timm's ``BatchNormAct2d``, ``GroupNormAct``: a subclass of one
of these norms whose child modules are only elementwise activations, dropout or identities) is
traced whole and followed like the norm and activations it holds, its affine parameters and
running statistics shrunk with the producer. Since a subclass's ``forward`` may compute
anything, every norm is checked on a random input of the recorded shape: shrunk to every other
channel, it must give those channels of its full output, or the chain ends there (reported).

Removing outputs of ``P`` can leave inputs of ``P`` unread, so the passes repeat until nothing
changes. What is not a chain is left as it is and reported with the reason: the network's input
and output, a layer whose output feeds a residual addition or a concatenation, grouped
convolutions, and operations the tracer cannot follow. In a ResNet this compacts the inside of
every block (``conv1 -> bn1 -> relu -> conv2``) and keeps the block outputs, whose channels are
tied across the block by the shortcut.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from scl_lightning.nn.outputs import named_outputs
from scl_lightning.nn.sparsify import export_pruned, masked_modules

__all__ = ["CompactReport", "Conv2dWithBiasMap", "LinearOnSelectedInputs", "compact"]

#: operations that act on each element on its own: the features stay where they are
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,  # the identity in eval mode, where the compact network runs
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.elu,
    F.dropout,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
#: normalize per index of dim 1: channel-wise where dim 1 holds the features, in order (a
#: GroupNorm only with one channel per group; every one is checked on a random input, since a
#: subclass may compute anything)
_NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
)
#: pool over the last two dims: channel-wise where each such plane holds one feature
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
#: move elements without computing: the features are followed to where they land
_LAYOUT_FUNCTIONS = {torch.flatten, torch.permute, torch.transpose, torch.reshape}
_LAYOUT_METHODS = {"flatten", "permute", "transpose", "view", "reshape"}


@dataclass
class CompactReport:
    """What :func:`compact` did.

    Attributes:
        removed: per weight layer, ``(channels before, channels after)`` of its output.
        inputs: per first ``Linear``, ``(input features before, after)``: the network's input
            features it no longer reads are skipped (:class:`LinearOnSelectedInputs`).
        folded: per consumer layer, how many constant input channels were folded into its bias.
        kept: the weight layers whose outputs could not be compacted, with the reason.
        params_before, params_after: parameter counts (masks not counted) of the pruned dense
            network and of the compact one.
    """

    removed: dict[str, tuple[int, int]] = field(default_factory=dict)
    inputs: dict[str, tuple[int, int]] = field(default_factory=dict)
    folded: dict[str, int] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    def summary(self) -> str:
        lines = [
            f"parameters {self.params_before:,} -> {self.params_after:,}",
            *(
                f"  {name}: {before} -> {after} outputs"
                for name, (before, after) in self.removed.items()
                if before != after
            ),
            *(
                f"  {name}: reads {after} of {before} input features"
                for name, (before, after) in self.inputs.items()
            ),
            *(f"  {name}: kept ({why})" for name, why in self.kept.items()),
        ]
        return "\n".join(lines)


@dataclass
class _Chain:
    producer: str
    consumer: str
    between: list[fx.Node]  # the channel-wise and layout nodes, in order
    shape: tuple[int, ...]  # the producer's output shape
    dim: int  # the dim of the producer's output that holds its features
    in_shape: tuple[int, ...]  # the consumer's input shape
    features: Tensor  # at the consumer's input: the producer feature each element holds
    columns: Tensor  # per input column (dim 1 of the consumer's weight): its producer feature


def _weight_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _fused_norm(module: nn.Module) -> bool:
    """A norm (:data:`_NORM_MODULES`, or a subclass) whose child modules are all elementwise:
    timm's ``BatchNormAct2d`` and ``GroupNormAct`` (a norm, then dropout and an activation in
    one module). Traced whole, it is followed like the norm and the activations it holds."""
    return isinstance(module, _NORM_MODULES) and all(
        isinstance(child, _ELEMENTWISE_MODULES) for child in module.children()
    )


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer, keeping fused norms whole: traced through, their ``forward``
    would call ``F.batch_norm`` on attributes, which reads as a function of other values of the
    network and ends every chain through them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _fused_norm(m) or super().is_leaf_module(m, module_qualified_name)


def _feature_dim(layer: nn.Module, ndim: int) -> int:
    """The dim of an activation that holds a layer's features: a ``Linear`` computes and reads
    the last one (``(N, C)``, ``(N, T, C)``, channels-last ``(N, H, W, C)``), a ``Conv2d``
    dim 1 of ``(N, C, H, W)``."""
    return ndim - 1 if isinstance(layer, nn.Linear) else ndim - 3


def _along(values: Tensor, dim: int, shape: tuple[int, ...]) -> Tensor:
    """``values`` (one per feature) laid along ``dim`` of a tensor of ``shape``."""
    view = [values.numel() if k == dim else 1 for k in range(len(shape))]
    return values.reshape(view).expand(shape)


def _columns(features: Tensor, dim: int) -> Tensor | None:
    """The producer feature at each index of ``dim``, or None when an index holds several."""
    if not 0 <= dim < features.dim():
        return None
    rows = features.movedim(dim, -1).reshape(-1, features.shape[dim])
    if not bool((rows == rows[:1]).all()):
        return None
    return rows[0].clone()


def _varying_dims(features: Tensor) -> list[int]:
    return [
        k
        for k in range(features.dim())
        if features.shape[k] > 1 and not bool((features == features.narrow(k, 0, 1)).all())
    ]


def _has_node(args: object) -> bool:
    if isinstance(args, fx.Node):
        return True
    if isinstance(args, tuple | list):
        return any(_has_node(a) for a in args)
    if isinstance(args, dict):
        return any(_has_node(a) for a in args.values())
    return False


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("view", "reshape")
    return node.op == "call_function" and node.target is torch.reshape


def _kind(node: fx.Node, current: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """How ``node`` treats the features of ``current`` (its input): ``elementwise``, ``dim1``
    (BatchNorm), ``pool`` (over the last two dims), ``layout`` (moves elements), or None."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, _ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(module, _NORM_MODULES):
            return "dim1"
        if isinstance(module, _POOL_MODULES):
            return "pool"
        return "layout" if isinstance(module, nn.Flatten) else None
    if not node.args or node.args[0] is not current:
        return None
    if not _is_reshape(node) and _has_node((node.args[1:], node.kwargs)):
        return None  # other values of the network take part (``x * y``)
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return "elementwise"
        if node.target in _POOL_FUNCTIONS:
            return "pool"
        return "layout" if node.target in _LAYOUT_FUNCTIONS else None
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return "elementwise"
        return "layout" if node.target in _LAYOUT_METHODS else None
    return None


def _reshape_sizes(node: fx.Node) -> tuple[object, ...]:
    """The sizes a view or reshape asks for: ``x.view(n, -1)``, ``x.view((n, -1))`` or
    ``torch.reshape(x, shape=(n, -1))``; empty when they are not written out."""
    rest: tuple[object, ...] = tuple(node.args[1:])
    if not rest:
        given = node.kwargs.get("shape", node.kwargs.get("size"))
        rest = tuple(given) if isinstance(given, tuple | list) else ()
    if len(rest) == 1 and isinstance(rest[0], tuple | list):
        rest = tuple(rest[0])
    return rest


def _follow(
    node: fx.Node, kind: str, features: Tensor, channels: int, modules: dict[str, nn.Module]
) -> tuple[Tensor | None, str]:
    """``features`` (the producer feature of each element of ``node``'s input) at ``node``'s
    output, or None and why the features do not pass ``node`` one per channel."""
    name = str(node.target) if node.op == "call_module" else node.name
    if kind == "elementwise":
        return features, ""
    if kind == "dim1":
        norm = modules[name]
        if isinstance(norm, nn.GroupNorm) and norm.num_groups != norm.num_channels:
            size = norm.num_channels // norm.num_groups
            return None, f"{name} normalizes its features in groups of {size} (GroupNorm)"
        columns = _columns(features, 1)
        if columns is None or not torch.equal(columns, torch.arange(channels).to(columns)):
            return None, f"{name} normalizes dim 1 of its output, which does not hold its features"
        if not _acts_per_channel(norm, node, features.device):
            return None, f"{name} does not compute each channel from that channel alone"
        return features, ""
    out_shape = _shape(node)
    if kind == "pool":
        planes = features.flatten(-2) if features.dim() >= 3 else None
        if planes is None or not bool((planes == planes[..., :1]).all()):
            return None, f"{name} pools over its features"
        return features[..., :1, :1].expand(out_shape), ""
    if _is_reshape(node):
        sizes = _reshape_sizes(node)
        out = features.reshape(out_shape)
        varying = _varying_dims(out)
        if len(varying) > 1:
            return None, f"{name} splits its features over several dimensions"
        if len(sizes) != out.dim() or any(sizes[k] != -1 for k in varying):
            # a size written in the code would not follow a smaller layer (-1 does)
            return None, f"{name} reshapes it to a size written in the code (-1 would follow)"
        return out, ""
    if node.op == "call_module":
        out = modules[str(node.target)](features)
    elif node.op == "call_function":
        out = node.target(features, *node.args[1:], **node.kwargs)  # type: ignore[operator]
    else:
        out = getattr(features, str(node.target))(*node.args[1:], **node.kwargs)
    if tuple(out.shape) != out_shape:
        return None, f"{name} moves its features in a way compact cannot follow"
    return out, ""


def _acts_per_channel(norm: nn.Module, node: fx.Node, device: torch.device) -> bool:
    """Whether ``norm`` (called at ``node``), shrunk to every other channel, gives those
    channels of its output on a random input of the recorded shape: what compaction does to it,
    checked on what its ``forward`` really computes (an instance norm given ``(N, C)``
    normalizes across C, a subclass may mix channels)."""
    shape = _shape(node)
    if len(shape) < 2 or shape[1] < 2:
        return True
    dtype = getattr(node.meta["tensor_meta"], "dtype", torch.float32)
    if not dtype.is_floating_point:
        return False
    generator = torch.Generator(device=device).manual_seed(0)  # the user's RNG is left alone
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    keep = torch.arange(0, shape[1], 2, device=device)
    small = copy.deepcopy(norm)
    _shrink_outputs(small, keep)
    try:
        want = norm(x.clone()).index_select(1, keep)
        got = small(x.index_select(1, keep))
    except Exception:  # a forward that checks its widths against something else
        return False
    return isinstance(want, Tensor) and isinstance(got, Tensor) and not _difference([want], [got])


def _size_read(node: fx.Node, features: Tensor) -> str | None:
    """Why ``node``'s output may not shrink: a size read along its features (``h.size(-1)``,
    or ``h.size()`` whole), whose value would change; ``None`` when there is none (a read of
    the batch size, ``x.size(0)``, is fine)."""
    varying = _varying_dims(features)
    for user in node.users:
        if user.op != "call_method" or user.target != "size":
            continue
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        if not isinstance(dim, int) or dim % features.dim() in varying:
            return f"its size along its features is read ({user.name})"
    return None


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users that consume the tensor, not its shape (``x.size(0)`` for a view)."""
    return [u for u in node.users if not (u.op == "call_method" and u.target in ("size", "dim"))]


def _find_chain(
    node: fx.Node, modules: dict[str, nn.Module], shared: dict[str, int] | None = None
) -> tuple[_Chain | None, str]:
    """Follow ``node`` (a weight layer) to the one weight layer its output reaches, tracking
    which dim holds its features through the operations between; ``shared`` (layers called
    more than once, with their counts) end a chain."""
    producer = modules[str(node.target)]
    assert isinstance(producer, nn.Linear | nn.Conv2d)
    shape = _shape(node)
    dim = _feature_dim(producer, len(shape))
    channels = int(producer.weight.shape[0])
    if not 0 <= dim < len(shape) or shape[dim] != channels:
        return None, f"its output {shape} holds its {channels} features on no single dim"
    features = _along(torch.arange(channels, device=producer.weight.device), dim, shape)
    between: list[fx.Node] = []
    current = node
    while True:
        read = _size_read(current, features)
        if read is not None:
            return None, read
        users = _value_users(current)
        if len(users) != 1:
            what = "the network's output" if not users else f"{len(users)} operations"
            return None, f"its output feeds {what}"
        (user,) = users
        if user.op == "output":
            return None, "it is the network's output"
        if user.op == "call_module" and _weight_layer(modules[str(user.target)]):
            if shared and str(user.target) in shared:
                return None, (
                    f"{user.target} is called {shared[str(user.target)]} times (its weights "
                    "are shared)"
                )
            if user.args[0] is not current or len(user.args) != 1 or user.kwargs:
                return None, f"{user.target} takes it with other inputs"
            consumer = modules[str(user.target)]
            columns = _columns(features, _feature_dim(consumer, features.dim()))
            if columns is None:
                return None, f"{user.target} reads another dimension than its features"
            chain = _Chain(
                str(node.target),
                str(user.target),
                between,
                shape,
                dim,
                _shape(current),
                features,
                columns,
            )
            return chain, ""
        kind = _kind(user, current, modules)
        if kind is None:
            label = user.target if isinstance(user.target, str) else user.name
            return None, f"its output feeds {label!s} (not channel-wise)"
        followed, why = _follow(user, kind, features, channels, modules)
        if followed is None:
            return None, why
        features = followed
        between.append(user)
        current = user


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise ValueError(f"compact: no shape recorded for {node.name}")
    return tuple(meta.shape)


def _replay(node: fx.Node, x: Tensor, gm: fx.GraphModule) -> Tensor:
    """What the channel-wise or layout ``node`` makes of ``x`` (a tensor of its input's shape)."""
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(x)
    if _is_reshape(node):
        return x.reshape(_shape(node))
    if node.op == "call_function":
        return node.target(x, *node.args[1:], **node.kwargs)  # type: ignore[operator]
    return getattr(x, str(node.target))(*node.args[1:], **node.kwargs)


def _channel_constants(chain: _Chain, graph_module: fx.GraphModule, dead: Tensor) -> Tensor | None:
    """What each producer feature is at the consumer's input when the producer outputs its
    bias, or None if a ``dead`` one is not constant there (an average pool over padding)."""
    producer = _layer(graph_module, chain.producer)
    channels = dead.numel()
    bias = producer.bias if producer.bias is not None else producer.weight.new_zeros(channels)
    x = _along(bias.detach(), chain.dim, chain.shape).clone()
    bias_map = getattr(producer, "bias_map", None)
    if isinstance(bias_map, Tensor):
        # an earlier fold gave the producer a constant per position: a feature it computes
        # from nothing is that map, constant only if the operations between make it one
        x = x + bias_map.detach().to(x.dtype)
    for node in chain.between:
        x = _replay(node, x, graph_module)
    ids, flat = chain.features.flatten(), x.flatten()
    values = flat.new_zeros(channels).scatter_(0, ids, flat)
    differs = flat.new_zeros(channels).index_add_(0, ids, (flat != values[ids]).to(flat.dtype))
    if bool(differs[dead].ne(0).any()):
        return None
    return values


class Conv2dWithBiasMap(nn.Conv2d):
    """A ``Conv2d`` plus a constant per output position (``bias_map``, ``(out, H, W)``).

    What :func:`compact` makes of a padded convolution that read removed constant channels:
    inside the image their contribution is a per-channel constant, but at the borders the
    padding zeros change it, so it is added position by position. Exact for the input size the
    network was compacted with; another size is an error.
    """

    bias_map: Tensor

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        if out.shape[-2:] != self.bias_map.shape[-2:]:
            raise ValueError(
                f"this compact network was made for outputs of {tuple(self.bias_map.shape[-2:])} "
                f"here, got {tuple(out.shape[-2:])}: compact it again with an example input of "
                "the size you run it at"
            )
        return out + self.bias_map


class LinearOnSelectedInputs(nn.Linear):
    """A ``Linear`` that reads only the input features listed in ``inputs`` (a buffer of
    indices): what :func:`compact` makes of a first layer whose weights on some inputs (image
    borders, say) were all pruned, since the network's input itself cannot shrink."""

    inputs: Tensor

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input.index_select(-1, self.inputs))


def _select(param: Tensor, keep: Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(param.detach().index_select(dim, keep).clone(), param.requires_grad)


def _layer(gm: nn.Module, name: str) -> nn.Linear | nn.Conv2d:
    module = gm.get_submodule(name)
    assert isinstance(module, nn.Linear | nn.Conv2d)
    return module


def _shrink_outputs(module: nn.Module, keep: Tensor) -> None:
    if isinstance(module, Conv2dWithBiasMap):
        module.bias_map = module.bias_map.index_select(0, keep).clone()
    if isinstance(module, nn.Linear | nn.Conv2d):
        module.weight = _select(module.weight, keep, 0)
        if module.bias is not None:
            module.bias = _select(module.bias, keep, 0)
        if isinstance(module, nn.Linear):
            module.out_features = keep.numel()
        else:
            module.out_channels = keep.numel()
    elif isinstance(module, nn.GroupNorm):  # one channel per group: followed only then
        if module.affine:
            module.weight = _select(module.weight, keep, 0)
            module.bias = _select(module.bias, keep, 0)
        module.num_channels = module.num_groups = keep.numel()
    elif isinstance(
        module, nn.BatchNorm1d | nn.BatchNorm2d | nn.InstanceNorm1d | nn.InstanceNorm2d
    ):  # fused ones too (timm's BatchNormAct2d): their children are elementwise
        if module.affine:
            module.weight = _select(module.weight, keep, 0)
            module.bias = _select(module.bias, keep, 0)
        if module.running_mean is not None:
            module.running_mean = module.running_mean.index_select(0, keep).clone()
        if module.running_var is not None:
            module.running_var = module.running_var.index_select(0, keep).clone()
        module.num_features = keep.numel()


def _shrink_inputs(module: nn.Linear | nn.Conv2d, keep: Tensor) -> None:
    module.weight = _select(module.weight, keep, 1)
    if isinstance(module, nn.Linear):
        module.in_features = keep.numel()
    else:
        module.in_channels = keep.numel()


def _fold(consumer: nn.Linear | nn.Conv2d, columns: Tensor, values: Tensor) -> None:
    """Add the contribution of constant inputs (``columns`` of the weight's dim 1, holding
    ``values``) to ``consumer``'s bias: a ``Linear``'s bias is added along the last dim, so
    this holds for ``(N, C)``, ``(N, T, C)`` and channels-last inputs alike."""
    w = consumer.weight.detach().index_select(1, columns)
    shift = (w * values.reshape(1, -1, *([1] * (w.dim() - 2)))).flatten(1).sum(1)
    if consumer.bias is None:
        consumer.bias = nn.Parameter(torch.zeros_like(shift))
    with torch.no_grad():
        consumer.bias.add_(shift.to(consumer.bias.dtype))


def _fold_map(
    consumer: nn.Conv2d, columns: Tensor, values: Tensor, in_shape: tuple[int, ...]
) -> None:
    """Like :func:`_fold` for a zero-padded convolution: a constant per output position."""
    weight = consumer.weight.detach().index_select(1, columns)
    image = values.reshape(1, -1, 1, 1).expand(1, columns.numel(), *in_shape[-2:])
    contribution = F.conv2d(
        image, weight, None, consumer.stride, consumer.padding, consumer.dilation
    )[0]
    if not isinstance(consumer, Conv2dWithBiasMap):
        consumer.__class__ = Conv2dWithBiasMap
        consumer.register_buffer("bias_map", torch.zeros_like(contribution))
    bias_map = consumer.bias_map
    assert isinstance(bias_map, Tensor)
    bias_map.add_(contribution.to(bias_map.dtype))


def _constant_stays_constant(layer: nn.Linear | nn.Conv2d) -> bool:
    """Whether a constant input gives a constant output (no zero padding at the borders)."""
    if isinstance(layer, nn.Linear) or layer.padding_mode != "zeros":
        return True
    if isinstance(layer.padding, str):
        return layer.padding == "valid" or all(k == 1 for k in layer.kernel_size)
    return all(p == 0 for p in layer.padding)


def _pass(chain: _Chain, gm: fx.GraphModule, report: CompactReport) -> bool:
    producer = _layer(gm, chain.producer)
    consumer = _layer(gm, chain.consumer)
    channels = int(producer.weight.shape[0])
    columns = chain.columns.to(consumer.weight.device)
    column_read = consumer.weight.detach().transpose(0, 1).flatten(1).ne(0).any(dim=1)
    read = columns.new_zeros(channels).index_add_(0, columns, column_read.long()).gt(0)
    fed = producer.weight.detach().flatten(1).ne(0).any(dim=1).to(read.device)
    dead = ~fed & read  # computed from nothing but read: a constant to fold
    remove = ~read
    changed = False
    if bool(dead.any()):
        values = _channel_constants(chain, gm, dead)
        if values is None:
            report.kept[chain.producer] = (
                f"{int(dead.sum())} outputs computed from nothing are not constant at "
                f"{chain.consumer}'s input"
            )
        else:
            values = values.to(read.device)
            fold = (dead & values.ne(0))[columns].nonzero().flatten()  # a zero adds nothing
            if fold.numel() == 0:
                pass
            elif _constant_stays_constant(consumer):
                _fold(consumer, fold, values[columns[fold]])
            else:
                assert isinstance(consumer, nn.Conv2d)
                _fold_map(consumer, fold, values[columns[fold]], chain.in_shape)
            with torch.no_grad():  # folded: the consumer must not read them again
                consumer.weight[:, dead[columns]] = 0
            report.folded[chain.consumer] = report.folded.get(chain.consumer, 0) + int(dead.sum())
            remove = remove | dead
            changed = True
    if not bool(remove.any()):
        return changed
    keep = (~remove).nonzero().flatten()
    if keep.numel() == 0:  # keep one channel, never read: a layer of width 0 is not a module
        if channels == 1:
            return changed
        keep = keep.new_zeros(1)
    _shrink_outputs(producer, keep)
    for node in chain.between:
        if node.op == "call_module":
            _shrink_outputs(gm.get_submodule(str(node.target)), keep)
    # the consumer's columns of the kept features, in order: a flatten or permute between
    # keeps the order of what is left
    _shrink_inputs(consumer, torch.isin(columns, keep).nonzero().flatten())
    before = report.removed.get(chain.producer, (channels, channels))[0]
    report.removed[chain.producer] = (before, keep.numel())
    return True


def stored_parameters(model: nn.Module) -> int:
    """What a network stores to compute: its parameters and the other floating-point buffers
    (bias maps, CSR values), not BatchNorm's running statistics or integer indices."""
    count = sum(p.numel() for p in model.parameters())
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and not name.endswith(("running_mean", "running_var")):
            count += buffer.numel()
    return count


_INPUT_PASSTHROUGH_METHODS = {"flatten", "view", "reshape", "contiguous"}


def _select_inputs(
    gm: fx.GraphModule, modules: dict[str, nn.Module], report: CompactReport
) -> None:
    """Give each ``Linear`` that reads the network's input directly (through flattening only)
    just the input features it uses."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        current = node
        while True:
            users = _value_users(current)
            if len(users) != 1:
                break
            (user,) = users
            module = modules.get(str(user.target)) if user.op == "call_module" else None
            if type(module) is nn.Linear:
                used = module.weight.detach().ne(0).any(dim=0)
                if not bool(used.all()) and bool(used.any()):
                    keep = used.nonzero().flatten()
                    _shrink_inputs(module, keep)
                    module.__class__ = LinearOnSelectedInputs
                    module.register_buffer("inputs", keep)
                    report.inputs[str(user.target)] = (used.numel(), keep.numel())
                break
            passthrough = (
                (user.op == "call_module" and isinstance(module, nn.Flatten | nn.Identity))
                or (user.op == "call_function" and user.target is torch.flatten)
                or (user.op == "call_method" and user.target in _INPUT_PASSTHROUGH_METHODS)
            )
            if not passthrough:
                break
            current = user


@torch.no_grad()
def compact(model: nn.Module, example_input: Tensor) -> tuple[nn.Module, CompactReport]:
    """A smaller network computing what the pruned ``model`` computes.

    Args:
        model: a network with masked layers (or a plain network with zeros in its weights).
            It is not modified.
        example_input: one batch the network accepts (shapes only matter); it traces the
            network and records the shapes.

    Returns:
        ``(network, report)``: the compact network, in eval mode, holding plain torch layers
        (``model``'s own class when its ``forward`` still works with the smaller layers,
        otherwise the traced ``torch.fx.GraphModule``), and a :class:`CompactReport`.

    Raises:
        ValueError: if the network cannot be traced by ``torch.fx`` (data-dependent control
            flow), with the tracer's reason.
    """
    dense = (
        export_pruned(model) if any(True for _ in masked_modules(model)) else copy.deepcopy(model)
    )
    dense.eval()
    report = CompactReport(params_before=stored_parameters(dense))
    try:
        tracer = _Tracer()
        graph = tracer.trace(dense)
        gm = fx.GraphModule(tracer.root, graph, type(dense).__name__)
    except Exception as err:  # torch.fx raises many types for untraceable code
        raise ValueError(
            f"compact: torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); export it as 'dense', 'sparse' or "
            "'onnx' (uncompacted) instead"
        ) from None
    gm.eval()
    example = example_input.detach()[:2].to(next(gm.parameters()).device)
    with torch.no_grad():
        reference = _tensors(dense(example))
    modules = dict(gm.named_modules())
    # a layer called more than once (its weights shared) computes one thing per call: what
    # one call's chain removes, another's may need, so it is neither shrunk nor followed into
    calls = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    shared = {target: count for target, count in calls.items() if count > 1}
    while True:
        ShapeProp(gm).propagate(example)
        changed = False
        for node in gm.graph.nodes:
            if node.op != "call_module" or not _weight_layer(modules[str(node.target)]):
                if node.op == "call_module" and isinstance(modules[str(node.target)], nn.Conv2d):
                    report.kept[str(node.target)] = "a grouped convolution"
                continue
            if str(node.target) in shared:
                report.kept[str(node.target)] = (
                    f"it is called {shared[str(node.target)]} times (its weights are shared)"
                )
                continue
            chain, why = _find_chain(node, modules, shared)
            if chain is None:
                if not why.startswith("it is the network's output"):
                    report.kept[str(node.target)] = why
                continue
            report.kept.pop(chain.producer, None)
            changed |= _pass(chain, gm, report)
        if not changed:
            break
    _select_inputs(gm, modules, report)
    gm.recompile()
    report.params_after = stored_parameters(gm)
    with torch.no_grad():
        compacted = _tensors(gm(example))
    differs = _difference(reference, compacted)
    if differs is not None:
        # the last line of defence: a compaction this module got wrong is never returned
        raise ValueError(
            f"compact: the compacted {type(model).__name__} differs from the pruned one on the "
            f"example input ({differs}), which is a bug in compact (please report it with the "
            "network); export it as 'dense', 'sparse' or 'onnx' (uncompacted) instead"
        )
    # The layers were shrunk in place, so the network's own class now computes the compact
    # function too, unless its forward hard-codes a width (``x.view(-1, 800)``): prefer it
    # (it pickles and prints as the user's class, and returns its own output types), fall
    # back to the traced graph.
    try:
        with torch.no_grad():
            own = _tensors(dense(example))
        if len(own) == len(compacted) and all(map(torch.equal, own, compacted)):
            return dense, report
    except Exception:  # a shape hard-coded in forward
        pass
    return gm, report


def _tensors(output: object) -> list[Tensor]:
    return [leaf for _, leaf in named_outputs(output) if isinstance(leaf, Tensor)]


def _difference(want: list[Tensor], got: list[Tensor]) -> str | None:
    """How ``got`` differs from ``want`` beyond the dtype's rounding, or ``None``."""
    if len(want) != len(got):
        return f"{len(got)} output tensors instead of {len(want)}"
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} differs"
            continue
        # folding reorders sums: a few units of the dtype's rounding, scaled by the output
        eps = torch.finfo(a.dtype).eps
        scale = max(1.0, float(a.detach().abs().max())) if a.numel() else 1.0
        err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        if not err <= 256 * eps * scale:
            return f"output {i} off by {err:.3g}"
    return None
