"""The server is safe by default: it listens on 127.0.0.1 only, and remote code needs the server's flag."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from headlab.ui.server_options import ALLOW_REMOTE_CODE_ENV, remote_code_allowed
from tests.browser import connects, free_port
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
TRUST_LABEL = "Allow the model's own code (trust_remote_code)"




def test_make_app_listens_on_loopback_only():
    """`make app` (the documented start command) answers on 127.0.0.1 and refuses 127.0.0.2."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "HEADLAB_ADDRESS"}
    proc = subprocess.Popen(["make", "-s", "app", f"PY={sys.executable}", f"HEADLAB_PORT={port}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not connects("127.0.0.1", port):
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.5)
        assert connects("127.0.0.1", port), "the app did not start listening within 60 s"
        # Another loopback address reaches every socket bound to 0.0.0.0 or *, but not one bound to 127.0.0.1.
        assert not connects("127.0.0.2", port), "the server answers on an address other than 127.0.0.1"
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout if _has("ss") else ""
        if listening:
            ours = [line for line in listening.splitlines() if line.split()[3].endswith(f":{port}")]
            assert ours and all(line.split()[3] == f"127.0.0.1:{port}" for line in ours), ours
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)


def _has(tool: str) -> bool:
    return subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode == 0


def test_config_turns_off_usage_statistics_and_binds_loopback():
    config = (ROOT / ".streamlit" / "config.toml").read_text()
    assert 'address = "127.0.0.1"' in config and "gatherUsageStats = false" in config


def test_remote_code_is_allowed_only_by_the_server_flag():
    assert not remote_code_allowed([], {})
    assert remote_code_allowed(["--allow-remote-code"], {})
    assert remote_code_allowed([], {ALLOW_REMOTE_CODE_ENV: "1"})
    assert not remote_code_allowed(["--other"], {ALLOW_REMOTE_CODE_ENV: "0"})


@pytest.mark.parametrize("allowed", [False, True])
def test_sidebar_offers_the_remote_code_switch_only_when_the_server_allows_it(allowed, monkeypatch, tmp_path):
    save_tiny(tmp_path, "llama")
    monkeypatch.setenv("HEADLAB_MODEL", str(tmp_path))
    if allowed:
        monkeypatch.setenv(ALLOW_REMOTE_CODE_ENV, "1")
    else:
        monkeypatch.delenv(ALLOW_REMOTE_CODE_ENV, raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    assert not at.exception
    labels = [c.label for c in at.sidebar.checkbox]
    assert (TRUST_LABEL in labels) == allowed, labels
