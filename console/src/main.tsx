import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api, ApiError, storedKey, storeKey } from "./api";
import { initialLang, Lang, texts, Texts } from "./i18n";
import { Segments } from "./segments";
import { Customers } from "./customers";
import { Live } from "./live";
import { Rules } from "./rules";
import "./style.css";

type View = "segments" | "rules" | "customers" | "live";

function viewOfHash(): View {
  const v = location.hash.replace(/^#\/?/, "").split("/")[0];
  return v === "customers" || v === "live" || v === "rules" ? v : "segments";
}

/** Who the key is: `GET /v1/rules` is open to every role but ingest and monitor, so the
 *  login asks `/readyz` (open) for the node and the segments list for the key. */
async function checkKey(): Promise<"ok" | "open" | ApiError> {
  try {
    await api("GET", "/v1/segments");
    return storedKey() ? "ok" : "open";
  } catch (e) {
    if (e instanceof ApiError) return e;
    throw e;
  }
}

function Login({ t, onLogin }: { t: Texts; onLogin: () => void }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState<string | null>(null);
  const submit = async (e: Event) => {
    e.preventDefault();
    storeKey(key.trim());
    const checked = await checkKey();
    if (checked instanceof ApiError && checked.status === 401) {
      storeKey(null);
      setError(checked.message);
    } else {
      onLogin();
    }
  };
  return (
    <form class="login" onSubmit={submit}>
      <p>{t.loginHint}</p>
      <label>
        {t.key}{" "}
        <input id="api-key" type="password" value={key} onInput={(e) => setKey((e.target as HTMLInputElement).value)} />
      </label>{" "}
      <button id="login" type="submit">
        {t.login}
      </button>
      {error && <p class="error">{error}</p>}
    </form>
  );
}

function App() {
  const [lang, setLang] = useState<Lang>(initialLang());
  const [view, setView] = useState<View>(viewOfHash());
  const [session, setSession] = useState<"unknown" | "login" | "ok" | "open">("unknown");
  const t = texts(lang);

  const probe = async () => {
    const checked = await checkKey();
    if (checked instanceof ApiError) setSession(checked.status === 401 ? "login" : "ok");
    else setSession(checked);
  };
  useEffect(() => {
    probe();
    const onHash = () => setView(viewOfHash());
    addEventListener("hashchange", onHash);
    return () => removeEventListener("hashchange", onHash);
  }, []);
  useEffect(() => {
    localStorage.setItem("tagstream.lang", lang);
    document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
    document.title = t.title;
  }, [lang]);

  const nav = (v: View, label: string) => (
    <a id={`nav-${v}`} href={`#/${v}`} class={view === v ? "active" : ""}>
      {label}
    </a>
  );
  return (
    <div class="app">
      <header>
        <strong>{t.title}</strong>
        <nav>
          {nav("segments", t.segments)}
          {nav("rules", t.rules)}
          {nav("customers", t.customers)}
          {nav("live", t.live)}
        </nav>
        <span class="spacer" />
        <button id="lang" onClick={() => setLang(lang === "zh" ? "en" : "zh")}>
          {t.language}
        </button>
        {session === "ok" && storedKey() && (
          <button
            id="logout"
            onClick={() => {
              storeKey(null);
              setSession("unknown");
              probe();
            }}
          >
            {t.logout}
          </button>
        )}
      </header>
      {session === "open" && <p class="warning">{t.openNode}</p>}
      <main>
        {session === "login" && <Login t={t} onLogin={probe} />}
        {(session === "ok" || session === "open") && view === "segments" && <Segments t={t} />}
        {(session === "ok" || session === "open") && view === "rules" && <Rules t={t} />}
        {(session === "ok" || session === "open") && view === "customers" && <Customers t={t} />}
        {(session === "ok" || session === "open") && view === "live" && <Live t={t} />}
      </main>
    </div>
  );
}

render(<App />, document.getElementById("app")!);
