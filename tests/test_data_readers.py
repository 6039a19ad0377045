"""Dataset readers: every layout is detected and read with the right labels and groups."""
from __future__ import annotations

from collections import Counter

import pytest

from data_fixtures import make_allidb, make_class_folders, make_cnmc, make_four_type, make_taleqani, write_image
from leukoedge.data.readers import detect_layout, read_dataset
from leukoedge.errors import DatasetError, UsageError


def test_taleqani_published_layout(tmp_path):
    layout, records = read_dataset(make_taleqani(tmp_path))
    assert layout == "taleqani"
    assert Counter(r.label for r in records) == {"Benign": 6, "Early Pre-B": 6, "Pre-B": 6, "Pro-B": 6}
    assert sorted(r.order for r in records if r.label == "Pro-B") == [1, 2, 3, 4, 5, 6]
    assert all(r.path.startswith("Original/") and r.group is None for r in records)


def test_taleqani_alternative_naming(tmp_path):
    layout, records = read_dataset(make_taleqani(tmp_path, naming="alternative"))
    assert layout == "taleqani"
    assert set(r.label for r in records) == {"Benign", "Early Pre-B", "Pre-B", "Pro-B"}


def test_taleqani_segmented_variant_is_not_mixed_in(tmp_path):
    make_taleqani(tmp_path)
    write_image(tmp_path / "Segmented" / "Benign" / "WBC-Benign-001.jpg", 999)
    _, records = read_dataset(tmp_path)
    assert not any(r.path.startswith("Segmented") for r in records)


def test_taleqani_segmented_variant_on_request_or_when_alone(tmp_path):
    make_taleqani(tmp_path / "both")
    make_taleqani(tmp_path / "seg")
    for root in (tmp_path / "both", tmp_path / "seg"):
        for folder, stem in (("Benign", "WBC-Benign"), ("Early", "WBC-Malignant-Early"),
                             ("Pre", "WBC-Malignant-Pre"), ("Pro", "WBC-Malignant-Pro")):
            write_image(root / "Segmented" / folder / f"{stem}-001.jpg", 900 + len(stem))
    (tmp_path / "seg" / "Original").rename(tmp_path / "seg-original-moved")
    layout, records = read_dataset(tmp_path / "both", "taleqani-segmented")
    assert layout == "taleqani-segmented" and len(records) == 4
    assert all(r.path.startswith("Segmented/") for r in records)
    assert read_dataset(tmp_path / "both")[0] == "taleqani"
    layout, records = read_dataset(tmp_path / "seg")
    assert layout == "taleqani-segmented" and {r.label for r in records} == {"Benign", "Early Pre-B", "Pre-B", "Pro-B"}


def test_cnmc_groups_are_patients(tmp_path):
    layout, records = read_dataset(make_cnmc(tmp_path))
    assert layout == "cnmc"
    assert set(r.label for r in records) == {"ALL", "HEM"}
    assert {r.group for r in records if r.label == "HEM"} == {"patient-H10", "patient-H11", "patient-H12",
                                                               "patient-H30", "patient-H31", "patient-H32"}
    assert all(r.group for r in records)


def test_cnmc_validation_folder_with_labels_csv(tmp_path):
    make_cnmc(tmp_path)
    val = tmp_path / "validation_data" / "C-NMC_test_prelim_phase_data"
    write_image(val / "1.bmp", 700, "BMP")
    write_image(val / "2.bmp", 701, "BMP")
    (tmp_path / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv").write_text(
        "Patient_ID,new_names,labels\nUID_H7_1_1_hem.bmp,1.bmp,0\nUID_55_1_1_all.bmp,2.bmp,1\n")
    _, records = read_dataset(tmp_path)
    by_path = {r.path.rsplit("/", 1)[-1]: r for r in records}
    assert by_path["1.bmp"].label == "HEM" and by_path["1.bmp"].group == "patient-H7"
    assert by_path["2.bmp"].label == "ALL" and by_path["2.bmp"].group == "patient-55"


def test_allidb(tmp_path):
    layout, records = read_dataset(make_allidb(tmp_path))
    assert layout == "allidb"
    assert Counter(r.label for r in records) == {"ALL": 4, "Normal": 4}


def test_four_type(tmp_path):
    layout, records = read_dataset(make_four_type(tmp_path))
    assert layout == "four-type"
    assert set(r.label for r in records) == {"ALL", "AML", "CLL", "CML"}


def test_generic_class_folders(tmp_path):
    layout, records = read_dataset(make_class_folders(tmp_path))
    assert layout == "class-folders"
    assert set(r.label for r in records) == {"blast", "normal"}


def test_unknown_layout_lists_what_was_found(tmp_path):
    write_image(tmp_path / "lonely.jpg", 1)
    (tmp_path / "notes").mkdir()
    with pytest.raises(DatasetError) as err:
        detect_layout(tmp_path)
    assert "lonely.jpg" in err.value.message and "notes/" in err.value.message
    assert "taleqani" in err.value.hint


def test_forcing_a_layout_and_an_unknown_name(tmp_path):
    make_four_type(tmp_path)
    layout, records = read_dataset(tmp_path, "class-folders")
    assert layout == "class-folders" and len(records) == 16
    with pytest.raises(UsageError, match="valid:"):
        read_dataset(tmp_path, "imagenet")


def test_mixed_layout_prefers_the_specific_reader(tmp_path):
    make_taleqani(tmp_path)
    write_image(tmp_path / "extra" / "x.png", 5, "PNG")
    layout, _ = read_dataset(tmp_path)
    assert layout == "taleqani"


def test_partial_taleqani_falls_back_to_generic_folders(tmp_path):
    for name in ("Benign", "Early"):
        write_image(tmp_path / name / "WBC-1.jpg", hash(name) % 1000)
    layout, _ = read_dataset(tmp_path)
    assert layout == "class-folders"


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DatasetError):
        read_dataset(tmp_path / "absent")
    with pytest.raises(DatasetError):
        read_dataset(tmp_path)


def test_forcing_the_wrong_layout_says_nothing_was_found(tmp_path):
    make_taleqani(tmp_path)
    for name in ("cnmc", "allidb", "four-type"):
        with pytest.raises(DatasetError, match=f"no images found in the {name} layout"):
            read_dataset(tmp_path, name)


def test_layouts_command_lists_every_registered_layout(capsys):
    from leukoedge.cli import main
    from leukoedge.data.readers import list_layouts

    assert main(["data", "list-layouts"]) == 0
    out = capsys.readouterr().out
    assert all(layout.name in out for layout in list_layouts())


def test_dataset_under_a_hidden_folder_is_read_but_hidden_files_are_not(tmp_path):
    root = make_four_type(tmp_path / ".cache" / "leukemia")
    write_image(root / "ALL" / ".thumb.jpg", 77)
    write_image(root / "AML" / ".ipynb_checkpoints" / "x.jpg", 78)
    layout, records = read_dataset(root)
    assert layout == "four-type" and len(records) == 16
