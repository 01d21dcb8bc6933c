//! `tagstream serve` and `tagstream demo`: the engine behind the HTTP API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use processor::kafka::{self, ApplyError, KafkaBatch, KafkaSettings, KafkaStatus};
use processor::Engine;
use query_api::{router, ApiConfig, AppState, EngineHandle, EngineThreadConfig};

/// Serves the API until SIGTERM or Ctrl-C, then finishes the work in flight, flushes and
/// returns. `on_ready` runs once the socket is bound (the demo starts its generator there).
pub fn serve(
    engine: Engine,
    listen: SocketAddr,
    api: ApiConfig,
    kafka: Option<KafkaSettings>,
    on_ready: impl FnOnce(SocketAddr, EngineHandle, Arc<AtomicBool>) + Send + 'static,
) -> anyhow::Result<()> {
    let stopping = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (handle, engine_thread) = EngineHandle::spawn(engine, EngineThreadConfig::default());
    let mut state = AppState::new(handle.clone(), api);
    let kafka_workers = match kafka {
        Some(settings) => {
            let status = Arc::new(KafkaStatus::default());
            state.kafka = Some(status.clone());
            tracing::info!(brokers = %settings.brokers, topic = %settings.topic, group = %settings.group_id, "consuming from Kafka");
            let workers = kafka::start(
                settings,
                handle.reader().clone(),
                kafka_apply(handle.clone()),
                status,
            )
            .context("starting the Kafka consumer")?;
            Some(workers)
        }
        None => None,
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(%bound, "serving");
        announce(&format!("tagstream listening on http://{bound}"));
        on_ready(bound, handle.clone(), stopping.clone());
        drop(handle);
        let webhooks = state.webhooks.clone();
        let resumed = webhooks
            .resume(&state)
            .map_err(|e| anyhow::anyhow!("loading webhook subscriptions: {e}"))?;
        if resumed > 0 {
            tracing::info!(subscriptions = resumed, "delivering webhooks");
        }
        let app = router(state);
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await;
        stopping.store(true, Ordering::SeqCst);
        served?;
        anyhow::Ok(())
    })?;
    // The consumer applies its batch in flight and stops; publishers stop at a batch end.
    if let Some(workers) = kafka_workers {
        workers.stop();
    }
    // Every handle is gone once the server stops: the engine thread drains its queue,
    // flushes, and ends.
    runtime.shutdown_timeout(Duration::from_secs(5));
    engine_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    tracing::info!("stopped cleanly");
    announce("tagstream stopped cleanly");
    Ok(())
}

/// How the Kafka consumer hands a batch to the engine thread: with each partition's next
/// offset, committed atomically with the state (see `processor::kafka`).
fn kafka_apply(handle: EngineHandle) -> kafka::Apply {
    Box::new(move |batch: Arc<KafkaBatch>| {
        let received = std::time::Instant::now();
        let result = handle.call_blocking(move |engine| {
            query_api::metrics::ingest_measured(engine, &batch.events, &batch.positions, received)
        });
        match result {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => Err(ApplyError::Failed(e.to_string())),
            Err(query_api::ApiError::Busy) => Err(ApplyError::Busy),
            Err(e) => Err(ApplyError::Failed(e.to_string())),
        }
    })
}

/// A line on stdout for whoever started us. Never fails: by shutdown the reader of a pipe
/// may be gone, and a closed stdout must not turn a clean stop into a panic.
fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing the batch in flight");
}

/// Streams realistic events into the engine at `rate` events per second, stamped with the
/// wall clock: customers in Chinese cities, payments in yuan, app opens, views, leads, calls.
pub fn demo_generator(handle: EngineHandle, stopping: Arc<AtomicBool>, rate: u32, customers: u64) {
    std::thread::Builder::new()
        .name("tagstream-demo".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut rng = bench::loadgen::Rng::new(7);
            let zipf = bench::loadgen::Zipf::new(customers, 1.05);
            let batch = (rate / 10).max(1);
            let mut i: u64 = 0;
            while !stopping.load(Ordering::SeqCst) {
                let started = std::time::Instant::now();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let events: Vec<Vec<u8>> = (0..batch)
                    .map(|_| {
                        i += 1;
                        let customer = bench::loadgen::customer_id(zipf.sample(&mut rng), &mut rng);
                        bench::loadgen::event_line(i, &customer, now, &mut rng).into_bytes()
                    })
                    .collect();
                let result = runtime.block_on(handle.call(move |engine| {
                    query_api::metrics::ingest_measured::<_, &str>(engine, &events, &[], started)
                }));
                if let Err(e) = result {
                    tracing::warn!(error = %e, "demo generator could not ingest; stopping");
                    return;
                }
                std::thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
            }
        })
        .expect("spawn the demo generator");
}
