"""Deprecated: moved to :mod:`scl_lightning.experiment.report`; this alias is removed in 0.3."""

from scl_lightning._deprecation import deprecated_module

__getattr__, __dir__, __all__ = deprecated_module(
    "scl_lightning.report", "scl_lightning.experiment.report"
)

if __name__ == "__main__":  # `python -m scl_lightning.report RUN_DIR`
    import warnings

    warnings.warn(
        "python -m scl_lightning.report is deprecated; use `scl report` or "
        "python -m scl_lightning.experiment.report (removed in 0.3)",
        DeprecationWarning,
        stacklevel=1,
    )
    from scl_lightning.experiment.report import main

    raise SystemExit(main())
