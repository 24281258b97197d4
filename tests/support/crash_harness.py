"""A native crash (segfault, abort) in one test fails that test, with its name and the signal, and the run
goes on: `make test` runs pytest under pytest-xdist (`-n 1`), whose controller notices a worker that died,
reports the test it was running as failed and starts a new worker for the rest. This plugin adds what
xdist leaves out, the signal and where it happened: each worker writes faulthandler's report (signal name,
Python stack of every thread) to a file of its own, and the controller puts that file into the crashed
test's failure. pytest-timeout (thread method) turns a hang into the same kind of failure.

Loaded from conftest.py; tests/tools/test_crash_harness.py runs it on a test that segfaults.
"""
from __future__ import annotations

import faulthandler
import os
import tempfile
import time
from pathlib import Path

import pytest

_ENV = "MCMOE_CRASH_DIR"
_files: list = []      # keep the worker's report file open for the life of the process


def pytest_configure(config):
    # the controller (or a run without xdist) makes a fresh directory for its workers, passed on through
    # the environment. Worker or not is decided by xdist's config.workerinput, not by inherited variables:
    # a pytest started from inside a test (tests/tools/test_crash_harness.py) inherits PYTEST_XDIST_WORKER and
    # this directory from the outer worker, and took itself for a worker of the outer run, sharing (and
    # truncating, in the hook below) its own workers' report files.
    if not hasattr(config, "workerinput"):
        os.environ[_ENV] = tempfile.mkdtemp(prefix="mcmoe-crash-")


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    # after pytest's own faulthandler plugin, which points faulthandler at stderr
    workerinput = getattr(session.config, "workerinput", None)
    if workerinput is None or _ENV not in os.environ:
        return
    # append mode: every write lands at the current end, so after the per-test truncation below the
    # report starts at offset 0 (a plain "w" file kept faulthandler's old offset: NULs, then the report)
    f = open(Path(os.environ[_ENV]) / f"{workerinput['workerid']}.log", "a")
    _files.append(f)
    faulthandler.enable(file=f, all_threads=True)


def pytest_runtest_logstart(nodeid, location):
    # a restarted worker may reuse its id: start each test's report afresh so an old crash is not repeated
    # (workers only: _files is empty in the controller, which sees this hook too, late, for every test)
    for f in _files:
        os.ftruncate(f.fileno(), 0)


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    d = os.environ.get(_ENV)
    worker = getattr(getattr(report.node, "gateway", None), "id", None)
    if not d or not worker:
        return
    log = Path(d) / f"{worker}.log"
    # xdist can notice the dead worker before the file shows what its signal handler wrote: wait a little
    deadline = time.monotonic() + 5.0
    text = ""
    while not text and time.monotonic() < deadline:
        text = log.read_text(errors="replace").strip() if log.exists() else ""
        if not text:
            time.sleep(0.05)
    # the frames that matter are the test's: drop pytest's, pluggy's and xdist's own machinery
    noise = ("/_pytest/", "/pluggy/", "/xdist/", "/execnet/", '"<string>"')
    text = "\n".join(ln for ln in text.splitlines() if not any(n in ln for n in noise))
    report.longrepr = f"{report.longrepr}\n" + (text or "no faulthandler report (killed by SIGKILL: out of memory?)")
