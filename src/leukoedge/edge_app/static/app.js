// leukoedge: progressive enhancement only; every form works without JavaScript.
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
    return;
  }
  // Capture and upload take a moment on a Pi: stop double submissions.
  var button = form.querySelector("button[type=submit]");
  if (button && !button.disabled) {
    window.setTimeout(function () {
      button.disabled = true;
      button.textContent = "Working\u2026";
    }, 0);
  }
});
