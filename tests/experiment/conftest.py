"""Fixtures shared by the tests of the ``scl`` command."""

import sys

import pytest


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["scl"])  # LightningCLI warns when both are given
    return tmp_path
