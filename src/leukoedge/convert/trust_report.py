"""``trust.md``: the abstention and calibration report of a converted model, readable.

Pure formatting of the dict :func:`leukoedge.convert.trust.build` returns
(``trust.json`` holds the same figures).
"""
from __future__ import annotations

from .. import RESEARCH_NOTICE


def _f(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def to_markdown(report: dict, title: str) -> str:
    ab, cal = report["abstention"], report["calibration"]
    n = report["n"]
    lines = [
        f"# {title}",
        "",
        "Measured on the converted model through the device runtime (numpy on its dequantised outputs).",
        "",
        "## Abstention (\"not like the images this model was trained on\")",
        "",
        f"- score `{ab['score']}` on the model's {ab['uses']}; abstain when the score is {ab['abstain_when']} "
        f"{ab['threshold']:.6g}",
        f"- fitted on {n['train_fit']} training images (stratified subsample)" if ab["score"] != "max_softmax" else
        "- nothing to fit (the top probability, before temperature scaling)",
        f"- threshold chosen on the {n['val']} validation images for {ab['target_abstain_rate']:.1%} abstained "
        f"(got {ab['val_abstain_rate']:.1%})",
        f"- in-distribution test images abstained: **{ab['test_abstain_rate']:.1%}** of {n['test']}",
        "",
    ]
    if report["ood_sets"]:
        lines += [
            "OOD images (" + report["ood_used_for"] + "):",
            "",
            "| OOD set | images | AUROC (all) | AUROC (held-out half) | OOD abstained (all) | OOD abstained (held-out) |",
            "|---|---|---|---|---|---|",
        ]
        for name, f in ab["ood"].items():
            lines.append(
                f"| {name} | {f['n']} | {_f(f['auroc'])} | {_f(f['held_out']['auroc'])} | "
                f"{_f(f['abstain_rate'], '.1%')} | {_f(f['held_out']['abstain_rate'], '.1%')} |"
            )
        lines += ["", "### Scores compared (same outputs, same validation rule; evaluation only)", ""]
        names = list(report["ood_sets"])
        lines.append("| score | test abstained | " + " | ".join(f"AUROC {n} (dev / held-out)" for n in names) + " |")
        lines.append("|---|---|" + "---|" * len(names))
        for score, fig in report["comparison"].items():
            cells = [f"{_f(fig['ood'][n]['dev']['auroc'])} / {_f(fig['ood'][n]['held_out']['auroc'])}" for n in names]
            lines.append(f"| {score} | {fig['test_abstain_rate']:.1%} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["No OOD folders were given (`--ood-dir`), so how well foreign images are flagged is not measured here.", ""]
    lines += [
        "## Calibration",
        "",
        f"- temperature {cal['temperature']:.4f}, fitted on {cal['fitted_on']}"
        + (f" ({cal['n_fit']} images, probabilities clipped at {cal['log_prob_floor']:.6g})" if "n_fit" in cal else ""),
        f"- expected calibration error on {cal['ece_split']} ({cal['n_bins']} bins): "
        f"**{cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after**",
        "- the reported probabilities and confidence use this temperature; the abstention score does not",
        *(["- **the temperature sits at the search bound**: validation (almost) never errs, so it cannot "
           "tell how sure the model should be; treat the confidence with care"] if cal.get("at_search_bound") else []),
        "",
        "Reliability on test (after temperature):",
        "",
        "| confidence bin | images | mean confidence | accuracy |",
        "|---|---|---|---|",
    ]
    rel = report["reliability_test"]["after"]
    edges = rel["edges"]
    for i, count in enumerate(rel["counts"]):
        if count:
            lines.append(f"| ({edges[i]:.2f}, {edges[i + 1]:.2f}] | {count} | {_f(rel['confidence'][i])} | {_f(rel['accuracy'][i])} |")
    lines += ["", RESEARCH_NOTICE, ""]
    return "\n".join(lines)
