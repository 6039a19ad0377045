"""`leukoedge convert`: options, calibration data, export, Edge TPU checks, the CLI.

Real conversions of the session's tiny model; only ``edgetpu_compiler`` is
faked (a script on PATH), since it cannot be installed here.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import CLASSES, SIZE, shared_tiny_bundle, shared_tiny_run
from leukoedge import cli
from leukoedge.bundle import load_bundle
from leukoedge.convert import calibration, edgetpu, export
from leukoedge.convert.modes import MODES
from leukoedge.convert.options import ConvertOptions
from leukoedge.convert.pipeline import convert_run
from leukoedge.data.records import Manifest, ManifestEntry
from leukoedge.errors import ConversionError, RunError, UsageError
from leukoedge.runtime import Classifier


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return shared_tiny_run(tmp_path_factory)


@pytest.fixture
def convert_cli(monkeypatch):
    """The real ``cli.main`` with only the convert subcommand registered."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", (("convert", "leukoedge.convert.cli"),))
    return lambda *argv: cli.main(["convert", *map(str, argv)])


# ---------------------------------------------------------------- options and modes
def test_modes_table_is_the_cli_choices():
    assert list(MODES) == ["int8", "uint8", "float16", "dynamic", "none"]
    assert [m.name for m in MODES.values() if m.full_integer] == ["int8", "uint8"]
    assert [m.name for m in MODES.values() if m.edgetpu] == ["int8", "uint8"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quantize="int4"), "unknown --quantize"),
        (dict(quantize="float16", calibration=100), "--calibration applies to full-integer"),
        (dict(calibration=5), "too few"),
        (dict(quantize="dynamic", edgetpu=True), "--edgetpu needs a full-integer"),
        (dict(max_drop=-1), "--max-drop"),
        (dict(min_agreement=1.5), "--min-agreement"),
        (dict(archive="rar"), "--archive"),
        (dict(out=Path("run")), "must not be the run directory"),
    ],
)
def test_bad_option_combinations_are_refused(kwargs, message):
    base = dict(run_dir=Path("run"), out=Path("bundle"))
    with pytest.raises(UsageError, match=message):
        ConvertOptions(**{**base, **kwargs})


def test_calibration_size_defaults():
    assert ConvertOptions(run_dir=Path("r"), out=Path("b")).calibration_size == 300
    assert ConvertOptions(run_dir=Path("r"), out=Path("b"), quantize="float16").calibration_size == 0


# ---------------------------------------------------------------- calibration data
def _manifest(counts: dict[str, int], test_per_class: int = 3) -> Manifest:
    entries = []
    for label, n in counts.items():
        entries += [ManifestEntry(path=f"{label}/{i}.png", label=label, split="train") for i in range(n)]
        entries += [ManifestEntry(path=f"{label}/t{i}.png", label=label, split="test") for i in range(test_per_class)]
    return Manifest(root="/data", layout="class_folders", classes=tuple(sorted(counts)), split_kind="random", seed=0, entries=tuple(entries))


def test_calibration_is_stratified_train_only_and_reproducible():
    m = _manifest({"a": 50, "b": 30, "c": 20})
    chosen = calibration.select_calibration(m, 40, seed=3)
    assert len(chosen) == 40 and len({e.path for e in chosen}) == 40
    assert all(e.split == "train" for e in chosen)
    per = {c: sum(e.label == c for e in chosen) for c in "abc"}
    assert per == {"a": 20, "b": 12, "c": 8}
    assert chosen == calibration.select_calibration(m, 40, seed=3)
    assert chosen != calibration.select_calibration(m, 40, seed=4)


def test_calibration_keeps_rare_classes():
    per = calibration._allocate(32, {"a": 1000, "b": 2})
    assert per["b"] >= 1 and sum(per.values()) == 32


def test_calibration_uses_every_training_image_when_there_are_fewer_than_asked(caplog):
    """A lab's 260-image set has ~180 training images: the default 300 must not fail (issue 14)."""
    small = _manifest({"a": 20, "b": 20})
    with caplog.at_level("WARNING"):
        chosen = calibration.select_calibration(small, 300, seed=0)
    assert sorted(e.path for e in chosen) == sorted(e.path for e in small.subset("train"))
    assert any("fewer than the 300 asked for; using all 40" in r.getMessage() for r in caplog.records)


def test_calibration_refuses_too_few_images_or_missing_class():
    with pytest.raises(ConversionError, match="only 20"):
        calibration.select_calibration(_manifest({"a": 10, "b": 10}), 300, seed=0)
    no_c = _manifest({"a": 40, "b": 40})
    no_c = Manifest(**{**no_c.__dict__, "classes": ("a", "b", "c")})
    with pytest.raises(ConversionError, match="no images of class"):
        calibration.select_calibration(no_c, 40, seed=0)


def test_representative_dataset_feeds_raw_pixels():
    imgs = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    batches = list(calibration.representative_dataset(imgs)())
    assert len(batches) == 2 and batches[0][0].shape == (1, 8, 8, 3) and batches[0][0].dtype == np.float32
    assert batches[1][0].max() == imgs[1].max()  # no scaling outside the model


# ---------------------------------------------------------------- export
def _head_model(head: str):
    import keras

    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.Conv2D(4, 3, padding="same", name="features")(x)
    if head == "gap":
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dropout(0.2)(x)
    else:
        x = keras.layers.Flatten()(x)
    return keras.Model(image, keras.layers.Dense(3, activation="softmax", name="probabilities")(x))


def test_cam_weights_only_for_gap_dense_heads():
    gap = _head_model("gap")
    weights = export.cam_weights(gap)
    assert weights.shape == (4, 3)
    assert np.array_equal(weights, gap.get_layer("probabilities").get_weights()[0])
    assert export.cam_weights(_head_model("flatten")) is None


def test_two_output_model_selects_outputs_by_signature_name(tmp_path_factory, tiny_run):
    """features out of LiteRT == the Keras `features` layer (up to int8 steps)."""
    import keras

    bundle = load_bundle(shared_tiny_bundle(tmp_path_factory, "int8", True))
    assert bundle.meta["outputs"]["features"]["shape"] == [1, 8, 8, 24]
    assert bundle.meta["outputs"]["probabilities"]["shape"] == [1, len(CLASSES)]
    model = export.load_keras_model(tiny_run / "model.keras")
    feat_model = keras.Model(model.inputs, model.get_layer("features").output)
    img = np.asarray(__import__("bundle_factory").draw_cell("Pre", np.random.default_rng(7)))
    clf = Classifier(bundle)
    raw = clf.run(img)
    ref = np.asarray(feat_model([img[None].astype(np.float32)]))[0]
    assert raw.features.shape == ref.shape == (8, 8, 24)
    step = bundle.meta["outputs"]["features"]["quantization"]["scale"]
    assert np.mean(np.abs(raw.features - ref)) < 4 * step
    assert clf.classify(img).heatmap.shape == (SIZE, SIZE)


def test_model_without_features_layer_is_refused_for_heatmaps(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    import keras

    image = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(image, keras.layers.Dense(len(CLASSES), activation="softmax", name="probabilities")(x)).save(run / "model.keras")
    with pytest.raises(RunError, match="named 'features'"):
        convert_run(ConvertOptions(run_dir=run, out=tmp_path / "b", with_heatmap=True, calibration=64))


def test_moved_dataset_needs_data_root(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    manifest = json.loads((run / "manifest.json").read_text())
    real_root, manifest["root"] = manifest["root"], str(tmp_path / "moved-away")
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConversionError, match="no such file") as info:
        convert_run(ConvertOptions(run_dir=run, out=tmp_path / "b", quantize="dynamic"))
    assert "--data-root" in info.value.hint
    result = convert_run(ConvertOptions(run_dir=run, out=tmp_path / "b", quantize="dynamic", data_root=Path(real_root)))
    assert result.parity.passed


def test_incomplete_run_dir_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(RunError, match="missing config.json"):
        convert_run(ConvertOptions(run_dir=tmp_path / "run", out=tmp_path / "b"))


# ---------------------------------------------------------------- Edge TPU
def test_edgetpu_inspection_of_int8_and_float16(tmp_path_factory):
    int8 = (shared_tiny_bundle(tmp_path_factory, "int8", True) / "model.tflite").read_bytes()
    report = edgetpu.inspect(int8)
    assert report.fully_integer and report.batch_one and report.single_subgraph
    assert report.compatible and not report.cpu_fallback_ops
    assert {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(report.ops)
    f16 = (shared_tiny_bundle(tmp_path_factory, "float16", False) / "model.tflite").read_bytes()
    report = edgetpu.inspect(f16)
    assert not report.fully_integer and not report.compatible
    assert "DEQUANTIZE" in report.unsupported_ops
    assert report.cpu_fallback_ops and report.cpu_fallback_ops[0].endswith("DEQUANTIZE")


def test_edgetpu_without_compiler_says_how_to_compile(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    result = convert_run(ConvertOptions(run_dir=tiny_run, out=tmp_path / "b", edgetpu=True, calibration=64))
    assert result.edgetpu.compatible and not result.edgetpu.compiled
    assert any("edgetpu_compiler is not installed" in n for n in result.edgetpu.notes)
    assert load_bundle(result.bundle).edgetpu_model_path is None


def test_edgetpu_with_compiler_adds_compiled_model(tiny_run, tmp_path, monkeypatch, convert_cli, capsys):
    """A stand-in edgetpu_compiler (copies the model) proves the bundle wiring."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "edgetpu_compiler"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'Edge TPU Compiler version 16.0 (test stand-in)'\n"
        'while [ $# -gt 1 ]; do case "$1" in -o) out="$2"; shift 2;; *) shift;; esac; done\n'
        'name=$(basename "$1" .tflite); cp "$1" "$out/${name}_edgetpu.tflite"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "tpu-bundle"
    code = convert_cli(tiny_run, "--quantize", "int8", "--calibration", 64, "--edgetpu", "--with-heatmap", "--out", out)
    assert code == 0
    printed = capsys.readouterr().out
    assert "Edge TPU check: compatible" in printed and "parity gate: PASSED" in printed
    bundle = load_bundle(out)
    assert bundle.edgetpu_model_path.name == "model_edgetpu.tflite"
    assert bundle.meta["edgetpu"]["compiled"] and "16.0" in bundle.meta["edgetpu"]["compiler"]
    info = Classifier(bundle, edgetpu="off").info()
    assert info["delegate"] == "cpu" and info["fallback_reason"] is None


# ---------------------------------------------------------------- CLI
def test_cli_uint8_with_zip_archive(tiny_run, tmp_path, convert_cli, capsys):
    out = tmp_path / "u8"
    assert convert_cli(tiny_run, "--quantize", "uint8", "--calibration", 64, "--archive", "zip", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "agreement" in printed and "smaller" in printed and "PASSED" in printed
    b = load_bundle(tmp_path / "u8.zip")
    assert b.input["dtype"] == "uint8" and b.heatmap is None
    assert json.loads((out / "model_card.json").read_text())["on_device"]["quantize"] == "uint8"
    # an existing bundle is never replaced silently
    assert convert_cli(tiny_run, "--quantize", "uint8", "--calibration", 64, "--out", out) == UsageError.exit_code
    assert "--force" in capsys.readouterr().err


def test_cli_reports_usage_errors_with_exit_code(tiny_run, tmp_path, convert_cli, capsys):
    code = convert_cli(tiny_run, "--quantize", "float16", "--calibration", 100, "--out", tmp_path / "x")
    assert code == 2 and "--calibration applies" in capsys.readouterr().err
    code = convert_cli(tiny_run, "--quantize", "int8", "--calibration", 10, "--out", tmp_path / "y")
    assert code == 2 and "too few" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
