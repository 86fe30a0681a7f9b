"""The feature browser's script (part of the site's coact.js): builds the search box, the
filters and the one-line-per-feature list from `window.COACT_FEATURES`, and the panel a
row opens. Plain ES5, no library, nothing fetched."""

BROWSER_SCRIPT = r"""
/* coact feature browser: #coact-browser + window.COACT_FEATURES (assets/coact/features.js) */
(function () {
  "use strict";

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined || v === "") return "–";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return v.toLocaleString("en");
    var a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toPrecision(3);
  }

  function option(select, value, text) {
    var o = el("option", null, text);
    o.value = value;
    select.appendChild(o);
  }

  function chooser(label, values) {
    var select = el("select");
    select.setAttribute("aria-label", label);
    option(select, "", label + ": any");
    values.forEach(function (v) { option(select, v[0], v[1]); });
    return select;
  }

  function distinct(rows, index) {
    var seen = {};
    rows.forEach(function (r) { if (r[index] !== null && r[index] !== "") seen[r[index]] = 1; });
    return Object.keys(seen).sort();
  }

  function contextLine(D, ctx, rank) {
    var line = el("div", "coact-line");
    var meta = el("span", "coact-meta");
    meta.appendChild(el("span", "coact-rank", String(rank)));
    meta.appendChild(el("span", "coact-act", fmt(ctx[0])));
    line.appendChild(meta);
    var text = el("span", "coact-context");
    ctx[2].forEach(function (t, i) {
      var tok = el("span", "coact-tok", D.vocab[t].replace(/\n/g, "↵").replace(/\t/g, "⇥"));
      var share = ctx[3][i] / 100;
      tok.style.background = "rgba(255,127,14," + share.toFixed(2) + ")";
      tok.title = share ? "activation " + Math.round(ctx[3][i]) + "% of its maximum" : "inactive";
      if (i === ctx[1]) tok.className += " coact-max";
      text.appendChild(tok);
    });
    line.appendChild(text);
    return line;
  }

  function Browser(root, D) {
    var c = {};
    D.columns.forEach(function (name, i) { c[name] = i; });
    var prefix = root.getAttribute("data-pages") || "";
    var rows = D.rows;
    var hasJacobian = rows.some(function (r) { return r[c.jacobian] !== null; });
    var haystack = {};
    rows.forEach(function (r) {
      var j = r[c.feature];
      var inputs = (D.inputs[j] || []).map(function (t) {
        return "in " + t[0] + " " + (D.in_tokens[t[0]] || "");
      });
      haystack[j] = ["out " + j, r[c.label] || "", D.tokens[j] || "", inputs.join(" ")]
        .join(" ").toLowerCase();
    });

    var controls = el("div", "coact-controls");
    var search = el("input");
    search.type = "search";
    search.placeholder = "search: a number, a label, a token (e.g. AND, ','), its inputs' tokens";
    search.setAttribute("aria-label", "search features");
    var labels = chooser("label", distinct(rows, c.label).map(function (v) { return [v, v]; })
      .concat([["(none)", "no label"]]));
    var verdicts = chooser("verdict", distinct(rows, c.verdict).map(function (v) {
      return [v, v];
    }));
    var artefacts = chooser("artefact", [["yes", "flagged ⚠"], ["no", "not flagged"]]);
    var pages = chooser("page", [["yes", "with a page"], ["no", "without a page"]]);
    var count = el("span", "coact-note coact-count");
    [search, labels, verdicts, artefacts, pages, count].forEach(function (n) {
      controls.appendChild(n);
    });
    var detail = el("div", "coact-detail");
    detail.id = "coact-detail";
    detail.hidden = true;

    var headers = [
      ["feature", c.feature], ["verdict", c.verdict]
    ].concat(hasJacobian ? [["Jacobian", c.jacobian]] : []).concat([
      ["d (seed)", c.d_seed], ["d / var", c.d_fvu], ["active", c.active], ["NMSE", c.nmse],
      ["terms", c.terms], ["label", c.label], ["conf.", c.confidence], ["⚠", c.artefact],
      ["top tokens", -1], ["formula", -2]
    ]);
    var table = el("table", "coact-list");
    var head = el("thead");
    var headRow = el("tr");
    var sortIndex = c.feature, ascending = true;
    headers.forEach(function (h) {
      var th = el("th", null, h[0]);
      if (h[1] >= 0) {
        th.style.cursor = "pointer";
        th.title = "sort by " + h[0];
        th.addEventListener("click", function () {
          ascending = sortIndex === h[1] ? !ascending : true;
          sortIndex = h[1];
          headRow.querySelectorAll("th").forEach(function (t) { t.removeAttribute("data-order"); });
          th.setAttribute("data-order", ascending ? "ascending" : "descending");
          render();
        });
      }
      headRow.appendChild(th);
    });
    head.appendChild(headRow);
    table.appendChild(head);
    var body = el("tbody");
    table.appendChild(body);
    var box = el("div", "coact-scroll coact-list-box");
    box.style.maxHeight = "75vh";
    box.appendChild(table);
    root.appendChild(controls);
    root.appendChild(detail);
    root.appendChild(box);

    function keep(r) {
      var terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
      var j = r[c.feature];
      for (var t = 0; t < terms.length; t++) {
        var term = terms[t];
        if (/^#?\d+$/.test(term)) {
          var n = parseInt(term.replace("#", ""), 10);
          if (n !== j && haystack[j].indexOf("in " + n + " ") < 0) return false;
        } else if (haystack[j].indexOf(term) < 0) return false;
      }
      if (labels.value && (labels.value === "(none)" ? r[c.label] : r[c.label] !== labels.value))
        return false;
      if (verdicts.value && r[c.verdict] !== verdicts.value) return false;
      if (artefacts.value && (artefacts.value === "yes") !== Boolean(r[c.artefact])) return false;
      if (pages.value && (pages.value === "yes") !== Boolean(r[c.page])) return false;
      return true;
    }

    function compare(a, b) {
      var x = a[sortIndex], y = b[sortIndex];
      var missing = (x === null || x === "") - (y === null || y === "");
      if (missing) return missing;  // missing values last, either way
      var order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return (ascending ? order : -order) || a[c.feature] - b[c.feature];
    }

    function cell(tr, text, cls, title) {
      var td = el("td", cls, text);
      if (title) td.title = title;
      tr.appendChild(td);
      return td;
    }

    function row(r) {
      var j = r[c.feature];
      var tr = el("tr");
      tr.id = "out-" + j;
      tr.setAttribute("data-feature", j);
      var first = cell(tr, "");
      if (r[c.page]) {
        var a = el("a", null, "out " + j);
        a.href = prefix + "out-" + j + ".html";
        a.addEventListener("click", function (e) { e.stopPropagation(); });
        first.appendChild(a);
      } else first.textContent = "out " + j;
      headers.slice(1).forEach(function (h) {
        if (h[1] === c.artefact) cell(tr, r[c.artefact] ? "⚠" : "", null, r[c.artefact]);
        else if (h[1] === -1) cell(tr, D.tokens[j] || "–", "coact-cut", D.tokens[j]);
        else if (h[1] === -2) cell(tr, D.formula[j] || "–", "coact-cut", D.formula[j]);
        else cell(tr, fmt(r[h[1]]));
      });
      tr.addEventListener("click", function () { open(j); });
      return tr;
    }

    function render() {
      var shown = rows.filter(keep).sort(compare);
      var frag = document.createDocumentFragment();
      shown.forEach(function (r) { frag.appendChild(row(r)); });
      body.innerHTML = "";
      body.appendChild(frag);
      count.textContent = shown.length.toLocaleString("en") + " of " +
        rows.length.toLocaleString("en") + " features";
      root.setAttribute("data-shown", String(shown.length));
    }

    var byFeature = {};
    rows.forEach(function (r) { byFeature[r[c.feature]] = r; });

    function open(j) {
      var r = byFeature[j];
      if (!r) return;
      body.querySelectorAll("tr.coact-open").forEach(function (t) {
        t.classList.remove("coact-open");
      });
      var tr = document.getElementById("out-" + j);
      if (tr) tr.classList.add("coact-open");
      detail.innerHTML = "";
      detail.setAttribute("data-feature", j);
      var title = el("h3", null, "out " + j + (r[c.label] ? ": " + r[c.label] : ""));
      detail.appendChild(title);
      var where = el("p");
      if (r[c.page]) {
        var a = el("a", null, "open its page");
        a.href = prefix + "out-" + j + ".html";
        where.appendChild(a);
      } else {
        where.appendChild(document.createTextNode("No page of its own: "));
        where.appendChild(el("code", null, "coact report RUN --feature " + j));
        where.appendChild(document.createTextNode(" writes one."));
      }
      var close = el("button", null, "close");
      close.type = "button";
      close.style.float = "right";
      close.addEventListener("click", function () { detail.hidden = true; });
      detail.insertBefore(close, title);
      detail.appendChild(where);
      detail.appendChild(el("p", null, "verdict " + fmt(r[c.verdict]) +
        (hasJacobian ? " (Jacobian: " + fmt(r[c.jacobian]) + ")" : "") +
        " · d (seed form) " + fmt(r[c.d_seed]) + " · active on " + fmt(r[c.active]) +
        " tokens" + (r[c.label] ? " · label " + r[c.label] + " (confidence " +
        fmt(r[c.confidence]) + ")" : "") + (r[c.artefact] ? " · ⚠ " + r[c.artefact] : "")));
      detail.appendChild(el("pre", null, D.formula[j] || "out " + j + " = 0"));
      var inputs = D.inputs[j] || [];
      if (inputs.length) {
        detail.appendChild(el("strong", null, "Inputs (" + D.in_site + ")"));
        var list = el("ul");
        inputs.forEach(function (t) {
          list.appendChild(el("li", null, "in " + t[0] + ": weight " + fmt(t[1]) +
            " (standardised " + fmt(t[2]) + ") · top tokens " + (D.in_tokens[t[0]] || "–")));
        });
        detail.appendChild(list);
      }
      detail.appendChild(el("p", null, "Top tokens: " + (D.tokens[j] || "–")));
      var contexts = (D.contexts || {})[j] || [];
      if (contexts.length) {
        detail.appendChild(el("strong", null, "Top contexts (outlined: the activating token)"));
        var lines = el("div", "coact-contexts");
        contexts.forEach(function (ctx, k) { lines.appendChild(contextLine(D, ctx, k + 1)); });
        detail.appendChild(lines);
      }
      detail.hidden = false;
      detail.scrollIntoView({ block: "nearest" });
    }

    [search, labels, verdicts, artefacts, pages].forEach(function (n) {
      n.addEventListener(n === search ? "input" : "change", render);
    });
    render();
    var hash = /^#out-(\d+)$/.exec(window.location.hash);
    if (hash) open(parseInt(hash[1], 10));
  }

  function start() {
    var root = document.getElementById("coact-browser");
    if (!root || root.getAttribute("data-ready") || !window.COACT_FEATURES) return;
    root.setAttribute("data-ready", "yes");
    root.innerHTML = "";
    Browser(root, window.COACT_FEATURES);
  }

  if (window.document$ && typeof window.document$.subscribe === "function") {
    window.document$.subscribe(start);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
"""
