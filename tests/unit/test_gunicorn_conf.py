"""conf/gunicorn.conf.py takes its settings from the service it serves (read in process, no gunicorn started)."""

from __future__ import annotations

import json
import runpy

import pytest

from tests.support.procs import GUNICORN_CONF, service_config


def test_settings_follow_the_service(tmp_path, monkeypatch):
    config = {"services": [
        service_config("http://127.0.0.1:1", tmp_path / "c.json", tag="a", listen_port=18080),
        service_config("http://127.0.0.1:1", tmp_path / "c.json", tag="b", listen="::1", listen_port=18081,
                       shutdown_grace="10m"),
    ]}
    path = tmp_path / "two.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("CCM_CONFIG", str(path))
    monkeypatch.delenv("CCM_BIND", raising=False)
    monkeypatch.setenv("CCM_SERVICE", "b")
    settings = runpy.run_path(str(GUNICORN_CONF))
    assert settings["bind"] == ["[::1]:18081"] and settings["graceful_timeout"] == 600 + 5  # grace + stop margin
    assert settings["worker_class"] == "gevent" and settings["preload_app"] is False
    assert settings["max_requests"] == 0 and callable(settings["worker_exit"])
    monkeypatch.setenv("CCM_SERVICE", "a")
    settings = runpy.run_path(str(GUNICORN_CONF))
    assert settings["bind"] == ["127.0.0.1:18080"] and settings["graceful_timeout"] == 30 + 5
    monkeypatch.delenv("CCM_SERVICE")
    with pytest.raises(SystemExit):  # two services and no CCM_SERVICE
        runpy.run_path(str(GUNICORN_CONF))
