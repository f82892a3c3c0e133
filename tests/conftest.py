"""Shared fixtures: every test runs with its own empty data cache and no downloads."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLKIT_DATA", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(2)
