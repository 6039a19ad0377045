"""The shortcut audit on a real (tiny) trained run with a planted shortcut.

Three classes that differ ONLY by the slide's background tint (the cells are
drawn from one distribution for every class): a CNN trained on them can only
learn the tint, so the audit must expose it: the colour-only baseline is high,
and accuracy falls once colour is normalised or the background replaced.
The tints have the same BT.601 luma, so grayscale removes the signal too.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import training_seed
from leukoedge.data.records import Manifest, ManifestEntry
from leukoedge.files import write_json
from leukoedge.train.rundir import RunConfig, RunDir, read_json

keras = pytest.importorskip("keras")

CLASSES = ("Benign", "Early", "Pre")
SIZE = 32
#: Pink, bluish and yellowish slides with (nearly) equal luma, all far from the nuclei's B - G.
TINTS = {"Benign": (244, 214, 222), "Early": (222, 222, 246), "Pre": (232, 222, 200)}
PER_SPLIT = {"train": 30, "val": 6, "test": 10}


def draw(label: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img = np.zeros((SIZE, SIZE, 3)) + TINTS[label] + rng.normal(0, 2, 3)
    for _ in range(3):  # pale red cells
        cy, cx = rng.integers(0, SIZE, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 10] -= (15, 40, 35)
    for _ in range(int(rng.integers(1, 3))):  # one or two nuclei, whatever the class
        cy, cx = rng.integers(7, SIZE - 7, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(12, 25)] = (110, 60, 160)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_tinted_run(tmp: Path, epochs: int = 100, seed: int = 0) -> Path:
    """Train the tint reader (a learned outcome the tests below rely on).

    25 epochs left it at 0.67-1.0 clean test accuracy over seeds 0-7 (0.63 under background
    flattening). With 100, over seeds 0-9 x oneDNN on/off: clean 1.0, flattened 1.0, colour-normalised /
    neutral background / grayscale 0.30-0.40 (bootstrap high <= 0.57), heatmap mass 0.05-0.08 against
    chance 0.07-0.08."""
    from bundle_factory import build_tiny_model

    rng = np.random.default_rng(seed)
    data = tmp / "data"
    entries, train_x, train_y = [], [], []
    for c, label in enumerate(CLASSES):
        (data / label).mkdir(parents=True)
        order = 0
        for split, n in PER_SPLIT.items():
            for _ in range(n):
                img = draw(label, rng)
                rel = f"{label}/{order:03d}.png"
                Image.fromarray(img).save(data / rel)
                entries.append(ManifestEntry(path=rel, label=label, order=order, split=split))
                if split == "train":
                    train_x.append(img)
                    train_y.append(c)
                order += 1
    manifest = Manifest(root=str(data), layout="class_folders", classes=CLASSES, split_kind="block", seed=seed,
                        entries=tuple(entries))
    keras.utils.set_random_seed(seed)
    model = build_tiny_model(SIZE, len(CLASSES))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(np.stack(train_x).astype(np.float32), np.array(train_y), epochs=epochs, batch_size=16, verbose=0)
    rd = RunDir(tmp / "run")
    rd.path.mkdir()
    manifest.save(rd.manifest_path)
    model.save(rd.model_path)
    write_json(rd.config_path, RunConfig(model="tiny_cnn", input_size=SIZE, classes=CLASSES, seed=seed, epochs=epochs,
                                         batch_size=16, learning_rate=3e-3, data_root=str(data)).to_dict())
    return rd.path


@pytest.fixture(scope="module")
def tinted_run(tmp_path_factory) -> Path:
    return make_tinted_run(tmp_path_factory.mktemp("tinted"), seed=training_seed())


@pytest.fixture(scope="module")
def audited(tinted_run):
    from leukoedge.train.audit_run import audit_run

    return audit_run(tinted_run, "test", n_boot=200)


def acc(report: dict, name: str) -> float:
    return report["perturbations"][name]["accuracy"]["value"]


def test_audit_exposes_the_planted_background_tint(audited, record_property):
    assert audited["n_images"] == 30 and audited["split_kind"] == "block" and audited["leaky"] is False
    clean = audited["clean_accuracy"]
    record_property("clean", clean)
    for name in ("colour_normalised", "background_neutral", "grayscale", "background_flattened"):
        record_property(name, audited["perturbations"][name]["accuracy"])
    record_property("colour_baseline", {k: audited["colour_baseline"][k]["accuracy"]["value"]
                                        for k in ("histogram", "mean_std")})
    assert clean["value"] > 0.9 and clean["value"] == acc(audited, "clean")
    assert audited["colour_baseline"]["histogram"]["accuracy"]["value"] > 0.9
    assert audited["colour_baseline"]["mean_std"]["accuracy"]["value"] > 0.9
    # Morphology is identical across classes: removing the tint leaves the model near chance (1/3).
    for name in ("colour_normalised", "background_neutral", "grayscale"):
        p = audited["perturbations"][name]["accuracy"]
        assert p["value"] < 0.7 and p["high"] < clean["low"], name
    # Flattening to the image's own median background keeps the tint: the shortcut survives.
    assert acc(audited, "background_flattened") > 0.8
    assert "benign_vs_malignant_accuracy" in audited["perturbations"]["clean"]
    text = " ".join(audited["readings"])
    assert "proves little" in text and "Under colour_normalised accuracy falls" in text


def test_audit_json_keys_heatmap_and_plots(audited, tinted_run, record_property):
    on_disk = read_json(tinted_run / "audit.json")
    assert on_disk == json.loads(json.dumps(audited))
    for key in ("split", "split_kind", "leaky", "n_images", "n_train_images", "colour_step", "clean_accuracy",
                "colour_baseline", "perturbations", "heatmap", "meaning", "readings", "plots", "model_sha256",
                "majority_class_rate", "notice"):
        assert key in on_disk, key
    assert on_disk["n_train_images"] == 90 and on_disk["colour_step"] == "as-captured"
    assert set(on_disk["perturbations"]) >= {"clean", "grayscale", "colour_normalised", "background_flattened"}
    heat = on_disk["heatmap"]
    assert heat["method"] == "cam" and heat["n_images"] == 30
    mass, chance = heat["mass_on_cells"], heat["chance"]
    record_property("heatmap", {"mass": mass["value"], "chance": chance["value"],
                                "excess_low": heat["excess_over_chance"]["low"]})
    assert 0 <= mass["low"] <= mass["value"] <= mass["high"] <= 1 and 0 < chance["value"] < 0.5
    assert heat["n_zero_heatmaps"] == 0
    assert heat["excess_over_chance"]["value"] == pytest.approx(mass["value"] - chance["value"], abs=1e-9)
    # A tint reader's evidence is everywhere: its heatmap is not concentrated on the cells.
    assert heat["excess_over_chance"]["low"] < 0.05 and mass["value"] < 2 * chance["value"]
    for rel in on_disk["plots"].values():
        with Image.open(tinted_run / rel) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 150
    assert set(on_disk["plots"]) == {"panel", "perturbations"}


def test_cam_matches_the_keras_head(tinted_run):
    """CAM of the predicted class, averaged over pixels, is that class's logit minus the bias (GAP is linear)."""
    from leukoedge.train.audit_run import cam_kernel, class_activation_maps, load_run_model

    model = load_run_model(tinted_run)
    kernel, reason = cam_kernel(model)
    assert kernel is not None and reason == ""
    x = np.stack([draw(c, np.random.default_rng(i)) for i, c in enumerate(CLASSES)])
    probs, cams = class_activation_maps(model, kernel, x)
    np.testing.assert_allclose(probs, np.asarray(model(x.astype(np.float32))), atol=1e-5)
    feats = np.asarray(keras.Model(model.inputs[0], model.get_layer("features").output)(x.astype(np.float32)))
    pred = probs.argmax(1)
    logit = np.einsum("nhwc,cn->n", feats, kernel[:, pred]) / (feats.shape[1] * feats.shape[2])
    raw = np.einsum("nhwc,cn->nhw", feats, kernel[:, pred])
    np.testing.assert_allclose(raw.mean(axis=(1, 2)), logit, rtol=1e-5)
    assert cams.shape == (3, SIZE, SIZE) and cams.min() >= 0
    # A head without global average pooling has no CAM: the audit says why instead of guessing.
    flat = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(2, 3, name="features"),
                             keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax", name="probabilities")])
    assert cam_kernel(flat)[0] is None and "pooling" in cam_kernel(flat)[1]
    from leukoedge.train.audit_run import _heatmaps

    masks = np.zeros((3, SIZE, SIZE), bool)
    masks[:, :8] = True
    probs, cams, heat = _heatmaps(flat, x, masks, n_boot=100, batch_size=2)
    assert probs.shape == (3, 3) and cams is None
    assert heat["method"] is None and "pooling" in heat["skipped"] and heat["chance"]["value"] == 0.25


def test_grayscale_run_applies_its_colour_step_before_the_model(tinted_run, audited, tmp_path, record_property):
    from leukoedge import stain
    from leukoedge.train.audit_run import audit_run, load_run_model
    from leukoedge.train.dataset import ImageCache, load_split

    gray = tmp_path / "gray-run"
    shutil.copytree(tinted_run, gray)
    config = read_json(gray / "config.json")
    write_json(gray / "config.json", {**config, "colour": "grayscale"})
    report = audit_run(gray, n_boot=100, perturbations=["grayscale", "colour_normalised"], panel=False)
    clean, g = report["perturbations"]["clean"], report["perturbations"]["grayscale"]
    assert report["colour_step"] == "grayscale" and list(report["plots"]) == ["perturbations"]
    assert clean["accuracy"] == g["accuracy"] and clean["predicted_counts"] == g["predicted_counts"]
    assert g["agreement_with_clean"]["value"] == 1.0
    # The clean row is what the model predicts on grayscale pixels, not on the raw ones.
    rd = RunDir(gray)
    x, _, _ = load_split(rd.manifest(), "test", rd.config().preprocess_spec.geometry_only(), ImageCache())
    model = load_run_model(gray)
    on_gray = np.asarray(model(np.stack([stain.grayscale(im) for im in x]).astype(np.float32))).argmax(1)
    assert clean["predicted_counts"] == {c: int(np.sum(on_gray == i)) for i, c in enumerate(CLASSES)}
    record_property("counts", {"gray": clean["predicted_counts"],
                               "colour": audited["perturbations"]["clean"]["predicted_counts"]})
    assert clean["predicted_counts"] != audited["perturbations"]["clean"]["predicted_counts"]
    assert any("already feeds grayscale" in r for r in report["readings"])


def test_eval_audit_cli_writes_the_card_section(tinted_run, tmp_path, capsys):
    from leukoedge import cli
    from leukoedge.train.evaluate import write_card

    run = tmp_path / "run"
    shutil.copytree(tinted_run, run)
    (run / "audit.json").unlink(missing_ok=True)
    assert cli.main(["eval", str(run), "--bootstrap", "100"]) == 0
    card = (run / "model_card.md").read_text()
    assert "## Shortcut audit" in card and "Not run. `leukoedge eval RUN_DIR --audit`" in card
    assert read_json(run / "model_card.json")["shortcut_audit"] is None
    capsys.readouterr()

    assert cli.main(["eval", str(run), "--audit", "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "shortcut audit on test (n=30" in out and "colour baseline (hist)" in out and "heatmap mass on cells" in out
    card = (run / "model_card.md").read_text()
    section = card.split("## Shortcut audit")[1].split("## Limitations")[0]
    assert "Not run" not in section and "| colour_normalised (" in section
    assert "![perturbations](plots/audit_perturbations.png)" in section and "![panel](plots/audit_panel.png)" in section
    assert "colour alone" in section.lower() and "Heatmap (CAM of the predicted class)" in section
    card_json = read_json(run / "model_card.json")["shortcut_audit"]
    audit = read_json(run / "audit.json")
    assert card_json["clean_accuracy"] == audit["clean_accuracy"] and card_json["stale"] is False

    # Retraining (a different model.keras) marks the old audit stale instead of publishing it as current.
    model = keras.models.load_model(run / "model.keras", compile=False)
    head = model.get_layer("probabilities")
    head.set_weights([w * 0.5 for w in head.get_weights()])
    model.save(run / "model.keras")
    write_card(run, {})
    assert "different model.keras" in (run / "model_card.md").read_text()
