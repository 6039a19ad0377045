#!/usr/bin/env python3
"""Accuracy against latency and against size for the model zoo, Pareto front highlighted.

    python benchmarks/pareto.py [--zoo benchmarks/results/zoo_latency.json]

Reads the zoo table written by ``zoo_latency.py`` (int8 accuracy from each
bundle's parity gate, int8 size, int8 latency p50 with 1 thread on the machine
that table came from) and draws ``benchmarks/results/pareto.png``: two panels,
accuracy vs latency and accuracy vs size, with the models no other model beats
on both axes joined by a line. The front membership goes to ``pareto.{md,json}``
so the README can quote it. Nothing is measured here; the machine recorded is
the zoo table's.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from _common import REPO, RESULTS, main_guard, write_results
from leukoedge.bench.report import md_table


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points with no other point at lower-or-equal cost and higher-or-equal
    accuracy (strictly better in one). ``points`` are ``(cost, accuracy)``."""
    front = []
    for i, (c, a) in enumerate(points):
        dominated = any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def load_points(zoo: dict, threads: int) -> list[dict]:
    points = []
    for row in zoo["rows"]:
        acc = row.get("int8_accuracy")
        source = "int8"
        if acc is None:
            acc, source = row.get("float_accuracy"), "float"
        latency = row.get(f"int8_p50_ms_t{threads}")
        if acc is None or latency is None or row.get("int8_bytes") is None:
            continue
        points.append({"model": row.get("training_row") or row["model"], "accuracy": acc, "accuracy_of": source,
                       "latency_ms": latency, "size_bytes": row["int8_bytes"], "valid": row.get("valid"),
                       "split_kind": row.get("split_kind")})
    return points


def plot(points: list[dict], fronts: dict[str, list[int]], machine: str, threads: int, out: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    panels = (("latency_ms", f"int8 latency p50 per image, {threads} thread(s) (ms)", "latency"),
              ("size_bytes", "int8 model size (KB)", "size"))
    for ax, (key, label, front_key) in zip(axes, panels):
        scale = 1 / 1024 if key == "size_bytes" else 1
        xs = [p[key] * scale for p in points]
        ys = [100 * p["accuracy"] for p in points]
        front = fronts[front_key]
        leaky = [p["split_kind"] == "random" for p in points]
        ax.scatter([x for x, lk in zip(xs, leaky) if not lk], [y for y, lk in zip(ys, leaky) if not lk],
                   color="#9aa5b1", zorder=2, label="model")
        if any(leaky):
            ax.scatter([x for x, lk in zip(xs, leaky) if lk], [y for y, lk in zip(ys, leaky) if lk],
                       facecolors="none", edgecolors="#9aa5b1", zorder=2, label="random split (leaky, off the front)")
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", color="#c2185b", zorder=3,
                label="Pareto front")
        for i, p in enumerate(points):
            ax.annotate(p["model"] + ("" if p["valid"] is not False else " (invalid)"), (xs[i], ys[i]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        # Log scale when the models span more than a decade; a narrow range reads better linear.
        wide = max(xs) / min(xs) > 10
        if wide:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
        else:
            ax.set_xlim(0, max(xs) * 1.3)
        ax.set_ylim(min(ys) - 3, min(100.5, max(ys) + 2))
        ax.set_xlabel(label + (" (log scale)" if wide else ""))
        ax.set_ylabel("int8 accuracy on the test split (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"leukoedge model zoo: accuracy vs latency and size. {machine}. Research use only.", fontsize=10)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=RESULTS / "zoo_latency.json")
    parser.add_argument("--threads", type=int, default=1, help="which thread count's latency to plot")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.zoo.is_file():
        raise SystemExit(f"{args.zoo} not found; run benchmarks/zoo_latency.py first")
    zoo = json.loads(args.zoo.read_text())
    points = load_points(zoo, args.threads)
    if not any(p["split_kind"] != "random" for p in points):
        raise SystemExit(f"{args.zoo} has no model (on a non-leaky split) with accuracy, size and "
                         f"{args.threads}-thread latency")
    # A random (image-level) split overstates accuracy, so those rows are drawn but never on the front.
    fair = [i for i, p in enumerate(points) if p["split_kind"] != "random"]
    fronts = {key: [fair[j] for j in pareto_front([(points[i][field], points[i]["accuracy"]) for i in fair])]
              for key, field in (("latency", "latency_ms"), ("size", "size_bytes"))}
    from leukoedge.bench.machine import describe_machine

    machine = describe_machine(zoo["machine"])
    png = args.out_dir / "pareto.png"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(points, fronts, machine, args.threads, png)
    for key, front in fronts.items():
        for i in front:
            points[i][f"on_{key}_front"] = True
    rows = [(p["model"], f"{100 * p['accuracy']:.1f} %", p["accuracy_of"],
             "random (LEAKY)" if p["split_kind"] == "random" else p["split_kind"], p["latency_ms"],
             f"{p['size_bytes'] / 1024:.0f} KB", "yes" if p.get("on_latency_front") else "",
             "yes" if p.get("on_size_front") else "") for p in sorted(points, key=lambda p: p["latency_ms"])]
    zoo_name = args.zoo.resolve().relative_to(REPO) if args.zoo.resolve().is_relative_to(REPO) else args.zoo
    body = (f"From `{zoo_name}` (measured {zoo['machine'].get('date_utc')}). "
            f"![accuracy vs latency and size](pareto.png)\n\n"
            + md_table(("model", "accuracy", "of", "split", f"int8 p50 ms ({args.threads} thr)", "int8 size",
                        "latency front", "size front"), rows) + "\n")
    data = {"machine": zoo["machine"], "source": str(zoo_name), "threads": args.threads, "points": points,
            "fronts": {k: [points[i]["model"] for i in v] for k, v in fronts.items()}, "png": png.name}
    write_results("pareto", data, body, "Model zoo: Pareto front", args.out_dir)
    return 0


if __name__ == "__main__":
    main_guard(main)
