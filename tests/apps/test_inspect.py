"""`mcmoe-gguf inspect` of a PMQ work directory: the table shows the allocation as stored."""
from __future__ import annotations

import json

from mcmoe_gguf.apps.inspect import describe, heatmap


def test_describe_shows_the_stored_allocation(micro):
    wd = micro["u2"]
    alloc = json.loads((wd / "allocation.json").read_text())
    text = describe(wd)
    rows = [l for l in text.splitlines() if l.strip()[:1].isdigit() and "|" in l]
    assert len(rows) == len(alloc["bits"])
    for l, (row, bits) in enumerate(zip(rows, alloc["bits"])):
        cells = row.split("|")
        assert int(cells[0]) == l
        assert [int(b) for b in cells[1].split()] == bits
        assert float(cells[2]) == round(alloc["mu"][l], 3)
    assert f"{alloc['expert_bytes']:,} bytes" in text and "100%" in text     # uniform 2 bits: all of one width


def test_heatmap_is_a_png(micro, tmp_path):
    png = heatmap(micro["u2"], tmp_path / "bits.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
