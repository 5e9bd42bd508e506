// Idlegrid portal, the submitter's pages: what JavaScript adds to forms that work without it.
// - a job's files go up alone as soon as they are chosen (the raw bytes, with a progress bar); the form
//   then carries their sha256 in a hidden field instead of the file;
// - the new-job form shows only the fields of the chosen kind, and the example config of the chosen
//   architecture while the config is still an example;
// - forms with data-confirm ask first; forms with data-once send once (the server refuses a second
//   job from one confirm anyway).
(function () {
  "use strict";

  function csrfToken() {
    var input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  function humanSize(bytes) {
    if (bytes < 1024) return bytes + " B";
    if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KiB";
    return (bytes / 1024 / 1024).toFixed(1) + " MiB";
  }

  function showStatus(field, text, isError) {
    var status = field.querySelector(".field-status");
    status.textContent = "";
    var line = document.createElement("p");
    line.className = isError ? "field-error" : "field-ok";
    line.textContent = text;
    status.appendChild(line);
  }

  var uploading = 0;

  function upload(field, input) {
    var file = input.files && input.files[0];
    if (!file) return;
    var bar = field.querySelector(".upload-progress");
    var fill = bar.querySelector("span");
    var done = field.querySelector(".upload-done");
    var sha = document.getElementById(field.getAttribute("data-sha-input"));
    var request = new XMLHttpRequest();
    uploading += 1;
    bar.hidden = false;
    done.hidden = true;
    fill.style.width = "0%";
    field.querySelector(".field-status").textContent = "";
    request.upload.addEventListener("progress", function (event) {
      if (!event.lengthComputable) return;
      var percent = Math.round(100 * event.loaded / event.total);
      fill.style.width = percent + "%";
      bar.setAttribute("aria-valuenow", String(percent));
    });
    request.addEventListener("loadend", function () {
      uploading -= 1;
      var answer = {};
      try { answer = JSON.parse(request.responseText || "{}"); } catch (e) { answer = {}; }
      if (request.status === 200 || request.status === 201) {
        sha.value = answer.sha256;
        input.value = "";  // the form now names the stored file; it does not send it again
        fill.style.width = "100%";
        bar.setAttribute("aria-valuenow", "100");
        done.hidden = false;
        done.textContent = "Uploaded " + file.name + " (" + humanSize(answer.size) + "), sha256 " +
          answer.sha256.slice(0, 12) + "…";
        if (window.htmx) window.htmx.trigger(input, "uploaded");
      } else {
        bar.hidden = true;
        sha.value = "";
        showStatus(field, answer.error || ("The upload failed (HTTP " + request.status + "): choose the file again."), true);
      }
    });
    request.open("POST", field.getAttribute("data-upload"));
    request.setRequestHeader("Content-Type", "application/octet-stream");
    request.setRequestHeader("X-CSRFToken", csrfToken());
    request.send(file);
  }

  function kindFields(form) {
    var kind = form.querySelector("select[name=kind]");
    if (!kind) return;
    function apply() {
      form.querySelectorAll("[data-kind]").forEach(function (block) {
        block.hidden = block.getAttribute("data-kind") !== kind.value;
      });
      form.querySelectorAll(".kind-note").forEach(function (note) { note.hidden = true; });
    }
    kind.addEventListener("change", apply);
    apply();
  }

  function exampleConfigs(form) {
    var architecture = form.querySelector("select[name=architecture]");
    var config = form.querySelector("textarea[name=config]");
    var examples = {};
    try { examples = JSON.parse(form.getAttribute("data-examples") || "{}"); } catch (e) { return; }
    if (!architecture || !config) return;
    architecture.addEventListener("change", function () {
      var isExample = Object.keys(examples).some(function (name) {
        return config.value.trim() === JSON.stringify(examples[name]);
      });
      if ((isExample || !config.value.trim()) && examples[architecture.value]) {
        config.value = JSON.stringify(examples[architecture.value]);
        config.dispatchEvent(new Event("change", { bubbles: true }));
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".field.upload[data-upload]").forEach(function (field) {
      var input = field.querySelector("input[type=file]");
      input.addEventListener("change", function () { upload(field, input); });
    });
    document.querySelectorAll("form.job-form").forEach(function (form) {
      kindFields(form);
      exampleConfigs(form);
      form.addEventListener("submit", function (event) {
        if (uploading > 0) {
          event.preventDefault();
          window.alert("A file is still uploading: wait for its bar to fill, then send the form.");
        }
      });
    });
  });

  // Delegated, so the job page's live fragment (swapped in by htmx) gets it too.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.hasAttribute("data-confirm")) {
      if (!window.confirm(form.getAttribute("data-confirm"))) {
        event.preventDefault();
        return;
      }
      // asked here: the server's own confirmation page (what a browser without JavaScript gets) is skipped
      form.querySelectorAll("input[data-confirmed]").forEach(function (input) { input.value = "yes"; });
    }
    if (form.hasAttribute("data-once")) {
      if (form.dataset.sent) { event.preventDefault(); return; }
      form.dataset.sent = "1";
      form.querySelectorAll("button[type=submit]").forEach(function (button) {
        setTimeout(function () { button.disabled = true; }, 0);
      });
    }
  });
})();
