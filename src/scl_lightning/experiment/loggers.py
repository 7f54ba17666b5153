"""Loggers: a W&B logger that runs offline by itself when no credentials are set."""

from __future__ import annotations

import csv
import netrc
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

__all__ = ["CSVLogger", "WandbLogger", "wandb_credentials_available"]


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that appends to the ``metrics.csv`` of a resumed run.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts in a directory that has
    one, so a run resumed in its own directory (``scl fit ... --ckpt_path last``) would lose the
    rows of everything before the resume. This one keeps them and appends, adding columns if new
    metrics appear. ``scl fit`` uses it in place of Lightning's whenever it resumes. Arguments are
    Lightning's.

    Example::

        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> first = CSVLogger(root, name="run", version=0)
        >>> first.log_metrics({"loss": 1.0}, step=0); first.save()
        >>> again = CSVLogger(root, name="run", version=0)  # the same run, resumed
        >>> again.log_metrics({"loss": 0.5, "acc": 0.9}, step=1); again.save()
        >>> print(open(again.experiment.metrics_file_path).read().strip())
        acc,loss,step
        ,1.0,0
        0.9,0.5,1
    """

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        metrics = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        kept = metrics.with_name(f".{metrics.name}.resume")
        if metrics.is_file():
            os.replace(metrics, kept)  # out of the writer's reach while it starts
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                writer = ExperimentWriter(log_dir=self.log_dir)
        finally:
            if kept.is_file():
                os.replace(kept, metrics)
        if metrics.is_file():
            with metrics.open(newline="") as file:
                writer.metrics_keys = sorted(next(csv.reader(file), []))
        self._experiment = writer
        return writer


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
        init_timeout: seconds to wait for the W&B server when online. When the server cannot be
            reached or refuses the credentials, the run continues offline and a warning says so
            (one line, with W&B's reason).
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
        init_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        # LightningCLI passes every wandb.init option it knows, unset ones as None: drop those,
        # so they neither hide `settings` below nor override Lightning's own defaults
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
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
        if not offline and "settings" not in kwargs:
            # an unreachable server fails in init_timeout seconds (W&B's default is 90), and the
            # run then goes on offline (see `experiment`)
            kwargs["settings"] = {"init_timeout": float(init_timeout)}
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
        if self._wandb_init.get("anonymous") is None:
            # Lightning passes `anonymous=None` when it is not asked for, which W&B (0.19+)
            # answers on every run with "WARNING The anonymous setting has no effect"
            self._wandb_init.pop("anonymous", None)

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> Any:
        start = _LightningWandbLogger.experiment.fget  # type: ignore[attr-defined]
        if self._experiment is not None or self._offline:
            return start(self)
        try:
            return start(self)
        except Exception as err:
            import wandb

            if not isinstance(err, wandb.errors.Error):
                raise
            reason = " ".join(str(err).split()) or type(err).__name__
            if len(reason) > 240:
                reason = reason[:240].rsplit(" ", 1)[0] + " ..."
            rank_zero_warn(
                f"W&B: cannot start an online run ({reason}); continuing offline under "
                f"{Path(self.save_dir or '.') / 'wandb'}; upload later with `wandb sync` (the "
                "wait is the logger's init_timeout)"
            )
            self._offline = True
            self._log_model = False
            self._wandb_init["mode"] = "offline"
            self._wandb_init.pop("settings", None)
            self._experiment = None
            return start(self)
