// The explanation page: sends an image to POST /explain and draws the answer. No framework, no build.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // {blob, name}: the image being explained
let shown = null; // the image whose answer is on the page

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function explain() {
  if (!current) return;
  const params = new URLSearchParams({ top_k: "10", method: $("method").value });
  if ($("target").value !== "") params.set("target", $("target").value);
  setStatus(`Explaining ${current.name}…`);
  let answer;
  try {
    const response = await fetch(`/explain?${params}`, {
      method: "POST",
      headers: { "Content-Type": current.blob.type || "application/octet-stream" },
      body: current.blob,
    });
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  } catch (e) {
    setStatus(`Could not explain ${current.name}: ${e.message}`, true);
    // Another image's answer left under this error would read as this image's answer.
    if (shown !== current) $("result").hidden = true;
    return;
  }
  await draw(answer.results[0]);
  shown = current;
  setStatus(`${current.name}: ${answer.results[0].predictions[0].label} (model ${answer.model} v${answer.model_version})`);
}

async function choose(blob, name) {
  current = { blob, name };
  $("target").value = "";
  await explain();
  if (!$("result").hidden) $("answer-title").focus(); // a new answer: take keyboard and screen-reader users there
}

// ---- the input as the model sees it: centre-cropped square, 32x32 -------------------------------
async function drawInput(blob) {
  const bitmap = await createImageBitmap(blob);
  const side = Math.min(bitmap.width, bitmap.height);
  const small = document.createElement("canvas");
  small.width = small.height = 32;
  const s = small.getContext("2d");
  s.drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side, 0, 0, 32, 32);
  for (const id of ["plain-view", "input-view"]) {
    const big = $(id).getContext("2d");
    big.imageSmoothingEnabled = false;
    big.clearRect(0, 0, 256, 256);
    big.drawImage(small, 0, 0, 256, 256);
  }
}

function drawHeat(attribution) {
  const { height, width, values } = attribution;
  const flat = values.flat();
  const peak = Math.max(1e-9, ...flat.map(Math.abs));
  const small = document.createElement("canvas");
  small.width = width;
  small.height = height;
  const ctx = small.getContext("2d");
  const img = ctx.createImageData(width, height);
  flat.forEach((v, i) => {
    const a = Math.min(1, Math.abs(v) / peak);
    img.data.set(v >= 0 ? [220, 30, 30, 255 * a] : [30, 80, 230, 255 * a], i * 4);
  });
  ctx.putImageData(img, 0, 0);
  const heat = $("heat-view").getContext("2d");
  heat.imageSmoothingEnabled = true;
  heat.clearRect(0, 0, 256, 256);
  heat.drawImage(small, 0, 0, 256, 256);
  $("heat-view").setAttribute(
    "aria-label",
    `Attribution heat map (${attribution.method}) for ${attribution.label}, over the enlarged input`,
  );
  $("heat-caption").textContent = `${attribution.method}, class “${attribution.label}”, peak ${peak.toExponential(1)}`;
}

// ---- answer -----------------------------------------------------------------------------------------
function drawBars(predictions) {
  const list = $("bars");
  list.replaceChildren(
    ...predictions.slice(0, 5).map((p) => {
      const li = document.createElement("li");
      const pct = (100 * p.probability).toFixed(1);
      li.innerHTML = `<span></span><span class="track" role="img"><span class="fill"></span></span><span class="pct"></span>`;
      li.children[0].textContent = p.label;
      li.children[1].setAttribute("aria-label", `${p.label}: ${pct} percent`);
      li.children[1].firstChild.style.width = `${pct}%`;
      li.children[2].textContent = `${pct}%`;
      return li;
    }),
  );
}

function fillTargets(predictions) {
  const select = $("target");
  const keep = select.value;
  const byIndex = [...predictions].sort((a, b) => a.index - b.index);
  select.replaceChildren(new Option("the top one", ""), ...byIndex.map((p) => new Option(p.label, String(p.index))));
  select.value = keep;
}

function drawScores(predictions, logits) {
  const top = predictions[0].index;
  const byIndex = [...predictions].sort((a, b) => a.index - b.index);
  $("scores").tBodies[0].replaceChildren(
    ...byIndex.map((p) => {
      const tr = document.createElement("tr");
      if (p.index === top) tr.className = "top";
      for (const text of [p.label, logits ? logits[p.index].toFixed(2) : "–", (100 * p.probability).toFixed(2) + "%"]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.append(td);
      }
      return tr;
    }),
  );
}

// ---- layers ------------------------------------------------------------------------------------------
function mapGrid(pngs, altFor, extraClass = "") {
  const grid = document.createElement("div");
  grid.className = `maps ${extraClass}`;
  pngs.forEach((png, i) => {
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${png}`;
    img.alt = altFor(i);
    img.title = img.alt;
    grid.append(img);
  });
  return grid;
}

function unitsCanvas(values, name) {
  const cols = 32;
  const rows = Math.ceil(values.length / cols);
  const canvas = document.createElement("canvas");
  canvas.width = cols;
  canvas.height = rows;
  canvas.className = "units";
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(cols, rows);
  const peak = Math.max(1e-9, ...values);
  values.forEach((v, i) => {
    const g = Math.round(255 * Math.max(0, v) / peak);
    img.data.set([g, g, g, 255], i * 4);
  });
  ctx.putImageData(img, 0, 0);
  const active = values.filter((v) => v > 0).length;
  canvas.setAttribute("role", "img");
  canvas.setAttribute(
    "aria-label",
    `${name}: ${values.length} units as a ${cols}x${rows} grid, ${active} active (brighter is stronger), strongest ${peak.toFixed(2)}`,
  );
  return [canvas, active, peak];
}

function drawLayers(layers) {
  const box = $("layers");
  box.replaceChildren();
  if (!layers.length) {
    box.textContent = "This model version has no layers.onnx, so its layers cannot be shown.";
    return;
  }
  for (const layer of layers) {
    if (layer.name === "fc4") continue; // shown as the class scores below
    const section = document.createElement("section");
    section.className = "layer";
    section.id = `layer-${layer.name}`;
    const h = document.createElement("h3");
    h.innerHTML = `<span></span> <code></code>`;
    h.children[0].textContent = layer.name;
    h.children[1].textContent = `[${layer.shape.join("×")}]`;
    const p = document.createElement("p");
    p.textContent = layer.description;
    section.append(h, p);
    if (layer.filters) {
      const t = document.createElement("h4");
      t.textContent = "Its 32 filters (3×3 RGB; grey is zero, colours show which input colours each filter weighs up or down)";
      section.append(t, mapGrid(layer.filters, (i) => `conv1 filter ${i}: 3x3 RGB weights`, "filters"));
      const m = document.createElement("h4");
      m.textContent = "Its 32 feature maps for this image (white: the channel's strongest response)";
      section.append(m);
    }
    if (layer.maps) {
      section.append(
        mapGrid(layer.maps, (i) => `${layer.name} channel ${i} feature map, strongest response ${layer.maxima[i].toFixed(2)}`),
      );
    } else if (layer.values) {
      const [canvas, active, peak] = unitsCanvas(layer.values, layer.name);
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = `${active} of ${layer.values.length} units active; the strongest is ${peak.toFixed(2)}.`;
      section.append(canvas, note);
    }
    box.append(section);
  }
}

async function draw(result) {
  $("result").hidden = false;
  await drawInput(current.blob);
  drawHeat(result.attribution);
  drawBars(result.predictions);
  fillTargets(result.predictions);
  $("top-label").textContent = result.predictions[0].label;
  $("explained").textContent = result.attribution.label;
  drawLayers(result.layers);
  const fc4 = result.layers.find((l) => l.name === "fc4");
  drawScores(result.predictions, fc4 && fc4.values);
}

// ---- inputs ------------------------------------------------------------------------------------------
async function loadSamples() {
  let doc;
  try {
    doc = await (await fetch("/samples")).json();
  } catch {
    return;
  }
  if (!doc.samples || !doc.samples.length) return;
  $("samples").replaceChildren(
    ...doc.samples.map((s) => {
      const button = document.createElement("button");
      button.type = "button";
      button.innerHTML = `<img alt=""><span></span>`;
      button.firstChild.src = s.url;
      button.firstChild.alt = `Sample image of a ${s.label}`;
      button.lastChild.textContent = s.label;
      button.addEventListener("click", async () => {
        const blob = await (await fetch(s.url)).blob();
        choose(blob, `the ${s.label} sample`);
      });
      return button;
    }),
  );
  $("samples-source").textContent = `Samples: ${doc.source}.`;
  $("samples-box").hidden = false;
}

function init() {
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) choose(file, file.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) choose(file, file.name);
  });
  $("method").addEventListener("change", explain);
  $("target").addEventListener("change", explain);
  $("opacity").addEventListener("input", (e) => ($("heat-view").style.opacity = e.target.value / 100));
  $("heat-view").style.opacity = 0.6;
  loadSamples();
}

init();
