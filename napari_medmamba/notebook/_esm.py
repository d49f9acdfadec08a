"""The widget's front-end: an anywidget ES module drawing slices on 2D canvases (no WebGL).

Kept as a Python string so it ships inside the wheel without package-data changes.
Protocol (see ``_widget.py``): Python sends one slice per plane as bytes
(``img_0..2`` float32, ``lab_0..2`` uint16/uint32, row-major in display orientation);
the browser sends ``{"type": "paint", "kind", "value", "plane"}`` with one buffer of
little-endian uint32 flat (z, y, x) indices on mouse-up, and ``{"type": "undo"|"redo"}``.
"""

ESM = r"""
const PLANE_TITLES = ["axial", "coronal", "sagittal"];

function toTyped(v, Ctor) {
  if (!v) return new Ctor(0);
  if (v instanceof DataView) return new Ctor(v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength));
  if (v instanceof ArrayBuffer) return new Ctor(v.slice(0));
  if (ArrayBuffer.isView(v)) return new Ctor(v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength));
  return new Ctor(0);
}

function hexToRgb(h) {
  const s = (h || "#ffff00").replace("#", "");
  return [parseInt(s.slice(0, 2), 16), parseInt(s.slice(2, 4), 16), parseInt(s.slice(4, 6), 16)];
}

function el(tag, attrs, parent) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "style") e.style.cssText = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  if (parent) parent.appendChild(e);
  return e;
}

function render({ model, el: root }) {
  const wrap = el("div", { class: "mm-viewer", style: "font: 12px sans-serif; color: #222; background: #fff; padding: 4px;" }, root);
  // ---- toolbar ----------------------------------------------------------------------
  const bar = el("div", { style: "display:flex; flex-wrap:wrap; gap:8px; align-items:center; margin-bottom:4px;" }, wrap);
  const presetSel = el("select", { class: "mm-preset", title: "window/level preset" }, el("label", { text: "W/L " }, bar));
  const centerIn = el("input", { type: "number", class: "mm-center", style: "width:70px", title: "level (centre)" }, el("label", { text: "L " }, bar));
  const widthIn = el("input", { type: "number", class: "mm-width", style: "width:70px", title: "window (width)", min: "1" }, el("label", { text: "W " }, bar));
  const opacityIn = el("input", { type: "range", class: "mm-opacity", min: "0", max: "1", step: "0.05", style: "width:70px" }, el("label", { text: "overlay " }, bar));
  const toolSel = el("select", { class: "mm-tool" }, el("label", { text: "tool " }, bar));
  for (const t of ["navigate", "brush", "eraser"]) el("option", { value: t, text: t }, toolSel);
  const labelSel = el("select", { class: "mm-label" }, el("label", { text: "label " }, bar));
  const radiusIn = el("input", { type: "range", class: "mm-radius", min: "0", max: "20", step: "1", style: "width:70px" }, el("label", { text: "radius " }, bar));
  const undoBtn = el("button", { class: "mm-undo", text: "undo" }, bar);
  const redoBtn = el("button", { class: "mm-redo", text: "redo" }, bar);
  // ---- planes -----------------------------------------------------------------------
  const row = el("div", { style: "display:flex; gap:6px; align-items:flex-start;" }, wrap);
  const planes = [0, 1, 2].map((p) => {
    const box = el("div", { style: "display:flex; flex-direction:column; align-items:center;" }, row);
    const title = el("div", { text: PLANE_TITLES[p] }, box);
    const canvas = el("canvas", { class: "mm-canvas mm-canvas-" + p, "data-plane": String(p), style: "background:#000; cursor:crosshair; image-rendering:pixelated; touch-action:none;" }, box);
    const slider = el("input", { type: "range", class: "mm-slider mm-slider-" + p, min: "0", step: "1", style: "width:100%" }, box);
    const off = document.createElement("canvas");
    return { p, box, title, canvas, slider, off, img: new Float32Array(0), lab: new Uint32Array(0), rows: 0, cols: 0 };
  });
  const legend = el("div", { class: "mm-legend", style: "display:flex; flex-wrap:wrap; gap:10px; margin-top:4px;" }, wrap);
  const readout = el("div", { class: "mm-readout", style: "margin-top:4px; font-family:monospace; min-height:1.2em;" }, wrap);
  const status = el("div", { class: "mm-status", style: "color:#666;" }, wrap);

  let colorTable = new Map();
  function rebuildColors() {
    colorTable = new Map();
    const colors = model.get("label_colors") || {};
    for (const [k, v] of Object.entries(colors)) colorTable.set(Number(k), hexToRgb(v));
  }
  function labelColor(v) {
    if (colorTable.has(v)) return colorTable.get(v);
    // deterministic fallback palette
    return [(v * 97) % 256, (v * 57 + 80) % 256, (v * 151 + 160) % 256];
  }

  function geom(p) {
    const g = model.get("planes")[p];
    return g; // {normal, row_axis, col_axis, row_flip, col_flip, rows, cols, row_mm, col_mm}
  }

  function loadPlane(P) {
    const g = geom(P.p);
    P.rows = g.rows; P.cols = g.cols;
    P.img = toTyped(model.get("img_" + P.p), Float32Array);
    const LabCtor = model.get("label_dtype") === "uint32" ? Uint32Array : Uint16Array;
    P.lab = toTyped(model.get("lab_" + P.p), LabCtor);
  }

  function layout() {
    const shape = model.get("shape");
    const sp = model.get("spacing_zyx");
    const ext = Math.max(...shape.map((n, i) => n * sp[i]));
    const scale = model.get("display_size") / ext; // px per mm, shared by the three planes
    for (const P of planes) {
      const g = geom(P.p);
      const w = Math.max(1, Math.round(g.cols * g.col_mm * scale));
      const h = Math.max(1, Math.round(g.rows * g.row_mm * scale));
      P.canvas.width = w; P.canvas.height = h;
      P.canvas.style.width = w + "px"; P.canvas.style.height = h + "px";
      P.off.width = g.cols; P.off.height = g.rows;
      P.slider.max = String(shape[g.normal] - 1);
    }
  }

  function draw(P) {
    const g = geom(P.p);
    if (!P.rows || !P.cols) return;
    const c = model.get("window_center"), w = Math.max(1e-6, model.get("window_width"));
    const lo = c - w / 2, op = model.get("opacity");
    const octx = P.off.getContext("2d");
    const im = octx.createImageData(P.cols, P.rows);
    const d = im.data, n = P.rows * P.cols;
    for (let i = 0; i < n; i++) {
      let gray = ((P.img[i] - lo) / w) * 255;
      gray = gray < 0 ? 0 : gray > 255 ? 255 : gray;
      let r = gray, gg = gray, b = gray;
      const lv = P.lab[i];
      if (lv && op > 0) {
        const col = labelColor(lv);
        r = (1 - op) * r + op * col[0]; gg = (1 - op) * gg + op * col[1]; b = (1 - op) * b + op * col[2];
      }
      d[4 * i] = r; d[4 * i + 1] = gg; d[4 * i + 2] = b; d[4 * i + 3] = 255;
    }
    octx.putImageData(im, 0, 0);
    const ctx = P.canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(P.off, 0, 0, P.canvas.width, P.canvas.height);
    // crosshair: where the two other planes cut this one
    const pos = model.get("position");
    const sy = P.canvas.height / P.rows, sx = P.canvas.width / P.cols;
    const rIdx = pos[g.row_axis], cIdx = pos[g.col_axis];
    const rr = g.row_flip ? P.rows - 1 - rIdx : rIdx, cc = g.col_flip ? P.cols - 1 - cIdx : cIdx;
    ctx.strokeStyle = "rgba(0,255,255,0.35)"; ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(0, (rr + 0.5) * sy); ctx.lineTo(P.canvas.width, (rr + 0.5) * sy);
    ctx.moveTo((cc + 0.5) * sx, 0); ctx.lineTo((cc + 0.5) * sx, P.canvas.height);
    ctx.stroke();
    P.title.textContent = PLANE_TITLES[P.p] + " " + (pos[g.normal] + 1) + "/" + model.get("shape")[g.normal];
    P.slider.value = String(pos[g.normal]);
  }

  function drawAll() { for (const P of planes) draw(P); }

  function rebuildControls() {
    const presets = model.get("presets") || {};
    presetSel.innerHTML = "";
    el("option", { value: "", text: "custom" }, presetSel);
    for (const name of Object.keys(presets)) el("option", { value: name, text: name }, presetSel);
    presetSel.value = model.get("preset") || "";
    centerIn.value = String(+model.get("window_center").toPrecision(6));
    widthIn.value = String(+model.get("window_width").toPrecision(6));
    opacityIn.value = String(model.get("opacity"));
    toolSel.value = model.get("tool");
    radiusIn.value = String(model.get("brush_radius"));
    const names = model.get("label_names") || {};
    labelSel.innerHTML = "";
    legend.innerHTML = "";
    const values = Object.keys(names).map(Number).sort((a, b) => a - b);
    for (const v of values) {
      if (v === 0) continue;
      el("option", { value: String(v), text: v + ": " + names[v] }, labelSel);
      const item = el("span", { class: "mm-legend-item", style: "display:inline-flex; align-items:center; gap:4px;" }, legend);
      const [r, g, b] = labelColor(v);
      el("span", { style: `display:inline-block; width:12px; height:12px; border:1px solid #444; background:rgb(${r},${g},${b});` }, item);
      el("span", { text: v + " " + names[v] }, item);
    }
    labelSel.value = String(model.get("active_label"));
    undoBtn.disabled = !model.get("can_undo");
    redoBtn.disabled = !model.get("can_redo");
    status.textContent = "edits: " + model.get("edit_count");
  }

  function setAndSave(obj) {
    for (const [k, v] of Object.entries(obj)) model.set(k, v);
    model.save_changes();
  }

  // ---- events: controls ---------------------------------------------------------------
  presetSel.addEventListener("change", () => {
    const pr = (model.get("presets") || {})[presetSel.value];
    if (pr) setAndSave({ preset: presetSel.value, window_center: pr[0], window_width: pr[1] });
    else setAndSave({ preset: "" });
  });
  centerIn.addEventListener("change", () => setAndSave({ preset: "", window_center: Number(centerIn.value) }));
  widthIn.addEventListener("change", () => setAndSave({ preset: "", window_width: Math.max(1e-6, Number(widthIn.value)) }));
  opacityIn.addEventListener("input", () => setAndSave({ opacity: Number(opacityIn.value) }));
  toolSel.addEventListener("change", () => setAndSave({ tool: toolSel.value }));
  labelSel.addEventListener("change", () => setAndSave({ active_label: Number(labelSel.value) }));
  radiusIn.addEventListener("input", () => setAndSave({ brush_radius: Number(radiusIn.value) }));
  undoBtn.addEventListener("click", () => model.send({ type: "undo" }));
  redoBtn.addEventListener("click", () => model.send({ type: "redo" }));
  for (const P of planes) {
    P.slider.addEventListener("input", () => {
      const pos = model.get("position").slice();
      pos[geom(P.p).normal] = Number(P.slider.value);
      setAndSave({ position: pos });
    });
  }

  // ---- events: mouse on the canvases ----------------------------------------------------
  function pixelAt(P, ev) {
    const rect = P.canvas.getBoundingClientRect();
    const c = Math.floor(((ev.clientX - rect.left) / rect.width) * P.cols);
    const r = Math.floor(((ev.clientY - rect.top) / rect.height) * P.rows);
    if (r < 0 || c < 0 || r >= P.rows || c >= P.cols) return null;
    return [r, c];
  }
  function voxelOf(P, r, c) {
    const g = geom(P.p), pos = model.get("position");
    const idx = pos.slice();
    idx[g.row_axis] = g.row_flip ? P.rows - 1 - r : r;
    idx[g.col_axis] = g.col_flip ? P.cols - 1 - c : c;
    return idx; // (z, y, x)
  }
  function flatOf(idx) { const s = model.get("shape"); return (idx[0] * s[1] + idx[1]) * s[2] + idx[2]; }
  function physical(idx) {
    const m = model.get("index_to_lps"); // 4x4, (x, y, z, 1) indices -> LPS mm
    const v = [idx[2], idx[1], idx[0], 1];
    return [0, 1, 2].map((i) => m[i][0] * v[0] + m[i][1] * v[1] + m[i][2] * v[2] + m[i][3]);
  }
  function showReadout(P, rc) {
    if (!rc) { readout.textContent = ""; return; }
    const [r, c] = rc, i = r * P.cols + c;
    const idx = voxelOf(P, r, c), lps = physical(idx);
    const names = model.get("label_names") || {};
    const lv = P.lab[i];
    const val = P.img[i];
    readout.textContent = `LPS (${lps.map((x) => x.toFixed(1)).join(", ")}) mm  voxel z,y,x (${idx.join(", ")})  ` +
      `I=${Number.isInteger(val) ? val : val.toPrecision(5)}  label=${lv}${lv && names[lv] ? " (" + names[lv] + ")" : ""}`;
  }

  let stroke = null; // {P, value, kind, pending: Map(flat -> true), last: [r, c]}
  function stamp(P, r0, c0) {
    const R = model.get("brush_radius");
    for (let dr = -R; dr <= R; dr++) for (let dc = -R; dc <= R; dc++) {
      if (dr * dr + dc * dc > R * R + 0.25) continue;
      const r = r0 + dr, c = c0 + dc;
      if (r < 0 || c < 0 || r >= P.rows || c >= P.cols) continue;
      P.lab[r * P.cols + c] = stroke.value;
      stroke.pending.add(flatOf(voxelOf(P, r, c)));
    }
  }
  function strokeTo(P, rc) {
    const [r1, c1] = rc;
    const [r0, c0] = stroke.last || rc;
    const steps = Math.max(Math.abs(r1 - r0), Math.abs(c1 - c0), 1);
    for (let s = 0; s <= steps; s++) stamp(P, Math.round(r0 + ((r1 - r0) * s) / steps), Math.round(c0 + ((c1 - c0) * s) / steps));
    stroke.last = rc;
    draw(P);
  }
  function endStroke() {
    if (!stroke) return;
    const s = stroke; stroke = null;
    if (!s.pending.size) return;
    const idx = Uint32Array.from(s.pending);
    model.send({ type: "paint", kind: s.kind, value: s.value, plane: s.P.p, count: idx.length }, undefined, [idx.buffer]);
  }
  for (const P of planes) {
    P.canvas.addEventListener("pointerdown", (ev) => {
      const rc = pixelAt(P, ev); if (!rc) return;
      const tool = model.get("tool");
      if (tool === "navigate") {
        setAndSave({ position: voxelOf(P, rc[0], rc[1]) });
        return;
      }
      ev.preventDefault();
      try { P.canvas.setPointerCapture(ev.pointerId); } catch (e) { /* synthetic events */ }
      stroke = { P, kind: tool === "eraser" ? "erase" : "paint", value: tool === "eraser" ? 0 : model.get("active_label"), pending: new Set(), last: null };
      strokeTo(P, rc);
    });
    P.canvas.addEventListener("pointermove", (ev) => {
      const rc = pixelAt(P, ev);
      showReadout(P, rc);
      if (stroke && stroke.P === P && rc) strokeTo(P, rc);
    });
    P.canvas.addEventListener("pointerup", endStroke);
    P.canvas.addEventListener("pointerleave", () => { readout.textContent = ""; });
  }
  window.addEventListener("pointerup", endStroke);

  // ---- model changes -----------------------------------------------------------------
  for (const p of [0, 1, 2]) {
    model.on("change:img_" + p, () => { loadPlane(planes[p]); draw(planes[p]); });
    model.on("change:lab_" + p, () => { loadPlane(planes[p]); draw(planes[p]); });
  }
  model.on("change:position", drawAll);
  for (const k of ["window_center", "window_width", "opacity"]) model.on("change:" + k, () => { rebuildControls(); drawAll(); });
  model.on("change:label_colors", () => { rebuildColors(); rebuildControls(); drawAll(); });
  for (const k of ["label_names", "preset", "tool", "active_label", "brush_radius", "can_undo", "can_redo", "edit_count"]) model.on("change:" + k, rebuildControls);
  model.on("change:planes", () => { layout(); for (const P of planes) loadPlane(P); drawAll(); });

  rebuildColors();
  layout();
  for (const P of planes) loadPlane(P);
  rebuildControls();
  drawAll();
  wrap.setAttribute("data-ready", "1");
  return () => { window.removeEventListener("pointerup", endStroke); };
}

export default { render };
"""
