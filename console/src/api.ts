// The console talks to the same HTTP API as every other client, with the API key the user
// logged in with (kept for the browser tab only, in sessionStorage).

const KEY_STORAGE = "tagstream.key";

export function storedKey(): string | null {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key: string | null) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(
    public status: number,
    message: string,
    public body: any,
  ) {
    super(message);
  }
}

function headers(extra?: Record<string, string>): Record<string, string> {
  const key = storedKey();
  return { ...(key ? { Authorization: `Bearer ${key}` } : {}), ...(extra ?? {}) };
}

/** A request to the API; JSON answers parsed, errors thrown with the API's message. */
export async function api<T = any>(
  method: string,
  path: string,
  body?: unknown,
  signal?: AbortSignal,
): Promise<T> {
  const response = await fetch(path, {
    method,
    headers: headers(body === undefined ? undefined : { "Content-Type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  return answer<T>(response);
}

/** The answer parsed (JSON or text); an error status thrown with the API's message. */
async function answer<T>(response: Response): Promise<T> {
  const type = response.headers.get("content-type") ?? "";
  const parsed = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const message = typeof parsed === "object" && parsed?.error ? parsed.error : String(parsed);
    throw new ApiError(response.status, message, parsed);
  }
  return parsed as T;
}

/** A request whose body is text (a rule set), with extra headers (`If-Match`). */
export async function apiText<T = any>(
  method: string,
  path: string,
  text: string,
  extra?: Record<string, string>,
): Promise<T> {
  const response = await fetch(path, {
    method,
    headers: headers({ "Content-Type": "text/plain; charset=utf-8", ...(extra ?? {}) }),
    body: text,
  });
  return answer<T>(response);
}

/** The rule set's text and its version (the ETag, for `If-Match`). */
export async function rulesWithVersion(): Promise<{ text: string; etag: string | null }> {
  const response = await fetch("/v1/rules", { headers: headers() });
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try {
      message = JSON.parse(text).error ?? text;
    } catch {}
    throw new ApiError(response.status, message, null);
  }
  return { text, etag: response.headers.get("etag") };
}

/** Downloads an export (the key goes in a header, so not through a plain link). */
export async function download(path: string, filename: string) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new ApiError(response.status, await response.text(), null);
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  a.click();
  URL.revokeObjectURL(url);
}

/** The curl command that does what the console just did, for scripts and IT. */
export function curlOf(method: string, path: string, body?: unknown): string {
  const key = storedKey() ? ` -H "Authorization: Bearer $TAGSTREAM_KEY"` : "";
  const data = body === undefined ? "" : ` -H 'Content-Type: application/json' -d '${JSON.stringify(body).replace(/'/g, "'\\''")}'`;
  return `curl -s -X ${method}${key}${data} "${location.origin}${path}"`;
}

export interface Diagnostic {
  line: number;
  column: number;
  code: string;
  message: string;
}

/** The names a rule set defines, by kind (for the pickers). */
export function definitions(text: string): { kind: string; name: string }[] {
  const out: { kind: string; name: string }[] = [];
  for (const line of text.split("\n")) {
    const m = /^\s*(tag|segment|trait)\s+([^\s=]+)/u.exec(line);
    if (m) out.push({ kind: m[1], name: m[2] });
  }
  return out;
}
