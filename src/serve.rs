//! `tagstream serve` and `tagstream demo`: the engine behind the HTTP API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use processor::kafka::{self, KafkaSettings, KafkaStatus};
use processor::{Engine, EngineHandle, ServiceConfig};
use query_api::access::{Access, AccessConfig};
use query_api::webhooks::{WebhookConfig, Webhooks};
use query_api::{router, ApiConfig, AppState};

/// What `serve` runs besides the engine.
pub struct ServeOptions {
    pub api: ApiConfig,
    /// HTTPS with these files; plain HTTP without.
    pub tls: Option<crate::tls::TlsFiles>,
    pub kafka: Option<KafkaSettings>,
    pub access: AccessConfig,
    pub webhooks: WebhookConfig,
    pub cluster: ClusterOptions,
}

/// How a member of a group of several is reached and reaches the others.
pub struct ClusterOptions {
    /// The URL other nodes reach this one at; `None` derives it from the bound address.
    pub advertise: Option<String>,
    /// How the others' certificates are verified (their URLs are `https://`).
    pub peer_tls: Arc<rustls::ClientConfig>,
}

/// How long the shutdown lets webhooks and Kafka publishers send what is committed (the
/// deploy files give the process more than this before a SIGKILL).
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Serves the API until SIGTERM or Ctrl-C, then finishes the work in flight, sends what is
/// committed (webhooks, Kafka, within [`DRAIN_GRACE`]), flushes and returns. `on_ready` runs once the socket is bound (the demo starts its generator there).
pub fn serve(
    engine: Engine,
    listen: SocketAddr,
    options: ServeOptions,
    on_ready: impl FnOnce(SocketAddr, EngineHandle, Arc<AtomicBool>) + Send + 'static,
) -> anyhow::Result<()> {
    let ServeOptions {
        api,
        tls,
        kafka,
        access,
        webhooks,
        cluster,
    } = options;
    let tls = tls.map(crate::tls::Reloadable::open).transpose()?;
    let stopping = Arc::new(AtomicBool::new(false));
    let access = Access::open(engine.store().clone(), access).map_err(anyhow::Error::msg)?;
    if kafka.as_ref().is_none_or(|k| k.control_topic.is_none()) {
        access.check_listen(listen).map_err(anyhow::Error::msg)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Taken over now, before anything announces the server: a SIGTERM from a supervisor
    // that saw it start then always drains rather than killing the process outright.
    let signals = {
        let _in_runtime = runtime.enter();
        Signals::listen()
    };
    let partitions = engine.config().partitions;
    let fingerprint = settings_fingerprint(&engine, &access);
    let (handle, engine_thread) = EngineHandle::spawn(engine, ServiceConfig::default());
    let mut state = AppState::with_access(handle.clone(), api, Arc::new(access));
    state.webhooks = Arc::new(Webhooks::new(webhooks));
    let members_topic = kafka
        .as_ref()
        .and_then(|k| k.members_topic.clone().map(|t| (k.clone(), t)));
    let mut control = None;
    let mut kafka_workers = match kafka {
        Some(settings) => {
            kafka::check_state_topic(&settings, partitions, Duration::from_secs(10))
                .map_err(anyhow::Error::msg)?;
            let status = Arc::new(KafkaStatus::default());
            state.kafka = Some(status.clone());
            status.set_rules_version(handle.call_blocking(|engine| engine.rules_version())?);
            if let Some(topic) = &settings.control_topic {
                // The group's rule set runs here before any event is judged.
                let worker = kafka::control::start(
                    &settings,
                    topic,
                    &node_name(),
                    handle.clone(),
                    status.clone(),
                    Duration::from_secs(60),
                )
                .map_err(anyhow::Error::msg)?;
                tracing::info!(%topic, version = status.rules_version(), "running the group's rule set");
                // The group's API keys count here before the node is reachable (and
                // decide whether it may listen beyond loopback).
                let shared = query_api::access::routes::join_group(&state.access, worker.control())
                    .map_err(|e| anyhow::anyhow!("sharing API keys with the group: {e}"))?;
                if shared > 0 {
                    tracing::info!(keys = shared, "shared this store's API keys with the group");
                }
                state.access.check_listen(listen).map_err(anyhow::Error::msg)?;
                state.control = Some(worker.control().clone());
                control = Some(worker);
            }
            tracing::info!(brokers = %settings.brokers, topic = %settings.topic, group = %settings.group_id, "consuming from Kafka");
            // With the state topic, this node shares the group with others.
            let host = settings.state_topic.is_some().then(|| handle.partition_host());
            let workers = kafka::start(
                settings,
                handle.reader().clone(),
                handle.kafka_apply(),
                status,
                host,
            )
            .context("starting the Kafka consumer")?;
            Some(workers)
        }
        None => None,
    };
    let engine_failed = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(%bound, "serving");
        let scheme = if tls.is_some() { "https" } else { "http" };
        // In a group of several: cards on the members topic, and requests sent on to owners.
        let members = match (members_topic, state.kafka.clone()) {
            (Some((settings, topic)), Some(status)) => {
                let url = cluster
                    .advertise
                    .clone()
                    .unwrap_or_else(|| advertised(scheme, bound));
                let worker = kafka::members::start(
                    &settings,
                    &topic,
                    &url,
                    partitions,
                    &fingerprint,
                    status.clone(),
                    Duration::from_secs(10),
                )
                .map_err(anyhow::Error::msg)?;
                tracing::info!(%url, %topic, "advertising this node to the group");
                if let Some(workers) = kafka_workers.as_mut() {
                    // Warm copies of what others own, picked from the cards.
                    workers
                        .start_standby(
                            &settings,
                            worker.members().clone(),
                            handle.partition_host(),
                            status,
                        )
                        .map_err(anyhow::Error::msg)?;
                    if settings.standby_replicas > 0 {
                        tracing::info!(replicas = settings.standby_replicas, "keeping standby copies");
                    }
                }
                state.cluster = Some(Arc::new(query_api::cluster::Cluster::new(
                    worker.members().clone(),
                    cluster.peer_tls.clone(),
                )));
                Some(worker)
            }
            _ => None,
        };
        announce(&format!("tagstream listening on {scheme}://{bound}"));
        on_ready(bound, handle.clone(), stopping.clone());
        let engine_ended = handle.committed();
        drop(handle);
        let webhooks = state.webhooks.clone();
        if let Some(control) = &state.control {
            // Where the group's deliveries stand, before any subscription starts.
            webhooks.follow_cursors(control);
        }
        let resumed = webhooks
            .resume(&state)
            .map_err(|e| anyhow::anyhow!("loading webhook subscriptions: {e}"))?;
        if resumed > 0 {
            tracing::info!(subscriptions = resumed, "delivering webhooks");
        }
        if let Some(control) = &state.control {
            let shared = webhooks
                .join_group(&state, control)
                .map_err(|e| anyhow::anyhow!("sharing webhook subscriptions with the group: {e}"))?;
            if shared > 0 {
                tracing::info!(
                    subscriptions = shared,
                    "shared this store's webhook subscriptions with the group"
                );
            }
        }
        let shutdown = state.shutdown.clone();
        let app = router(state);
        let engine_failed = Arc::new(AtomicBool::new(false));
        let failed = engine_failed.clone();
        let signalled = async move {
            if stop_requested(engine_ended, signals).await == Stop::EngineEnded {
                failed.store(true, Ordering::SeqCst);
            }
            // Streams end now, or the graceful shutdown would wait for their clients.
            shutdown.begin();
        };
        let served = match tls {
            Some(tls) => {
                crate::tls::reload_on_sighup(tls.clone())?;
                crate::tls::serve(listener, app, tls, signalled, DRAIN_GRACE).await
            }
            // The client address reaches the handlers (the failed-authentication budget).
            None => axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(signalled)
            .await
            .map_err(anyhow::Error::from),
        };
        stopping.store(true, Ordering::SeqCst);
        // No rule-set change is asked of this node any more.
        drop(control);
        // Others stop sending requests here.
        if let Some(members) = members {
            tokio::task::spawn_blocking(move || members.stop(Duration::from_secs(3))).await?;
        }
        served?;
        // No request is in flight any more. The Kafka consumer applies its batch in flight
        // and stops; then what is committed goes out — webhooks and the Kafka publishers
        // each get until the drain deadline.
        let deadline = std::time::Instant::now() + DRAIN_GRACE;
        let kafka_drain = kafka_workers.map(|workers| {
            std::thread::spawn(move || {
                workers.stop(deadline.saturating_duration_since(std::time::Instant::now()))
            })
        });
        let cut = webhooks
            .drain(deadline.saturating_duration_since(std::time::Instant::now()))
            .await;
        if cut > 0 {
            tracing::warn!(
                subscriptions = cut,
                "webhooks still delivering at the drain deadline; they resume after a restart"
            );
        }
        if let Some(drain) = kafka_drain {
            match tokio::task::spawn_blocking(move || drain.join()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(cut)) => tracing::warn!(
                    publishers = cut,
                    "Kafka publishers still sending at the drain deadline; they resume after a restart"
                ),
                _ => tracing::error!("a Kafka worker thread panicked"),
            }
        }
        anyhow::Ok(engine_failed.load(Ordering::SeqCst))
    })?;
    // Every handle is gone once the server stops: the engine thread drains its queue,
    // flushes, and ends.
    runtime.shutdown_timeout(Duration::from_secs(5));
    engine_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    if engine_failed {
        anyhow::bail!(
            "the engine stopped on its own (the log says why); start tagstream again to go on from the store"
        );
    }
    tracing::info!("stopped cleanly");
    announce("tagstream stopped cleanly");
    Ok(())
}

/// The URL other nodes reach this one at when `advertise` is not set: the bound address,
/// or the host name when it listens on every interface.
fn advertised(scheme: &str, bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".into());
        format!("{scheme}://{host}:{}", bound.port())
    } else {
        format!("{scheme}://{bound}")
    }
}

/// What the nodes of a group must agree on beyond the rule set, which travels on the
/// control topic: the settings that decide how an event or a request is judged (clock,
/// limits, horizons, identity, partitions, the tracking plan, roles and field policies).
/// Their `Debug` forms, hashed (FNV-1a): the same settings file gives the same fingerprint on every
/// node of one version; the members' cards carry it and `/v1/cluster` names the nodes
/// that differ.
fn settings_fingerprint(engine: &processor::Engine, access: &Access) -> String {
    let config = engine.config();
    let judged = format!(
        "{:?}|{:?}|{}|{}|{:?}|{}|{:?}|{:?}|{:?}",
        config.clock,
        config.limits,
        config.dedup_horizon_ms,
        config.retention_ms,
        // The identifier types, not the lookup cache's size (a machine's own choice).
        config.identity.types,
        config.partitions,
        engine.plan(),
        access.config.roles,
        access.config.fields,
    );
    format!("{:016x}", processor::partition::fnv1a(judged.bytes()))
}

/// A name for this process among the group's nodes (host, process and start time).
fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{host}-{}-{started}", std::process::id())
}

/// A line on stdout for whoever started us. Never fails: by shutdown the reader of a pipe
/// may be gone, and a closed stdout must not turn a clean stop into a panic.
fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Why the server stops.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Signalled,
    /// The engine stopped on its own, which it does only when it cannot go on (its writer
    /// thread panicked): the server stops too, with an error, so that a supervisor starts it
    /// again rather than it answering 503 for ever.
    EngineEnded,
}

/// Waits for SIGTERM or Ctrl-C, or for the engine to stop (its end of `committed` gone).
async fn stop_requested(mut committed: tokio::sync::watch::Receiver<u64>, signals: Signals) -> Stop {
    tokio::select! {
        () = signals.received() => Stop::Signalled,
        () = async { while committed.changed().await.is_ok() {} } => {
            tracing::error!("the engine stopped; shutting down");
            Stop::EngineEnded
        }
    }
}

/// SIGTERM and SIGINT (Ctrl-C), listened for from the moment this is made: until then
/// either ends the process.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Takes both signals over (inside the runtime).
    fn listen() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Waits for either.
    async fn received(mut self) {
        async fn one(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = one(&mut self.term) => {},
            () = one(&mut self.interrupt) => {},
        }
        tracing::info!("shutting down: finishing the batch in flight");
    }
}

/// Streams realistic events into the engine at `rate` events per second, stamped with the
/// wall clock: customers in Chinese cities, payments in yuan, app opens, views, leads, calls.
/// A small batch every 10 ms goes to one of a few sender threads, as from several producers
/// (the engine groups what has arrived into one commit). Event ids start from the wall clock,
/// so a second run on a kept store makes new events, not duplicates of the first run's.
pub fn demo_generator(handle: EngineHandle, stopping: Arc<AtomicBool>, rate: u32, customers: u64) {
    const EVERY: Duration = Duration::from_millis(10);
    const SENDERS: usize = 4;
    let (batches, queue) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(SENDERS * 4);
    let queue = Arc::new(std::sync::Mutex::new(queue));
    for n in 0..SENDERS {
        let (handle, queue, stopping) = (handle.clone(), queue.clone(), stopping.clone());
        std::thread::Builder::new()
            .name(format!("tagstream-demo-send-{n}"))
            .spawn(move || loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(events) = next else { return };
                if let Err(e) = handle.ingest_blocking(events, Vec::new(), "demo") {
                    tracing::warn!(error = %e, "demo generator could not ingest; stopping");
                    stopping.store(true, Ordering::SeqCst);
                    return;
                }
            })
            .expect("spawn a demo sender");
    }
    std::thread::Builder::new()
        .name("tagstream-demo".into())
        .spawn(move || {
            let mut rng = bench::loadgen::Rng::new(wall_ms() as u64);
            let zipf = bench::loadgen::Zipf::new(customers, 1.05);
            let started = std::time::Instant::now();
            // Unique across runs: a run would need 10^6 events per ms to reach the next one.
            let first_id = wall_ms() as u64 * 1_000_000;
            let mut made: u64 = 0;
            while !stopping.load(Ordering::SeqCst) {
                let tick = std::time::Instant::now();
                let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
                let now = wall_ms();
                // Behind by more than 100 ms (a stall): skip ahead, the rate is a target.
                let from = made.max(due.saturating_sub(u64::from(rate / 10)));
                let events: Vec<Vec<u8>> = (from..due)
                    .map(|i| {
                        let customer = bench::loadgen::customer_id(zipf.sample(&mut rng), &mut rng);
                        bench::loadgen::event_line(first_id + i, &customer, now, &mut rng).into_bytes()
                    })
                    .collect();
                made = due;
                // A full queue (the engine is behind) waits: the generator slows with it.
                if !events.is_empty() && batches.send(events).is_err() {
                    return;
                }
                std::thread::sleep(EVERY.saturating_sub(tick.elapsed()));
            }
        })
        .expect("spawn the demo generator");
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use processor::{Engine, EngineConfig, EngineHandle, ServiceConfig};

    use super::{stop_requested, Signals, Stop};

    /// The server's stop waits on the engine too: once the engine thread ends, the wait ends
    /// with the reason that makes `serve` exit with an error.
    #[test]
    fn an_engine_that_ends_stops_the_server() {
        let dir = ::tests::TempDir::new("serve-engine-ended");
        let engine = Engine::open(dir.path(), Some("tag seen on view"), EngineConfig::default()).unwrap();
        let (handle, thread) = EngineHandle::spawn(engine, ServiceConfig::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let committed = handle.committed();
        let waiting = runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_millis(300),
                stop_requested(committed.clone(), Signals::listen()),
            )
            .await
        });
        assert!(waiting.is_err(), "stopped while the engine runs: {waiting:?}");
        // The last handle gone, the engine thread ends (as it does when it cannot go on).
        drop(handle);
        thread.join().unwrap();
        let stop = runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                stop_requested(committed, Signals::listen()),
            )
            .await
        });
        assert_eq!(stop.ok(), Some(Stop::EngineEnded));
    }
}
