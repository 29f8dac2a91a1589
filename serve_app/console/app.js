// The facerec console: recognise, enrol, manage people, verify and see the service's state, through the public
// JSON API only. Plain ES modules, no build step, nothing fetched from outside this service.

import {
  ApiError,
  api,
  chipImage,
  chipUrl,
  configureKey,
  forgetKey,
  hasStoredKey,
  keyIsRequired,
  rememberKey,
} from "./api.js";

const $ = (selector) => document.querySelector(selector);

/** A new element: el("p", { class: "error" }, "text", child, ...). */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function percent(value) {
  return `${(value * 100).toFixed(3)}%`;
}

function notice(message, kind = "") {
  const node = $("#notice");
  node.textContent = message;
  node.className = kind;
}

// --- the API key --------------------------------------------------------------------------------------------
function askForKey(problem = "") {
  const dialog = $("#key-dialog");
  const input = $("#key-input");
  input.value = "";
  $("#key-error").textContent = problem;
  return new Promise((resolve) => {
    const done = (value) => {
      $("#key-form").removeEventListener("submit", submit);
      $("#key-cancel").removeEventListener("click", cancel);
      dialog.close();
      resolve(value);
    };
    const submit = (event) => {
      event.preventDefault();
      if (input.value.trim()) done(input.value.trim());
    };
    const cancel = () => done(null);
    $("#key-form").addEventListener("submit", submit);
    $("#key-cancel").addEventListener("click", cancel);
    dialog.showModal();
    input.focus();
  });
}

function explain(error) {
  return error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`;
}

// --- screens ------------------------------------------------------------------------------------------------
const screens = ["recognise", "people", "verify", "status"];
const loaders = { people: loadPeople, status: loadStatus };

function show() {
  const wanted = location.hash.slice(1);
  const screen = screens.includes(wanted) ? wanted : "recognise";
  for (const name of screens) $(`#${name}`).hidden = name !== screen;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.screen === screen) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  notice("");
  if (loaders[screen]) loaders[screen]();
}

// --- Recognise ----------------------------------------------------------------------------------------------
async function recognise(file, card = null) {
  const target = card || el("article", { class: "result", "aria-label": `Result for ${file.name}` });
  if (!card) $("#results").prepend(target);
  target.replaceChildren(el("h3", {}, file.name), el("p", { class: "meta" }, "Recognising…"));
  const form = new FormData();
  form.append("image", file);
  try {
    const { body } = await api("/v1/recognize", { method: "POST", body: form });
    await renderRecognition(target, file, body);
  } catch (error) {
    target.replaceChildren(el("h3", {}, file.name), el("p", { class: "error", role: "alert" }, explain(error)));
  }
}

async function renderRecognition(card, file, result) {
  const url = URL.createObjectURL(file);
  const image = el("img", { src: url, alt: `${file.name}: ${describeFaces(result)}` });
  await image.decode().catch(() => undefined);
  const photo = el("div", { class: "photo" }, image);
  const details = el("div", { class: "details", "aria-live": "polite" });
  const faces = result.faces.length ? result.faces : result.best_guess ? [result.best_guess] : [];
  faces.forEach((face, index) => {
    const [x1, y1, x2, y2] = face.box;
    const name = face.name || "Unknown";
    const main = index === result.main_face || (!result.faces.length && index === 0);
    const label = `${main ? "★ " : ""}${name} ${face.similarity.toFixed(2)}`;
    const box = el(
      "button",
      {
        type: "button",
        class: `face${face.name ? "" : " unknown"}${main ? " main" : ""}`,
        "data-name": name,
        "aria-label": `Face ${index + 1}: ${name}, similarity ${face.similarity.toFixed(2)}${main ? ", main face" : ""}`,
        style: `left:${percent(x1 / result.width)};top:${percent(y1 / result.height)};` +
          `width:${percent((x2 - x1) / result.width)};height:${percent((y2 - y1) / result.height)}`,
        onclick: () => showFace(details, card, file, image, result, face, index),
      },
      el("span", { class: "label" }, label),
    );
    photo.append(box);
  });
  const timings = result.timings_ms;
  const threshold = result.threshold ? ` · threshold ${result.threshold.value}` : "";
  card.replaceChildren(
    el("h3", {}, file.name),
    photo,
    el(
      "p",
      { class: "meta" },
      `${result.faces.length} face${result.faces.length === 1 ? "" : "s"}` +
        (result.faces.length ? "" : result.best_guess ? " (one weak candidate shown)" : "") +
        ` · model ${result.model_id}${threshold} · decode ${timings.decode} ms, detect ${timings.detect} ms, ` +
        `embed ${timings.embed} ms, match ${timings.match} ms`,
    ),
    details,
  );
}

function describeFaces(result) {
  if (!result.faces.length) return "no face found";
  return result.faces.map((face) => face.name || "Unknown").join(", ");
}

function showFace(details, card, file, image, result, face, index) {
  const name = face.name || "Unknown";
  const candidates = el(
    "ul",
    { class: "candidates", "aria-label": "Closest people" },
    ...face.candidates.map((candidate) =>
      el(
        "li",
        {},
        // Chips are the gallery's: shown to a key that may manage it, not to a recognition-only key.
        canManage ? chipImage(chipUrl(candidate.name, candidate.face_id), { class: "chip", alt: `${candidate.name}'s face` }) : "",
        `${candidate.name} ${candidate.similarity.toFixed(3)}`,
      ),
    ),
  );
  const parts = [el("h4", {}, `Face ${index + 1}: ${name}`)];
  parts.push(face.candidates.length ? candidates : el("p", { class: "meta" }, "Nobody is enrolled yet."));
  const outcome = el("p", { role: "status" });
  const input = el("input", { name: "name", required: true, maxlength: 100, autocomplete: "off", value: face.name || "" });
  const form = el(
    "form",
    {
      class: "row",
      onsubmit: async (event) => {
        event.preventDefault();
        outcome.className = "";
        outcome.textContent = "Enrolling…";
        try {
          const crop = await cropFace(image, face.box, result.width, result.height);
          const sent = await enrol(input.value.trim(), [new File([crop], `${file.name}-face${index + 1}.jpg`, { type: "image/jpeg" })]);
          outcome.className = sent.ok ? "ok" : "error";
          outcome.textContent = sent.message;
          if (sent.ok) await recognise(file, card);
        } catch (error) {
          outcome.className = "error";
          outcome.textContent = explain(error);
        }
      },
    },
    el("label", {}, face.name ? "Add this face to" : "Name this face", input),
    el("button", { type: "submit" }, "Enrol this face"),
  );
  parts.push(form, outcome);
  details.replaceChildren(...parts);
  input.focus();
}

/** The face's region of the photo with a wide margin, as JPEG: a photo of that one face to enrol. */
async function cropFace(image, box, width, height) {
  const [x1, y1, x2, y2] = box;
  const margin = 0.6 * Math.max(x2 - x1, y2 - y1);
  const left = Math.max(0, x1 - margin);
  const top = Math.max(0, y1 - margin);
  const right = Math.min(width, x2 + margin);
  const bottom = Math.min(height, y2 + margin);
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(right - left);
  canvas.height = Math.round(bottom - top);
  const scale = image.naturalWidth / width;
  canvas
    .getContext("2d")
    .drawImage(image, left * scale, top * scale, (right - left) * scale, (bottom - top) * scale, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.95));
}

/** Enrol photos for a name; { ok, message } says what was enrolled and why any photo was refused. */
async function enrol(name, files) {
  if (!name) return { ok: false, message: "Give the person a name." };
  const form = new FormData();
  for (const file of files) form.append("images", file);
  const { status, body } = await api(`/v1/people/${encodeURIComponent(name)}/faces`, {
    method: "POST",
    body: form,
    accept: [422],
  });
  if (status === 422 && !body.enrolled) throw new ApiError(422, body.error.code, body.error.message);
  const refused = body.refused.map((r) => `${r.photo}: ${r.reason}`);
  const enrolled = body.enrolled.length;
  const message =
    (enrolled ? `Enrolled ${enrolled} face${enrolled === 1 ? "" : "s"} of ${body.name}.` : `Nothing enrolled for ${body.name}.`) +
    (refused.length ? ` Refused: ${refused.join("; ")}.` : "");
  return { ok: enrolled > 0, message };
}

function setUpRecognise() {
  const input = $("#recognise-files");
  const drop = $("#drop");
  input.addEventListener("change", () => {
    for (const file of input.files) recognise(file);
    input.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    for (const file of event.dataTransfer.files) recognise(file);
  });
}

// --- People -------------------------------------------------------------------------------------------------
let people = [];

async function loadPeople() {
  try {
    const { body } = await api("/v1/people");
    people = body.people;
    await renderPeople();
  } catch (error) {
    notice(explain(error), "error");
  }
}

async function renderPeople() {
  const query = $("#people-search").value.trim().toLowerCase();
  const shown = people.filter((person) => person.name.toLowerCase().includes(query)).slice(0, 200);
  const faces = people.reduce((sum, person) => sum + person.faces, 0);
  $("#people-count").textContent =
    `${people.length} ${people.length === 1 ? "person" : "people"}, ${faces} face${faces === 1 ? "" : "s"}` +
    (shown.length < people.length ? ` (showing ${shown.length})` : "");
  const cards = await Promise.all(shown.map(personCard));
  $("#people-grid").replaceChildren(...cards);
}

async function personCard(summary) {
  const card = el("article", { class: "person", "aria-label": summary.name });
  let faceList = [];
  try {
    faceList = (await api(`/v1/people/${encodeURIComponent(summary.name)}`)).body.face_list;
  } catch (error) {
    card.append(el("p", { class: "error" }, explain(error)));
  }
  const chips = faceList.map((face) =>
    el(
      "figure",
      {},
      face.image
        ? chipImage(face.image, { class: "chip", alt: `${summary.name}, face ${face.face_id}` })
        : el("div", { class: "chip nochip" }, "no image (imported)"),
      el(
        "button",
        {
          type: "button",
          class: "danger",
          "aria-label": `Remove face ${face.face_id} of ${summary.name}`,
          onclick: () => removeFace(summary.name, face.face_id),
        },
        "×",
      ),
    ),
  );
  card.prepend(
    el(
      "h3",
      {},
      el("span", {}, `${summary.name} (${summary.faces})`),
      el(
        "button",
        { type: "button", class: "danger", "aria-label": `Remove ${summary.name}`, onclick: () => removePerson(summary.name) },
        "Remove",
      ),
    ),
    el("div", { class: "chips" }, ...chips),
  );
  return card;
}

async function removeFace(name, faceId) {
  if (!confirm(`Remove this face of ${name}?`)) return;
  try {
    await api(`/v1/people/${encodeURIComponent(name)}/faces/${encodeURIComponent(faceId)}`, { method: "DELETE" });
    notice(`Removed a face of ${name}.`, "ok");
    await loadPeople();
  } catch (error) {
    notice(explain(error), "error");
  }
}

async function removePerson(name) {
  if (!confirm(`Remove ${name} and all their faces?`)) return;
  try {
    const { body } = await api(`/v1/people/${encodeURIComponent(name)}`, { method: "DELETE" });
    notice(`Removed ${name} (${body.removed_faces} face${body.removed_faces === 1 ? "" : "s"}).`, "ok");
    await loadPeople();
  } catch (error) {
    notice(explain(error), "error");
  }
}

function setUpPeople() {
  $("#people-search").addEventListener("input", renderPeople);
  $("#enrol-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const outcome = $("#enrol-outcome");
    outcome.className = "";
    outcome.textContent = "Enrolling…";
    try {
      const sent = await enrol($("#enrol-name").value.trim(), [...$("#enrol-files").files]);
      outcome.className = sent.ok ? "ok" : "error";
      outcome.textContent = sent.message;
      if (sent.ok) {
        $("#enrol-form").reset();
        await loadPeople();
      }
    } catch (error) {
      outcome.className = "error";
      outcome.textContent = explain(error);
    }
  });
}

// --- Verify -------------------------------------------------------------------------------------------------
function setUpVerify() {
  $("#verify-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const outcome = $("#verify-outcome");
    outcome.className = "";
    outcome.textContent = "Comparing…";
    const form = new FormData();
    form.append("image1", $("#verify-1").files[0]);
    form.append("image2", $("#verify-2").files[0]);
    try {
      const { body } = await api("/v1/verify", { method: "POST", body: form });
      outcome.className = body.same_person ? "ok" : "";
      outcome.textContent =
        `${body.same_person ? "The same person" : "Different people"}: similarity ${body.similarity} ` +
        `${body.same_person ? "≥" : "<"} threshold ${body.threshold} (model ${body.model_id}).`;
    } catch (error) {
      outcome.className = "error";
      outcome.textContent = explain(error);
    }
  });
}

// --- Status -------------------------------------------------------------------------------------------------
async function loadStatus() {
  const list = $("#status-list");
  try {
    const [{ body }, gallery] = await Promise.all([api("/v1/status"), canManage ? api("/v1/gallery").catch(() => null) : null]);
    const snapshots = gallery ? gallery.body.snapshots.map((s) => `${s.model_id}${s.active ? " (active)" : ""}: ${s.faces} faces`).join("; ") : "";
    const change = gallery && gallery.body.reembedding;
    const rows = [
      ["Health", body.status],
      ["Model", body.model_id],
      ["Gallery", body.gallery_revision === undefined ? "" : `revision ${body.gallery_revision}: ${body.gallery_people} people, ${body.gallery_faces} faces`],
      ["Snapshots (one per model)", snapshots],
      ["Re-embedding", change ? `into ${change.target_model}: ${change.done} of ${change.total} faces, ${change.state}` : ""],
      ["Threshold", body.threshold ? `${body.threshold.value} (${body.threshold.source})` : ""],
      ["Recognizer replicas ready", body.replicas_ready === undefined ? "" : String(body.replicas_ready)],
      ["Request queue", body.queue ? `${body.queue.waiting} waiting, ${body.queue.in_flight} in flight, ${body.queue.dead_letters} dead letters` : "no SQS bridge here"],
      ["API key", body.api_key_required ? "required on every route" : "not required: anyone who can reach the service may use it"],
      ["This tab's key", body.key ? `${body.key.name} (${body.key.scopes.join(", ")})` : ""],
    ];
    list.replaceChildren(...rows.filter(([, value]) => value !== "").flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
  } catch (error) {
    list.replaceChildren(el("dt", {}, "Health"), el("dd", { class: "error" }, explain(error)));
  }
}

// --- start --------------------------------------------------------------------------------------------------
/** Whether this tab's key may read and change the gallery (People, chips): false for a recognition-only key. */
let canManage = true;

/** The service's status, asking for a key until one works (null: no key given, or the service is down). */
async function unlock() {
  let problem = "";
  for (;;) {
    try {
      return (await api("/v1/status")).body;
    } catch (error) {
      if (error instanceof ApiError && error.code === "cancelled") {
        notice("This service needs an API key: ask its operator for one (facerec keys create).", "error");
        return null;
      }
      if (!(error instanceof ApiError) || error.status !== 401) {
        notice(`The service is not answering yet: ${explain(error)}`, "error");
        return null;
      }
      if (error.message.includes("refused")) problem = "That key was refused: check it and try again.";
      if (!hasStoredKey()) {
        const value = await askForKey(problem);
        if (!value) {
          notice("This service needs an API key: ask its operator for one (facerec keys create).", "error");
          return null;
        }
        rememberKey(value);
      }
    }
  }
}

/** Show People (and chips) only to a key with the manage scope: the status says what this tab's key may do. */
function applyScopes(status) {
  if (!status || !status.key || status.key.scopes.includes("manage")) return;
  canManage = false;
  $("nav a[data-screen=people]").hidden = true;
  if (location.hash === "#people") location.hash = "#recognise";
}

async function start() {
  $("#dashboard-link").href = `${location.protocol}//${location.hostname}:8265`;
  setUpRecognise();
  setUpPeople();
  setUpVerify();
  // The one route open to all says whether the others need a key, so that the first call carries one.
  let required = false;
  try {
    required = Boolean((await (await fetch("/healthz")).json()).api_key_required);
  } catch (error) {
    required = false;  // unlock() below finds out, and says what is wrong
  }
  configureKey(required, askForKey);
  const status = await unlock();
  configureKey(keyIsRequired() || Boolean(status && status.api_key_required), askForKey);
  applyScopes(status);
  const keyButton = $("#key-button");
  keyButton.hidden = !keyIsRequired();
  keyButton.addEventListener("click", async () => {
    forgetKey();
    const value = await askForKey();
    if (value) rememberKey(value);
    location.reload();  // what the new key may see (People, chips) is decided at start
  });
  window.addEventListener("hashchange", show);
  show();
  document.body.dataset.ready = keyIsRequired() ? "key" : "open";
  document.body.dataset.scope = canManage ? "manage" : "recognize";
}

start();
