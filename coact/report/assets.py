"""The report's own script and style sheet (kept as strings so the package needs no data
files) and the vega bundle, all written into the site: nothing is fetched from a network."""

from __future__ import annotations

from functools import lru_cache

import vl_convert

SCRIPT = r"""
/* coact report: draws each chart from its inline vega-lite spec with the local vega
   bundle (no network), keeping the static image when that fails, and makes tables with
   a data-sortable attribute sortable by clicking a column header. */
(function () {
  "use strict";

  function drawCharts(root) {
    root.querySelectorAll("figure.coact-chart").forEach(function (figure) {
      if (figure.getAttribute("data-drawn") || typeof window.vegaEmbed !== "function") return;
      var source = figure.querySelector("script.coact-spec");
      var view = figure.querySelector(".coact-view");
      if (!source || !view) return;
      var spec;
      try {
        spec = JSON.parse(source.textContent);
      } catch (error) {
        return;
      }
      figure.setAttribute("data-drawn", "pending");
      window
        .vegaEmbed(view, spec, { mode: "vega-lite", actions: false, renderer: "svg" })
        .then(function () {
          var fallback = figure.querySelector("img.coact-fallback");
          if (fallback) fallback.remove();
          figure.setAttribute("data-drawn", "yes");
        })
        .catch(function (error) {
          figure.setAttribute("data-drawn", "failed");
          if (window.console) window.console.warn("coact chart", error);
        });
    });
  }

  function cellValue(row, index) {
    var cell = row.children[index];
    if (!cell) return "";
    var raw = cell.getAttribute("data-sort");
    return raw !== null ? raw : cell.textContent.trim();
  }

  function sortBy(table, index, header) {
    var body = table.tBodies[0];
    if (!body) return;
    var ascending = header.getAttribute("data-order") !== "ascending";
    table.querySelectorAll("th").forEach(function (th) {
      th.removeAttribute("data-order");
    });
    header.setAttribute("data-order", ascending ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, index);
      var y = cellValue(b, index);
      var nx = parseFloat(x);
      var ny = parseFloat(y);
      var order;
      if (!isNaN(nx) && !isNaN(ny) && isFinite(x) && isFinite(y)) order = nx - ny;
      else order = x.localeCompare(y);
      return ascending ? order : -order;
    });
    rows.forEach(function (row) {
      body.appendChild(row);
    });
  }

  function sortableTables(root) {
    root.querySelectorAll("table[data-sortable]").forEach(function (table) {
      if (table.getAttribute("data-ready")) return;
      table.setAttribute("data-ready", "yes");
      table.querySelectorAll("thead th").forEach(function (header, index) {
        header.style.cursor = "pointer";
        header.title = "sort by this column";
        header.addEventListener("click", function () {
          sortBy(table, index, header);
        });
      });
    });
  }

  function ready() {
    drawCharts(document);
    sortableTables(document);
  }

  if (window.document$ && typeof window.document$.subscribe === "function") {
    window.document$.subscribe(ready);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", ready);
  } else {
    ready();
  }
})();
"""

STYLE = r"""
/* coact report: charts, coloured token contexts and sortable tables. */
figure.coact-chart { margin: 1em 0 1.5em; max-width: 100%; overflow-x: auto; }
figure.coact-chart img.coact-fallback { max-width: 100%; height: auto; }
figure.coact-chart figcaption { font-style: italic; max-width: none; }
.coact-context { font-family: var(--md-code-font-family, monospace); white-space: pre-wrap; }
.coact-tok { border-radius: 2px; }
.coact-tok.coact-max { outline: 2px solid #d62728; font-weight: bold; }
table[data-sortable] th[data-order="ascending"]::after { content: " ▲"; }
table[data-sortable] th[data-order="descending"]::after { content: " ▼"; }
.coact-note { color: var(--md-default-fg-color--light, #666); }
"""


@lru_cache(maxsize=1)
def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed in one script that sets `window.vegaEmbed` (built
    offline by vl-convert, about 0.9 MB)."""
    snippet = "window.vegaEmbed = vegaEmbed; window.vegaLite = vegaLite; window.vega = vega;"
    return str(vl_convert.javascript_bundle(snippet))
