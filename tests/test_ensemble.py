"""Ensembles and test-time augmentation in one converted model (issue 18): real conversions, real LiteRT.

Member 2 is the session's tiny run with its weights perturbed (so the two members
answer differently); both share the run's split, as ``--member`` requires.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import shared_tiny_bundle, shared_tiny_run

from leukoedge import cli
from leukoedge.bundle import META_NAME, MODEL_NAME, load_bundle
from leukoedge.convert import ensemble
from leukoedge.convert.options import ConvertOptions
from leukoedge.convert.pipeline import convert_run
from leukoedge.errors import UsageError
from leukoedge.runtime import Classifier

FLIPS = (lambda x: x, lambda x: x[:, ::-1], lambda x: x[::-1], lambda x: x[::-1, ::-1])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return shared_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def second_member(tiny_run, tmp_path_factory) -> Path:
    import keras

    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("member2") / "run"))
    model = keras.models.load_model(tiny_run / "model.keras", compile=False)
    rng = np.random.default_rng(7)
    model.set_weights([w + rng.normal(0, 0.15 * (np.std(w) + 1e-3), w.shape).astype(w.dtype) for w in model.get_weights()])
    (run / "model.keras").unlink()
    model.save(run / "model.keras")
    return run


def _keras(path: Path):
    import keras

    return keras.models.load_model(path / "model.keras", compile=False)


def _float_average(models, images: np.ndarray) -> np.ndarray:
    """What the bundle must reproduce: the mean over members x the four flip views, computed here in numpy."""
    views = [np.stack([f(img) for img in images]).astype(np.float32) for f in FLIPS]
    return np.mean([np.asarray(m(v)) for m in models for v in views], axis=0)


def test_two_members_with_flip_tta_convert_to_one_model_graded_against_the_float_average(
        tiny_run, second_member, tmp_path, tmp_path_factory, monkeypatch, capsys):
    from leukoedge.convert import calibration
    from leukoedge.train.rundir import RunDir

    monkeypatch.setattr(cli, "COMMAND_MODULES", (("convert", "leukoedge.convert.cli"),))
    out = tmp_path / "ensemble"
    code = cli.main(["convert", str(tiny_run), "--member", str(second_member), "--tta", "flips", "--quantize", "int8",
                     "--calibration", "64", "--with-heatmap", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    meta = json.loads((out / META_NAME).read_text())
    ens = meta["ensemble"]
    assert [m["run"] for m in ens["members"]] == [tiny_run.name, second_member.name] and ens["views"] == list(ensemble.TTA_VIEWS["flips"])
    assert ens["invokes_per_image"] == 8 and ens["members"][0]["version"] != ens["members"][1]["version"]
    card = (out / "model_card.md").read_text()
    assert "averages 2 member(s) x 4 view(s)" in card and "8 sub-model invokes" in card

    # the gate graded the average: its float accuracy is the numpy average's, on the same test images
    rd = RunDir(tiny_run)
    manifest = rd.manifest()
    test = manifest.subset("test")
    images = calibration.load_images(manifest, test, rd.config().preprocess_spec, None, "test")
    y = np.array([manifest.label_index(e.label) for e in test])
    want = _float_average([_keras(tiny_run), _keras(second_member)], images)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["n_images"] == len(test)
    assert parity["float_accuracy"] == pytest.approx(float((want.argmax(1) == y).mean()), abs=1e-12)

    # the device runs one model that reproduces the average, and flips of a field do not change its answer
    clf = Classifier(load_bundle(out), edgetpu="off")
    got = np.stack([clf.run(img).probabilities for img in images[:12]])
    assert np.abs(got - want[:12]).max() < 0.06
    # Exactly invariant in float (each member sees the same four views, permuted); in int8 only the order of the
    # quantised additions changes, which moves an output by a few steps of 1/256 (up to 8 seen over seeds 0-2).
    combined = ensemble.combined_model([_keras(tiny_run), _keras(second_member)], ensemble.TTA_VIEWS["flips"], True)
    batch = images[:6].astype(np.float32)
    base_float = np.asarray(combined(batch)[0])
    for img in images[:6]:
        base = clf.run(img).probabilities
        for flip in FLIPS[1:]:
            assert np.abs(clf.run(np.ascontiguousarray(flip(img))).probabilities - base).max() < 0.06
    for flip in FLIPS[1:]:
        flipped = np.stack([flip(img) for img in batch])
        np.testing.assert_allclose(np.asarray(combined(flipped)[0]), base_float, atol=1e-5)
    pred = clf.classify(images[0])
    assert pred.heatmap is not None and pred.label in meta["labels"]
    single = (shared_tiny_bundle(tmp_path_factory, "int8", True) / MODEL_NAME).stat().st_size
    assert (out / MODEL_NAME).stat().st_size > 1.8 * single  # two members' weights: the size is said, not hidden


def test_a_member_trained_on_another_split_is_refused_before_converting(tiny_run, tmp_path):
    other = Path(shutil.copytree(tiny_run, tmp_path / "other-split"))
    manifest = json.loads((other / "manifest.json").read_text())
    entry = next(e for e in manifest["entries"] if e["split"] == "test")
    entry["split"] = "train"
    (other / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "refused"
    with pytest.raises(UsageError, match="another split"):
        convert_run(ConvertOptions(run_dir=tiny_run, out=out, members=(other,), calibration=64))
    assert not out.exists()
    with pytest.raises(UsageError, match="repeats RUN_DIR"):
        ConvertOptions(run_dir=tiny_run, out=out, members=(tiny_run,))
    with pytest.raises(UsageError, match="--tta"):
        ConvertOptions(run_dir=tiny_run, out=out, tta="rot45")


def test_dihedral_views_are_the_eight_symmetries_and_need_a_square_input():
    image = np.arange(5 * 5 * 3, dtype=np.float32).reshape(1, 5, 5, 3)
    got = {np.asarray(ensemble.view_layer(v)(image)).tobytes() for v in ensemble.TTA_VIEWS["dihedral"]}
    want = {np.ascontiguousarray(np.rot90(f, k, axes=(1, 2))).tobytes()
            for f in (image, image[:, :, ::-1]) for k in range(4)}
    assert got == want and len(got) == 8
    flips = {np.asarray(ensemble.view_layer(v)(image)).tobytes() for v in ensemble.TTA_VIEWS["flips"]}
    assert flips == {np.ascontiguousarray(f(image[0]))[None].tobytes() for f in FLIPS}
    with pytest.raises(UsageError, match="square"):
        ensemble.check_views("dihedral", 32, 48)
    assert ensemble.check_views("flips", 32, 48) == ensemble.TTA_VIEWS["flips"]


def test_members_scales_must_agree_within_ten_percent_unless_one_is_given(tiny_run, tmp_path):
    """Red-cell scales measured on the same images by two runs differ a little (0.401 vs 0.408 seen): accepted;
    a member trained at another magnification is refused, unless --um-per-px states one scale for all."""
    from leukoedge.train.rundir import RunDir

    def with_scale(name: str, um: float) -> tuple:
        run = Path(shutil.copytree(tiny_run, tmp_path / name))
        config = json.loads((run / "config.json").read_text())
        config["scale"] = {"um_per_px": um, "source": "measured", "source_size": [32, 32]}
        (run / "config.json").write_text(json.dumps(config))
        rd = RunDir(run)
        return rd, rd.config(), rd.manifest()

    base = with_scale("a", 0.401)
    ensemble.check_members(base, [with_scale("b", 0.408)])
    far = with_scale("c", 0.5)
    with pytest.raises(UsageError, match="training scale"):
        ensemble.check_members(base, [far])
    ensemble.check_members(base, [far], given_scale=True)
