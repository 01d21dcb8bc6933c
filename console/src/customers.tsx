import { useEffect, useState } from "preact/hooks";
import { api, ApiError } from "./api";
import { Texts } from "./i18n";

interface Customer {
  customer_id: string;
  tags: Record<string, { since: number; expires_at: number | null }>;
  traits: Record<string, unknown>;
  profile: Record<string, unknown>;
}

interface ExplainNode {
  expr: string;
  value: unknown;
  window?: { event_type: string; from_exclusive?: number; to_inclusive: number };
  children?: ExplainNode[];
}

const when = (ms: number | null | undefined) => (ms == null ? "–" : new Date(ms).toLocaleString());
const shown = (v: unknown) => (typeof v === "string" ? v : JSON.stringify(v));

function Tree({ node }: { node: ExplainNode }) {
  return (
    <li>
      <code>{node.expr}</code> = <strong>{shown(node.value)}</strong>
      {node.window && (
        <span class="window">
          {" "}
          [{node.window.event_type}: {when(node.window.from_exclusive)} → {when(node.window.to_inclusive)}]
        </span>
      )}
      {node.children && node.children.length > 0 && (
        <ul>
          {node.children.map((c) => (
            <Tree node={c} />
          ))}
        </ul>
      )}
    </li>
  );
}

function idOfHash(): string {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  return parts[0] === "customers" && parts[1] ? decodeURIComponent(parts[1]) : "";
}

export function Customers({ t }: { t: Texts }) {
  const [query, setQuery] = useState(idOfHash());
  const [id, setId] = useState(idOfHash());
  const [customer, setCustomer] = useState<Customer | null>(null);
  const [events, setEvents] = useState<any[]>([]);
  const [why, setWhy] = useState<any | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    const onHash = () => {
      const next = idOfHash();
      if (next) {
        setQuery(next);
        setId(next);
      }
    };
    addEventListener("hashchange", onHash);
    return () => removeEventListener("hashchange", onHash);
  }, []);

  useEffect(() => {
    setWhy(null);
    if (!id) return;
    const path = `/v1/customers/${encodeURIComponent(id)}`;
    Promise.all([api<Customer>("GET", path), api<any>("GET", `${path}/events?limit=50`)])
      .then(([c, e]) => {
        setCustomer(c);
        setEvents(e.events ?? []);
        setError(null);
      })
      .catch((e) => {
        setCustomer(null);
        setEvents([]);
        setError(e instanceof ApiError ? (e.status === 404 ? t.notFound : e.status === 403 ? t.forbidden : e.message) : String(e));
      });
  }, [id]);

  const explain = (name: string) =>
    api<any>("GET", `/v1/customers/${encodeURIComponent(id)}/explain/${encodeURIComponent(name)}`)
      .then(setWhy)
      .catch((e) => setError(e.message));

  return (
    <section class="customers">
      <form
        onSubmit={(e) => {
          e.preventDefault();
          location.hash = `#/customers/${encodeURIComponent(query.trim())}`;
          setId(query.trim());
        }}
      >
        <input
          id="customer-search"
          placeholder={t.customerId}
          value={query}
          onInput={(e) => setQuery((e.target as HTMLInputElement).value)}
        />{" "}
        <button id="customer-go" type="submit">
          {t.search}
        </button>
      </form>
      {error && <p class="error">{error}</p>}
      {customer && (
        <div class="customer" id="customer">
          <h2 id="customer-id">{customer.customer_id}</h2>
          <h3>{t.tags}</h3>
          <table id="customer-tags">
            <tbody>
              {Object.entries(customer.tags).map(([name, m]) => (
                <tr>
                  <td class="tag">{name}</td>
                  <td>
                    {t.since} {when(m.since)}
                  </td>
                  <td>
                    {t.expires} {when(m.expires_at)}
                  </td>
                  <td>
                    <button class="why" onClick={() => explain(name)}>
                      {t.why}
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
          {why && (
            <div class="explain" id="explain">
              <h3>
                {t.why}: {why.name} = {shown(why.value)}
              </h3>
              <ul>
                <Tree node={why.explain} />
              </ul>
              {why.next_change && (
                <p id="next-change">
                  → {shown(why.next_change.value)} @ {when(why.next_change.at)}
                </p>
              )}
            </div>
          )}
          <h3>{t.traits}</h3>
          <dl>
            {Object.entries(customer.traits).map(([k, v]) => [<dt>{k}</dt>, <dd>{shown(v)}</dd>])}
          </dl>
          <h3>{t.profile}</h3>
          <dl id="customer-profile">
            {Object.entries(customer.profile).map(([k, v]) => [<dt>{k}</dt>, <dd>{shown(v)}</dd>])}
          </dl>
          <h3>{t.timeline}</h3>
          <table id="timeline">
            <tbody>
              {events.map((e) => (
                <tr>
                  <td>{when(e.ts)}</td>
                  <td>{e.type}</td>
                  <td>
                    <code>{JSON.stringify(e.props)}</code>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
