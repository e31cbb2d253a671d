"""The attention viewer's page: its markup, style and script, all inline.

The page fetches nothing: the weights travel in a JSON block (float32 as base64, so
the numbers shown are exactly the model's), the image as a PNG data URL. Everything
the script touches lives under one root element with a fresh id, so several viewers
can share a Jupyter notebook.

The elements a reader (or a test) can rely on, all inside ``.ka-viewer``:
``select.ka-layer``, ``select.ka-head``; ``.ka-token`` (text tokens and extra tokens
such as [CLS]) and ``.ka-patch`` (image patches), each with ``data-side`` ("query",
"key" or "both") and ``data-index``; after a hover, every key shown carries
``data-weight``, the exact weight as text; lines of the text view are ``line``
elements with ``data-q``, ``data-k`` and ``stroke-opacity``; the root carries
``data-layer``, ``data-head`` and ``data-focus``.
"""

STYLE = """
.ka-viewer { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
  background: #fff; padding: 8px; }
.ka-viewer .ka-controls { display: flex; gap: 16px; align-items: center; margin-bottom: 8px;
  flex-wrap: wrap; }
.ka-viewer select { font: inherit; }
.ka-viewer .ka-hint { color: #777; }
.ka-viewer .ka-readout { min-height: 1.4em; margin-top: 8px; color: #333;
  font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; }
.ka-viewer .ka-text { display: flex; align-items: flex-start; }
.ka-viewer .ka-column { display: flex; flex-direction: column; }
.ka-viewer .ka-queries { align-items: flex-end; }
.ka-viewer .ka-token { height: 20px; line-height: 20px; padding: 0 4px; cursor: default;
  white-space: pre; font-family: ui-monospace, Menlo, Consolas, monospace;
  border-radius: 3px; }
.ka-viewer .ka-token .ka-weight { color: #555; font-size: 11px; margin-left: 6px; }
.ka-viewer .ka-queries .ka-token .ka-weight { margin: 0 6px 0 0; }
.ka-viewer .ka-focus { outline: 2px solid #222; }
.ka-viewer .ka-lines { flex: none; }
.ka-viewer .ka-extras { display: flex; gap: 6px; margin-bottom: 6px; flex-wrap: wrap; }
.ka-viewer .ka-extras .ka-token { border: 1px solid #bbb; }
.ka-viewer .ka-image { display: grid; background-size: 100% 100%; background-color: #ddd;
  image-rendering: pixelated; position: relative; }
.ka-viewer .ka-patch { box-shadow: inset 0 0 0 0.5px rgba(255, 255, 255, 0.35); }
.ka-viewer .ka-patch.ka-focus { outline: 2px solid #fff; box-shadow: 0 0 0 3px #222;
  z-index: 1; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  var root = document.getElementById("__ROOT_ID__");
  var spec = JSON.parse(root.querySelector("script.ka-data").textContent);
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  var ROW = 20, LINES_WIDTH = 180, LINE_BUDGET = 20000, MIN_LINE = 0.005, TOP = 5;
  var tq = spec.queryLength, tk = spec.keyLength;
  var layers = spec.layers.map(function (l) {
    return { name: l.name, heads: l.heads, weights: decode(l.data) };
  });
  var state = { layer: 0, head: 0, focus: null }, restTimer = null;
  var layerSelect = root.querySelector("select.ka-layer");
  var headSelect = root.querySelector("select.ka-head");
  var stage = root.querySelector(".ka-stage");
  var readout = root.querySelector(".ka-readout");

  function decode(b64) {
    var text = atob(b64), bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }
  function weights(query) {  // the weights of one query over every key, this layer and head
    var start = (state.head * tq + query) * tk;
    return layers[state.layer].weights.subarray(start, start + tk);
  }
  function column(key) {  // the weights every query gives one key
    var out = new Float32Array(tq);
    for (var q = 0; q < tq; q++) out[q] = weights(q)[key];
    return out;
  }
  function received() {  // mean weight each key receives over the queries
    var out = new Float32Array(tk);
    for (var q = 0; q < tq; q++) {
      var w = weights(q);
      for (var k = 0; k < tk; k++) out[k] += w[k] / tq;
    }
    return out;
  }
  function largest(values) {
    var m = 0;
    for (var i = 0; i < values.length; i++) if (values[i] > m) m = values[i];
    return m || 1;
  }
  function tint(alpha) {
    var hex = COLORS[state.head % COLORS.length];
    var rgb = [1, 3, 5].map(function (i) { return parseInt(hex.slice(i, i + 2), 16); });
    return "rgba(" + rgb.join(",") + "," + Math.max(0, Math.min(1, alpha)).toFixed(3) + ")";
  }
  function element(tag, className, parent) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (parent) parent.appendChild(node);
    return node;
  }
  function svgElement(tag, attributes, parent) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attributes).forEach(function (k) { node.setAttribute(k, attributes[k]); });
    parent.appendChild(node);
    return node;
  }
  function hoverable(node, side, index) {
    node.setAttribute("data-side", side);
    node.setAttribute("data-index", index);
    node.addEventListener("mouseenter", function () {
      clearTimeout(restTimer);
      state.focus = { side: side === "key" ? "key" : "query", index: index };
      draw();
    });
    node.addEventListener("mouseleave", function () {
      // Moving on to the next token should not draw the (busier) resting view between.
      restTimer = setTimeout(function () { state.focus = null; draw(); }, 50);
    });
  }
  function token(parent, side, index, label) {
    var node = element("div", "ka-token", parent);
    var text = element("span", "ka-label");
    var value = element("span", "ka-weight");
    text.textContent = label;
    if (side === "query") { node.appendChild(value); node.appendChild(text); }
    else { node.appendChild(text); node.appendChild(value); }
    hoverable(node, side, index);
    return node;
  }
  function mark(node, weight, scale) {  // show one weight on a token or a patch
    node.setAttribute("data-weight", String(weight));
    node.style.backgroundColor = tint(0.75 * weight / scale);
    node.title = node.getAttribute("data-label") + ": " + weight.toFixed(4);
    var value = node.querySelector(".ka-weight");
    if (value) value.textContent = weight.toFixed(3);
  }
  function unmark(node) {
    node.removeAttribute("data-weight");
    node.classList.remove("ka-focus");
    node.style.backgroundColor = "";
    node.title = node.getAttribute("data-label");
    var value = node.querySelector(".ka-weight");
    if (value) value.textContent = "";
  }
  function describe(focus, values, labels) {
    var order = Array.prototype.slice.call(values).map(function (w, i) { return [w, i]; });
    order.sort(function (a, b) { return b[0] - a[0]; });
    var top = order.slice(0, TOP).map(function (p) {
      return JSON.stringify(labels[p[1]]) + " " + p[0].toFixed(3);
    });
    var who = focus.side === "key" ? spec.keyTokens[focus.index] : spec.queryTokens[focus.index];
    var verb = focus.side === "key" ? " is attended by: " : " attends to: ";
    return JSON.stringify(who) + " (" + focus.index + ")" + verb + top.join(", ");
  }

  function textView() {
    var box = element("div", "ka-text", stage);
    var queryColumn = element("div", "ka-column ka-queries", box);
    var height = Math.max(tq, tk) * ROW;
    var svg = svgElement("svg", { "class": "ka-lines", width: LINES_WIDTH, height: height }, box);
    var keyColumn = element("div", "ka-column ka-keys", box);
    var queries = spec.queryTokens.map(function (t, i) { return token(queryColumn, "query", i, t); });
    var keys = spec.keyTokens.map(function (t, i) { return token(keyColumn, "key", i, t); });
    queries.forEach(function (n, i) { n.setAttribute("data-label", spec.queryTokens[i]); unmark(n); });
    keys.forEach(function (n, i) { n.setAttribute("data-label", spec.keyTokens[i]); unmark(n); });
    function line(q, k, w) {
      svgElement("line", {
        x1: 0, y1: q * ROW + ROW / 2, x2: LINES_WIDTH, y2: k * ROW + ROW / 2,
        stroke: COLORS[state.head % COLORS.length], "stroke-width": 2,
        "stroke-opacity": String(w), "data-q": q, "data-k": k
      }, svg);
    }
    return function () {
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      queries.forEach(unmark);
      keys.forEach(unmark);
      var f = state.focus, values, k, q;
      if (!f) {  // at rest: each query's strongest lines, within a budget for long inputs
        var perQuery = Math.max(1, Math.floor(LINE_BUDGET / tq));
        for (q = 0; q < tq; q++) {
          var kept = [];
          values = weights(q);
          for (k = 0; k < tk; k++) if (values[k] >= MIN_LINE) kept.push(k);
          kept.sort(function (a, b) { return values[b] - values[a]; });
          kept.slice(0, perQuery).forEach(function (key) { line(q, key, values[key]); });
        }
        readout.textContent = "";
        return;
      }
      if (f.side === "query") {
        values = weights(f.index);
        var scale = largest(values);
        for (k = 0; k < tk; k++) { line(f.index, k, values[k]); mark(keys[k], values[k], scale); }
        queries[f.index].classList.add("ka-focus");
        readout.textContent = describe(f, values, spec.keyTokens);
      } else {
        values = column(f.index);
        var most = largest(values);
        for (q = 0; q < tq; q++) { line(q, f.index, values[q]); mark(queries[q], values[q], most); }
        keys[f.index].classList.add("ka-focus");
        readout.textContent = describe(f, values, spec.queryTokens);
      }
    };
  }

  function imageView() {
    var image = spec.image, patches = image.rows * image.cols, extra = tk - patches;
    var view = element("div", "ka-image-view", stage);
    var extras = element("div", "ka-extras", view);
    var grid = element("div", "ka-image", view);
    grid.style.width = image.width + "px";
    grid.style.height = image.height + "px";
    grid.style.gridTemplateColumns = "repeat(" + image.cols + ", 1fr)";
    grid.style.gridTemplateRows = "repeat(" + image.rows + ", 1fr)";
    if (image.src) grid.style.backgroundImage = "url(" + image.src + ")";
    var cells = [];
    for (var i = 0; i < tk; i++) {
      var cell = i < extra ? token(extras, "both", i, spec.keyTokens[i]) : element("div", "ka-patch", grid);
      if (i >= extra) hoverable(cell, "both", i);
      cell.setAttribute("data-label", spec.keyTokens[i]);
      unmark(cell);
      cells.push(cell);
    }
    return function () {
      var f = state.focus;
      var values = f ? weights(f.index) : received();
      var scale = largest(values);
      cells.forEach(function (cell, k) {
        unmark(cell);
        if (f) mark(cell, values[k], scale);
        else cell.style.backgroundColor = tint(0.75 * values[k] / scale);
        cell.setAttribute("data-received", f ? "" : String(values[k]));
      });
      if (f) cells[f.index].classList.add("ka-focus");
      readout.textContent = f ? describe(f, values, spec.keyTokens) : "";
    };
  }

  function fillHeads() {
    var heads = layers[state.layer].heads;
    state.head = Math.min(state.head, heads - 1);
    headSelect.textContent = "";
    for (var h = 0; h < heads; h++) {
      var option = element("option", "", headSelect);
      option.value = h;
      option.textContent = "head " + h;
    }
    headSelect.value = state.head;
  }
  function draw() {
    root.setAttribute("data-layer", state.layer);
    root.setAttribute("data-head", state.head);
    root.setAttribute("data-focus", state.focus ? state.focus.side + " " + state.focus.index : "");
    redraw();
  }

  layers.forEach(function (l, i) {
    var option = element("option", "", layerSelect);
    option.value = i;
    option.textContent = l.name;
  });
  layerSelect.addEventListener("change", function () {
    state.layer = Number(layerSelect.value);
    fillHeads();
    draw();
  });
  headSelect.addEventListener("change", function () { state.head = Number(headSelect.value); draw(); });
  fillHeads();
  var redraw = spec.image ? imageView() : textView();
  draw();
})();
"""

TEMPLATE = """<div class="ka-viewer" id="{root_id}">
<style>{style}</style>
<div class="ka-controls">
<label>layer <select class="ka-layer"></select></label>
<label>head <select class="ka-head"></select></label>
<span class="ka-hint">{hint}</span>
</div>
<div class="ka-stage"></div>
<div class="ka-readout"></div>
<script type="application/json" class="ka-data">{data}</script>
<script>{script}</script>
</div>"""

DOCUMENT = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
</head>
<body>
{fragment}
</body>
</html>
"""
