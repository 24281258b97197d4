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


def describe(outdir: Path) -> str:
    alloc, stats, manifest = load_workdir(outdir)
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
        if m and m.group(3) is not None and m.group(2) == "gate":
            experts.setdefault(int(m.group(1)), {})[int(m.group(3))] = t.tensor_type.name
    for l in sorted(experts):
        row = experts[l]
        lines.append(f"  layer {l:3d}: " + " ".join(f"{row[e]:<5s}" for e in sorted(row)))
    if K.ODP_MU in kv:
        lines.append("  ODP mu per layer: " + " ".join(f"{m:.3f}" for m in kv[K.ODP_MU]))
    return "\n".join(lines)
