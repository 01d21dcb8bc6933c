//! A webhook receiver on a real socket, for the tests of deliveries: checks each batch's
//! signature and keeps what it accepted.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// What a webhook receiver saw.
#[derive(Default)]
pub struct Received {
    /// Accepted deliveries' changes, in arrival order.
    pub changes: Vec<Value>,
    pub requests: usize,
    pub bad_signatures: usize,
    /// Each request's `x-tagstream-delivery`.
    pub deliveries: Vec<String>,
    /// Each accepted delivery's id and its first change.
    pub accepted: Vec<(String, Value)>,
}

/// A webhook receiver on a real socket: answers 500 to every request for which `fail(n)`
/// (n counts requests from 0), 200 to the rest, and checks each signature.
pub fn receiver(secret: &'static str, fail: fn(usize) -> bool) -> (String, Arc<Mutex<Received>>) {
    slow_receiver(secret, fail, Duration::ZERO)
}

/// [`receiver`] taking `delay` over each answer.
pub fn slow_receiver(
    secret: &'static str,
    fail: fn(usize) -> bool,
    delay: Duration,
) -> (String, Arc<Mutex<Received>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Received::default()));
    let state = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            // A thread per connection: a kept-alive connection must not hold up another.
            let state = state.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut headers = HashMap::new();
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    loop {
                        line.clear();
                        reader.read_line(&mut line).unwrap();
                        if line.trim().is_empty() {
                            break;
                        }
                        let (k, v) = line.split_once(':').unwrap();
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                    }
                    let len: usize = headers["content-length"].parse().unwrap();
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    std::thread::sleep(delay);
                    let mut seen = state.lock().unwrap();
                    let n = seen.requests;
                    seen.requests += 1;
                    let delivery = headers.get("x-tagstream-delivery").cloned().unwrap_or_default();
                    seen.deliveries.push(delivery.clone());
                    let status = if fail(n) {
                        "500 Internal Server Error"
                    } else {
                        let sig = &headers["x-tagstream-signature"];
                        let (t, v1) = sig.split_once(",v1=").unwrap();
                        let t = t.strip_prefix("t=").unwrap();
                        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
                        mac.update(format!("{t}.").as_bytes());
                        mac.update(&body);
                        let hex: String = mac
                            .finalize()
                            .into_bytes()
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        if hex != v1 {
                            seen.bad_signatures += 1;
                        }
                        let batch: Value = serde_json::from_slice(&body).unwrap();
                        let changes = batch["changes"].as_array().unwrap();
                        if let Some(first) = changes.first() {
                            seen.accepted.push((delivery, first.clone()));
                        }
                        seen.changes.extend(changes.iter().cloned());
                        "200 OK"
                    };
                    drop(seen);
                    let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                    if conn.write_all(answer.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, seen)
}
