"""RankAgreementCheck and parameter_fingerprints, in one process (the real 2-process DDP run is
in tests/distributed/test_rank_agreement_ddp.py)."""

import copy

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from _helpers import TinyClassifier, quiet_trainer
from scl_lightning import sparsify
from scl_lightning.experiment import rank_agreement
from scl_lightning.experiment.rank_agreement import (
    RankAgreementCheck,
    RankDivergenceError,
    divergence_message,
    parameter_fingerprints,
)

Q = (1 << 32) + 15
CHUNK = rank_agreement._CHUNK


def _up_one_ulp(t: torch.Tensor, index: int) -> None:
    flat = t.view(-1)
    with torch.no_grad():
        flat[index] = torch.nextafter(flat[index], torch.tensor(float("inf"), dtype=t.dtype))


# --- the fingerprint --------------------------------------------------------------------------


def test_hash_matches_hand_computation():
    """The formula in plain Python integers: weighted sums of the unsigned 32-bit words modulo
    Q = 2^32 + 15, times the first chunk's factors, plus the length; S_0 whole, 30 bits of S_1."""
    t = torch.tensor([1.0, -2.5, 3.25e-7], dtype=torch.float32)
    table = rank_agreement._multipliers(torch.device("cpu"))
    words = [int.from_bytes(t[i].numpy().tobytes(), "little") for i in range(3)]
    factors = [pow(3, 1, Q) % (2**30 - 1) + 1, pow(7, 1, Q) % (2**30 - 1) + 1]
    sums = [
        (sum(w * int(table[k, i]) for i, w in enumerate(words)) * factors[k] + 12 + 1) % Q
        for k in range(2)
    ]
    assert int(rank_agreement._tensor_hash(t)) == sums[0] + Q * (sums[1] % 2**30)


def test_hash_of_odd_byte_count_pads_with_zeros():
    t = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)  # 6 bytes: one word and a half
    h = rank_agreement._tensor_hash(t)
    assert 0 <= int(h) < 1 << 62
    assert h.dtype == torch.int64 and h.dim() == 0


def test_identical_modules_have_equal_fingerprints():
    torch.manual_seed(0)
    a = sparsify(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)))
    b = copy.deepcopy(a)
    names, fa = parameter_fingerprints(a)
    names_b, fb = parameter_fingerprints(b)
    assert names == names_b == [n for n, _ in a.named_parameters()]
    assert any(n.endswith(".mask") for n in names)
    assert fa.dtype == torch.int64 and fa.shape == (len(names),)
    assert torch.equal(fa, fb)
    assert len(set(fa.tolist())) == len(names)  # no accidental collisions between tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index", [0, 1, 4, 9])
def test_one_ulp_anywhere_changes_exactly_that_entry(dtype, index):
    torch.manual_seed(1)
    a = nn.Linear(2, 5).to(dtype)  # weight has 10 elements, bias 5
    b = copy.deepcopy(a)
    _up_one_ulp(b.weight.data, index)
    assert not torch.equal(a.weight, b.weight)
    _, fa = parameter_fingerprints(a)
    _, fb = parameter_fingerprints(b)
    assert (fa != fb).tolist() == [True, False]


@pytest.mark.parametrize("index", [0, CHUNK - 1, CHUNK, 2 * CHUNK + 6])
def test_one_ulp_in_a_large_tensor_is_caught_in_every_chunk(index):
    torch.manual_seed(2)
    t = torch.randn(2 * CHUNK + 7)
    u = t.clone()
    _up_one_ulp(u, index)
    assert rank_agreement._tensor_hash(t) != rank_agreement._tensor_hash(u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_one_ulp_across_zero_is_caught(dtype):
    """-0.0 (word 0x80000000) up one ulp is the smallest subnormal (word 1): the words differ by
    2^31 - 1, a multiple of some moduli, never of the prime 2^32 + 15."""
    t = torch.tensor([0.5, -0.0, 2.0], dtype=dtype)
    u = t.clone()
    _up_one_ulp(u, 1)
    assert u[1] > 0
    assert rank_agreement._tensor_hash(t) != rank_agreement._tensor_hash(u)


def test_fingerprint_is_bitwise_not_numeric():
    zero, negzero = torch.zeros(4), torch.zeros(4)
    negzero[2] = -0.0
    assert torch.equal(zero, negzero)  # numerically equal ...
    assert rank_agreement._tensor_hash(zero) != rank_agreement._tensor_hash(negzero)  # ... not bits
    nan = torch.tensor([1.0, float("nan")])
    assert not torch.equal(nan, nan.clone())  # numerically unequal, bitwise equal
    assert rank_agreement._tensor_hash(nan) == rank_agreement._tensor_hash(nan.clone())


def test_swaps_are_caught():
    t = torch.arange(8, dtype=torch.float32)
    swapped = t[[1, 0, 2, 3, 4, 5, 6, 7]]
    assert rank_agreement._tensor_hash(t) != rank_agreement._tensor_hash(swapped)
    # whole chunks swapped: the per-chunk factor tells them apart
    big = torch.cat([torch.zeros(CHUNK), torch.ones(CHUNK)])
    assert rank_agreement._tensor_hash(big) != rank_agreement._tensor_hash(big.flip(0))


def test_length_is_part_of_the_fingerprint():
    assert rank_agreement._tensor_hash(torch.zeros(3)) != rank_agreement._tensor_hash(
        torch.zeros(4)
    )


def test_non_contiguous_and_offset_views_hash_like_their_copies():
    t = torch.randn(6, 4)
    assert rank_agreement._tensor_hash(t.t()) == rank_agreement._tensor_hash(t.t().contiguous())
    half = torch.randn(11, dtype=torch.float16)  # a view starting 2 bytes into its storage
    assert rank_agreement._tensor_hash(half[1:]) == rank_agreement._tensor_hash(half[1:].clone())


def test_buffers_only_when_asked_and_only_floating():
    module = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    names, _ = parameter_fingerprints(module)
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    names, hashes = parameter_fingerprints(module, include_buffers=True)
    assert names[4:] == ["1.running_mean", "1.running_var"]  # not num_batches_tracked (int)
    assert hashes.shape == (6,)


def test_module_without_parameters():
    names, hashes = parameter_fingerprints(nn.ReLU())
    assert names == [] and hashes.shape == (0,) and hashes.dtype == torch.int64


# --- the decision -----------------------------------------------------------------------------


def test_message_is_none_when_ranks_agree():
    assert divergence_message(5, ["a", "b"], torch.tensor([[1, 2], [1, 2], [1, 2]])) is None


def test_message_names_step_parameter_and_rank():
    msg = divergence_message(7, ["net.0.mask", "net.0.weight"], torch.tensor([[1, 2], [9, 2]]))
    assert msg is not None and "\n" not in msg
    assert "global step 7" in msg
    assert "rank 1 disagrees with rank 0 on 'net.0.mask';" in msg
    assert "net.0.weight" not in msg
    assert "SCL_DEBUG=1" in msg and "rank-dependent seed" in msg


def test_message_shows_three_names_then_a_count_and_all_bad_ranks():
    names = [f"p{i}" for i in range(6)]
    rows = torch.zeros(4, 6, dtype=torch.int64)
    rows[1, 1:6] = 1  # rank 1: five parameters differ
    rows[3, 0] = 1  # rank 3: another one; rank 2 agrees
    msg = divergence_message(2, names, rows)
    assert msg is not None
    assert "ranks 1, 3 disagree with rank 0 on 'p0', 'p1', 'p2' and 3 more;" in msg


# --- the callback -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer, got 0"),
        ({"every_n_steps": -3}, "every_n_steps must be a positive integer, got -3"),
        ({"every_n_steps": 1.5}, "every_n_steps must be a positive integer, got 1.5"),
        ({"every_n_steps": True}, "every_n_steps must be a positive integer, got True"),
        ({"every_n_steps": "2"}, "every_n_steps must be a positive integer, got '2'"),
        ({"include_buffers": "yes"}, "include_buffers must be True or False, got 'yes'"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankAgreementCheck(**kwargs)


def test_repr():
    assert repr(RankAgreementCheck(4, True)) == (
        "RankAgreementCheck(every_n_steps=4, include_buffers=True)"
    )


def test_single_process_does_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("fingerprinted in a single-process run")

    monkeypatch.setattr(rank_agreement, "parameter_fingerprints", boom)
    cb = RankAgreementCheck()
    quiet_trainer(tmp_path, callbacks=[cb]).fit(TinyClassifier(lr=0.1, sparse=True))
    assert cb.num_checks == 0


class FakeTwoRanks(SingleDeviceStrategy):
    """One process that the callback sees as two ranks: all_gather returns this rank's tensor
    and a "rank 1" copy, which ``tamper`` may change (to fake a divergence)."""

    def __init__(self, tamper=None):
        super().__init__(device=torch.device("cpu"))
        self.world_size = 2
        self.tamper = tamper
        self.gathers = 0

    def all_gather(self, tensor, group=None, sync_grads=False):
        self.gathers += 1
        other = tensor.clone()
        if self.tamper is not None:
            self.tamper(other, self.gathers)
        return torch.stack([tensor, other])


@pytest.mark.parametrize(
    ("every", "accumulate", "checks"),
    [(1, 1, 8), (3, 1, 3), (2, 2, 2), (5, 1, 2)],  # 8 batches; with accumulate 2: 4 steps
)
def test_schedule(tmp_path, every, accumulate, checks):
    """Every `every` optimizer steps, once per step however many batches it accumulates, and at
    the end when the last step was not checked (8 steps, every 3: 3, 6 and 8)."""
    strategy = FakeTwoRanks()
    cb = RankAgreementCheck(every_n_steps=every)
    trainer = quiet_trainer(
        tmp_path,
        strategy=strategy,
        callbacks=[cb],
        limit_train_batches=8,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(TinyClassifier(lr=0.1, sparse=True))
    assert cb.num_checks == checks
    assert strategy.gathers == 2 * checks  # the layout, then the fingerprints
    assert cb._last_checked_step == trainer.global_step


def test_divergence_raises_with_one_line(tmp_path):
    def tamper(other, gathers):
        if gathers == 6 and other.numel() > 2:  # the fingerprints of the third check
            other[1] += 1

    model = TinyClassifier(lr=0.1, sparse=True)
    names = [n for n, _ in model.named_parameters()]
    trainer = quiet_trainer(
        tmp_path, strategy=FakeTwoRanks(tamper), callbacks=[RankAgreementCheck()]
    )
    with pytest.raises(RankDivergenceError) as info:
        trainer.fit(model)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"global step 3: rank 1 disagrees with rank 0 on '{names[1]}';" in msg
    assert isinstance(info.value, RuntimeError)


def test_different_parameter_layout_raises(tmp_path):
    def tamper(other, gathers):
        if other.numel() == 2:  # the header: [number of tensors, layout hash]
            other[1] += 1

    trainer = quiet_trainer(
        tmp_path, strategy=FakeTwoRanks(tamper), callbacks=[RankAgreementCheck()]
    )
    with pytest.raises(
        RankDivergenceError,
        match=r"names, shapes or dtypes on rank 1 differ from rank 0's at global step 1;",
    ):
        trainer.fit(TinyClassifier(lr=0.1, sparse=True))


def test_sharded_strategy_turns_the_check_off():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    cb = RankAgreementCheck()
    trainer = SimpleNamespace(world_size=2, global_step=0, strategy=FSDPStrategy())
    with pytest.warns(UserWarning, match="FSDPStrategy shards parameters across ranks"):
        cb.on_fit_start(trainer, TinyClassifier(lr=0.1, sparse=True))
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, TinyClassifier(lr=0.1, sparse=True), None, None, 0)
    assert cb.num_checks == 0
