"""Pages at the microscope: live preview + capture, upload, one result."""
from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for

from ...errors import LeukoEdgeError
from ...runtime.postprocess import abstain_side
from .common import read_uploads, state

bp = Blueprint("ui", __name__)

#: Shown instead of a label when the model abstains. Never a diagnosis.
ABSTAIN_MESSAGE = "Not like the images this model was trained on: no label is given."


@bp.get("/")
def live():
    return render_template("live.html", broadcaster=state().broadcaster)


@bp.post("/capture")
def capture():
    result = state().service.classify_capture()
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
    files = read_uploads(request.files, "images", limit=st.config.max_files_per_upload)
    results, failures = [], []
    for name, stream in files:
        try:
            results.append(st.service.classify_upload(stream, name))
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
    return render_template("result.html", result=res, ranked=ranked, abstain_message=ABSTAIN_MESSAGE,
                           abstention=abstention)
