"use strict";
// The live monitor: plays a recording through WS /stream as a device would (frames of one hop, paced), and draws
// what comes back: the leads, each class's probability over time, the scale mixer's shares and the final
// prediction of every window. Plain browser JavaScript, no build step, nothing fetched from outside the server.

const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#393b79", "#637939"];
const ECG_SPAN_S = 10; // seconds of signal on the ECG canvas

// Everything the page knows; the browser test reads it too (window.monitor).
const state = {
  models: [], model: null, records: [], source: null, ws: null, config: null, streamModel: null,
  predictions: [], finals: [], errors: [], sentSamples: 0, playing: false, done: false,
};
window.monitor = state;

// --- the server ---------------------------------------------------------------------------------------------------
function apiKey() { return $("api-key").value; }
function authHeaders() { return apiKey() ? { Authorization: "Bearer " + apiKey() } : {}; }

async function getJSON(path) {
  const response = await fetch(path, { headers: authHeaders() });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const hint = response.status === 401 ? " (enter the server's API key above)" : "";
    throw new Error(`${path}: ${response.status} ${body.detail || response.statusText}${hint}`);
  }
  return body;
}

function showError(message) {
  state.errors.push(message);
  $("errors").textContent = message;
}

function setConnection(kind, text) {
  const badge = $("connection");
  badge.className = "badge " + kind;
  badge.dataset.state = kind;
  badge.textContent = text;
}

async function loadModels() {
  try {
    const data = await getJSON("/models");
    state.models = data.models;
    $("model-select").innerHTML = data.models.map((m) =>
      `<option value="${m.name}">${m.name}${m.name === data.default ? " (default)" : ""}</option>`).join("");
    // a reload (a new key) keeps the model chosen, if the server still holds it
    const keep = state.model && data.models.some((m) => m.name === state.model.name) ? state.model.name : data.default;
    $("model-select").value = keep;
    $("errors").textContent = "";
    selectModel(keep);
  } catch (err) {
    $("model-summary").textContent = "no model information";
    showError(err.message);
  }
}

function validationText(v) {
  if (!v || v.macro_auroc === undefined) return "validation not recorded";
  const subsets = v.lead_subsets || {};
  const ci = subsets.all || v;
  const interval = ci.bootstrap_ci_low !== undefined
    ? ` (95 % CI ${ci.bootstrap_ci_low.toFixed(4)}–${ci.bootstrap_ci_high.toFixed(4)})` : "";
  const d = v.data || {};
  const data = [d.name, d.label_set, d.val_records ? d.val_records + " validation records" : ""].filter(Boolean);
  const fewer = Object.entries(subsets).filter(([k]) => k !== "all")
    .map(([k, s]) => `${k} ${s.macro_auroc.toFixed(4)}`);
  return `validation macro AUROC <b>${v.macro_auroc.toFixed(4)}</b>${interval}` +
    (data.length ? ", " + data.join(", ") : "") + (fewer.length ? `; with fewer leads: ${fewer.join(", ")}` : "");
}

function selectModel(name) {
  state.model = state.models.find((m) => m.name === name) || null;
  const m = state.model;
  if (!m) return;
  const scales = m.scale_weights ? m.scale_weights.scales.join(", ") : "none (graph without mixer output)";
  $("model-summary").innerHTML =
    `<b>${m.name}</b> = ${m.model} ${m.version || ""} · ${m.labels.length} classes (${m.labels.join(", ")}) · ` +
    `${m.sample_rate} Hz, window ${m.window / m.sample_rate} s · leads ${m.leads.join(" ")}` +
    (m.lead_subsets ? " (any subset)" : "") + ` · state ${(m.state_bytes / 1024).toFixed(1)} KiB per stream<br>` +
    `${validationText(m.validation)}<br>scales: ${scales}`;
  $("want-mixer").disabled = !m.scale_weights;
}

async function refreshServer() {
  try {
    const [info, metrics] = await Promise.all([
      getJSON("/model" + (state.model ? "?model=" + encodeURIComponent(state.model.name) : "")),
      fetch("/metrics", { headers: authHeaders() }).then((r) => (r.ok ? r.text() : "")),
    ]);
    const total = (name) => metrics.split("\n").filter((l) => l.startsWith(name + " ") || l.startsWith(name + "{"))
      .reduce((sum, l) => sum + parseFloat(l.split(" ").pop()), 0);
    const batches = total("msssm_batch_size_count");
    $("live").innerHTML = [
      ["active streams", `${info.active_streams} of ${info.max_streams}`],
      ["samples processed", total("msssm_samples_processed_total")],
      ["mean batch size", batches ? (total("msssm_batch_size_sum") / batches).toFixed(2) : "–"],
      ["providers", (info.providers || []).join(", ")],
    ].map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join("");
  } catch (err) { /* shown once by loadModels; polling again is enough */ }
}

// --- sources: bundled records and uploads -------------------------------------------------------------------------
async function loadRecords() {
  try {
    const index = await (await fetch("/static/records/index.json")).json();
    state.records = index.records;
    $("records-credit").textContent = index.source;
    $("record-select").innerHTML = index.records.map((r) =>
      `<option value="${r.name}">${r.name}: ${r.shows}</option>`).join("");
    await chooseRecord(index.records[0].name);
  } catch (err) { showError("bundled records: " + err.message); }
}

async function chooseRecord(name) {
  const record = await (await fetch(`/static/records/${name}.json`)).json();
  const rows = record.signal;
  setSource({ name: record.name, rate: record.sample_rate, leads: record.leads, samples: rows.length,
              channels: rows[0].length, data: Float32Array.from(rows.flat()),
              note: `${record.shows}; labelled ${Object.entries(record.labels).map(([k, v]) => `${k} ${v.join("+")}`).join(", ")}` });
}

function setSource(source) {
  state.source = source;
  $("source-info").textContent = `${source.name}: ${source.samples} samples × ${source.channels} leads ` +
    `(${source.leads ? source.leads.join(" ") : "the model's leads"}) at ${source.rate} Hz, ` +
    `${(source.samples / source.rate).toFixed(1)} s` + (source.note ? ` — ${source.note}` : "");
}

async function onUpload(files) {
  $("errors").textContent = "";
  try {
    const byExt = {};
    for (const f of files) byExt[f.name.split(".").pop().toLowerCase()] = f;
    let parsed;
    if (byExt.hea) {
      if (!byExt.dat) throw new Error("a WFDB record needs its .hea and its .dat: select both");
      parsed = parseWfdb(await byExt.hea.text(), await byExt.dat.arrayBuffer());
      parsed.name = byExt.hea.name.replace(/\.hea$/i, "");
    } else if (byExt.npy) {
      parsed = parseNpy(await byExt.npy.arrayBuffer());
      parsed.name = byExt.npy.name;
    } else if (byExt.csv || byExt.txt) {
      const f = byExt.csv || byExt.txt;
      parsed = parseCsv(await f.text());
      parsed.name = f.name;
    } else {
      throw new Error("upload a WFDB record (.hea + .dat), a .csv or a .npy file");
    }
    const rate = parseFloat($("upload-rate").value);
    parsed.rate = parsed.rate || (rate > 0 ? rate : state.model.sample_rate);
    const typed = $("upload-leads").value.trim();
    if (typed) parsed.leads = typed.split(",").map((s) => s.trim()).filter(Boolean);
    if (parsed.leads && parsed.leads.length !== parsed.channels) {
      throw new Error(`${parsed.leads.length} lead names for ${parsed.channels} columns`);
    }
    parsed.note = "uploaded";
    setSource(parsed);
  } catch (err) { showError("upload: " + err.message); }
}

// WFDB header + signal file (formats 16 and 212, one .dat for all signals), in physical units.
function parseWfdb(header, buffer) {
  const lines = header.split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  const [, nsig, fs, nsamp] = lines[0].split(/\s+/);
  const channels = parseInt(nsig, 10);
  const rate = parseFloat(fs);
  const specs = lines.slice(1, 1 + channels).map((line) => {
    const f = line.split(/\s+/);
    const gainMatch = /^([-\d.eE+]+)(?:\(([-\d]+)\))?/.exec(f[2] || "200");
    const gain = parseFloat(gainMatch[1]) || 200;
    const zero = f[4] !== undefined ? parseInt(f[4], 10) : 0;
    return { file: f[0], format: f[1].split(/[x:+]/)[0], gain,
             baseline: gainMatch[2] !== undefined ? parseInt(gainMatch[2], 10) : zero, name: f[8] || `ch${f.length}` };
  });
  if (new Set(specs.map((s) => s.file)).size !== 1) throw new Error("only records with one .dat file are supported");
  const format = specs[0].format;
  if (specs.some((s) => s.format !== format)) throw new Error("mixed WFDB formats are not supported");
  const bytes = new DataView(buffer);
  let samples, digital;
  if (format === "16") {
    samples = Math.floor(buffer.byteLength / (2 * channels));
    digital = (i) => bytes.getInt16(2 * i, true);
  } else if (format === "212") {
    samples = Math.floor((buffer.byteLength * 2) / 3 / channels);
    digital = (i) => {
      const base = Math.floor(i / 2) * 3;
      const v = i % 2 === 0
        ? bytes.getUint8(base) | ((bytes.getUint8(base + 1) & 0x0f) << 8)
        : bytes.getUint8(base + 2) | ((bytes.getUint8(base + 1) & 0xf0) << 4);
      return v > 2047 ? v - 4096 : v;
    };
  } else {
    throw new Error(`WFDB format ${format} is not supported (16 and 212 are)`);
  }
  if (nsamp) samples = Math.min(samples, parseInt(nsamp, 10));
  const data = new Float32Array(samples * channels);
  for (let t = 0; t < samples; t++) {
    for (let c = 0; c < channels; c++) {
      const d = digital(t * channels + c);
      data[t * channels + c] = d === -32768 ? NaN : (d - specs[c].baseline) / specs[c].gain;
    }
  }
  return { rate, leads: specs.map((s) => s.name), samples, channels, data };
}

// CSV: one sample per row, one column per lead; an optional first row of lead names.
function parseCsv(text) {
  const lines = text.split(/\r?\n/).filter((l) => l.trim());
  const sep = lines[0].includes(",") ? "," : lines[0].includes(";") ? ";" : /\s+/;
  let leads = null;
  let first = lines[0].split(sep).map((s) => s.trim());
  if (first.some((v) => v !== "" && isNaN(Number(v)))) { leads = first; lines.shift(); }
  const rows = lines.map((l) => l.split(sep).map((s) => Number(s.trim())));
  const channels = rows[0].length;
  if (rows.some((r) => r.length !== channels)) throw new Error("CSV rows have different numbers of columns");
  return { rate: null, leads, samples: rows.length, channels, data: Float32Array.from(rows.flat()) };
}

// .npy: [samples] or [samples, leads], little-endian float32/float64/int16/int32, C order.
function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.slice(1, 6)) !== "NUMPY") throw new Error("not a .npy file");
  const major = bytes[6];
  const view = new DataView(buffer);
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.slice(start, start + headerLen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  if (/'fortran_order':\s*True/.test(header)) throw new Error(".npy in Fortran order is not supported");
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const [samples, channels = 1] = shape;
  const kinds = { "<f4": Float32Array, "<f8": Float64Array, "<i2": Int16Array, "<i4": Int32Array };
  if (!kinds[descr] || shape.length > 2) throw new Error(`.npy of ${descr} ${JSON.stringify(shape)}: send [samples, leads] float32/64 or int16/32`);
  const body = buffer.slice(start + headerLen, start + headerLen + samples * channels * kinds[descr].BYTES_PER_ELEMENT);
  return { rate: null, leads: null, samples, channels, data: Float32Array.from(new kinds[descr](body)) };
}

// --- playing through /stream --------------------------------------------------------------------------------------
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function play() {
  const m = state.model, src = state.source;
  if (!m || !src) return showError("choose a model and a record first");
  stop();
  Object.assign(state, { predictions: [], finals: [], errors: [], sentSamples: 0, config: null, done: false,
                         playing: true, streamModel: m });
  $("errors").textContent = "";
  $("windows").querySelector("tbody").innerHTML = "";
  $("windows").querySelector("thead").innerHTML = "<tr><th>window</th><th>start s</th>" +
    m.labels.map((l) => `<th>${l}</th>`).join("") + "<th>predicted</th></tr>";
  const url = new URL("/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey()) url.searchParams.set("api_key", apiKey());
  const ws = new WebSocket(url);
  state.ws = ws;
  setConnection("connecting", "connecting…");
  $("play").disabled = true;
  $("stop").disabled = false;
  ws.onopen = () => {
    const config = { model: m.name, sample_rate: src.rate, scale_weights: $("want-mixer").checked && !!m.scale_weights };
    if (src.leads) config.leads = src.leads;
    ws.send(JSON.stringify(config));
  };
  ws.onmessage = (event) => onMessage(ws, JSON.parse(event.data));
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    state.playing = false;
    $("play").disabled = false;
    $("stop").disabled = true;
    if (state.done || event.code === 1000) {
      setConnection("done", `finished: ${state.predictions.length} predictions, ${state.finals.length} windows`);
    } else {
      setConnection("error", `closed ${event.code}${event.reason ? ": " + event.reason : ""}`);
    }
  };
  requestAnimationFrame(drawLoop);
}

function stop() {
  if (state.ws) {
    const ws = state.ws;
    state.playing = false;
    if (ws.readyState <= 1) ws.close(1000, "stopped");
  }
}

function onMessage(ws, msg) {
  if (msg.type === "config") {
    state.config = msg;
    setConnection("open", `streaming to ${msg.model}`);
    sendFrames(ws, msg);
  } else if (msg.type === "prediction") {
    state.predictions.push(msg);
    state.lastMessageAt = performance.now();
    if (msg.final) addWindowRow(msg);
    updateLegend(msg);
  } else if (msg.type === "error") {
    showError("server: " + msg.detail);
  }
}

async function sendFrames(ws, config) {
  const src = state.source;
  const frame = Math.max(1, Math.round((config.hop * config.device_rate) / config.sample_rate));
  const speed = parseFloat($("speed").value);
  const periodMs = speed > 0 ? (1000 * frame) / src.rate / speed : 0;
  const started = performance.now();
  for (let t0 = 0, k = 0; t0 < src.samples; t0 += frame, k++) {
    if (state.ws !== ws || ws.readyState !== 1) return;
    const t1 = Math.min(src.samples, t0 + frame);
    ws.send(src.data.slice(t0 * src.channels, t1 * src.channels).buffer);
    state.sentSamples = t1;
    if (periodMs > 0) {
      const wait = started + (k + 1) * periodMs - performance.now();
      if (wait > 0) await sleep(wait);
    } else {
      while (ws.bufferedAmount > 1 << 20) await sleep(5); // as fast as the socket takes it
      if (k % 8 === 7) await sleep(0); // let the page draw
    }
  }
  ws.send(JSON.stringify({ type: "flush" })); // the prediction of a last, partial window
  // Done once the last window's final prediction is in (a recording of whole windows), else when the server has
  // been quiet for a while after the flush.
  const deviceWindow = config.models[0].device_window;
  const wholeWindows = src.samples % deviceWindow === 0 ? src.samples / deviceWindow : null;
  state.lastMessageAt = performance.now();
  while (state.ws === ws && ws.readyState === 1) {
    const lastFinal = state.finals.length ? state.finals[state.finals.length - 1].window : -1;
    if (wholeWindows !== null && lastFinal === wholeWindows - 1) break;
    if (performance.now() - state.lastMessageAt > 1500) break;
    await sleep(50);
  }
  if (state.ws === ws && ws.readyState === 1) {
    state.done = true;
    ws.close(1000, "recording played");
  }
}

function predictedLabels(model, probabilities) {
  const labels = model.labels;
  if (model.multi_label) {
    const chosen = labels.filter((_, i) => probabilities[i] >= 0.5);
    if (chosen.length) return chosen;
  }
  return [labels[probabilities.indexOf(Math.max(...probabilities))]];
}

function addWindowRow(msg) {
  const m = state.streamModel;
  state.finals.push(msg);
  const chosen = predictedLabels(m, msg.probabilities);
  const cells = msg.probabilities.map((p, i) =>
    `<td class="${chosen.includes(m.labels[i]) ? "predicted" : ""}" data-p="${p}">${p.toFixed(4)}</td>`).join("");
  const row = document.createElement("tr");
  row.dataset.window = msg.window;
  row.innerHTML = `<td>${msg.window}</td><td>${((msg.window * m.window) / m.sample_rate).toFixed(1)}</td>${cells}` +
    `<td class="predicted-labels">${chosen.join(", ")}</td>`;
  $("windows").querySelector("tbody").appendChild(row);
}

function updateLegend(msg) {
  $("prob-legend").innerHTML = state.streamModel.labels.map((l, i) =>
    `<span style="color:${COLORS[i % COLORS.length]}">■ ${l} ${msg.probabilities[i].toFixed(2)}</span>`).join(" ");
}

// --- drawing ------------------------------------------------------------------------------------------------------
function drawLoop() {
  drawEcg();
  drawProbabilities();
  drawScales();
  if (state.playing) requestAnimationFrame(drawLoop);
}

function drawEcg() {
  const canvas = $("ecg"), g = canvas.getContext("2d"), src = state.source;
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (!src) return;
  const span = Math.round(ECG_SPAN_S * src.rate);
  const end = state.sentSamples, start = Math.max(0, end - span);
  const strip = canvas.height / src.channels, perMv = strip / 3;
  $("ecg-caption").textContent = `${(start / src.rate).toFixed(1)}–${(Math.max(end, 1) / src.rate).toFixed(1)} s, ` +
    `${src.rate} Hz, 1 mV = ${perMv.toFixed(0)} px`;
  g.font = "11px system-ui";
  for (let c = 0; c < src.channels; c++) {
    const mid = strip * (c + 0.5);
    g.fillStyle = "#666";
    g.fillText(src.leads ? src.leads[c] : `ch${c + 1}`, 4, mid - strip / 3);
    g.strokeStyle = "#111";
    g.lineWidth = 1;
    g.beginPath();
    for (let t = start; t < end; t++) {
      const v = src.data[t * src.channels + c];
      const x = ((t - start) / span) * canvas.width;
      const y = Math.max(strip * c, Math.min(strip * (c + 1), mid - (Number.isFinite(v) ? v : 0) * perMv));
      t === start ? g.moveTo(x, y) : g.lineTo(x, y);
    }
    g.stroke();
  }
}

function timeAxis() {
  const m = state.streamModel || state.model, src = state.source;
  const total = src ? src.samples / src.rate : m.window / m.sample_rate;
  return (p) => (p.window * m.window + p.t) / m.sample_rate / total;
}

function drawProbabilities() {
  const canvas = $("probabilities"), g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const m = state.streamModel || state.model;
  if (!m) return;
  const h = canvas.height - 10, x = timeAxis();
  g.strokeStyle = "#ddd";
  g.beginPath();
  g.moveTo(0, 5 + h / 2);
  g.lineTo(canvas.width, 5 + h / 2);
  g.stroke();
  m.labels.forEach((_, i) => {
    g.strokeStyle = COLORS[i % COLORS.length];
    g.lineWidth = 2;
    g.beginPath();
    state.predictions.forEach((p, j) => {
      const px = x(p) * canvas.width, py = 5 + (1 - p.probabilities[i]) * h;
      j ? g.lineTo(px, py) : g.moveTo(px, py);
    });
    g.stroke();
  });
}

function drawScales() {
  const canvas = $("scales"), g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const m = state.streamModel || state.model;
  if (!m || !m.scale_weights) return;
  const scales = m.scale_weights.scales, row = canvas.height / scales.length, x = timeAxis(), left = 70;
  const width = canvas.width - left;
  g.font = "11px system-ui";
  scales.forEach((name, s) => { g.fillStyle = "#444"; g.fillText(name, 4, row * (s + 0.65)); });
  const hop = state.config ? state.config.hop : m.default_hop;
  for (const p of state.predictions) {
    if (!p.scale_weights) continue;
    // a prediction's shares cover the hop it completes: from the previous multiple of hop to t
    const x0 = left + x({ window: p.window, t: Math.floor((p.t - 1) / hop) * hop }) * width;
    const x1 = left + x(p) * width;
    p.scale_weights.forEach((share, s) => {
      g.fillStyle = `rgba(31, 90, 180, ${Math.min(1, share * 2.5).toFixed(3)})`;
      g.fillRect(x0, row * s, Math.max(1, x1 - x0), row - 1);
    });
  }
}

// --- wiring -------------------------------------------------------------------------------------------------------
function init() {
  const stored = sessionStorage.getItem("msssm_api_key") || new URLSearchParams(location.search).get("api_key");
  if (stored) $("api-key").value = stored;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("msssm_api_key", apiKey());
    loadModels();
  });
  $("model-select").addEventListener("change", (e) => selectModel(e.target.value));
  $("record-select").addEventListener("change", (e) => chooseRecord(e.target.value));
  $("upload").addEventListener("change", (e) => onUpload(e.target.files));
  $("play").addEventListener("click", play);
  $("stop").addEventListener("click", stop);
  loadModels().then(loadRecords).then(refreshServer).then(() => requestAnimationFrame(drawLoop));
  setInterval(refreshServer, 2000);
}

init();
