//! The `tagstream` binary: command-line parsing and wiring only.

mod admin;
mod config;
mod replay;
mod serve;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use config::Settings;
use processor::{ClockMode, Engine, EngineConfig};

/// mimalloc instead of glibc's malloc: events are parsed on one thread and freed on the
/// engine thread, a pattern glibc serves slowly (arena locks, consolidation); replay is ~11%
/// faster with it, peak RSS ~2% higher (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's process statistics (`mimalloc.h`); its committed bytes are kept whatever
    /// the statistics level it was built with.
    fn mi_process_info(
        elapsed_msecs: *mut usize,
        user_msecs: *mut usize,
        system_msecs: *mut usize,
        current_rss: *mut usize,
        peak_rss: *mut usize,
        current_commit: *mut usize,
        peak_commit: *mut usize,
        page_faults: *mut usize,
    );
}

/// The bytes mimalloc holds committed for the heap — every Rust allocation of the process,
/// with the slack of its partly filled pages: what `[cache] memory_mb` bounds.
pub(crate) fn heap_committed() -> usize {
    let mut commit = 0usize;
    let none = std::ptr::null_mut();
    // SAFETY: mimalloc writes only through the pointers that are not null.
    unsafe { mi_process_info(none, none, none, none, none, &mut commit, none, none) };
    commit
}

#[derive(Parser)]
#[command(
    name = "tagstream",
    version,
    about = "Real-time customer tagging and segmentation"
)]
struct Cli {
    /// Log lines as human-readable text (colours only on a terminal) or as one JSON object
    /// a line, for log shippers. The level filter is `TAGSTREAM_LOG` (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr: text with ANSI colours only when stderr is a terminal (never escape
/// codes in a file or a journal), or JSON lines.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TAGSTREAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start: the size of `serve`'s flags is no cost
enum Command {
    /// Check rule files and print every diagnostic; exits 1 when any file has errors.
    CheckRules {
        /// Also print the compiled plan: evaluation order, shared aggregates, and which
        /// definitions each event type and profile attribute can change.
        #[arg(long)]
        plan: bool,
        /// Check what the rules read against this tracking plan: unknown event types,
        /// properties and attributes, comparisons with the wrong type or outside an enum.
        #[arg(long)]
        tracking_plan: Option<PathBuf>,
        /// Rule files (`.trl`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Tracking plans: check one, or infer one from what a store has received.
    Plan {
        #[command(subcommand)]
        action: PlanAction,
    },
    /// Print a settings file with every key at its default.
    DefaultConfig,
    /// Back up a store into a new directory: through a running server (consistent, taken
    /// between two commits while it serves), or a stopped store with --data-dir.
    Backup {
        /// The backup directory; must not exist yet (on the server's machine).
        #[arg(long)]
        to: PathBuf,
        /// The running server to ask.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        server: String,
        /// Back up this stopped store directly instead of asking a server.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Restore a backup into a new data directory; a server started on it resumes exactly
    /// after the last event the backup holds (Kafka from the offsets kept in it).
    Restore {
        /// The backup directory (with its BACKUP.json).
        #[arg(long)]
        from: PathBuf,
        /// The data directory to create; must not exist or be empty.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// A stopped store's partitions: list them, export one to a file, import one exported
    /// from another store, or drop one that moved away (see docs/operations.md).
    Partitions {
        #[command(subcommand)]
        action: admin::PartitionAction,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// API keys of a stopped store: create one (shown once), list them, revoke one. On a
    /// running node use /v1/admin/keys with an admin key (docs/security.md).
    Keys {
        #[command(subcommand)]
        action: admin::KeyAction,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Ask a running tagstream whether it is ready (for container health checks): exits 0 on
    /// a 2xx answer, 1 otherwise.
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/readyz")]
        url: String,
        /// For an https:// URL: more CA certificates (PEM) to trust besides the built-in roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// For an https:// URL: the name the certificate must be for, when the URL's host is
        /// not it (e.g. --url https://127.0.0.1:8443/readyz --server-name api.example.com).
        #[arg(long)]
        server_name: Option<String>,
    },
    /// Serve the HTTP API over the store.
    Serve {
        #[command(flatten)]
        store: StoreArgs,
        /// Address to listen on [default: 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// In a group of several: the URL the other nodes reach this one at (`advertise`).
        #[arg(long)]
        advertise: Option<String>,
        /// Largest accepted request body, in bytes [default: 16 MiB].
        #[arg(long)]
        max_request_bytes: Option<usize>,
        /// Consume events from Kafka at these bootstrap servers (see docs/kafka.md).
        #[arg(long)]
        kafka_brokers: Option<String>,
        /// The Kafka events topic [default: events].
        #[arg(long)]
        kafka_topic: Option<String>,
        /// The Kafka consumer group [default: tagstream].
        #[arg(long)]
        kafka_group: Option<String>,
        /// In a group of several: how many other members keep a warm copy of each
        /// partition, for a faster take-over [default: 0] (`[kafka] standby_replicas`).
        #[arg(long)]
        standby_replicas: Option<u32>,
        /// A librdkafka setting, KEY=VALUE (repeatable): security.protocol, sasl.*, ssl.*.
        #[arg(long, value_parser = key_value)]
        kafka_option: Vec<(String, String)>,
        /// A librdkafka setting read from a file, KEY=PATH (repeatable), e.g.
        /// sasl.password=/run/secrets/kafka-password: `[kafka.option_files]`.
        #[arg(long, value_parser = key_value)]
        kafka_option_file: Vec<(String, String)>,
        /// A non-public address or range webhooks may reach (repeatable), added to
        /// `[webhooks] allow_targets`, e.g. 10.1.0.0/16.
        #[arg(long)]
        webhook_allow: Vec<String>,
        /// A file with one key (`tagstream keys generate`): made an admin key at start, once.
        #[arg(long)]
        bootstrap_key_file: Option<PathBuf>,
        /// Serve without keys on a non-loopback address while no key exists (a local
        /// stack, never production): `[access] allow_open`.
        #[arg(long)]
        allow_open: bool,
        /// HTTPS: the certificate chain (PEM); with --tls-key. Reloaded on SIGHUP.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// HTTPS: the certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Serve on the embedded default with the example rules and a built-in stream of
    /// realistic events, so tags and segments change live.
    Demo {
        /// Where the demo keeps its store.
        #[arg(long, default_value = "./tagstream-demo-data")]
        data_dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Generated events per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Customers in the generated population.
        #[arg(long, default_value_t = 2_000)]
        customers: u64,
        /// A settings file (as `deploy/tagstream.toml`) for the store's retention, cache and
        /// limits; the demo keeps its own rules, wall clock, address and data directory.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Ingest an NDJSON file at full speed; resumes where it stopped if interrupted.
    Replay {
        /// The NDJSON file, one event per line.
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        /// Events per committed batch (one fsync each).
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
        /// `event` clock mode only: afterwards, move the clock to this instant (ms) and fire
        /// every timer due by then.
        #[arg(long)]
        advance_to: Option<i64>,
        /// No progress line.
        #[arg(long)]
        quiet: bool,
        /// Afterwards, compact the state and print the store's size by column family and
        /// the state's bytes per customer.
        #[arg(long)]
        stats: bool,
    },
}

#[derive(Subcommand)]
enum PlanAction {
    /// Check a tracking plan file; exits 1 with the error if it is not valid.
    Check { file: PathBuf },
    /// Print a tracking plan that accepts every event type, property and profile attribute
    /// a stopped store has received (a starting point to review and tighten). For a running
    /// server: `GET /v1/schema/observed?format=plan`.
    Infer {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Clock {
    Wall,
    Event,
}

#[derive(Args)]
struct StoreArgs {
    /// A settings file (TOML) with every default in one place (see deploy/tagstream.toml);
    /// the flags below override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Where the RocksDB store lives [default: ./tagstream-data].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// The rule file: the rule set of a new store. A store keeps its rule set and the runtime
    /// edits made since the file was applied; a file that changed since is refused, with the
    /// diff, unless --replace-rules.
    #[arg(long, global = true)]
    rules: Option<PathBuf>,
    /// Replace the stored rule set with --rules when they differ (the diff is logged and
    /// kept in the rule-set versions).
    #[arg(long, global = true)]
    replace_rules: bool,
    /// The tracking plan (TOML) events are checked against (docs/rules.md, "Tracking plan").
    #[arg(long, global = true)]
    tracking_plan: Option<PathBuf>,
    /// Where `now` comes from: the wall clock, or the greatest event time seen [default: wall].
    #[arg(long, value_enum, global = true)]
    clock: Option<Clock>,
    /// fsync the write-ahead log on every commit [default: true].
    #[arg(long, action = clap::ArgAction::Set, global = true)]
    sync_writes: Option<bool>,
    /// Most customers kept in memory between batches; `[cache] memory_mb` bounds their
    /// bytes too [default: 1000000].
    #[arg(long, global = true)]
    cache_customers: Option<usize>,
    /// How long each customer's events are kept, e.g. 400d [default: 400d].
    #[arg(long, value_parser = config::parse_duration, global = true)]
    retention: Option<i64>,
    /// Engine workers evaluating in parallel; 0: one per core [default: 0].
    #[arg(long, global = true)]
    workers: Option<usize>,
}

impl StoreArgs {
    /// The settings file (if any) with the flags applied over it.
    fn settings(&self) -> anyhow::Result<Settings> {
        let mut s = Settings::load(self.config.as_deref())?;
        if let Some(d) = &self.data_dir {
            s.data_dir = d.clone();
        }
        if let Some(r) = &self.rules {
            s.rules = Some(r.clone());
        }
        if let Some(p) = &self.tracking_plan {
            s.tracking_plan = Some(p.clone());
        }
        if let Some(c) = self.clock {
            s.clock = match c {
                Clock::Wall => ClockMode::Wall,
                Clock::Event => ClockMode::Event,
            };
        }
        if let Some(sync) = self.sync_writes {
            s.sync_writes = sync;
        }
        if let Some(n) = self.cache_customers {
            s.cache.customers = n;
        }
        if let Some(ms) = self.retention {
            s.retention.history = config::Duration(ms);
        }
        if let Some(n) = self.workers {
            s.engine.workers = n;
        }
        Ok(s)
    }
}

/// Opens the engine the settings describe, printing rule diagnostics if the rules are bad.
/// A rule file that differs from the stored rule set replaces it only when `replace` is set
/// or the file is the source of truth; otherwise the diff is shown and the start refused.
fn open_engine(settings: &Settings, replace: bool) -> anyhow::Result<Engine> {
    let rules = match &settings.rules {
        Some(path) => Some((
            path,
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        )),
        None => None,
    };
    let render = |diags: &[rules::Diagnostic]| {
        let (path, text) = rules.as_ref().expect("only a rule file has diagnostics");
        eprint!("{}", rules::render_all(diags, text, &path.display().to_string()));
        anyhow::anyhow!("the rule set has {} error(s)", diags.len())
    };
    let plan = settings.tracking_plan.as_deref().map(load_plan).transpose()?;
    let initial = rules.as_ref().map(|(_, text)| text.as_str());
    let mut engine = match Engine::open(&settings.data_dir, initial, settings.engine_config()) {
        Ok(engine) => engine,
        Err(processor::EngineError::Rules(diags)) => return Err(render(&diags)),
        Err(e) => {
            return Err(e).with_context(|| format!("opening the store at {}", settings.data_dir.display()))
        }
    };
    if let Some((path, text)) = &rules {
        // The file as it was last applied: runtime edits made since are kept. Only a file
        // that changed is a rule change, and it must not silently undo them.
        let applied = engine.rule_file_applied()?;
        let diff = engine.diff_rules(text).map_err(|diags| render(&diags))?;
        if diff.is_empty() {
            engine.mark_rule_file_applied(text)?;
        } else if applied.as_deref() == Some(text.as_str())
            && settings.rules_source != config::RulesSource::File
        {
            tracing::info!(
                version = engine.rules_version(),
                "{} is unchanged since it was applied; keeping the stored rule set and its runtime edits",
                path.display()
            );
        } else {
            let version = engine.rules_version();
            if replace || settings.rules_source == config::RulesSource::File {
                let edit = processor::RuleEdit::by(format!("file:{}", path.display()));
                engine
                    .replace_rules_as(text, &edit, format!("rule file {}", path.display()))
                    .context("replacing the stored rule set")?;
                engine.mark_rule_file_applied(text)?;
            } else {
                eprint!("{}", diff.render());
                anyhow::bail!(
                    "{} changed and differs from the stored rule set (version {version}; the lines above are what it would change). \
                     Start with --replace-rules to replace it, without --rules to keep the stored one, \
                     or set rules_source = \"file\" to make the file the source of truth",
                    path.display()
                );
            }
        }
    }
    if let Some(plan) = &plan {
        report_plan_warnings(engine.rules(), plan, settings.tracking_plan.as_deref());
    }
    engine.set_plan(plan);
    Ok(engine)
}

/// Reads and checks a tracking plan file.
fn load_plan(path: &std::path::Path) -> anyhow::Result<std::sync::Arc<rules::TrackingPlan>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    rules::TrackingPlan::parse(&text)
        .map(std::sync::Arc::new)
        .map_err(|e| anyhow::anyhow!("the tracking plan {}: {e}", path.display()))
}

/// Prints what the loaded rules read that the plan does not have (warnings: the rules were
/// accepted before the plan existed; `check-rules --tracking-plan` makes them errors).
fn report_plan_warnings(
    rules: &rules::CompiledRules,
    plan: &rules::TrackingPlan,
    path: Option<&std::path::Path>,
) {
    let origin = path.map_or("plan".to_owned(), |p| p.display().to_string());
    let diagnostics = rules::check_against_plan(rules.source(), plan);
    if !diagnostics.is_empty() {
        let rendered = rules::render_all(&diagnostics, rules.source(), "the stored rules");
        tracing::warn!(plan = %origin, "the rules read what the tracking plan does not have:\n{rendered}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve {
            store,
            listen,
            advertise,
            max_request_bytes,
            kafka_brokers,
            kafka_topic,
            kafka_group,
            standby_replicas,
            kafka_option,
            kafka_option_file,
            webhook_allow,
            bootstrap_key_file,
            allow_open,
            tls_cert,
            tls_key,
        } => store.settings().and_then(|mut settings| {
            if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                settings.tls.cert_file = Some(cert);
                settings.tls.key_file = Some(key);
            }
            settings.webhooks.allow_targets.extend(webhook_allow);
            settings.access.allow_open |= allow_open;
            if bootstrap_key_file.is_some() {
                settings.access.bootstrap_key_file = bootstrap_key_file;
            }
            settings.listen = listen.unwrap_or(settings.listen);
            settings.advertise = advertise.unwrap_or(std::mem::take(&mut settings.advertise));
            settings.limits.max_request_bytes =
                max_request_bytes.unwrap_or(settings.limits.max_request_bytes);
            let kafka = &mut settings.kafka;
            kafka.brokers = kafka_brokers.or(kafka.brokers.take());
            kafka.topic = kafka_topic.unwrap_or(std::mem::take(&mut kafka.topic));
            kafka.group_id = kafka_group.unwrap_or(std::mem::take(&mut kafka.group_id));
            kafka.standby_replicas = standby_replicas.unwrap_or(kafka.standby_replicas);
            kafka.options.extend(kafka_option);
            kafka.option_files.extend(
                kafka_option_file
                    .into_iter()
                    .map(|(k, path)| (k, PathBuf::from(path))),
            );
            let kafka = settings.kafka_settings()?;
            if let Some(topic) = kafka.as_ref().and_then(|k| k.control_topic.as_ref()) {
                // In a group the control topic is where the rule set comes from.
                if settings.rules_source == config::RulesSource::File {
                    anyhow::bail!(
                        "rules_source = \"file\" cannot be used in a group of several: every node runs the rule set of the control topic `{topic}`; change it through the API of any node (docs/cluster.md)"
                    );
                }
                if store.replace_rules {
                    anyhow::bail!(
                        "--replace-rules cannot be used in a group of several: every node runs the rule set of the control topic `{topic}`; change it through the API of any node (PUT /v1/rules, docs/cluster.md)"
                    );
                }
            }
            let engine = open_engine(&settings, store.replace_rules)?;
            let api = query_api::ApiConfig {
                max_request_bytes: settings.limits.max_request_bytes,
            };
            let options = serve::ServeOptions {
                api,
                tls: settings.tls.files()?,
                kafka,
                access: settings.access.config(),
                webhooks: settings.webhooks.config()?,
                cluster: serve::ClusterOptions {
                    advertise: Some(settings.advertise.clone()).filter(|a| !a.is_empty()),
                    peer_tls: settings.tls.peer_client()?,
                },
            };
            serve::serve(engine, settings.listen, options, |_, _, _| {}).map(|()| ExitCode::SUCCESS)
        }),
        Command::Demo {
            data_dir,
            listen,
            rate,
            customers,
            config,
        } => run_demo(data_dir, listen, rate, customers, config),
        Command::CheckRules {
            plan,
            tracking_plan,
            files,
        } => check_rules(&files, plan, tracking_plan.as_deref()),
        Command::Plan { action } => run_plan(action),
        Command::Healthcheck {
            url,
            ca_file,
            server_name,
        } => admin::healthcheck(&url, &admin::HttpsOptions { ca_file, server_name }),
        Command::Backup { to, server, data_dir } => admin::backup(&to, &server, data_dir.as_deref()),
        Command::Restore { from, data_dir } => admin::restore(&from, &data_dir),
        Command::Partitions { action, store } => store.settings().and_then(|settings| {
            let kafka = settings.kafka_settings()?;
            admin::partitions(action, open_engine(&settings, store.replace_rules)?, kafka)
        }),
        Command::Keys { action, store } => store
            .settings()
            .and_then(|settings| admin::keys(action, &settings)),
        Command::DefaultConfig => {
            print!("{}", Settings::default_file());
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            file,
            store,
            batch_size,
            advance_to,
            quiet,
            stats,
        } => run_replay(&file, &store, batch_size.max(1), advance_to, quiet, stats),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `KEY=VALUE` of `--kafka-option` and `--kafka-option-file`.
fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, not `{text}`")),
    }
}

/// The example rules every demo starts with.
const DEMO_RULES: &str = include_str!("../deploy/rules/example.trl");

/// The tracking plan every demo checks its events against (the generator's events fit it).
const DEMO_PLAN: &str = include_str!("../deploy/rules/example-plan.toml");

fn run_demo(
    data_dir: PathBuf,
    listen: std::net::SocketAddr,
    rate: u32,
    customers: u64,
    settings: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let demo_settings = Settings::load(settings.as_deref())?;
    let config = EngineConfig {
        clock: ClockMode::Wall,
        ..demo_settings.engine_config()
    };
    let mut engine = Engine::open(&data_dir, Some(DEMO_RULES), config)
        .with_context(|| format!("opening the demo store at {}", data_dir.display()))?;
    let plan = rules::TrackingPlan::parse(DEMO_PLAN)
        .map_err(|e| anyhow::anyhow!("the demo's tracking plan: {e}"))?;
    engine.set_plan(Some(std::sync::Arc::new(plan)));
    // The demo runs open, on its own data: it says so, and refuses a non-loopback address
    // unless the settings allow it.
    let options = serve::ServeOptions {
        api: query_api::ApiConfig::default(),
        tls: demo_settings.tls.files()?,
        kafka: None,
        access: query_api::access::AccessConfig {
            auth: query_api::access::AuthMode::Off,
            ..demo_settings.access.config()
        },
        webhooks: demo_settings.webhooks.config()?,
        cluster: serve::ClusterOptions {
            advertise: None,
            peer_tls: demo_settings.tls.peer_client()?,
        },
    };
    serve::serve(engine, listen, options, move |bound, handle, stopping| {
        println!(
                "demo: streaming {rate} events/s for {customers} customers (rules: deploy/rules/example.trl, tracking plan: deploy/rules/example-plan.toml)"
            );
        println!("try:");
        println!("  curl -s http://{bound}/v1/changes?limit=5");
        println!("  curl -s http://{bound}/v1/customers/13000000001");
        println!("  curl -s -X POST http://{bound}/v1/segments/query -d '{{\"expr\": \"viewed_seafood and not big_ticket\", \"limit\": 5}}'");
        println!("  curl -s http://{bound}/v1/segments/spring_promo/members?format=csv | head");
        println!("  curl -s http://{bound}/metrics | grep tagstream_events_total");
        println!("  curl -s http://{bound}/v1/schema/observed | head -c 600");
        println!("  curl -s http://{bound}/v1/events -d '{{\"customer_id\": \"13000000001\", \"type\": \"veiw\"}}'   # blocked by the plan");
        println!("  curl -s http://{bound}/v1/quality");
        serve::demo_generator(handle, stopping, rate, customers);
    })?;
    Ok(ExitCode::SUCCESS)
}

fn check_rules(
    files: &[PathBuf],
    plan: bool,
    tracking_plan: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let tracking_plan = tracking_plan.map(load_plan).transpose()?;
    let mut failed = false;
    for path in files {
        let source = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let origin = path.display().to_string();
        match rules::CompiledRules::compile(&source) {
            Ok(compiled) => {
                let against = tracking_plan
                    .as_deref()
                    .map(|p| rules::check_against_plan(&source, p))
                    .unwrap_or_default();
                if against.iter().any(|d| !d.code.is_warning()) {
                    failed = true;
                }
                if against.is_empty() {
                    println!("{origin}: ok, {} definitions", compiled.defs().len());
                } else {
                    eprint!("{}", rules::render_all(&against, &source, &origin));
                }
                if plan {
                    print!("{}", compiled.describe_plan());
                }
            }
            Err(diagnostics) => {
                failed = true;
                eprint!("{}", rules::render_all(&diagnostics, &source, &origin));
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn run_plan(action: PlanAction) -> anyhow::Result<ExitCode> {
    match action {
        PlanAction::Check { file } => {
            let plan = load_plan(&file)?;
            println!(
                "{}: ok, {} event types{}{}",
                file.display(),
                plan.events.len(),
                if plan.profile.is_some() {
                    ", profile attributes"
                } else {
                    ""
                },
                if plan.identifiers.is_some() {
                    ", identifiers"
                } else {
                    ""
                },
            );
            Ok(ExitCode::SUCCESS)
        }
        PlanAction::Infer { store } => {
            let engine = open_engine(&store.settings()?, store.replace_rules)?;
            print!("{}", engine.intake().quality.observed().infer_plan());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_replay(
    file: &std::path::Path,
    store: &StoreArgs,
    batch_size: usize,
    advance_to: Option<i64>,
    quiet: bool,
    stats: bool,
) -> anyhow::Result<ExitCode> {
    let mut engine = open_engine(&store.settings()?, store.replace_rules)?;
    while engine.backfill_pending() {
        engine.backfill_step(10_000)?;
    }
    let report = replay::replay(&mut engine, file, batch_size, !quiet)?;
    if let Some(now) = advance_to {
        engine.advance_clock(now)?;
    }
    let total = report.accepted + report.duplicates + report.rejected;
    let secs = report.elapsed.as_secs_f64();
    println!(
        "replayed {total} events ({} accepted, {} duplicates, {} rejected) in {secs:.2} s: {:.0} events/s",
        report.accepted,
        report.duplicates,
        report.rejected,
        total as f64 / secs.max(1e-9)
    );
    if stats {
        let (customers, bytes) = engine.cache_usage();
        let (hits, misses) = engine.cache_lookups();
        println!(
            "cache: {customers} customers, an estimated {} MiB; {:.1}% of {} uses found in it",
            bytes >> 20,
            100.0 * hits as f64 / (hits + misses).max(1) as f64,
            hits + misses
        );
        // What memory holds beside the cache's budget (issue #17's "within the budgets").
        let index = engine.reader().index().read().memory();
        println!(
            "outside the cache: membership index {} MiB (ids {}, bitmaps {}, columns {}); {} timers pending",
            (index.id_bytes + index.bitmap_bytes + index.column_bytes) >> 20,
            index.id_bytes >> 20,
            index.bitmap_bytes >> 20,
            index.column_bytes >> 20,
            engine.pending_timers()
        );
        println!(
            "timers fired: {}; changes: {}",
            engine.take_fired_timers().count,
            engine.next_seq() - 1
        );
        print_store_stats(&engine)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The store's size by column family after flushing and compacting everything but the raw
/// history, and the per-customer state (customer records and timers) in bytes.
fn print_store_stats(engine: &processor::Engine) -> anyhow::Result<()> {
    use processor::store::{CF_CUSTOMERS, CF_DEDUP, CF_TIMERS, CF_WINDOWS};
    let store = engine.store();
    store.flush()?;
    for cf in [CF_CUSTOMERS, CF_TIMERS, CF_DEDUP, CF_WINDOWS] {
        store.compact(cf);
    }
    let sizes = store.cf_sizes();
    let customers = store.count_keys(CF_CUSTOMERS)?;
    for (cf, bytes) in &sizes {
        println!("  {cf:<10} {:>12} bytes", bytes);
    }
    let bytes_of = |families: &[&str]| -> u64 {
        sizes
            .iter()
            .filter(|(cf, _)| families.contains(cf))
            .map(|(_, b)| b)
            .sum()
    };
    let per_customer = |bytes: u64| bytes as f64 / customers.max(1) as f64;
    println!(
        "{customers} customers; state (customers + timers + windows) {:.0} bytes per customer, of which window chunks {:.0}",
        per_customer(bytes_of(&[CF_CUSTOMERS, CF_TIMERS, CF_WINDOWS])),
        per_customer(bytes_of(&[CF_WINDOWS]))
    );
    Ok(())
}
