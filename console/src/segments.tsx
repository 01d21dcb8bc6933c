import { useEffect, useRef, useState } from "preact/hooks";
import { api, ApiError, curlOf, definitions, Diagnostic, download } from "./api";
import { Texts } from "./i18n";

interface QueryResult {
  count: number;
  customers: string[];
  warnings: string[];
}

/** How long after the keystroke that made an expression its count is on screen: a User
 *  Timing measure per count shown (see DevTools' performance panel; bench/console.sh reads
 *  them at 10M customers). */
const COUNT_MEASURE = "tagstream:count";

/** Wait after a keystroke before counting: long enough to skip the counts of a word being
 *  typed, short enough that the number follows the typing (a newer expression also cancels
 *  the request in flight). */
const DEBOUNCE_MS = 30;

/** The expression with each diagnostic's token underlined at its line and column. */
export function Underlined({ text, diagnostics }: { text: string; diagnostics: Diagnostic[] }) {
  const lines = text.split("\n");
  return (
    <pre class="underlined" id="diagnostics">
      {lines.map((line, i) => {
        const here = diagnostics.filter((d) => d.line === i + 1);
        if (here.length === 0) return <div>{line || " "}</div>;
        const chars = Array.from(line);
        const start = Math.max(0, Math.min(chars.length, here[0].column - 1));
        let end = start;
        while (end < chars.length && !/\s/u.test(chars[end])) end++;
        if (end === start) end = Math.min(chars.length, start + 1);
        return (
          <div>
            {chars.slice(0, start).join("")}
            <span class="bad" title={here.map((d) => d.message).join("\n")}>
              {chars.slice(start, end).join("") || " "}
            </span>
            {chars.slice(end).join("")}
            {here.map((d) => (
              <div class="diagnostic">
                {d.line}:{d.column} {d.code}: {d.message}
              </div>
            ))}
          </div>
        );
      })}
    </pre>
  );
}

export function Segments({ t }: { t: Texts }) {
  const [expr, setExpr] = useState("");
  const [result, setResult] = useState<QueryResult | null>(null);
  const [diagnostics, setDiagnostics] = useState<Diagnostic[]>([]);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [names, setNames] = useState<{ kind: string; name: string }[]>([]);
  const [attributes, setAttributes] = useState<string[]>([]);
  const [overlap, setOverlap] = useState("");
  const [overlapCount, setOverlapCount] = useState<number | null>(null);
  const [saveName, setSaveName] = useState("");
  const [saved, setSaved] = useState<{ name: string; version: number } | null>(null);
  const [copied, setCopied] = useState(false);
  const input = useRef<HTMLTextAreaElement>(null);
  // When the expression last changed, and when the shown count's expression did.
  const typedAt = useRef(0);
  const [countedFrom, setCountedFrom] = useState<number | null>(null);
  const edit = (text: string) => {
    typedAt.current = performance.now();
    setExpr(text);
  };
  useEffect(() => {
    if (countedFrom !== null) performance.measure(COUNT_MEASURE, { start: countedFrom });
  }, [countedFrom]);

  useEffect(() => {
    api<string>("GET", "/v1/rules")
      .then((text) => setNames(definitions(text)))
      .catch(() => {});
    api<any>("GET", "/v1/schema/observed")
      .then((schema) => setAttributes(Object.keys(schema.profile ?? {}).sort()))
      .catch(() => {});
  }, [saved]);

  // The exact count, debounced; a newer expression cancels the request in flight.
  useEffect(() => {
    if (!expr.trim()) {
      setResult(null);
      setDiagnostics([]);
      setError(null);
      setOverlapCount(null);
      return;
    }
    const controller = new AbortController();
    const started = typedAt.current;
    const timer = setTimeout(async () => {
      setBusy(true);
      try {
        const r = await api<QueryResult>("POST", "/v1/segments/query", { expr, limit: 10 }, controller.signal);
        let both: number | null = null;
        if (overlap) {
          const o = await api<QueryResult>(
            "POST",
            "/v1/segments/query",
            { expr: `(${expr}) and ${overlap}`, limit: 1 },
            controller.signal,
          );
          both = o.count;
        }
        // A newer expression came while this one was answered: its answer is stale.
        if (controller.signal.aborted) return;
        setResult(r);
        setOverlapCount(both);
        setDiagnostics([]);
        setError(null);
        setCountedFrom(started);
      } catch (e) {
        if ((e as Error).name === "AbortError" || controller.signal.aborted) return;
        setResult(null);
        setOverlapCount(null);
        if (e instanceof ApiError) {
          setDiagnostics(e.body?.diagnostics ?? []);
          setError(e.status === 403 ? t.forbidden : e.message);
        } else setError(String(e));
      } finally {
        if (!controller.signal.aborted) setBusy(false);
      }
    }, DEBOUNCE_MS);
    return () => {
      clearTimeout(timer);
      controller.abort();
    };
  }, [expr, overlap]);

  const insert = (text: string) => {
    const el = input.current;
    const at = el ? el.selectionStart : expr.length;
    const before = expr.slice(0, at);
    const glue = before && !/[\s(]$/u.test(before) ? " and " : "";
    edit(before + glue + text + expr.slice(at));
    el?.focus();
  };

  const save = async (e: Event) => {
    e.preventDefault();
    try {
      const r = await api<any>("PUT", `/v1/segments/${encodeURIComponent(saveName)}`, { expr });
      setSaved({ name: saveName, version: r.version });
      setError(null);
    } catch (err) {
      if (err instanceof ApiError) {
        setDiagnostics(err.body?.diagnostics ?? []);
        setError(err.status === 403 ? t.forbidden : err.message);
      }
    }
  };

  const exportAs = (format: "csv" | "parquet") => {
    if (!saved) return;
    download(`/v1/segments/${encodeURIComponent(saved.name)}/members?format=${format}`, `${saved.name}.${format}`).catch(
      (e) => setError(e instanceof ApiError && e.status === 403 ? t.forbidden : String(e.message ?? e)),
    );
  };

  const curl = curlOf("POST", "/v1/segments/query", { expr, limit: 100 });
  const segmentNames = names.filter((n) => n.kind !== "trait");
  return (
    <section class="segments">
      <div class="pickers">
        <div>
          <h3>{t.tags}</h3>
          {segmentNames.map((n) => (
            <button class={`chip ${n.kind}`} onClick={() => insert(n.name)}>
              {n.name}
            </button>
          ))}
        </div>
        <div>
          <h3>{t.traits}</h3>
          {names
            .filter((n) => n.kind === "trait")
            .map((n) => (
              <button class="chip trait" onClick={() => insert(`${n.name} > 0`)}>
                {n.name}
              </button>
            ))}
        </div>
        <div>
          <h3>{t.profile}</h3>
          {attributes.map((a) => (
            <button class="chip profile" onClick={() => insert(`has(profile.${a})`)}>
              profile.{a}
            </button>
          ))}
        </div>
      </div>
      <label class="expression">
        {t.expression}
        <textarea
          id="expression"
          ref={input}
          rows={3}
          placeholder={t.expressionHint}
          value={expr}
          onInput={(e) => edit((e.target as HTMLTextAreaElement).value)}
        />
      </label>
      {diagnostics.length > 0 && <Underlined text={expr} diagnostics={diagnostics} />}
      {error && diagnostics.length === 0 && <p class="error">{error}</p>}
      <div class="result">
        <span>{t.count}: </span>
        <strong id="count">{busy && !result ? t.counting : result ? result.count.toLocaleString() : "–"}</strong>
        {busy && result && <span class="busy"> {t.counting}</span>}
        <label class="overlap">
          {" "}
          {t.overlapWith}{" "}
          <select id="overlap" value={overlap} onChange={(e) => setOverlap((e.target as HTMLSelectElement).value)}>
            <option value="">{t.none}</option>
            {segmentNames.map((n) => (
              <option value={n.name}>{n.name}</option>
            ))}
          </select>
          {overlapCount !== null && <strong id="overlap-count"> {overlapCount.toLocaleString()}</strong>}
        </label>
      </div>
      {result && result.warnings.length > 0 && <p class="warning">{result.warnings.join("; ")}</p>}
      {result && (
        <div>
          <h3>{t.sample}</h3>
          <ul id="sample">
            {result.customers.map((id) => (
              <li>
                <a href={`#/customers/${encodeURIComponent(id)}`}>{id}</a>
              </li>
            ))}
          </ul>
        </div>
      )}
      <form class="actions" onSubmit={save}>
        <input
          id="save-name"
          placeholder={t.saveAs}
          value={saveName}
          onInput={(e) => setSaveName((e.target as HTMLInputElement).value)}
        />
        <button id="save" type="submit" disabled={!saveName || !expr}>
          {t.save}
        </button>
        {saved && (
          <span id="saved">
            {" "}
            {t.saved} {saved.version}{" "}
          </span>
        )}
        <button type="button" disabled={!saved} onClick={() => exportAs("csv")}>
          {t.exportCsv}
        </button>
        <button type="button" disabled={!saved} onClick={() => exportAs("parquet")}>
          {t.exportParquet}
        </button>
        <button
          type="button"
          disabled={!expr}
          onClick={() => navigator.clipboard?.writeText(curl).then(() => setCopied(true), () => setCopied(false))}
        >
          {copied ? t.copied : t.copyApi}
        </button>
      </form>
      {expr && <pre class="curl">{curl}</pre>}
    </section>
  );
}
