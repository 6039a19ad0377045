"""Split manifests: deterministic, and nothing related straddles train and test."""
from __future__ import annotations

import json
import shutil

import pytest

from data_fixtures import make_cnmc, make_taleqani
from leukoedge.cli import main
from leukoedge.data.records import Manifest
from leukoedge.data.split import make_manifest
from leukoedge.errors import DatasetError, ManifestError, UsageError


def _splits_of(manifest, names):
    return {e.split for e in manifest.entries if e.path.rsplit("/", 1)[-1] in names}


def test_block_split_keeps_capture_order_blocks(tmp_path):
    m = make_manifest(make_taleqani(tmp_path, per_class=20), progress=False)
    assert m.split_kind == "block" and not m.leaky
    for label in m.classes:
        entries = sorted((e for e in m.entries if e.label == label), key=lambda e: e.order)
        seq = [e.split for e in entries]
        assert seq == sorted(seq, key=["train", "val", "test"].index)  # train block, then val, then test
        assert seq.count("test") == 3 and seq.count("val") == 3


def test_duplicates_never_straddle_splits(tmp_path):
    root = make_taleqani(tmp_path, per_class=20)
    pro = root / "Original" / "Pro"
    shutil.copyfile(pro / "WBC-Malignant-Pro-001.jpg", pro / "WBC-Malignant-Pro-020.jpg")  # train copy lands in test block
    for kind in ("block", "random"):
        m = make_manifest(root, by=kind, progress=False)
        assert _splits_of(m, {"WBC-Malignant-Pro-001.jpg", "WBC-Malignant-Pro-020.jpg"}) == {"train"}
        assert m.params["duplicate_clusters"] == 1


def test_group_split_keeps_patients_together(tmp_path):
    m = make_manifest(make_cnmc(tmp_path), val=0.2, test=0.2, progress=False)
    assert m.split_kind == "group"
    where = {}
    for e in m.entries:
        where.setdefault(e.group, set()).add(e.split)
    assert all(len(s) == 1 for s in where.values())
    assert {e.split for e in m.entries} == {"train", "val", "test"}


def test_a_duplicate_across_patients_ties_both_patients_to_one_split(tmp_path):
    root = make_cnmc(tmp_path)
    hem = root / "training_data" / "fold_0" / "hem"
    shutil.copyfile(root / "training_data" / "fold_2" / "all" / "UID_3_0_1_all.bmp", hem / "UID_H10_5_1_hem.bmp")
    for seed in range(6):
        m = make_manifest(root, val=0.2, test=0.2, seed=seed, progress=False)
        patients = {e.group for e in m.entries if e.group in ("patient-3", "patient-H10")}
        assert patients == {"patient-3", "patient-H10"}
        assert len({e.split for e in m.entries if e.group in patients}) == 1


def test_group_split_refused_without_groups(tmp_path):
    with pytest.raises(UsageError, match="group"):
        make_manifest(make_taleqani(tmp_path), by="group", progress=False)


def test_same_seed_same_manifest_bytes(tmp_path):
    root = make_taleqani(tmp_path / "d", per_class=10)
    for by in ("random", "block"):
        a = make_manifest(root, by=by, seed=3, progress=False).save(tmp_path / f"a-{by}.json").read_bytes()
        b = make_manifest(root, by=by, seed=3, progress=False).save(tmp_path / f"b-{by}.json").read_bytes()
        assert a == b
    c = make_manifest(root, by="random", seed=4, progress=False)
    assert [e.split for e in c.entries] != [e.split for e in Manifest.load(tmp_path / "a-random.json").entries]


def test_random_split_is_marked_leaky_and_cli_writes_manifest(tmp_path, capsys):
    root = make_taleqani(tmp_path / "d", per_class=10)
    out = tmp_path / "m.json"
    assert main(["data", "split", str(root), "--out", str(out), "--by", "random"]) == 0
    assert "LEAKY" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["split_kind"] == "random" and data["leaky"] is True
    assert Manifest.load(out).counts()["test"]["Benign"] == 2


def test_unreadable_images_are_left_out_and_listed(tmp_path):
    root = make_taleqani(tmp_path, per_class=6)
    (root / "Original" / "Pre" / "WBC-Malignant-Pre-099.jpg").write_bytes(b"")
    m = make_manifest(root, progress=False)
    assert m.params["unreadable_excluded"] == ["Original/Pre/WBC-Malignant-Pre-099.jpg"]
    assert all("099" not in e.path for e in m.entries)


def test_bad_fractions_and_tiny_classes(tmp_path):
    root = make_taleqani(tmp_path, per_class=2)
    with pytest.raises(UsageError):
        make_manifest(root, val=0.5, test=0.5, progress=False)
    with pytest.raises(DatasetError, match="fewer than 3"):
        make_manifest(root, progress=False)


def test_tampered_manifest_is_refused(tmp_path):
    m = make_manifest(make_cnmc(tmp_path / "d"), progress=False)
    data = m.to_dict()
    patient = data["entries"][0]["group"]
    for e in data["entries"]:
        if e["group"] == patient:
            e["split"] = "train"
    data["entries"][0]["split"] = "test"
    with pytest.raises(ManifestError, match="straddles"):
        Manifest.from_dict(data)


@pytest.mark.shared
def test_real_taleqani_block_split_keeps_identical_pairs_together_and_tests_the_last_block(taleqani_dir):
    m = make_manifest(taleqani_dir, progress=False)
    assert m.split_kind == "block" and not m.leaky
    pro = {e.order: e.split for e in m.entries if e.label == "Pro-B"}
    from leukoedge.data.check import check_dataset  # noqa: PLC0415 - only for the expected pairs

    pairs = check_dataset(taleqani_dir, progress=False).duplicates
    assert len(pairs) == 40
    by_path = {e.path: e.split for e in m.entries}
    assert all(len({by_path[p] for p in group}) == 1 for group in pairs)
    last = max(pro)
    assert pro[last] == "test" and pro[min(pro)] == "train"
