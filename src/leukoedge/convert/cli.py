"""``leukoedge convert RUN_DIR --quantize MODE --out BUNDLE``.

TensorFlow is imported only inside the handler, so ``leukoedge --help`` and
the device install stay light.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .modes import DEFAULT_CALIBRATION, MODES
from .options import DEFAULT_OOD_FIT


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
    p.add_argument("--data-root", type=Path, action="append", default=None,
                   help="dataset root if the images moved since training; repeat it, in the manifest's order, "
                        "for a run trained on several roots")
    p.add_argument(
        "--ood-score", choices=["mahalanobis", "knn", "max_softmax"], default=None,
        help="abstention score fitted on the converted model (default: mahalanobis on the pooled "
        "'features' output when the model has one, else max_softmax)",
    )
    p.add_argument(
        "--ood-dir", type=Path, action="append", default=[], metavar="DIR",
        help="folder of foreign images to measure abstention on (repeatable; evaluation only)",
    )
    p.add_argument("--abstain-rate", type=float, default=0.05,
                   help="fraction of in-distribution validation images that abstain (default 0.05)")
    p.add_argument("--ood-fit", type=int, default=DEFAULT_OOD_FIT, metavar="N",
                   help=f"training images whose features fit the abstention score (default {DEFAULT_OOD_FIT}, "
                   "stratified subsample when the train split is larger)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="fit the temperature on the converted model's validation outputs (default on)")
    p.add_argument("--um-per-px", type=float, default=None, metavar="X",
                   help="micrometres per pixel of the TRAINING images, for runs trained without a recorded scale "
                   "(or to correct it: a change over 10 %% is warned about); the device tiles captures at it")
    p.add_argument("--diagnose", action="store_true",
                   help="int8/uint8: per-layer quantisation error and which layer, kept in float, removes the flips "
                   "(diagnosis.json, parity.md); done anyway when the gate fails")
    p.add_argument("--diagnose-layers", type=int, default=5, metavar="K",
                   help="the diagnosis keeps each of the K worst-ranked layers in float alone and counts the flips "
                   "it removes (default 5; 0 tests every layer, which is slow on large nets)")
    p.add_argument("--repair", action="store_true",
                   help="int8/uint8: after a failed gate, try more calibration images, the worst layers in float "
                   "(1..3), then 16x8, "
                   "chosen on the val split and graded on test (repair.md, repair.json)")
    p.add_argument("--member", type=Path, action="append", default=[], metavar="RUN_DIR",
                   help="another training run (same split, classes and preprocessing, e.g. another --seed) averaged "
                   "with RUN_DIR in one model; repeatable. Costs one invoke and one model's size per member")
    p.add_argument("--tta", choices=["none", "flips", "dihedral"], default="none",
                   help="test-time augmentation inside the model: the mean over the identity and flipped views "
                   "(flips: 4 views) or all 8 flips and 90-degree rotations (dihedral); costs one invoke per view")
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
        data_root=_data_root(args.data_root),
        ood_score=args.ood_score,
        ood_dirs=tuple(args.ood_dir),
        calibrate=args.calibrate,
        abstain_rate=args.abstain_rate,
        ood_fit=args.ood_fit,
        um_per_px=args.um_per_px,
        diagnose=args.diagnose,
        diagnose_layers=args.diagnose_layers,
        members=tuple(args.member),
        tta=args.tta,
        repair=args.repair,
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


def _f(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


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
    if result.scale is not None:
        um = result.scale.get("um_per_px")
        print(f"scale: {'unknown (the device stretches the whole frame)' if um is None else f'{um:.4g} um/px'} "
              f"({result.scale.get('how')})", file=out)
    if result.edgetpu is not None:
        print(result.edgetpu.to_text(), file=out)
    if result.trust is not None:
        ab, cal = result.trust["abstention"], result.trust["calibration"]
        print(
            f"abstention: {ab['score']} ({ab['abstain_when']} {ab['threshold']:.6g}); "
            f"test abstained {ab['test_abstain_rate']:.1%}",
            file=out,
        )
        for name, f in ab["ood"].items():
            print(f"  {name}: AUROC {_f(f['auroc'])} (held-out half {_f(f['held_out']['auroc'])}), "
                  f"abstained {_f(f['abstain_rate'], '.1%')}", file=out)
        print(f"calibration: T={cal['temperature']:.3f}  test ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}", file=out)
    if result.diagnosis is not None:
        d = result.diagnosis
        print(f"diagnosis: {d.get('verdict') or 'did not complete: ' + str(d.get('error'))} (parity.md, diagnosis.json)", file=out)
    if result.repair is not None:
        print(f"repair: {result.repair['verdict']} (repair.md, repair.json)", file=out)
    print(f"parity gate: {'PASSED' if r.passed else 'FAILED (bundle marked invalid)'}", file=out)


def _data_root(given: list[Path] | None) -> Path | tuple[Path, ...] | None:
    """``--data-root`` as ConvertOptions takes it: None, one root, or one per root of the run's manifest."""
    if not given:
        return None
    return given[0] if len(given) == 1 else tuple(given)
