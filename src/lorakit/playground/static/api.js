// Every request the page makes: JSON in and out, the API key when one is set, OpenAI's error
// object turned into an ApiError, and the chat stream read as Server-Sent Events.

const KEY_STORAGE = "lorakit-api-key";

export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The key lives in sessionStorage: it survives a reload, not the closing of the tab.
export const auth = {
  key: () => sessionStorage.getItem(KEY_STORAGE) || "",
  setKey: (key) => sessionStorage.setItem(KEY_STORAGE, key),
  onNeeded: (message) => {},  // replaced by the page: show the key field
};

function headers(withBody) {
  const result = {};
  if (withBody) result["Content-Type"] = "application/json";
  const key = auth.key();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON (a proxy's page): keep the status line
  }
  if (response.status === 401) auth.onNeeded(message);
  return new ApiError(response.status, message, code);
}

async function send(path, { method = "GET", body, signal } = {}) {
  const withBody = body !== undefined;
  const response = await fetch(path, {
    method, signal, headers: headers(withBody), body: withBody ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) throw await failure(response);
  return response;
}

export async function request(path, options = {}) {
  return (await send(path, options)).json();
}

// The "data:" payloads of complete events in `buffer`, and what is left of it.
function takeEvents(buffer) {
  const events = [];
  let end;
  while ((end = buffer.indexOf("\n\n")) >= 0) {
    const data = buffer.slice(0, end).split("\n")
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).trimStart())
      .join("\n");
    if (data) events.push(data);
    buffer = buffer.slice(end + 2);
  }
  return [events, buffer];
}

// One streamed chat completion: onText(piece) for each piece of text as it comes, onUsage(usage)
// for the final usage chunk. Resolves at "data: [DONE]"; an error event rejects.
export async function streamChat(body, { signal, onText, onUsage }) {
  const response = await send("/v1/chat/completions", {
    method: "POST", signal, body: { ...body, stream: true, stream_options: { include_usage: true } },
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    let events;
    [events, buffer] = takeEvents(buffer + value.replaceAll("\r\n", "\n"));
    for (const data of events) {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code);
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) onText(piece);
      if (chunk.usage) onUsage(chunk.usage);
    }
  }
}
