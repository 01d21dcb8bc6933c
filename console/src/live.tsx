import { useEffect, useState } from "preact/hooks";
import { api, ApiError } from "./api";
import { Texts } from "./i18n";

/** One scrape of `/metrics`: every sample by its name and labels. */
type Samples = Map<string, { labels: Record<string, string>; value: number }[]>;

export function parseMetrics(text: string): Samples {
  const out: Samples = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[3] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    const value = m[4] === "+Inf" ? Infinity : Number(m[4]);
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1])!.push({ labels, value });
  }
  return out;
}

const sum = (s: Samples, name: string, keep: (l: Record<string, string>) => boolean = () => true) =>
  (s.get(name) ?? []).filter((x) => keep(x.labels)).reduce((a, x) => a + x.value, 0);

/** The 99th percentile of a histogram over the interval between two scrapes, as
 *  Prometheus' histogram_quantile does (linear within the bucket); null without samples. */
export function p99(now: Samples, before: Samples, name: string): number | null {
  const buckets = new Map<number, number>();
  for (const x of now.get(`${name}_bucket`) ?? []) {
    const le = x.labels.le === "+Inf" ? Infinity : Number(x.labels.le);
    buckets.set(le, (buckets.get(le) ?? 0) + x.value);
  }
  for (const x of before.get(`${name}_bucket`) ?? []) {
    const le = x.labels.le === "+Inf" ? Infinity : Number(x.labels.le);
    buckets.set(le, (buckets.get(le) ?? 0) - x.value);
  }
  const sorted = [...buckets.entries()].sort((a, b) => a[0] - b[0]);
  const total = sorted.length ? sorted[sorted.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = 0.99 * total;
  let lower = 0;
  let below = 0;
  for (const [le, count] of sorted) {
    if (count >= rank) {
      if (le === Infinity) return lower;
      return lower + ((le - lower) * (rank - below)) / Math.max(count - below, 1e-9);
    }
    lower = le;
    below = count;
  }
  return null;
}

interface DeadLetter {
  id: number;
  received_at: number;
  reason: string;
  raw: string;
}

interface Point {
  at: number;
  events: number;
  changes: number;
}

function Sparkline({ values }: { values: number[] }) {
  if (values.length < 2) return <svg class="spark" />;
  const max = Math.max(...values, 1);
  const points = values.map((v, i) => `${(i / (values.length - 1)) * 100},${30 - (v / max) * 28}`).join(" ");
  return (
    <svg class="spark" viewBox="0 0 100 30" preserveAspectRatio="none">
      <polyline points={points} />
    </svg>
  );
}

const bytes = (n: number) =>
  n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(2)} GiB` : n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${Math.round(n / 1024)} KiB`;
const ms = (s: number | null) => (s == null ? "–" : `${(s * 1000).toFixed(1)} ms`);

/** The numbers `/metrics` exposes, scraped every 2 s, as rates and percentiles over the
 *  last interval. */
export function Live({ t }: { t: Texts }) {
  const [scrapes, setScrapes] = useState<{ at: number; samples: Samples }[]>([]);
  const [history, setHistory] = useState<Point[]>([]);
  const [error, setError] = useState<string | null>(null);
  // The newest dead letters with their reason and line, for roles that may read them.
  const [letters, setLetters] = useState<DeadLetter[] | null>(null);

  useEffect(() => {
    let stopped = false;
    const scrape = async () => {
      api<{ dead_letters: DeadLetter[] }>("GET", "/v1/dlq?last=5")
        .then((r) => !stopped && setLetters(r.dead_letters))
        .catch(() => !stopped && setLetters(null));
      try {
        const text = await api<string>("GET", "/metrics");
        if (stopped) return;
        const samples = parseMetrics(text);
        setScrapes((s) => [...s.slice(-1), { at: Date.now(), samples }]);
        setError(null);
      } catch (e) {
        setError(e instanceof ApiError && e.status === 403 ? t.forbidden : String((e as Error).message ?? e));
      }
    };
    scrape();
    const timer = setInterval(scrape, 2000);
    return () => {
      stopped = true;
      clearInterval(timer);
    };
  }, []);

  const [before, now] = scrapes.length === 2 ? scrapes : [undefined, scrapes[0]];
  const seconds = before && now ? (now.at - before.at) / 1000 : 0;
  const rate = (name: string) =>
    before && now && seconds > 0 ? Math.max(0, (sum(now.samples, name) - sum(before.samples, name)) / seconds) : null;
  const events = rate("tagstream_events_total");
  const changes = rate("tagstream_changes_total");
  useEffect(() => {
    if (events != null && changes != null && now)
      setHistory((h) => [...h.slice(-59), { at: now.at, events, changes }]);
  }, [now?.at]);

  if (!now) return <section class="live">{error && <p class="error">{error}</p>}</section>;
  const s = now.samples;
  const lags = (s.get("tagstream_kafka_consumer_lag") ?? []).sort((a, b) =>
    (a.labels.partition ?? "").localeCompare(b.labels.partition ?? "", undefined, { numeric: true }),
  );
  const dead = (s.get("tagstream_events_rejected_total") ?? []).filter((x) => x.value > 0);
  return (
    <section class="live">
      {error && <p class="error">{error}</p>}
      <div class="tiles">
        <div class="tile">
          <span>{t.eventsPerSecond}</span>
          <strong id="events-rate">{events == null ? "–" : Math.round(events).toLocaleString()}</strong>
          <Sparkline values={history.map((p) => p.events)} />
        </div>
        <div class="tile">
          <span>{t.changesPerSecond}</span>
          <strong id="changes-rate">{changes == null ? "–" : Math.round(changes).toLocaleString()}</strong>
          <Sparkline values={history.map((p) => p.changes)} />
        </div>
        <div class="tile">
          <span>{t.latencyP99}</span>
          <strong id="latency">{before ? ms(p99(s, before.samples, "tagstream_event_to_change_seconds")) : "–"}</strong>
        </div>
        <div class="tile">
          <span>{t.timersLate}</span>
          <strong>{before ? ms(p99(s, before.samples, "tagstream_timer_lateness_seconds")) : "–"}</strong>
        </div>
        <div class="tile">
          <span>{t.storeSize}</span>
          <strong id="store-size">{bytes(sum(s, "tagstream_rocksdb_sst_bytes"))}</strong>
        </div>
        <div class="tile">
          <span>{t.deadLetters}</span>
          <strong id="dead-letters">{sum(s, "tagstream_events_rejected_total").toLocaleString()}</strong>
        </div>
      </div>
      {dead.length > 0 && (
        <table class="reasons">
          <tbody>
            {dead.map((x) => (
              <tr>
                <td>{x.labels.reason}</td>
                <td>{x.value.toLocaleString()}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {letters && letters.length > 0 && (
        <div>
          <h3>{t.newestDeadLetters}</h3>
          <table id="dead-letter-lines" class="dead">
            <tbody>
              {letters.map((d) => (
                <tr>
                  <td class="window">{new Date(d.received_at).toLocaleTimeString()}</td>
                  <td>{d.reason}</td>
                  <td>
                    <code>{d.raw.length > 160 ? `${d.raw.slice(0, 160)}…` : d.raw}</code>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {lags.length > 0 && (
        <div>
          <h3>{t.lag}</h3>
          <table class="lag">
            <tbody>
              {lags.map((x) => (
                <tr>
                  <td>
                    {x.labels.topic} / {x.labels.partition}
                  </td>
                  <td>{x.value.toLocaleString()}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
