"""Fixtures of the `ponder view` browser tests (tests/e2e/test_view*.py), one per
session: the store a real sweep wrote on the shipped models, its server, one Chromium."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browser import available, chromium, served
from viewing import TWO_MODELS, ponder_cli

@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("view")
    (folder / "sweep.toml").write_text(TWO_MODELS)
    db = folder / "results.sqlite"
    r = ponder_cli("sweep", str(folder / "sweep.toml"), "--db", str(db), "--report", "")
    assert r.returncode == 0, r.stderr
    return db


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("PONDER_ARTIFACTS") or tmp_path_factory.mktemp("view-shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="session")
def server(store):
    with served(store) as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    if not available():
        pytest.fail("these tests need Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    d = chromium()
    yield d
    d.quit()
