"""Real tiny runs and bundles for tests (a few seconds each on 2 CPU cores).

``make_tiny_run`` draws ~200 small synthetic "smear" images (four classes
that differ in cell shape and stain colour), trains a tiny CNN that follows
the registry conventions (input ``image``, ``Rescaling(1/255)`` inside, a
``features`` layer, a softmax ``probabilities`` layer) and writes a complete
run directory with :class:`RunDir` / :class:`RunConfig` / :class:`Manifest`.
``make_tiny_bundle`` converts it with the real converter and parity gate.

Other test files import these functions; cache the run with a session-scoped
fixture, e.g.::

    @pytest.fixture(scope="session")
    def tiny_run(tmp_path_factory):
        return make_tiny_run(tmp_path_factory.mktemp("tiny"))

    bundle_dir = make_tiny_bundle(tmp_path, run_dir=tiny_run)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from leukoedge.data.records import Manifest, ManifestEntry
from leukoedge.train.rundir import RunConfig, RunDir

#: Four classes, sorted (label index = position), Taleqani-like names.
CLASSES = ("Benign", "Early", "Pre", "Pro")
SIZE = 32


def draw_cell(label: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One uint8 RGB image: a pale noisy background and a class-specific 'cell'.

    Benign: small dark-purple disc; Early: large blue disc; Pre: brown ring;
    Pro: two small magenta discs. Position, radius and tint are jittered.
    Colour and shape both separate the classes, so the tiny model becomes
    confident quickly and int8 rounding rarely flips a prediction.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg = np.array([235, 215, 225], np.float32) + rng.normal(0, 6, 3)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    img += rng.normal(0, 8, (size, size, 3))
    cy, cx = size / 2 + rng.uniform(-4, 4, 2)
    r = np.hypot(yy - cy, xx - cx)
    tint = rng.normal(0, 10, 3)
    if label == "Benign":
        mask, colour = r < size * rng.uniform(0.16, 0.22), [70, 20, 90]
    elif label == "Early":
        mask, colour = r < size * rng.uniform(0.32, 0.4), [40, 90, 210]
    elif label == "Pre":
        rad = size * rng.uniform(0.26, 0.32)
        mask, colour = (r < rad) & (r > rad - size * 0.1), [150, 80, 30]
    else:
        off = size * 0.18
        r1 = np.hypot(yy - cy, xx - (cx - off))
        r2 = np.hypot(yy - cy, xx - (cx + off))
        mask, colour = (r1 < size * 0.13) | (r2 < size * 0.13), [220, 30, 160]
    img[mask] = np.asarray(colour, np.float32) + tint + rng.normal(0, 8, (int(mask.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(data_dir: Path, n: int = 200, seed: int = 0, size: int = SIZE) -> list[ManifestEntry]:
    """Draw ``n`` images into class folders; 60/20/20 train/val/test per class."""
    rng = np.random.default_rng(seed)
    entries = []
    per_class = n // len(CLASSES)
    for label in CLASSES:
        (data_dir / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{label}/{label.lower()}-{i:03d}.png"
            Image.fromarray(draw_cell(label, rng, size)).save(data_dir / rel)
            frac = i / per_class
            split = "train" if frac < 0.6 else ("val" if frac < 0.8 else "test")
            entries.append(ManifestEntry(path=rel, label=label, order=i, split=split))
    return entries


def build_tiny_model(size: int = SIZE, n_classes: int = len(CLASSES)):
    """A tiny CNN following the registry conventions (GAP + Dense head, so CAM applies)."""
    import keras

    image = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(image)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(24, 3, padding="same", activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(image, out, name="tiny_cnn")


def make_tiny_run(tmp_dir: str | Path, *, n: int = 200, seed: int = 0, epochs: int = 30) -> Path:
    """Images + trained tiny model + run directory; returns the run directory."""
    import keras
    import tensorflow as tf

    from leukoedge.preprocess import PreprocessSpec, load_image

    tmp_dir = Path(tmp_dir)
    data_dir = tmp_dir / "tiny-data"
    entries = write_images(data_dir, n=n, seed=seed)
    manifest = Manifest(
        root=str(data_dir.resolve()),
        layout="class_folders",
        classes=CLASSES,
        split_kind="random",
        seed=seed,
        entries=tuple(entries),
        params={"synthetic": True},
    )
    spec = PreprocessSpec.square(SIZE)
    train = manifest.subset("train")
    x = np.stack([load_image(manifest.resolve(e), spec) for e in train]).astype(np.float32)
    y = np.array([manifest.label_index(e.label) for e in train])
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()  # as the trainer does: the same run whichever tests ran first
    model = build_tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, shuffle=True)

    run = RunDir(tmp_dir / "tiny-run")
    run.path.mkdir(parents=True, exist_ok=True)
    config = RunConfig(
        model="tiny_cnn", input_size=SIZE, classes=CLASSES, seed=seed, epochs=epochs, batch_size=16,
        learning_rate=3e-3, data_root=str(data_dir.resolve()), extra={"synthetic": True},
    )
    run.write(run.config_path, config.to_dict())
    manifest.save(run.manifest_path)
    model.save(run.model_path)
    run.write(run.ood_path, {"score": "max_softmax", "threshold": 0.5})
    run.model_card_md.write_text("# Model card: tiny_cnn\n\nSynthetic test model. Research use only; not a diagnostic device.\n")
    run.write(run.model_card_json, {"model": "tiny_cnn", "classes": list(CLASSES), "synthetic": True})
    return run.path


def make_tiny_bundle(
    tmp_dir: str | Path,
    quantize: str = "int8",
    with_heatmap: bool = True,
    *,
    run_dir: str | Path | None = None,
    archive: str | None = None,
    name: str | None = None,
    calibration: int | None = 64,
) -> Path:
    """Convert a tiny run (made here unless ``run_dir`` is given) into a bundle directory.

    Raises ParityError if the gate fails (it should not for this model).
    """
    from leukoedge.convert.options import ConvertOptions
    from leukoedge.convert.pipeline import convert_run

    tmp_dir = Path(tmp_dir)
    run_dir = Path(run_dir) if run_dir is not None else make_tiny_run(tmp_dir)
    out = tmp_dir / (name or f"bundle-{quantize}{'-heatmap' if with_heatmap else ''}")
    options = ConvertOptions(
        run_dir=run_dir,
        out=out,
        quantize=quantize,
        calibration=calibration if quantize in ("int8", "uint8") else None,
        with_heatmap=with_heatmap,
        archive=archive,
        force=True,
    )
    return convert_run(options).bundle


# ---------------------------------------------------------------- session cache
# One tiny run (and each bundle variant) per test session, shared by every test
# file that asks, so the model is trained once. Tests that modify a bundle must
# copy it first (``shutil.copytree``).
_CACHE: dict = {}


def shared_tiny_run(tmp_path_factory) -> Path:
    """The session's tiny run directory (made on first use), seeded by ``LEUKOEDGE_TEST_SEED``."""
    from conftest import training_seed  # only inside pytest; benchmarks call make_tiny_run directly

    if "run" not in _CACHE:
        _CACHE["run"] = make_tiny_run(tmp_path_factory.mktemp("tiny-run"), seed=training_seed())
    return _CACHE["run"]


def shared_tiny_bundle(tmp_path_factory, quantize: str = "int8", with_heatmap: bool = True) -> Path:
    """The session's bundle for (quantize, with_heatmap), converted from the shared run. Read-only."""
    key = ("bundle", quantize, with_heatmap)
    if key not in _CACHE:
        run = shared_tiny_run(tmp_path_factory)
        _CACHE[key] = make_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"), quantize, with_heatmap, run_dir=run)
    return _CACHE[key]


# ---------------------------------------------------------------- bundles with a training scale (issue 15)
def scaled_bundle_copy(bundle_dir: str | Path, dest: str | Path, um_per_px: float | None,
                       source_size: tuple[int, int] | None = None, extra: dict | None = None,
                       without: tuple[str, ...] = ()) -> Path:
    """A copy of ``bundle_dir`` whose spec records a training scale (or none), re-checksummed; returns ``dest``.

    ``um_per_px`` is the training images' um/px as stored (``source_size`` (h, w); default:
    stored at the model input size), as ``train`` records it; None: no scale, as old bundles.
    ``extra`` adds top-level sections to bundle.json (e.g. ``{"quality": ...}``), ``without``
    removes some (e.g. ``("quality",)``), so a test states what its bundle holds.
    """
    import json
    import shutil

    from leukoedge.bundle import write_manifest
    from leukoedge.preprocess import PreprocessSpec

    dest = Path(dest)
    shutil.copytree(bundle_dir, dest)
    meta_path = dest / "bundle.json"
    meta = json.loads(meta_path.read_text())
    spec = PreprocessSpec.from_dict(meta["preprocessing"]).with_scale(um_per_px, source_size)
    meta["preprocessing"] = spec.to_dict()
    meta.update(extra or {})
    for key in without:
        meta.pop(key, None)
    meta_path.write_text(json.dumps(meta, indent=1))
    write_manifest(dest)
    return dest
