"""PNG plot of a `netsim.bench.runner` report: packets/s by path and size, and the loop's batch sweep.

    python -m netsim.bench.plot report.json out.png

Left panel: end-to-end UDP packets/s (median, with min-max error bars) per path, grouped by packet size, log
scale, because the paths span three orders of magnitude (naive vs direct). Right panel: the in-process
provider <-> helper loop, packets/s against batch size, one line per transport. Rendered with the Agg backend
(no display needed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["plot"]

_PATH_ORDER = ("direct", "wireguard-go", "netsim", "netsim-loop", "c-floor", "naive-careful", "naive")


def plot(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the figure for report ``doc`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    udp = [r for r in doc["results"] if r.get("group") == "e2e" and r.get("proto") == "udp"]
    loop = [r for r in doc["results"] if r.get("group") == "loop" and r["params"].get("size") == 64]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    m = doc["machine"]
    fig.suptitle(
        f"netsim benchmarks -- {m['cpu_model']}, {m['cpu_count']} cores, Python {m['python']}, "
        f"{m['timestamp']} ({'quick' if doc['quick'] else 'full'} run)",
        fontsize=9,
    )
    if udp:
        sizes = sorted({r["size"] for r in udp})
        paths = [p for p in _PATH_ORDER if any(r["path"] == p for r in udp)]
        paths += sorted({r["path"] for r in udp} - set(paths))  # lever paths, the user's --provider/--helper paths
        width = 0.8 / max(len(paths), 1)
        for i, p in enumerate(paths):
            xs, ys, lo, hi = [], [], [], []
            for j, s in enumerate(sizes):
                rec = next((r for r in udp if r["path"] == p and r["size"] == s), None)
                if rec is None:
                    continue
                xs.append(j + (i - (len(paths) - 1) / 2) * width)
                ys.append(rec["pps"]["median"])
                lo.append(rec["pps"]["median"] - rec["pps"]["min"])
                hi.append(rec["pps"]["max"] - rec["pps"]["median"])
            ax1.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=p)
        ax1.set_xticks(range(len(sizes)), [f"{s} B" for s in sizes])
        ax1.set_yscale("log")
        ax1.set_ylabel("packets/s (replies, median of runs; bars: min-max)")
        ax1.set_title("end to end, UDP round trips (mac -> inet, or the loop's reflector)", fontsize=10)
        ax1.legend(fontsize=8)
        ax1.grid(axis="y", which="both", alpha=0.3)
    else:
        ax1.text(0.5, 0.5, "no end-to-end results\n(needs root; see 'skipped' in the JSON)", ha="center")
        ax1.set_axis_off()
    if loop:
        for transport in sorted({r["params"]["transport"] for r in loop}):
            pts = sorted(
                (r["params"]["batch"], r["items_per_s"]) for r in loop if r["params"]["transport"] == transport
            )
            ax2.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=transport)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("batch size (packets per IPC frame)")
        ax2.set_ylabel("round trips per CPU second (median)")
        ax2.set_title("provider <-> helper loop, 64 B, >= 64 in flight", fontsize=10)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    else:
        ax2.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m netsim.bench.plot report.json out.png")
    plot(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
