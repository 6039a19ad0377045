"""The TF-free device runtime: adapters, post-processing, heatmaps, delegates, Classifier.

Pure parts are tested on arrays; the Classifier on a real bundle converted
from a tiny model trained in this session, with the real LiteRT interpreter.
Only the Edge TPU is faked (it cannot exist here).
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle_factory import CLASSES, draw_cell, shared_tiny_bundle, shared_tiny_run
from leukoedge.bundle import EDGETPU_MODEL_NAME, load_bundle, write_manifest
from leukoedge.errors import BundleError, InvalidImageError, RuntimeUnavailableError, UsageError
from leukoedge.runtime import Classifier, adapters, heatmap, postprocess, scores
from leukoedge.runtime.backend import DelegateChoice, select_delegate


@pytest.fixture(scope="session")
def int8_bundle(tmp_path_factory) -> Path:
    return shared_tiny_bundle(tmp_path_factory, "int8", True)


@pytest.fixture(scope="session")
def clf(int8_bundle) -> Classifier:
    return Classifier(load_bundle(int8_bundle))


@pytest.fixture(scope="session")
def test_images(tmp_path_factory) -> list[Path]:
    run = shared_tiny_run(tmp_path_factory)
    manifest = json.loads((run / "manifest.json").read_text())
    root = Path(manifest["root"])
    return [root / e["path"] for e in manifest["entries"] if e["split"] == "test"]


# ---------------------------------------------------------------- adapters
def test_quantize_dequantize_round_trip_int8_and_uint8():
    pixels = np.arange(256, dtype=np.float64)
    q = adapters.quantize(pixels, np.int8, 1.0, -128)
    assert q.dtype == np.int8 and q.min() == -128 and q.max() == 127
    assert np.array_equal(adapters.dequantize(q, 1.0, -128), pixels.astype(np.float32))
    u = adapters.quantize(pixels, np.uint8, 1.0, 0)
    assert np.array_equal(u, pixels.astype(np.uint8))


def test_dequantize_uses_wide_ints_no_wraparound():
    q = np.array([-128, 127], dtype=np.int8)
    # (q - zp) in int8 would overflow for zp = -128; int64 keeps 0..255
    assert adapters.dequantize(q, 1 / 256, -128).tolist() == [0.0, 255 / 256]


def test_quantize_clips_out_of_range():
    assert adapters.quantize(np.array([-5.0, 500.0]), np.uint8, 1.0, 0).tolist() == [0, 255]


def test_quant_params_rejects_per_channel():
    details = {"name": "x", "quantization_parameters": {"scales": np.array([0.1, 0.2]), "zero_points": np.array([0, 0])}}
    with pytest.raises(BundleError, match="per channel"):
        adapters.quant_params(details)


# ---------------------------------------------------------------- post-processing
def test_normalise_and_top1():
    p = postprocess.normalise(np.array([0.5, -0.01, 0.49]))
    assert p.sum() == pytest.approx(1.0) and p.min() >= 0
    assert postprocess.top1(p, ("a", "b", "c"))[:2] == (0, "a")
    assert postprocess.normalise(np.zeros(4)).tolist() == [0.25] * 4


def test_abstain_scores_and_threshold():
    confident, unsure = np.array([0.97, 0.01, 0.01, 0.01]), np.array([0.3, 0.3, 0.2, 0.2])
    rule = {"score": "max_softmax", "threshold": 0.5}  # as leukoedge.train.ood writes it
    assert postprocess.abstain(confident, None, rule) == (pytest.approx(0.97), False)
    score, abstained = postprocess.abstain(unsure, None, rule)
    assert abstained and score == pytest.approx(0.3)
    assert postprocess.abstain(unsure, None, None) == (None, False)
    ent = postprocess.abstain(np.full(4, 0.25), None, {"score": "entropy", "threshold": 0.9})
    assert ent[0] == pytest.approx(1.0) and ent[1]
    # an explicit side in the bundle wins over the score's default
    flipped = {"score": "max_softmax", "threshold": 0.5, "abstain_when": "above"}
    assert postprocess.abstain(confident, None, flipped)[1] is True
    with pytest.raises(BundleError, match="abstain_when"):
        postprocess.abstain(confident, None, {**rule, "abstain_when": "sideways"})


def test_unknown_score_lists_known_ones():
    with pytest.raises(BundleError, match="max_softmax"):
        scores.get_score("no-such-score")


# ---------------------------------------------------------------- heatmaps
def test_cam_uses_class_weights_and_normalises():
    feats = np.zeros((4, 4, 2), np.float32)
    feats[0, 0, 0] = 1.0  # channel 0 active top-left
    feats[3, 3, 1] = 1.0  # channel 1 active bottom-right
    weights = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # class k <- channel k
    for k, quadrant in ((0, (0, 0)), (1, (1, 1))):
        hm = heatmap.normalise_map(heatmap.class_activation_map(feats, weights, k), (16, 16))
        assert hm.shape == (16, 16) and hm.dtype == np.float32
        assert hm.max() == pytest.approx(1.0) and hm.min() >= 0.0
        peak = np.unravel_index(np.argmax(hm), hm.shape)
        assert (peak[0] // 8, peak[1] // 8) == quadrant  # the evidence for class k sits where channel k fired
    flat = heatmap.normalise_map(np.zeros((4, 4)), (8, 8))
    assert not flat.any()


def test_overlay_shape_dtype_and_blend():
    rgb = np.full((20, 30, 3), 128, np.uint8)
    hm = np.zeros((5, 5), np.float32)
    hm[2, 2] = 1.0
    out = heatmap.overlay(rgb, hm, alpha=0.5)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert not np.array_equal(out, rgb)
    assert np.array_equal(heatmap.overlay(rgb, hm, alpha=0.0), rgb)
    with pytest.raises(InvalidImageError):
        heatmap.overlay(rgb.astype(np.float32), hm)


# ---------------------------------------------------------------- delegate selection
class FakeDelegate:
    pass


def test_select_delegate_uses_edgetpu_with_a_working_loader(tmp_path):
    cpu, tpu = tmp_path / "model.tflite", tmp_path / "model_edgetpu.tflite"
    loaded = []

    def loader(lib):
        loaded.append(lib)
        return FakeDelegate()

    choice = select_delegate(cpu, tpu, "auto", loader)
    assert choice.delegate == "edgetpu" and choice.model_path == tpu
    assert isinstance(choice.delegates[0], FakeDelegate) and loaded and "edgetpu" in loaded[0]
    assert choice.fallback_reason is None


def test_select_delegate_falls_back_and_says_why(tmp_path):
    cpu, tpu = tmp_path / "model.tflite", tmp_path / "model_edgetpu.tflite"

    def failing(lib):
        raise ValueError(f"Failed to load delegate from {lib}")

    choice = select_delegate(cpu, tpu, "auto", failing)
    assert choice == DelegateChoice(cpu, (), "cpu", choice.fallback_reason)
    assert "could not be loaded" in choice.fallback_reason
    with pytest.raises(RuntimeUnavailableError):
        select_delegate(cpu, tpu, "on", failing)
    # no compiled model: the delegate is not even loaded
    assert "no model_edgetpu.tflite" in select_delegate(cpu, None, "auto", failing).fallback_reason
    assert select_delegate(cpu, tpu, "off", failing) == DelegateChoice(cpu, (), "cpu", None)
    with pytest.raises(UsageError):
        select_delegate(cpu, tpu, "maybe", failing)


# LiteRT's Delegate.__del__ trips over its own half-built object after a failed load.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_classifier_falls_back_to_cpu_when_libedgetpu_is_missing(int8_bundle, tmp_path):
    """A bundle with a (stand-in) compiled model; the real load_delegate fails here."""
    b = tmp_path / "tpu-bundle"
    shutil.copytree(int8_bundle, b)
    shutil.copyfile(b / "model.tflite", b / EDGETPU_MODEL_NAME)
    meta = json.loads((b / "bundle.json").read_text())
    meta["files"]["model_edgetpu"] = EDGETPU_MODEL_NAME
    (b / "bundle.json").write_text(json.dumps(meta))
    write_manifest(b)
    clf = Classifier(load_bundle(b), edgetpu="auto")
    info = clf.info()
    assert info["delegate"] == "cpu" and info["model_file"] == "model.tflite"
    assert "libedgetpu" in info["fallback_reason"]
    assert clf.classify(draw_cell("Pro", np.random.default_rng(1))).label in CLASSES
    with pytest.raises(RuntimeUnavailableError):
        Classifier(load_bundle(b), edgetpu="on")


# ---------------------------------------------------------------- Classifier on a real bundle
def test_classify_every_source_kind_gives_the_same_answer(clf, test_images):
    path = test_images[0]
    data = path.read_bytes()
    rgb = np.asarray(Image.open(path).convert("RGB"))
    preds = [
        clf.classify(path),
        clf.classify(str(path)),
        clf.classify(data),
        clf.classify(io.BytesIO(data)),
        clf.classify(rgb),
        clf.classify(Image.open(path)),
    ]
    assert len({p.label for p in preds}) == 1
    assert all(p.probabilities == preds[0].probabilities for p in preds)


def test_prediction_fields(clf, test_images):
    pred = clf.classify(test_images[0])
    assert set(pred.probabilities) == set(CLASSES)
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert pred.confidence == max(pred.probabilities.values())
    # The bundle's fitted Mahalanobis score: a distance, abstain when above the threshold.
    assert pred.ood_score_name == "mahalanobis" and pred.ood_score >= 0
    assert pred.abstained == (pred.ood_score > clf.bundle.abstention["threshold"])
    assert set(pred.timings) == {"preprocess_ms", "invoke_ms", "postprocess_ms"}
    assert pred.latency_ms >= pred.timings["invoke_ms"] >= 0
    assert pred.heatmap.shape == (32, 32) and pred.heatmap.dtype == np.float32
    assert 0.0 <= pred.heatmap.min() and pred.heatmap.max() <= 1.0
    d = pred.to_dict()
    json.dumps(d)
    assert d["has_heatmap"] and "heatmap" not in d
    assert np.array(pred.to_dict(include_heatmap=True)["heatmap"]).shape == (32, 32)


def test_classifier_is_accurate_on_the_test_split(clf, test_images, record_property):
    correct = sum(clf.classify(p).label == p.parent.name for p in test_images)
    record_property("accuracy", correct / len(test_images))
    assert correct / len(test_images) >= 0.9


def test_large_camera_frame_is_resized_through_preprocess(clf):
    frame = np.asarray(Image.fromarray(draw_cell("Early", np.random.default_rng(5), 32)).resize((640, 480)))
    assert clf.classify(frame).heatmap.shape == (32, 32)


def test_bad_inputs_raise_invalid_image(clf):
    for bad in (b"", b"not an image", np.zeros((32, 32, 3), np.float32)):
        with pytest.raises(InvalidImageError):
            clf.classify(bad)


def test_bad_thread_count_is_a_usage_error(int8_bundle):
    with pytest.raises(UsageError, match="num_threads"):
        Classifier(load_bundle(int8_bundle), num_threads=0)


def test_info_reports_runtime_and_delegate(clf):
    info = clf.info()
    assert info["runtime"] in ("ai-edge-litert", "tflite-runtime")
    assert info["model"] == "tiny_cnn" and info["labels"] == list(CLASSES)
    assert info["delegate"] == "cpu" and info["valid"] is True
    assert info["heatmap_method"] == "cam"


def test_concurrent_classification_matches_serial(clf, test_images):
    images = [p.read_bytes() for p in test_images]
    serial = [clf.classify(b).probabilities for b in images]
    barrier = threading.Barrier(8)

    def work(i):
        if i < 8:
            barrier.wait()
        return clf.classify(images[i % len(images)]).probabilities

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(4 * len(images))))
    assert all(r == serial[i % len(images)] for i, r in enumerate(results))


def test_runtime_never_imports_tensorflow(int8_bundle, test_images):
    code = textwrap.dedent(
        f"""
        import sys
        from leukoedge.runtime import Classifier, load_bundle
        pred = Classifier(load_bundle({str(int8_bundle)!r})).classify({str(test_images[0])!r})
        assert pred.label, pred
        bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith(("tensorflow.", "keras")))
        print("HEAVY", bad)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_model_and_bundle_json_must_agree(int8_bundle, tmp_path):
    b = tmp_path / "mismatch"
    shutil.copytree(int8_bundle, b)
    meta = json.loads((b / "bundle.json").read_text())
    zero = meta["input"]["quantization"]["zero_point"]
    meta["input"]["dtype"] = "uint8"  # the model's input is int8
    meta["input"]["quantization"]["zero_point"] = zero + 128  # a valid uint8 description of another model
    (b / "bundle.json").write_text(json.dumps(meta))
    write_manifest(b)  # consistent checksums: only the cross-check can catch it
    with pytest.raises(BundleError, match="input is int8"):
        Classifier(load_bundle(b))
    meta["input"]["dtype"] = "int8"
    meta["input"]["quantization"]["zero_point"] = 0
    (b / "bundle.json").write_text(json.dumps(meta))
    write_manifest(b)
    with pytest.raises(BundleError, match="input quantisation"):
        Classifier(load_bundle(b))


def test_litert_discovery_prefers_ai_edge_litert_then_tflite_runtime(monkeypatch):
    import types

    from leukoedge.runtime import backend

    assert backend.find_litert().name == "ai-edge-litert"
    real_import = backend.importlib.import_module
    fake = types.SimpleNamespace(Interpreter=object, load_delegate=lambda lib: None)

    def no_litert(name):
        if name == "ai_edge_litert.interpreter":
            raise ImportError("not installed")
        if name == "tflite_runtime.interpreter":
            return fake
        return real_import(name)

    monkeypatch.setattr(backend.importlib, "import_module", no_litert)
    found = backend.find_litert()
    assert found.name == "tflite-runtime" and found.interpreter_cls is object

    def nothing(name):
        raise ImportError(f"no {name}")

    monkeypatch.setattr(backend.importlib, "import_module", nothing)
    with pytest.raises(RuntimeUnavailableError, match="no TFLite runtime") as info:
        backend.find_litert()
    assert "leukoedge[edge]" in info.value.hint and "tensorflow" not in info.value.message.lower()
