// hostsvc status page: fetch api/status every few seconds and redraw the table in place.
"use strict";
(function () {
  var REFRESH_MS = 3000;
  var tbody = document.querySelector("#apps tbody");
  var summary = document.getElementById("summary");
  var banner = document.getElementById("banner");
  var windowNote = document.getElementById("window");
  var updated = document.getElementById("updated");

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function num(v, digits) {
    if (v === null || v === undefined) return "\u2013";
    return Number(v).toLocaleString("en-US", {maximumFractionDigits: digits || 0});
  }
  function ms(v) {
    if (v === null || v === undefined) return "\u2013";
    return v < 10 ? v.toFixed(1) + " ms" : Math.round(v) + " ms";
  }
  function bytes(v) {
    if (v === null || v === undefined) return "\u2013";
    var units = ["B", "kB", "MB", "GB"], i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(i ? 1 : 0) + " " + units[i];
  }
  function duration(s) {
    if (s === null || s === undefined) return "\u2013";
    s = Math.floor(s);
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60);
    return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + (s % 60) + "s" : s + "s";
  }

  function row(app) {
    var w = app.window;
    var tr = el("tr", {"data-app": app.name});
    tr.appendChild(el("td", {"data-field": "name"}, app.name));
    var prefix = el("td", {"data-field": "prefix"});
    prefix.appendChild(el("a", {href: app.prefix.replace(/\/?$/, "/")}, app.prefix));
    tr.appendChild(prefix);
    tr.appendChild(el("td", {"data-field": "engine"}, app.engine || "\u2013"));
    var st = el("td", {"data-field": "state"});
    st.appendChild(el("span", {"class": "badge " + app.state}, app.state));
    if (app.last_error) st.appendChild(el("div", {"class": "error-note"}, app.last_error));
    tr.appendChild(st);
    var wk = el("td", {"class": "num", "data-field": "workers"},
                num(app.workers_alive) + "/" + num(app.workers));
    if (app.workers_alive < app.workers) wk.className += " warn";
    tr.appendChild(wk);
    tr.appendChild(el("td", {"class": "num" + (app.restarts ? " warn" : ""),
                             "data-field": "restarts"}, num(app.restarts)));
    tr.appendChild(el("td", {"class": "num", "data-field": "requests_total"},
                         num(app.requests_total)));
    tr.appendChild(el("td", {"class": "num", "data-field": "rate"},
                         w ? num(w.rate_per_s, 2) : "\u2013"));
    var err = el("td", {"class": "num", "data-field": "errors"},
                 w && w.error_ratio !== null ? num(w.error_ratio * 100, 1) + " %" : "\u2013");
    if (w && w.errors > 0) err.className += " bad";
    tr.appendChild(err);
    tr.appendChild(el("td", {"class": "num", "data-field": "p50"}, w ? ms(w.latency_p50_ms) : "\u2013"));
    tr.appendChild(el("td", {"class": "num", "data-field": "p95"}, w ? ms(w.latency_p95_ms) : "\u2013"));
    tr.appendChild(el("td", {"class": "num", "data-field": "rss"}, bytes(app.rss_bytes)));
    return tr;
  }

  function render(data) {
    var rows = document.createDocumentFragment();
    data.apps.forEach(function (app) { rows.appendChild(row(app)); });
    tbody.replaceChildren(rows);

    var s = data.supervisor;
    summary.replaceChildren();
    if (s) {
      var parts = [["supervisor", (s.running ? "running" : "not running") + " (pid " + s.pid + ")"],
                   ["uptime", duration(s.uptime_s)],
                   ["listening on", (s.listen || []).join(", ")],
                   ["nginx", s.nginx ? s.nginx.state : "?"],
                   ["reloads", s.reloads ? s.reloads.ok + " ok, " + s.reloads.failed + " failed" : "0"]];
      parts.forEach(function (p, i) {
        if (i) summary.appendChild(document.createTextNode(" \u00b7 "));
        summary.appendChild(document.createTextNode(p[0] + " "));
        summary.appendChild(el("b", {}, p[1]));
      });
    } else {
      summary.textContent = "no supervisor state";
    }

    var problems = [];
    if (data.state_error) problems.push(data.state_error);
    if (!data.metrics.ok && data.metrics.error) problems.push("No rates: " + data.metrics.error);
    banner.hidden = problems.length === 0;
    banner.textContent = problems.join(" \u2014 ");

    var m = data.metrics;
    windowNote.textContent = !m.ok ? "" : m.window_seconds > 0
      ? "Rates, 5xx share and latency percentiles over the last " + duration(m.window_seconds)
        + " (window " + duration(m.window_target_seconds) + "), from the counters and histogram buckets of /metrics."
      : "Collecting a second sample for rates\u2026";
    updated.textContent = "Updated " + new Date(data.generated_at * 1000).toLocaleTimeString();
  }

  function refresh() {
    fetch("api/status", {cache: "no-store", headers: {"Accept": "application/json"}})
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(render)
      .catch(function (e) {
        banner.hidden = false;
        banner.textContent = "Cannot reach the status API (" + e.message + "); retrying.";
      })
      .then(function () { setTimeout(refresh, REFRESH_MS); });
  }
  refresh();
})();
