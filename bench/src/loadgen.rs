//! A generator of realistic CRM event streams.
//!
//! Activity per customer follows a Zipf law (a few customers are very active, most are
//! not); the event mix follows the product's scenarios (app opens and views dominate,
//! payments in yuan, leads, calls, video watches, downloads, demos); a chosen fraction of
//! events arrives late, is sent again (some with altered content), or is malformed.

use std::io::{self, Write};

/// Parameters of a generated stream.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub customers: u64,
    pub events: u64,
    pub seed: u64,
    /// Zipf exponent of activity per customer.
    pub zipf_s: f64,
    pub start_ms: i64,
    pub span_ms: i64,
    /// Fraction of events that arrive late (up to an hour out of order).
    pub late: f64,
    /// Fraction of events sent again with the same `event_id`.
    pub duplicate: f64,
    /// Fraction of malformed lines.
    pub malformed: f64,
}

impl Default for StreamSpec {
    fn default() -> Self {
        StreamSpec {
            customers: 10_000,
            events: 100_000,
            seed: 1,
            zipf_s: 1.05,
            start_ms: 1_740_000_000_000,
            span_ms: 45 * 86_400_000,
            late: 0.04,
            duplicate: 0.02,
            malformed: 0.01,
        }
    }
}

/// xorshift64*: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Samples customer ranks with probability proportional to `1 / rank^s`.
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u64, s: f64) -> Zipf {
        let mut cumulative = Vec::with_capacity(n as usize);
        let mut total = 0.0;
        for k in 1..=n {
            total += 1.0 / (k as f64).powf(s);
            cumulative.push(total);
        }
        for c in &mut cumulative {
            *c /= total;
        }
        Zipf { cumulative }
    }

    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        self.cumulative.partition_point(|c| *c < u) as u64
    }
}

const CITIES: [&str; 8] = ["杭州", "上海", "北京", "深圳", "广州", "成都", "南京", "苏州"];
const CATEGORIES: [&str; 6] = ["seafood", "tea", "fruit", "snacks", "wine", "dairy"];
const LEAD_STATUS: [&str; 4] = ["new", "contacted", "qualified", "won"];
const OUTCOMES: [&str; 4] = ["connected", "no_answer", "busy", "rejected"];

/// The customer id of rank `n`, spelled as a CRM would send it: phone numbers and company
/// names, about one in ten with full-width digits, invisible characters or spaces.
pub fn customer_id(n: u64, rng: &mut Rng) -> String {
    let plain = if n.is_multiple_of(5) {
        format!("上海优选食品有限公司#{n}")
    } else {
        format!("1{:010}", 3_000_000_000 + n)
    };
    match rng.below(30) {
        0 => plain
            .chars()
            .map(|c| {
                if c.is_ascii_digit() {
                    char::from_u32(c as u32 - 0x30 + 0xFF10).unwrap()
                } else {
                    c
                }
            })
            .collect(),
        1 => format!("{plain}\u{200b}"),
        2 => format!(" {plain} "),
        _ => plain,
    }
}

/// Writes `spec.events` lines (plus duplicates and malformed lines) of NDJSON to `out`.
/// Returns the number of lines written.
pub fn generate(spec: &StreamSpec, out: &mut impl Write) -> io::Result<u64> {
    let mut rng = Rng::new(spec.seed);
    let zipf = Zipf::new(spec.customers, spec.zipf_s);
    let mut recent: Vec<String> = Vec::with_capacity(256);
    let mut lines = 0;
    let step = (spec.span_ms / spec.events.max(1) as i64).max(1);
    for i in 0..spec.events {
        let mut ts = spec.start_ms + i as i64 * step + rng.below(step as u64) as i64;
        if rng.unit() < spec.late {
            ts -= rng.below(3_600_000) as i64;
        }
        let customer = customer_id(zipf.sample(&mut rng), &mut rng);
        let line = event_line(i, &customer, ts, &mut rng);
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        lines += 1;
        if recent.len() < 256 {
            recent.push(line);
        } else {
            let slot = rng.below(256) as usize;
            recent[slot] = line;
        }
        if rng.unit() < spec.duplicate {
            let again = rng.pick(&recent).clone();
            // Some re-sends carry altered content: the first one applied wins.
            let again = if rng.below(3) == 0 {
                again.replace("\"amount\":", "\"amount\":1")
            } else {
                again
            };
            out.write_all(again.as_bytes())?;
            out.write_all(b"\n")?;
            lines += 1;
        }
        if rng.unit() < spec.malformed {
            let bad = match rng.below(4) {
                0 => "{\"customer_id\": \"13800000000\", \"type\": ".to_owned(),
                1 => format!("{{\"customer_id\": \"\", \"type\": \"view\", \"ts\": {ts}}}"),
                2 => r#"{"customer_id": "x", "type": "view", "ts": "yesterday"}"#.to_owned(),
                _ => "[1, 2, 3]".to_owned(),
            };
            out.write_all(bad.as_bytes())?;
            out.write_all(b"\n")?;
            lines += 1;
        }
    }
    Ok(lines)
}

/// One event of the scenario mix as a JSON line (no trailing newline).
pub fn event_line(i: u64, customer: &str, ts: i64, rng: &mut Rng) -> String {
    let id = format!("ev-{i:010}");
    let roll = rng.below(100);
    let (event_type, props, profile) = match roll {
        0..=29 => (
            "app_open",
            format!(
                r#"{{"device":{{"os":"{}"}},"app_version":"5.{}.0"}}"#,
                rng.pick(&["iOS", "Android"]),
                rng.below(4)
            ),
            String::new(),
        ),
        30..=59 => (
            "view",
            format!(
                r#"{{"category":"{}","duration_s":{},"item":{{"id":"SKU{}","price":{}.{:02}}}}}"#,
                rng.pick(&CATEGORIES),
                rng.below(300),
                rng.below(100_000),
                rng.below(900) + 10,
                rng.below(100)
            ),
            String::new(),
        ),
        60..=69 => (
            "payment",
            format!(
                r#"{{"amount":{}.{:02},"channel":"{}"}}"#,
                rng.below(3000),
                rng.below(100),
                rng.pick(&["app", "wechat", "bank_transfer"])
            ),
            String::new(),
        ),
        70..=77 => (
            "video_watch",
            format!(r#"{{"duration_s":{}}}"#, rng.below(300)),
            String::new(),
        ),
        78..=82 => ("doc_download", r#"{"doc":"报价单"}"#.to_owned(), String::new()),
        83..=84 => ("demo_booked", "{}".to_owned(), String::new()),
        85..=91 => (
            "call",
            format!(
                r#"{{"duration_s":{},"outcome":"{}","direction":"outbound"}}"#,
                rng.below(900),
                rng.pick(&OUTCOMES)
            ),
            format!(
                r#","profile":{{"lead_status":"{}"}}"#,
                rng.pick(&LEAD_STATUS[1..])
            ),
        ),
        92..=94 => (
            "lead_created",
            r#"{"source":"转介绍"}"#.to_owned(),
            r#","profile":{"lead_status":"new"}"#.to_owned(),
        ),
        _ => (
            "profile_update",
            "{}".to_owned(),
            format!(
                r#","profile":{{"city":"{}","follows_official_account":{},"member_level":"{}"}}"#,
                rng.pick(&CITIES),
                rng.below(2) == 0,
                rng.pick(&["普通", "金卡"])
            ),
        ),
    };
    format!(
        r#"{{"event_id":"{id}","customer_id":"{customer}","type":"{event_type}","ts":{ts},"props":{props}{profile}}}"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_valid_and_skewed() {
        let spec = StreamSpec {
            customers: 1000,
            events: 5000,
            ..Default::default()
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        generate(&spec, &mut a).unwrap();
        generate(&spec, &mut b).unwrap();
        assert_eq!(a, b, "same seed, same stream");
        let text = String::from_utf8(a).unwrap();
        let mut per_customer = std::collections::HashMap::<String, u64>::new();
        let (mut ok, mut bad) = (0, 0);
        for line in text.lines() {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v)
                    if v.get("customer_id")
                        .and_then(|c| c.as_str())
                        .is_some_and(|c| !c.is_empty())
                        && v.get("ts").and_then(|t| t.as_i64()).is_some() =>
                {
                    ok += 1;
                    *per_customer
                        .entry(rules::normalize(v["customer_id"].as_str().unwrap()).into_owned())
                        .or_default() += 1;
                }
                _ => bad += 1,
            }
        }
        assert!(ok >= 5000 && bad > 10 && bad < 200, "ok {ok}, bad {bad}");
        let mut counts: Vec<u64> = per_customer.into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        assert!(
            counts[0] > 20 * counts[counts.len() / 2],
            "Zipf: the top customer is far busier than the median"
        );
    }
}
