"""Ensembles and test-time augmentation, built into ONE model before conversion (issue 18).

``convert RUN --member RUN2 --member RUN3 --tta flips`` converts a single
Keras graph whose ``probabilities`` output is the mean over every member and
every view of the input (identity, flips, 90-degree rotations), so:

* the bundle stays one ``model.tflite`` with one checksum, and the runtime,
  the parity gate, calibration, abstention and the Edge TPU check need nothing
  new: the gate grades the averaged int8 model against the same average of the
  float members, on the same test images (so an ensemble is proven equal to its
  float ensemble, not member by member);
* the cost is explicit: ``members x views`` sub-model invokes per tile, and
  ``members`` times the size (all in ``bundle.json["ensemble"]``).

The views are exact symmetries of a smear field (a microscope image has no
up or left), applied to the raw pixels before each member's ``Rescaling``:
``flips`` = identity, horizontal, vertical, both (= 180 degrees); ``dihedral``
= those and the four 90-degree variants (square inputs only). With a view set
that is a group, the averaged output is exactly invariant to those
transformations of the input.

The ``features`` output (heatmap, feature-based abstention) is member 1's
on the identity view, and the heatmap's class-activation weights are member
1's: the map shows where member 1 looked, which the model card says.

Members must agree on everything the bundle records once: classes, the
preprocessing (input size, colour step), the training scale and the split
(the same train / val / test images, so calibration and the gate mean one
thing). Anything else is refused before any conversion starts.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

#: View sets offered by ``--tta``; each is a group (closed under composition).
TTA_VIEWS = {
    "none": ("identity",),
    "flips": ("identity", "hflip", "vflip", "rot180"),
    "dihedral": ("identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose"),
}


#: Most relative difference between members' recorded training scales (as ``--um-per-px`` warns above).
SCALE_TOLERANCE = 0.10


@dataclass(frozen=True)
class MemberInfo:
    """What the bundle records of each member."""

    run: str
    model: str
    version: str
    parameters: int

    def to_dict(self) -> dict:
        return {"run": self.run, "model": self.model, "version": self.version, "parameters": self.parameters}


#: Each view as (swap rows and columns first?, axes flipped after): the dihedral group of a square.
_VIEW_OPS = {
    "identity": (False, ()), "hflip": (False, (2,)), "vflip": (False, (1,)), "rot180": (False, (1, 2)),
    "rot90": (True, (2,)), "rot270": (True, (1,)), "transpose": (True, ()), "antitranspose": (True, (1, 2)),
}


def check_views(tta: str, height: int, width: int) -> tuple[str, ...]:
    if tta not in TTA_VIEWS:
        raise UsageError(f"unknown --tta {tta!r}; use one of {', '.join(TTA_VIEWS)}")
    views = TTA_VIEWS[tta]
    if height != width and any(_VIEW_OPS[v][0] for v in views):
        raise UsageError(f"--tta {tta} rotates by 90 degrees, which needs a square input; this model takes {height}x{width}",
                         hint="use --tta flips")
    return views


def view_layer(view: str):
    """A Keras layer applying one view to NHWC images (REVERSE_V2 / TRANSPOSE in TFLite, both int8 ops)."""
    import keras

    swap, flips = _VIEW_OPS[view]

    class View(keras.layers.Layer):
        def call(self, x):
            if swap:
                x = keras.ops.transpose(x, (0, 2, 1, 3))
            for axis in flips:
                x = keras.ops.flip(x, axis=axis)
            return x

    return View(name=f"view_{view}")


def combined_model(members: list, views: tuple[str, ...], with_features: bool):
    """One Keras model averaging ``members x views``; the registry conventions hold on it.

    Its layers ``probabilities`` (the mean) and ``features`` (member 1, identity
    view) are what :func:`.export.build_export_model` and the device read. With one
    member and no TTA the member itself is returned, unchanged.
    """
    import keras

    if len(members) == 1 and views == ("identity",):
        return members[0]
    height, width = int(members[0].inputs[0].shape[1]), int(members[0].inputs[0].shape[2])
    image = keras.Input(shape=(height, width, 3), name="image")
    seen = {view: (image if view == "identity" else view_layer(view)(image)) for view in views}  # each view once
    probs, feats = [], None
    for i, member in enumerate(members):
        outputs = {"probabilities": member.get_layer("probabilities").output}
        if i == 0 and with_features:
            outputs["features"] = member.get_layer("features").output
        sub = keras.Model(member.inputs, outputs, name=f"member{i + 1}")
        for view in views:
            out = sub(seen[view])
            probs.append(out["probabilities"])
            if i == 0 and with_features and view == "identity":
                feats = out["features"]
    averaged = keras.layers.Average(name="probabilities")(probs)  # >= 2 inputs: the single-model case returned above
    outputs = [averaged]
    if feats is not None:
        outputs.append(keras.layers.Identity(name="features")(feats))
    name = f"ensemble{len(members)}" if len(members) > 1 else members[0].name
    return keras.Model(image, outputs, name=f"{name}_tta{len(views)}" if len(views) > 1 else name)


def check_members(first, others: list, given_scale: bool = False) -> None:
    """Refuse members that do not share classes, preprocessing, scale and split with the first run.

    ``first`` and each of ``others``: ``(RunDir, RunConfig, Manifest)``. Training scales measured
    from red cells differ a little between runs (and between estimator versions): they must agree
    within :data:`SCALE_TOLERANCE`; ``given_scale`` (``--um-per-px``) states one for all.
    """
    rd0, cfg0, man0 = first
    for rd, cfg, man in others:
        where = f"--member {rd.path}"
        if tuple(cfg.classes) != tuple(cfg0.classes):
            raise UsageError(f"{where}: its classes {list(cfg.classes)} differ from {rd0.path}'s {list(cfg0.classes)}")
        if _geometry(cfg) != _geometry(cfg0):
            raise UsageError(f"{where}: its preprocessing (input size, colour step) differs from {rd0.path}'s",
                             hint="ensemble members must be trained with the same --input-size and --colour")
        um, um0 = cfg.preprocess_spec.um_per_px, cfg0.preprocess_spec.um_per_px
        if not given_scale and (um is None) != (um0 is None):
            raise UsageError(f"{where}: one of the runs records its training scale and the other does not",
                             hint="pass --um-per-px X: the bundle records one scale for every member")
        if not given_scale and um is not None and abs(um / um0 - 1) > SCALE_TOLERANCE:
            raise UsageError(f"{where}: its training scale {um:.4g} um/px differs from {rd0.path}'s {um0:.4g} by more "
                             f"than {SCALE_TOLERANCE:.0%}", hint="members must see cells at one size; pass --um-per-px "
                             "X only if they really were trained on images of that scale")
        if _split_of(man) != _split_of(man0):
            raise UsageError(f"{where}: it was trained on another split than {rd0.path}",
                             hint="train every member with the same --manifest (e.g. different --seed), so the gate "
                                  "grades the ensemble on images none of its members saw")


def _geometry(config) -> dict:
    spec = config.preprocess_spec.to_dict()
    return {k: v for k, v in spec.items() if k not in ("um_per_px", "field_um")}


def _split_of(manifest) -> dict:
    return {split: sorted((e.path, e.label) for e in manifest.subset(split)) for split in ("train", "val", "test")}
