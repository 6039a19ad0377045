"""Samples, review and agreement through the app (issue 16): real bundle, real LiteRT, Flask test client.

Every new route, and bad input of each kind (unknown sample, closed sample, a
label not in the bundle, a review of a deleted result, a too-long name)
answering 4xx with nothing stored.
"""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from app_helpers import CLASSES, csrf_from, png_bytes
from bundle_factory import draw_cell

pytest_plugins = ["app_fixtures"]  # shared fixtures, registered once per session


def _png(label: str = "Early", seed: int = 0) -> bytes:
    return png_bytes(draw_cell(label, np.random.default_rng(seed), 64))


def _classify(client, sample: str | None = None, label: str = "Early", seed: int = 0):
    data = {"image": (io.BytesIO(_png(label, seed)), "cell.png")}
    if sample is not None:
        data["sample"] = sample
    return client.post("/api/classify", data=data, content_type="multipart/form-data")


def _new_sample(client, name: str = "slide 1", **extra) -> dict:
    r = client.post("/api/samples", json={"name": name, **extra})
    assert r.status_code == 201, r.json
    return r.json


def _stored(app) -> tuple[int, int, int]:
    store = app.extensions["leukoedge"].store
    return store.count(), len(list(store.images_dir.iterdir())), len(list(store.iter_reviewed()))


# -- samples API ----------------------------------------------------------------------
def test_sample_lifecycle_through_the_api(app, client):
    sample = _new_sample(client, "  slide 12  ", note="Wright stain")
    assert sample["name"] == "slide 12" and sample["note"] == "Wright stain" and len(sample["id"]) == 32
    assert [s["id"] for s in client.get("/api/samples").json["items"]] == [sample["id"]]

    ids = []
    for seed, label in enumerate(CLASSES):
        r = _classify(client, sample["id"], label, seed)
        assert r.status_code == 201 and r.json["sample_id"] == sample["id"]
        ids.append(r.json["id"])
    loose = _classify(client).json
    assert loose["sample_id"] is None

    summary = client.get(f"/api/samples/{sample['id']}").json
    assert summary["id"] == sample["id"] and summary["name"] == "slide 12"
    assert summary["n"] == len(CLASSES) and summary["results"] == ids
    assert set(summary["counts"]) == set(CLASSES)
    assert sum(summary["counts"].values()) + summary["abstained"] + summary["retake"] == summary["n"]
    assert summary["reviewed"] == 0 and summary["agreement"]["overall"]["n"] == 0
    if summary["mean_probabilities"] is not None:
        assert sum(summary["mean_probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert summary["models"] == [{"name": loose["model"]["name"], "version": loose["model"]["version"],
                                  "bundle_sha256": loose["bundle_sha256"], "n": len(CLASSES)}]
    assert summary["bundle_sha256"] == loose["bundle_sha256"] and not summary["several_bundles"]

    closed = client.post(f"/api/samples/{sample['id']}/close")
    assert closed.status_code == 200 and closed.json["closed"]
    before = _stored(app)
    r = _classify(client, sample["id"])
    assert r.status_code == 400 and "closed" in r.json["error"]["message"]
    r = client.post("/api/capture", json={"sample": sample["id"]})
    assert r.status_code == 400
    assert _stored(app) == before

    r = client.delete(f"/api/samples/{sample['id']}")
    assert r.status_code == 200 and r.json["deleted_results"] == len(CLASSES)
    assert client.get(f"/api/samples/{sample['id']}").status_code == 404
    for result_id in ids:
        assert client.get(f"/api/results/{result_id}").status_code == 404
    assert client.get(f"/api/results/{loose['id']}").status_code == 200
    assert _stored(app)[0] == 1


def test_capture_api_files_into_a_sample(client):
    sample = _new_sample(client)
    r = client.post("/api/capture", json={"sample": sample["id"]})
    assert r.status_code == 201 and r.json["sample_id"] == sample["id"] and r.json["source"] == "camera"
    assert client.post("/api/capture").json["sample_id"] is None  # no field: no sample
    assert client.get(f"/api/samples/{sample['id']}").json["n"] == 1


@pytest.mark.parametrize("sample, status", [("0" * 32, 404), ("../../etc", 404), ("f" * 31, 404)])
def test_unknown_sample_stores_nothing(app, client, sample, status):
    before = _stored(app)
    assert _classify(client, sample).status_code == status
    assert client.post("/api/capture", json={"sample": sample}).status_code == status
    assert _stored(app) == before


@pytest.mark.parametrize("body", [{"name": "x" * 101}, {"name": ""}, {"name": "a\nb"}, {},
                                  {"name": "ok", "note": "n" * 501}, {"name": 5}])
def test_bad_sample_names_are_refused(app, client, body):
    r = client.post("/api/samples", json=body)
    assert r.status_code == 400, r.json
    assert client.get("/api/samples").json["items"] == []


def test_non_object_json_is_refused(client):
    r = client.post("/api/samples", data="[1, 2]", content_type="application/json")
    assert r.status_code == 400 and client.get("/api/samples").json["items"] == []


# -- review and agreement ------------------------------------------------------------
def test_review_changes_agreement_and_filters(app, client):
    a = _classify(client, label="Early", seed=1).json
    b = _classify(client, label="Pro", seed=2).json
    c = _classify(client, label="Pre", seed=3).json
    assert client.get("/api/agreement").json["overall"]["n"] == 0

    r = client.post(f"/api/results/{a['id']}/review", json={"label": a["predicted"], "note": "agree"})
    assert r.status_code == 200 and r.json["review_label"] == a["predicted"] and r.json["reviewed_at"]
    other = next(label for label in CLASSES if label != b["predicted"])
    assert client.post(f"/api/results/{b['id']}/review", json={"label": other}).status_code == 200
    assert client.post(f"/api/results/{c['id']}/review", json={"label": "unusable"}).status_code == 200

    agreement = client.get("/api/agreement").json
    expected_n = sum(1 for x in (a, b) if not x["retake"])
    assert agreement["overall"]["n"] == expected_n and agreement["excluded"]["unusable"] == 1
    assert agreement["method"] == "wilson" and set(CLASSES) <= set(agreement["per_label"])
    if expected_n:
        overall = agreement["overall"]
        assert 0 <= overall["low"] < overall["high"] <= 1  # never an interval that collapses at small n
    health = client.get("/api/health").json
    assert health["agreement"]["n"] == expected_n

    disagreed = client.get("/api/results?review=disagreed").json
    assert [x["id"] for x in disagreed["items"]] == [b["id"]]
    assert client.get("/api/results?review=reviewed").json["total"] == 3
    assert client.get("/api/results?review=unreviewed").json["total"] == 0
    assert client.get("/api/results?review=nonsense").status_code == 400
    assert b["id"] in client.get("/history?review=disagreed").get_data(as_text=True)
    assert a["id"] not in client.get("/history?review=disagreed").get_data(as_text=True)

    rows = list(csv.reader(io.StringIO(client.get("/export.csv?review=reviewed").get_data(as_text=True))))
    header = rows[0]
    assert {row[header.index("review_label")] for row in rows[1:]} == {a["predicted"], other, "unusable"}
    exported = json.loads(client.get("/export.json").data)
    assert {x["id"]: x["review_note"] for x in exported["results"]}[a["id"]] == "agree"
    assert "samples" in exported


@pytest.mark.parametrize("body", [{"label": "Lymphoblast"}, {"label": ""}, {}, {"label": 3},
                                  {"label": "Pro", "note": "n" * 501}])
def test_bad_review_stores_nothing(app, client, body):
    result = _classify(client).json
    r = client.post(f"/api/results/{result['id']}/review", json=body)
    assert r.status_code == 400, r.json
    assert client.get(f"/api/results/{result['id']}").json["review_label"] is None


def test_review_of_a_deleted_or_unknown_result_is_404(app, client):
    result = _classify(client).json
    assert client.delete(f"/api/results/{result['id']}").status_code == 204
    assert client.post(f"/api/results/{result['id']}/review", json={"label": "Pro"}).status_code == 404
    assert client.post("/api/results/nope/review", json={"label": "Pro"}).status_code == 404
    assert _stored(app) == (0, 0, 0)


def test_sample_summary_counts_reviews_and_agreement(client):
    sample = _new_sample(client)
    first = _classify(client, sample["id"], "Early", 1).json
    _classify(client, sample["id"], "Pro", 2)
    other = next(label for label in CLASSES if label != first["predicted"])
    client.post(f"/api/results/{first['id']}/review", json={"label": other})
    summary = client.get(f"/api/samples/{sample['id']}").json
    assert summary["reviewed"] == 1
    assert summary["disagreed"] == 1
    if not first["retake"]:
        assert summary["agreement"]["overall"] == pytest.approx(
            {"value": 0.0, "low": 0.0, "high": summary["agreement"]["overall"]["high"], "k": 0, "n": 1})
        assert summary["agreement"]["per_label"][other]["n"] == 1


# -- pages and forms ----------------------------------------------------------------
def test_selector_forms_create_switch_close_and_capture_into_the_current_sample(app, client):
    page = client.get("/").get_data(as_text=True)
    assert "No patient names are needed" in page and 'id="sample-selector"' in page
    token = csrf_from(page)
    r = client.post("/samples", data={"csrf_token": token, "name": "slide 7", "back": "live"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/")
    sample = client.get("/api/samples").json["items"][0]
    page = client.get("/").get_data(as_text=True)
    assert f'name="sample" value="{sample["id"]}"' in page and "slide 7" in page
    r = client.post("/capture", data={"csrf_token": token, "sample": sample["id"]})
    assert r.status_code == 303
    assert client.get(f"/api/samples/{sample['id']}").json["n"] == 1
    upload = client.get("/upload").get_data(as_text=True)
    assert f'name="sample" value="{sample["id"]}"' in upload
    r = client.post("/upload", data={"csrf_token": token, "sample": sample["id"],
                                     "images": [(io.BytesIO(_png("Pre", 4)), "a.png"),
                                                (io.BytesIO(_png("Pro", 5)), "b.png")]},
                    content_type="multipart/form-data")
    assert r.status_code == 200
    assert client.get(f"/api/samples/{sample['id']}").json["n"] == 3

    r = client.post("/samples/current", data={"csrf_token": token, "sample": "", "back": "upload"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/upload")
    assert 'name="sample" value=""' in client.get("/upload").get_data(as_text=True)
    client.post("/samples/current", data={"csrf_token": token, "sample": sample["id"], "back": "live"})
    client.post(f"/samples/{sample['id']}/close", data={"csrf_token": token, "back": "live"})
    assert 'id="current-sample-none"' in client.get("/").get_data(as_text=True)  # a closed sample is not current
    assert client.post("/samples/current", data={"csrf_token": token, "sample": sample["id"]}).status_code == 400


def test_forms_need_the_csrf_token(app, client):
    assert client.post("/samples", data={"name": "x"}).status_code == 403
    sample = _new_sample(client)
    assert client.post(f"/samples/{sample['id']}/delete", data={"confirm": "yes"}).status_code == 403
    result = _classify(client).json
    assert client.post(f"/results/{result['id']}/review", data={"label": "Pro"}).status_code == 403
    assert client.get("/api/samples").json["items"] and _stored(app)[2] == 0


def test_sample_page_report_and_delete_form(app, client, classifier):
    sample = _new_sample(client, "slide 9")
    ids = [_classify(client, sample["id"], label, seed).json["id"] for seed, label in enumerate(CLASSES[:2])]
    page = client.get(f"/samples/{sample['id']}").get_data(as_text=True)
    assert "slide 9" in page and all(i in page for i in ids) and 'id="sample-agreement"' in page
    assert "µm/px" in page or "no scale" in page
    report = client.get(f"/samples/{sample['id']}/report")
    text = report.get_data(as_text=True)
    assert report.status_code == 200 and "@media print" not in text  # the print CSS is a static file
    assert classifier.info()["bundle_sha256"] in text and "Research use only" in text
    assert text.count('class="field-row"') == 2 and 'id="report-notice"' in text
    css = client.get("/static/report.css").get_data(as_text=True)
    assert "@media print" in css and "table-header-group" in css and "break-before: page" in css
    assert client.get("/samples").status_code == 200 and "slide 9" in client.get("/samples").get_data(as_text=True)

    token = csrf_from(page)
    r = client.post(f"/samples/{sample['id']}/delete", data={"csrf_token": token})
    assert r.status_code == 400 and client.get(f"/api/samples/{sample['id']}").status_code == 200  # unconfirmed
    r = client.post(f"/samples/{sample['id']}/delete", data={"csrf_token": token, "confirm": "yes"})
    assert r.status_code == 303 and client.get(f"/api/samples/{sample['id']}").status_code == 404
    assert _stored(app)[:2] == (0, 0)
    assert client.get(f"/samples/{sample['id']}/report").status_code == 404


def test_every_result_records_the_bundle_that_made_it(app, client, classifier):
    """The loaded bundle's checksum is stored with each result and reaches the API, the pages and both exports."""
    sha = classifier.info()["bundle_sha256"]
    made = _classify(client).json
    assert made["bundle_sha256"] == sha and len(sha) == 64
    assert app.extensions["leukoedge"].store.get(made["id"]).bundle_sha256 == sha
    assert client.get(f"/api/results/{made['id']}").json["bundle_sha256"] == sha
    assert sha in client.get(f"/results/{made['id']}").get_data(as_text=True)
    rows = list(csv.reader(io.StringIO(client.get("/export.csv").get_data(as_text=True))))
    assert rows[1][rows[0].index("bundle_sha256")] == sha
    assert json.loads(client.get("/export.json").data)["results"][0]["bundle_sha256"] == sha


def _other_bundle_field(app, sample_id: str, sha: str) -> str:
    """A field of ``sample_id`` as an earlier bundle (checksum ``sha``, model tiny_cnn 0) stored it: via the store."""
    store = app.extensions["leukoedge"].store
    probs = {label: 0.1 for label in CLASSES}
    probs[CLASSES[0]] = 1.0 - 0.1 * (len(CLASSES) - 1)
    fields = {"source": "upload", "filename": "old.png", "label": CLASSES[0], "confidence": probs[CLASSES[0]],
              "abstained": False, "ood_score": None, "probabilities": probs, "latency_ms": 1.0, "timings": {},
              "model_name": "tiny_cnn", "model_version": "0", "width": 64, "height": 64, "original_ext": ".png",
              "sample_id": sample_id, "bundle_sha256": sha}
    image = _png(CLASSES[0], 9)
    return store.add(fields, {"original": image, "thumbnail": image}).id


def test_report_names_each_fields_bundle_when_a_sample_mixes_two(app, client, classifier):
    """A field made by an earlier bundle keeps that bundle's checksum on the report, which says the sample mixes two."""
    sha = classifier.info()["bundle_sha256"]
    older = "0123456789abcdef" * 4
    sample = _new_sample(client, "slide 21")
    one = client.get(f"/samples/{sample['id']}/report").get_data(as_text=True)
    assert 'id="report-several-bundles"' not in one and "no fields" in one
    _classify(client, sample["id"], "Early", 1)
    single = client.get(f"/samples/{sample['id']}/report").get_data(as_text=True)
    assert f'id="report-checksum">{sha}<' in single and 'id="report-several-bundles"' not in single
    assert f">{sha[:12]}<" in single  # the field's short form, the full one is in the header

    old_id = _other_bundle_field(app, sample["id"], older)
    summary = client.get(f"/api/samples/{sample['id']}").json
    assert summary["several_bundles"] and summary["bundle_sha256"] is None
    assert [m["bundle_sha256"] for m in summary["models"]] == [sha, older]
    report = client.get(f"/samples/{sample['id']}/report").get_data(as_text=True)
    assert 'id="report-several-bundles"' in report and "2 different bundles" in report
    assert 'id="report-checksum"' not in report  # no single checksum claims to cover every field
    rows = report.split('<tr class="field-row">')[1:]
    assert len(rows) == 2
    assert sha in rows[0] and older not in rows[0]  # each field's full checksum, in its own row
    assert older in rows[1] and sha not in rows[1] and "tiny_cnn 0" in rows[1]
    footer = report.split('id="report-footer">')[1].split("</div>")[0]
    assert "2 different bundles" in footer and sha not in footer
    assert f'id="report-loaded-checksum">{sha}<' in report  # what is loaded now, apart, and said to be so
    page = client.get(f"/samples/{sample['id']}").get_data(as_text=True)
    assert 'id="sample-several-bundles"' in page and older[:12] in page and sha[:12] in page
    assert older in client.get(f"/results/{old_id}").get_data(as_text=True)

    # Only the earlier bundle's fields: its checksum heads the report, and the loaded one is said to differ.
    lone = _new_sample(client, "slide 22")
    _other_bundle_field(app, lone["id"], older)
    report = client.get(f"/samples/{lone['id']}/report").get_data(as_text=True)
    assert f'id="report-checksum">{older}<' in report and "not the bundle that classified these fields" in report


def test_pages_link_the_reviewed_export_once_there_is_something_in_it(app, client):
    pages = ("/review", "/samples", "/history")
    for url in pages:
        text = client.get(url).get_data(as_text=True)
        assert 'id="reviewed-zip-none"' in text and 'href="/export/reviewed.zip"' not in text, url
    sample = _new_sample(client)
    result = _classify(client, sample["id"]).json
    client.post(f"/api/results/{result['id']}/review", json={"label": "unusable"})
    assert 'id="reviewed-zip-none"' in client.get("/review").get_data(as_text=True)  # unusable: not exported
    client.post(f"/api/results/{result['id']}/review", json={"label": CLASSES[1]})
    for url in (*pages, f"/samples/{sample['id']}"):
        text = client.get(url).get_data(as_text=True)
        assert 'id="reviewed-zip-link" href="/export/reviewed.zip"' in text, url
        assert "leukoedge train --data ORIGINAL --data reviewed/" in text and "reviewed.json" in text
    link = client.get("/review").get_data(as_text=True).split('id="reviewed-zip-link" href="')[1].split('"')[0]
    assert client.get(link).status_code == 200


def test_review_page_and_form(app, client):
    results = [_classify(client, label=label, seed=seed).json for seed, label in enumerate(CLASSES)]
    page = client.get("/review").get_data(as_text=True)
    assert all(r["id"] in page for r in results) and "Agreement with reviewers" in page
    target = results[0]
    result_page = client.get(f"/results/{target['id']}?from=review").get_data(as_text=True)
    assert 'id="review-label"' in result_page and "unusable" in result_page
    token = csrf_from(result_page)
    r = client.post(f"/results/{target['id']}/review",
                    data={"csrf_token": token, "label": "unusable", "note": "smudged", "back": "review"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/review")
    assert target["id"] not in client.get("/review").get_data(as_text=True)  # reviewed: out of the queue
    assert "smudged" in client.get(f"/results/{target['id']}").get_data(as_text=True)
    bad = client.post(f"/results/{target['id']}/review", data={"csrf_token": token, "label": "Blast"})
    assert bad.status_code == 400
    assert client.get(f"/api/results/{target['id']}").json["review_label"] == "unusable"
