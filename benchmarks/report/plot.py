"""speedup.png: ours over each like-for-like baseline, one bar per (group, ours, baseline), on a
log scale with the 1× line, ops and end-to-end results in two panels."""
from __future__ import annotations

from pathlib import Path

from benchmarks.report import analysis as A
from benchmarks.report.render import ratio

PANELS = (("ops", ("op",)), ("end to end", ("e2e-step", "e2e-sample", "e2e-dpm-solver")))


def write(report_dir: Path, records: list[dict]) -> Path | None:
    """The plot's path, or None when there is nothing to compare yet. Raises ImportError with
    an install hint when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the plot needs matplotlib: pip install matplotlib (or the [bench] extra)") from error
    panels = [(title, A.comparisons(records, kinds)) for title, kinds in PANELS]
    panels = [(title, rows) for title, rows in panels if rows]
    if not panels:
        return None
    heights = [max(1.5, 0.22 * len(rows) + 0.8) for _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (title, rows) in zip(axes[:, 0], panels):
        labels = [f"{r['group']} · {r['ours']} vs {r['baseline']}" for r in rows]
        values = [r["ratio"] for r in rows]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
        ax.set_xscale("log")
        # bars start at 1×: faster to the right, slower to the left
        ax.barh(range(len(rows)), [v - 1 for v in values], left=1.0, color=colors)
        for y, v in enumerate(values):
            ax.text(v, y, f" {ratio(v)} ", va="center", ha="left" if v >= 1 else "right", fontsize=5)
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        low, high = min(values + [1.0]), max(values + [1.0])
        ax.set_xlim(low / 1.6, high * 1.6)
        ax.set_title(f"{title}: ours over baseline (median time ratio)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    path = report_dir / "speedup.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
