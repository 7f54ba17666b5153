import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from scl_lightning.nn import sparsify
from scl_lightning.training import (
    MASK_GROUP_KEY,
    attach_mask_group,
    drop_mask_grads,
    mask_parameters,
    masks_trainable,
    validate_phases,
    validate_positive,
)

WEIGHT_LR = 0.1
MASK_LR = 0.01


def _net() -> nn.Module:
    torch.manual_seed(0)
    return sparsify(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _step(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    net(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


# -- mask_parameters / drop_mask_grads ------------------------------------------------------------


def test_mask_parameters_in_module_order():
    net = _net()
    assert [id(m) for m in mask_parameters(net)] == [id(net[0].mask), id(net[2].mask)]
    assert mask_parameters(nn.Linear(2, 2)) == []


def test_drop_mask_grads():
    net = _net()
    net(torch.randn(2, 4)).sum().backward()
    drop_mask_grads(mask_parameters(net))
    assert all(m.grad is None for m in mask_parameters(net))
    assert net[0].raw_weight.grad is not None


# -- attach_mask_group ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs", "copied"),
    [
        (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, "momentum"),
        (torch.optim.Adam, {"betas": (0.8, 0.95), "weight_decay": 1e-3}, "betas"),
        (torch.optim.AdamW, {"betas": (0.8, 0.95), "weight_decay": 0.1}, "betas"),
    ],
)
def test_attach_mask_group_moves_masks(optimizer_cls, kwargs, copied):
    net = _net()
    masks = mask_parameters(net)
    optimizer = optimizer_cls(net.parameters(), lr=WEIGHT_LR, **kwargs)
    group = attach_mask_group(optimizer, masks, MASK_LR)

    assert len(optimizer.param_groups) == 2
    weights, mask_group = optimizer.param_groups
    assert group is mask_group
    assert _ids(weights["params"]).isdisjoint(_ids(masks))
    assert _ids(weights["params"]) | _ids(masks) == _ids(net.parameters())
    assert [id(p) for p in mask_group["params"]] == [id(m) for m in masks]
    assert mask_group["lr"] == MASK_LR
    assert mask_group["weight_decay"] == 0.0
    assert mask_group[MASK_GROUP_KEY] is True
    assert mask_group[copied] == weights[copied] == kwargs[copied]
    # the weights' own settings are untouched
    assert weights["lr"] == WEIGHT_LR
    assert weights["weight_decay"] == kwargs["weight_decay"]
    assert not weights.get(MASK_GROUP_KEY)


def test_attach_mask_group_updates_masks_with_mask_lr():
    net = _net()
    masks = mask_parameters(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=WEIGHT_LR, weight_decay=0.5)
    attach_mask_group(optimizer, masks, MASK_LR)
    net(torch.randn(5, 4)).pow(2).sum().backward()
    before = [m.detach().clone() for m in masks]
    grads = [m.grad.clone() for m in masks]
    optimizer.step()
    for mask, old, grad in zip(masks, before, grads, strict=True):
        # plain SGD step with mask_lr and no weight decay on the masks
        torch.testing.assert_close(mask.detach(), old - MASK_LR * grad)


def test_attach_mask_group_from_several_groups():
    net = _net()
    first, second = net[0], net[2]
    optimizer = torch.optim.SGD(
        [
            {"params": [first.raw_weight, first.bias, first.mask], "lr": 0.2, "momentum": 0.5},
            {"params": [second.mask]},  # a group of masks only stays, emptied
            {"params": [second.raw_weight, second.bias], "momentum": 0.7},
        ],
        lr=WEIGHT_LR,
    )
    group = attach_mask_group(optimizer, [first.mask, second.mask], MASK_LR)
    assert len(optimizer.param_groups) == 4
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 0, 2, 2]
    # hyper-parameters come from the group the first mask was in
    assert group["momentum"] == 0.5
    assert group["lr"] == MASK_LR
    _step(net, optimizer)  # an emptied group is harmless


def test_attach_mask_group_twice_raises():
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=WEIGHT_LR)
    attach_mask_group(optimizer, mask_parameters(net), MASK_LR)
    with pytest.raises(ValueError, match="already has an SCL mask group"):
        attach_mask_group(optimizer, mask_parameters(net), MASK_LR)


def test_attach_mask_group_after_a_step_raises():
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=WEIGHT_LR, momentum=0.9)
    _step(net, optimizer)
    assert len(optimizer.state) > 0
    with pytest.raises(ValueError, match="before the optimizer's first step"):
        attach_mask_group(optimizer, mask_parameters(net), MASK_LR)
    assert len(optimizer.param_groups) == 1


def _sequential_warmup(opt):
    warmup = lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    decay = lr_scheduler.ExponentialLR(opt, gamma=0.8)
    return lr_scheduler.SequentialLR(opt, [warmup, decay], milestones=[3])


SCHEDULERS = {
    "step": lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    # (eta_min is one absolute value for every group, so it is left at 0 here)
    "cosine": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=6),
    "one_cycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=12),
    "lambda": lambda opt: lr_scheduler.LambdaLR(opt, lambda epoch: 0.9**epoch),
    "plateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=0.02),
    "sequential": _sequential_warmup,
    # a chain of one scheduler, with one parameter group: its list of schedulers has as many
    # entries as there are groups and must not be mistaken for a per-group list
    "chained": lambda opt: lr_scheduler.ChainedScheduler([lr_scheduler.StepLR(opt, 1, 0.5)]),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_attach_mask_group_follows_the_schedule(name):
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=WEIGHT_LR, momentum=0.9)
    scheduler = SCHEDULERS[name](optimizer)
    base_lr = optimizer.param_groups[0].get("initial_lr", WEIGHT_LR)
    attach_mask_group(optimizer, mask_parameters(net), MASK_LR, [scheduler])

    weight_lrs, mask_lrs = [], []
    for _ in range(10):
        _step(net, optimizer)
        if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0)  # never improves: reduce every step down to min_lr
        else:
            scheduler.step()
        weight_lrs.append(optimizer.param_groups[0]["lr"])
        mask_lrs.append(optimizer.param_groups[1]["lr"])
    assert len(set(weight_lrs)) > 1, "the schedule should change the learning rate"
    expected = [MASK_LR * lr / base_lr for lr in weight_lrs]
    assert mask_lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    if name == "chained":  # stepped once per step, not once per group
        assert weight_lrs[:3] == pytest.approx([0.05, 0.025, 0.0125])
    if name == "plateau":  # min_lr scaled with the group
        assert min(weight_lrs) == pytest.approx(0.02)
        assert min(mask_lrs) == pytest.approx(0.002)


# An absolute floor given as one number (ReduceLROnPlateau's min_lr) applies as-is to every group
# of an optimizer built with the mask group, while attach_mask_group scales it with the group.
REFERENCE_SCHEDULERS = {
    **SCHEDULERS,
    "plateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
}


@pytest.mark.parametrize("name", ["step", "cosine", "lambda", "plateau", "sequential", "chained"])
def test_attach_mask_group_matches_a_group_built_before_the_scheduler(name):
    """Attaching later gives the learning rates of a mask group that was there from the start
    (what SCLModule builds), warm-up schedules included."""
    built, attached = _net(), _net()
    reference = torch.optim.SGD(
        [
            {"params": [p for n, p in built.named_parameters() if not n.endswith("mask")]},
            {"params": mask_parameters(built), "lr": MASK_LR},
        ],
        lr=WEIGHT_LR,
    )
    optimizer = torch.optim.SGD(attached.parameters(), lr=WEIGHT_LR)
    ref_scheduler = REFERENCE_SCHEDULERS[name](reference)
    scheduler = REFERENCE_SCHEDULERS[name](optimizer)
    attach_mask_group(optimizer, mask_parameters(attached), MASK_LR, [scheduler])
    assert optimizer.param_groups[1]["lr"] == pytest.approx(reference.param_groups[1]["lr"])
    for _ in range(8):
        for opt, sched, net in [
            (reference, ref_scheduler, built),
            (optimizer, scheduler, attached),
        ]:
            _step(net, opt)
            if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
                sched.step(1.0)
            else:
                sched.step()
        ref_lrs = [g["lr"] for g in reference.param_groups]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(ref_lrs, rel=1e-9)


def test_attach_mask_group_scheduler_state_dict_round_trip():
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=WEIGHT_LR)
    scheduler = _sequential_warmup(optimizer)
    attach_mask_group(optimizer, mask_parameters(net), MASK_LR, [scheduler])
    for _ in range(4):
        _step(net, optimizer)
        scheduler.step()
    state = scheduler.state_dict()
    assert state["_milestones"] == [3]
    assert len(state["_schedulers"]) == 2
    assert all(len(s["base_lrs"]) == 2 for s in state["_schedulers"])


# -- phases and validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "warmup", "freeze", "expected"),
    [
        (0, 0, None, True),
        (100, 0, None, True),
        (0, 1, None, False),
        (1, 1, None, True),
        (0, 0, 2, True),
        (1, 0, 2, True),
        (2, 0, 2, False),
        (5, 0, 2, False),
        (0, 1, 3, False),
        (1, 1, 3, True),
        (2, 1, 3, True),
        (3, 1, 3, False),
    ],
)
def test_masks_trainable(epoch, warmup, freeze, expected):
    assert masks_trainable(epoch, warmup, freeze) is expected


@pytest.mark.parametrize(("warmup", "freeze"), [(0, None), (3, None), (0, 1), (2, 3), (2, 10)])
def test_validate_phases_accepts(warmup, freeze):
    validate_phases(warmup, freeze)


@pytest.mark.parametrize(
    ("warmup", "freeze", "match"),
    [
        (-1, None, r"warmup_epochs must be an integer >= 0, got -1"),
        (1.5, None, r"warmup_epochs must be an integer >= 0, got 1.5"),
        (True, None, r"warmup_epochs must be an integer >= 0, got True"),
        ("1", None, r"warmup_epochs must be an integer >= 0, got '1'"),
        (None, None, r"warmup_epochs must be an integer >= 0, got None"),
        (0, 2.0, r"freeze_masks_epoch must be an integer or None, got 2.0"),
        (0, True, r"freeze_masks_epoch must be an integer or None, got True"),
        (0, 0, r"freeze_masks_epoch \(0\) must be greater than warmup_epochs \(0\)"),
        (2, 2, r"freeze_masks_epoch \(2\) must be greater than warmup_epochs \(2\)"),
        (3, 1, r"freeze_masks_epoch \(1\) must be greater than warmup_epochs \(3\)"),
    ],
)
def test_validate_phases_rejects(warmup, freeze, match):
    with pytest.raises(ValueError, match=match):
        validate_phases(warmup, freeze)


@pytest.mark.parametrize(
    ("value", "allow_zero", "expected"),
    [(1, False, 1.0), (0.5, False, 0.5), (0, True, 0.0), (0.0, True, 0.0), (1e-8, False, 1e-8)],
)
def test_validate_positive_accepts(value, allow_zero, expected):
    result = validate_positive("x", value, allow_zero=allow_zero)
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize(
    ("value", "allow_zero", "match"),
    [
        (0, False, r"lam must be a finite number > 0, got 0"),
        (-1, True, r"lam must be a finite number >= 0, got -1"),
        (-1e-9, False, r"lam must be a finite number > 0, got -1e-09"),
        (math.nan, True, r"lam must be a finite number >= 0, got nan"),
        (math.inf, True, r"lam must be a finite number >= 0, got inf"),
        (True, True, r"lam must be a finite number >= 0, got True"),
        ("x", True, r"lam must be a finite number >= 0, got 'x'"),
        (None, False, r"lam must be a finite number > 0, got None"),
    ],
)
def test_validate_positive_rejects(value, allow_zero, match):
    with pytest.raises(ValueError, match=match):
        validate_positive("lam", value, allow_zero=allow_zero)
