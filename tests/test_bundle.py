"""The bundle format: round trips and refusal of damaged, tampered or unsafe bundles.

Every test starts from a real bundle (tiny model converted in this session)
and copies it before changing anything.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bundle_factory import CLASSES, shared_tiny_bundle
from leukoedge.bundle import _check_member_name, load_bundle, make_archive, write_manifest
from leukoedge.errors import BundleError
from leukoedge.files import sha256_file
from leukoedge.preprocess import PreprocessSpec
from leukoedge.runtime import Classifier


@pytest.fixture(scope="session")
def source_bundle(tmp_path_factory) -> Path:
    return shared_tiny_bundle(tmp_path_factory, "int8", True)


@pytest.fixture
def bundle(source_bundle, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(source_bundle, tmp_path / "bundle"))


def _edit_meta(bundle: Path, change, remanifest: bool) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    change(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    if remanifest:
        write_manifest(bundle)


def test_bundle_contents_and_metadata(source_bundle):
    files = {p.name for p in source_bundle.iterdir()}
    assert {
        "bundle.json", "model.tflite", "labels.txt", "model_card.md", "model_card.json",
        "parity.json", "parity.md", "MANIFEST.sha256", "cam_weights.npy",
    } <= files
    lines = (source_bundle / "MANIFEST.sha256").read_text().splitlines()
    assert len(lines) == len(files) - 1
    for line in lines:  # sha256sum format
        digest, name = line.split("  ")
        assert sha256_file(source_bundle / name) == digest
    b = load_bundle(source_bundle)
    assert b.labels == CLASSES and b.valid and b.spec == PreprocessSpec.square(32)
    assert b.input["dtype"] == "int8" and b.input["shape"] == [1, 32, 32, 3]
    assert b.input["quantization"]["scale"] > 0
    assert set(b.output_names) == {"probabilities", "features"}
    # convert fits the abstention score on the converted model's features (the default when
    # the model has a 'features' layer) and ships its arrays; the run's max_softmax rule is replaced.
    assert b.abstention["score"] == "mahalanobis" and b.abstention["abstain_when"] == "above"
    assert {"ood_means.npy", "ood_chol.npy", "trust.json", "trust.md"} <= files
    assert b.temperature > 0 and "ece_after" in b.calibration
    assert b.cam_weights().shape == (24, len(CLASSES))
    assert b.meta["parity"]["passed"] is True
    assert "not a diagnos" in (source_bundle / "model_card.md").read_text()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_round_trip_classifies_like_the_directory(source_bundle, tmp_path, kind):
    archive = make_archive(source_bundle, kind, tmp_path / f"b.{kind}")
    b = load_bundle(archive)
    assert b.source == archive and b.path != source_bundle and b.meta == load_bundle(source_bundle).meta
    img = np.full((32, 32, 3), 200, np.uint8)
    assert Classifier(b).classify(img).probabilities == Classifier(load_bundle(source_bundle)).classify(img).probabilities


def test_flipped_byte_in_model_is_rejected(bundle):
    data = bytearray((bundle / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.tflite is damaged"):
        load_bundle(bundle)


def test_edited_bundle_json_is_rejected(bundle):
    _edit_meta(bundle, lambda m: m["abstention"].update(threshold=0.99), remanifest=False)
    with pytest.raises(BundleError, match="bundle.json is damaged or was modified"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", ["model.tflite", "labels.txt", "parity.md", "cam_weights.npy"])
def test_deleted_file_is_rejected(bundle, name):
    (bundle / name).unlink()
    with pytest.raises(BundleError, match=f"{name} is listed in MANIFEST.sha256 but missing"):
        load_bundle(bundle)


def test_missing_manifest_is_rejected(bundle):
    (bundle / "MANIFEST.sha256").unlink()
    with pytest.raises(BundleError, match="missing MANIFEST.sha256"):
        load_bundle(bundle)


def test_unlisted_model_file_is_rejected(bundle):
    shutil.copyfile(bundle / "model.tflite", bundle / "model_edgetpu.tflite")
    with pytest.raises(BundleError, match="unlisted file.*model_edgetpu.tflite"):
        load_bundle(bundle)


def test_manifest_with_unsafe_name_is_rejected(bundle):
    with open(bundle / "MANIFEST.sha256", "a") as fh:
        fh.write(f"{'0' * 64}  ../etc/passwd\n")
    with pytest.raises(BundleError, match="unsafe file name"):
        load_bundle(bundle)


def test_invalid_bundle_is_refused_unless_allowed(bundle):
    _edit_meta(bundle, lambda m: m.update(valid=False, invalid_reason="parity gate failed: test"), remanifest=True)
    with pytest.raises(BundleError, match="marked invalid: parity gate failed: test"):
        load_bundle(bundle)
    assert load_bundle(bundle, allow_invalid=True).invalid_reason == "parity gate failed: test"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.update(labels=["Benign", "Early", "Pre", "Zzz"]), "labels.txt"),
        (lambda m: m["preprocessing"].update(height=3), "preprocessing spec"),
        (lambda m: m["preprocessing"].update(height=64), "does not match the preprocessing spec"),
        (lambda m: m["input"].update(dtype="int4"), "unsupported input dtype"),
        (lambda m: m.pop("outputs"), "missing field"),
        (lambda m: m["files"].update(model_edgetpu="../model.tflite"), "not in the bundle"),
        (lambda m: m["heatmap"].update(weights="../cam_weights.npy"), "heatmap weights file"),
        (lambda m: m["heatmap"].update(output="logits"), "heatmap output 'logits'"),
    ],
)
def test_inconsistent_metadata_is_rejected_even_with_valid_checksums(bundle, change, message):
    _edit_meta(bundle, change, remanifest=True)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_missing_path_and_wrong_kind(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "x.txt")


def _tar_with_extra(source: Path, out: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(out, "w") as tar:
        for p in sorted(source.iterdir()):
            tar.add(p, arcname=f"bundle/{p.name}")
        tar.addfile(extra, io.BytesIO(data) if data else None)
    return out


def test_tar_path_traversal_is_refused_and_nothing_escapes(source_bundle, tmp_path):
    evil = tarfile.TarInfo("bundle/../../evil.txt")
    evil.size = 4
    archive = _tar_with_extra(source_bundle, tmp_path / "evil.tar", evil, b"evil")
    with pytest.raises(BundleError, match="path traversal"):
        load_bundle(archive)
    assert not list(tmp_path.parent.glob("**/evil.txt"))


def test_tar_absolute_path_and_symlink_are_refused(source_bundle, tmp_path):
    absolute = tarfile.TarInfo("/tmp/abs.txt")
    absolute.size = 1
    with pytest.raises(BundleError, match="path traversal"):
        load_bundle(_tar_with_extra(source_bundle, tmp_path / "abs.tar", absolute, b"x"))
    link = tarfile.TarInfo("bundle/link.tflite")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(BundleError, match="link or device"):
        load_bundle(_tar_with_extra(source_bundle, tmp_path / "link.tar", link))


def test_zip_traversal_and_damage_are_refused(source_bundle, tmp_path):
    archive = make_archive(source_bundle, "zip", tmp_path / "b.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(BundleError, match="path traversal"):
        load_bundle(archive)
    truncated = tmp_path / "cut.zip"
    truncated.write_bytes(make_archive(source_bundle, "zip", tmp_path / "c.zip").read_bytes()[:200])
    with pytest.raises(BundleError, match="zip"):
        load_bundle(truncated)


def test_tampered_member_inside_archive_is_rejected(source_bundle, tmp_path):
    copy = Path(shutil.copytree(source_bundle, tmp_path / "bundle"))
    (copy / "labels.txt").write_text("Benign\nEarly\nPre\nMalignant\n")
    archive = make_archive(copy, "tar")
    with pytest.raises(BundleError, match="labels.txt is damaged"):
        load_bundle(archive)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", ".", "..", "/", "\\", "\x00", "bundle", "model.tflite"]), max_size=12).map("".join))
def test_member_names_never_escape(name):
    """Any archive member name is either refused or maps to a plain file inside the bundle."""
    try:
        parts = _check_member_name(Path("x.tar"), name)
    except BundleError:
        return
    assert 1 <= len(parts) <= 2
    assert all(p not in ("", ".", "..") and "/" not in p and "\\" not in p and "\x00" not in p for p in parts)


# -- issue 13: every number the device computes with is checked at load -------------------------------
def _set(path: str, value):
    """A change that sets ``meta[a][b]... = value`` for a dotted path."""
    def change(meta):
        *parents, leaf = path.split(".")
        node = meta
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value
    return change


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("calibration.temperature", 0, "calibration.temperature is 0; it must be greater than 0"),
        ("calibration.temperature", -1.5, "must be greater than 0"),
        ("calibration.temperature", float("nan"), "calibration.temperature is nan, not a finite number"),
        ("calibration.temperature", float("inf"), "not a finite number"),
        ("calibration.temperature", "1.0", "not a finite number"),
        ("calibration.log_prob_floor", float("nan"), "log_prob_floor"),
        ("calibration.log_prob_floor", 2.0, "log_prob_floor is 2.0; it must lie in (0, 1)"),
        ("abstention.threshold", float("nan"), "abstention.threshold"),
        ("abstention.threshold", float("-inf"), "abstention.threshold"),
        ("abstention.abstain_when", "sideways", "abstain_when"),
        ("input.quantization.scale", 0.0, "scale > 0"),
        ("input.quantization.scale", float("nan"), "input.quantization.scale"),
        ("input.quantization.zero_point", 300, "zero point in"),
        ("input.quantization.zero_point", 1.5, "not an integer"),
        ("outputs.probabilities.quantization.scale", float("inf"), "outputs.probabilities.quantization.scale"),
    ],
)
def test_bad_numbers_in_bundle_json_are_refused_at_load(bundle, path, value, message):
    """A temperature of 0 or NaN used to load, report healthy, and answer every classify with 503."""
    _edit_meta(bundle, _set(path, value), remanifest=True)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert message in err.value.message and "bundle.json" in err.value.message


def test_duplicate_or_blank_labels_are_refused(bundle):
    def dup(meta):
        meta["labels"] = ["Benign", "Early", "Early", "Pro"]
    _edit_meta(bundle, dup, remanifest=False)
    (bundle / "labels.txt").write_text("Benign\nEarly\nEarly\nPro\n")
    write_manifest(bundle)
    with pytest.raises(BundleError, match="distinct labels"):
        load_bundle(bundle)


def test_serve_refuses_to_start_on_a_bad_number_with_a_clear_message(bundle, tmp_path, capsys):
    from leukoedge.cli import main

    _edit_meta(bundle, _set("calibration.temperature", 0.0), remanifest=True)
    rc = main(["serve", "--bundle", str(bundle), "--camera", "none", "--data-dir", str(tmp_path / "data"),
               "--port", "8099"])
    err = capsys.readouterr().err
    assert rc == BundleError.exit_code
    assert "calibration.temperature is 0.0; it must be greater than 0" in err


def test_invalid_bundle_hint_names_the_real_flags(bundle):
    _edit_meta(bundle, lambda m: m.update(valid=False, invalid_reason="gate"), remanifest=True)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert "--force-invalid-bundle" in err.value.hint and "--allow-invalid" in err.value.hint
    assert "leukoedge serve --force-invalid-bundle" in err.value.hint


def test_shape_mismatch_message_prints_plain_numbers(bundle):
    _edit_meta(bundle, lambda m: (m["input"].update(shape=[1, 16, 16, 3]), m["preprocessing"].update(height=16, width=16)),
               remanifest=True)
    with pytest.raises(BundleError) as err:
        Classifier(load_bundle(bundle), edgetpu="off")
    assert "np.int" not in err.value.message and "[1, 32, 32, 3]" in err.value.message
