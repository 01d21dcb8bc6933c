//! HTTPS on the real binary: a client trusting a test CA gets answers, one that does not is
//! refused at the handshake, a renewed certificate is served after SIGHUP without a restart,
//! and webhooks to `https://` receivers are delivered only when their certificate verifies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::Server;
use tests::TempDir;

#[path = "support/pki.rs"]
mod pki;
#[allow(dead_code)] // this binary starts servers only through start_in
#[path = "support/server.rs"]
mod support;
use pki::{pki, Pki};

fn client_config(ca_pem: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One HTTPS request; `Err` with the reason when the handshake or the request fails.
fn https(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: &str,
) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The flags that serve HTTPS with the certificate and key `write_pki` put in `dir`.
fn tls_flags(dir: &Path) -> [String; 4] {
    [
        "--tls-cert".to_owned(),
        dir.join("cert.pem").display().to_string(),
        "--tls-key".to_owned(),
        dir.join("key.pem").display().to_string(),
    ]
}

/// Starts an HTTPS server on `dir` (holding its certificate) with the rule file `rules`.
fn start(dir: TempDir, rules: &str, extra: &[&str]) -> Server {
    let flags = tls_flags(dir.path());
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    Server::start_in(dir, rules, &args)
}

fn write_pki(dir: &Path, pki: &Pki) {
    std::fs::write(dir.join("cert.pem"), &pki.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &pki.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
}

#[test]
fn https_serves_clients_that_trust_the_ca_and_reloads_on_sighup() {
    let dir = TempDir::new("tls");
    let first = pki();
    write_pki(dir.path(), &first);
    let s = start(dir, "", &[]);
    let dir = s._dir.path();
    let trusting = client_config(Some(&first.ca_pem));
    let answer = https(&s.addr, trusting.clone(), "GET", "/healthz", "").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The API itself, over TLS.
    let ingest = r#"{"customer_id":"c1","type":"view","ts":1744000000000}"#;
    let answer = https(&s.addr, trusting.clone(), "POST", "/v1/events", ingest).unwrap();
    assert!(answer.contains("\"accepted\":1"), "{answer}");
    // A client that does not trust the CA is refused at the handshake.
    let err = https(&s.addr, client_config(None), "GET", "/healthz", "").unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Plain HTTP on the TLS port gets no answer.
    let mut plain = TcpStream::connect(&s.addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    // The container health check over HTTPS: verified against the CA file, and against the
    // name given when the URL's host differs from the certificate's.
    let healthcheck = |extra: &[&str]| {
        let port = s.addr.rsplit_once(':').unwrap().1;
        Command::new(env!("CARGO_BIN_EXE_tagstream"))
            .args([
                "healthcheck",
                "--url",
                &format!("https://127.0.0.1:{port}/readyz"),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let ca = dir.join("ca.pem").display().to_string();
    let ok = healthcheck(&["--ca-file", &ca]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let ok = healthcheck(&["--ca-file", &ca, "--server-name", "localhost"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let untrusted = healthcheck(&[]);
    assert!(!untrusted.status.success());
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
    let wrong_name = healthcheck(&["--ca-file", &ca, "--server-name", "api.example.com"]);
    assert!(!wrong_name.status.success());

    // A renewed certificate from another CA, then SIGHUP: served without a restart.
    let second = pki();
    write_pki(dir, &second);
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let renewed = client_config(Some(&second.ca_pem));
    let deadline = Instant::now() + Duration::from_secs(10);
    while https(&s.addr, renewed.clone(), "GET", "/healthz", "").is_err() {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(https(&s.addr, trusting, "GET", "/healthz", "").is_err());
    // A broken reload keeps the current certificate.
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(https(&s.addr, renewed, "GET", "/healthz", "")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
}

/// A one-connection-at-a-time HTTPS receiver; keeps every request it reads.
fn https_receiver(pki: &Pki) -> (String, Arc<Mutex<String>>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://localhost:{}/hook", listener.local_addr().unwrap().port());
    let seen = Arc::new(Mutex::new(String::new()));
    let kept = seen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            tcp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        raw.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&raw);
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length: usize = text[..end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap())
                                })
                                .unwrap_or(0);
                            if raw.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                }
            }
            if !raw.is_empty() {
                kept.lock().unwrap().push_str(&String::from_utf8_lossy(&raw));
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    (url, seen)
}

const VIEWER: &str = "tag viewer = count(view, 30d) >= 1\n";

#[test]
fn webhooks_to_https_receivers_verify_their_certificate() {
    let receiver_pki = pki();
    let (url, seen) = https_receiver(&receiver_pki);
    let dir = TempDir::new("tls");
    let own = pki();
    write_pki(dir.path(), &own);
    let ca = dir.path().join("receiver-ca.pem");
    std::fs::write(&ca, &receiver_pki.ca_pem).unwrap();
    let trusting = dir.path().join("trusting.toml");
    std::fs::write(
        &trusting,
        format!(
            "[webhooks]\nallow_targets = [\"127.0.0.1\", \"::1\"]\nca_file = {:?}\n",
            ca.display().to_string()
        ),
    )
    .unwrap();
    let s = start(dir, VIEWER, &["--config", trusting.to_str().unwrap()]);
    let client = client_config(Some(&own.ca_pem));
    let hook =
        format!(r#"{{"url": "{url}", "secret": "0123456789abcdef", "name": "viewer", "max_attempts": 2}}"#);
    let made = https(&s.addr, client.clone(), "POST", "/v1/webhooks", &hook).unwrap();
    assert!(made.starts_with("HTTP/1.1 201"), "{made}");
    let ingest = r#"{"customer_id":"c1","type":"view","ts":1744000000000}"#;
    https(&s.addr, client.clone(), "POST", "/v1/events", ingest).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.lock().unwrap().contains("\"viewer\"") {
        assert!(Instant::now() < deadline, "the https receiver got nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen.lock().unwrap().contains("x-tagstream-signature"));
    drop(s);

    // Without the receiver's CA: every attempt fails verification, the batch is dead-lettered
    // and the receiver sees nothing.
    let seen_before = seen.lock().unwrap().len();
    let dir = TempDir::new("tls");
    write_pki(dir.path(), &own);
    let s = start(
        dir,
        VIEWER,
        &["--webhook-allow", "127.0.0.1", "--webhook-allow", "::1"],
    );
    let made = https(&s.addr, client.clone(), "POST", "/v1/webhooks", &hook).unwrap();
    assert!(made.starts_with("HTTP/1.1 201"), "{made}");
    https(&s.addr, client.clone(), "POST", "/v1/events", ingest).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let letters = https(&s.addr, client.clone(), "GET", "/v1/webhooks/1/dead_letters", "").unwrap();
        if letters.contains("certificate") {
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter: {letters}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        seen_before,
        "an unverified receiver got data"
    );
}
