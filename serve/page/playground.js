// The playground page of `sdrt serve` (serve/playground.py serves it at /; this file is serve/page/playground.js): a form over the server's own routes.
// Text to image goes to POST /v1/images/generations (streamed with tiny-VAE previews when the model has them and one
// image is asked for), image to image and inpainting to POST /sdapi/v1/img2img. No build step, nothing from outside.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "sampler", "seed", "batch"];
// the server's names for the form's fields, in either dialect (errors name the field as the route spells it)
const FIELD_OF = {
  guidance_scale: "guidance", cfg_scale: "guidance", size: "width", n: "batch", batch_size: "batch",
  num_inference_steps: "steps", sampler_name: "sampler", init_images: "init_image", denoising_strength: "strength",
};
let model = null;
let keyWaiters = [];
let maskPainted = false;
let initImage = null;  // data URL of the uploaded image

// ---- talking to the server ----------------------------------------------------------------------------------
function authHeaders() {
  const key = sessionStorage.getItem("sdrt-key");
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, init = {}) {
  for (;;) {
    const headers = { ...authHeaders(), ...(init.body ? { "Content-Type": "application/json" } : {}) };
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    await askForKey();
  }
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("sdrt-key", $("key").value);
  $("key-form").hidden = true;
  keyWaiters.splice(0).forEach((resolve) => resolve());
});

class ServerError extends Error {
  constructor(field, message) { super(message); this.field = field; }
}

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  const error = body && body.error ? body.error : { message: `${response.status} ${response.statusText}` };
  return new ServerError(error.param ?? error.field ?? null, error.message || JSON.stringify(error));  // /v1: OpenAI's param
}

// ---- the form -----------------------------------------------------------------------------------------------
function values() {
  const number = (id) => Number($(id).value);
  const loras = [...document.querySelectorAll("#loras input")]
    .filter((input) => Number(input.value) !== 0).map((input) => [input.dataset.name, Number(input.value)]);
  return {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, width: number("width"),
    height: number("height"), steps: number("steps"), guidance: number("guidance"), sampler: $("sampler").value,
    seed: $("random-seed").checked ? -1 : number("seed"), batch: number("batch"), loras,
    strength: number("strength"), mode: $("mode").value,
  };
}

function fillFromAddress(params) {
  for (const name of FIELDS) {
    if (params.has(name)) $(name).value = params.get(name);
  }
  if (params.has("seed")) $("random-seed").checked = params.get("seed") === "-1";
}

function address(v) {
  const params = new URLSearchParams();
  for (const name of FIELDS) {
    const value = name === "seed" ? String(v.seed) : String(v[name] ?? "");
    if (value !== "") params.set(name, value);
  }
  return params.toString();
}

function clearErrors() {
  document.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
  document.querySelectorAll(".invalid").forEach((e) => e.classList.remove("invalid"));
}

function showError(error) {
  const raw = error.field ? String(error.field).split(/[.[]/)[0] : null;
  const field = raw ? (FIELD_OF[raw] || raw) : null;
  const slot = field ? document.querySelector(`.error[data-for="${field}"]`) : null;
  if (slot) {
    slot.textContent = error.message;
    const input = $(field);
    if (input) input.classList.add("invalid");
  } else {
    $("general-error").textContent = (error.field ? error.field + ": " : "") + error.message;
  }
}

function busy(on, text = "") {
  $("generate").disabled = on;
  $("status").textContent = text;
}

// ---- results --------------------------------------------------------------------------------------------------
function pngText(b64, keyword) {
  // a tEXt or (uncompressed) iTXt chunk of a PNG, as PIL's PngInfo.add_text writes `parameters`
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  let at = 8;
  while (at + 8 <= bytes.length) {
    const length = view.getUint32(at);
    const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    if (type === "tEXt" || type === "iTXt") {
      const zero = data.indexOf(0);
      const name = new TextDecoder("latin1").decode(data.subarray(0, zero));
      if (name === keyword) {
        if (type === "tEXt") return new TextDecoder("latin1").decode(data.subarray(zero + 1));
        let p = zero + 3;  // compression flag and method
        p = data.indexOf(0, p) + 1;  // language tag
        p = data.indexOf(0, p) + 1;  // translated keyword
        return new TextDecoder("utf-8").decode(data.subarray(p));
      }
    }
    if (type === "IEND") break;
    at += 12 + length;
  }
  return "";
}

function showImages(items) {
  const box = $("images");
  box.textContent = "";
  $("preview").hidden = true;
  for (const { b64, seed } of items) {
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = "data:image/png;base64," + b64;
    image.alt = `seed ${seed}`;
    image.className = "result";
    image.dataset.seed = String(seed);
    const caption = document.createElement("figcaption");
    caption.textContent = pngText(b64, "parameters") || `Seed: ${seed}`;
    const link = document.createElement("a");
    link.href = image.src;
    link.download = `sdrt-${seed}.png`;
    link.textContent = "download PNG";
    figure.append(image, caption, link);
    box.append(figure);
  }
  if (items.length) $("seed").value = items[0].seed;
}

// ---- generating ---------------------------------------------------------------------------------------------
async function txt2img(v) {
  const body = { prompt: v.prompt, size: `${v.width}x${v.height}`, steps: v.steps, guidance_scale: v.guidance,
                 seed: v.seed, n: v.batch };
  if (v.negative_prompt) body.negative_prompt = v.negative_prompt;
  if (v.sampler) body.sampler = v.sampler;
  if (v.loras.length) body.loras = v.loras.map(([name, scale]) => ({ name, scale }));
  const streaming = Boolean(model && model.previews) && v.batch === 1;
  if (streaming) Object.assign(body, { stream: true, partial_images: 3 });
  const response = await api("/v1/images/generations", { method: "POST", body: JSON.stringify(body) });
  if (!response.ok) throw await errorOf(response);
  if (!streaming) {
    const data = await response.json();
    showImages(data.data.map((d) => ({ b64: d.b64_json, seed: d.seed })));
    return;
  }
  // server-sent events: image_generation.partial_image …, then image_generation.completed (or an error event)
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let partials = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const line = event.split("\n").find((l) => l.startsWith("data: "));
      if (!line) continue;
      const data = JSON.parse(line.slice(6));
      if (data.error) throw new ServerError(data.error.param ?? data.error.field, data.error.message);
      if (data.type === "image_generation.partial_image") {
        partials += 1;
        $("preview").src = "data:image/png;base64," + data.b64_json;
        $("preview").hidden = false;
        busy(true, `denoising… preview ${partials}`);
      } else if (data.type === "image_generation.completed") {
        showImages([{ b64: data.b64_json, seed: data.seed ?? Number(response.headers.get("X-Seed")) }]);
      }
    }
  }
}

async function img2img(v) {
  const body = { prompt: v.prompt, negative_prompt: v.negative_prompt, width: v.width, height: v.height,
                 steps: v.steps, cfg_scale: v.guidance, seed: v.seed, batch_size: v.batch,
                 denoising_strength: v.strength, init_images: [initImage.split(",")[1]] };
  if (v.sampler) body.sampler_name = v.sampler;
  if (maskPainted) body.mask = maskPng().split(",")[1];
  const response = await api("/sdapi/v1/img2img", { method: "POST", body: JSON.stringify(body) });
  if (!response.ok) throw await errorOf(response);
  const data = await response.json();
  const seeds = JSON.parse(data.info).all_seeds;
  showImages(data.images.map((b64, i) => ({ b64, seed: seeds[i] })));
}

async function generate() {
  clearErrors();
  const v = values();
  history.replaceState(null, "", "?" + address(v));
  busy(true, "generating…");
  try {
    if (v.mode === "img2img") {
      if (!initImage) throw new ServerError("init_image", "choose an image to start from");
      await img2img(v);
    } else {
      await txt2img(v);
    }
    busy(false, "");
  } catch (error) {
    busy(false, "");
    showError(error instanceof ServerError ? error : new ServerError(null, String(error)));
  }
}

$("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
$("seed").addEventListener("input", () => { $("random-seed").checked = false; });

// ---- image to image: the uploaded image and a painted mask ----------------------------------------------------
function maskPng() {
  const mask = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const g = out.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, out.width, out.height);
  g.drawImage(mask, 0, 0);  // white strokes = repaint
  return out.toDataURL("image/png");
}

function loadImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const image = new Image();
    image.onload = () => {
      const multiple = (model && model.size_multiple) || 8;
      const w = Math.max(multiple, Math.floor(image.width / multiple) * multiple);
      const h = Math.max(multiple, Math.floor(image.height / multiple) * multiple);
      for (const canvas of [$("image-canvas"), $("mask-canvas")]) { canvas.width = w; canvas.height = h; }
      $("image-canvas").getContext("2d").drawImage(image, 0, 0, w, h);
      initImage = $("image-canvas").toDataURL("image/png");
      maskPainted = false;
      $("width").value = w;
      $("height").value = h;
    };
    image.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function paint(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width;
  const y = (event.clientY - box.top) * canvas.height / box.height;
  const g = canvas.getContext("2d");
  g.fillStyle = "#fff";
  g.beginPath();
  g.arc(x, y, Number($("brush").value) / 2, 0, 2 * Math.PI);
  g.fill();
  maskPainted = true;
}

$("init-image").addEventListener("change", (event) => { if (event.target.files[0]) loadImage(event.target.files[0]); });
$("mask-canvas").addEventListener("pointerdown", (event) => { paint(event); $("mask-canvas").setPointerCapture(event.pointerId); });
$("mask-canvas").addEventListener("pointermove", (event) => { if (event.buttons) paint(event); });
$("clear-mask").addEventListener("click", () => {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
});
$("mode").addEventListener("change", () => { $("image-inputs").hidden = $("mode").value !== "img2img"; });

// ---- start ----------------------------------------------------------------------------------------------------
async function init() {
  const params = new URLSearchParams(location.search);
  try {
    const response = await api("/v1/models");
    if (!response.ok) throw await errorOf(response);
    model = (await response.json()).data[0];
  } catch (error) {
    $("model").textContent = "the server did not answer /v1/models: " + error.message;
    return;
  }
  $("model").textContent = `${model.id} · ${model.family}${model.ready ? "" : " · loading"}`;
  const sampler = $("sampler");
  sampler.append(new Option(`default (${model.default_sampler})`, ""));
  for (const name of model.a1111_samplers) sampler.append(new Option(name, name));
  for (const id of ["width", "height"]) { $(id).value = model.default_size; $(id).step = model.size_multiple; }
  if (model.img2img) $("image-field").hidden = false;
  if (model.inpaint) { $("mode").value = "img2img"; $("image-inputs").hidden = false; }

  const loras = await api("/sdapi/v1/loras");
  if (loras.ok) {
    const list = await loras.json();
    for (const lora of list) {
      const row = document.createElement("label");
      row.className = "lora";
      const input = document.createElement("input");
      Object.assign(input, { type: "number", step: "0.1", value: "0" });
      input.dataset.name = lora.name;
      row.append(lora.name, input);
      $("loras").append(row);
    }
    $("lora-field").hidden = list.length === 0;
  }
  const embeddings = await api("/sdapi/v1/embeddings");
  if (embeddings.ok) {
    const names = Object.keys((await embeddings.json()).loaded);
    $("embeddings").textContent = names.join(", ");
    $("embedding-field").hidden = names.length === 0;
  }
  fillFromAddress(params);
  document.body.dataset.ready = "1";
  if (params.get("generate") === "1") generate();
}

init();
