"""The frozen options of one conversion, checked once (bad combinations are refused)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..bundle import ARCHIVE_KINDS
from ..errors import UsageError
from .ensemble import TTA_VIEWS
from .modes import DEFAULT_CALIBRATION, MIN_CALIBRATION, MODES, QuantMode

#: Abstention scores ``convert`` can fit on the converted model (see ``convert.trust``).
OOD_SCORES = ("mahalanobis", "knn", "max_softmax")
#: Training images whose features fit the abstention score. On leuko-small (1,823 train
#: images) fitting on all of them instead of 600 raised the pbc-cells AUROC from 0.980 to
#: 0.987 and lowered the test abstention from 5.6 % to 5.1 %, for ~10 s more conversion.
DEFAULT_OOD_FIT = 2000


@dataclass(frozen=True)
class ConvertOptions:
    """Arguments of ``leukoedge convert``.

    Attributes:
        run_dir: the training run directory (model.keras, manifest.json, config.json).
        out: the bundle directory to write.
        quantize: a key of :data:`~leukoedge.convert.modes.MODES`.
        calibration: representative images from the TRAIN split (int8/uint8 only;
            None means the default of 300).
        max_drop: largest accepted accuracy drop, in percentage points.
        min_agreement: smallest accepted top-1 agreement with the float model (0..1).
        with_heatmap: add the ``features`` output for class activation maps.
        edgetpu: check Edge TPU compatibility and compile when edgetpu_compiler exists.
        archive: also pack the bundle as ``<out>.tar`` or ``<out>.zip``.
        force: replace an existing bundle at ``out``.
        data_root: where the run's images are now, if they moved since training (one path, or one
            per root of a manifest of several, in its order: ``Manifest.roots_for``).
        worst: how many most-disagreeing images the parity report lists.
        ood_score: abstention score fitted on the converted model: ``mahalanobis``,
            ``knn`` or ``max_softmax``; None picks ``mahalanobis`` when the model
            has a ``features`` layer, else ``max_softmax``.
        ood_dirs: folders of foreign images, for evaluation only (AUROC, abstain rates).
        calibrate: fit the temperature on the converted model's validation outputs
            (else keep the run's calibration.json temperature, 1.0 if none).
        abstain_rate: fraction of in-distribution validation images that abstain.
        ood_fit: training images whose features fit the scorer (stratified subsample).
        um_per_px: the training images' pixel size for the bundle (``--um-per-px``), replacing
            or adding to the run's recorded scale (see :mod:`.pixel_size`); None keeps the run's.
        diagnose: explain the int8 model's flips layer by layer (:mod:`.diagnose`) even when
            the gate passes; a full-integer gate that fails is always diagnosed.
        diagnose_layers: how many of the worst-ranked layers the diagnosis keeps in float, one
            at a time, to count the flips each removes (0: every layer; slow on large nets).
        members: further training runs averaged with ``run_dir`` in one model (:mod:`.ensemble`).
        tta: test-time views averaged inside the model: ``none``, ``flips`` or ``dihedral``.
        repair: after a failed full-integer gate, try more calibration images, float fallback
            for the worst layers, then 16x8, chosen on the val split (:mod:`.repair`); the kept
            model is graded on test.
    """

    run_dir: Path
    out: Path
    quantize: str = "int8"
    calibration: int | None = None
    max_drop: float = 1.0
    min_agreement: float = 0.99
    with_heatmap: bool = False
    edgetpu: bool = False
    archive: str | None = None
    force: bool = False
    data_root: Path | tuple[Path, ...] | None = None
    worst: int = 10
    ood_score: str | None = None
    ood_dirs: tuple[Path, ...] = ()
    calibrate: bool = True
    abstain_rate: float = 0.05
    ood_fit: int = DEFAULT_OOD_FIT
    um_per_px: float | None = None
    diagnose: bool = False
    diagnose_layers: int = 5
    repair: bool = False
    members: tuple[Path, ...] = ()
    tta: str = "none"

    def __post_init__(self) -> None:
        from ..train.training_scale import check_um_per_px

        check_um_per_px(self.um_per_px)
        if self.quantize not in MODES:
            raise UsageError(f"unknown --quantize {self.quantize!r}; use one of {', '.join(MODES)}")
        mode = MODES[self.quantize]
        if self.calibration is not None:
            if not mode.accepts_calibration:
                raise UsageError(
                    f"--calibration applies to full-integer modes (int8, uint8), not {self.quantize!r}",
                    hint="drop --calibration or use --quantize int8",
                )
            if self.calibration < MIN_CALIBRATION:
                raise UsageError(f"--calibration {self.calibration} is too few; use at least {MIN_CALIBRATION} images")
        if self.diagnose and not mode.full_integer:
            raise UsageError(
                f"--diagnose explains full-integer quantisation (int8, uint8); --quantize {self.quantize} quantises no activations",
                hint="drop --diagnose, or use --quantize int8",
            )
        if self.tta not in TTA_VIEWS:
            raise UsageError(f"unknown --tta {self.tta!r}; use one of {', '.join(TTA_VIEWS)}")
        if any(Path(m).resolve() == Path(self.run_dir).resolve() for m in self.members):
            raise UsageError("--member repeats RUN_DIR; each member is a different training run")
        if self.diagnose_layers < 0:
            raise UsageError(f"--diagnose-layers must be 0 (every layer) or more, not {self.diagnose_layers}")
        if self.repair and not mode.full_integer:
            raise UsageError(f"--repair repairs full-integer quantisation (int8, uint8), not --quantize {self.quantize}",
                             hint="drop --repair, or use --quantize int8")
        if not 0.0 <= self.max_drop <= 100.0:
            raise UsageError(f"--max-drop must be between 0 and 100 percentage points, got {self.max_drop}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise UsageError(f"--min-agreement must be between 0 and 1, got {self.min_agreement}")
        if self.edgetpu and not mode.edgetpu:
            raise UsageError(
                f"--edgetpu needs a full-integer model; --quantize {self.quantize} is not one",
                hint="use --quantize int8 (or uint8) with --edgetpu",
            )
        if self.archive is not None and self.archive not in ARCHIVE_KINDS:
            raise UsageError(f"--archive must be one of {', '.join(ARCHIVE_KINDS)}, got {self.archive!r}")
        if self.worst < 0:
            raise UsageError("the number of listed disagreements must be >= 0")
        if self.ood_score is not None and self.ood_score not in OOD_SCORES:
            raise UsageError(f"unknown --ood-score {self.ood_score!r}; use one of {', '.join(OOD_SCORES)}")
        if not 0.0 < self.abstain_rate < 0.5:
            raise UsageError(f"--abstain-rate must be between 0 and 0.5 (a fraction), got {self.abstain_rate}")
        if self.ood_fit < 20:
            raise UsageError(f"--ood-fit {self.ood_fit} is too few training images to fit an abstention score; use at least 20")
        if len(set(Path(d).name for d in self.ood_dirs)) != len(self.ood_dirs):
            raise UsageError("--ood-dir folders must have distinct names (they label the report)")
        if Path(self.out).resolve() == Path(self.run_dir).resolve():
            raise UsageError("--out must not be the run directory itself")

    @property
    def mode(self) -> QuantMode:
        return MODES[self.quantize]

    @property
    def calibration_size(self) -> int:
        """Images used for calibration (0 for modes that need none)."""
        if not self.mode.full_integer:
            return 0
        return DEFAULT_CALIBRATION if self.calibration is None else self.calibration
