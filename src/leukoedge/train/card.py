"""Model card (JSON + Markdown) for a run: what it is, what it was tested on, what it is not.

The card is generated from files in the run directory only (config,
manifest, metrics, ood, training summary), so it cannot disagree with
them. A random (image-level) split is printed as **LEAKY** in bold, and a
collapsed class (recall 0) is printed as a warning at the top: both are
mistakes published work on this task has made without saying so.
"""
from __future__ import annotations

from .. import RESEARCH_NOTICE, __version__
from ..data.records import Manifest
from .rundir import RunConfig

INTENDED_USE = (
    "Research on automated classification of peripheral blood smear fields (Taleqani ALL classes or the "
    "classes of the training manifest). " + RESEARCH_NOTICE + " Not for clinical decisions, screening or triage."
)

LIMITATIONS = [
    "Trained and tested on images from the same source; accuracy on other labs, stains, microscopes or cameras "
    "is unknown and usually lower (see the out-of-distribution section).",
    "Without patient ids, a block split by capture order is the best available guard against leakage; images "
    "of one patient may still appear in more than one split.",
    "Background colour and illumination differ between classes in the Taleqani data: a model can score well "
    "by learning the slide instead of the cells. Check heatmaps before trusting a result.",
    "Confidence is not a probability of disease; the abstention threshold only flags inputs unlike the "
    "validation images.",
]


AUDIT_HOWTO = ("Not run. `leukoedge eval RUN_DIR --audit` measures whether the model reads the cells or the slide: "
               "a colour-only baseline, accuracy under grayscale, colour normalisation, stain jitter and background "
               "flattening, and how much of the heatmap falls on white cells.")


def build_card(config: RunConfig, manifest: Manifest, metrics: dict[str, dict], ood: dict | None,
               training: dict | None, audit: dict | None = None) -> dict:
    """The card as a JSON-ready dict. ``metrics`` maps split name -> summary from ``metrics.summarize``;
    ``audit`` is ``audit.json`` (see :mod:`.audit_run`) or None when no audit was run."""
    collapse = {split: m.get("collapsed_classes", []) for split, m in metrics.items() if m.get("collapsed_classes")}
    return {
        "model": config.model,
        "leukoedge_version": __version__,
        "notice": RESEARCH_NOTICE,
        "intended_use": INTENDED_USE,
        "input": {"size": config.input_size, "preprocessing": config.preprocess_spec.to_dict(),
                  "pixels": "raw RGB 0..255; the model rescales inside"},
        "classes": list(config.classes),
        "data": {
            "root": manifest.root,
            "layout": manifest.layout,
            "split_kind": manifest.split_kind,
            "leaky": manifest.leaky,
            "split_params": manifest.params,
            "seed": manifest.seed,
            "counts": manifest.counts(),
        },
        "training": {"epochs": config.epochs, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
                     "seed": config.seed, "augmentation": config.augmentation,
                     "loss": config.extra.get("loss", "sparse categorical cross-entropy"),
                     "consistency": config.extra.get("consistency"), **(training or {})},
        "metrics": {split: {k: m[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1", "ece", "macro_auc",
                                               "intervals", "per_class", "confusion_matrix") if k in m}
                    for split, m in metrics.items()},
        "collapse_warning": collapse or None,
        "ood": ood,
        "shortcut_audit": audit_section(audit),
        "limitations": LIMITATIONS,
    }


def audit_section(audit: dict | None) -> dict | None:
    """The card's condensed view of ``audit.json`` (figures and readings, not the per-class counts)."""
    if not audit:
        return None
    keys = ("accuracy", "benign_vs_malignant_accuracy", "agreement_with_clean")
    return {
        "file": "audit.json",
        "stale": bool(audit.get("stale")),
        "split": audit["split"], "split_kind": audit["split_kind"], "leaky": audit["leaky"],
        "n_images": audit["n_images"], "colour_step": audit["colour_step"],
        "clean_accuracy": audit["clean_accuracy"],
        "colour_baseline": {k: v for k, v in audit["colour_baseline"].items() if isinstance(v, dict)},
        "perturbations": {name: {"description": p["description"], **{k: p[k] for k in keys if k in p}}
                          for name, p in audit["perturbations"].items()},
        "heatmap": audit["heatmap"],
        "readings": audit["readings"],
        "plots": audit.get("plots", {}),
    }


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _interval(m: dict, key: str, pct: bool = True) -> str:
    iv = m.get("intervals", {}).get(key)
    if not iv or iv.get("low") is None:
        return ""
    fmt = _pct if pct else (lambda v: f"{v:.4f}")
    return f" (95 % CI {fmt(iv['low'])} to {fmt(iv['high'])})"


def _cell_ops(aug: dict) -> str:
    """The white-cell operations of a recipe, spelled out (a recipe name alone does not say them)."""
    ops = [f"{label} p {aug[key]:g}" for key, label in (("background", "background swap between training images"),
                                                        ("cell_crop", "cell-centred crops")) if aug.get(key)]
    return "; " + ", ".join(ops) if ops else ""


def render_markdown(card: dict) -> str:
    data = card["data"]
    lines = [f"# Model card: {card['model']}", "", f"> **{card['notice']}**", ""]
    if card.get("collapse_warning"):
        for split, classes in card["collapse_warning"].items():
            lines.append(f"> **WARNING: COLLAPSE on {split}: recall 0 for {', '.join(classes)}. "
                         "The model never predicts these classes correctly; do not use it.**")
        lines.append("")
    split_kind = f"**{data['split_kind']} (LEAKY: image-level random split, accuracy is overstated)**" \
        if data["leaky"] else data["split_kind"]
    lines += [
        "## Intended use", "", card["intended_use"], "",
        "## Data", "",
        f"- source: `{data['root']}` (layout `{data['layout']}`)",
        f"- split kind: {split_kind}, seed {data['seed']}",
        f"- classes: {', '.join(card['classes'])}",
        "",
        "| split | " + " | ".join(card["classes"]) + " | total |",
        "|---|" + "---|" * (len(card["classes"]) + 1),
    ]
    for split, counts in data["counts"].items():
        lines.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in card["classes"])
                     + f" | {sum(counts.values())} |")
    t = card["training"]
    lines += ["", "## Training", "",
              f"- input {card['input']['size']}x{card['input']['size']} RGB, raw 0..255 pixels (rescaled inside the model)",
              f"- epochs {t.get('epochs_run', t['epochs'])} of max {t['epochs']}, batch {t['batch_size']}, "
              f"learning rate {t['learning_rate']}, seed {t['seed']}",
              f"- augmentation: {t['augmentation'].get('recipe', 'custom')} "
              f"({'on' if t['augmentation'].get('enabled') else 'off'}){_cell_ops(t['augmentation'])}",
              f"- loss: {t.get('loss', 'sparse categorical cross-entropy')}"]
    if t.get("train_seconds") is not None:
        lines.append(f"- training time {t['train_seconds']:.0f} s on {t.get('devices', '?')}")
    lines += ["", "## Metrics", ""]
    for split, m in card["metrics"].items():
        lines += [f"### {split} ({m['n']} images)", "",
                  f"- accuracy {_pct(m['accuracy'])}{_interval(m, 'accuracy')}",
                  f"- macro F1 {m['macro_f1']:.4f}{_interval(m, 'macro_f1', pct=False)}",
                  f"- weighted F1 {m['weighted_f1']:.4f}{_interval(m, 'weighted_f1', pct=False)}",
                  f"- ECE {m['ece']:.4f}{_interval(m, 'ece', pct=False)}; macro one-vs-rest ROC AUC "
                  + ("n/a" if m.get("macro_auc") is None else f"{m['macro_auc']:.4f}"),
                  "", "| class | precision | recall | F1 | ROC AUC | support |", "|---|---|---|---|---|---|"]
        for c, pc in m["per_class"].items():
            auc = "n/a" if pc["roc_auc"] is None else f"{pc['roc_auc']:.4f}"
            lines.append(f"| {c} | {pc['precision']:.4f} | {pc['recall']:.4f} | {pc['f1']:.4f} | {auc} | {pc['support']} |")
        lines.append("")
    ood = card.get("ood")
    lines += ["## Out-of-distribution abstention", ""]
    if ood:
        lines.append(f"- score `{ood['score']}`; abstain below {ood['threshold']:.4f} "
                     f"(the {100 * ood['quantile']:.0f}th percentile of validation confidence)")
        for name, r in (ood.get("auroc") or {}).items():
            auroc = "n/a" if r.get("auroc") is None else f"{r['auroc']:.4f}"
            lines.append(f"- vs `{name}` ({r['n']} images): AUROC {auroc}, "
                         f"abstains on {_pct(r['abstain_rate'])} of them")
        if ood.get("test_abstain_rate") is not None:
            lines.append(f"- abstains on {_pct(ood['test_abstain_rate'])} of the test split")
    else:
        lines.append("- not computed")
    lines += ["", "## Shortcut audit", ""] + _audit_markdown(card.get("shortcut_audit"))
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    lines += ["", f"_Generated by leukoedge {card['leukoedge_version']}._", ""]
    return "\n".join(lines)


def _ci(d: dict | None) -> str:
    return "n/a" if not d else f"{_pct(d['value'])} [{_pct(d['low'])}, {_pct(d['high'])}]"


def _audit_markdown(a: dict | None) -> list[str]:
    if not a:
        return [AUDIT_HOWTO]
    lines = []
    if a["stale"]:
        lines += ["> **This audit was run on a different model.keras; rerun `leukoedge eval RUN_DIR --audit`.**", ""]
    leaky = " (LEAKY split)" if a["leaky"] else ""
    lines += [f"Split `{a['split']}` ({a['split_kind']}{leaky}, {a['n_images']} images), colour step "
              f"`{a['colour_step']}`; 95 % bootstrap intervals in brackets. Every perturbation keeps the cells' "
              "shape: a model that reads morphology should hardly move.", ""]
    lines += ["**Reading:**", ""] + [f"- {r}" for r in a["readings"]] + [""]
    has_bvm = any("benign_vs_malignant_accuracy" in p for p in a["perturbations"].values())
    lines += ["| perturbation | accuracy | benign vs malignant | agreement with clean |", "|---|---|---|---|"]
    for name, p in a["perturbations"].items():
        bvm = _ci(p.get("benign_vs_malignant_accuracy")) if has_bvm else "n/a"
        lines.append(f"| {name} ({p['description']}) | {_ci(p['accuracy'])} | {bvm} | {_ci(p['agreement_with_clean'])} |")
    lines += ["", "Colour-only baseline (logistic regression on colour statistics, fitted on train, no shape):", ""]
    for kind, b in a["colour_baseline"].items():
        bvm = f"; benign vs malignant {_ci(b['benign_vs_malignant_accuracy'])}" if "benign_vs_malignant_accuracy" in b else ""
        lines.append(f"- {kind}: accuracy {_ci(b['accuracy'])}{bvm}")
    heat = a["heatmap"]
    lines.append("")
    if heat.get("method") and heat.get("mass_on_cells"):
        lines.append(f"Heatmap (CAM of the predicted class) mass on white cells: {_ci(heat['mass_on_cells'])}; "
                     f"chance (mask area) {_ci(heat['chance'])}; excess over chance "
                     f"{100 * heat['excess_over_chance']['value']:+.1f} points "
                     f"[{100 * heat['excess_over_chance']['low']:+.1f}, {100 * heat['excess_over_chance']['high']:+.1f}].")
    else:
        lines.append(f"Heatmap mass: not computed ({heat.get('skipped', 'every heatmap was zero')}).")
    plots = a.get("plots") or {}
    if plots:
        lines.append("")
        lines += [f"![{name}]({path})" for name, path in plots.items()]
    return lines
