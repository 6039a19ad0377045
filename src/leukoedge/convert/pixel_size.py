"""The bundle's training scale: the run's recorded um/px, or ``convert --um-per-px`` for runs without one.

Why: the device tiles captures at the bundle's ``preprocessing.um_per_px``
(issue 15); without it, it stretches the whole frame. Runs trained before the
scale was recorded (or whose measurement failed) can get it at conversion
from a stage micrometer. Overriding a recorded value is allowed (the
measurement may be wrong), but a difference over :data:`OVERRIDE_WARN` is
logged: it changes the size the device brings cells to.

``bundle.json["scale"]`` says where the value came from (``source``: given /
measured at training, ``conversion``, or ``unknown``), since the
preprocessing spec itself carries only the numbers. TensorFlow-free.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..data.records import Manifest
from ..preprocess import PreprocessSpec
from ..train.rundir import RunConfig
from ..train.training_scale import check_um_per_px, how_obtained, median_size

log = logging.getLogger(__name__)

#: Relative difference from the run's recorded um/px above which an override is warned about.
OVERRIDE_WARN = 0.10


def bundle_scale(config: RunConfig, manifest: Manifest, um_per_px: float | None = None,
                 data_root: str | Path | None = None) -> tuple[PreprocessSpec, dict]:
    """``(spec, bundle.json["scale"])`` for a conversion of the run ``config`` / ``manifest``.

    Without ``um_per_px`` the run's own spec (its recorded scale, or none).
    With it, the spec gets that scale; the field is computed from the run's
    recorded median training-image size, or (older runs) from the train
    split's image headers.
    """
    recorded = dict(config.scale or {})
    if um_per_px is None:
        spec = config.preprocess_spec
        return spec, {"um_per_px": spec.um_per_px, "source": recorded.get("source") or "not recorded",
                      "how": how_obtained(recorded), "training": recorded or None}
    um = check_um_per_px(um_per_px)
    before = recorded.get("um_per_px")
    if before is not None and abs(um / float(before) - 1.0) > OVERRIDE_WARN:
        log.warning("--um-per-px %.4g overrides the run's %s %.4g um/px by %+.0f %%: the device will bring cells "
                    "to a different size than training showed them; check the stage micrometer", um,
                    recorded.get("source", "recorded"), before, 100 * (um / float(before) - 1.0))
    size = recorded.get("source_size")
    if not size:
        size = median_size(manifest.resolve(e, data_root) for e in manifest.subset("train"))
    spec = config.preprocess_spec.with_scale(um, tuple(size) if size else None)
    scale = {"um_per_px": um, "source": "conversion", "source_size": size, "replaced": before,
             "training": recorded or None}
    scale["how"] = how_obtained(scale)
    log.info("bundle scale: %.4g um/px from --um-per-px (run: %s)", um,
             "none recorded" if before is None else f"{before:.4g}, {recorded.get('source')}")
    return spec, scale
