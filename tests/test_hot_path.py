"""The per-request fast paths give exactly what the plain implementations they replaced gave."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway import logs
from gateway.config import ConfigError, load_settings


def test_access_log_switch(tmp_path: Path) -> None:
    (tmp_path / "on.yaml").write_text("{}\n")
    (tmp_path / "off.yaml").write_text("logging: {access: false}\n")
    (tmp_path / "bad.yaml").write_text("logging: {access: maybe}\n")
    assert load_settings(tmp_path / "on.yaml", {})[0].access_log is True
    assert load_settings(tmp_path / "off.yaml", {})[0].access_log is False
    with pytest.raises(ConfigError, match=r"logging\.access"):
        load_settings(tmp_path / "bad.yaml", {})
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.logProcesses
    access = logging.getLogger("costwall.access")
    try:
        logs.configure("text", "INFO", access=False)
        assert not access.isEnabledFor(logging.INFO) and access.isEnabledFor(logging.WARNING)
        logs.configure("json", "INFO")
        assert access.isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], logging.logProcesses = saved[0], saved[2]
        root.setLevel(saved[1])
        access.setLevel(logging.NOTSET)
