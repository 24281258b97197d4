"""The PMQ work directory (quant/workdir.py): its files, atomic writes and the errors a user sees."""
from __future__ import annotations

import json

import pytest
import torch

from mcmoe_gguf.quant.workdir import WorkDir, WorkdirMismatch


def test_open_creates_the_layout_and_checks_the_run(tmp_path):
    wd = WorkDir(tmp_path / "w")
    m = {"model_dir": "/m", "config": {"budget": "2.5"}, "format": 1}
    wd.open(m)
    assert {p.name for p in wd.path.iterdir()} == {"stats", "layers", "state", "manifest.json"}
    assert wd.manifest() == m and wd.config() == {"budget": "2.5"} and str(wd.model_dir()) == "/m"
    wd.open(m)                                                      # the same run: resumes
    with pytest.raises(WorkdirMismatch, match="other settings"):
        wd.open({**m, "config": {"budget": "3"}})
    # a caller's notion of "same" (pmq fills in fields added since a manifest was written)
    wd.open({**m, "config": {"budget": "2.5", "new": 1}}, same=lambda old, new: {**old["config"], "new": 1} == new["config"])


def test_writes_are_atomic_and_reads_come_back(tmp_path):
    wd = WorkDir(tmp_path)
    wd.open({"model_dir": "/m", "config": {}})
    wd.save({"layer": 0, "bits": [1, 2], "tensors": {"a": torch.arange(3)}}, wd.layer_path(0))
    wd.save({"mu": 0.5}, wd.stats_path(0), as_json=True)
    wd.save(torch.ones(2), wd.state_path(1))
    assert not list(tmp_path.rglob("*.tmp"))
    assert wd.has_layer(0) and not wd.has_layer(1)
    assert torch.equal(wd.load_layer(0)["tensors"]["a"], torch.arange(3))
    assert wd.load_stats(0) == {"mu": 0.5} and wd.all_stats() == [{"mu": 0.5}]
    assert wd.layer_files() == [wd.layer_path(0)]
    wd.drop_state(1)
    wd.drop_state(1)                                                # already gone: fine
    assert not wd.state_path(1).exists()
    assert not wd.is_finished()
    wd.save({"bits": [[1, 2]]}, wd.allocation_path, as_json=True)
    assert wd.is_finished() and wd.allocation() == {"bits": [[1, 2]]}
    assert json.loads(wd.allocation_path.read_text()) == {"bits": [[1, 2]]}
    assert WorkDir.of(wd) is wd and WorkDir.of(tmp_path).path == tmp_path


def test_missing_files_name_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PMQ work directory"):
        WorkDir(tmp_path).manifest()
    with pytest.raises(FileNotFoundError, match="run `mcmoe-gguf quantize` to completion"):
        WorkDir(tmp_path).allocation()
