"""``leukoedge train``: train a registry model into a run directory; ``--list-models`` lists them.

``--folds K`` trains K runs that rotate the test set (``RUN/fold-k/``) and
summarises them in ``RUN/cv.json`` and ``RUN/model_card.md`` (:mod:`.folds`);
``--folds 1`` or no ``--folds`` is one run.

Several ``--data`` roots make one manifest (:mod:`leukoedge.data.split`):
the first defines the classes, a reviewed export's samples never straddle
splits, and every later stage opens images through that manifest.

The training scale (um/px of the training images) is ``--um-per-px`` or
measured on the training split's red cells (``--rbc-um``); it goes into the
run, the card and the bundle so the device can tile captures at it.
``--scale-jitter F`` zooms training images by up to +-F for the residual
calibration error (:mod:`.training_scale`, :func:`.augment.scale_jitter`).

TensorFlow is imported inside the handler only, so ``leukoedge --help`` stays instant.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import UsageError
from ..preprocess import COLOUR_STEPS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from the registry into RUN_DIR",
        description="Train a registry model on a split manifest, then evaluate it on val + test "
                    "(metrics, plots, abstention threshold, model card in RUN_DIR).")
    p.add_argument("--list-models", action="store_true", help="list registered models (input, params, MACs) and exit")
    p.add_argument("--data", metavar="PATH", action="append",
                   help="dataset root; repeat it to train on several at once (e.g. the original data, then a "
                        "device's reviewed-images export: the first defines the classes, each is split by its own "
                        "kind, samples kept whole). With --manifest: where its root(s) are now, in its order")
    p.add_argument("--manifest", metavar="M", help="split manifest JSON (from `leukoedge data split`), or a folds "
                                                   "index DIR/folds.json (from `data split --folds K`); without it "
                                                   "the data is split now (auto kind) and saved in RUN_DIR")
    p.add_argument("--folds", type=int, metavar="K",
                   help="cross-validate: K folds that rotate the held-out capture block (or group), each trained "
                        "and evaluated in RUN_DIR/fold-k/, summarised in RUN_DIR/cv.json and model_card.md; use it "
                        "on small data (a few hundred images). 1 or absent: one split")
    p.add_argument("--model", metavar="NAME", help="registry name (see --list-models)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory to create")
    p.add_argument("--epochs", type=int, help="maximum epochs (default: the model's recommended value)")
    p.add_argument("--batch", type=int, help="global batch size (default: the model's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the model's)")
    p.add_argument("--input-size", type=int, help="square input size in px (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--augment", metavar="RECIPE", help="augmentation recipe: default, paper003, robust, cells "
                   "(robust + background swap + cell-centred crops), background-swap, none (default: the model's)")
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument("--no-audit", action="store_true", help="skip the shortcut audit after training (the model card "
                   "then says how to run it: `leukoedge eval RUN --audit`)")
    p.add_argument("--colour", choices=tuple(COLOUR_STEPS), help="colour step of the preprocessing path, applied "
                   "in training and on the device (default as-captured)")
    p.add_argument("--consistency", type=float, metavar="WEIGHT",
                   help="colour-consistency loss: each image is shown twice in its batch, differing only in colour, "
                        "and WEIGHT x the Jensen-Shannon divergence of the two predictions is added (0 = off, "
                        "default; try 10 with --augment robust; doubles the images per step)")
    p.add_argument("--um-per-px", type=float, metavar="X",
                   help="micrometres per pixel of the training images as stored (e.g. from a stage micrometer); "
                        "default: measured on the training split's red cells. Recorded in the run, the model card "
                        "and the bundle, so the device brings captures to this scale and tiles them")
    p.add_argument("--rbc-um", type=float, metavar="UM",
                   help="red-cell diameter in micrometres that the measured scale assumes (default 7.5)")
    p.add_argument("--scale-jitter", type=float, metavar="F",
                   help="zoom each training image by a random factor in [1-F, 1+F] (e.g. 0.15), so a device "
                        "calibration a few percent off does not matter; 0 = off (default)")
    p.add_argument("--init", metavar="BACKBONE",
                   help="start from a pretrained backbone instead of random weights: a shipped name "
                        "(leukoedge-smear: leuko-small's feature extractor trained on blood-smear fields, inside the "
                        "package, no download) or a backbone .npz file; the classifier is new. Recommended for small "
                        "datasets (a few hundred images). --model defaults to the backbone's")
    p.add_argument("--teacher", metavar="RUN", action="append", default=[],
                   help="distil from a finished run (repeat for an ensemble of teachers): the student learns the "
                        "teachers' mean probabilities on each un-augmented training image beside its label, so a "
                        "colour-robust student can learn from accurate colour-reading teachers; teachers must not "
                        "have trained on this manifest's val or test images (checked)")
    p.add_argument("--distill-weight", type=float, metavar="A",
                   help="share of the loss taken from the teachers, 0..1 (default 0.5)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="softening temperature of the distillation (default 1; 2 measured worse)")
    p.add_argument("--ema", type=float, metavar="M",
                   help="validate, keep and export the exponential moving average of the weights, momentum M "
                        "(e.g. 0.99: ~100 steps); default off")
    p.add_argument("--label-smoothing", type=float, metavar="E",
                   help="train towards (1-E) x the label + E spread over the classes (e.g. 0.1); default 0 (off)")
    p.add_argument("--mix", choices=("mixup", "cutmix"),
                   help="train on blends of two training images with their labels blended in the same shares: "
                        "mixup blends the pixels, cutmix pastes a rectangle of one into the other; default off")
    p.add_argument("--mix-alpha", type=float, metavar="A",
                   help="Beta(A, A) draws each blend's share (default 0.2 for mixup, 1.0 for cutmix)")
    p.add_argument("--mix-prob", type=float, metavar="P",
                   help="share of the training images that are mixed, (0, 1] (default 0.5)")
    p.add_argument("--patience", type=int, default=8, help="early-stopping patience in epochs (default 8)")
    p.add_argument("--select", metavar="val_loss|val_accuracy",
                   help="which epoch model.keras keeps (and early stopping watches): lowest val_loss, or highest "
                        "val_accuracy with ties broken by lower val_loss (default: val_loss; see the README)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.keras (a "
                   "cross-validation run skips its finished folds)")
    p.add_argument("--distribute", choices=("auto", "mirrored", "none"), default="auto",
                   help="auto: MirroredStrategy with >1 GPU, mixed precision with any GPU (default)")
    p.add_argument("--ood", metavar="DIR", action="append", default=[],
                   help="out-of-distribution image folder for the final evaluation (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        print_model_table(sys.stdout)
        return 0
    if args.init and not args.model and not args.resume:
        from ..models.pretrained import load_backbone

        args.model = load_backbone(args.init).model
    missing = [flag for flag, value in (("--model", args.model), ("--out", args.out)) if not value]
    if not args.resume and not args.data and not args.manifest:
        missing.append("--data")
    if missing:
        raise UsageError(f"leukoedge train needs {', '.join(missing)}",
                         hint="leukoedge train --data DIR --model NAME --out RUN_DIR (or --list-models)")
    if args.no_augment and args.augment and args.augment != "none":
        raise UsageError(f"--no-augment contradicts --augment {args.augment}")
    if args.no_augment and args.scale_jitter:
        raise UsageError(f"--no-augment contradicts --scale-jitter {args.scale_jitter:g}",
                         hint="use --augment none --scale-jitter F for the scale jitter alone")
    from ..data.split import check_folds
    from .rundir import RunDir

    if args.folds is not None:
        check_folds(args.folds)
    if args.teacher and args.folds is not None and args.folds > 1:
        raise UsageError("--teacher with --folds: a teacher trained on one split has seen other folds' test images",
                         hint="distil a single run on the teachers' own manifest")
    cv_run = args.resume and RunDir(args.out).is_cv
    folds = None
    if args.resume:
        manifest = None
        if args.folds is not None and args.folds > 1 and not cv_run:
            raise UsageError(f"--folds {args.folds} --resume: {args.out} is not a cross-validation run",
                             hint="drop --folds to resume a single run")
    else:
        manifest, folds = _manifest(args)
    from .trainer import TrainOptions, train

    opts = TrainOptions(
        out=Path(args.out), model=args.model, manifest=manifest, data_root=_data_root(args.data), epochs=args.epochs,
        batch_size=args.batch, learning_rate=args.lr, input_size=args.input_size, seed=args.seed,
        augment="none" if args.no_augment else args.augment, colour=args.colour, resume=args.resume, patience=args.patience,
        distribute=args.distribute, ood_dirs=tuple(args.ood), consistency=args.consistency, audit=not args.no_audit,
        select=args.select, um_per_px=args.um_per_px, rbc_um=args.rbc_um, scale_jitter=args.scale_jitter,
        init=args.init, teachers=tuple(args.teacher), distill_alpha=args.distill_weight,
        temperature=args.temperature, ema=args.ema, label_smoothing=args.label_smoothing,
        mix=args.mix, mix_alpha=args.mix_alpha, mix_prob=args.mix_prob)
    if cv_run or folds:
        return _cross_validate(opts, folds, args.folds)
    result = train(opts)
    metrics = result["metrics"] or {}
    for split in ("val", "test"):
        m = metrics.get(split)
        if m:
            warn = f"  COLLAPSED: {', '.join(m['collapsed_classes'])}" if m["collapsed_classes"] else ""
            print(f"{split}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                  f"({m['split_kind']} split){warn}")
    scale = RunDir(result["run_dir"]).config().scale
    from .training_scale import how_obtained

    um = scale.get("um_per_px")
    print(f"training scale: {'unknown' if um is None else f'{um:.4g} um/px'} ({how_obtained(scale)})")
    print(f"run directory: {result['run_dir']}")
    return 0


def _data_root(data: list[str] | None) -> str | tuple[str, ...] | None:
    """``--data`` as TrainOptions takes it: None, one root, or a tuple of roots (several)."""
    if not data:
        return None
    return data[0] if len(data) == 1 else tuple(data)


def _manifest(args):
    """``(manifest, folds)``: --manifest (one split, or a folds index), else a split made now (auto kind).

    ``folds`` is None for a single run; for cross-validation it is the fold
    manifests and ``manifest`` the first of them.
    """
    from ..data.records import Manifest
    from ..data.split import is_folds_index, load_folds, make_folds, make_manifest

    k = args.folds or 1
    if args.manifest and is_folds_index(args.manifest):
        folds = load_folds(args.manifest)
        if args.folds is not None and args.folds != len(folds):
            raise UsageError(f"--folds {args.folds} contradicts {args.manifest}, which holds {len(folds)} folds",
                             hint="drop --folds (the index decides), or split again with `data split --folds K`")
        return folds[0], folds
    if args.manifest:
        if k > 1:
            raise UsageError(f"--folds {k} needs fold manifests, and {args.manifest} is one split",
                             hint="pass --data DIR --folds K (split now), or --manifest DIR/folds.json from "
                                  "`leukoedge data split PATH --folds K --out DIR`")
        return Manifest.load(args.manifest), None
    log = logging.getLogger(__name__)
    data = _data_root(args.data)
    shown = ", ".join(args.data)
    if k > 1:
        log.info("no --manifest: cutting %s into %d folds now (auto kind: group, else block)", shown, k)
        folds = make_folds(data, folds=k, by="auto", seed=args.seed, progress=sys.stderr.isatty())
        return folds[0], folds
    log.info("no --manifest: splitting %s now (auto kind: group, else block)", shown)
    return make_manifest(data, by="auto", seed=args.seed), None


def _cross_validate(opts, folds, k: int | None) -> int:
    from .folds import train_folds
    from .rundir import RunDir, read_json

    if opts.resume and k is not None:
        saved = read_json(RunDir(opts.out).cv_config_path).get("folds")
        if k != saved:
            raise UsageError(f"--folds {k} contradicts the run in {opts.out}, which has {saved} folds",
                             hint="drop --folds to resume it")
    result = train_folds(opts, folds)
    cv = result["cv"]
    for f in cv["folds"]:
        print(f"fold {f['fold']}: test accuracy {f['accuracy']:.4f}  macro-F1 {f['macro_f1']:.4f}  "
              f"kept epoch {f['kept_epoch']} of {f['epochs_run']} ({f['n_test']} test images)")
    sd = "n/a" if cv["accuracy_sd"] is None else f"{cv['accuracy_sd']:.4f}"
    print(f"cross-validation ({cv['k']} folds, {cv['split_kind']}): accuracy {cv['accuracy_mean']:.4f} +/- {sd} "
          f"(mean +/- sd), pooled {cv['pooled']['accuracy']:.4f} over {cv['pooled']['n']} images")
    print(f"run directory: {result['run_dir']} (cv.json, model_card.md, fold-1 .. fold-{cv['k']})")
    return 0


def print_model_table(stream) -> None:
    from ..models import get_entry, list_models, model_info

    rows = []
    for name in list_models():
        info = model_info(name)
        rows.append((name, get_entry(name).family, f"{info['input_size']}", f"{info['params']:,}",
                     f"{info['macs'] / 1e6:,.1f}M", info["summary"]))
    header = ("name", "family", "input", "params", "MACs", "description")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        stream.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    print_backbones(stream)


def print_backbones(stream) -> None:
    """The shipped ``--init`` backbones, one line each (from the files' own records)."""
    from ..models.pretrained import list_backbones, load_backbone

    stream.write("\npretrained backbones (--init NAME):\n")
    for name in list_backbones():
        b = load_backbone(name)
        test = (b.meta.get("figures") or {}).get("test") or {}
        figure = f", its own {test['split_kind']}-split test accuracy {100 * test['accuracy']:.1f} %" if test else ""
        stream.write(f"  {name}  v{b.meta['version']}  {b.model} at {b.meta['input_size']} px: "
                     f"{(b.meta.get('provenance') or {}).get('data', '?')}{figure}\n")
