// leukoedge: progressive enhancement only; every form works without JavaScript.
"use strict";
var leaving = false;  // a form was sent: the page is about to be replaced, stop background polling
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
    return;
  }
  leaving = true;
  // Capture and upload take a moment on a Pi: stop double submissions.
  var button = event.submitter || form.querySelector("button[type=submit]");
  if (button && !button.disabled) {
    window.setTimeout(function () {
      button.disabled = true;
      button.textContent = "Working\u2026";
    }, 0);
  }
});

// Live view: the preview's focus score, polled while the page is visible (GET /api/focus).
(function () {
  var box = document.getElementById("focus");
  if (!box || !window.fetch) {
    return;
  }
  var score = document.getElementById("focus-score");
  var best = document.getElementById("focus-best");
  var bar = document.getElementById("focus-bar");
  var failures = 0;
  function show(data) {
    if (typeof data.focus !== "number") {
      return;
    }
    box.hidden = false;
    score.textContent = data.focus.toPrecision(3);
    best.textContent = data.best_recent.toPrecision(3);
    bar.max = data.best_recent > 0 ? data.best_recent : 1;
    bar.value = data.focus;
  }
  window.addEventListener("pagehide", function () { leaving = true; });
  function poll() {
    if (leaving) {
      return;
    }
    if (document.visibilityState === "hidden") {
      window.setTimeout(poll, 1000);
      return;
    }
    fetch(box.getAttribute("data-url"), {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) { failures = 0; show(data); window.setTimeout(poll, 500); })
      .catch(function () {
        failures += 1;
        box.hidden = true;
        window.setTimeout(poll, Math.min(10000, 1000 * failures));  // no camera frame: back off
      });
  }
  poll();
})();

// Sample report: the print button (the page prints without it too: the browser's own Print).
(function () {
  var button = document.getElementById("print-report");
  if (button) {
    button.addEventListener("click", function () { window.print(); });
  }
})();
