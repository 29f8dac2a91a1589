// The public JSON API, as the console uses it: every error becomes an ApiError carrying the API's own message.

const KEY_STORAGE = "facerec-api-key";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let keyRequired = false;
let askForKey = async () => null;

/** Whether the API needs X-API-Key (it answers 401 without one once keys exist), and how to ask for it. */
export function configureKey(required, ask) {
  keyRequired = required;
  askForKey = ask;
}

export function keyIsRequired() {
  return keyRequired;
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

export function hasStoredKey() {
  return Boolean(sessionStorage.getItem(KEY_STORAGE));
}

export function rememberKey(value) {
  sessionStorage.setItem(KEY_STORAGE, value);
}

async function key() {
  if (!keyRequired) return null;
  const stored = sessionStorage.getItem(KEY_STORAGE);
  if (stored) return stored;
  const entered = await askForKey();
  if (!entered) throw new ApiError(0, "cancelled", "No API key was given, so nothing was sent.");
  rememberKey(entered);
  return entered;
}

/**
 * fetch() a route of the API, with the API key once the service needs one (asking for it first when this tab
 * has none); statuses in `accept` are returned instead of thrown (an enrolment whose every photo was refused
 * answers 422 with details).
 */
export async function api(path, { method = "GET", body, accept = [] } = {}) {
  const headers = new Headers();
  const value = await key();
  if (value) headers.set("X-API-Key", value);
  let response;
  try {
    response = await fetch(path, { method, body, headers });
  } catch (error) {
    throw new ApiError(0, "network", `The service could not be reached (${error.message}).`);
  }
  const type = response.headers.get("content-type") || "";
  const payload = type.includes("application/json") ? await response.json() : await response.text();
  if (response.ok || accept.includes(response.status)) return { status: response.status, body: payload };
  if (response.status === 401) {
    keyRequired = true;
    if (!value) throw new ApiError(401, "unauthorized", "This service needs an API key.");
    forgetKey();
    throw new ApiError(401, "unauthorized", "The API key was refused. Enter the right key and try again.");
  }
  const error = payload && payload.error ? payload.error : {};
  const message = error.message || (payload && payload.detail) || `${response.status} ${response.statusText}`;
  throw new ApiError(response.status, error.code || String(response.status), String(message));
}

export function chipUrl(name, faceId) {
  return `/v1/people/${encodeURIComponent(name)}/faces/${encodeURIComponent(faceId)}/image`;
}

/**
 * A source for an <img> of a chip. An image element cannot send a header, so where the API needs a key the chip
 * is fetched with it and shown from memory (an object URL), never through a URL holding the key.
 */
export async function chipSource(path) {
  if (!keyRequired) return path;
  const value = await key();
  const response = await fetch(path, { headers: value ? { "X-API-Key": value } : {} });
  if (!response.ok) throw new ApiError(response.status, String(response.status), `The face image could not be read (${response.status}).`);
  return URL.createObjectURL(await response.blob());
}

/** An <img> whose chip arrives through chipSource(). */
export function chipImage(path, attributes) {
  const image = document.createElement("img");
  for (const [name, value] of Object.entries(attributes)) image.setAttribute(name, value);
  chipSource(path).then((source) => { image.src = source; }, () => image.classList.add("nochip"));
  return image;
}
