"""``leukoedge convert RUN_DIR --quantize MODE --out BUNDLE``.

TensorFlow is imported only inside the handler, so ``leukoedge --help`` and
the device install stay light.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .modes import DEFAULT_CALIBRATION, MODES


def register(subparsers) -> None:
    modes = "; ".join(f"{m.name}: {m.summary}" for m in MODES.values())
    p = subparsers.add_parser(
        "convert",
        help="convert a run to a TFLite bundle with an accuracy-parity gate",
        description="Convert a training run into a deployable bundle. Modes: " + modes,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="training run directory")
    p.add_argument("--quantize", choices=list(MODES), default="int8", help="quantisation mode (default int8)")
    p.add_argument(
        "--calibration", type=int, default=None, metavar="N",
        help=f"representative images from the TRAIN split (int8/uint8 only; default {DEFAULT_CALIBRATION})",
    )
    p.add_argument("--max-drop", type=float, default=1.0, help="largest accepted accuracy drop in points (default 1.0)")
    p.add_argument("--min-agreement", type=float, default=0.99, help="smallest accepted top-1 agreement (default 0.99)")
    p.add_argument("--with-heatmap", action="store_true", help="add the feature-map output for heatmaps")
    p.add_argument("--edgetpu", action="store_true", help="check Edge TPU compatibility; compile if edgetpu_compiler exists")
    p.add_argument("--archive", choices=["tar", "zip"], default=None, help="also write BUNDLE.tar or BUNDLE.zip")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--data-root", type=Path, default=None, help="dataset root if the images moved since training")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE", help="bundle directory to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    # TensorFlow logs every SavedModel export at INFO; only our own progress matters here.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    from .options import ConvertOptions
    from .pipeline import convert_run

    options = ConvertOptions(
        run_dir=args.run_dir,
        out=args.out,
        quantize=args.quantize,
        calibration=args.calibration,
        max_drop=args.max_drop,
        min_agreement=args.min_agreement,
        with_heatmap=args.with_heatmap,
        edgetpu=args.edgetpu,
        archive=args.archive,
        force=args.force,
        data_root=args.data_root,
    )
    from ..errors import ParityError

    try:
        result = convert_run(options)
    except ParityError as err:
        if getattr(err, "result", None) is not None:
            _print_summary(err.result)
        raise
    _print_summary(result)
    return 0


def _print_summary(result) -> None:
    r = result.parity
    out = sys.stdout
    print(f"bundle: {result.bundle}" + (f"  (archive: {result.archive})" if result.archive else ""), file=out)
    print(
        f"accuracy float {r.float_accuracy:.4f}  converted {r.quant_accuracy:.4f}  "
        f"drop {r.delta_accuracy:+.2f} points   macro-F1 {r.float_macro_f1:.4f} / {r.quant_macro_f1:.4f}",
        file=out,
    )
    print(f"agreement {r.agreement:.4f}  mean KL {r.mean_kl:.5f}  Pearson {r.pearson:.5f}  ({r.n_images} test images)", file=out)
    s = result.size
    print(f"size float32 {s['float32_bytes']:,} B -> {r.mode} {s['converted_bytes']:,} B ({s['ratio']:.2f}x smaller)", file=out)
    if result.heatmap_method:
        print(f"heatmap: {result.heatmap_method}", file=out)
    if result.edgetpu is not None:
        print(result.edgetpu.to_text(), file=out)
    print(f"parity gate: {'PASSED' if r.passed else 'FAILED (bundle marked invalid)'}", file=out)
