//! TLS in front of a plain broker for the Kafka-over-TLS tests: tansu 0.6 cannot serve TLS
//! itself (its `--cert` and `--key` flags refuse to be given together, and with `--cert`
//! alone the listener stays plaintext), so a terminator does, as a load balancer would.

use std::net::TcpListener;

/// TLS in front of a plain broker, the way a load balancer terminates it: accepts TLS with
/// the given certificate on `listener` and forwards the plaintext to `upstream`. Counts the
/// handshakes that succeeded and those that failed. Stopped on drop.
pub struct TlsTerminator {
    pub handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub failed_handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsTerminator {
    pub fn start(listener: TcpListener, upstream: String, cert_pem: &str, key_pem: &str) -> TlsTerminator {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (handshakes, failed_handshakes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (ok, failed) = (handshakes.clone(), failed_handshakes.clone());
        listener.set_nonblocking(true).unwrap();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let tcp = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok((tcp, _)) => tcp,
                            Err(_) => continue,
                        },
                    };
                    let (acceptor, upstream, ok, failed) =
                        (acceptor.clone(), upstream.clone(), ok.clone(), failed.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            failed.fetch_add(1, Ordering::SeqCst);
                            return;
                        };
                        ok.fetch_add(1, Ordering::SeqCst);
                        if let Ok(mut plain) = tokio::net::TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        }
                    });
                }
            });
        });
        TlsTerminator {
            handshakes,
            failed_handshakes,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
