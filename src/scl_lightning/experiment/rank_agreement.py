"""RankAgreementCheck: a debug check that masks and weights stay bitwise identical across ranks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from scl_lightning._utils import is_int

__all__ = [
    "RankAgreementCheck",
    "RankDivergenceError",
    "divergence_message",
    "parameter_fingerprints",
]

# The hash: split a tensor's bytes into unsigned 32-bit words w_i (< 2^32) and take two weighted
# sums S_k = sum_i w_i * m_ki mod Q, with fixed pseudo-random multipliers 1 <= m_ki < 2^31 and
# Q = 2^32 + 15, the smallest prime above 2^32. Every product is < 2^63 and every partial sum
# < 2^53, so the int64 arithmetic never overflows and the result is exact on any device,
# independent of reduction order. A change of one word by d (0 < |d| < 2^32 < Q) changes S_0 by
# d * m mod Q, never 0 since Q is prime, so a single changed element (one ulp, or the step from
# -0.0 to the smallest subnormal, d = 2^31 - 1) is always caught. The fingerprint packs S_0 whole
# and 30 bits of S_1 into 62 bits: other differences collide with probability ~2^-62.
_Q = (1 << 32) + 15
_M = 1 << 31  # multipliers lie in [1, _M)
_S1_BITS = 30
_CHUNK = 1 << 20  # words hashed per kernel call: bounds the temporaries to ~50 MB
_SEED = 0x5C1A9
_MULTIPLIERS: dict[torch.device, Tensor] = {}
_NAMES_SHOWN = 3


def _multipliers(device: torch.device) -> Tensor:
    """The (2, _CHUNK) multiplier table, generated on the CPU (same values on every machine with
    the same torch) and cached per device."""
    table = _MULTIPLIERS.get(device)
    if table is None:
        gen = torch.Generator().manual_seed(_SEED)
        table = torch.randint(1, _M, (2, _CHUNK), generator=gen, dtype=torch.int64).to(device)
        _MULTIPLIERS[device] = table
    return table


def _chunk_factor(chunk: int) -> list[int]:
    """Nonzero factors below 2^30 (so factor * S < 2^63) that tell chunks at different offsets
    apart: equal chunks swapped within a tensor give a different fingerprint."""
    return [pow(base, chunk + 1, _Q) % ((1 << 30) - 1) + 1 for base in (3, 7)]


def _words(tensor: Tensor) -> Tensor:
    """The tensor's bytes as int32 words (zero-padded to a whole word), as a 1-D view or copy."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = -data.numel() % 4
    if pad or data.storage_offset() % 4:
        data = torch.cat([data, data.new_zeros(pad)])
    return data.view(torch.int32)


def _tensor_hash(tensor: Tensor) -> Tensor:
    """An exact 62-bit hash of the tensor's bytes: a 0-dim int64 tensor on the tensor's device."""
    words = _words(tensor)
    table = _multipliers(words.device)
    acc = torch.zeros(2, dtype=torch.int64, device=words.device)
    for chunk, start in enumerate(range(0, words.numel(), _CHUNK)):
        w = words[start : start + _CHUNK].to(torch.int64) & 0xFFFFFFFF  # unsigned, < 2^32
        part = ((w * table[:, : w.numel()]) % _Q).sum(dim=1) % _Q
        factor = torch.tensor(_chunk_factor(chunk), dtype=torch.int64, device=acc.device)
        acc = (acc + part * factor) % _Q
    acc = (acc + tensor.numel() * tensor.element_size() + 1) % _Q  # the length, too
    return acc[0] + _Q * (acc[1] & ((1 << _S1_BITS) - 1))


def _named_tensors(module: nn.Module, include_buffers: bool) -> list[tuple[str, Tensor]]:
    named: list[tuple[str, Tensor]] = list(module.named_parameters())
    if include_buffers:
        named += [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    return named


def parameter_fingerprints(
    module: nn.Module, include_buffers: bool = False
) -> tuple[list[str], Tensor]:
    """Exact (bitwise) fingerprints of every parameter of ``module``, for comparing copies.

    Each fingerprint is a 62-bit hash of the tensor's raw bytes (weighted sums of its 32-bit
    words modulo the prime 2^32 + 15, in exact int64 arithmetic), computed on the tensor's own
    device: no copy to the host. A single changed element (one ulp, or a -0.0 for a 0.0) always
    changes its parameter's fingerprint; any other difference does with probability
    1 - 2^-62. Cost: a few elementwise int64 passes over the parameters (about 20 ms per
    million parameters on one CPU core, much less on a GPU) plus ~30 us per tensor.

    Args:
        module: any module; its ``named_parameters()`` in order (masks, weights, biases).
        include_buffers: also fingerprint floating-point buffers (e.g. BatchNorm running stats).

    Returns:
        The names, and a 1-D int64 tensor of fingerprints in the same order, on the device of
        the module's tensors (CPU for a module without any).

    Example::

        >>> import copy
        >>> a = nn.Linear(3, 2)
        >>> b = copy.deepcopy(a)
        >>> names, fa = parameter_fingerprints(a)
        >>> names
        ['weight', 'bias']
        >>> torch.equal(fa, parameter_fingerprints(b)[1])
        True
        >>> with torch.no_grad():  # move one element of b's bias by one ulp
        ...     b.bias[1] = torch.nextafter(b.bias[1], torch.tensor(float("inf")))
        >>> (fa != parameter_fingerprints(b)[1]).tolist()
        [False, True]
    """
    named = _named_tensors(module, include_buffers)
    if not named:
        return [], torch.zeros(0, dtype=torch.int64)
    device = named[0][1].device
    hashes = torch.stack([_tensor_hash(t).to(device) for _, t in named])
    return [n for n, _ in named], hashes


def _structure_hash(module: nn.Module, include_buffers: bool) -> int:
    """A signed 64-bit hash of the names, shapes and dtypes that the fingerprints cover."""
    text = ";".join(
        f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in _named_tensors(module, include_buffers)
    )
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True
    )


class RankDivergenceError(RuntimeError):
    """Raised on every rank by :class:`RankAgreementCheck` when ranks' parameters differ."""


_WHAT_TO_DO = (
    "look for a non-deterministic op, a rank-dependent seed, or a callback that changes "
    "parameters on one rank only; rerun with SCL_DEBUG=1 for the traceback"
)


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def divergence_message(step: int, names: Sequence[str], gathered: Tensor) -> str | None:
    """The one-line error for gathered fingerprints, or ``None`` when all ranks agree.

    Args:
        step: the global step the fingerprints were taken at.
        names: the parameter names, one per column of ``gathered``.
        gathered: ``(world_size, len(names))`` fingerprints, row ``r`` from rank ``r``.
    """
    differs = gathered != gathered[0:1]
    if not bool(differs.any()):
        return None
    bad_params = differs.any(dim=0).nonzero().flatten().tolist()
    bad_ranks = differs.any(dim=1).nonzero().flatten().tolist()
    shown = ", ".join(repr(names[i]) for i in bad_params[:_NAMES_SHOWN])
    more = len(bad_params) - _NAMES_SHOWN
    if more > 0:
        shown += f" and {more} more"
    return (
        f"RankAgreementCheck: parameters diverged across ranks at global step {step}: "
        f"{_ranks(bad_ranks)} {'disagrees' if len(bad_ranks) == 1 else 'disagree'} with rank 0 "
        f"on {shown}; "
        f"{_WHAT_TO_DO}"
    )


class RankAgreementCheck(Callback):
    """Debug check: fail loudly as soon as masks or weights differ between DDP ranks.

    Under data-parallel training every rank must hold bitwise identical parameters after every
    optimizer step (DDP averages the gradients, then each rank takes the same step). This
    callback checks that: every ``every_n_steps`` optimizer steps, and once more at the end of
    training, each rank fingerprints every parameter of the LightningModule (masks, weights and
    biases: see :func:`parameter_fingerprints`), the fingerprints are gathered, and if any rank
    differs from rank 0 every rank raises :class:`RankDivergenceError` with one line naming the
    global step, the first diverging parameters and the ranks that disagree. Every rank takes
    the same decision from the same gathered data, so the run stops instead of hanging.

    Cost per check: a few elementwise int64 passes over the parameters on their own device
    (about 20 ms per million parameter values, masks included, on one CPU core; much less on a
    GPU; no copy to the host) and two small all-gathers (the layout, then one int64 per
    tensor). Use ``every_n_steps`` to thin it out on large models. On a single process
    (``world_size == 1``) the callback does nothing and costs nothing. Sharded strategies (FSDP,
    model parallel, DeepSpeed ZeRO-3) hold different shards per rank by design, so there it
    warns once and turns itself off.

    Args:
        every_n_steps: check after every this many optimizer steps (``trainer.global_step``).
        include_buffers: also compare floating-point buffers. Off by default: BatchNorm running
            statistics legitimately differ between ranks under DDP without SyncBatchNorm.

    Raises:
        ValueError: for an ``every_n_steps`` that is not a positive integer, or an
            ``include_buffers`` that is not a bool.
        RankDivergenceError: during training, on every rank, when parameters differ.

    Example::

        >>> trainer = pl.Trainer(callbacks=[RankAgreementCheck(every_n_steps=10)], logger=False)
    """

    def __init__(self, every_n_steps: int = 1, include_buffers: bool = False) -> None:
        if not is_int(every_n_steps) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if not isinstance(include_buffers, bool):
            raise ValueError(f"include_buffers must be True or False, got {include_buffers!r}")
        self.every_n_steps = int(every_n_steps)
        self.include_buffers = include_buffers
        #: checks run so far in this process (for tests and logs; not saved in checkpoints)
        self.num_checks = 0
        self._active = False
        # A guard against checking one optimizer step twice (gradient accumulation runs several
        # batches per step); not a schedule, so nothing to restore from a checkpoint.
        self._last_checked_step = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # only steps taken in this fit: not the start (DDP has just broadcast rank 0's weights)
        self._last_checked_step = trainer.global_step
        self._active = trainer.world_size > 1
        if self._active and _is_sharded(trainer.strategy):
            rank_zero_warn(
                f"RankAgreementCheck: {type(trainer.strategy).__name__} shards parameters "
                "across ranks, so they differ by design; the check is off. Remove the callback "
                "or use strategy='ddp' to debug"
            )
            self._active = False

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if self._active and step != self._last_checked_step and step % self.every_n_steps == 0:
            self.check(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active and trainer.global_step != self._last_checked_step:
            self.check(trainer, pl_module)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compare the parameters across ranks now; a collective: call it on every rank.

        Raises:
            RankDivergenceError: on every rank, when any rank differs from rank 0.
        """
        step = trainer.global_step
        self._last_checked_step = step
        self.num_checks += 1
        names, hashes = parameter_fingerprints(pl_module, self.include_buffers)
        device = trainer.strategy.root_device
        # First the layout (fixed size, always safe to gather), so that ranks with different
        # parameter sets get a clear error instead of a failed or mismatched gather.
        header = torch.tensor(
            [len(names), _structure_hash(pl_module, self.include_buffers)],
            dtype=torch.int64,
            device=device,
        )
        headers = _all_gather(trainer, header)
        if not bool((headers == headers[0:1]).all()):
            bad = (headers != headers[0:1]).any(dim=1).nonzero().flatten().tolist()
            raise RankDivergenceError(
                f"RankAgreementCheck: the parameter names, shapes or dtypes on {_ranks(bad)} "
                f"differ from rank 0's at global step {step}; build the model "
                f"identically on every rank; {_WHAT_TO_DO}"
            )
        if not names:
            return
        gathered = _all_gather(trainer, hashes.to(device))
        message = divergence_message(step, names, gathered.cpu())
        if message is not None:
            raise RankDivergenceError(message)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(every_n_steps={self.every_n_steps}, "
            f"include_buffers={self.include_buffers})"
        )


def _all_gather(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """``(world_size, n)`` from each rank's 1-D ``tensor`` of ``n`` elements (the same on all)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # torch's own collective: Lightning's all_gather goes through a deprecated torch API
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)
    return trainer.strategy.all_gather(tensor).reshape(-1, tensor.numel())


def _is_sharded(strategy: object) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and bool(
        getattr(strategy, "zero_stage_3", False)
    )
