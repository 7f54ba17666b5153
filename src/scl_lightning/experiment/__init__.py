"""Running experiments: the ``scl`` command, checkpoint IO, exact resume, non-finite stop, rank
agreement, run summary, W&B artifacts and loggers, ``load_sparse`` (a module trained with SCL,
rebuilt outside a Trainer), and ``scl report``.

Everything here serves runs of the ``scl`` CLI, and is usable in a Trainer of your own::

    from scl_lightning.experiment import ExactResume, SafeCheckpointIO, StopOnNonFinite

    trainer = Trainer(plugins=[SafeCheckpointIO()], callbacks=[ExactResume(), StopOnNonFinite()])

The command itself is :func:`scl_lightning.experiment.cli.main` (``scl``) and the report
:mod:`scl_lightning.experiment.report` (``scl report``); they are not imported here, so that
using a callback does not load the CLI. Nothing outside this package imports it.
"""

from scl_lightning.experiment.checkpoint import (
    CheckpointError,
    SafeCheckpointIO,
    atomic_torch_save,
    check_compatible,
    load_checkpoint,
)
from scl_lightning.experiment.exact_resume import ExactResume, rng_state, set_rng_state
from scl_lightning.experiment.loggers import CSVLogger, WandbLogger, wandb_credentials_available
from scl_lightning.experiment.non_finite import (
    NonFiniteError,
    StopOnNonFinite,
    finite_flag,
    non_finite_kind,
)
from scl_lightning.experiment.rank_agreement import (
    RankAgreementCheck,
    RankDivergenceError,
    divergence_message,
    parameter_fingerprints,
)
from scl_lightning.experiment.reload import load_sparse
from scl_lightning.experiment.run_summary import RunSummary, format_summary
from scl_lightning.experiment.wandb_artifacts import WandbArtifacts

__all__ = [
    "CSVLogger",
    "CheckpointError",
    "ExactResume",
    "NonFiniteError",
    "RankAgreementCheck",
    "RankDivergenceError",
    "RunSummary",
    "SafeCheckpointIO",
    "StopOnNonFinite",
    "WandbArtifacts",
    "WandbLogger",
    "atomic_torch_save",
    "check_compatible",
    "divergence_message",
    "finite_flag",
    "format_summary",
    "load_checkpoint",
    "load_sparse",
    "non_finite_kind",
    "parameter_fingerprints",
    "rng_state",
    "set_rng_state",
    "wandb_credentials_available",
]
