"""``leukoedge bench``: latency and app benchmarks produce well-formed reports.

Real parts only: tiny bundles made by a real TF conversion (tests/bundle_factory),
the real LiteRT interpreter, and the real Flask app served by waitress on a
loopback port. No timing thresholds: only structure, ordering and counts.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoedge.bench import cli as bench_cli
from leukoedge.bench.app import AppBenchConfig, check_loopback, multipart_body, run_app_bench
from leukoedge.bench.images import bench_images, from_folder, noise_images
from leukoedge.bench.latency import LatencyConfig, parse_int_list, run_latency
from leukoedge.bench.machine import cpu_model, describe_machine, machine_info, peak_rss_bytes
from leukoedge.bench.report import app_markdown, latency_markdown, md_table, write_atomic
from leukoedge.bench.stats import summarise
from leukoedge.errors import UsageError

REQUIRED_KEYS = ("p50_ms", "p90_ms", "p99_ms", "throughput_ips", "model_bytes", "threads", "runtime",
                 "runtime_version", "delegate", "ratio_to_first", "stages")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    """Two real bundles of one tiny run: int8 with the heatmap output, float32 without."""
    from bundle_factory import shared_tiny_bundle

    first = shared_tiny_bundle(tmp_path_factory, "int8", True)  # the session's tiny run, trained once
    second = shared_tiny_bundle(tmp_path_factory, "none", False)
    return Path(first), Path(second)


def _check_percentiles(entry: dict) -> None:
    assert entry["p50_ms"] <= entry["p90_ms"] <= entry["p99_ms"]
    if "min_ms" in entry:
        assert entry["min_ms"] <= entry["p50_ms"] and entry["p99_ms"] <= entry["max_ms"]


# -- latency ----------------------------------------------------------------
@pytest.mark.slow
def test_latency_report_is_well_formed_and_interleaved(bundles):
    config = LatencyConfig(runs=6, warmup=1, threads=(1, 2), progress=False)
    report = run_latency(bundles, config, noise_images(2, side=48))
    assert report["kind"] == "latency" and report["interleaved"] is True
    assert report["config"]["threads"] == [1, 2]
    assert {"cpu_model", "cores", "os", "python", "date_utc"} <= set(report["machine"])
    assert len(report["results"]) == 4  # 2 bundles x 2 thread counts
    for r in report["results"]:
        assert set(REQUIRED_KEYS) <= set(r)
        _check_percentiles(r)
        for stage in ("preprocess", "invoke", "postprocess", "end_to_end"):
            assert r["stages"][stage]["n"] == 6
            _check_percentiles(r["stages"][stage])
        assert r["model_bytes"] == (Path(r["bundle"]) / "model.tflite").stat().st_size
        assert r["throughput_ips"] > 0
        assert r["runtime"] in ("ai-edge-litert", "tflite-runtime")
        assert r["delegate"] == "cpu"
    first = [r for r in report["results"] if r["bundle"] == str(bundles[0])]
    assert [r["ratio_to_first"] for r in first] == [1.0, 1.0]
    assert [r["invoke_ratio_to_first"] for r in first] == [1.0, 1.0]
    by_bundle = {r["bundle"]: r["heatmap"] for r in report["results"]}
    assert by_bundle == {str(bundles[0]): True, str(bundles[1]): False}
    assert report["peak_rss_bytes"] > 0
    json.loads(json.dumps(report))  # JSON-serialisable as is
    md = latency_markdown(report, "leukoedge bench latency a b")
    assert md.startswith("# Latency") and "Research use only" in md
    assert md.count("\n| ") >= 4 + 1 and "end-to-end p50 ms" in md


@pytest.mark.slow
def test_cli_latency_writes_json_and_markdown(bundles, tmp_path, capsys):
    out_json = tmp_path / "lat.json"
    code = bench_cli.main(["latency", str(bundles[0]), "--runs", "3", "--warmup", "0", "--threads", "1",
                           "--json", "--out", str(out_json), "--quiet", "--no-heatmap"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out_json.read_text())
    assert printed["results"][0]["p50_ms"] == saved["results"][0]["p50_ms"]
    assert saved["results"][0]["heatmap"] is False
    out_md = tmp_path / "lat.md"
    assert bench_cli.main(["latency", str(bundles[0]), "--runs", "2", "--warmup", "0", "--quiet",
                           "--out", str(out_md)]) == 0
    assert out_md.read_text().startswith("# Latency")


@pytest.mark.slow
def test_latency_uses_images_from_a_folder(bundles, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(folder / "a.png")
    (folder / "b.jpg").write_text("not an image")  # skipped, not fatal
    images = from_folder(folder)
    assert images.source == "folder" and len(images.images) == 1
    report = run_latency([bundles[1]], LatencyConfig(runs=2, warmup=0, progress=False), images)
    assert report["images"]["source"] == "folder" and report["results"][0]["stages"]["end_to_end"]["n"] == 2


@pytest.mark.parametrize("kwargs", [{"runs": 0}, {"warmup": -1}, {"threads": ()}, {"threads": (1, 1)},
                                    {"threads": (0,)}])
def test_latency_config_rejects_bad_values(kwargs):
    with pytest.raises(UsageError):
        LatencyConfig(**kwargs)


def test_latency_rejects_duplicate_and_missing_bundles(tmp_path):
    images = noise_images(1, side=32)
    with pytest.raises(UsageError):
        run_latency([tmp_path, tmp_path], LatencyConfig(progress=False), images)
    with pytest.raises(UsageError):
        run_latency([], LatencyConfig(progress=False), images)


def test_parse_int_list():
    assert parse_int_list("1,2, 4", "--threads") == (1, 2, 4)
    for bad in ("", "a", "1,,x"):
        with pytest.raises(UsageError):
            parse_int_list(bad, "--threads")


def test_images_sources(tmp_path):
    assert noise_images(2, side=32).images == noise_images(2, side=32).images  # deterministic bytes
    default = bench_images(None, n=2)
    assert default.source in ("synthetic", "noise") and len(default.images) == 2
    for data in default.images:
        assert Image.open(io.BytesIO(data)).size[0] > 0
    with pytest.raises(UsageError):
        from_folder(tmp_path / "missing")
    with pytest.raises(UsageError):
        from_folder(tmp_path)  # exists, no images


# -- statistics, machine, reports ------------------------------------------
def test_summarise_orders_percentiles_and_refuses_nothing():
    s = summarise([5.0, 1.0, 9.0, 3.0, 100.0])
    assert s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"] and s["n"] == 5
    with pytest.raises(UsageError):
        summarise([])


def test_machine_info_and_cpu_model_parsing():
    info = machine_info()
    assert info["cores"] >= 1 and info["python"].count(".") == 2
    assert peak_rss_bytes() > 0
    assert "cores" in describe_machine(info)
    pi = "processor\t: 0\nBogoMIPS\t: 108.00\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
    assert cpu_model(pi) == "Raspberry Pi 5 Model B Rev 1.0"
    assert cpu_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n") == "Intel(R) Xeon(R)"


def test_md_table_and_atomic_write(tmp_path):
    table = md_table(("a", "b"), [(1.234, None), ("x|y", 2)])
    assert table.splitlines()[2] == "| 1.23 | — |" and "x\\|y" in table
    path = write_atomic(tmp_path / "sub" / "r.md", "hello\n")
    assert path.read_text() == "hello\n" and list(path.parent.iterdir()) == [path]


def test_bench_modules_never_import_tensorflow():
    code = ("import sys, leukoedge.bench.cli, leukoedge.bench.latency, leukoedge.bench.app, "
            "leukoedge.bench.images, leukoedge.bench.machine, leukoedge.bench.report, leukoedge.runtime; "
            "sys.exit(1 if any(m.split('.')[0] == 'tensorflow' for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- app --------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://127.9.9.9:1/api/classify", "http://localhost:80",
                                 "http://[::1]:8080/"])
def test_loopback_urls_are_accepted(url):
    scheme, host, port, path = check_loopback(url)
    assert scheme == "http" and path.endswith("/api/classify") and port > 0


@pytest.mark.parametrize("url", ["http://10.0.0.5:8080", "http://example.com", "http://0.0.0.0:80",
                                 "http://192.168.1.2", "ftp://127.0.0.1/", "127.0.0.1:8080",
                                 "http://127.0.0.1.example.com/", "http://[::2]:80"])
def test_non_loopback_urls_are_refused(url):
    with pytest.raises(UsageError):
        check_loopback(url)
    with pytest.raises(UsageError):
        AppBenchConfig(url=url)


def test_cli_app_refuses_remote_host(capsys):
    assert bench_cli.main(["app", "http://10.1.2.3:8080", "--requests", "1", "--quiet"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_app_config_bounds():
    for kwargs in ({"requests": 0}, {"requests": 10**6}, {"clients": (0,)}, {"time_limit_s": 0}):
        with pytest.raises(UsageError):
            AppBenchConfig(url="http://127.0.0.1:1", **kwargs)


def test_multipart_body_shape():
    body, ctype = multipart_body(b"\x89PNG\r\n\x1a\nrest")
    boundary = ctype.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert b'name="image"' in body and b"Content-Type: image/png" in body


@contextlib.contextmanager
def _serve(bundle: Path, data_dir: Path, token: str | None = None):
    """The real app (create_app) served by waitress on a free loopback port."""
    app_mod = pytest.importorskip("leukoedge.edge_app.app")
    config_mod = pytest.importorskip("leukoedge.edge_app.config")
    waitress = pytest.importorskip("waitress")
    config = config_mod.AppConfig(bundle=bundle, data_dir=data_dir, camera="none", token=token)
    app = app_mod.create_app(config)
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(timeout=5)
        app.extensions["leukoedge"].close()


@pytest.fixture(scope="module")
def live_app(bundles, tmp_path_factory):
    with _serve(bundles[0], tmp_path_factory.mktemp("bench-app-data")) as url:
        yield url


def _jpeg(side: int = 64) -> bytes:
    return noise_images(1, side=side).images[0]


@pytest.mark.slow
def test_app_bench_against_real_server(live_app):
    config = AppBenchConfig(url=live_app, clients=(1, 2), requests=4, warmup=1, progress=False)
    report = run_app_bench(config, _jpeg(), "noise 64x64")
    assert report["kind"] == "app" and report["endpoint"] == "/api/classify"
    assert [lv["clients"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert lv["requests"] == 4 and lv["ok"] == 4 and lv["errors"] == 0, lv["status_counts"]
        assert all(status.startswith("2") for status in lv["status_counts"])
        _check_percentiles(lv)
        assert lv["throughput_rps"] > 0 and lv["timed_out"] is False
        assert "server_latency_p50_ms" in lv
    md = app_markdown(report)
    assert md.startswith("# App under load") and "| 2 | 4 | 4 | 0 |" in md


@pytest.mark.slow
def test_app_bench_counts_errors_by_status(live_app):
    config = AppBenchConfig(url=live_app + "/api/classify", clients=(2,), requests=3, warmup=0, progress=False)
    report = run_app_bench(config, b"this is not an image", "text")
    level = report["levels"][0]
    assert level["ok"] == 0 and level["errors"] == 3
    assert level["status_counts"] == {"400": 3}


@pytest.mark.slow
def test_app_bench_sends_the_access_token(bundles, tmp_path):
    token = "bench-token-0123456789"
    with _serve(bundles[0], tmp_path / "data", token=token) as url:
        base = {"url": url, "clients": (1,), "requests": 2, "warmup": 0, "progress": False}
        refused = run_app_bench(AppBenchConfig(**base), _jpeg(), "noise")["levels"][0]
        assert refused["ok"] == 0 and refused["status_counts"] == {"401": 2}
        allowed = run_app_bench(AppBenchConfig(**base, token=token), _jpeg(), "noise")["levels"][0]
        assert allowed["ok"] == 2 and allowed["errors"] == 0


# -- benchmarks/ helpers ------------------------------------------------------
def test_pareto_front_keeps_only_undominated_models(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pareto import pareto_front

    # (latency, accuracy): b is slower and worse than a; d ties a on latency but is less accurate.
    points = [(1.0, 0.90), (2.0, 0.85), (3.0, 0.95), (1.0, 0.80), (5.0, 0.95)]
    assert pareto_front(points) == [0, 2]
    assert pareto_front([(1.0, 0.5)]) == [0]


def test_transfer_subset_folds_rotate_val_over_a_stratified_subset_and_keep_the_whole_test_split(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from transfer import subset_folds

    from leukoedge.data.records import Manifest, ManifestEntry

    # A: 70 train + 30 test, B: 30 train + 10 test
    entries = [ManifestEntry(f"{c}/{c}-{i:03d}.jpg", c, order=i, split="train" if i < n_train else "test")
               for c, n, n_train in (("A", 100, 70), ("B", 40, 30)) for i in range(n)]
    source = Manifest(root="/data", layout="class-folders", classes=("A", "B"), split_kind="block", seed=0,
                      entries=tuple(entries))
    folds = subset_folds(source, 0.2, 5)
    test_paths = {e.path for e in source.subset("test")}
    subset = {e.path for e in folds[0].entries if e.split != "test"}
    assert len(folds) == 5 and {e.label for e in folds[0].entries if e.path in subset} == {"A", "B"}
    assert sum(p.startswith("A/") for p in subset) == 14 and sum(p.startswith("B/") for p in subset) == 6
    seen_val = []
    for m in folds:
        assert {e.path for e in m.subset("test")} == test_paths  # every fold: the whole test split
        assert {e.path for e in m.entries if e.split != "test"} == subset  # the same subset
        seen_val += [e.path for e in m.subset("val")]
        assert {e.path for e in m.subset("val")}.isdisjoint(e.path for e in m.subset("train"))
    assert sorted(seen_val) == sorted(subset)  # each subset image validates exactly once


def test_transfer_extra_arms_are_compared_with_scratch_fold_by_fold(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from transfer import markdown, summarise

    def folds(*accuracies):
        return [{"fold": k, "accuracy": a, "grayscale": None, "train_seconds": 10.0 * k, "kept_epoch": k,
                 "epochs_run": k + 8} for k, a in enumerate(accuracies, 1)]

    arms = summarise({"scratch": folds(0.80, 0.90, 0.70), "leukoedge-smear": folds(0.85, 0.85, 0.75),
                      "mixup": folds(0.90, 0.90, 0.60)})
    mixup = arms["extra_gains"]["mixup"]
    assert mixup["per_fold"] == pytest.approx([0.10, 0.0, -0.10]) and mixup["folds_better"] == 1
    assert mixup["mean"] == pytest.approx(0.0) and arms["gain"]["folds_better"] == 2
    text = markdown([{"task": "pbc", "n_subset": 15, "n_test": 15, "arms": arms}])
    assert "| pbc | mixup | `--mix mixup` | 80.0 +- 17.3 | 0.0 +- 10.0 | 1 of 3 | 90.0 (1/9); 90.0 (2/10); 60.0 (3/11) | 20 s |" in text
    assert "extra_gains" not in summarise({"scratch": folds(0.8), "leukoedge-smear": folds(0.9)})


def test_transfer_custom_arms_carry_their_options_into_the_table(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import argparse

    from transfer import markdown, parse_arm, summarise

    name, options = parse_arm("cells=--init '/runs/my backbone.npz' --lr 5e-4")
    assert name == "cells" and options == ["--init", "/runs/my backbone.npz", "--lr", "5e-4"]
    for bad in ("cells", "=--lr 1e-3", "cells=", "scratch=--lr 1e-3", "a/b=--lr 1e-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=OPTIONS"):
            parse_arm(bad)

    def folds(*accuracies):
        return [{"fold": k, "accuracy": a, "grayscale": None, "train_seconds": 5.0, "kept_epoch": k,
                 "epochs_run": k} for k, a in enumerate(accuracies, 1)]

    arms = summarise({"scratch": folds(0.8, 0.9), "leukoedge-smear": folds(0.8, 0.8), "cells": folds(0.9, 0.9)})
    assert arms["extra_gains"]["cells"]["folds_better"] == 1
    text = markdown([{"task": "pbc", "n_subset": 10, "n_test": 10, "arms": arms, "options": {"cells": options}}])
    assert "| pbc | cells | `--init '/runs/my backbone.npz' --lr 5e-4` | 90.0 +- 0.0 | 5.0 +- 7.1 | 1 of 2 |" in text


def test_make_backbone_writes_the_command_the_shipped_backbone_records(monkeypatch):
    """The shipped file's provenance names the command ``make_backbone.py`` runs for it (and would write again)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from make_backbone import RECIPE, recipe_options

    from leukoedge.models.pretrained import load_backbone

    recorded = load_backbone("leukoedge-smear").record()["trained_with"]["command"]
    assert recorded == " ".join(["leukoedge train", *recipe_options(RECIPE), "--manifest MANIFEST --data ROOT --out RUN"])
    assert "--augment cells" in " ".join(recipe_options({**RECIPE, "augment": "cells"}))


def _predicted_run(path: Path, root: Path, entries, labels: list[str], answers: list[str]) -> Path:
    """A run directory holding only what error_overlap.py reads: config, manifest, predictions.csv."""
    from leukoedge.data.records import Manifest
    from leukoedge.files import write_json
    from leukoedge.train.predictions import write_predictions
    from leukoedge.train.rundir import RunConfig, RunDir

    classes = ("Benign", "Malignant")
    rd = RunDir(path)
    path.mkdir(parents=True)
    Manifest(root=str(root), layout="toy", classes=classes, split_kind="block", seed=0,
             entries=tuple(entries)).save(rd.manifest_path)
    write_json(rd.config_path, RunConfig(model="leuko-tiny", input_size=32, classes=classes, seed=0, epochs=1,
                                         batch_size=4, learning_rate=1e-3, data_root=str(root)).to_dict())
    probs = np.array([[0.8, 0.2] if a == "Benign" else [0.3, 0.7] for a in answers])
    write_predictions(rd.predictions_path("test"), entries, np.array([classes.index(c) for c in labels]), probs,
                      classes)
    return path


def test_error_overlap_lines_runs_up_image_by_image_and_refuses_other_images(tmp_path):
    """3 runs on 6 camera-size images: the shared errors, the k-of-n counts, the oracle, the contact sheet."""
    from leukoedge.data.records import ManifestEntry

    root = tmp_path / "data"
    labels = ["Benign", "Benign", "Benign", "Malignant", "Malignant", "Malignant"]
    rng = np.random.default_rng(0)
    entries = []
    for i, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(root / label / f"f{i}.jpg")
        entries.append(ManifestEntry(path=f"{label}/f{i}.jpg", label=label, split="test"))
    # image 0: wrong in all 3; image 3: wrong in 2 of 3; image 5: wrong in 1 of 3
    answers = {"a": ["Malignant", "Benign", "Benign", "Benign", "Malignant", "Malignant"],
               "b": ["Malignant", "Benign", "Benign", "Benign", "Malignant", "Benign"],
               "c": ["Malignant", "Benign", "Benign", "Malignant", "Malignant", "Malignant"]}
    runs = [_predicted_run(tmp_path / n, root, entries, labels, a) for n, a in answers.items()]
    out = tmp_path / "results"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "error_overlap.py"
    cmd = [sys.executable, str(script), *(f"--run={n}={r}" for n, r in zip(answers, runs)), "--out-dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "error_overlap.json").read_text())
    assert [b["images"] for b in result["by_wrong_count"]] == [3, 1, 1, 1]
    assert [s["path"] for s in result["wrong_in_all"]] == ["Benign/f0.jpg"]
    assert result["oracle_accuracy"] == pytest.approx(5 / 6)
    assert result["mean_probability_accuracy"] == pytest.approx(4 / 6)  # images 0 and 3 (2 of 3 say Benign)
    assert result["majority_confusions"] == [{"label": "Benign", "predicted": "Malignant", "images": 1},
                                             {"label": "Malignant", "predicted": "Benign", "images": 1}]
    text = (out / "error_overlap.md").read_text()
    assert "1 of the 6 images is wrong in all 3 runs" in text and "| `Benign/f0.jpg` | Benign |" in text
    with Image.open(out / "error_overlap.png") as sheet:
        assert sheet.width > 300  # images 0 and 3, from the camera-size files
    # a run evaluated on other images is refused, not lined up
    other = _predicted_run(tmp_path / "other", root, entries[:5], labels[:5], answers["a"][:5])
    done = subprocess.run([*cmd[:3], f"--run=other={other}", "--out-dir", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "other test images" in done.stderr and "same manifest" in done.stderr
