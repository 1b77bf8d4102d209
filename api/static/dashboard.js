// netcompress dashboard: plain JS against the public REST API (Bearer key kept in localStorage).
"use strict";

const KEY_STORE = "netcompress.key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const PRESETS = {
  "prune-int8": {steps: [{method: "prune", granularity: "weight", sparsity: 0.5},
                         {method: "quantize", scheme: "int8", mode: "static"}], eval: {holdout: 0.2}},
  "int8-dynamic": {steps: [{method: "quantize", scheme: "int8", mode: "dynamic"}]},
  "fp16": {steps: [{method: "quantize", scheme: "fp16"}]},
  "cluster4": {steps: [{method: "quantize", scheme: "cluster", bits: 4}]},
  "channel": {steps: [{method: "prune", granularity: "channel", sparsity: 0.3, finetune: {epochs: 1}}]},
};

const $ = (sel) => document.querySelector(sel);
const state = {key: localStorage.getItem(KEY_STORE), jobsTimer: null, follow: null, models: {}};

// -- helpers -------------------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;  // CSSOM: the page's CSP refuses inline style attributes
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(2)} ${units[i]}`;
}
function fmtCount(n) {
  if (n == null) return "–";
  for (const [u, d] of [["G", 1e9], ["M", 1e6], ["k", 1e3]]) if (Math.abs(n) >= d) return (n / d).toFixed(2) + u;
  return String(n);
}
const fmtNum = (d) => (v) => (v == null ? "–" : Number(v).toFixed(d));
const shortId = (id) => id.slice(0, 8);
const stepLabel = (s) => s.method === "prune" ? `prune ${s.granularity || ""} ${s.sparsity}`
  : s.method === "quantize" ? `quantize ${s.scheme}${s.mode ? " " + s.mode : ""}` : s.method;

class ApiError extends Error {
  constructor(status, problem) {
    super(`${status} ${problem.title || ""}${problem.detail ? ": " + problem.detail : ""}`);
    this.status = status; this.problem = problem;
  }
}

async function api(path, opts = {}) {
  const headers = Object.assign({Authorization: `Bearer ${state.key}`}, opts.headers || {});
  const resp = await fetch(path, Object.assign({}, opts, {headers}));
  if (resp.status === 401) { signOut("Your key was refused (unknown or revoked)."); throw new ApiError(401, {}); }
  if (!resp.ok) {
    let problem = {};
    try { problem = await resp.json(); } catch (e) { problem = {detail: resp.statusText}; }
    throw new ApiError(resp.status, problem);
  }
  return resp;
}
const apiJson = async (path, opts) => (await api(path, opts)).json();

// -- routing -------------------------------------------------------------------------------------------

function show(view) {
  for (const id of ["signin-view", "jobs-view", "submit-view", "detail-view"]) $("#" + id).hidden = id !== view;
  $("#nav").hidden = view === "signin-view";
}

function stopTimers() {
  clearInterval(state.jobsTimer); state.jobsTimer = null;
  if (state.follow) { state.follow.abort(); state.follow = null; }
}

function route() {
  stopTimers();
  if (!state.key) { show("signin-view"); return; }
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/jobs\/([0-9a-f]+)$/);
  if (m) { show("detail-view"); openJob(m[1]); }
  else if (hash === "#/submit") { show("submit-view"); prepareSubmit(); }
  else { show("jobs-view"); refreshJobs(); state.jobsTimer = setInterval(refreshJobs, 2000); }
}

function signOut(message) {
  localStorage.removeItem(KEY_STORE);
  state.key = null;
  $("#signin-error").textContent = message || "";
  route();
}

// -- jobs list -----------------------------------------------------------------------------------------

async function loadModels() {
  const page = await apiJson("/v1/models?limit=100");
  for (const m of page.items) state.models[m.id] = m;
  return page.items;
}

// a finished job's result in one cell: the key ratios in plain words, the server's verdict on hover
function resultCell(j) {
  const res = j.metrics && j.metrics.result;
  if (!res || !res.ratios) return el("td", {class: "result"}, "–");
  const r = res.ratios, v = res.verdict || {};
  const parts = [];
  if (r.file_bytes != null) parts.push(r.file_bytes >= 1 ? `${r.file_bytes.toFixed(2)}× smaller` : `${(1 / r.file_bytes).toFixed(2)}× larger`);
  if (r.latency_p50_speedup != null) parts.push(r.latency_p50_speedup >= 1 ? `${r.latency_p50_speedup.toFixed(2)}× faster`
                                                                         : `${(1 / r.latency_p50_speedup).toFixed(2)}× slower`);
  if (v.within_budget != null) parts.push(v.within_budget ? "within budget" : "over budget");
  return el("td", {class: `result${v.within_budget === false ? " over" : ""}`, title: v.summary || ""}, parts.join(" · "));
}

async function refreshJobs() {
  try {
    const [page] = await Promise.all([apiJson("/v1/jobs?limit=50"), loadModels()]);
    const body = $("#jobs-table tbody");
    body.replaceChildren(...page.items.map((j) => {
      const frac = j.status === "succeeded" ? 1 : (j.progress.fraction || 0);
      const model = state.models[j.model_id];
      return el("tr", {class: "link", "data-job": j.id, onclick: () => { location.hash = `#/jobs/${j.id}`; }},
        el("td", {}, el("a", {href: `#/jobs/${j.id}`}, j.name || shortId(j.id))),
        el("td", {}, model ? model.name : shortId(j.model_id)),
        el("td", {}, j.spec.steps.map(stepLabel).join(" → ")),
        el("td", {}, el("span", {class: `badge ${j.status}`}, j.status)),
        resultCell(j),
        el("td", {}, el("div", {class: "bar"}, el("div", {style: `width:${(100 * frac).toFixed(0)}%`})),
           ` ${(100 * frac).toFixed(0)}% ${j.status === "running" ? (j.progress.phase || "") : ""}`),
        el("td", {}, new Date(j.created_at).toLocaleString()));
    }));
    $("#jobs-empty").hidden = page.items.length > 0;
    $("#jobs-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) { if (e.status !== 401) $("#jobs-updated").textContent = `error: ${e.message}`; }
}

// -- submit --------------------------------------------------------------------------------------------

async function prepareSubmit() {
  if (!$("#spec").value) $("#spec").value = JSON.stringify(PRESETS[$("#preset").value], null, 2);
  try {
    const models = await loadModels();
    $("#model-select").replaceChildren(el("option", {value: ""}, "—"),
      ...models.map((m) => el("option", {value: m.id}, `${m.name} (${shortId(m.id)})`)));
  } catch (e) { /* shown on submit */ }
}

async function upload(path, file, name) {
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("name", name || file.name);
  const made = await apiJson(path, {method: "POST", body: form});
  if (path === "/v1/models") state.models[made.id] = made;
  return made;
}

// -- a dataset from a folder of images, built in the browser ---------------------------------------------
// The same rules as the CLI's --images (client/images.py): the model's one 4-D float input gives the name, the
// layout (channels 1 or 3 on axis 1 or 3) and a static H×W every picture is resized to (else "Size");
// pixels × scale, then (x − mean) / std per channel; sub-folder names → labels in sorted order. The arrays go
// up as the .npz the API takes (a stored zip of .npy files), so the REST contract is unchanged.

const IMAGE_EXT = /\.(jpe?g|png|bmp|webp)$/i;
const MAX_IMAGE_BYTES = 1 << 30;  // the float32 array the tab would build; past it, use the CLI

function imageError(msg) { return new Error(`images: ${msg}`); }

function imageInput(model) {
  const inputs = model.inputs || [];
  const ins = inputs.filter((i) => (i.shape || []).length === 4 && String(i.dtype || "").startsWith("float"));
  if (ins.length !== 1) throw imageError(`the model has no single 4-D float image input (its inputs: ${inputs.map((i) => i.name).join(", ")})`);
  const shape = ins[0].shape, first = [1, 3].includes(shape[1]), last = [1, 3].includes(shape[3]);
  const layout = first && !last ? "nchw" : last && !first ? "nhwc" : null;
  if (!layout) throw imageError("the model's input does not say its layout (nchw or nhwc): use the CLI's --layout");
  const hw = layout === "nchw" ? [shape[2], shape[3]] : [shape[1], shape[2]];
  const fixed = hw.every((v) => Number.isInteger(v) && v > 0);
  return {name: ins[0].name, layout, channels: layout === "nchw" ? shape[1] : shape[3], size: fixed ? hw : null};
}

function parseNumbers(text, what) {
  if (!text.trim()) return null;
  const vals = text.split(",").map((v) => Number(v.trim()));
  if (vals.some((v) => !Number.isFinite(v))) throw imageError(`${what} must be numbers separated by commas, not "${text}"`);
  return vals;
}

async function imageDataset(files, model, say) {
  if (!files.length) throw imageError("no images (jpg, jpeg, png, bmp, webp) in the folder");
  const inp = imageInput(model);
  let size = inp.size;
  const sizeText = $("#images-size").value.trim();
  if (sizeText) {
    const m = sizeText.match(/^(\d+)\s*[x×]\s*(\d+)$/i);
    if (!m || +m[1] < 1 || +m[2] < 1) throw imageError(`size must be HxW, e.g. 224x224, not "${sizeText}"`);
    if (size && (size[0] !== +m[1] || size[1] !== +m[2])) throw imageError(`size ${sizeText}: the model's input is fixed at ${size[0]}x${size[1]}`);
    size = [+m[1], +m[2]];
  }
  const scaleText = $("#images-scale").value.trim() || "1/255";
  const sm = scaleText.match(/^([\d.]+)(?:\/([\d.]+))?$/);
  const scale = sm ? Number(sm[1]) / (sm[2] ? Number(sm[2]) : 1) : NaN;
  if (!Number.isFinite(scale)) throw imageError(`scale must be a number or a fraction like 1/255, not "${scaleText}"`);
  const C = inp.channels, mean = parseNumbers($("#images-mean").value, "mean"), std = parseNumbers($("#images-std").value, "std");
  for (const [what, v] of [["mean", mean], ["std", std]]) if (v && v.length !== 1 && v.length !== C) throw imageError(`${what} needs 1 or ${C} values, not ${v.length}`);
  if (std && std.some((v) => v === 0)) throw imageError("std values must not be 0");
  const bgr = $("#images-order").value === "bgr";
  const rel = (f) => f.webkitRelativePath || f.name;
  files = [...files].sort((a, b) => (rel(a) < rel(b) ? -1 : rel(a) > rel(b) ? 1 : 0));  // the CLI's sorted order
  const limit = parseInt($("#images-limit").value, 10);
  if (limit > 0) files = files.slice(0, limit);

  const bitmaps = [];
  for (const [i, f] of files.entries()) {
    say(`reading image ${i + 1}/${files.length}…`);
    try { bitmaps.push(await createImageBitmap(f)); } catch (e) { throw imageError(`${rel(f)}: not a readable image`); }
  }
  const sizes = new Set(bitmaps.map((b) => `${b.height}x${b.width}`));
  if (!size && sizes.size > 1) throw imageError(`the images have ${sizes.size} different sizes (e.g. ${[...sizes].slice(0, 3).join(", ")} as HxW) and the model's input size is not fixed: give a size`);
  const [H, W] = size || [bitmaps[0].height, bitmaps[0].width];
  if (files.length * C * H * W * 4 > MAX_IMAGE_BYTES) throw imageError(`${files.length} images of ${H}x${W} are more than the browser should build (1 GiB): use the CLI's --images`);

  const x = new Float32Array(files.length * C * H * W), plane = H * W;
  const canvas = document.createElement("canvas");
  canvas.width = W; canvas.height = H;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  ctx.imageSmoothingEnabled = true; ctx.imageSmoothingQuality = "medium";
  const m = (c) => (mean ? mean[mean.length === 1 ? 0 : c] : 0), s = (c) => (std ? std[std.length === 1 ? 0 : c] : 1);
  for (const [n, bmp] of bitmaps.entries()) {
    ctx.clearRect(0, 0, W, H);
    ctx.drawImage(bmp, 0, 0, W, H);
    const px = ctx.getImageData(0, 0, W, H).data;
    for (let p = 0; p < plane; p++) {
      const r = px[4 * p], g = px[4 * p + 1], b = px[4 * p + 2];
      const vals = C === 1 ? [(r * 299 + g * 587 + b * 114) / 1000] : bgr ? [b, g, r] : [r, g, b];  // PIL's "L"
      for (let c = 0; c < C; c++) {
        const v = (vals[c] * scale - m(c)) / s(c);
        x[inp.layout === "nchw" ? n * C * plane + c * plane + p : (n * plane + p) * C + c] = v;
      }
    }
    bmp.close();
  }
  const arrays = [[inp.name, x, "<f4", inp.layout === "nchw" ? [files.length, C, H, W] : [files.length, H, W, C]]];
  let name = `${files.length} images ${H}x${W}`;
  if ($("#images-labels").checked) {
    const folder = files.map((f) => { const parts = rel(f).split("/"); return parts.length > 2 ? parts[1] : ""; });
    if (folder.includes("")) throw imageError("labels from sub-folders: pictures directly in the chosen folder have no class folder");
    const classes = [...new Set(folder)].sort();
    if (classes.length < 2) throw imageError(`labels from sub-folders: one class folder only (${classes[0]})`);
    const labels = new BigInt64Array(folder.map((f) => BigInt(classes.indexOf(f))));
    arrays.push(["labels", labels, "<i8", [files.length]]);
    name += ` (labels: ${classes.map((c, i) => `${i}=${c}`).join(", ")})`;
  }
  say("packing the dataset…");
  return {blob: npz(arrays), name: name.slice(0, 200)};
}

function npy(data, descr, shape) {
  // .npy v1.0: magic, version, a little-endian uint16 header length, the header dict padded with spaces to 64 bytes
  const dict = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${shape.join(", ")}${shape.length === 1 ? "," : ""}), }`;
  const pad = 64 - ((10 + dict.length + 1) % 64);
  const header = dict + " ".repeat(pad % 64) + "\n";
  const out = new Uint8Array(10 + header.length + data.byteLength);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 0xff, header.length >> 8]);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), 10 + header.length);
  return out;
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) { let c = n; for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1; t[n] = c >>> 0; }
  return t;
})();
function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function npz(arrays) {
  // a zip of stored (uncompressed) .npy members, as numpy.savez writes: local headers, data, central directory
  const parts = [], central = [];
  let offset = 0;
  for (const [name, data, descr, shape] of arrays) {
    const body = npy(data, descr, shape), fname = new TextEncoder().encode(`${name}.npy`), crc = crc32(body);
    const local = record(30, [[0, 0x04034b50, 4], [4, 20, 2], [12, 0x21, 2], [14, crc, 4], [18, body.length, 4],
                              [22, body.length, 4], [26, fname.length, 2]]);
    const dir = record(46, [[0, 0x02014b50, 4], [4, 20, 2], [6, 20, 2], [14, 0x21, 2], [16, crc, 4],
                            [20, body.length, 4], [24, body.length, 4], [28, fname.length, 2], [42, offset, 4]]);
    parts.push(local, fname, body);
    central.push(dir, fname);
    offset += 30 + fname.length + body.length;
  }
  const size = central.reduce((a, b) => a + b.length, 0);
  const end = record(22, [[0, 0x06054b50, 4], [8, arrays.length, 2], [10, arrays.length, 2], [12, size, 4],
                          [16, offset, 4]]);
  return new Blob([...parts, ...central, end], {type: "application/octet-stream"});
}

function record(length, fields) {
  // a zip header of `length` bytes, zero but for its [offset, value, width] little-endian fields
  const view = new DataView(new ArrayBuffer(length));
  for (const [o, v, n] of fields) n === 4 ? view.setUint32(o, v, true) : view.setUint16(o, v, true);
  return new Uint8Array(view.buffer);
}

async function submitJob(ev) {
  ev.preventDefault();
  const status = $("#submit-status");
  status.className = "";
  try {
    let spec;
    try { spec = JSON.parse($("#spec").value); } catch (e) { throw new Error(`the spec is not JSON: ${e.message}`); }
    let modelId = $("#model-select").value;
    const modelFile = $("#model-file").files[0];
    if (modelFile) { status.textContent = "uploading model…"; modelId = (await upload("/v1/models", modelFile)).id; }
    if (!modelId) throw new Error("choose a model file or an uploaded model");
    const body = {model_id: modelId, spec};
    const dataFile = $("#data-file").files[0];
    const images = [...$("#images-dir").files].filter((f) => IMAGE_EXT.test(f.name));
    if (dataFile && $("#images-dir").files.length) throw new Error("give a dataset file or a folder of images, not both");
    if (dataFile) { status.textContent = "uploading dataset…"; body.dataset_id = (await upload("/v1/datasets", dataFile)).id; }
    else if ($("#images-dir").files.length) {
      const model = modelFile ? state.models[modelId] : await apiJson(`/v1/models/${modelId}`);
      const {blob, name} = await imageDataset(images, model, (text) => { status.textContent = text; });
      status.textContent = "uploading dataset…";
      body.dataset_id = (await upload("/v1/datasets", new File([blob], "images.npz"), name)).id;
    }
    if ($("#job-name").value) body.name = $("#job-name").value;
    status.textContent = "submitting…";
    const job = await apiJson("/v1/jobs", {method: "POST", body: JSON.stringify(body),
                                            headers: {"Content-Type": "application/json"}});
    status.textContent = `job ${job.id} queued`;
    location.hash = `#/jobs/${job.id}`;
  } catch (e) {
    status.className = "error";
    const errs = (e.problem && e.problem.errors) || [];
    status.textContent = e.message + (errs.length ? " — " + errs.map((x) => `${x.path}: ${x.message}`).join("; ") : "");
  }
}

// -- job detail ----------------------------------------------------------------------------------------

function renderStatus(job) {
  const badge = $("#detail-badge");
  badge.className = `badge ${job.status}`;
  badge.textContent = job.status;
  const p = job.progress || {};
  const frac = job.status === "succeeded" ? 1 : (p.fraction || 0);
  $("#detail-bar").style.width = `${(100 * frac).toFixed(0)}%`;
  const step = p.steps ? ` · step ${Math.min((p.step || 0) + 1, p.steps)}/${p.steps}` : "";
  if (TERMINAL.has(job.status)) {
    const secs = job.started_at && job.finished_at ? (new Date(job.finished_at) - new Date(job.started_at)) / 1000 : null;
    $("#detail-message").textContent = `${job.status}${secs != null ? ` in ${secs.toFixed(1)} s` : ""}` +
      (job.attempts > 1 ? ` · ${job.attempts} attempts` : "");
  } else {
    $("#detail-message").textContent = `${(100 * frac).toFixed(0)}%${p.phase ? " · " + p.phase : ""}${step}` +
      (p.message ? ` · ${p.message}` : "");
  }
  $("#detail-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("#cancel-btn").hidden = TERMINAL.has(job.status);
}

async function openJob(id) {
  $("#detail-title").textContent = `Job ${shortId(id)}`;
  renderVerdict({});
  for (const sel of ["#metrics-table thead", "#metrics-table tbody", "#layers", "#artifacts", "#chart-pareto", "#chart-latency", "#search-front"]) {
    $(sel).replaceChildren();
  }
  let job;
  try { job = await apiJson(`/v1/jobs/${id}`); } catch (e) { $("#detail-error").textContent = e.message; return; }
  $("#detail-title").textContent = `Job ${job.name || shortId(job.id)} · ${job.spec.steps.map(stepLabel).join(" → ")}`;
  $("#cancel-btn").onclick = async () => {
    try { renderStatus(await apiJson(`/v1/jobs/${id}/cancel`, {method: "POST"})); }
    catch (e) { $("#detail-error").textContent = e.message; }
  };
  renderStatus(job);
  if (!TERMINAL.has(job.status)) job = await follow(id, job);
  if (job) await renderFinished(job);
}

// Follow /events with fetch (EventSource cannot send the Authorization header); poll if streaming fails.
async function follow(id, job) {
  const ctrl = new AbortController();
  state.follow = ctrl;
  try {
    const resp = await api(`/v1/jobs/${id}/events`, {signal: ctrl.signal, headers: {Accept: "text/event-stream"}});
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let idx;
      while ((idx = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, idx); buf = buf.slice(idx + 2);
        let event = "message"; const data = [];
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (!data.length) continue;
        const payload = JSON.parse(data.join("\n"));
        if (event === "state") { job = Object.assign({}, job, payload); renderStatus(job); }
        if (event === "done") { renderStatus(payload); return payload; }
      }
    }
  } catch (e) {
    if (ctrl.signal.aborted) return null;
  }
  while (!ctrl.signal.aborted) {  // fallback: poll
    job = await apiJson(`/v1/jobs/${id}`);
    renderStatus(job);
    if (TERMINAL.has(job.status)) return job;
    await new Promise((r) => setTimeout(r, 1000));
  }
  return null;
}

const METRIC_ROWS = [
  ["file size", (m) => m.file_bytes, fmtBytes],
  ["zip size", (m) => m.zip_bytes, fmtBytes],
  ["params", (m) => m.params, fmtCount],
  ["nonzero params", (m) => m.nonzero_params, fmtCount],
  ["MACs / sample", (m) => m.macs, fmtCount],
  ["latency p50 (ms)", (m) => m.latency_ms && m.latency_ms.p50, fmtNum(3)],
  ["throughput (/s)", (m) => m.throughput, fmtNum(1)],
  ["accuracy", (m) => m.accuracy, fmtNum(4)],
  ["agreement", (m) => m.agreement, fmtNum(4)],
  ["output cosine", (m) => m.output_cosine, fmtNum(4)],
  ["perplexity", (m) => m.perplexity, fmtNum(4)],
  ["token agreement", (m) => m.token_agreement, fmtNum(4)],
  ["KL to original (nats)", (m) => m.kl, fmtNum(5)],
];

function renderVerdict(job) {
  // the result's plain verdict first: smaller? faster at batch 1 / batch N? within the accuracy budget?
  const v = job.metrics && job.metrics.result && job.metrics.result.verdict;
  const p = $("#detail-verdict");
  p.textContent = v ? v.summary : "";
  p.className = `verdict${v && v.within_budget === false ? " over" : ""}`;
  p.hidden = !v;
}

function renderMetrics(job) {
  renderVerdict(job);
  const m = job.metrics;
  if (!m) return;
  const cols = [["original", m.original], ...m.steps.map((s, i) => [`${i + 1}. ${s.method}`, s]), ["result", m.result]];
  $("#metrics-table thead").replaceChildren(el("tr", {}, el("th", {}, "metric"),
    ...cols.map(([name]) => el("th", {class: "num"}, name)), el("th", {class: "num", title: "how many times smaller or faster than the original (> 1 is better)"}, "gain vs original")));
  const ratios = (m.result && m.result.ratios) || {};
  const ratioKey = {"file size": "file_bytes", "zip size": "zip_bytes", "params": "params", "nonzero params": "nonzero_params",
                    "MACs / sample": "macs", "latency p50 (ms)": "latency_p50_speedup", "throughput (/s)": "throughput"};
  const rows = [];
  for (const [label, get, fmt] of METRIC_ROWS) {
    const values = cols.map(([, c]) => (c ? get(c) : null));
    if (values.every((v) => v == null)) continue;
    const r = label === "accuracy" ? ratios.accuracy_delta : label === "perplexity" ? ratios.perplexity_ratio : ratios[ratioKey[label]];
    // perplexity's ratio is result / original: > 1 is worse, so it is written the other way round (×1.006)
    const ratioText = r == null ? "" : label === "accuracy" ? (r >= 0 ? "+" : "") + r.toFixed(4)
      : label === "perplexity" ? `×${r.toFixed(3)} (result / original)` : `${r.toFixed(2)}×`;
    rows.push(el("tr", {}, el("td", {}, label), ...values.map((v) => el("td", {class: "num"}, fmt(v))),
                 el("td", {class: "num"}, ratioText)));
  }
  $("#metrics-table tbody").replaceChildren(...rows);
}

function axes(root, x0, y0, x1, y1, xlabel, ylabel) {
  root.append(svg("line", {class: "axis", x1: x0, y1: y1, x2: x1, y2: y1}), svg("line", {class: "axis", x1: x0, y1: y0, x2: x0, y2: y1}),
              svg("text", {x: (x0 + x1) / 2, y: y1 + 30, "text-anchor": "middle"}, xlabel),
              svg("text", {x: 12, y: (y0 + y1) / 2, transform: `rotate(-90 12 ${(y0 + y1) / 2})`, "text-anchor": "middle"}, ylabel));
}

const OBJECTIVE_LABEL = {latency: "latency p50 (ms)", file_bytes: "file size", compressed_bytes: "compressed size",
                         macs: "MACs", params: "params"};

// A search job: every candidate as (objective, metric), its own Pareto front joined, the best ringed,
// the target's bound dashed; the front's members listed below with their downloads.
function renderSearch(job) {
  const root = $("#chart-pareto");
  const s = job.metrics.search, t = s.target;
  $("#chart-pareto-caption").textContent = `Search: ${s.finished} of ${s.grid_size} candidates` +
    `${s.partial ? ` (partial: ${s.stopped_by})` : ""}; best ${s.target_met ? "meets" : "misses"} the target`;
  const base = s.original.metric;
  const done = s.candidates.filter((c) => c.status === "done");
  const pts = done.map((c) => ({x: c.objective, y: base - c.drop, c}));
  pts.push({x: s.original.objective, y: base, c: null});
  const W = +root.getAttribute("width"), H = +root.getAttribute("height");
  const [x0, y0, x1, y1] = [56, 14, W - 36, H - 44];
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y).concat([base - t.max_accuracy_drop]);
  const xmax = Math.max(...xs) * 1.08, xmin = 0;
  let ymin = Math.min(...ys), ymax = Math.max(...ys);
  const pad = Math.max((ymax - ymin) * 0.15, 0.005); ymin -= pad; ymax += pad;
  const sx = (v) => x0 + ((v - xmin) / (xmax - xmin || 1)) * (x1 - x0);
  const sy = (v) => y1 - ((v - ymin) / (ymax - ymin || 1)) * (y1 - y0);
  axes(root, x0, y0, x1, y1, OBJECTIVE_LABEL[t.optimize] || t.optimize, t.metric);
  for (const tk of [0, 0.5, 1]) {
    const xv = xmin + tk * (xmax - xmin);
    root.append(svg("text", {x: sx(xv), y: y1 + 14, "text-anchor": "middle"}, t.optimize.endsWith("bytes") ? fmtBytes(Math.round(xv)) : xv.toPrecision(3)));
    root.append(svg("text", {x: x0 - 4, y: sy(ymin + tk * (ymax - ymin)) + 4, "text-anchor": "end"}, (ymin + tk * (ymax - ymin)).toFixed(3)));
  }
  const bound = sy(base - t.max_accuracy_drop);
  root.append(svg("line", {class: "target", x1: x0, x2: x1, y1: bound, y2: bound, "stroke-dasharray": "4 3", stroke: "#c00"}));
  const front = new Set(s.front);
  const fpts = pts.filter((p) => p.c && front.has(p.c.id)).sort((a, b) => a.x - b.x);
  if (fpts.length > 1) root.append(svg("polyline", {class: "front", points: fpts.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ")}));
  for (const p of pts) {
    const label = p.c ? Object.entries(p.c.values).map(([k, v]) => `${k}=${v}`).join(", ") : "original";
    const cls = !p.c ? "point original" : p.c.id === s.best.id ? "point current" : front.has(p.c.id) ? "point front" : "point";
    const c = svg("circle", {class: cls, cx: sx(p.x), cy: sy(p.y), r: cls.includes("current") ? 6 : 4, "data-candidate": p.c ? p.c.id : "original"});
    c.append(svg("title", {}, `${label}: ${p.x.toPrecision(4)}, ${t.metric} ${p.y.toFixed(4)}`));
    root.append(c);
  }
  const names = Object.fromEntries(job.artifacts.filter((a) => a.name.startsWith("front-")).map((a) => [a.name.split("-")[2].replace(".onnx", ""), a.name]));
  $("#search-front").replaceChildren(el("table", {class: "grid", id: "search-front-table"},
    el("thead", {}, el("tr", {}, ["candidate", t.metric, OBJECTIVE_LABEL[t.optimize] || t.optimize, "meets target", "download"].map((h) => el("th", {}, h)))),
    el("tbody", {}, s.front.map((id) => {
      const c = s.candidates.find((x) => x.id === id);
      return el("tr", {"data-candidate": id, class: id === s.best.id ? "best" : ""},
        el("td", {}, Object.entries(c.values).map(([k, v]) => `${k}=${v}`).join(", ") || id),
        el("td", {class: "num"}, (base - c.drop).toFixed(4)), el("td", {class: "num"}, String(c.objective)),
        el("td", {}, c.meets_target ? "yes" : "no"),
        el("td", {}, names[id] ? el("a", {href: "#", "data-artifact": names[id], onclick: (ev) => { ev.preventDefault(); $(`#artifacts a[data-artifact="${names[id]}"]`).click(); }}, names[id]) : "–"));
    }))));
}

async function renderPareto(job) {
  const root = $("#chart-pareto");
  root.replaceChildren();
  $("#search-front").replaceChildren();
  if (job.metrics && job.metrics.search) return renderSearch(job);
  $("#chart-pareto-caption").textContent = "Size vs accuracy, all jobs of this model (Pareto front)";
  const page = await apiJson(`/v1/jobs?model_id=${job.model_id}&status=succeeded&limit=100`);
  const jobs = page.items.filter((j) => j.metrics && j.metrics.result);
  if (!jobs.some((j) => j.id === job.id) && job.metrics) jobs.push(job);
  const quality = (m) => (m.accuracy != null ? m.accuracy : m.agreement);
  const qualityName = jobs.some((j) => j.metrics.result.accuracy != null) ? "accuracy" : "agreement with original";
  const points = jobs.map((j) => ({x: j.metrics.result.file_bytes, y: quality(j.metrics.result), id: j.id,
                                   label: j.name || shortId(j.id), cls: j.id === job.id ? "point current" : "point"}));
  const orig = job.metrics.original;
  points.push({x: orig.file_bytes, y: orig.accuracy != null ? orig.accuracy : 1.0, id: "original", label: "original",
               cls: "point original"});
  const pts = points.filter((p) => p.x != null && p.y != null);
  const W = +root.getAttribute("width"), H = +root.getAttribute("height");
  const [x0, y0, x1, y1] = [56, 14, W - 36, H - 44];
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
  const xmax = Math.max(...xs) * 1.08, xmin = 0;
  let ymin = Math.min(...ys), ymax = Math.max(...ys);
  const pad = Math.max((ymax - ymin) * 0.15, 0.005); ymin -= pad; ymax += pad;
  const sx = (v) => x0 + ((v - xmin) / (xmax - xmin || 1)) * (x1 - x0);
  const sy = (v) => y1 - ((v - ymin) / (ymax - ymin || 1)) * (y1 - y0);
  axes(root, x0, y0, x1, y1, "file size", qualityName);
  for (const t of [0, 0.5, 1]) {
    root.append(svg("text", {x: sx(xmin + t * (xmax - xmin)), y: y1 + 14, "text-anchor": "middle"}, fmtBytes(Math.round(xmin + t * (xmax - xmin)))));
    root.append(svg("text", {x: x0 - 4, y: sy(ymin + t * (ymax - ymin)) + 4, "text-anchor": "end"}, (ymin + t * (ymax - ymin)).toFixed(3)));
  }
  // Pareto front: no other point is both smaller and at least as good.
  const front = pts.filter((p) => !pts.some((q) => q !== p && q.x <= p.x && q.y >= p.y && (q.x < p.x || q.y > p.y)))
    .sort((a, b) => a.x - b.x);
  if (front.length > 1) root.append(svg("polyline", {class: "front", points: front.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ")}));
  for (const p of pts) {
    const c = svg("circle", {class: p.cls, cx: sx(p.x), cy: sy(p.y), r: p.cls.includes("current") ? 6 : 4, "data-job": p.id});
    c.append(svg("title", {}, `${p.label}: ${fmtBytes(p.x)}, ${qualityName} ${p.y.toFixed(4)}`));
    root.append(c, svg("text", {class: "point-label", x: sx(p.x) + 8, y: sy(p.y) - 6}, p.label));
  }
}

function renderLatency(job) {
  const root = $("#chart-latency");
  root.replaceChildren();
  const m = job.metrics;
  const bars = [["original", m.original], ...m.steps.map((s, i) => [`${i + 1}. ${s.method}`, s])]
    .map(([label, x]) => ({label, v: x && x.latency_ms ? x.latency_ms.p50 : null})).filter((b) => b.v != null);
  if (!bars.length) return;
  const W = +root.getAttribute("width"), H = +root.getAttribute("height");
  const [x0, y0, x1, y1] = [56, 14, W - 14, H - 44];
  const vmax = Math.max(...bars.map((b) => b.v)) * 1.1;
  axes(root, x0, y0, x1, y1, "model", "ms");
  const slot = (x1 - x0) / bars.length;
  bars.forEach((b, i) => {
    const h = ((y1 - y0) * b.v) / vmax;
    const r = svg("rect", {class: i === 0 ? "lat-bar original" : "lat-bar", x: x0 + i * slot + slot * 0.15, y: y1 - h,
                           width: slot * 0.7, height: h});
    r.append(svg("title", {}, `${b.label}: ${b.v.toFixed(3)} ms`));
    root.append(r, svg("text", {x: x0 + i * slot + slot / 2, y: y1 + 14, "text-anchor": "middle"}, b.label),
                svg("text", {x: x0 + i * slot + slot / 2, y: y1 - h - 4, "text-anchor": "middle"}, b.v.toPrecision(3)));
  });
}

async function renderLayers(job) {
  const box = $("#layers");
  box.replaceChildren();
  if (!job.artifacts.some((a) => a.name === "report.json")) return;
  const report = await apiJson(`/v1/jobs/${job.id}/artifacts/report.json`);
  for (const [i, step] of (report.steps || []).entries()) {
    const layers = (step.report && step.report.layers) || [];
    if (!layers.length) continue;
    const hasSparsity = layers.some((l) => l.sparsity != null), hasBits = layers.some((l) => l.bits_per_weight != null);
    // weight-only quantizers (int4) list bits, block size and algorithm per weight; any column a step fills is shown
    const extra = [["bits", "bits"], ["block_size", "block"], ["algorithm", "algorithm"], ["op", "op"]]
      .filter(([k]) => layers.some((l) => l[k] != null));
    const params = (l) => (l.params != null ? l.params : Array.isArray(l.shape) ? l.shape.reduce((a, b) => a * b, 1) : null);
    const head = ["layer", "params"].concat(hasSparsity ? ["sparsity"] : [], hasBits ? ["bits / weight"] : [],
                                            extra.map(([, h]) => h));
    box.append(el("h4", {}, `${i + 1}. ${step.method}`),
      el("table", {class: "grid layers", "data-step": i},
        el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
        el("tbody", {}, layers.map((l) => el("tr", {},
          el("td", {}, l.layer || l.name || l.weight || ""), el("td", {class: "num"}, fmtCount(params(l))),
          hasSparsity ? el("td", {}, el("span", {class: "layerbar", style: `width:${Math.round(100 * (l.sparsity || 0))}px`}),
                           ` ${l.sparsity != null ? (100 * l.sparsity).toFixed(1) + "%" : "–"}`) : [],
          hasBits ? el("td", {class: "num"}, l.bits_per_weight != null ? l.bits_per_weight.toFixed(2) : "–") : [],
          extra.map(([k]) => el("td", {class: typeof l[k] === "number" ? "num" : ""}, l[k] != null ? String(l[k]) : "–")))))));
  }
  if (!box.children.length) box.append(el("p", {}, "No per-layer facts for these steps."));
}

function renderArtifacts(job) {
  $("#artifacts").replaceChildren(...job.artifacts.map((a) => el("li", {},
    el("a", {href: "#", "data-artifact": a.name, onclick: async (ev) => {
      ev.preventDefault();
      const blob = await (await api(`/v1/jobs/${job.id}/artifacts/${encodeURIComponent(a.name)}`)).blob();
      const url = URL.createObjectURL(blob);
      const link = el("a", {href: url, download: a.name});
      document.body.append(link); link.click(); link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    }}, a.name), ` · ${fmtBytes(a.size_bytes)} · ${a.kind} · sha256 ${a.sha256.slice(0, 12)}…`)));
}

async function renderFinished(job) {
  renderStatus(job);
  renderMetrics(job);
  renderArtifacts(job);
  if (job.metrics) {
    renderLatency(job);
    try { await renderPareto(job); } catch (e) { $("#chart-pareto").append(svg("text", {x: 20, y: 20}, e.message)); }
  }
  try { await renderLayers(job); } catch (e) { $("#layers").textContent = e.message; }
  document.body.dataset.rendered = job.id;  // for tests and scripts: the detail view is complete
}

// -- boot ----------------------------------------------------------------------------------------------

$("#signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.key = $("#key").value.trim();
  try {
    await apiJson("/v1/jobs?limit=1");
    localStorage.setItem(KEY_STORE, state.key);
    $("#signin-error").textContent = "";
    $("#key").value = "";
    location.hash = "#/";
    route();
  } catch (e) { if (e.status !== 401) $("#signin-error").textContent = e.message; }
});
$("#signout").addEventListener("click", () => signOut());
$("#submit-form").addEventListener("submit", submitJob);
$("#preset").addEventListener("change", () => { $("#spec").value = JSON.stringify(PRESETS[$("#preset").value], null, 2); });
window.addEventListener("hashchange", route);
route();
