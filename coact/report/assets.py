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
/* coact report: charts, token contexts as full-width lines, tables that scroll in their
   own box, small charts beside a formula, input cards and the feature browser. */
.md-grid { max-width: 80rem; }  /* wide windows: room for contexts and the feature list */
figure.coact-chart { margin: 1em 0 1.5em; max-width: 100%; overflow-x: auto; }
figure.coact-chart img.coact-fallback { max-width: 100%; height: auto; }
figure.coact-chart figcaption { font-style: italic; max-width: none; }
.coact-context { font-family: var(--md-code-font-family, monospace); white-space: pre-wrap;
  overflow-wrap: anywhere; flex: 1 1 auto; min-width: 0; font-size: .9em; }
.coact-tok { border-radius: 2px; }
.coact-tok.coact-max { outline: 2px solid #d62728; font-weight: bold; }
.coact-contexts { margin: .4em 0 1em; }
.coact-line { display: flex; gap: .7em; align-items: baseline; padding: .15em 0;
  border-bottom: 1px solid var(--md-default-fg-color--lightest, #eee); }
.coact-meta { flex: 0 0 5.5em; font-size: .75em; color: var(--md-default-fg-color--light, #666);
  white-space: nowrap; }
.coact-rank { display: inline-block; width: 1.6em; }
.coact-scroll { max-width: 100%; max-height: 36em; overflow: auto; margin: 1em 0; }
.coact-scroll > table { margin: 0; }
.md-typeset .coact-scroll table th { position: sticky; top: 0; z-index: 1;
  background: var(--md-default-bg-color, #fff); }
.coact-beside { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.coact-beside-text { flex: 1 1 18em; min-width: 0; }
.coact-beside-text pre { white-space: pre-wrap; overflow-wrap: anywhere; margin-top: 0; }
.coact-beside-charts { display: flex; flex-wrap: wrap; gap: .5em; flex: 0 1 22em; }
.coact-beside-charts figure.coact-chart { margin: 0; max-width: 22em; }
.coact-beside-charts figure.coact-chart figcaption { font-size: .6rem; text-align: left; }
.coact-cards { display: flex; flex-direction: column; gap: .6em; margin: .5em 0 1.2em; }
.coact-card { border: 1px solid var(--md-default-fg-color--lightest, #ddd); border-radius: 4px;
  padding: .4em .7em; }
.coact-card .coact-contexts { margin: .2em 0 0; }
table[data-sortable] th[data-order="ascending"]::after { content: " ▲"; }
table[data-sortable] th[data-order="descending"]::after { content: " ▼"; }
.coact-note { color: var(--md-default-fg-color--light, #666); }
.coact-controls { display: flex; flex-wrap: wrap; gap: .5em; align-items: center;
  margin: .5em 0; font-size: .75rem; }
.coact-controls input[type=search] { flex: 1 1 16em; padding: .3em .5em; }
.coact-controls select, .coact-controls input { font: inherit; }
.md-typeset table.coact-list { font-size: .7rem; display: table; width: 100%; }
.md-typeset table.coact-list td, .md-typeset table.coact-list th { padding: .25em .6em;
  white-space: nowrap; vertical-align: middle; }
.md-typeset table.coact-list td.coact-cut { max-width: 22em; overflow: hidden;
  text-overflow: ellipsis; }
.md-typeset table.coact-list tbody tr { cursor: pointer; }
.md-typeset table.coact-list tbody tr:hover,
.md-typeset table.coact-list tbody tr.coact-open { background: rgba(255, 127, 14, .12); }
.coact-detail { border: 2px solid #ff7f0e; border-radius: 4px; padding: .5em 1em;
  margin: .5em 0 1em; }
.coact-detail pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: .3em 0; }
.coact-detail h3 { margin: .2em 0 .4em; }
"""


@lru_cache(maxsize=1)
def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed in one script that sets `window.vegaEmbed` (built
    offline by vl-convert, about 0.9 MB)."""
    snippet = "window.vegaEmbed = vegaEmbed; window.vegaLite = vegaLite; window.vega = vega;"
    return str(vl_convert.javascript_bundle(snippet))
