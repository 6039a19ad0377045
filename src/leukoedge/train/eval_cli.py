"""``leukoedge eval RUN_DIR [--audit]``: metrics, plots, abstention threshold and model card for a run.

``--audit`` then runs the shortcut audit (:mod:`.audit_run`) with the same
model and image cache, and rebuilds the card so it carries the audit section.

TensorFlow is imported inside the handler only.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a training run (metrics, plots, OOD threshold, model card)",
        description="Evaluate RUN_DIR's best model on a split of its manifest (the validation split is always "
                    "evaluated too: collapse check and abstention threshold are chosen on it).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="split to report (default test)")
    p.add_argument("--ood", metavar="DIR", action="append", default=[],
                   help="folder of out-of-distribution images to report AUROC against (repeatable)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95 %% intervals")
    p.add_argument("--audit", action="store_true",
                   help="also run the shortcut audit on --split: colour-only baseline, accuracy under grayscale, "
                        "colour normalisation, stain jitter, background flattening, heatmap mass on white cells "
                        "(writes audit.json, plots/audit_*.png and a card section)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from .evaluate import evaluate_run

    if args.bootstrap < 100:
        raise UsageError("--bootstrap needs at least 100 resamples for a 95 % interval")
    cache = model = None
    if args.audit:  # share the model and the decoded images between evaluation and audit
        from .audit_run import load_run_model
        from .dataset import ImageCache
        from .rundir import RunDir

        rd = RunDir(args.run_dir)
        rd.require(rd.config_path, rd.manifest_path, rd.model_path)
        cache, model = ImageCache(), load_run_model(rd.path)
    results = evaluate_run(args.run_dir, (args.split,), args.ood, n_resamples=args.bootstrap, cache=cache, model=model)
    for split, m in results.items():
        ci = m["intervals"]["accuracy"]
        warn = f"  COLLAPSED: {', '.join(m['collapsed_classes'])}" if m["collapsed_classes"] else ""
        print(f"{split}: n={m['n']} accuracy {m['accuracy']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]  "
              f"macro-F1 {m['macro_f1']:.4f}  ECE {m['ece']:.4f}  ({m['split_kind']} split){warn}")
        gallery = f", shown in {args.run_dir}/{m['errors_plot']}" if m.get("errors_plot") else ""
        print(f"  misclassified {m['misclassified']} of {m['n']}{gallery}; "
              f"every answer: {args.run_dir}/{m['predictions_file']}")
    if args.audit:
        from .audit_run import audit_run, summary_lines
        from .evaluate import write_card

        report = audit_run(args.run_dir, args.split, n_boot=args.bootstrap, cache=cache, model=model)
        write_card(args.run_dir, results)
        print("\n".join(summary_lines(report)))
        print(f"audit: {args.run_dir}/audit.json, plots: " + ", ".join(report["plots"].values()))
    print(f"model card: {args.run_dir}/model_card.md")
    return 0
