// sdfunc's web page: log in, generate (with progress), browse and reuse image records, see usage.
// Plain browser JavaScript over the function's own HTTP API; nothing is fetched from outside the function.
"use strict";

const $ = (sel) => document.querySelector(sel);
// `session` counts logins: work started under an earlier one (a generation, a poll, a listing) drops its result.
const state = { config: null, auth: null, session: 0, page: 1, perPage: 12, pages: 1, objectUrls: [], listing: 0 };

// --- HTTP --------------------------------------------------------------------------------------------------
function authHeader() {
  // X-Requested-With: the server then challenges with "xBasic", so the browser shows no login dialog of its own.
  const headers = { "X-Requested-With": "XMLHttpRequest" };
  if (state.auth) headers.Authorization = state.auth;
  return headers;
}

async function api(path, { method = "GET", body, headers = {} } = {}) {
  const init = { method, headers: { ...authHeader(), ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const session = state.session;
  const response = await fetch(path, init);
  if (session !== state.session) throw new Error("not logged in");  // logged out meanwhile
  if (response.status === 401 && state.config && state.config.auth_mode !== "none") {
    logout("Your session ended: log in again.");
    throw new Error("not logged in");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const err = (await response.json()).error;
      if (err && err.message) message = err.message;
    } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

const json = async (path, options) => (await api(path, options)).json();

function base64Utf8(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  bytes.forEach((b) => { binary += String.fromCharCode(b); });
  return btoa(binary);
}

// --- login -------------------------------------------------------------------------------------------------
async function start() {
  state.config = await (await fetch("/web/config")).json();
  $("#logout").addEventListener("click", () => logout(""));
  $("#login-form").addEventListener("submit", onLogin);
  for (const name of TABS) {
    $(`#tab-${name}`).addEventListener("click", () => showTab(name));
  }
  $(".tabs").addEventListener("keydown", onTabKey);
  $("#generate-form").addEventListener("submit", onGenerate);
  $("#lora-add").addEventListener("click", addLora);
  $("#images-prev").addEventListener("click", () => loadImages(state.page - 1));
  $("#images-next").addEventListener("click", () => loadImages(state.page + 1));
  state.auth = sessionStorage.getItem("sdfunc-auth");
  if (state.config.auth_mode === "none" || state.auth) {
    try {
      await enter();
      return;
    } catch (err) {
      if (state.config.auth_mode === "none") throw err;  // nothing to log in with: say what went wrong
      state.auth = null;
      sessionStorage.removeItem("sdfunc-auth");
    }
  }
  showLogin("");
}

function showLogin(message) {
  const mode = state.config.auth_mode;
  const already = !$("#login").hidden;
  $("#app").hidden = true;
  $("#who").hidden = true;
  $("#login").hidden = false;
  $("#login-basic").hidden = mode !== "basic";
  $("#login-token-field").hidden = mode !== "token";
  for (const input of document.querySelectorAll("#login input")) input.disabled = input.closest("[hidden]") !== null;
  $("#login-error").textContent = message;
  if (!already) (mode === "basic" ? $("#login-user") : $("#login-token")).focus();
}

async function onLogin(event) {
  event.preventDefault();
  const mode = state.config.auth_mode;
  state.auth = mode === "basic"
    ? "Basic " + base64Utf8(`${$("#login-user").value}:${$("#login-password").value}`)
    : "Bearer " + $("#login-token").value.trim();
  $("#login-submit").disabled = true;
  try {
    await enter();
    sessionStorage.setItem("sdfunc-auth", state.auth);
    $("#login-password").value = "";
    $("#login-token").value = "";
  } catch (err) {
    state.auth = null;
    $("#login-error").textContent = err.status === 401 ? "Wrong user name, password or token." : err.message;
  } finally {
    $("#login-submit").disabled = false;
  }
}

function logout(message) {
  state.auth = null;
  state.session += 1;  // anything still running for the old login drops its result
  sessionStorage.removeItem("sdfunc-auth");
  if (state.config.auth_mode === "none") return;
  clearPage();
  showLogin(message);
}

function clearPage() {
  // Nothing of the previous consumer stays on the page.
  $("#generate-form").reset();
  $("#result").hidden = true;
  $("#result-image").removeAttribute("src");
  for (const id of ["#result-seed", "#result-charge", "#result-infotext", "#error", "#status", "#images-page"]) {
    $(id).textContent = "";
  }
  $("#progress").hidden = true;
  $("#generate").disabled = false;
  releaseObjectUrls();
  $("#images-list").replaceChildren();
  $("#usage-table tbody").replaceChildren();
  $("#usage-chart").replaceChildren($("#usage-chart title"));
  state.page = 1;
  state.pages = 1;
}

async function enter() {
  const check = await fetch("/account", { headers: authHeader() });
  if (!check.ok) {
    let message = `${check.status} ${check.statusText}`;
    try { message = (await check.json()).error.message || message; } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = check.status;
    throw error;
  }
  const account = await check.json();
  await loadChoices();  // before the app shows: a failure here leaves the login form with its message
  state.session += 1;
  $("#whoami").textContent = account.consumer;
  $("#who").hidden = false;
  $("#logout").hidden = state.config.auth_mode === "none";
  $("#login").hidden = true;
  $("#app").hidden = false;
  showTab("generate");
}

// --- tabs --------------------------------------------------------------------------------------------------
const TABS = ["generate", "images", "usage"];

function onTabKey(event) {
  // The tablist pattern: arrows move between tabs (only the active one is in the Tab order), Home/End jump.
  const current = TABS.findIndex((name) => $(`#tab-${name}`).getAttribute("aria-selected") === "true");
  const moves = { ArrowRight: current + 1, ArrowLeft: current - 1, Home: 0, End: TABS.length - 1 };
  if (!(event.key in moves)) return;
  event.preventDefault();
  const next = TABS[(moves[event.key] + TABS.length) % TABS.length];
  showTab(next);
  $(`#tab-${next}`).focus();
}

function showTab(name) {
  for (const other of TABS) {
    const active = other === name;
    $(`#tab-${other}`).setAttribute("aria-selected", String(active));
    $(`#tab-${other}`).tabIndex = active ? 0 : -1;
    $(`#panel-${other}`).hidden = !active;
  }
  if (name === "images") loadImages(state.page);
  if (name === "usage") loadUsage();
}

// --- generate ----------------------------------------------------------------------------------------------
function option(value, text) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = text;
  return el;
}

async function loadChoices() {
  const [models, samplers, loras, options] = await Promise.all([
    json("/sdapi/v1/sd-models"), json("/sdapi/v1/samplers"), json("/sdapi/v1/loras"), json("/sdapi/v1/options"),
  ]);
  const checkpoint = $("#checkpoint");
  checkpoint.replaceChildren(...models.map((m) => option(m.title, m.model_name)));
  const current = String(options.sd_model_checkpoint || "");
  const chosen = models.find((m) => current && (m.title === current || current.startsWith(m.model_name)));
  if (chosen) checkpoint.value = chosen.title;
  $("#sampler").replaceChildren(...samplers.map((s) => option(s.name, s.name)));
  if (samplers.some((s) => s.name === "Euler a")) $("#sampler").value = "Euler a";
  const lora = $("#lora");
  lora.replaceChildren(...(loras.length ? loras.map((l) => option(l.name, l.name)) : [option("", "(none installed)")]));
  lora.disabled = loras.length === 0;
  $("#lora-add").disabled = loras.length === 0;
  $("#lora-note").textContent = loraNote(loras.length);
}

function loraNote(count) {
  // Filled from the server's listing, not written into index.html: a note there went stale once (it said LoRAs
  // were not applied after the server began applying them), and what is installed changes with the mount.
  if (count === 0) {
    return "No LoRAs are installed. To add some, put LoRA .safetensors files in models/Lora on the function's "
      + "data mount and rescan (POST /sdapi/v1/refresh-loras); an admin's POST /models/download does both.";
  }
  return `${count} LoRA${count === 1 ? "" : "s"} installed. The server applies each <lora:name:weight> tag in `
    + "the prompt; \"Add to prompt\" writes weight 1.";
}

function addLora() {
  const name = $("#lora").value;
  if (!name) return;
  const prompt = $("#prompt");
  const tag = `<lora:${name}:1>`;
  prompt.value = prompt.value.trim() ? `${prompt.value.trim()} ${tag}` : tag;
}

function number(id) {
  return Number($(id).value);
}

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function onGenerate(event) {
  event.preventDefault();
  const button = $("#generate");
  if (button.disabled) return;
  $("#error").textContent = "";
  const seed = $("#seed").value.trim() === "" ? -1 : number("#seed");
  const body = {
    prompt: $("#prompt").value, negative_prompt: $("#negative-prompt").value,
    width: number("#width"), height: number("#height"), steps: number("#steps"), cfg_scale: number("#cfg-scale"),
    seed, sampler_name: $("#sampler").value,
    override_settings: { sd_model_checkpoint: $("#checkpoint").value },
  };
  const session = state.session;
  button.disabled = true;
  $("#status").textContent = "Generating…";
  const stop = watchProgress(session);
  try {
    // The Idempotency-Key keeps the PNG with the records, so the Images tab can show and download it.
    const response = await api("/sdapi/v1/txt2img", { method: "POST", body, headers: { "Idempotency-Key": newKey() } });
    const result = await response.json();
    if (session !== state.session) return;
    showResult(result, response.headers);
    $("#status").textContent = `Done: seed ${$("#result-seed").textContent}, ${$("#result-charge").textContent}.`;
  } catch (err) {
    if (session !== state.session) return;
    $("#status").textContent = "";
    $("#error").textContent = err.message;
  } finally {
    stop();
    if (session === state.session) button.disabled = false;
  }
}

function watchProgress(session) {
  // Polls the worker's progress: the job running on the device (for an admin any job, which may be queued
  // work before ours; for a consumer only its own, another consumer's job reads as 0).
  const bar = $("#progress");
  const fill = bar.querySelector(".fill");
  let running = true;
  clearTimeout(state.hideProgress);
  const set = (fraction) => {
    const percent = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
    bar.setAttribute("aria-valuenow", String(percent));
    fill.style.width = `${percent}%`;
  };
  set(0);
  bar.hidden = false;
  const tick = async () => {
    while (running && session === state.session) {
      try {
        const progress = await json("/sdapi/v1/progress?skip_current_image=true");
        if (running) set(progress.progress || 0);
      } catch (_) { /* keep polling while the request runs */ }
      await new Promise((resolve) => setTimeout(resolve, 300));
    }
  };
  tick();
  return () => {
    running = false;
    set(1);
    state.hideProgress = setTimeout(() => { bar.hidden = true; }, 300);
  };
}

function showResult(result, headers) {
  const info = JSON.parse(result.info);
  const billing = result.parameters.billing || {};
  const seed = info.all_seeds ? info.all_seeds[0] : info.seed;
  const image = $("#result-image");
  image.src = `data:image/png;base64,${result.images[0]}`;
  image.alt = `Generated image, seed ${seed}`;
  $("#result-seed").textContent = String(seed);
  const amount = headers.get("X-Charge") || billing.amount || "0";
  const currency = headers.get("X-Charge-Currency") || billing.currency || "";
  const ms = headers.get("X-Billed-Duration-Ms") || billing.billed_ms || 0;
  $("#result-charge").textContent = `${amount} ${currency} for ${ms} ms`;
  $("#result-infotext").textContent = (info.infotexts && info.infotexts[0]) || "";
  $("#result").hidden = false;
}

// --- images ------------------------------------------------------------------------------------------------
function releaseObjectUrls() {
  state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  state.objectUrls = [];
}

async function imageUrl(id) {
  const blob = await (await api(`/images/${id}`)).blob();
  const url = URL.createObjectURL(blob);
  state.objectUrls.push(url);
  return url;
}

async function loadImages(page) {
  page = Math.max(1, Math.min(page, state.pages || 1));
  const ticket = ++state.listing;  // only the latest listing draws (Previous/Next clicked quickly)
  let listing;
  try {
    listing = await json(`/images?page=${page}&per_page=${state.perPage}`);
  } catch (err) {
    if (ticket === state.listing) $("#images-page").textContent = err.message;
    return;
  }
  if (ticket !== state.listing) return;
  state.page = page;
  state.pages = Math.max(1, Math.ceil(listing.total / state.perPage));
  releaseObjectUrls();
  const list = $("#images-list");
  list.replaceChildren(...listing.images.map(imageItem));
  $("#images-empty").hidden = listing.images.length > 0;
  $("#images-page").textContent = `Page ${state.page} of ${state.pages}`;
  $("#images-prev").disabled = state.page <= 1;
  $("#images-next").disabled = state.page >= state.pages;
}

function imageItem(record) {
  const item = document.createElement("li");
  item.className = "image-item";
  item.dataset.id = String(record.id);
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = `${record.prompt || "(no prompt)"}, seed ${record.seed}`;
  const available = record.stored || record.image_url;
  const ticket = state.listing;
  if (available) {
    imageUrl(record.id).then((url) => {
      if (ticket === state.listing) img.src = url;
      else URL.revokeObjectURL(url);  // the listing was replaced while this one loaded
    }).catch(() => { img.alt += " (unavailable)"; });
  }
  const text = document.createElement("p");
  text.textContent = record.prompt || "(no prompt)";
  const meta = document.createElement("p");
  meta.innerHTML = "Seed <span class=\"seed\"></span> · <span class=\"size\"></span> · <span class=\"when\"></span>";
  meta.querySelector(".seed").textContent = String(record.seed);
  meta.querySelector(".size").textContent = record.size;
  meta.querySelector(".when").textContent = new Date(record.created_at).toLocaleString();
  const actions = document.createElement("div");
  actions.className = "actions";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "reuse";
  reuse.textContent = "Reuse parameters";
  reuse.setAttribute("aria-label", `Reuse the parameters of image ${record.id}`);
  reuse.addEventListener("click", () => reuseParameters(record));
  const download = document.createElement("button");
  download.type = "button";
  download.className = "download";
  download.textContent = "Download";
  download.setAttribute("aria-label", `Download image ${record.id}`);
  download.disabled = !available;
  download.addEventListener("click", () => downloadImage(record.id));
  actions.append(reuse, download);
  item.append(img, text, meta, actions);
  return item;
}

function reuseParameters(record) {
  $("#prompt").value = record.prompt;
  $("#negative-prompt").value = record.negative_prompt;
  $("#steps").value = record.steps;
  $("#seed").value = record.seed;
  $("#cfg-scale").value = record.cfg_scale;
  const [width, height] = String(record.size).split("x").map(Number);
  if (width && height) {
    $("#width").value = width;
    $("#height").value = height;
  }
  if ([...$("#sampler").options].some((o) => o.value === record.sampler)) $("#sampler").value = record.sampler;
  const model = [...$("#checkpoint").options].find((o) => record.model && o.textContent === record.model);
  if (model) $("#checkpoint").value = model.value;
  showTab("generate");
  $("#prompt").focus();
}

async function downloadImage(id) {
  try {
    const link = document.createElement("a");
    link.href = await imageUrl(id);
    link.download = `sdfunc-${id}.png`;
    document.body.append(link);
    link.click();
    link.remove();
  } catch (err) {
    $("#images-page").textContent = `Download failed: ${err.message}`;
  }
}

// --- usage -------------------------------------------------------------------------------------------------
async function loadUsage() {
  const since = new Date(Date.now() - 29 * 86400e3).toISOString().slice(0, 10);
  let usage;
  try {
    usage = await json(`/billing/usage?group=day&since=${since}`);
  } catch (err) {
    $("#usage-error").textContent = err.message;
    return;
  }
  $("#usage-error").textContent = "";
  const totals = usage.totals;
  const currency = state.config.currency;
  $("#usage-total-requests").textContent = String(totals.requests);
  $("#usage-total-amount").textContent = `${totals.amount[currency] || "0"} ${currency}`;
  $("#usage-total-billed").textContent = `${(totals.billed_ms / 1000).toFixed(3)} s`;
  drawChart(usage.rows, since);
  const body = $("#usage-table tbody");
  body.replaceChildren(...usage.rows.map((row) => {
    const tr = document.createElement("tr");
    for (const value of [row.key, row.requests, row.failed, row.images, `${(row.billed_ms / 1000).toFixed(3)} s`,
      `${row.amount} ${row.currency}`]) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.append(td);
    }
    return tr;
  }));
}

function drawChart(rows, since) {
  // One slot per day of the window, a bar for each day with requests: charges, or billed seconds when every
  // price is 0 (so the chart still says something).
  const svg = $("#usage-chart");
  const ns = "http://www.w3.org/2000/svg";
  const byAmount = rows.some((r) => Number(r.amount) > 0);
  const value = (r) => (byAmount ? Number(r.amount) : r.billed_ms / 1000);
  const max = Math.max(...rows.map(value), 0) || 1;
  const title = svg.querySelector("title");
  title.textContent = byAmount ? "Charges per day" : "Billed seconds per day (every price is 0)";
  svg.replaceChildren(title);
  const width = 600;
  const height = 200;
  const top = 16;
  const bottom = 18;
  const days = 30;
  const slot = width / days;
  const start = Date.parse(`${since}T00:00:00Z`);
  const label = (x, y, text, anchor) => {
    const el = document.createElementNS(ns, "text");
    el.setAttribute("x", String(x));
    el.setAttribute("y", String(y));
    el.setAttribute("text-anchor", anchor);
    el.setAttribute("class", "axis");
    el.textContent = text;
    svg.append(el);
  };
  rows.forEach((row) => {
    const day = Math.round((Date.parse(`${row.key}T00:00:00Z`) - start) / 86400e3);
    const h = Math.max(2, (value(row) / max) * (height - top - bottom));
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("class", "bar");
    rect.setAttribute("x", String(Math.max(0, Math.min(days - 1, day)) * slot + slot * 0.15));
    rect.setAttribute("width", String(slot * 0.7));
    rect.setAttribute("y", String(height - bottom - h));
    rect.setAttribute("height", String(h));
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `${row.key}: ${row.amount} ${row.currency}, ${(row.billed_ms / 1000).toFixed(3)} s billed, `
      + `${row.requests} request(s)`;
    rect.append(tip);
    svg.append(rect);
  });
  const unit = byAmount ? ` ${state.config.currency}` : " s";
  label(2, 12, `max ${byAmount ? max : max.toFixed(3)}${unit}`, "start");
  label(2, height - 4, since, "start");
  label(width - 2, height - 4, new Date(start + (days - 1) * 86400e3).toISOString().slice(0, 10), "end");
}

start().catch((err) => {
  document.body.insertAdjacentHTML("beforeend", "<p class=\"error\" role=\"alert\"></p>");
  document.body.lastElementChild.textContent = `The page could not start: ${err.message}`;
});
