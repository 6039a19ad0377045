"""``leukoedge data check|split|synth|scale|layouts``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers):
    """Add ``data`` and its actions; returns the actions' subparsers, so ``leukoedge.cli`` can add the one
    action this package may not hold (``data reviewed`` reads a device's store, which lives above this layer)."""
    p = subparsers.add_parser("data", help="check, split, synthesise and measure datasets",
                              description="Dataset checks, leakage-aware split manifests, synthetic smears and "
                                          "pixel sizes.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    check = sub.add_parser("check", help="find unreadable files, duplicates and class imbalance")
    check.add_argument("path", type=Path, help="dataset folder")
    check.add_argument("--layout", default="auto", help="force a layout (see `leukoedge data layouts`)")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    check.add_argument("--strict", action="store_true", help="exit non-zero when any file is unreadable")
    check.set_defaults(func=_check)

    split = sub.add_parser("split", help="write a deterministic train/val/test manifest (or K folds)",
                           description="One manifest of one or several dataset folders. With several (e.g. the "
                                       "original data, then a device's reviewed-images export) the first defines "
                                       "the classes and each folder is split by its own kind: by group (sample) "
                                       "where every image has one, else by capture-order block.")
    split.add_argument("path", type=Path, nargs="+", help="dataset folder(s); the first defines the classes")
    split.add_argument("--out", type=Path, required=True, metavar="MANIFEST",
                       help="manifest JSON to write; with --folds K, a folder for fold-1.json .. fold-K.json "
                            "and their index folds.json")
    split.add_argument("--layout", default="auto", help="force a layout (see `leukoedge data layouts`)")
    split.add_argument("--val", type=float, default=0.15, help="validation fraction (default 0.15)")
    split.add_argument("--test", type=float, help="test fraction (default 0.15; with --folds the test set is 1/K)")
    split.add_argument("--folds", type=int, default=1, metavar="K",
                       help="K folds that rotate the test set (capture-order blocks, or whole groups) so each "
                            "image is tested exactly once; for small data (default 1: one split)")
    split.add_argument("--by", default="auto", choices=("auto", "group", "block", "random"),
                       help="auto: by patient when ids exist, else capture-order blocks; random is leaky")
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(func=_split)

    synth = sub.add_parser("synth", help="generate synthetic Wright-Giemsa-like smear fields")
    synth.add_argument("out", type=Path, help="output folder (Taleqani layout)")
    synth.add_argument("--n", type=int, default=800, help="number of images, split evenly over 4 classes")
    synth.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--magnification", type=float, default=1.0, metavar="M",
                       help="cells M times their default size in the same image size (0.25-4; default 1): "
                            "fields as another objective would show them")
    synth.set_defaults(func=_synth)

    scale = sub.add_parser("scale", help="measure the pixel size (um/px) from the red cells",
                           description="Estimate each image's pixel size from its red-cell diameters, and the "
                                       "dataset's (the median over images).")
    scale.add_argument("path", type=Path, help="an image file, or a folder (searched recursively)")
    scale.add_argument("--rbc-um", type=float, default=None, metavar="UM",
                       help="red-cell diameter in micrometres (default 7.5)")
    scale.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    scale.set_defaults(func=_scale)

    layouts = sub.add_parser("layouts", aliases=["list-layouts"], help="list the dataset layouts that are recognised")
    layouts.set_defaults(func=_layouts)
    return sub


def _check(args: argparse.Namespace) -> int:
    from .check import check_dataset

    report = check_dataset(args.path, args.layout, progress=not args.json and sys.stderr.isatty())
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.to_text())
    return 1 if args.strict and not report.ok else 0


def _split(args: argparse.Namespace) -> int:
    from .split import check_folds, format_counts, format_folds, make_folds, make_manifest, save_folds

    if check_folds(args.folds) > 1:
        return _split_folds(args, make_folds, format_folds, save_folds)
    manifest = make_manifest(_roots(args.path), layout=args.layout, by=args.by, val=args.val,
                             test=0.15 if args.test is None else args.test, seed=args.seed,
                             progress=sys.stderr.isatty())
    manifest.save(args.out)
    print(format_counts(manifest))
    excluded = manifest.params.get("unreadable_excluded") or []
    if excluded:
        print(f"left out {len(excluded)} unreadable file(s); run `leukoedge data check` to see why")
    print(f"wrote {args.out}")
    return 0


def _roots(paths: list[Path]) -> Path | list[Path]:
    """One folder as itself (one-root manifests stay as before), several as a list."""
    return paths[0] if len(paths) == 1 else paths


def _split_folds(args: argparse.Namespace, make_folds, format_folds, save_folds) -> int:
    """``--folds K``: K manifests in the ``--out`` folder (see :func:`leukoedge.data.split.make_folds`)."""
    from ..errors import UsageError

    if args.test is not None:
        raise UsageError(f"--test {args.test} contradicts --folds {args.folds}: each fold tests on 1/{args.folds} "
                         "of the images", hint="drop --test, or drop --folds for one split")
    manifests = make_folds(_roots(args.path), folds=args.folds, layout=args.layout, by=args.by, val=args.val,
                           seed=args.seed, progress=sys.stderr.isatty())
    index = save_folds(manifests, args.out)
    print(format_folds(manifests))
    excluded = manifests[0].params.get("unreadable_excluded") or []
    if excluded:
        print(f"left out {len(excluded)} unreadable file(s); run `leukoedge data check` to see why")
    print(f"wrote {len(manifests)} fold manifests and {index}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from .synth import generate, synthetic_um_per_px

    paths = generate(args.out, args.n, size=args.size, seed=args.seed, progress=True,
                     magnification=args.magnification)
    um = synthetic_um_per_px(args.size, args.magnification)
    print(f"wrote {len(paths)} images to {args.out / 'Original'} (seed {args.seed}, {args.size} px, "
          f"magnification {args.magnification:g}: about {um:.3g} um/px for 7.5 um red cells)")
    return 0


def _scale(args: argparse.Namespace) -> int:
    """Per-image and dataset um/px; exit 11 (ScaleError) when no image at all could be measured."""
    from ..errors import DatasetError, ScaleError, UsageError
    from ..files import image_files
    from ..scale import RBC_UM, check_rbc_um, estimate_dataset

    rbc_um = RBC_UM if args.rbc_um is None else check_rbc_um(args.rbc_um, UsageError)
    if args.path.is_dir():
        paths = image_files(args.path, skip_hidden=True)
        if not paths:
            raise DatasetError(f"{args.path}: no images found", hint="image files end in .jpg, .png, .tif or .bmp")
        root = args.path
    elif args.path.exists():
        paths, root = [args.path], args.path.parent
    else:
        raise DatasetError(f"{args.path}: no such file or folder")
    result = estimate_dataset(paths, rbc_um=rbc_um, progress=not args.json and sys.stderr.isatty())
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.to_text(root))
    if result.um_per_px is None:
        raise ScaleError(f"no red cells measured in any of the {result.n_images} image(s) under {args.path}",
                         hint="check that they are blood smear fields; otherwise calibrate with a stage "
                              "micrometer, or give the pixel size (train / predict --um-per-px)")
    return 0


def _layouts(args: argparse.Namespace) -> int:
    from .readers import list_layouts

    for layout in list_layouts():
        print(f"{layout.name:<19} {layout.description}")
    return 0
