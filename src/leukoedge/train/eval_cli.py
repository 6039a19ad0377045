"""``leukoedge eval RUN_DIR``: metrics, plots, abstention threshold and model card for a run.

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from .evaluate import evaluate_run

    if args.bootstrap < 100:
        raise UsageError("--bootstrap needs at least 100 resamples for a 95 % interval")
    results = evaluate_run(args.run_dir, (args.split,), args.ood, n_resamples=args.bootstrap)
    for split, m in results.items():
        ci = m["intervals"]["accuracy"]
        warn = f"  COLLAPSED: {', '.join(m['collapsed_classes'])}" if m["collapsed_classes"] else ""
        print(f"{split}: n={m['n']} accuracy {m['accuracy']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]  "
              f"macro-F1 {m['macro_f1']:.4f}  ECE {m['ece']:.4f}  ({m['split_kind']} split){warn}")
    print(f"model card: {args.run_dir}/model_card.md")
    return 0
