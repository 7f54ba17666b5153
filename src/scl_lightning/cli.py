"""Deprecated alias of :mod:`scl_lightning.experiment.cli` (removed in 0.3)."""

from scl_lightning._deprecation import deprecated_module

__getattr__, __dir__, __all__ = deprecated_module(
    "scl_lightning.cli", "scl_lightning.experiment.cli"
)

if __name__ == "__main__":  # `python -m scl_lightning.cli`
    import warnings

    warnings.warn(
        "python -m scl_lightning.cli is deprecated; use the `scl` command or "
        "python -m scl_lightning.experiment.cli (removed in 0.3)",
        DeprecationWarning,
        stacklevel=1,
    )
    from scl_lightning.experiment.cli import main

    main()
