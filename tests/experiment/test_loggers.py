import pytest

import scl_lightning.experiment.loggers as loggers_module
from scl_lightning.experiment.loggers import WandbLogger, wandb_credentials_available

NETRC_ENTRY = "machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n"


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """A home directory with no netrc and no W&B variables (WANDB_MODE is restored afterwards
    by the autouse fixture in conftest)."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# -- wandb_credentials_available ------------------------------------------------------------------


def test_no_credentials(no_credentials):
    assert wandb_credentials_available() is False


@pytest.mark.parametrize(("value", "expected"), [("0123456789abcdef", True), ("", False)])
def test_api_key_variable(no_credentials, monkeypatch, value, expected):
    monkeypatch.setenv("WANDB_API_KEY", value)
    assert wandb_credentials_available() is expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (NETRC_ENTRY, True),
        ("machine example.com login user password secret\n", False),  # another host only
        ("machine api.wandb.ai login user\n", False),  # no key
        ("machine\n", False),  # unparsable
    ],
)
def test_netrc_in_home(no_credentials, content, expected):
    (no_credentials / ".netrc").write_text(content)
    assert wandb_credentials_available() is expected


def test_netrc_variable(no_credentials, monkeypatch, tmp_path):
    path = tmp_path / "elsewhere" / "netrc"
    path.parent.mkdir()
    path.write_text(NETRC_ENTRY)
    monkeypatch.setenv("NETRC", str(path))
    assert wandb_credentials_available() is True
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    assert wandb_credentials_available() is False


@pytest.mark.parametrize(
    ("host", "expected"), [("wandb.example.com", True), ("api.wandb.ai", False)]
)
def test_netrc_for_a_custom_server(no_credentials, monkeypatch, host, expected):
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com/")
    (no_credentials / ".netrc").write_text(f"machine {host} login user password key\n")
    assert wandb_credentials_available() is expected


# -- WandbLogger ----------------------------------------------------------------------------------


@pytest.fixture
def infos(monkeypatch):
    messages = []
    monkeypatch.setattr(loggers_module, "rank_zero_info", messages.append)
    return messages


def test_offline_without_credentials(no_credentials, tmp_path, infos):
    save_dir = tmp_path / "runs"
    logger = WandbLogger(save_dir=save_dir)
    assert logger._offline is True
    assert logger._experiment is None, "constructing the logger must not start a run"
    assert save_dir.is_dir()
    assert logger._wandb_init["dir"] == str(save_dir)
    assert logger._wandb_init["project"] == "scl-lightning"
    assert len(infos) == 1
    assert "no credentials found" in infos[0] and "wandb sync" in infos[0]


def test_online_with_credentials(no_credentials, monkeypatch, tmp_path, infos):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert WandbLogger(save_dir=tmp_path)._offline is False
    (no_credentials / ".netrc").write_text(NETRC_ENTRY)
    monkeypatch.delenv("WANDB_API_KEY")
    assert WandbLogger(save_dir=tmp_path)._offline is False
    assert infos == []


@pytest.mark.parametrize(
    ("mode", "api_key", "expected"),
    [
        ("offline", "0123456789abcdef", True),
        ("dryrun", "0123456789abcdef", True),
        ("online", None, False),
        ("disabled", None, True),
    ],
)
def test_wandb_mode_variable_wins(
    no_credentials, monkeypatch, tmp_path, infos, mode, api_key, expected
):
    monkeypatch.setenv("WANDB_MODE", mode)
    if api_key:
        monkeypatch.setenv("WANDB_API_KEY", api_key)
    assert WandbLogger(save_dir=tmp_path)._offline is expected
    assert infos == []  # the user chose the mode: nothing to explain


@pytest.mark.parametrize("offline", [True, False])
def test_explicit_offline(no_credentials, tmp_path, offline):
    # offline=False forces online even without credentials (wandb then asks for them)
    assert WandbLogger(save_dir=tmp_path, offline=offline)._offline is offline


def test_wandb_is_not_asked_for_the_deprecated_anonymous_setting(no_credentials, tmp_path):
    """Lightning passes ``anonymous=None`` to ``wandb.init`` when it is not asked for, and W&B
    then prints "WARNING The anonymous setting has no effect" on every run: it is not passed
    unless the user sets it."""
    assert "anonymous" not in WandbLogger(save_dir=tmp_path, offline=True)._wandb_init
    asked = WandbLogger(save_dir=tmp_path, offline=True, anonymous=True)
    assert asked._wandb_init["anonymous"] == "allow"


def test_automatic_offline_turns_log_model_off(tmp_path, monkeypatch):
    """Lightning refuses log_model with an offline run; when offline was decided for lack of
    credentials, the logger drops log_model instead of failing."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    logger = WandbLogger(save_dir=tmp_path, log_model=True)
    assert logger._offline and logger._log_model is False
    with pytest.raises(Exception, match="log_model=True and offline=True"):
        WandbLogger(save_dir=tmp_path, log_model=True, offline=True)  # the user's own choice
