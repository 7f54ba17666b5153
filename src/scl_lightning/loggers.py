"""Loggers: a W&B logger that runs offline by itself when no credentials are set."""

from __future__ import annotations

import netrc
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["WandbLogger", "active_wandb_loggers", "wandb_credentials_available"]


def active_wandb_loggers(loggers: Iterable[Logger]) -> list[_LightningWandbLogger]:
    """The W&B loggers among ``loggers`` (Lightning's ``WandbLogger`` or a subclass) whose run is
    not disabled (``WANDB_MODE=disabled``).

    Call it on rank zero only: it starts each logger's W&B run (``logger.experiment``) if the
    run has not started yet. Needs no ``import wandb`` when no W&B logger is present.
    """
    return [
        logger
        for logger in loggers
        if isinstance(logger, _LightningWandbLogger)
        and not getattr(logger.experiment, "disabled", False)
    ]


def wandb_credentials_available() -> bool:
    """Whether W&B could log online: ``WANDB_API_KEY`` is set or ``wandb login`` stored a key."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        auth = netrc.netrc(netrc_path)
    except (OSError, netrc.NetrcParseError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    entry = auth.authenticators(host)
    # the API key is the password; an entry without one is not a login wandb can use
    return entry is not None and bool(entry[2])


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``offline`` decided by itself.

    With ``offline=None`` (the default) the run is online when credentials exist
    (``WANDB_API_KEY`` or ``wandb login``) and offline otherwise, so the default works with no
    account and no network; ``WANDB_MODE`` set in the environment wins over both. An offline run
    is kept under ``<save_dir>/wandb/offline-run-*`` and uploaded later with ``wandb sync``.

    Args:
        name, save_dir, version, project, log_model, prefix: as for Lightning's ``WandbLogger``.
        offline: ``True``/``False`` forces the mode; ``None`` decides from the credentials.
        **kwargs: passed on to Lightning's ``WandbLogger`` (and ``wandb.init``).

    Example::

        >>> logger = WandbLogger(project="scl", offline=True, save_dir="runs")  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | Path = "runs",
        version: str | None = None,
        offline: bool | None = None,
        project: str | None = "scl-lightning",
        log_model: Literal["all"] | bool = False,
        prefix: str = "",
        **kwargs: Any,
    ) -> None:
        env_mode = os.environ.get("WANDB_MODE")
        if offline is None:
            offline = env_mode in ("offline", "dryrun") or (
                env_mode != "online" and not wandb_credentials_available()
            )
            if offline and env_mode is None:
                rank_zero_info(
                    "W&B: no credentials found (WANDB_API_KEY or `wandb login`); logging offline "
                    f"under {Path(save_dir) / 'wandb'}. Upload later with `wandb sync`."
                )
            if offline and log_model:
                # Lightning refuses log_model with an offline run; offline was our choice, not
                # the user's, so drop checkpoint uploads rather than fail (WandbArtifacts still
                # stores the final checkpoint with the offline run).
                rank_zero_info(
                    "W&B: running offline, so log_model is turned off; the final checkpoint is "
                    "still stored with the run by the WandbArtifacts callback of `scl fit`."
                )
                log_model = False
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            name=name,
            save_dir=save_dir,
            version=version,
            offline=offline,
            project=project,
            log_model=log_model,
            prefix=prefix,
            **kwargs,
        )
