"""The crash harness itself: a test that segfaults in native code fails alone, named, with its signal."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parents[1] / "support"   # crash_harness.py

VICTIMS = '''
import ctypes, os, signal

def test_before():
    assert 1 + 1 == 2

def test_segfaults_in_native_code():
    ctypes.string_at(0)          # a NULL read inside libc: SIGSEGV

def test_aborts():
    os.abort()

def test_after():
    assert sum(range(4)) == 6
'''


def test_native_crash_fails_that_test_only(tmp_path):
    (tmp_path / "test_victims.py").write_text(VICTIMS)
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(SUPPORT)!r})\n"
        "from crash_harness import pytest_configure, pytest_handlecrashitem, pytest_runtest_logstart, "
        "pytest_sessionstart  # noqa\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider", "-q", "-rf",
                        "--rootdir", str(tmp_path), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "2 failed, 2 passed" in r.stdout, out
    # the report itself (stdout; the workers' stderr is elsewhere) names each test and its signal
    failures = r.stdout.split("= FAILURES =", 1)[1]
    seg, abrt = (failures.split(f"crashed while running 'test_victims.py::{n}'", 1)[1].split("____", 1)[0]
                 for n in ("test_segfaults_in_native_code", "test_aborts"))
    assert "Fatal Python error: Segmentation fault" in seg and "test_victims.py\", line 8" in seg, out
    assert "Fatal Python error: Aborted" in abrt, out
