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
from .training_scale import card_markdown as scale_markdown
from .training_scale import card_section as scale_section

#: Layouts of the Taleqani ALL set, whose known traits (slide colour per class, a burnt-in scale-bar label)
#: the card may name; for any other dataset the card says only what the run's own data show (issue 14).
TALEQANI_LAYOUTS = frozenset({"taleqani", "taleqani-segmented"})


def intended_use(classes) -> str:
    """What the model is for, in the run's own classes (no dataset it was not trained on is named)."""
    return (f"Research on automated classification of blood-smear images into the classes of its training data "
            f"({', '.join(classes)}). " + RESEARCH_NOTICE + " Not for clinical decisions, screening or triage.")


def limitations(manifest: Manifest) -> list[str]:
    """Limitations that hold for THIS run's data: its split kind, and dataset traits only for that dataset."""
    out = ["Trained and tested on images from the same source; accuracy on other labs, stains, microscopes or "
           "cameras is unknown and usually lower (see the abstention section)."]
    has_groups = any(e.group for e in manifest.entries)
    if manifest.leaky:
        out.append("The split is image-level random: neighbouring captures and images of one patient fall into "
                   "both train and test, so the test figures overstate accuracy on new slides.")
    elif has_groups:
        out.append("Images are split by group (e.g. patient or slide): no group appears in two splits.")
    else:
        out.append("Without patient or slide ids, a block split by capture order is the best available guard "
                   "against leakage; images of one patient may still appear in more than one split.")
    if manifest.layout in TALEQANI_LAYOUTS:
        out.append("Background colour and illumination differ between classes in the Taleqani data, and every field "
                   "carries a burnt-in scale-bar label: a model can score well by learning the slide instead of the "
                   "cells (see the shortcut audit). Check heatmaps before trusting a result.")
    else:
        out.append("Anything that differs between the classes besides the cells (stain batch, camera, image size, "
                   "background) can be learned instead of the cells: read the shortcut audit and "
                   "`leukoedge data check` before trusting a result.")
    out.append("Confidence is not a probability of disease; abstention only flags inputs unlike the validation images.")
    return out


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
        "intended_use": intended_use(config.classes),
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
                     "consistency": config.extra.get("consistency"), "init": config.extra.get("init"),
                     "distill": config.extra.get("distill"), "averaging": config.extra.get("averaging"),
                     **(training or {})},
        "metrics": {split: {k: m[k] for k in ("n", "accuracy", "macro_f1", "macro_f1_classes", "weighted_f1", "ece",
                                               "macro_auc", "intervals", "per_class", "confusion_matrix",
                                               "misclassified", "predictions_file", "errors_plot") if k in m}
                    for split, m in metrics.items()},
        "collapse_warning": collapse or None,
        "scale": scale_section(config.scale, config.preprocess_spec, config.scale_jitter),
        "ood": ood,
        "shortcut_audit": audit_section(audit),
        "limitations": limitations(manifest),
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


def _f1_over(m: dict) -> str:
    """Which classes macro-F1 averages when the split lacks some (and the model never predicts them)."""
    over, all_classes = m.get("macro_f1_classes"), list(m.get("per_class") or {})
    if over is None or len(over) == len(all_classes):
        return ""
    missing = [c for c in all_classes if c not in over]
    return (f" (averaged over the {len(over)} classes in this split's labels or predictions; "
            f"{', '.join(missing)}: in neither)")


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
    if aug.get("scale_jitter"):
        ops.append(f"scale jitter +-{100 * aug['scale_jitter']:g} % (zoom about the centre, background-filled)")
    return "; " + ", ".join(ops) if ops else ""


def kept_epoch_text(t: dict) -> str:
    """", kept epoch E (best val_xxx = ...)" for the epoch line: which epoch ``model.keras`` is, and why.

    Runs older than ``--select`` were kept on val_loss and carry ``best_val_loss`` only.
    """
    epoch = t.get("best_epoch")
    if epoch is None:
        return ""
    select = t.get("select") or "val_loss"
    kept = dict(t.get("kept") or {})
    kept.setdefault("val_loss", t.get("best_val_loss"))
    value = kept.get(select)
    text = f", kept epoch {epoch} (best {select} = " + ("n/a" if value is None else f"{value:.4f}")
    other = "val_loss" if select == "val_accuracy" else "val_accuracy"
    if kept.get(other) is not None:
        text += f"; its {other} {kept[other]:.4f}"
    return text + (")" + (", stopped early" if t.get("stopped_early") else ""))


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
              f"- epochs {t.get('epochs_run', t['epochs'])} of max {t['epochs']}{kept_epoch_text(t)}, "
              f"batch {t['batch_size']}, "
              f"learning rate {t['learning_rate']}, seed {t['seed']}",
              f"- augmentation: {t['augmentation'].get('recipe', 'custom')} "
              f"({'on' if t['augmentation'].get('enabled') else 'off'}){_cell_ops(t['augmentation'])}",
              f"- loss: {t.get('loss', 'sparse categorical cross-entropy')}"] + distill_markdown(t.get("distill")) \
        + averaging_markdown(t.get("averaging")) + init_markdown(t.get("init"))
    if t.get("train_seconds") is not None:
        lines.append(f"- training time {t['train_seconds']:.0f} s on {t.get('devices', '?')}")
    lines += ["", "## Scale", ""] + scale_markdown(card.get("scale"))
    lines += ["", "## Metrics", ""]
    for split, m in card["metrics"].items():
        lines += [f"### {split} ({m['n']} images)", "",
                  f"- accuracy {_pct(m['accuracy'])}{_interval(m, 'accuracy')}",
                  f"- macro F1 {m['macro_f1']:.4f}{_interval(m, 'macro_f1', pct=False)}{_f1_over(m)}",
                  f"- weighted F1 {m['weighted_f1']:.4f}{_interval(m, 'weighted_f1', pct=False)}",
                  f"- ECE {m['ece']:.4f}{_interval(m, 'ece', pct=False)}; macro one-vs-rest ROC AUC "
                  + ("n/a" if m.get("macro_auc") is None else f"{m['macro_auc']:.4f}"),
                  *_answers_line(m),
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


def _answers_line(m: dict) -> list[str]:
    """Where the split's per-image answers and its misclassified images are (runs evaluated since they are kept)."""
    if m.get("predictions_file") is None:
        return []
    gallery = f", shown in `{m['errors_plot']}`" if m.get("errors_plot") else ""
    return [f"- misclassified: {m['misclassified']} of {m['n']} images{gallery}; every image's answer in "
            f"`{m['predictions_file']}`"]


def averaging_markdown(averaging: dict | None) -> list[str]:
    """The card's line on weight averaging (``--ema``; nothing for a run without it)."""
    if not averaging:
        return []
    return [f"- weights: exponential moving average, momentum {averaging['momentum']:g} "
            f"(~{averaging['horizon_steps']} steps); validated, kept and exported from the average"]


def distill_markdown(distill: dict | None) -> list[str]:
    """The card's lines on distillation: which runs taught the model and how good their targets were."""
    if not distill:
        return []
    lines = [f"- distilled from {len(distill['teachers'])} teacher run(s), alpha {distill['alpha']:g}, "
             f"T {distill['temperature']:g}"
             + (f"; their mean is right on {100 * distill['target_train_accuracy']:.1f} % of the training images"
                if distill.get("target_train_accuracy") is not None else "")]
    for t in distill["teachers"]:
        acc = f", {100 * t['train_accuracy']:.1f} % on the training images" if t.get("train_accuracy") is not None \
            else ""
        lines.append(f"  - `{t['run']}` ({t['model']} at {t['input_size']} px, {t['colour']}{acc}; "
                     f"model.keras sha256 `{t['sha256'][:16]}...`)")
    return lines


def init_markdown(init: dict | None) -> list[str]:
    """The card's lines on the initial weights: from scratch, or which backbone and what it was trained on."""
    if not init:
        return ["- initial weights: random (trained from scratch)"]
    prov = init.get("provenance") or {}
    lines = [f"- initial weights: backbone **{init['name']} v{init['version']}** ({init['model']} feature extractor, "
             f"{init['layers']} layers; the classifier is new), file sha256 `{init['sha256'][:16]}...`, "
             f"trained at {init['input_size']} px on {init['colour']} images"]
    if prov:
        lines.append(f"  - backbone data: {prov.get('data', '?')}")
        for key in ("held_out", "excluded", "labels"):
            if prov.get(key):
                lines.append(f"  - {key.replace('_', ' ')}: {prov[key]}")
    return lines


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
              f"`{a['colour_step']}`; 95 % intervals in brackets (Wilson for accuracies, bootstrap for the heatmap), and every drop is tested on the same images (exact McNemar). Every perturbation keeps the cells' "
              "shape: a model that reads morphology should hardly move.", ""]
    lines += ["**Reading:**", ""] + [f"- {r}" for r in a["readings"]] + [""]
    # The benign-vs-malignant column only when the labels say which class is benign.
    has_bvm = any("benign_vs_malignant_accuracy" in p for p in a["perturbations"].values())
    if has_bvm:
        lines += ["| perturbation | accuracy | benign vs malignant | agreement with clean |", "|---|---|---|---|"]
    else:
        lines += ["| perturbation | accuracy | agreement with clean |", "|---|---|---|"]
    for name, p in a["perturbations"].items():
        bvm = f" {_ci(p.get('benign_vs_malignant_accuracy'))} |" if has_bvm else ""
        lines.append(f"| {name} ({p['description']}) | {_ci(p['accuracy'])} |{bvm} {_ci(p['agreement_with_clean'])} |")
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


# --- cross-validation card (``leukoedge train --folds K``, see :mod:`.folds`) ----------------------------

CV_READING = ("The spread between folds is what one held-out split of this data could have reported: on a few "
              "hundred images, which block or group is held out moves accuracy by more than most modelling "
              "choices. Quote the mean +/- sd (or the pooled figure with the fold range), not one fold.")
CV_DEPLOY = ("These figures describe the recipe (model, options, data), not one network. Each `fold-k/` is a "
             "complete run with its own card that `leukoedge convert` accepts; its own test figure is one fold's.")


def build_cv_card(cv: dict, config: RunConfig | None, manifest: Manifest) -> dict:
    """The CV run's card as a JSON-ready dict: ``cv.json`` plus what was trained (fold 1's config and manifest)."""
    options = cv.get("options", {})
    return {
        "model": options.get("model") or (config.model if config else None),
        "leukoedge_version": __version__,
        "notice": RESEARCH_NOTICE,
        "intended_use": intended_use(cv["classes"]),
        "classes": cv["classes"],
        "training": None if config is None else {
            "input_size": config.input_size, "epochs": config.epochs, "batch_size": config.batch_size,
            "learning_rate": config.learning_rate, "seed": config.seed,
            "augmentation": config.augmentation.get("recipe"), "colour": config.colour,
            "select": config.extra.get("select", "val_loss"), "patience": config.extra.get("patience"),
            "loss": config.extra.get("loss"), "scale_jitter": config.scale_jitter,
            "init": config.extra.get("init"), "averaging": config.extra.get("averaging"),
            "scale": scale_section(config.scale, config.preprocess_spec, config.scale_jitter)},
        "cross_validation": cv,
        "limitations": limitations(manifest),
    }


def render_cv_markdown(card: dict) -> str:
    cv = card["cross_validation"]
    lines = [f"# Model card: {card['model']}, {cv['k']}-fold cross-validation", "", f"> **{card['notice']}**", ""]
    if not cv["complete"]:
        lines += [f"> **Incomplete: {cv['folds_done']} of {cv['k']} folds finished. Continue with "
                  "`leukoedge train --resume --model M --out RUN`.**", ""]
    collapsed = [f"fold {f['fold']}: {', '.join(f['collapsed_classes'])}" for f in cv["folds"] if f["collapsed_classes"]]
    if collapsed:
        lines += [f"> **WARNING: COLLAPSE (recall 0) in {'; '.join(collapsed)}.**", ""]
    lines += ["## Intended use", "", card["intended_use"], ""]
    t = card.get("training")
    if t:
        lines += ["## Training (every fold)", "",
                  f"- input {t['input_size']}x{t['input_size']} RGB, colour step `{t['colour']}`; max {t['epochs']} "
                  f"epochs, batch {t['batch_size']}, learning rate {t['learning_rate']}, seed {t['seed']}, "
                  f"augmentation {t['augmentation']}",
                  f"- checkpoint kept by `{t['select']}` (early-stopping patience {t['patience']} epochs)",
                  f"- loss: {t['loss']}", *init_markdown(t.get("init")), ""]
        if t.get("scale"):
            lines += ["## Scale (fold 1; each fold-k/config.json records its own training split's)", "",
                      *scale_markdown(t["scale"]), ""]
    lines += cv_markdown(cv)
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    lines += ["", f"_Generated by leukoedge {card['leukoedge_version']}._", ""]
    return "\n".join(lines)


def cv_markdown(cv: dict) -> list[str]:
    """The "Cross-validation" section: per-fold table, mean +/- sd, pooled accuracy and confusion matrix."""
    kind = f"**{cv.get('split_kind')} (LEAKY: image-level random folds, accuracy is overstated)**" \
        if cv.get("leaky") else cv.get("split_kind")
    lines = ["## Cross-validation", "",
             f"- {cv['k']} folds over `{cv.get('root')}` ({cv.get('n_images')} images), split kind {kind}: each "
             f"image is in exactly one fold's test set; duplicate clusters and groups never straddle a fold",
             f"- validation per fold: {cv.get('val_from') or 'n/a'}; never overlaps the fold's test set",
             f"- shortcut audit: {cv.get('audit', 'n/a')}",
             f"- time: {cv.get('wall_seconds', 0):.0f} s wall, {cv.get('train_seconds', 0):.0f} s in training epochs",
             "",
             "| fold | train / val / test images | test accuracy (95 % CI) | macro-F1 | kept epoch (criterion value) "
             "| epochs run |", "|---|---|---|---|---|---|"]
    for f in cv["folds"]:
        iv = f.get("accuracy_interval") or {}
        ci = f" [{_pct(iv.get('low'))}, {_pct(iv.get('high'))}]" if iv.get("low") is not None else ""
        value = (f.get("kept") or {}).get(f.get("select"))
        kept = f"{f['kept_epoch']} ({f['select']} {value:.4f})" if value is not None else f"{f['kept_epoch']}"
        early = ", stopped early" if f.get("stopped_early") else ""
        lines.append(f"| {f['fold']} | {f['n_train']} / {f['n_val']} / {f['n_test']} | {_pct(f['accuracy'])}{ci} "
                     f"| {f['macro_f1']:.4f} | {kept} | {f['epochs_run']}{early} |")
    pooled = cv["pooled"]
    sd = "n/a" if cv["accuracy_sd"] is None else f"{100 * cv['accuracy_sd']:.1f}"
    f1_sd = "n/a" if cv["macro_f1_sd"] is None else f"{cv['macro_f1_sd']:.4f}"
    piv = pooled.get("accuracy_interval") or {}
    lines += ["",
              f"- **accuracy over folds: {100 * cv['accuracy_mean']:.1f} +/- {sd} %** (mean +/- {cv['sd']}); "
              f"range {_pct(min(f['accuracy'] for f in cv['folds']))} to {_pct(max(f['accuracy'] for f in cv['folds']))}",
              f"- macro-F1 over folds: {cv['macro_f1_mean']:.4f} +/- {f1_sd}",
              f"- pooled over all {pooled['n']} held-out images: accuracy {_pct(pooled['accuracy'])}"
              + (f" (95 % CI {_pct(piv['low'])} to {_pct(piv['high'])}, Wilson score with images taken as "
                 "independent: narrower than the fold spread, as it ignores that the fold models differ)" if piv else "")
              + f", macro-F1 {pooled['macro_f1']:.4f}",
              *([f"- every held-out image's answer, by the fold model that never saw it: `{cv['predictions_file']}` "
                 "(`fold` column; each fold's misclassified images: `fold-k/plots/errors.png`)"]
                if cv.get("predictions_file") else []),
              "", "Pooled confusion matrix (rows: true class, columns: predicted):", "",
              "| true \\ predicted | " + " | ".join(cv["classes"]) + " |", "|---|" + "---|" * len(cv["classes"])]
    for c, row in zip(cv["classes"], pooled["confusion_matrix"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", CV_READING, "", CV_DEPLOY]
    return lines
