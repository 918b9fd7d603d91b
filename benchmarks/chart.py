"""Draw compare.py's measurements: decode and prefill tokens/s per model and precision, one bar
per system (medians over the repeats), as an SVG for the README.

    .venv/bin/python benchmarks/compare.py --models smollm2 random-15m random-110m --json small.json
    .venv/bin/python benchmarks/compare.py --models random-1.1b --repeats 2 --json big.json
    .venv/bin/python benchmarks/chart.py small.json big.json -o benchmarks/compare.svg

Needs matplotlib (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compare import pooled_rows  # (benchmarks/ is on sys.path when this runs as a script)

SYSTEMS = {"llamascope": "#2b6cb0", "transformers": "#dd8452", "llama.cpp": "#55a868"}
PANELS = (("decode_tps", "decode tokens/s (batch 1)"), ("prefill_tps", "prefill tokens/s (512-token prompt)"))


def draw(files: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pooled_rows(files)  # [(model, precision, {system: {key: median}})] in first-seen order
    groups = [(model, precision) for model, precision, _ in rows]
    med = {
        (model, precision, system, key): value
        for model, precision, by in rows
        for system, values in by.items()
        for key, value in values.items()
        if value
    }
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(max(8.0, 1.1 * len(groups) + 2), 7.5))
    width = 0.8 / len(SYSTEMS)
    for ax, (key, title) in zip(axes, PANELS):
        for s, (system, colour) in enumerate(SYSTEMS.items()):
            xs, ys = [], []
            for g, group in enumerate(groups):
                value = med.get((*group, system, key))
                if value is not None:
                    xs.append(g + (s - (len(SYSTEMS) - 1) / 2) * width)
                    ys.append(value)
            bars = ax.bar(xs, ys, width, label=system, color=colour)
            ax.bar_label(bars, labels=[f"{y:.0f}" if y >= 10 else f"{y:.1f}" for y in ys], fontsize=7, padding=1)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xticks(range(len(groups)), [f"{m}\n{p}" for m, p in groups], fontsize=8)
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].legend(fontsize=8, ncols=len(SYSTEMS), loc="upper right")
    fig.suptitle("llamascope vs transformers vs llama.cpp, same weights, 2 threads (higher is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, format=out.suffix.lstrip(".") or "svg")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="files written by compare.py --json")
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).parent / "compare.svg")
    args = parser.parse_args()
    draw(args.json, args.out)


if __name__ == "__main__":
    main()
