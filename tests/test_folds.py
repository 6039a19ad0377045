"""K-fold cross-validation (issue 14): fold manifests, checkpoint selection, ``train --folds K``.

The split tests are pure bookkeeping (no training). The slow tests train
leuko-tiny at 32 px for 2-3 epochs and check mechanisms only (which folds ran,
which epoch was kept, that the figures add up), never what was learned:
outcomes of a short training differ between CPUs (DEVELOPERS.md, "Tests").
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import training_seed
from data_fixtures import make_cnmc, make_taleqani
from leukoedge.cli import main
from leukoedge.data.records import Manifest
from leukoedge.data.split import check_partition, load_folds, make_folds, make_manifest, save_folds
from leukoedge.errors import ManifestError, UsageError
from leukoedge.train.card import kept_epoch_text
from leukoedge.train.folds import summarize_folds, wilson


def _test_fold_of(folds: list[Manifest]) -> dict[str, list[int]]:
    """image path -> the folds whose test set holds it."""
    where: dict[str, list[int]] = {}
    for k, m in enumerate(folds, 1):
        for e in m.subset("test"):
            where.setdefault(e.path, []).append(k)
    return where


def _assert_partition(folds: list[Manifest]) -> None:
    where = _test_fold_of(folds)
    assert set(where) == {e.path for e in folds[0].entries}  # every image is tested ...
    assert all(len(ks) == 1 for ks in where.values())  # ... exactly once
    for m in folds:
        test = {e.path for e in m.subset("test")}
        assert test.isdisjoint(e.path for e in m.subset("val")) and test.isdisjoint(e.path for e in m.subset("train"))
        assert m.subset("val") and all(m.counts()["train"].values())


# --- fold manifests (no training) -------------------------------------------------------------------------

def test_block_folds_rotate_the_capture_order_blocks(tmp_path):
    folds = make_folds(make_taleqani(tmp_path, per_class=20), folds=5, progress=False)
    assert len(folds) == 5 and all(m.split_kind == "block" and not m.leaky for m in folds)
    _assert_partition(folds)
    for k, m in enumerate(folds):
        assert m.params["fold"] == k + 1 and m.params["folds"] == 5
        for label in m.classes:
            seq = [e.split for e in sorted((e for e in m.entries if e.label == label), key=lambda e: e.order)]
            assert seq[4 * k:4 * k + 4] == ["test"] * 4 and seq.count("test") == 4  # block k, in capture order
            before = [seq[(4 * k - 1 - j) % 20] for j in range(3)]  # val: the 3 images just before the block
            assert before == ["val"] * 3 and seq.count("val") == 3
    # A block split has nothing to shuffle: the seed changes no fold (the folds are what rotates the block).
    again = make_folds(make_taleqani(tmp_path / "b", per_class=20), folds=5, seed=7, progress=False)
    assert [[e.split for e in m.entries] for m in again] == [[e.split for e in m.entries] for m in folds]


def test_a_duplicate_lands_in_one_test_fold_and_one_split(tmp_path):
    root = make_taleqani(tmp_path, per_class=20)
    pro = root / "Original" / "Pro"
    shutil.copyfile(pro / "WBC-Malignant-Pro-002.jpg", pro / "WBC-Malignant-Pro-019.jpg")  # blocks 1 and 5
    folds = make_folds(root, folds=5, progress=False)
    _assert_partition(folds)
    names = ("Original/Pro/WBC-Malignant-Pro-002.jpg", "Original/Pro/WBC-Malignant-Pro-019.jpg")
    assert {tuple(_test_fold_of(folds)[n]) for n in names} == {(1,)}  # the earliest member's fold
    for m in folds:
        assert len({e.split for e in m.entries if e.path in names}) == 1
    assert folds[0].params["duplicate_clusters"] == 1 and folds[0].params["moved_to_keep_duplicates_together"] >= 1


def test_group_folds_keep_patients_and_duplicates_together(tmp_path):
    root = make_cnmc(tmp_path)
    hem = root / "training_data" / "fold_0" / "hem"
    shutil.copyfile(root / "training_data" / "fold_2" / "all" / "UID_3_0_1_all.bmp", hem / "UID_H10_5_1_hem.bmp")
    folds = make_folds(root, folds=3, seed=training_seed(), progress=False)
    assert all(m.split_kind == "group" for m in folds)
    _assert_partition(folds)
    tested_in: dict[str, set[int]] = {}
    for k, m in enumerate(folds, 1):
        where: dict[str, set[str]] = {}
        for e in m.entries:
            where.setdefault(e.group, set()).add(e.split)
            if e.split == "test":
                tested_in.setdefault(e.group, set()).add(k)
        assert all(len(s) == 1 for s in where.values()), where  # no patient straddles train/val/test
        tied = {e.split for e in m.entries if e.group in ("patient-3", "patient-H10")}
        assert len(tied) == 1  # a duplicate across two patients ties both of them
    assert all(len(ks) == 1 for ks in tested_in.values()) and len(tested_in) == 12  # each patient tested once


def test_data_split_cli_writes_k_manifests_and_an_index(tmp_path, capsys):
    root = make_taleqani(tmp_path / "d", per_class=10)
    out = tmp_path / "folds"
    assert main(["data", "split", str(root), "--folds", "3", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "each image in exactly one test set" in said and "wrote 3 fold manifests" in said
    assert sorted(p.name for p in out.iterdir()) == ["fold-1.json", "fold-2.json", "fold-3.json", "folds.json"]
    index = json.loads((out / "folds.json").read_text())
    assert index["folds"] == 3 and index["manifests"] == ["fold-1.json", "fold-2.json", "fold-3.json"]
    assert sum(index["test_counts"]) == 40
    folds = load_folds(out)
    assert load_folds(out / "folds.json")[2].to_dict() == folds[2].to_dict()
    _assert_partition(folds)
    # --folds 1 is today's single manifest.
    assert main(["data", "split", str(root), "--folds", "1", "--out", str(tmp_path / "one.json")]) == 0
    assert Manifest.load(tmp_path / "one.json").to_dict() == make_manifest(root, progress=False).to_dict()
    # Contradictions are refused with a hint, never rewritten.
    assert main(["data", "split", str(root), "--folds", "3", "--test", "0.2", "--out", str(out)]) == 2
    assert main(["data", "split", str(root), "--folds", "0", "--out", str(out)]) == 2
    assert main(["data", "split", str(root), "--folds", "8", "--out", str(out)]) == 4  # 10 per class < 2 x 8
    assert "fewer --folds" in capsys.readouterr().err


def test_folds_that_do_not_partition_are_refused(tmp_path):
    root = make_taleqani(tmp_path / "d", per_class=10)
    folds = make_folds(root, folds=3, progress=False)
    with pytest.raises(ManifestError, match="test sets of folds 1 and 2"):
        check_partition([folds[0], folds[0], folds[2]])
    with pytest.raises(ManifestError, match="in no fold's test set"):
        check_partition(folds[:2])
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(UsageError, match="folder"):
        save_folds(folds, tmp_path / "m.json")
    with pytest.raises(UsageError, match="val"):
        make_folds(root, folds=3, val=0, progress=False)


# --- selection, summary and card (pure) --------------------------------------------------------------------

def test_checkpoint_rule_of_each_criterion():
    pytest.importorskip("keras")
    from leukoedge.train.trainer import is_better

    assert is_better("val_loss", 0.5, 0.1, None, None)
    assert is_better("val_loss", 0.4, 0.1, 0.5, 0.9) and not is_better("val_loss", 0.6, 1.0, 0.5, 0.1)
    assert is_better("val_accuracy", 0.9, 0.80, 0.3, 0.75)  # higher accuracy wins even with a higher loss
    assert not is_better("val_accuracy", 0.1, 0.70, 0.3, 0.75)  # lower accuracy loses even with a lower loss
    assert is_better("val_accuracy", 0.2, 0.75, 0.3, 0.75)  # a tie is broken by the lower loss ...
    assert not is_better("val_accuracy", 0.4, 0.75, 0.3, 0.75)  # ... only
    assert not is_better("val_loss", float("nan"), 1.0, None, None)
    assert not is_better("val_accuracy", float("nan"), 1.0, None, None)


def test_select_is_validated_with_a_hint(tmp_path, capsys):
    pytest.importorskip("keras")
    from leukoedge.train.trainer import TrainOptions

    with pytest.raises(UsageError, match="val_loss, val_accuracy") as err:
        TrainOptions(out=tmp_path, model="leuko-tiny", resume=True, select="accuracy")
    assert err.value.hint
    root = make_taleqani(tmp_path / "d", per_class=10)
    assert main(["train", "--data", str(root), "--model", "leuko-tiny", "--select", "loss",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--select must be one of" in capsys.readouterr().err


def test_train_folds_usage_errors(tmp_path, capsys):
    root = make_taleqani(tmp_path / "d", per_class=10)
    single = make_manifest(root, progress=False).save(tmp_path / "m.json")
    base = ["train", "--model", "leuko-tiny"]
    assert main(base + ["--manifest", str(single), "--folds", "3", "--out", str(tmp_path / "a")]) == 2
    assert "is one split" in capsys.readouterr().err
    assert main(base + ["--data", str(root), "--folds", "0", "--out", str(tmp_path / "a")]) == 2
    save_folds(make_folds(root, folds=3, progress=False), tmp_path / "f")
    assert main(base + ["--manifest", str(tmp_path / "f" / "folds.json"), "--folds", "4",
                        "--out", str(tmp_path / "a")]) == 2
    assert "holds 3 folds" in capsys.readouterr().err
    (tmp_path / "single").mkdir()
    assert main(base + ["--resume", "--folds", "3", "--out", str(tmp_path / "single")]) == 2


def test_cv_summary_pools_every_held_out_image():
    # The five block folds of the issue: 69.2 / 86.5 / 94.2 / 64.2 / 98.0 % -> 82.4 +/- 15.0 % (sample sd).
    accs = [0.692, 0.865, 0.942, 0.642, 0.980]
    folds = []
    for k, a in enumerate(accs, 1):
        right = int(round(a * 52))
        cm = [[right // 2, 26 - right // 2], [26 - (right - right // 2), right - right // 2]]
        folds.append({"fold": k, "accuracy": a, "macro_f1": a - 0.01, "confusion_matrix": cm, "kept_epoch": k})
    cv = summarize_folds(folds, ("blast", "normal"))
    assert cv["accuracy_mean"] == pytest.approx(0.8242) and cv["accuracy_sd"] == pytest.approx(0.1504, abs=1e-4)
    assert cv["pooled"]["n"] == 260 and np.sum(cv["pooled"]["confusion_matrix"]) == 260
    assert cv["pooled"]["accuracy"] == pytest.approx(np.trace(cv["pooled"]["confusion_matrix"]) / 260)
    iv = cv["pooled"]["accuracy_interval"]
    assert iv["low"] < cv["pooled"]["accuracy"] < iv["high"] and cv["kept_epochs"] == [1, 2, 3, 4, 5]
    assert cv["complete"] and summarize_folds(folds[:2], ("blast", "normal"), 5)["complete"] is False
    assert wilson(0, 10)["low"] == pytest.approx(0.0) and wilson(10, 10)["high"] == pytest.approx(1.0)


def test_card_epoch_line_says_which_epoch_was_kept():
    t = {"best_epoch": 3, "select": "val_accuracy", "kept": {"val_loss": 0.41, "val_accuracy": 0.95},
         "stopped_early": True}
    assert kept_epoch_text(t) == ", kept epoch 3 (best val_accuracy = 0.9500; its val_loss 0.4100), stopped early"
    old_run = {"best_epoch": 1, "best_val_loss": 0.2}  # history.json written before --select existed
    assert kept_epoch_text(old_run) == ", kept epoch 1 (best val_loss = 0.2000)"


# --- real tiny trainings ---------------------------------------------------------------------------------

def make_two_class(root: Path, per_class: int = 15, size: int = 40, seed: int = 0) -> Path:
    """Class folders ``benign/`` and ``malignant/`` of numbered smear-like fields (one dark 'cell' each)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for ci, label in enumerate(("benign", "malignant")):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = 200 + rng.normal(0, 12, (size, size, 3)) + rng.integers(-25, 25, 3)
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 7 * (1 + 0.7 * ci)) ** 2
            img[mask] = [[120, 40, 160], [60, 40, 140]][ci] + rng.normal(0, 10, (int(mask.sum()), 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / label / f"{label}-{i:03d}.png")
    return root


def _cv_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "leuko-tiny", "--input-size", "32", "--epochs", "3",
            "--batch", "8", "--seed", str(training_seed(5)), "--no-audit", "--out", str(out), *extra]


def _kept_by_rule(history: dict) -> int:
    """The 1-based epoch the criterion in history.json says to keep (recomputed from the per-epoch figures)."""
    from leukoedge.train.trainer import is_better

    h = history["history"]
    best, best_loss, best_acc = None, None, None
    for e, (loss, acc) in enumerate(zip(h["val_loss"], h["val_accuracy"])):
        if is_better(history["select"], loss, acc, best_loss, best_acc):
            best, best_loss, best_acc = e + 1, loss, acc
    return best


@pytest.mark.slow
def test_cross_validation_run_resumes_and_pools(tmp_path, monkeypatch):
    pytest.importorskip("keras")
    from leukoedge.train import folds as folds_mod
    from leukoedge.train import trainer

    data = make_two_class(tmp_path / "data", seed=training_seed())
    out = tmp_path / "cv"
    # Interrupt fold 2 after its first epoch, as Ctrl-C would.
    original = trainer.RunCheckpoint.on_epoch_end

    def interrupt(self, epoch, logs=None):
        original(self, epoch, logs)
        if self.rd.path.name == "fold-2":
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.RunCheckpoint, "on_epoch_end", interrupt)
    assert main(_cv_args(data, out, "--folds", "3", "--select", "val_accuracy")) == 130
    monkeypatch.setattr(trainer.RunCheckpoint, "on_epoch_end", original)
    assert folds_mod.fold_status(folds_mod.RunDir(out / "fold-1")) == "done"
    assert folds_mod.fold_status(folds_mod.RunDir(out / "fold-2")) == "resume"
    assert not (out / "fold-3").exists()
    cv = json.loads((out / "cv.json").read_text())
    assert cv["complete"] is False and cv["folds_done"] == 1 and "Incomplete" in (out / "model_card.md").read_text()
    fold1_model = (out / "fold-1" / "model.keras").stat().st_mtime_ns

    assert main(_cv_args(data, out, "--folds", "3")) == 2  # an existing run is never overwritten
    assert main(_cv_args(data, out, "--resume", "--select", "val_loss")) == 2  # contradicts the run

    calls = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda opts: calls.append((Path(opts.out).name, opts.resume))
                        or real_train(opts))
    assert main(_cv_args(data, out, "--resume")) == 0
    assert calls == [("fold-2", True), ("fold-3", False)]  # fold 1 was finished: skipped
    assert (out / "fold-1" / "model.keras").stat().st_mtime_ns == fold1_model

    cv = json.loads((out / "cv.json").read_text())
    folds = load_folds(out / "folds")
    _assert_partition(folds)
    n = len(folds[0].entries)
    assert cv["complete"] and cv["k"] == 3 and [f["fold"] for f in cv["folds"]] == [1, 2, 3]
    assert sum(f["n_test"] for f in cv["folds"]) == n == cv["pooled"]["n"]
    assert np.sum(cv["pooled"]["confusion_matrix"]) == n
    assert np.array_equal(np.sum([f["confusion_matrix"] for f in cv["folds"]], axis=0), cv["pooled"]["confusion_matrix"])
    accs = [f["accuracy"] for f in cv["folds"]]
    assert cv["accuracy_mean"] == pytest.approx(np.mean(accs)) and cv["accuracy_sd"] == pytest.approx(np.std(accs, ddof=1))
    for f in cv["folds"]:
        assert {"accuracy_interval", "macro_f1", "n_test", "kept_epoch"} <= set(f)
        assert f["accuracy_interval"]["low"] <= f["accuracy"] <= f["accuracy_interval"]["high"]
        history = json.loads((out / f["run_dir"] / "history.json").read_text())
        assert history["select"] == f["select"] == "val_accuracy"  # the run's own criterion survives --resume
        assert f["kept_epoch"] == history["kept_epoch"] == _kept_by_rule(history)
        e = history["kept_epoch"] - 1
        assert history["kept"]["val_accuracy"] == pytest.approx(history["history"]["val_accuracy"][e])
        card = (out / f["run_dir"] / "model_card.md").read_text()
        assert f"kept epoch {history['kept_epoch']} (best val_accuracy = " in card
    assert cv["audit"].startswith("skipped")
    card = (out / "model_card.md").read_text()
    assert "## Cross-validation" in card and "Pooled confusion matrix" in card and "Incomplete" not in card
    assert "skipped (--no-audit)" in card
    # every held-out image once, answered by the fold model that did not train on it
    from leukoedge.train.predictions import read_predictions

    pooled = read_predictions(out / "predictions.csv")
    assert sorted(r.path for r in pooled) == sorted(e.path for e in folds[0].entries)
    assert sum(r.correct for r in pooled) == np.trace(cv["pooled"]["confusion_matrix"])
    assert cv["predictions_file"] == "predictions.csv" and "`predictions.csv` (`fold` column" in card
    assert main(_cv_args(data, out, "--resume")) == 0 and calls[2:] == []  # all done: nothing retrained


@pytest.mark.slow
def test_kept_epoch_is_the_lowest_val_loss_by_default(tmp_path):
    pytest.importorskip("keras")
    from leukoedge.train.rundir import RunDir, read_json
    from leukoedge.train.trainer import DEFAULT_SELECT, TrainOptions, train

    data = make_two_class(tmp_path / "data", seed=training_seed(1))
    manifest = make_manifest(data, progress=False)
    out = tmp_path / "run"
    train(TrainOptions(out=out, model="leuko-tiny", manifest=manifest, input_size=32, epochs=4, batch_size=8,
                       seed=training_seed(2), evaluate=False))
    history = read_json(RunDir(out).history_path)
    assert history["select"] == DEFAULT_SELECT == read_json(RunDir(out).config_path)["extra"]["select"]
    losses = history["history"]["val_loss"]
    if DEFAULT_SELECT == "val_loss":
        assert history["kept_epoch"] == int(np.argmin(losses)) + 1
    assert history["kept_epoch"] == _kept_by_rule(history) == history["best_epoch"]
    assert history["kept"]["val_loss"] == pytest.approx(losses[history["kept_epoch"] - 1])
