import { useEffect, useState } from "preact/hooks";
import { api, ApiError, apiText, Diagnostic, rulesWithVersion } from "./api";
import { Texts } from "./i18n";
import { Underlined } from "./segments";

interface HourActivity {
  hour: number;
  entered: number;
  left: number;
}

interface Definition {
  name: string;
  kind: "tag" | "event_tag" | "segment" | "trait";
  source: string;
  members: number | null;
  activity: HourActivity[];
}

interface PreviewCounts {
  members: number;
  enter: number;
  exit: number;
  sample_enter: string[];
  sample_exit: string[];
}

interface Preview {
  customers: number;
  definitions: Record<string, PreviewCounts>;
  removed: Record<string, PreviewCounts>;
  warnings: unknown[];
}

interface Backfill {
  customers_done: number;
  customers_estimated: number;
}

const HOURS = 48;
const HOUR = 3_600_000;

/** Enters (blue) and exits (red) per hour over the last `HOURS` hours up to `now`. */
function EnterExit({ activity, now }: { activity: HourActivity[]; now: number }) {
  const first = Math.floor(now / HOUR) * HOUR - (HOURS - 1) * HOUR;
  const entered = new Array(HOURS).fill(0);
  const left = new Array(HOURS).fill(0);
  for (const h of activity) {
    const i = Math.round((h.hour - first) / HOUR);
    if (i >= 0 && i < HOURS) {
      entered[i] = h.entered;
      left[i] = h.left;
    }
  }
  const max = Math.max(1, ...entered, ...left);
  const line = (values: number[]) =>
    values.map((v, i) => `${(i / (HOURS - 1)) * 100},${30 - (v / max) * 28}`).join(" ");
  const total = (values: number[]) => values.reduce((a, b) => a + b, 0);
  return (
    <svg class="spark enter-exit" viewBox="0 0 100 30" preserveAspectRatio="none">
      <title>
        +{total(entered)} / −{total(left)}
      </title>
      <polyline class="entered" points={line(entered)} />
      <polyline class="left" points={line(left)} />
    </svg>
  );
}

/** The loaded rule set by definition (members, enters/exits), and its editor: check,
 *  preview what a change would do, apply it, and watch the backfill. */
export function Rules({ t }: { t: Texts }) {
  const [defs, setDefs] = useState<Definition[]>([]);
  const [now, setNow] = useState(Date.now());
  const [filter, setFilter] = useState("");
  const [open, setOpen] = useState<string | null>(null);
  const [text, setText] = useState("");
  const [etag, setEtag] = useState<string | null>(null);
  const [diagnostics, setDiagnostics] = useState<Diagnostic[]>([]);
  const [error, setError] = useState<string | null>(null);
  const [preview, setPreview] = useState<Preview | null>(null);
  const [previewedText, setPreviewedText] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [applied, setApplied] = useState<number | null>(null);
  const [backfill, setBackfill] = useState<Backfill | "done" | null>(null);

  const load = () => {
    api<{ now: number; definitions: Definition[] }>("GET", `/v1/definitions?hours=${HOURS}`)
      .then((r) => {
        setDefs(r.definitions);
        setNow(r.now);
      })
      .catch((e) => setError(e instanceof ApiError && e.status === 403 ? t.forbidden : String(e.message ?? e)));
  };
  useEffect(() => {
    load();
    rulesWithVersion()
      .then((r) => {
        setText(r.text);
        setEtag(r.etag);
      })
      .catch(() => {});
  }, []);

  // While a backfill runs, its progress from `/readyz`, every second.
  useEffect(() => {
    if (applied === null || backfill === "done") return;
    const timer = setInterval(async () => {
      const r = await api<any>("GET", "/readyz").catch(() => null);
      if (!r) return;
      if (r.backfill_running && r.backfill) setBackfill(r.backfill);
      else {
        setBackfill("done");
        load();
      }
    }, 1000);
    return () => clearInterval(timer);
  }, [applied, backfill]);

  const failed = (e: unknown) => {
    if (e instanceof ApiError) {
      setDiagnostics(e.body?.diagnostics ?? []);
      setError(e.status === 403 ? t.forbidden : e.message);
    } else setError(String(e));
  };

  const runPreview = async () => {
    setBusy(true);
    setPreview(null);
    try {
      const p = await apiText<Preview>("POST", "/v1/rules/preview", text);
      setPreview(p);
      setPreviewedText(text);
      setDiagnostics([]);
      setError(null);
    } catch (e) {
      failed(e);
    } finally {
      setBusy(false);
    }
  };

  const apply = async () => {
    setBusy(true);
    try {
      const r = await apiText<any>("PUT", "/v1/rules", text, etag ? { "If-Match": etag } : undefined);
      setApplied(r.version);
      setEtag(`"${r.version}"`);
      setBackfill(null);
      setPreview(null);
      setError(null);
    } catch (e) {
      failed(e);
    } finally {
      setBusy(false);
    }
  };

  const shown = defs.filter((d) => !filter || d.name.toLowerCase().includes(filter.toLowerCase()));
  const changes = preview
    ? [
        ...Object.entries(preview.definitions).map(([name, c]) => ({ name, c, removed: false })),
        ...Object.entries(preview.removed).map(([name, c]) => ({ name, c, removed: true })),
      ].filter(({ c }) => c.enter > 0 || c.exit > 0)
    : [];
  const total = (key: "enter" | "exit") => changes.reduce((sum, { c }) => sum + c[key], 0);
  return (
    <section class="rules">
      <div class="rules-list">
        <input
          id="rules-filter"
          placeholder={t.filter}
          value={filter}
          onInput={(e) => setFilter((e.target as HTMLInputElement).value)}
        />
        <table id="definitions">
          <thead>
            <tr>
              <th>{t.name}</th>
              <th>{t.kind}</th>
              <th>{t.members}</th>
              <th>
                {t.activity} ({HOURS} h)
              </th>
            </tr>
          </thead>
          <tbody>
            {shown.map((d) => (
              <>
                <tr class="definition" data-name={d.name} onClick={() => setOpen(open === d.name ? null : d.name)}>
                  <td>{d.name}</td>
                  <td>{t.kinds[d.kind]}</td>
                  <td class="members">{d.members === null ? "" : d.members.toLocaleString()}</td>
                  <td>{d.members !== null && <EnterExit activity={d.activity} now={now} />}</td>
                </tr>
                {open === d.name && (
                  <tr>
                    <td colSpan={4}>
                      <pre class="source">{d.source}</pre>
                    </td>
                  </tr>
                )}
              </>
            ))}
          </tbody>
        </table>
      </div>
      <div class="rules-editor">
        <label>
          {t.ruleSet} {etag && <span class="window">{t.version} {etag.replace(/"/g, "")}</span>}
          <textarea
            id="rules-text"
            rows={16}
            value={text}
            onInput={(e) => {
              setText((e.target as HTMLTextAreaElement).value);
              setDiagnostics([]);
            }}
          />
        </label>
        {diagnostics.length > 0 && <Underlined text={text} diagnostics={diagnostics} />}
        {error && diagnostics.length === 0 && <p class="error">{error}</p>}
        <div class="actions">
          <button id="rules-preview" disabled={busy} onClick={runPreview}>
            {t.preview}
          </button>
          <button id="rules-apply" disabled={busy || previewedText !== text || !preview} onClick={apply}>
            {t.apply}
          </button>
        </div>
        {preview && (
          <div id="preview">
            <p>
              <strong id="preview-enter">{total("enter").toLocaleString()}</strong> {t.wouldEnter},{" "}
              <strong id="preview-exit">{total("exit").toLocaleString()}</strong> {t.wouldLeave} (
              {preview.customers.toLocaleString()} {t.customersEvaluated})
            </p>
            <table>
              <tbody>
                {changes.map(({ name, c, removed }) => (
                  <tr class="preview-row" data-name={name}>
                    <td>
                      {name}
                      {removed && ` (${t.removed})`}
                    </td>
                    <td>+{c.enter.toLocaleString()}</td>
                    <td>−{c.exit.toLocaleString()}</td>
                    <td class="window">{[...c.sample_enter, ...c.sample_exit].slice(0, 5).join(", ")}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        )}
        {applied !== null && (
          <p id="backfill">
            {t.appliedVersion} {applied}:{" "}
            {backfill === "done" ? (
              <strong id="backfill-done">{t.backfillDone}</strong>
            ) : (
              <>
                {t.backfill}{" "}
                <progress
                  max={backfill?.customers_estimated || 1}
                  value={backfill?.customers_done ?? 0}
                />{" "}
                {backfill ? `${backfill.customers_done.toLocaleString()} / ${backfill.customers_estimated.toLocaleString()}` : ""}
              </>
            )}
          </p>
        )}
      </div>
    </section>
  );
}
