"""`mcmoe-gguf inspect OUTDIR`: the allocation at a glance (table + heatmap like the paper's Fig. 10)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mcmoe_gguf.gguf import keys as K
from mcmoe_gguf.quant.workdir import WorkDir


def load_workdir(outdir: Path) -> tuple[dict, list[dict], dict]:
    """(allocation, per-layer statistics, manifest) of a finished PMQ work directory."""
    wd = WorkDir(outdir)
    return wd.allocation(), wd.all_stats(), wd.manifest()


def _expert_bpw(alloc: dict, hp) -> np.ndarray:
    """[L, E] real bpw of each expert (its three projections) from allocation.json's types."""
    from mcmoe_gguf.quant.budget import expert_bytes_by_type, expert_params, recorded_types
    return 8 * expert_bytes_by_type(hp, recorded_types(alloc)) / expert_params(hp)


def _describe_ladder(outdir: Path, alloc: dict, stats: list[dict], manifest: dict) -> str:
    from collections import Counter

    from mcmoe_gguf.model.checkpoint import Checkpoint
    cfg = manifest["config"]
    types = np.array(alloc["types"], dtype=object)
    bpw = _expert_bpw(alloc, Checkpoint(manifest["model_dir"]).hp)
    share = Counter(types.ravel())
    lines = [f"{outdir}: PMQ of {manifest['model_dir']}",
             f"  budget {cfg['budget']} ({cfg['scope']} scope, ladder {cfg['ladder']} per {cfg['granularity']}, "
             f"{cfg['method']}), alpha={cfg['alpha']} beta={cfg['beta']} gamma={cfg['gamma']}",
             f"  experts: {alloc['expert_bytes']:,} bytes = {alloc['expert_bpw']:.4f} real bpw; "
             f"whole model: {alloc['total_bytes']:,} bytes = {alloc['total_bpw']:.4f} real bpw",
             "  projections per type: " + ", ".join(f"{t} {c}" for t, c in share.most_common()),
             "  types per expert (rows: layer, projection; columns: experts), then each expert's real bpw"]
    for l in range(types.shape[0]):
        for p, name in enumerate(("gate", "up", "down")):
            lines.append(f"  {l:3d} {name:<4s} | " + " ".join(f"{t:<7s}" for t in types[l, :, p]))
        lines.append(f"  {l:3d} bpw  | " + " ".join(f"{b:<7.3f}" for b in bpw[l]) + f" | mu {alloc['mu'][l]:.3f}")
    return "\n".join(lines)


def describe(outdir: Path) -> str:
    alloc, stats, manifest = load_workdir(outdir)
    if alloc.get("bits", True) is None:       # a ladder's choice: types per projection, not widths per expert
        return _describe_ladder(outdir, alloc, stats, manifest)
    cfg = manifest["config"]
    bits = np.array(alloc["bits"])
    lines = [f"{outdir}: PMQ of {manifest['model_dir']}",
             f"  budget {cfg['budget']} ({cfg['scope']} scope, strategy {cfg['strategy']}, {cfg['method']}), "
             f"alpha={cfg['alpha']} beta={cfg['beta']} gamma={cfg['gamma']}",
             f"  experts: {alloc['expert_bytes']:,} bytes = {alloc['expert_bpw']:.4f} real bpw; "
             f"whole model: {alloc['total_bytes']:,} bytes = {alloc['total_bpw']:.4f} real bpw",
             "  bits per expert (rows: layers; columns: experts); share of 1/2/3-bit experts: "
             + " / ".join(f"{(bits == b).mean():.0%}" for b in (1, 2, 3)),
             "  layer | " + " ".join(f"e{e:<2d}" for e in range(bits.shape[1])) + " |   mu   | phi min..max   | eps(2b) min..max"]
    for l, row in enumerate(bits):
        s = stats[l]
        eps2 = [e[1] for e in s["eps"]]
        lines.append(f"  {l:5d} | " + " ".join(f"{b:<3d}" for b in row) +
                     f" | {alloc['mu'][l]:.3f} | {min(s['phi']):.3f}..{max(s['phi']):.3f} | "
                     f"{min(eps2):.3g}..{max(eps2):.3g}")
    return "\n".join(lines)


def heatmap(outdir: Path, png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    alloc, _, manifest = load_workdir(outdir)
    if alloc.get("bits", True) is None:
        return _heatmap_bpw(alloc, manifest, png)
    bits = np.array(alloc["bits"])
    fig, ax = plt.subplots(figsize=(1 + 0.5 * bits.shape[1], 1 + 0.35 * bits.shape[0]))
    im = ax.imshow(bits, cmap=plt.get_cmap("viridis", 3), vmin=0.5, vmax=3.5, aspect="auto")
    for (l, e), b in np.ndenumerate(bits):
        ax.text(e, l, str(b), ha="center", va="center", color="white" if b == 1 else "black", fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"PMQ bits, {alloc['expert_bpw']:.3f} real expert bpw ({manifest['config']['scope']} scope)")
    fig.colorbar(im, ticks=[1, 2, 3], label="bits")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _heatmap_bpw(alloc: dict, manifest: dict, png: Path) -> Path:
    """A ladder's choice: each expert's real bpw (its three projections' types together)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcmoe_gguf.model.checkpoint import Checkpoint
    bpw = _expert_bpw(alloc, Checkpoint(manifest["model_dir"]).hp)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * bpw.shape[1], 1 + 0.35 * bpw.shape[0]))
    im = ax.imshow(bpw, cmap="viridis", aspect="auto")
    for (l, e), b in np.ndenumerate(bpw):
        ax.text(e, l, f"{b:.2f}", ha="center", va="center", color="white" if b < bpw.mean() else "black", fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"PMQ ladder {manifest['config']['ladder']}: real bpw per expert, {alloc['expert_bpw']:.3f} overall")
    fig.colorbar(im, label="real bpw")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


_EXPERT = r"blk\.(\d+)\.ffn_(gate|up|down)(?:\.(\d+)|_exps)\.weight"


def read_gguf(path: Path):
    """gguf.GGUFReader of a file that passed the bounded structural check (gguf_check)."""
    from mcmoe_gguf.gguf.check import checked_reader
    return checked_reader(path)


def gguf_sizes(path: Path) -> dict:
    """Real bytes and parameter counts of a GGUF's tensors, for the whole file and for the experts."""
    import re
    rd = read_gguf(path)
    exp = [t for t in rd.tensors if re.fullmatch(_EXPERT, t.name)]
    total_b, total_p = sum(int(t.n_bytes) for t in rd.tensors), sum(int(t.n_elements) for t in rd.tensors)
    exp_b, exp_p = sum(int(t.n_bytes) for t in exp), sum(int(t.n_elements) for t in exp)
    return {"bytes": total_b, "params": total_p, "bpw": 8 * total_b / total_p, "expert_bytes": exp_b,
            "expert_params": exp_p, "expert_bpw": 8 * exp_b / exp_p if exp_p else float("nan")}


def describe_gguf(path: Path) -> str:
    """Tensor types per layer and expert of a GGUF file (ours or stock), with real bytes."""
    import re
    rd = read_gguf(path)
    kv = {f.name: f.contents() for f in rd.fields.values()}
    z = gguf_sizes(path)
    lines = [f"{path}: {kv.get('general.architecture')} '{kv.get('general.name')}', {len(rd.tensors)} tensors, "
             f"{z['bytes']:,} tensor bytes = {z['bpw']:.4f} real bpw"]
    if z["expert_params"]:
        lines.append(f"  experts: {z['expert_bytes']:,} bytes = {z['expert_bpw']:.4f} real bpw")
    experts: dict[int, dict[int, str]] = {}
    for t in rd.tensors:
        m = re.fullmatch(_EXPERT, t.name)
        if m and m.group(3) is not None:
            experts.setdefault((int(m.group(1)), m.group(2)), {})[int(m.group(3))] = t.tensor_type.name
    # one line per layer when every expert has one type in all projections (mcq widths, stock), else three
    same = all(experts.get((l, p)) == experts.get((l, "gate")) for l, _ in experts for p in ("up", "down"))
    for l, p in sorted((k for k in experts if not same or k[1] == "gate"),
                       key=lambda k: (k[0], ("gate", "up", "down").index(k[1]))):
        row = experts[(l, p)]
        label = f"  layer {l:3d}: " if same else f"  layer {l:3d} {p:<4s}: "
        lines.append(label + " ".join(f"{row[e]:<7s}" for e in sorted(row)))
    if K.ODP_MU in kv:
        lines.append("  ODP mu per layer: " + " ".join(f"{m:.3f}" for m in kv[K.ODP_MU]))
    return "\n".join(lines)
