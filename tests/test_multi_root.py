"""One manifest over several dataset roots: the original data plus a device's reviewed export (issue 16)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_fixtures import make_taleqani, write_image
from leukoedge.cli import main
from leukoedge.data import reviewed
from leukoedge.data.check import check_dataset
from leukoedge.data.records import Manifest
from leukoedge.data.split import check_partition, make_folds, make_manifest
from leukoedge.errors import DatasetError, ManifestError, UsageError

#: (sample id or None, reviewer label as the folder names it, images); labels in another case on purpose.
SAMPLES = [("s1", "Benign", 3), ("s2", "early pre-b", 3), ("s3", "Pre-B", 2), ("s4", "PRO-B", 3),
           ("s5", "Benign", 2), (None, "Pre-B", 1), (None, "PRO-B", 1)]


def make_reviewed(root: Path, samples=SAMPLES, seed: int = 900) -> Path:
    """A reviewed-images export as the device writes it: label folders + reviewed.json (groups = samples)."""
    images = []
    t = 1_790_000_000.0
    for sample, label, n in samples:
        for _ in range(n):
            seed += 1
            t += 60
            rid = f"{seed:032x}"
            rel = f"{reviewed.label_folder(label)}/{rid}.jpg"
            write_image(root / rel, seed)
            images.append({"path": rel, "result_id": rid, "captured_at": t, "sample_id": sample,
                           "reviewer_label": label})
    (root / reviewed.MANIFEST_NAME).write_text(json.dumps(
        {"format": reviewed.FORMAT, "version": reviewed.VERSION, "exported_at": t, "images": images}))
    return root


@pytest.fixture()
def roots(tmp_path):
    return make_taleqani(tmp_path / "orig", per_class=8), make_reviewed(tmp_path / "reviewed")


def _where(manifest: Manifest, group: str) -> set[str]:
    return {e.split for e in manifest.entries if e.group == group}


def test_two_roots_make_one_manifest_that_round_trips(roots, tmp_path):
    orig, rev = roots
    m = make_manifest([orig, rev], progress=False)
    assert m.roots == (str(orig.resolve()), str(rev.resolve())) and m.root == m.roots[0]
    assert m.split_kind == "mixed" and not m.leaky
    assert [r["kind"] for r in m.params["per_root"]] == ["block", "group"]
    assert [r["layout"] for r in m.params["per_root"]] == ["taleqani", "reviewed"]
    # the reviewed folders' case is the first root's spelling of the class
    assert m.classes == ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
    assert {e.label for e in m.entries if e.root == 1} == set(m.classes)
    assert sum(e.root == 1 for e in m.entries) == sum(n for _, _, n in SAMPLES)
    for e in m.entries:
        assert m.resolve(e).is_file(), e
    path = m.save(tmp_path / "m.json")
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["roots"] == list(m.roots)
    assert Manifest.load(path) == m


def test_samples_never_straddle_splits_and_the_original_split_does_not_move(roots):
    orig, rev = roots
    alone = {e.path: e.split for e in make_manifest(orig, val=0.2, test=0.2, progress=False).entries}
    for seed in range(6):
        m = make_manifest([orig, rev], seed=seed, val=0.2, test=0.2, progress=False)
        for sample in {e.group for e in m.entries if e.root == 1}:
            assert len(_where(m, sample)) == 1, (seed, sample)
        assert {e.path: e.split for e in m.entries if e.root == 0} == alone
        assert {e.group for e in m.entries if e.root == 1} >= {f"sample:s{i}" for i in range(1, 6)}


def test_a_result_in_no_sample_is_its_own_group(roots):
    m = make_manifest(list(roots), progress=False)
    lone = [e for e in m.entries if e.root == 1 and e.group.startswith("result:")]
    assert len(lone) == 2 and len({e.group for e in lone}) == 2


def test_folds_over_two_roots_test_each_image_once_and_keep_samples_whole(roots):
    folds = make_folds(list(roots), folds=3, val=0.2, progress=False)
    check_partition(folds)
    for sample in {e.group for e in folds[0].entries if e.root == 1}:
        tested_in = {k for k, m in enumerate(folds) if "test" in _where(m, sample)}
        assert len(tested_in) == 1
        assert all(len(_where(m, sample)) == 1 for m in folds)


def test_group_split_of_both_roots_needs_groups_everywhere(roots):
    with pytest.raises(UsageError, match="orig"):
        make_manifest(list(roots), by="group", progress=False)
    m = make_manifest(list(roots), by="block", progress=False)
    assert m.split_kind == "block"


def test_a_class_the_original_lacks_names_both_roots(roots, tmp_path):
    orig, _ = roots
    other = make_reviewed(tmp_path / "other", samples=[("s1", "Benign", 3), ("s2", "Basophil", 3)])
    with pytest.raises(DatasetError) as err:
        make_manifest([orig, other], progress=False)
    text = err.value.user_message()
    assert "'Basophil'" in text and str(orig.resolve()) in text and str(other.resolve()) in text
    assert "first --data root defines the classes" in text


def test_the_same_root_twice_is_refused(roots):
    with pytest.raises(UsageError, match="twice"):
        make_manifest([roots[0], roots[0]], progress=False)


def test_version_1_manifests_still_load_and_one_root_is_written_as_before(roots, tmp_path):
    orig, _ = roots
    v1 = {"version": 1, "root": str(orig), "layout": "taleqani", "classes": ["Benign", "Pro-B"],
          "split_kind": "block", "seed": 0, "params": {},
          "entries": [{"path": "Original/Benign/WBC-Benign-001.jpg", "label": "Benign", "group": None, "order": 1,
                       "split": "train"},
                      {"path": "Original/Pro/WBC-Malignant-Pro-001.jpg", "label": "Pro-B", "group": None,
                       "order": 1, "split": "test"}]}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    m = Manifest.load(tmp_path / "v1.json")
    assert m.roots == (str(orig),) and all(e.root == 0 and m.resolve(e).is_file() for e in m.entries)
    written = json.loads(make_manifest(orig, progress=False).save(tmp_path / "one.json").read_text())
    assert written["version"] == 1 and "roots" not in written
    assert all("root" not in e for e in written["entries"])
    future = {**v1, "version": 3}
    (tmp_path / "v3.json").write_text(json.dumps(future))
    with pytest.raises(ManifestError, match="version 3") as err:
        Manifest.load(tmp_path / "v3.json")
    assert "newer leukoedge" in err.value.user_message()


def test_moved_roots_are_given_all_at_once(roots, tmp_path):
    orig, rev = roots
    m = make_manifest([orig, rev], progress=False)
    e = next(e for e in m.entries if e.root == 1)
    assert m.resolve(e, m.root) == m.resolve(e)  # a run's config records the first root: no change
    moved = m.with_root([tmp_path / "a", tmp_path / "b"])
    assert moved.resolve(e) == (tmp_path / "b").resolve() / e.path
    with pytest.raises(ManifestError, match="2 roots"):
        m.resolve(e, tmp_path / "elsewhere")
    with pytest.raises(ManifestError, match="1 data root"):
        m.with_root([tmp_path / "a"])
    bad = json.loads(json.dumps(m.to_dict()))
    bad["entries"][0]["root"] = 5
    with pytest.raises(ManifestError, match="root index"):
        Manifest.from_dict(bad)


def test_reviewed_root_reads_as_class_folders_and_as_its_own_layout(roots):
    _, rev = roots
    report = check_dataset(rev, progress=False)
    assert report.layout == "reviewed" and report.ok
    assert report.classes == {"Benign": 5, "PRO-B": 4, "Pre-B": 3, "early pre-b": 3}
    plain = check_dataset(rev, "class-folders", progress=False)
    assert plain.ok and sum(plain.classes.values()) == 15  # reviewed.json is no stray file


def test_data_split_cli_takes_several_roots(roots, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["data", "split", str(roots[0]), str(roots[1]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "split kind: mixed" in text and "root 2:" in text and "split by group" in text
    assert Manifest.load(out).roots[1] == str(roots[1].resolve())
    assert main(["data", "split", str(roots[0]), str(roots[1]), "--folds", "3", "--out", str(tmp_path / "f")]) == 0


def test_train_cli_splits_several_data_roots_into_one_manifest(roots, tmp_path, monkeypatch):
    """The CLI's manifest step, with the trainer stubbed where it would start training (imports TF, trains nothing)."""
    from leukoedge.train import cli as train_cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(opts):
        seen["opts"] = opts
        raise Stop

    import leukoedge.train.trainer as trainer_mod

    pytest.importorskip("keras")
    monkeypatch.setattr(trainer_mod, "train", fake_train)
    args = train_cli_args(["train", "--data", str(roots[0]), "--data", str(roots[1]), "--model", "leuko-tiny",
                           "--out", str(tmp_path / "run")])
    with pytest.raises(Stop):
        train_cli.run(args)
    opts = seen["opts"]
    assert opts.data_root == (str(roots[0]), str(roots[1]))
    assert opts.manifest.split_kind == "mixed" and len(opts.manifest.roots) == 2


def train_cli_args(argv):
    from leukoedge.cli import build_parser

    return build_parser().parse_args(argv)


@pytest.mark.slow
def test_training_and_evaluation_open_images_of_both_roots(tmp_path):
    """A real one-epoch training of the tiniest model on a two-root manifest: every stage finds its images."""
    pytest.importorskip("keras")
    from conftest import training_seed
    from leukoedge.train.rundir import RunDir
    from leukoedge.train.trainer import TrainOptions, train

    orig = make_taleqani(tmp_path / "orig", per_class=8)
    rev = make_reviewed(tmp_path / "reviewed")
    m = make_manifest([orig, rev], progress=False)
    train(TrainOptions(out=tmp_path / "run", model="leuko-tiny", manifest=m, input_size=32, epochs=1, batch_size=8,
                       seed=training_seed(3), audit=False, um_per_px=0.2))
    rd = RunDir(tmp_path / "run")
    assert rd.manifest() == m
    assert rd.config().data_root == m.root
    metrics = json.loads(rd.metrics_path("test").read_text())
    assert metrics["n"] == len(m.subset("test"))
