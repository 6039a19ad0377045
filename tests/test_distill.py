"""Distillation (``train --teacher RUN``): the loss, the targets in the pipeline, the refusals, a real run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from conftest import training_seed  # noqa: E402
from leukoedge.errors import RunError, UsageError  # noqa: E402
from leukoedge.train.augment import RECIPES  # noqa: E402
from leukoedge.train.dataset import ImageCache, load_split, train_dataset  # noqa: E402
from leukoedge.train.distill import DistillationLoss, LabelAccuracy, target_rows  # noqa: E402
from leukoedge.train.rundir import read_json  # noqa: E402
from leukoedge.train.trainer import TrainOptions, train  # noqa: E402
from test_train import make_toy  # noqa: E402


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _expected(labels, p, q, alpha, t):
    ce = -np.log(p[np.arange(len(p)), labels])
    pt, qt = _softmax(np.log(p) / t), _softmax(np.log(q) / t)
    kl = (qt * (np.log(qt) - np.log(pt))).sum(-1)
    return (1 - alpha) * ce + alpha * t * t * kl


def test_the_loss_mixes_label_and_teacher_terms_as_documented():
    rng = np.random.default_rng(0)
    p = _softmax(rng.normal(0, 2, (6, 4)))
    q = _softmax(rng.normal(0, 2, (6, 4)))
    labels = np.array([0, 1, 2, 3, 0, 2])
    rows = target_rows(labels, q)
    for alpha, t in ((0.0, 2.0), (1.0, 1.0), (0.5, 2.0), (0.7, 4.0)):
        got = keras.ops.convert_to_numpy(DistillationLoss(alpha, t, reduction=None)(rows, p.astype("float32")))
        np.testing.assert_allclose(got, _expected(labels, p, q, alpha, t), rtol=2e-4, atol=2e-5)
    # a teacher that agrees with the student adds nothing: alpha = 1 gives zero loss
    same = keras.ops.convert_to_numpy(DistillationLoss(1.0, 3.0, reduction=None)(target_rows(labels, p), p))
    np.testing.assert_allclose(same, 0.0, atol=1e-4)
    # bare labels (validation) are scored with the plain cross-entropy
    bare = keras.ops.convert_to_numpy(DistillationLoss(0.5, 2.0, reduction=None)(labels.astype("float32"), p))
    np.testing.assert_allclose(bare, -np.log(p[np.arange(6), labels]), rtol=1e-4)
    restored = DistillationLoss.from_config(DistillationLoss(0.3, 3.0).get_config())
    assert (restored.alpha, restored.temperature) == (0.3, 3.0)


def test_accuracy_reads_the_label_column_not_the_teachers_answer():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    teacher_says_other = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    rows = target_rows(np.array([0, 1, 1]), teacher_says_other)
    metric = LabelAccuracy()
    metric.update_state(rows, p)
    assert metric.name == "accuracy" and float(metric.result()) == pytest.approx(2 / 3)
    metric.reset_state()
    metric.update_state(np.array([0.0, 0.0, 0.0], np.float32), p)
    assert float(metric.result()) == pytest.approx(2 / 3)


def test_the_pipeline_gives_every_image_its_own_target_and_weight():
    rng = np.random.default_rng(1)
    n = 11
    x = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 3, n).astype(np.int32)
    q = _softmax(rng.normal(0, 1, (n, 3))).astype(np.float32)
    weights = (np.arange(n) + 1).astype(np.float32)
    ds = train_dataset(x, y, batch_size=4, seed=3, first_epoch=0, last_epoch=2, augment=RECIPES["none"],
                       targets=target_rows(y, q), sample_weights=weights)
    seen = 0
    for images, rows, w in ds:
        for image, row, weight in zip(images.numpy(), rows.numpy(), w.numpy()):
            index = int(np.flatnonzero((x.reshape(n, -1) == image.reshape(1, -1)).all(1))[0])
            assert row[0] == y[index] and np.allclose(row[1:], q[index]) and weight == weights[index]
            seen += 1
    assert seen == 2 * n
    with pytest.raises(UsageError, match="one weight per image"):
        train_dataset(x, y, batch_size=4, seed=3, first_epoch=0, last_epoch=1, augment=RECIPES["none"],
                      targets=target_rows(y, q))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    toy = make_toy(root / "toy", per_class=8, seed=training_seed())
    out = root / "teacher"
    train(TrainOptions(out=out, model="leuko-tiny", manifest=toy, input_size=32, epochs=2, batch_size=8,
                       seed=training_seed(1), audit=False))
    return toy, out


@pytest.mark.slow
def test_a_distilled_run_records_its_teachers_and_resumes(teacher_run, tmp_path):
    toy, teacher = teacher_run
    out = tmp_path / "student"
    opts = TrainOptions(out=out, model="leuko-tiny", manifest=toy, input_size=40, epochs=1, batch_size=8,
                        seed=training_seed(2), audit=False, teachers=(str(teacher),), distill_alpha=0.7,
                        temperature=3.0)
    result = train(opts)
    assert "accuracy" in result["history"] and "val_accuracy" in result["history"]
    config = read_json(out / "config.json")
    distill = config["extra"]["distill"]
    assert distill["alpha"] == 0.7 and distill["temperature"] == 3.0
    assert distill["teachers"][0]["run"] == str(teacher.resolve())
    # the recorded target accuracy is the teacher's own, measured here independently (at ITS 32 px)
    tconf = read_json(teacher / "config.json")
    model = keras.models.load_model(teacher / "model.keras", compile=False)
    from leukoedge.train.rundir import RunDir

    spec = RunDir(teacher).config().preprocess_spec
    x, y, _ = load_split(toy, "train", spec, ImageCache())
    assert tconf["input_size"] == 32 and x.shape[1] == 32
    expected = float(np.mean(model.predict(x.astype("float32"), batch_size=64, verbose=0).argmax(1) == y))
    assert distill["target_train_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert distill["teachers"][0]["train_accuracy"] == pytest.approx(expected, abs=1e-6)
    card = (out / "model_card.md").read_text()
    assert "distilled from 1 teacher run(s), alpha 0.7, T 3" in card and str(teacher.resolve()) in card
    assert "KL to 1 teacher(s)" in config["extra"]["loss"]

    # --resume continues with the recorded teachers, refuses other ones, and refuses a changed teacher
    with pytest.raises(UsageError, match="teachers="):
        train(TrainOptions(out=out, model="leuko-tiny", resume=True, epochs=1, teachers=(str(tmp_path),)))
    state = read_json(out / "state.json")
    state["finished"] = False
    (out / "state.json").write_text(json.dumps(state))
    config["epochs"] = 2
    (out / "config.json").write_text(json.dumps(config))
    train(TrainOptions(out=out, model="leuko-tiny", resume=True, audit=False))
    assert read_json(out / "history.json")["epochs_run"] == 2
    changed = tmp_path / "changed"
    shutil.copytree(teacher, changed)
    student2 = tmp_path / "student2"
    train(replace(opts, out=student2, teachers=(str(changed),), epochs=2, evaluate=False))
    (changed / "model.keras").write_bytes((changed / "model.keras").read_bytes() + b"\0")
    state = read_json(student2 / "state.json")
    state.update(finished=False, epoch=0)
    (student2 / "state.json").write_text(json.dumps(state))
    with pytest.raises(RunError, match="changed since the run started"):
        train(TrainOptions(out=student2, model="leuko-tiny", resume=True, evaluate=False))


def _copy_teacher(teacher: Path, dest: Path, edit_manifest=None, edit_config=None) -> Path:
    shutil.copytree(teacher, dest)
    for name, edit in (("manifest.json", edit_manifest), ("config.json", edit_config)):
        if edit:
            data = read_json(dest / name)
            edit(data)
            (dest / name).write_text(json.dumps(data))
    return dest


@pytest.mark.slow
def test_teachers_that_saw_held_out_images_or_differ_are_refused_before_writing(teacher_run, tmp_path):
    toy, teacher = teacher_run

    def test_into_train(m):
        for e in m["entries"]:
            if e["split"] == "test":
                e["split"] = "train"

    def val_into_train(m):
        for e in m["entries"]:
            if e["split"] == "val":
                e["split"] = "train"

    def unfinished(dest):
        state = read_json(dest / "state.json")
        state["finished"] = False
        (dest / "state.json").write_text(json.dumps(state))
        return dest

    cases = {
        r"used \d+ of the student's test images in its train split":
            _copy_teacher(teacher, tmp_path / "t1", edit_manifest=test_into_train),
        r"used \d+ of the student's val images in its train split":
            _copy_teacher(teacher, tmp_path / "t2", edit_manifest=val_into_train),
        "the student's classes are":
            _copy_teacher(teacher, tmp_path / "t3", edit_config=lambda c: c.update(classes=c["classes"][::-1])),
        "has not finished training": unfinished(_copy_teacher(teacher, tmp_path / "t4")),
        "no such run directory": tmp_path / "absent",
    }
    for message, path in cases.items():
        out = tmp_path / f"student-{path.name}"
        with pytest.raises(UsageError, match=message):
            train(TrainOptions(out=out, model="leuko-tiny", manifest=toy, input_size=32, epochs=1, batch_size=8,
                               teachers=(str(path),), audit=False))
        assert not out.exists()
    with pytest.raises(UsageError, match="given twice"):
        train(TrainOptions(out=tmp_path / "twice", model="leuko-tiny", manifest=toy, teachers=(str(teacher),) * 2))
    with pytest.raises(UsageError, match="cannot be combined"):
        TrainOptions(out=tmp_path / "x", model="leuko-tiny", manifest=toy, teachers=(str(teacher),), consistency=5)
    with pytest.raises(UsageError, match="need --teacher"):
        TrainOptions(out=tmp_path / "x", model="leuko-tiny", manifest=toy, distill_alpha=0.5)
    with pytest.raises(UsageError, match="--distill-weight must be in"):
        TrainOptions(out=tmp_path / "x", model="leuko-tiny", manifest=toy, teachers=(str(teacher),),
                     distill_alpha=1.5)


def test_cli_refuses_a_teacher_for_cross_validation(tmp_path):
    toy = make_toy(tmp_path / "toy", per_class=4)
    toy.save(tmp_path / "m.json")
    proc = subprocess.run([sys.executable, "-m", "leukoedge", "train", "--manifest", str(tmp_path / "m.json"),
                           "--model", "leuko-tiny", "--folds", "3", "--teacher", str(tmp_path),
                           "--out", str(tmp_path / "cv")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--teacher with --folds" in proc.stderr
    assert not (tmp_path / "cv").exists()
