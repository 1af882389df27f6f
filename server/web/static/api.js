// The server's API as the page uses it: the API key (kept in sessionStorage, so in this tab only),
// JSON calls, Prometheus counters, and a chat completion streamed as server-sent events.

const KEY_ITEM = "taer.apiKey";

/** A 401: the key is missing or wrong. */
export class AuthError extends Error {}

/** Any other refusal, with the server's own message (the OpenAI error shape). */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

function headers(extra = {}) {
  const key = storedKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function checked(response) {
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || message;
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) throw new AuthError(message);
  throw new ApiError(response.status, message);
}

export async function getJson(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  return (await checked(response)).json();
}

export async function postJson(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
  return (await checked(response)).json();
}

/** Sums of the named Prometheus counters and gauges over all their labels (a cluster labels each
 * replica's), from GET /metrics. `names` maps a sample name to the key it is summed under. */
export async function metricSums(names) {
  const response = await fetch("/metrics", { headers: headers(), cache: "no-store" });
  const text = await (await checked(response)).text();
  const sums = Object.fromEntries(Object.values(names).map((key) => [key, 0]));
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (match && match[1] in names) sums[names[match[1]]] += Number(match[3]);
  }
  return sums;
}

/** POST /v1/chat/completions with stream: true; calls onChunk with every parsed chunk. A server
 * error inside the stream (an `error` event) is thrown as an ApiError. */
export async function streamChat(body, onChunk) {
  const response = await checked(
    await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    }),
  );
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice("data: ".length);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk.error.message);
        onChunk(chunk);
      }
    }
  }
}
