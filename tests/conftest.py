import pytest


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """Keep tests from reaching W&B and from leaking environment variables set by Lightning.

    ``seed_everything`` writes ``PL_GLOBAL_SEED`` and Lightning's offline ``WandbLogger`` writes
    ``WANDB_MODE``; recording both here makes monkeypatch restore them after every test.
    """
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    monkeypatch.delenv("PL_GLOBAL_SEED")
