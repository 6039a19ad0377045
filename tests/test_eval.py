"""Evaluation: metrics against hand-computed values, the collapse warning, OOD threshold, model card, CLI."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoedge.data.records import Manifest, ManifestEntry
from leukoedge.files import write_json
from leukoedge.stats import metrics as SM
from leukoedge.stats.calibration import expected_calibration_error
from leukoedge.stats.metrics import auroc
from leukoedge.stats.thresholds import quantile_threshold
from leukoedge.train import metrics as M
from leukoedge.train.ood import max_softmax
from leukoedge.train.rundir import RunConfig, RunDir, read_json

# ---------------------------------------------------------------- pure metrics


Y = np.array([0, 0, 0, 1, 1, 2])
PRED = np.array([0, 0, 1, 1, 2, 2])


def test_confusion_and_per_class_by_hand():
    cm = SM.confusion_matrix(Y, PRED, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    prf = SM.per_class_prf(cm)
    # class 0: tp 2, predicted 2, true 3 -> P 1, R 2/3, F1 0.8
    # class 1: tp 1, predicted 2, true 2 -> P 1/2, R 1/2, F1 1/2
    # class 2: tp 1, predicted 2, true 1 -> P 1/2, R 1, F1 2/3
    np.testing.assert_allclose(prf["precision"], [1, 0.5, 0.5])
    np.testing.assert_allclose(prf["recall"], [2 / 3, 0.5, 1])
    np.testing.assert_allclose(prf["f1"], [0.8, 0.5, 2 / 3])
    assert SM.accuracy(Y, PRED) == pytest.approx(4 / 6)
    assert SM.macro_f1(Y, PRED, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert SM.weighted_f1(Y, PRED, 3) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)


def test_never_predicted_class_has_zero_precision_not_nan():
    prf = SM.per_class_prf(SM.confusion_matrix([0, 1], [0, 0], 2))
    assert prf["precision"].tolist() == [0.5, 0.0] and prf["f1"][1] == 0.0


def test_roc_auc_by_hand_with_ties():
    # Classic example: positives 0.35, 0.8; negatives 0.1, 0.4 -> 3 of 4 pairs ordered -> 0.75.
    assert SM.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == pytest.approx(0.75)
    # One tie between a positive and a negative counts 1/2: pairs (0.5>0.2 yes, 0.5=0.5 half) -> 0.75.
    assert SM.roc_auc(np.array([0.2, 0.5, 0.5]), np.array([0, 0, 1], bool)) == pytest.approx(0.75)
    assert np.isnan(SM.roc_auc(np.array([0.1, 0.2]), np.array([1, 1], bool)))
    fpr, tpr = SM.roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_ece_by_hand():
    # Two bins used: conf 0.9 (2 images, 1 correct: |0.5-0.9| = 0.4) and conf 0.6 (2 images, both correct: 0.4).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == pytest.approx(0.0)


def test_bootstrap_interval_is_reproducible_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    probs[np.arange(150), y[:150]] += 2  # 150 of 200 made correct
    probs /= probs.sum(1, keepdims=True)
    stat = lambda yy, pp: SM.accuracy(yy, pp.argmax(1))  # noqa: E731
    lo, hi = M.bootstrap_ci(stat, y, probs, n_resamples=300, seed=0)
    assert (lo, hi) == M.bootstrap_ci(stat, y, probs, n_resamples=300, seed=0)
    assert lo < stat(y, probs) < hi and hi - lo < 0.2


def test_summarize_flags_a_degenerate_all_one_class_predictor():
    y = np.array([0, 1, 2, 3, 0, 1])
    probs = np.tile([0.7, 0.1, 0.1, 0.1], (6, 1))
    s = M.summarize(y, probs, ["a", "b", "c", "d"], n_resamples=100)
    assert s["collapsed_classes"] == ["b", "c", "d"] and s["accuracy"] == pytest.approx(2 / 6)
    assert s["per_class"]["a"]["recall"] == 1.0 and s["confusion_matrix"][3] == [1, 0, 0, 0]
    assert json.dumps(M.jsonable(s), allow_nan=False)  # strict JSON: NaN AUCs become null


def test_summary_macro_f1_skips_a_class_the_split_lacks_and_the_card_says_so():
    """Class d is absent from this split and never predicted: macro-F1 averages a, b, c (sklearn's convention)."""
    from leukoedge.train.card import _f1_over

    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 2])
    probs = np.eye(4)[pred] * 0.7 + 0.075
    s = M.summarize(y, probs, ["a", "b", "c", "d"], n_resamples=50)
    assert s["macro_f1_classes"] == ["a", "b", "c"]
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)  # not / 4 with a 0 for d
    assert "d: in neither" in _f1_over(M.jsonable(s))
    full = M.summarize(Y, np.eye(3)[PRED], ["a", "b", "c"], n_resamples=50)
    assert full["macro_f1_classes"] == ["a", "b", "c"] and _f1_over(full) == ""


def test_ood_threshold_and_auroc():
    val = np.array([[0.9, 0.1]] * 95 + [[0.55, 0.45]] * 5)
    t = quantile_threshold(max_softmax(val), 0.05)
    assert 0.55 <= t <= 0.9
    # max-softmax: a LOW score is foreign, so both sides are negated for auroc (higher = more foreign)
    assert auroc(-np.array([0.9, 0.95, 0.99]), -np.array([0.3, 0.5])) == pytest.approx(1.0)
    assert auroc(-np.array([0.5, 0.5]), -np.array([0.5, 0.5])) == pytest.approx(0.5)


# ---------------------------------------------------------------- a degenerate model's run directory

keras = pytest.importorskip("keras")
CLASSES = ("Benign", "Early", "Pre", "Pro")


@pytest.fixture(scope="module")
def degenerate_run(tmp_path_factory) -> Path:
    """A run whose model always answers 'Benign' (what a collapsed published model did), random split."""
    from leukoedge.models import create_model

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    entries = []
    for label in CLASSES:
        (root / label).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
            entries.append(ManifestEntry(path=f"{label}/{i}.png", label=label, split=("train", "val", "test")[i % 3]))
    (root / "ood").mkdir()
    for i in range(5):
        Image.fromarray(np.full((50, 60, 3), 30 * i, np.uint8)).save(root / "ood" / f"{i}.jpg")
    manifest = Manifest(root=str(root), layout="toy", classes=CLASSES, split_kind="random", seed=0,
                        entries=tuple(entries))
    run = tmp_path_factory.mktemp("run")
    rd = RunDir(run)
    model = create_model("leuko-tiny", 32)
    head = model.get_layer("probabilities")
    kernel, bias = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.array([6.0, 0.0, 0.0, 0.0], np.float32)])
    model.save(rd.model_path)
    manifest.save(rd.manifest_path)
    write_json(rd.config_path, RunConfig(model="leuko-tiny", input_size=32, classes=CLASSES, seed=0, epochs=1,
                                         batch_size=4, learning_rate=1e-3, data_root=str(root)).to_dict())
    return run


def test_collapse_warning_fires_and_reaches_metrics_and_card(degenerate_run, caplog):
    from leukoedge.train.evaluate import evaluate_run

    with caplog.at_level(logging.WARNING):
        results = evaluate_run(degenerate_run, ("test",), [Path(read_json(degenerate_run / "config.json")["data_root"]) / "ood"],
                               n_resamples=100)
    assert any("COLLAPSE" in r.message and "Early, Pre, Pro" in r.message for r in caplog.records)
    metrics = read_json(degenerate_run / "metrics.json")
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "split_kind"):
        assert key in metrics
    assert metrics["collapsed_classes"] == ["Early", "Pre", "Pro"] and "collapse_warning" in metrics
    assert metrics["accuracy"] == pytest.approx(0.25) and metrics["split_kind"] == "random"
    assert results["val"]["collapsed_classes"] == ["Early", "Pre", "Pro"]
    card_md = (degenerate_run / "model_card.md").read_text()
    assert "WARNING: COLLAPSE" in card_md
    assert "**random (LEAKY" in card_md  # a random split is flagged in bold
    assert "not a diagnostic device" in card_md
    assert "## Shortcut audit" in card_md and "leukoedge eval RUN_DIR --audit" in card_md  # no audit run yet
    card = read_json(degenerate_run / "model_card.json")
    assert card["data"]["leaky"] is True and card["collapse_warning"]
    ood = read_json(degenerate_run / "ood.json")
    assert ood["score"] == "max_softmax" and ood["auroc"]["ood"]["n"] == 5
    for png in ("confusion_matrix", "roc", "reliability", "confusion_matrix_val"):
        assert (degenerate_run / "plots" / f"{png}.png").exists()


def test_eval_cli(degenerate_run, capsys):
    from leukoedge.train import eval_cli

    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", str(degenerate_run), "--split", "test", "--bootstrap", "200"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "test: n=8 accuracy 0.2500" in out and "COLLAPSED" in out
    # no --ood: the OOD folder of the earlier evaluation is scored again, not dropped
    assert read_json(degenerate_run / "ood.json")["auroc"]["ood"]["n"] == 5


def test_eval_without_ood_keeps_a_vanished_folder_as_stale(degenerate_run, tmp_path):
    from leukoedge.train.evaluate import evaluate_run

    ood_dir = Path(read_json(degenerate_run / "config.json")["data_root"]) / "ood"
    evaluate_run(degenerate_run, ("test",), [ood_dir], n_resamples=50)
    moved = ood_dir.rename(tmp_path / "ood-moved")
    try:
        evaluate_run(degenerate_run, ("test",), n_resamples=50)
    finally:
        moved.rename(ood_dir)
    entry = read_json(degenerate_run / "ood.json")["auroc"]["ood"]
    assert entry["stale"] is True and entry["n"] == 5 and "earlier" in entry["note"]


def test_eval_refuses_an_incomplete_run_dir(tmp_path):
    from leukoedge.errors import RunError
    from leukoedge.train.evaluate import evaluate_run

    with pytest.raises(RunError):
        evaluate_run(tmp_path)


def test_eval_keeps_every_answer_and_shows_the_misclassified_images(degenerate_run):
    """predictions.csv has one row per test image in manifest order; errors.png and the card name the errors."""
    from leukoedge.train.evaluate import evaluate_run
    from leukoedge.train.predictions import read_predictions

    results = evaluate_run(degenerate_run, ("test",), n_resamples=100)
    manifest = Manifest.load(degenerate_run / "manifest.json")
    rows = read_predictions(degenerate_run / "predictions.csv")
    assert [r.path for r in rows] == [e.path for e in manifest.subset("test")]
    assert all(r.predicted == "Benign" for r in rows)  # the model always answers Benign
    assert [r.correct for r in rows] == [e.label == "Benign" for e in manifest.subset("test")]
    assert all(abs(sum(r.probabilities.values()) - 1) < 1e-4 and r.confidence == max(r.probabilities.values())
               for r in rows)
    assert len(read_predictions(degenerate_run / "predictions_val.csv")) == len(manifest.subset("val"))
    assert results["test"]["misclassified"] == 6 and results["test"]["errors_plot"] == "plots/errors.png"
    with Image.open(degenerate_run / "plots" / "errors.png") as im:
        assert im.width > 200 and im.height > 100
    card_md = (degenerate_run / "model_card.md").read_text()
    assert "misclassified: 6 of 8 images, shown in `plots/errors.png`" in card_md
    assert read_json(degenerate_run / "metrics.json")["predictions_file"] == "predictions.csv"


def test_errors_are_ordered_by_confidence_and_a_gallery_without_errors_is_removed(tmp_path):
    from leukoedge.train.evaluate import _write_answers
    from leukoedge.train.predictions import errors_by_confidence, read_predictions

    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    assert errors_by_confidence(y, probs).tolist() == [3, 1]  # 0.7 wrong before 0.6 wrong
    rd = RunDir(tmp_path)
    entries = [ManifestEntry(path=f"a/{i}.png", label="x", split="test") for i in range(4)]
    x = np.zeros((4, 16, 16, 3), np.uint8)
    assert _write_answers(rd, "test", x, entries, y, probs, ("A", "B"))["misclassified"] == 2
    assert rd.errors_plot_path("test").exists()
    out = _write_answers(rd, "test", x, entries, y, np.eye(2)[y], ("A", "B"))
    assert out == {"misclassified": 0, "predictions_file": "predictions.csv", "errors_plot": None}
    assert not rd.errors_plot_path("test").exists()  # no stale picture of another model's errors
    assert all(r.correct for r in read_predictions(rd.predictions_path("test")))


def test_reading_predictions_refuses_a_foreign_file(tmp_path):
    from leukoedge.errors import RunError
    from leukoedge.train.predictions import read_predictions

    with pytest.raises(RunError, match="not found") as err:
        read_predictions(tmp_path / "missing.csv")
    assert "leukoedge eval" in err.value.hint
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RunError, match="not a leukoedge predictions file"):
        read_predictions(tmp_path / "other.csv")
    (tmp_path / "bad.csv").write_text("path,root,label,predicted,confidence,correct,p_A\nx,zero,A,A,1,1,1\n")
    with pytest.raises(RunError, match="cannot be read"):
        read_predictions(tmp_path / "bad.csv")


def test_pooled_predictions_need_every_fold_and_say_which_fold_answered(tmp_path):
    from leukoedge.train.predictions import pool_predictions, write_predictions

    y, probs = np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]])
    paths = []
    for k in (1, 2):
        entries = [ManifestEntry(path=f"f{k}/{i}.png", label="x", split="test") for i in range(2)]
        paths.append((k, write_predictions(tmp_path / f"p{k}.csv", entries, y, probs, ("A", "B"))))
    out = tmp_path / "predictions.csv"
    assert pool_predictions(paths, out) == 4
    lines = out.read_text().splitlines()
    assert lines[0].startswith("fold,path,") and lines[1].startswith("1,f1/0.png") and lines[4].startswith("2,f2/1.png")
    assert pool_predictions([*paths, (3, tmp_path / "missing.csv")], out) is None and not out.exists()
