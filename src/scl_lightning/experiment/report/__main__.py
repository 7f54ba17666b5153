"""``python -m scl_lightning.experiment.report RUN_DIR``, the same as ``scl report RUN_DIR``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
