"""Pages at the microscope: live preview + capture, upload, one result."""
from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for

from ...errors import LeukoEdgeError
from ...runtime.postprocess import abstain_side
from ..storage import SampleNotFoundError
from .common import read_uploads, state
from .review import review_labels
from .samples import requested_sample

bp = Blueprint("ui", __name__)

#: Shown instead of a label when the model abstains. Never a diagnosis.
ABSTAIN_MESSAGE = "Not like the images this model was trained on: no label is given."
#: Tile outline colours by class (in the bundle's label order); colour-blind-safe first (Okabe-Ito).
TILE_PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#f0e442", "#000000")
#: How the result page words each scale source (Prediction.scale_source).
SCALE_SOURCES = {
    "given": "given",
    "estimated": "estimated from this capture's red cells",
    "bundle-unknown": "not used: this model does not record its training scale, so the frame was stretched whole",
    "estimate-failed": "could not be estimated from this capture (too few red cells); the frame was stretched whole",
}


@bp.get("/")
def live():
    return render_template("live.html", broadcaster=state().broadcaster)


@bp.post("/capture")
def capture():
    # The sample the page showed (its hidden field), not whatever the session says now.
    result = state().service.classify_capture(sample_id=requested_sample())
    return redirect(url_for("ui.result", result_id=result.id), code=303)


@bp.get("/upload")
def upload_form():
    return render_template("upload.html")


@bp.post("/upload")
def upload():
    """Classify each file; report per-file failures beside the successes.

    Every file gets an answer: a stored result, or the typed reason it was
    refused (any :class:`LeukoEdgeError`: a damaged image, one too large to
    decode, a full disk), so a bad file in the middle of a batch never hides
    what happened to the others. When no file could be classified, the
    (first) error goes to the error handler like any other, so the page shows
    one clear message.
    """
    st = state()
    sample_id = requested_sample()
    if sample_id is not None:
        st.store.open_sample(sample_id)  # a deleted or closed sample fails the whole batch, before any file
    files = read_uploads(request.files, "images", limit=st.config.max_files_per_upload)
    results, failures = [], []
    for name, stream in files:
        try:
            results.append(st.service.classify_upload(stream, name, sample_id=sample_id))
        except LeukoEdgeError as err:
            failures.append((name, err))
    if not results:
        first = failures[0][1]
        raise type(first)("; ".join(f"{n}: {_reason(e)}" for n, e in failures), hint=first.hint)
    if len(results) == 1 and not failures:
        return redirect(url_for("ui.result", result_id=results[0].id), code=303)
    return render_template("batch.html", results=results,
                           failures=[(n, _reason(e)) for n, e in failures])


def _reason(err: LeukoEdgeError) -> str:
    """Why a file failed, without preprocess's generic "uploaded image:" prefix (the file name is shown)."""
    return err.message.removeprefix("uploaded image: ")


@bp.get("/results/<result_id>")
def result(result_id: str):
    res = state().store.get(result_id)
    ranked = sorted(res.probabilities.items(), key=lambda kv: kv[1], reverse=True)
    info = state().service.model_info
    # The score's meaning (and its threshold) comes from the bundle that produced it.
    same_model = (info["model"], str(info["version"])) == (res.model_name, res.model_version)
    abstention = dict(info.get("abstention") or {}) if same_model else {}
    if abstention.get("score") and abstention.get("threshold") is not None:
        abstention["side"] = abstain_side(abstention)
    sample = None
    if res.sample_id is not None:
        try:
            sample = state().store.get_sample(res.sample_id)
        except SampleNotFoundError:
            sample = None
    return render_template("result.html", result=res, ranked=ranked, abstain_message=ABSTAIN_MESSAGE,
                           sample=sample, review_labels=review_labels(),
                           from_review=request.args.get("from") == "review",
                           abstention=abstention, tile_map=tile_map(res), scale_source=SCALE_SOURCES.get(
                               res.scale_source or "", res.scale_source))


def tile_map(res) -> dict | None:
    """What the result page draws over the capture: one box per tile, coloured by its label.

    Boxes are in the full-resolution image's pixels (``res.width`` x ``res.height``),
    which is the SVG's viewBox, so they land right whatever size the image is shown at.
    """
    if not res.tiles:
        return None
    order = list(res.probabilities)
    order += sorted({t.get("label") for t in res.tiles if t.get("label")} - set(order))
    colours = {name: TILE_PALETTE[i % len(TILE_PALETTE)] for i, name in enumerate(order)}
    tiles = []
    for i, t in enumerate(res.tiles, start=1):
        x, y, w, h = (list(t.get("box") or (0, 0, 0, 0)) + [0, 0, 0, 0])[:4]
        label = t.get("label")
        tiles.append({"n": i, "x": x, "y": y, "w": w, "h": h, "label": label, "confidence": t.get("confidence"),
                      "used": bool(t.get("used")), "abstained": t.get("abstained"),
                      "has_white_cell": bool(t.get("has_white_cell")), "colour": colours.get(label, "#7f7f7f")})
    present = {t["label"] for t in tiles if t["label"]}
    return {"width": max(1, res.width), "height": max(1, res.height), "tiles": tiles,
            "used": sum(t["used"] for t in tiles), "legend": [(n, colours[n]) for n in order if n in present]}
