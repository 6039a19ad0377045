"""The shipped pretrained backbone and ``leukoedge train --init``: packaged, offline, checked, recorded, and useful."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from conftest import training_seed  # noqa: E402
from leukoedge.errors import BackboneError, UsageError  # noqa: E402
from leukoedge.models import create_model  # noqa: E402
from leukoedge.models import pretrained  # noqa: E402
from leukoedge.train.rundir import read_json  # noqa: E402
from leukoedge.train.trainer import TrainOptions, train  # noqa: E402
from test_train import make_toy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED_FILE = REPO / "src" / "leukoedge" / "models" / "weights" / "leukoedge-smear-v1.npz"


@pytest.fixture
def no_network(monkeypatch):
    """Any socket use fails: the backbone must come from the installed package, never a download."""

    def refuse(*a, **k):
        raise AssertionError("the backbone tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_shipped_backbone_loads_offline_with_its_provenance(no_network):
    backbone = pretrained.load_backbone("leukoedge-smear")
    assert backbone.model == "leuko-small" and backbone.meta["version"] == 1
    assert backbone.sha256 == hashlib.sha256(SHIPPED_FILE.read_bytes()).hexdigest()
    assert SHIPPED_FILE.stat().st_size < 1_000_000  # "a few hundred KB"
    prov = backbone.meta["provenance"]
    assert "Taleqani" in prov["data"] and "TRAIN split only" in prov["data"]
    assert "ood" in prov["excluded"]
    assert backbone.meta["figures"]["test"]["split_kind"] == "block"
    # it covers every layer of leuko-small but the classifier, whatever the class count
    model = create_model("leuko-small", 96, 2)
    head_before = [w.copy() for w in model.get_layer("probabilities").get_weights()]
    assert pretrained.apply_backbone(model, backbone, "leuko-small") == len(backbone.weights)
    for name, arrays in backbone.weights.items():
        for got, want in zip(model.get_layer(name).get_weights(), arrays):
            np.testing.assert_array_equal(got, want)
    for got, want in zip(model.get_layer("probabilities").get_weights(), head_before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_the_wheel_ships_the_backbone(tmp_path):
    """Built from a copy of the source tree (so no build/ or egg-info lands in the checkout), as pip builds it."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                           str(tree)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("leukoedge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read("leukoedge/models/weights/leukoedge-smear-v1.npz")
    assert data == SHIPPED_FILE.read_bytes()


def test_export_round_trip_reproduces_the_features(tmp_path):
    source = create_model("leuko-tiny", 48, 4)
    path = pretrained.export_backbone(source, tmp_path / "lab.npz", {"name": "lab", "version": 3, "model": "leuko-tiny",
                                                                     "input_size": 48, "colour": "as-captured"})
    target = create_model("leuko-tiny", 48, 3)
    pretrained.apply_backbone(target, pretrained.load_backbone(path), "leuko-tiny")
    x = np.random.default_rng(0).integers(0, 255, (4, 48, 48, 3)).astype("float32")
    features = [keras.Model(m.inputs, m.get_layer("features").output) for m in (source, target)]
    np.testing.assert_allclose(features[0]([x]), features[1]([x]), atol=1e-6)


def _damaged_files(tmp_path) -> dict[str, Path]:
    good = SHIPPED_FILE.read_bytes()
    files = {"truncated": good[: len(good) // 2], "not an npz": b"GIF89a" + bytes(200), "empty": b""}
    buf = io.BytesIO()
    np.savez(buf, **{"stem_conv/0": np.zeros((3, 3, 3, 16), np.float32)})
    files["no record"] = buf.getvalue()
    with np.load(SHIPPED_FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["__meta__"]))
    arrays.pop("stem_conv/0")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files["a weight missing"] = buf.getvalue()
    arrays["__meta__"] = np.array(json.dumps({**meta, "format": "something-else"}))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files["another format"] = buf.getvalue()
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name.replace(' ', '-')}.npz"
        out[name].write_bytes(data)
    return out


def test_damaged_unknown_and_foreign_backbones_are_refused_clearly(tmp_path):
    for name, path in _damaged_files(tmp_path).items():
        with pytest.raises(BackboneError) as err:
            pretrained.load_backbone(path)
        assert str(path) in err.value.user_message(), name
    with pytest.raises(BackboneError, match="unknown backbone 'imagenet'.*leukoedge-smear"):
        pretrained.load_backbone("imagenet")
    with pytest.raises(BackboneError, match="cannot read"):
        pretrained.load_backbone(tmp_path / "absent.npz")
    huge = tmp_path / "huge.npz"
    with open(huge, "wb") as fh:
        fh.truncate(pretrained.MAX_FILE_BYTES + 1)  # sparse: no disk or memory spent
    with pytest.raises(BackboneError, match="not a leukoedge backbone"):
        pretrained.load_backbone(huge)
    backbone = pretrained.load_backbone("leukoedge-smear")
    with pytest.raises(UsageError, match="leuko-small feature extractor, not leuko-tiny"):
        pretrained.apply_backbone(create_model("leuko-tiny", 64, 2), backbone, "leuko-tiny")


def test_cli_refuses_init_for_another_model_before_writing_anything(tmp_path):
    toy = make_toy(tmp_path / "toy", per_class=4)
    toy.save(tmp_path / "m.json")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "leukoedge", "train", "--manifest", str(tmp_path / "m.json"),
                           "--model", "leuko-tiny", "--init", "leukoedge-smear", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == UsageError.exit_code
    assert "is a leuko-small feature extractor, not leuko-tiny" in proc.stderr and "hint: use --model leuko-small" \
        in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_init_without_model_trains_the_backbones_architecture(tmp_path):
    toy = make_toy(tmp_path / "toy", per_class=6)
    toy.save(tmp_path / "m.json")
    proc = subprocess.run([sys.executable, "-m", "leukoedge", "train", "--manifest", str(tmp_path / "m.json"),
                           "--init", "leukoedge-smear", "--input-size", "48", "--epochs", "1", "--batch", "8",
                           "--no-audit", "--um-per-px", "0.4", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = read_json(tmp_path / "run" / "config.json")
    assert config["model"] == "leuko-small" and config["extra"]["init"]["name"] == "leukoedge-smear"


@pytest.mark.slow
def test_init_starts_from_the_backbone_and_the_run_records_it(tmp_path):
    """Mechanism: with a vanishing learning rate the trained features ARE the backbone's; the run and the card
    say so; --resume may not change the initialisation."""
    toy = make_toy(tmp_path / "toy", per_class=8, seed=training_seed())
    opts = TrainOptions(out=tmp_path / "run", model="leuko-small", manifest=toy, input_size=48, epochs=1,
                        batch_size=8, seed=training_seed(1), init="leukoedge-smear", audit=False, learning_rate=1e-9)
    train(opts)
    backbone = pretrained.load_backbone("leukoedge-smear")
    model = keras.models.load_model(tmp_path / "run" / "model.keras", compile=False)
    for name in ("stem_conv", "ds4_dw", "ds7_pw"):
        np.testing.assert_allclose(model.get_layer(name).get_weights()[0], backbone.weights[name][0], atol=1e-6)
    # BatchNorm statistics are re-measured on the lab's images (the backbone's were Taleqani's)
    assert not np.allclose(model.get_layer("stem_bn").get_weights()[2], backbone.weights["stem_bn"][2])
    config = read_json(tmp_path / "run" / "config.json")
    assert config["extra"]["init"]["sha256"] == backbone.sha256
    assert config["extra"]["init"]["provenance"]["data"].startswith("Taleqani")
    card = (tmp_path / "run" / "model_card.md").read_text()
    assert "initial weights: backbone **leukoedge-smear v1**" in card and "backbone data: Taleqani" in card

    # a run from scratch says so, and --resume may not add an initialisation to it
    plain = TrainOptions(out=tmp_path / "plain", model="leuko-tiny", manifest=toy, input_size=32, epochs=1,
                         batch_size=8, seed=training_seed(2), audit=False)
    train(plain)
    assert "initial weights: random" in (tmp_path / "plain" / "model_card.md").read_text()
    with pytest.raises(UsageError, match="init=leukoedge-smear"):
        train(TrainOptions(out=plain.out, model="leuko-tiny", resume=True, init="leukoedge-smear"))


@pytest.mark.shared
def test_the_shipped_backbone_separates_held_out_smear_fields(taleqani_dir):
    """What the file carries, without any training: nearest-class-mean on its pooled features, 5 reference
    fields per class from the block split's TRAIN part, graded on 30 per class of its TEST block (which the
    backbone never saw). Measured: 0.90-0.95 for the backbone, 0.43-0.58 for a randomly initialised
    leuko-small (seeds 0-2); the bounds leave > 10 points either side. The weights are fixed, so only the
    reference draw and the random baseline move with the seed."""
    from leukoedge.data.records import Manifest, ManifestEntry
    from leukoedge.data.split import make_manifest
    from leukoedge.preprocess import PreprocessSpec
    from leukoedge.train.dataset import ImageCache, load_split

    full = make_manifest(taleqani_dir, by="block", seed=0)
    rng = np.random.default_rng(training_seed())
    entries = []
    for label in full.classes:
        for split, n in (("train", 5), ("test", 30)):
            pool = [e for e in full.subset(split) if e.label == label]
            entries += [ManifestEntry(pool[i].path, label, split=split) for i in rng.choice(len(pool), n, replace=False)]
    small = Manifest(root=full.root, layout=full.layout, classes=full.classes, split_kind="block", seed=0,
                     entries=tuple(entries))
    spec, cache = PreprocessSpec.square(160, "as-captured"), ImageCache()
    x_ref, y_ref, _ = load_split(small, "train", spec, cache, None)
    x_test, y_test, _ = load_split(small, "test", spec, cache, None)
    accuracy = {}
    for arm in ("random", "backbone"):
        keras.utils.set_random_seed(training_seed(5))
        model = create_model("leuko-small", 160, 4)
        if arm == "backbone":
            pretrained.apply_backbone(model, pretrained.load_backbone("leukoedge-smear"), "leuko-small")
        pooled = keras.Model(model.inputs, model.get_layer("pool").output)
        ref, test = (np.asarray(pooled.predict(x.astype("float32"), verbose=0)) for x in (x_ref, x_test))
        mu, sd = ref.mean(0), ref.std(0) + 1e-6
        ref, test = (ref - mu) / sd, (test - mu) / sd
        centroids = np.stack([ref[y_ref == c].mean(0) for c in range(len(full.classes))])
        predicted = np.argmin(((test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
        accuracy[arm] = float(np.mean(predicted == y_test))
    assert accuracy["backbone"] >= 0.8, accuracy
    assert accuracy["backbone"] >= accuracy["random"] + 0.2, accuracy
