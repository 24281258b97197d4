"""README's status numbers occur in docs/RESULTS.md (scripts/readme_status.py), and the check catches drift."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import readme_status  # noqa: E402

README = "# x\n\n## Status (see RESULTS)\n\n- ODP: 26.6-26.8% skipped = 0.82x prompt time; 14 CPU modules, +0.4% PPL\n\n## Next\n1.23x\n"


def test_readme_status_matches_results():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "readme_status.py")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout


def test_numbers_of_the_status_section_only():
    assert readme_status.numbers(readme_status.status_section(README)) == ["26.6", "26.8", "0.82", "0.4"]


def test_drift_is_reported():
    results = "| on | 26.6% | 0.82x |\n| mu | 26.8% | +0.4% |\n"
    assert readme_status.missing(README, results) == []
    assert readme_status.missing(README.replace("0.82x", "0.80x"), results) == ["0.80"]
    assert readme_status.missing(README, results.replace("26.8", "27.0")) == ["26.8"]
