"""``trust.md``: the abstention and calibration report of a converted model, readable.

Pure formatting of the dict :func:`leukoedge.convert.trust.build` returns
(``trust.json`` holds the same figures). The calibration sentences are shared
with the bundle's model card (:func:`calibration_section`), and say plainly
when the temperature made test calibration worse.
"""
from __future__ import annotations

from .. import RESEARCH_NOTICE


def _f(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def calibration_lines(cal: dict, name: str) -> list[str]:
    """Plain sentences on one model's calibration, shared by the model card and trust.md."""
    worse = cal.get("worse_after")
    lines = [
        f"- {name}: temperature {cal['temperature']:.3f}"
        + (f" (plain NLL fit {cal['temperature_nll']:.3f}; bootstrap {cal['interval_level']:.0%} interval "
           f"[{cal['temperature_interval'][0]:.3f}, {cal['temperature_interval'][1]:.3f}])" if "temperature_nll" in cal else "")
        + f", fitted on {cal.get('fitted_on', 'val')}; test ECE **{cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after**"
        + (f" (bootstrap sd of the test ECE {cal['ece_before_sd']:.4f})" if "ece_before_sd" in cal else ""),
    ]
    if worse:
        lines.append(
            f"  - **the temperature made test calibration worse** ({cal['ece_before']:.4f} -> {cal['ece_after']:.4f}): "
            "the temperature fitted on validation did not transfer to test here (the splits can differ, e.g. "
            "different capture blocks); the difference is "
            + ("within the test ECE's noise" if cal.get("ece_before_sd") and cal["ece_after"] - cal["ece_before"] < cal["ece_before_sd"] else "larger than the test ECE's noise")
        )
    if cal.get("kept_at_1"):
        lines.append(f"  - {cal['kept_at_1']}: a temperature is applied only when it improves calibration on "
                     "validation, so the probabilities are left as they are")
    elif "temperature_nll" in cal and cal["temperature"] == 1.0:
        lines.append("  - the bootstrap interval contains 1: validation does not show the model to be mis-calibrated, "
                     "so its probabilities are left as they are")
    if "ece_after_nll" in cal:
        lines.append(f"  - for comparison, the plain NLL temperature would give test ECE {cal['ece_after_nll']:.4f}")
    if cal.get("at_search_bound"):
        lines.append("  - the NLL temperature sits at the search bound: validation (almost) never errs, so it cannot "
                     "tell how sure the model should be; treat the confidence with care")
    return lines


def calibration_section(trust_report: dict | None, quantize: str) -> list[str]:
    """The model card's 'Calibration' section: float and converted ECE before/after, link to the diagram."""
    if not trust_report or not trust_report.get("calibration") or "ece_before" not in trust_report["calibration"]:
        return []
    cal = trust_report["calibration"]
    how = ("the temperature is chosen on validation only (the end of its bootstrap interval closest to 1, "
           "so confidence is rescaled only as far as validation is sure, and only when it lowers the "
           "validation ECE)" if "temperature_nll" in cal
           else "the temperature is the training run's (convert --no-calibrate)")
    lines = ["", "## Calibration (this bundle: float vs converted)", "",
             f"Expected calibration error (ECE, {cal.get('n_bins', 15)} bins) on the {cal.get('n_test', '')} test images; "
             f"{how}. The device applies the converted model's temperature; the abstention score ignores it.", ""]
    if trust_report.get("calibration_float"):
        lines += calibration_lines(trust_report["calibration_float"], "float Keras model")
    lines += calibration_lines(cal, f"converted model ({quantize}, what the device runs)")
    plot = trust_report.get("reliability_plot")
    if plot:
        lines += ["", f"![Reliability diagram: float and {quantize}, before and after temperature]({plot})",
                  "", f"Reliability diagram: [{plot}]({plot}); tables in trust.md."]
    return lines


def _reliability_table(rel: dict, heading: str) -> list[str]:
    lines = [heading, "", "| confidence bin | images | mean confidence | accuracy |", "|---|---|---|---|"]
    edges = rel["edges"]
    for i, count in enumerate(rel["counts"]):
        if count:
            lines.append(f"| ({edges[i]:.2f}, {edges[i + 1]:.2f}] | {count} | {_f(rel['confidence'][i])} | {_f(rel['accuracy'][i])} |")
    return lines + [""]


def _calibration_md(report: dict) -> list[str]:
    """Float and converted: a comparison table, plain sentences (worse after? say so), reliability tables."""
    cal, fcal = report["calibration"], report.get("calibration_float")
    lines = ["## Calibration", ""]
    if "n_fit" in cal:
        lines += [
            f"Temperature fitted on the {cal['n_fit']} validation images (probabilities clipped at "
            f"{_f(cal.get('fit_log_prob_floor'), '.6g')} before fitting), chosen as the end of the "
            f"{cal['interval_level']:.0%} bootstrap interval ({cal['n_bootstrap']} resamples) of the NLL temperature "
            "closest to 1 (exactly 1 when the interval contains it). Nothing is fitted on test.",
            "",
        ]
    rows = ([("float Keras", fcal)] if fcal else []) + [("converted (device)", cal)]
    lines += [
        "| model | T used | T (plain NLL) | test ECE before | test ECE after | after with plain NLL T | test ECE sd (bootstrap) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in rows:
        lines.append(
            f"| {name} | {c['temperature']:.4f} | {_f(c.get('temperature_nll'), '.4f')} | {c['ece_before']:.4f} | "
            f"**{c['ece_after']:.4f}** | {_f(c.get('ece_after_nll'), '.4f')} | {_f(c.get('ece_before_sd'), '.4f')} |"
        )
    lines.append("")
    for name, c in rows:
        lines += calibration_lines(c, name)
    lines += [
        "- the reported probabilities and confidence use the converted model's temperature; the abstention score does not",
        "",
    ]
    if report.get("reliability_plot"):
        lines += [f"Reliability diagram (float and converted, before and after): [{report['reliability_plot']}]({report['reliability_plot']})", ""]
    lines += _reliability_table(report["reliability_test"]["after"], "Reliability of the converted model on test (after temperature):")
    if report.get("reliability_test_float"):
        lines += _reliability_table(report["reliability_test_float"]["after"], "Reliability of the float model on test (after its temperature):")
    return lines


def to_markdown(report: dict, title: str) -> str:
    ab = report["abstention"]
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
    lines += _calibration_md(report)
    lines += ["", RESEARCH_NOTICE, ""]
    return "\n".join(lines)
