"""``leukoedge demo``: the whole pipeline on the embedded synthetic smears.

Runs exactly the commands a lab would run on its own images, in order, through
the same CLI entry points (so the demo cannot drift from the real commands):

1. ``data synth``   synthetic Wright-Giemsa-like smear fields (Taleqani layout)
2. ``data check``   corrupt files, duplicates, class balance
3. ``data split``   a capture-block manifest reused by every later stage
4. ``train``        a compact edge-first CNN (evaluates on val and test at the end)
5. ``convert``      full-int8 TFLite with a heatmap output, through the parity gate
6. ``bench``        latency of the int8 bundle on this machine
7. ``serve``        the device app, with a replay camera looping over held-out images

Every step's output stays in ``--out`` so nothing is lost; re-running reuses
finished steps (delete the folder to start over).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from . import RESEARCH_NOTICE
from .errors import UsageError

log = logging.getLogger(__name__)

STEPS = ("synth", "check", "split", "train", "convert", "bench", "serve")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on synthetic smears and serve the app",
        description=__doc__.split("\n\n")[0] + " " + RESEARCH_NOTICE,
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="working folder (default: demo-output)")
    p.add_argument("--images", type=int, default=1200, help="synthetic images to generate (default 1200)")
    p.add_argument("--model", default="leuko-tiny", help="registry model to train (default leuko-tiny)")
    p.add_argument("--input-size", type=int, default=128, help="model input size in px (default 128)")
    p.add_argument("--epochs", type=int, default=40, help="maximum training epochs (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and training (default 0)")
    p.add_argument("--port", type=int, default=8080, help="port for the app (default 8080)")
    p.add_argument("--no-serve", action="store_true", help="stop after the benchmark instead of serving the app")
    p.set_defaults(func=run)


def _banner(index: int, name: str, text: str) -> None:
    print(f"\n=== [{index}/{len(STEPS)}] {name}: {text}", flush=True)


def _call(argv: list[str]) -> None:
    """Run one leukoedge subcommand in-process; a failing step stops the demo."""
    from .cli import main

    print("$ leukoedge " + " ".join(argv), flush=True)
    code = main(argv)
    if code != 0:
        raise UsageError(f"demo step `leukoedge {' '.join(argv)}` failed with exit code {code}")


def _replay_folder(manifest_path: Path, data_root: Path, out: Path) -> Path:
    """Copy the held-out test images into one flat folder for the replay camera."""
    from .data.records import Manifest

    manifest = Manifest.load(manifest_path)
    out.mkdir(parents=True, exist_ok=True)
    for entry in manifest.subset("test"):
        src = manifest.resolve(entry, data_root)
        dst = out / src.name
        if not dst.exists():
            shutil.copyfile(src, dst)
    return out


def run(args: argparse.Namespace) -> int:
    if args.images < 80:
        raise UsageError("--images must be at least 80 (20 per class) for a meaningful split")
    out: Path = args.out.resolve()
    data = out / "data"
    manifest = out / "manifest.json"
    run_dir = out / "run"
    bundle = out / "bundle"
    out.mkdir(parents=True, exist_ok=True)
    print(RESEARCH_NOTICE)

    _banner(1, "synth", f"{args.images} synthetic smear fields")
    if not (data / "Original").is_dir():
        _call(["data", "synth", str(data), "--n", str(args.images), "--seed", str(args.seed)])
    else:
        print(f"reusing {data}")

    _banner(2, "check", "unreadable files, duplicates, class balance")
    _call(["data", "check", str(data)])

    _banner(3, "split", "capture-order blocks per class (no neighbour leaks into test)")
    if not manifest.exists():
        _call(["data", "split", str(data), "--out", str(manifest), "--by", "auto", "--seed", str(args.seed)])
    else:
        print(f"reusing {manifest}")

    _banner(4, "train", f"{args.model} at {args.input_size} px, evaluated on the test block")
    if not (run_dir / "model.keras").exists() or not (run_dir / "metrics.json").exists():
        _call([
            "train", "--data", str(data), "--manifest", str(manifest), "--model", args.model,
            "--input-size", str(args.input_size), "--epochs", str(args.epochs), "--patience", "10", "--seed", str(args.seed),
            "--out", str(run_dir), *(["--resume"] if (run_dir / "last.keras").exists() else []),
        ])
    else:
        print(f"reusing {run_dir}")

    _banner(5, "convert", "full-int8 TFLite with heatmap output, parity gate against the float model")
    if not (bundle / "bundle.json").exists():
        _call(["convert", str(run_dir), "--quantize", "int8", "--with-heatmap", "--out", str(bundle)])
    else:
        print(f"reusing {bundle}")

    _banner(6, "bench", "latency of the int8 bundle on this machine")
    replay = _replay_folder(manifest, data, out / "replay")
    _call(["bench", "latency", str(bundle), "--runs", "30", "--warmup", "5", "--images", str(replay),
           "--out", str(out / "latency.md")])

    _summary(out, run_dir, bundle)
    if args.no_serve:
        print("\nStopped before serving (--no-serve). Serve it with:\n"
              f"  leukoedge serve --bundle {bundle} --camera replay:{replay}")
        return 0

    _banner(7, "serve", f"open http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    _call(["serve", "--bundle", str(bundle), "--camera", f"replay:{replay}", "--port", str(args.port),
           "--data-dir", str(out / "app-data")])
    return 0


def _summary(out: Path, run_dir: Path, bundle: Path) -> None:
    metrics = _read(run_dir / "metrics.json")
    parity = _read(bundle / "parity.json")
    lines = ["", "Summary (synthetic data, capture-block split, test block):"]
    if metrics:
        acc = metrics.get("accuracy")
        f1 = metrics.get("macro_f1")
        lines.append(f"  float model: accuracy {_fmt(acc)}, macro-F1 {_fmt(f1)}")
    if parity:
        lines.append(
            f"  int8 model:  accuracy {_fmt(parity.get('quant_accuracy'))} "
            f"(delta {parity.get('delta_accuracy', float('nan')):+.2f} points), "
            f"agreement {_fmt(parity.get('agreement'))}, gate {'PASSED' if parity.get('passed') else 'FAILED'}"
        )
    lines.append(f"  reports: {run_dir / 'model_card.md'}, {bundle / 'parity.md'}, {out / 'latency.md'}")
    print("\n".join(lines), flush=True)


def _fmt(value) -> str:
    if isinstance(value, dict):
        value = value.get("value", value.get("point"))
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None

