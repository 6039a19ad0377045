"""Small generated dataset folders in every supported layout."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int, fmt: str = "JPEG", size: int = 24) -> Path:
    """A distinct random image (distinct seeds never collide as near duplicates)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    img = Image.fromarray(arr).resize((size, size), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return path


def make_taleqani(root: Path, per_class: int = 6, naming: str = "published") -> Path:
    folders = {
        "published": [("Original/Benign", "WBC-Benign"), ("Original/Early", "WBC-Malignant-Early"),
                      ("Original/Pre", "WBC-Malignant-Pre"), ("Original/Pro", "WBC-Malignant-Pro")],
        "alternative": [("Benign", "Sap"), ("[Malignant] early Pre-B", "Sap"), ("[Malignant] Pre-B", "Sap"),
                        ("[Malignant] Pro-B", "Sap")],
    }[naming]
    seed = 0
    for folder, stem in folders:
        for k in range(1, per_class + 1):
            seed += 1
            write_image(root / folder / f"{stem}-{k:03d}.jpg", seed)
    return root


def make_cnmc(root: Path) -> Path:
    seed = 100
    for fold in range(3):
        for patient, kind in [(f"{fold + 1}", "all"), (f"{fold + 20}", "all"), (f"H{fold + 10}", "hem"), (f"H{fold + 30}", "hem")]:
            for image in range(2):
                seed += 1
                write_image(root / "training_data" / f"fold_{fold}" / kind / f"UID_{patient}_{image}_1_{kind}.bmp", seed, "BMP")
    return root


def make_allidb(root: Path) -> Path:
    for i in range(1, 9):
        write_image(root / f"Im{i:03d}_{i % 2}.jpg", 300 + i)
    return root


def make_four_type(root: Path) -> Path:
    for c, name in enumerate(["ALL", "AML", "CLL", "CML"]):
        for k in range(4):
            write_image(root / name / f"img_{k}.png", 400 + 10 * c + k, "PNG")
    return root


def make_class_folders(root: Path) -> Path:
    for c, name in enumerate(["blast", "normal"]):
        for k in range(4):
            write_image(root / name / f"{name}{k}.png", 500 + 10 * c + k, "PNG")
    return root
