// Idlegrid portal: what JavaScript adds to pages that work without it.
// - <time data-local> shown in the viewer's own time zone (the server writes UTC);
// - charts: <div class="chart" data-chart="ID"> drawn with uPlot from <script type="application/json" id="ID">;
// - [data-copy="selector"] buttons copy that element's text.
// Everything runs again on content htmx swaps in (htmx:load), so live fragments get the same treatment.
(function () {
  "use strict";

  var timeFormat = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", timeZoneName: "short",
  });

  function localTimes(root) {
    root.querySelectorAll("time[data-local]").forEach(function (el) {
      var moment = new Date(el.getAttribute("datetime"));
      if (!isNaN(moment)) {
        el.textContent = timeFormat.format(moment);
        el.title = el.getAttribute("datetime");
      }
    });
  }

  // A chart's data: {"x": [unix seconds...], "series": [{"label": "...", "values": [...], "color": "#..."}],
  // "y": "label of the y axis", "x_time": true|false, "x_label": "..."}.
  var charts = [];
  // Charts whose element left the page (an htmx poll swapped the fragment) are destroyed and forgotten,
  // so that a page polled for hours holds the charts it shows, not one per poll.
  function forgetDetached() {
    charts = charts.filter(function (c) {
      if (document.body.contains(c.el)) return true;
      c.plot.destroy();
      return false;
    });
  }

  function drawCharts(root) {
    if (typeof uPlot === "undefined") return;
    forgetDetached();
    root.querySelectorAll(".chart[data-chart]").forEach(function (el) {
      var source = document.getElementById(el.getAttribute("data-chart"));
      if (!source) return;
      var data;
      try { data = JSON.parse(source.textContent); } catch (e) { return; }
      charts = charts.filter(function (c) {  // drawn before (the page's load and htmx's both enhance it)
        if (c.el !== el) return true;
        c.plot.destroy();
        return false;
      });
      el.textContent = "";
      if (!data.x || data.x.length < 1) {
        var empty = document.createElement("p");
        empty.className = "chart-empty";
        empty.textContent = el.getAttribute("data-empty") || "No data yet.";
        el.appendChild(empty);
        return;
      }
      var palette = ["#1f5fbf", "#17663a", "#b3261e", "#8a5300", "#6b3fa0"];
      var series = [{ label: data.x_label || (data.x_time ? "time" : "x") }];
      data.series.forEach(function (s, i) {
        series.push({ label: s.label, stroke: s.color || palette[i % palette.length], width: 2,
                      points: { show: data.x.length < 40 }, scale: s.scale || "y" });
      });
      var axes = [{ label: data.x_label || null }, { label: data.y || null, scale: "y", values: tickValues }];
      if (data.y2) axes.push({ label: data.y2, scale: "y2", side: 1, grid: { show: false }, values: tickValues });
      var opts = {
        width: Math.max(240, el.clientWidth || 600), height: parseInt(el.getAttribute("data-height") || "220", 10),
        scales: { x: { time: !!data.x_time } }, series: series, axes: axes,
        legend: { live: false },  // the series' names; values are read off the axes
      };
      var plot = new uPlot(opts, [data.x].concat(data.series.map(function (s) { return s.values; })), el);
      charts.push({ el: el, plot: plot });
    });
  }

  // Tick labels with as many decimals as the step between ticks needs: uPlot's default wrote 0.002, 0.002,
  // 0.001, 0.001 for steps of 0.0005 (token amounts are small), and 3 for 2.5.
  function tickValues(u, splits) {
    if (splits.length < 2) return splits.map(String);
    var step = Math.abs(splits[1] - splits[0]) || 1;
    var decimals = 0;  // the fewest that write the step exactly: 2.5 -> 1, 0.0005 -> 4, 2 -> 0
    while (decimals < 12 && Math.abs(step * Math.pow(10, decimals) - Math.round(step * Math.pow(10, decimals))) > 1e-6) {
      decimals++;
    }
    return splits.map(function (v) { return v == null ? "" : v.toFixed(decimals); });
  }

  function copyButtons(root) {
    root.querySelectorAll("[data-copy]").forEach(function (button) {
      if (button.dataset.copyBound) return;
      button.dataset.copyBound = "1";
      button.hidden = false;
      button.addEventListener("click", function () {
        var target = document.querySelector(button.getAttribute("data-copy"));
        if (!target || !navigator.clipboard) return;
        navigator.clipboard.writeText(target.textContent.trim()).then(function () {
          var label = button.textContent;
          button.textContent = "Copied";
          setTimeout(function () { button.textContent = label; }, 1500);
        });
      });
    });
  }

  function enhance(root) {
    localTimes(root);
    drawCharts(root);
    copyButtons(root);
  }

  window.addEventListener("resize", function () {
    forgetDetached();
    charts.forEach(function (c) { c.plot.setSize({ width: Math.max(240, c.el.clientWidth), height: c.plot.height }); });
  });

  document.addEventListener("DOMContentLoaded", function () {
    enhance(document);
    document.body.addEventListener("htmx:load", function (event) { enhance(event.target); });
  });
  window.Idlegrid = { enhance: enhance };
})();
