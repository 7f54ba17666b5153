"""Lambda control: ask for a sparsity or a FLOPs budget instead of choosing lambda.

SCL's lambda prices a connection; which price gives 95% sparsity depends on the network, the data,
the optimizer and the run length, so it used to take a sweep. With a *target*, the engine adapts
lambda itself while the network still decides where the connections go (there is one global
lambda and no per-layer knob):

* the **reduction** ``r`` is measured after every optimizer step from the masks: the global
  sparsity of the masked layers for ``target_sparsity``, or ``1 - effective FLOPs / dense FLOPs``
  for ``target_flops`` (one sample, the engine's fvcore trace);
* a **schedule** ``r*(t)`` leads it from its value when masks start learning (``r0``, usually 0)
  to the target along Zhu & Gupta's cubic, ``r*(t) = R + (r0 - R) (1 - (t - t0) / (t1 - t0))^3``,
  and holds the target from ``t1`` (the step the target must be reached by) on;
* lambda follows a **PI controller on log lambda** (dual ascent on the constraint ``r >= r*``
  with a proportional term), fed a short **prediction** of the reduction::

      e = c * log[(1 - r(t) - tau * dr/dt) / (1 - r*(t))]
      I += k_i * e;   log lambda = I + k_p * e

  Too little reduction raises lambda, too much lowers it, and the integral ``I`` keeps
  whatever lambda holds the budget. The error compares what is *left* (density, or the FLOPs
  share), relatively: keeping 0.43% of the connections when 0.55% were asked is as wrong as
  keeping 7.8% when 10% were asked, though the first is 0.0012 in sparsity. (``c = 0.05``
  makes the error equal the sparsity difference at 95%.) With the sparsity difference instead,
  the loop's gain fell with what is left, and a 99.45% target overshot to 99.57% on
  Fashion-MNIST LeNet-300-100; on the log scale it ends at 99.45%. Working on ``log lambda``
  makes the gains independent of lambda's scale (a count or FLOPs penalty, a small or a large
  network); lambda starts at ``0.1 / N`` (``N``: what the penalty counts with everything on,
  connections or multiply-adds), about a decade below the values that prune 90-99% in this project's
  measurements, and stays within a factor ``1e6`` of that start.

Why a schedule, a proportional term and a prediction: sparsity answers lambda late (a mask
needs tens of steps to cross zero, and the masks on their way keep crossing after lambda drops)
and almost only one way (a pruned connection's weight no longer learns, so few come back). An
integral alone, chasing the target from step 0, winds lambda up and overshoots for good
(measured on digits: 0.927 for a 0.90 target). The cubic reference rises smoothly and flattens
at the target; the proportional term damps; the prediction (the recent slope, averaged over
about ten steps, times a horizon ``tau`` of ``0.5 * mask_init / mask_lr`` steps: 50 at the
defaults) lets lambda fall *before* the target is crossed. The gains and the horizon were tuned
on digits (900 steps: within 0.003 of targets 0.90-0.98 on seeds 0-2) with the sparsity
difference as the error, kept for the log error through ``c`` (equal at 95%), and checked on
Fashion-MNIST (``bench/budgets.py``, docs/RESULTS.md: within 0.003 of every target from 0.90 to
0.9945, 0.2% of a FLOPs target).

Everything here is plain Python floats updated from values that are identical on every rank
(DDP keeps the masks in agreement), so lambda is identical on every rank and is restored bit
for bit from a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["LambdaController", "cubic_schedule", "validate_targets"]

Kind = Literal["sparsity", "flops"]

#: lambda starts at LAM_START_DENSITY / N and stays within LAM_RANGE of that start
LAM_START_DENSITY = 0.1
LAM_RANGE = 1e6
#: the controller's gains at ``control_gain=1``: integral and proportional, on ``log lambda`` per
#: unit of error (tuned on digits and Fashion-MNIST, see the module docstring)
INTEGRAL_GAIN = 2.0
PROPORTIONAL_GAIN = 40.0
#: the prediction horizon, as a share of ``mask_init / mask_lr`` steps
LEAD_SHARE = 0.5
#: the error is ``ERROR_SCALE * log(predicted density / scheduled density)``: relative to what
#: is left, scaled so that at 95% sparsity (5% left) it equals the sparsity difference
ERROR_SCALE = 0.05
#: the prediction may run ahead of the schedule by at most this factor in density (e^-3)
MAX_LEAD_RATIO = math.exp(-3.0)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def validate_targets(
    lam: float | None,
    target_sparsity: float | None,
    target_flops: float | None,
    target_epoch: int | None,
    target_step: int | None,
    tolerance: float,
) -> None:
    """The one-line errors for a bad budget (the engine and SCLModule call it)."""
    if target_sparsity is not None and target_flops is not None:
        raise ValueError(
            "give target_sparsity or target_flops, not both: the engine has one lambda to adapt"
        )
    target = target_sparsity if target_sparsity is not None else target_flops
    if target is None:
        if target_epoch is not None or target_step is not None:
            raise ValueError(
                "target_epoch/target_step set without a target: add target_sparsity or "
                "target_flops, or drop them"
            )
        return
    name = "target_sparsity" if target_sparsity is not None else "target_flops"
    if lam is not None:
        raise ValueError(
            f"{name}={target!r} and lam={lam!r} together: with a target the engine adapts lambda "
            f"itself; drop lam (in a config file, `lam: null` or --model.lam null)"
        )
    if not _is_number(target):
        raise ValueError(f"{name} must be a number, got {target!r}")
    if target_sparsity is not None and not 0 <= target < 1:
        raise ValueError(
            f"target_sparsity must be in [0, 1) (the fraction of connections removed), "
            f"got {target!r}"
        )
    if target_flops is not None and not 0 < target < 1:
        raise ValueError(
            f"target_flops must be in (0, 1) (effective FLOPs as a fraction of dense), "
            f"got {target!r}"
        )
    if target_epoch is not None and target_step is not None:
        raise ValueError("give target_epoch or target_step, not both")
    for key, value in (("target_epoch", target_epoch), ("target_step", target_step)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if not _is_number(tolerance) or not 0 < tolerance < 1:
        raise ValueError(f"target_tolerance must be in (0, 1), got {tolerance!r}")


def cubic_schedule(step: int, start: int, end: int, initial: float, final: float) -> float:
    """``initial`` before ``start``, ``final`` from ``end`` on, Zhu & Gupta's cubic between."""
    if step <= start:
        return initial
    if step >= end:
        return final
    frac = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


@dataclass
class LambdaController:
    """The state and update rule of lambda control (see the module docstring).

    Args:
        kind: what the target is: ``"sparsity"`` (fraction of connections off) or ``"flops"``
            (effective FLOPs as a fraction of dense).
        target: the requested sparsity, or FLOPs fraction.
        gain: multiplies both gains (``INTEGRAL_GAIN`` and ``PROPORTIONAL_GAIN``).
        tolerance: how close to the target counts as holding it (``freeze_at_target``).
    """

    kind: Kind
    target: float
    gain: float = 1.0
    tolerance: float = 0.005
    lead: float = 0.0
    slope: float = 0.0
    log_lam: float | None = None
    integral: float | None = None
    log_lam_start: float | None = None
    start_step: int | None = None
    end_step: int | None = None
    start_value: float = 0.0
    last_step: int = -1
    last_value: float | None = None
    frozen_step: int | None = None

    @property
    def goal(self) -> float:
        """The target as a reduction: sparsity itself, or ``1 - target_flops``."""
        return self.target if self.kind == "sparsity" else 1.0 - self.target

    @property
    def lam(self) -> float:
        return 0.0 if self.log_lam is None else math.exp(self.log_lam)

    @property
    def started(self) -> bool:
        return self.start_step is not None

    def start(
        self, step: int, end_step: int, value: float, scale: float, crossing_steps: float
    ) -> None:
        """Begin at ``step`` with reduction ``value``: the schedule reaches the goal at
        ``end_step``; ``scale`` is ``N``, what the penalty counts with every connection on;
        ``crossing_steps`` is ``mask_init / mask_lr`` (the prediction horizon's unit)."""
        self.lead = LEAD_SHARE * crossing_steps
        self.start_step = step
        self.end_step = max(end_step, step + 1)
        self.start_value = min(value, self.goal)
        self.log_lam_start = math.log(LAM_START_DENSITY / max(scale, 1e-30))
        self.log_lam = self.integral = self.log_lam_start

    def reference(self, step: int) -> float:
        """The reduction the schedule asks for at ``step``."""
        if self.start_step is None or self.end_step is None:
            return self.start_value
        return cubic_schedule(step, self.start_step, self.end_step, self.start_value, self.goal)

    def gap(self, value: float) -> float:
        """Measured minus target, in the target's own unit (sparsity, or FLOPs fraction)."""
        return value - self.goal if self.kind == "sparsity" else (1.0 - value) - self.target

    def update(self, step: int, value: float) -> float:
        """One control step with the measured reduction ``value``; returns the new lambda."""
        if self.integral is None or self.log_lam_start is None:
            raise RuntimeError("LambdaController.update before start")
        if step == self.last_step:  # several optimizers step once each: one update per step
            return self.lam
        if self.last_value is not None and self.last_step >= 0:
            change = (value - self.last_value) / max(step - self.last_step, 1)
            self.slope = 0.9 * self.slope + 0.1 * change
        self.last_step = step
        self.last_value = value
        error = self.error(step, value)
        low, high = (
            self.log_lam_start - math.log(LAM_RANGE),
            self.log_lam_start + math.log(LAM_RANGE),
        )
        self.integral = min(max(self.integral + self.gain * INTEGRAL_GAIN * error, low), high)
        self.log_lam = min(max(self.integral + self.gain * PROPORTIONAL_GAIN * error, low), high)
        return self.lam

    def error(self, step: int, value: float) -> float:
        """How much more reduction the schedule asks for than the prediction gives."""
        left = max(1.0 - self.reference(step), 1e-12)  # density (or FLOPs share) asked for
        predicted = 1.0 - (value + self.lead * self.slope)
        return ERROR_SCALE * math.log(max(predicted, left * MAX_LEAD_RATIO) / left)

    def held(self, step: int, value: float) -> bool:
        """Whether the schedule has reached the goal and ``value`` is within the tolerance."""
        return (
            self.end_step is not None
            and step >= self.end_step
            and abs(value - self.goal) <= self.tolerance
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_lam": self.log_lam,
            "integral": self.integral,
            "slope": self.slope,
            "lead": self.lead,
            "log_lam_start": self.log_lam_start,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "start_value": self.start_value,
            "last_step": self.last_step,
            "last_value": self.last_value,
            "frozen_step": self.frozen_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.state_dict():
            if key in state:
                setattr(self, key, state[key])
