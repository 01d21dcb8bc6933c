//! A "dirty CRM" stream for identity resolution (issue #20), and the duplicate rate it leaves.
//!
//! `dirtycrm generate` writes three files for one population of people, each known under
//! 2–7 identifiers (a phone, an email, WeChat openid and unionid, device ids, a member
//! number, a CRM id) spelled as real sources send them (`+86 138 0000 0001`, `0086…`,
//! full-width digits, zero-width characters, upper-case emails), some sharing a family
//! tablet's device id:
//!
//! - `--out-ids`: the events, each naming its person by a random subset of their identifiers
//!   in `ids` (and `customer_id` when the CRM id is among them);
//! - `--out-oracle`: the same events named by the person (`customer_id: "p42"`) — what a
//!   perfect upstream would send, for the throughput of the same work without resolution;
//! - `--out-naive`: the same events named by the first identifier they carry, as sent — what
//!   tagstream makes of the sources without resolution (one customer per spelling);
//! - `--truth`: each event's person, one per line.
//!
//! `dirtycrm measure --data-dir DIR --ids FILE --truth FILE` opens a store the ids stream
//! was replayed into and prints the duplicate rates: records a system keyed on the raw
//! identifier would keep, records keyed on the normalised identifier without linking, and
//! tagstream's customers — against the people who appear — with the people split over more
//! than one customer and the customers holding more than one person.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufWriter, Write};

use bench::loadgen::{event_line, Rng, Zipf};

struct Person {
    ids: Vec<(&'static str, String)>,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: dirtycrm generate --persons N --events M [--seed S] [--shared F] --out-ids F --out-oracle F --out-naive F --truth F\n       dirtycrm measure --data-dir DIR --ids F --truth F"
    );
    std::process::exit(2)
}

fn full_width(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_digit() {
                char::from_u32(c as u32 - 0x30 + 0xFF10).unwrap()
            } else {
                c
            }
        })
        .collect()
}

/// The person's identifiers: always a phone, the rest by chance (2–7 in all).
fn person(n: u64, rng: &mut Rng, shared_device: Option<u64>) -> Person {
    let mut ids = vec![("phone", format!("1{:010}", 3_800_000_000 + n))];
    if rng.unit() < 0.7 {
        ids.push(("email", format!("user{n}@example.com")));
    }
    if rng.unit() < 0.6 {
        ids.push(("openid", format!("oWx{n:08}")));
    }
    if rng.unit() < 0.3 {
        ids.push(("unionid", format!("uN{n:08}")));
    }
    if rng.unit() < 0.3 {
        ids.push(("customer_id", format!("crm-{n}")));
    }
    if rng.unit() < 0.2 {
        ids.push(("member_no", format!("M{n:07}")));
    }
    match shared_device {
        Some(family) => ids.push(("device_id", format!("tablet-{family}"))),
        None if rng.unit() < 0.8 => ids.push(("device_id", format!("dev-{n}"))),
        None => {}
    }
    if ids.len() < 2 {
        ids.push(("openid", format!("oWx{n:08}")));
    }
    Person { ids }
}

/// An identifier as one source or another sends it.
fn spell(id_type: &str, value: &str, rng: &mut Rng) -> String {
    match (id_type, rng.below(8)) {
        ("phone", 0) => format!("+86 {} {} {}", &value[..3], &value[3..7], &value[7..]),
        ("phone", 1) => format!("0086{value}"),
        ("phone", 2) => full_width(value),
        ("phone", 3) => format!("{}-{}-{}", &value[..3], &value[3..7], &value[7..]),
        ("phone", 4) => format!("{}\u{200b}{}", &value[..3], &value[3..]),
        ("email", 0 | 1) => value.to_uppercase(),
        ("email", 2) => format!(" {value} "),
        (_, 5) => format!("{value}\u{200b}"),
        _ => value.to_owned(),
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn generate(args: &HashMap<String, String>) {
    let get = |k: &str| {
        args.get(k)
            .cloned()
            .unwrap_or_else(|| usage(&format!("--{k} is required")))
    };
    let number = |k: &str, d: f64| args.get(k).map_or(d, |v| v.parse().unwrap_or_else(|_| usage(k)));
    let persons = number("persons", 200_000.0) as u64;
    let events = number("events", 1_000_000.0) as u64;
    let shared = number("shared", 0.05);
    let mut rng = Rng::new(number("seed", 1.0) as u64);
    // Families of 2–6 share a tablet.
    let mut people = Vec::with_capacity(persons as usize);
    let mut n = 0;
    while n < persons {
        if rng.unit() < shared {
            let (size, family) = (2 + rng.below(5), n);
            for _ in 0..size.min(persons - n) {
                people.push(person(n, &mut rng, Some(family)));
                n += 1;
            }
        } else {
            people.push(person(n, &mut rng, None));
            n += 1;
        }
    }
    let open =
        |k: &str| BufWriter::with_capacity(1 << 20, std::fs::File::create(get(k)).expect("create output"));
    let (mut ids_out, mut oracle_out, mut truth_out) = (open("out-ids"), open("out-oracle"), open("truth"));
    let mut naive_out = open("out-naive");
    let zipf = Zipf::new(persons, 1.05);
    let start = 1_740_000_000_000i64;
    let step = (45 * 86_400_000 / events.max(1) as i64).max(1);
    const SLOT: &str = r#""customer_id":"@@who@@""#;
    for i in 0..events {
        let p = zipf.sample(&mut rng) as usize;
        let ts = start + i as i64 * step + rng.below(step as u64) as i64;
        let line = event_line(i, "@@who@@", ts, &mut rng);
        let person = &people[p];
        // A non-empty random subset of the person's identifiers.
        let mut carried: Vec<&(&str, String)> = person.ids.iter().filter(|_| rng.below(3) == 0).collect();
        if carried.is_empty() {
            carried.push(rng.pick(&person.ids));
        }
        let mut by_type: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut customer_id = None;
        let mut naive = None;
        for (t, v) in carried {
            let spelled = spell(t, v, &mut rng);
            naive.get_or_insert_with(|| spelled.clone());
            if *t == "customer_id" {
                customer_id = Some(spelled);
            } else {
                by_type.entry(t).or_default().push(json_str(&spelled));
            }
        }
        let mut naming = Vec::new();
        if let Some(c) = customer_id {
            naming.push(format!(r#""customer_id":{}"#, json_str(&c)));
        }
        if !by_type.is_empty() {
            let fields: Vec<String> = by_type
                .iter()
                .map(|(t, vs)| match vs.as_slice() {
                    [one] => format!(r#""{t}":{one}"#),
                    many => format!(r#""{t}":[{}]"#, many.join(",")),
                })
                .collect();
            naming.push(format!(r#""ids":{{{}}}"#, fields.join(",")));
        }
        writeln!(ids_out, "{}", line.replace(SLOT, &naming.join(","))).expect("write");
        writeln!(
            oracle_out,
            "{}",
            line.replace(SLOT, &format!(r#""customer_id":"p{p}""#))
        )
        .expect("write");
        let naive = naive.expect("one identifier at least");
        let naive = format!(r#""customer_id":{}"#, json_str(&naive));
        writeln!(naive_out, "{}", line.replace(SLOT, &naive)).expect("write");
        writeln!(truth_out, "{p}").expect("write");
    }
    for mut w in [ids_out, oracle_out, naive_out, truth_out] {
        w.flush().expect("flush");
    }
}

fn measure(args: &HashMap<String, String>) {
    let get = |k: &str| {
        args.get(k)
            .cloned()
            .unwrap_or_else(|| usage(&format!("--{k} is required")))
    };
    let config = processor::EngineConfig {
        clock: processor::ClockMode::Event,
        ..Default::default()
    };
    let engine =
        processor::Engine::open(std::path::Path::new(&get("data-dir")), None, config).expect("open store");
    let identity = processor::identity::IdentityConfig::default();
    let lines = std::io::BufReader::new(std::fs::File::open(get("ids")).expect("ids stream")).lines();
    let truth = std::io::BufReader::new(std::fs::File::open(get("truth")).expect("truth")).lines();
    let mut raw: BTreeSet<(String, String)> = BTreeSet::new();
    let mut normal: BTreeSet<(String, String)> = BTreeSet::new();
    let mut people: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut customers_of_person: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut owners: HashMap<(String, String), Option<String>> = HashMap::new();
    for (line, person) in lines.zip(truth) {
        let (line, person) = (line.expect("read"), person.expect("read"));
        let v: serde_json::Value = serde_json::from_str(&line).expect("the stream is JSON");
        let mut named: Vec<(String, String)> = Vec::new();
        if let Some(c) = v["customer_id"].as_str() {
            named.push(("customer_id".into(), c.into()));
        }
        if let Some(ids) = v["ids"].as_object() {
            for (t, vs) in ids {
                match vs {
                    serde_json::Value::Array(items) => {
                        named.extend(items.iter().map(|i| (t.clone(), i.as_str().unwrap().to_owned())))
                    }
                    one => named.push((t.clone(), one.as_str().unwrap().to_owned())),
                }
            }
        }
        for (t, value) in named {
            raw.insert((t.clone(), value.clone()));
            let i = identity.position(&t).expect("a known type");
            let Some(normalised) = identity.types[i].normaliser.apply(&value) else {
                continue;
            };
            let key = (t, normalised);
            if !owners.contains_key(&key) {
                let owner = engine
                    .identify(&key.0, &key.1)
                    .expect("lookup")
                    .map(|c| c.to_string());
                owners.insert(key.clone(), owner);
            }
            if let Some(customer) = &owners[&key] {
                people.entry(customer.clone()).or_default().insert(person.clone());
                customers_of_person
                    .entry(person.clone())
                    .or_default()
                    .insert(customer.clone());
            }
            normal.insert(key);
        }
    }
    let customers: u64 = engine
        .reader()
        .partition_counts(1)
        .expect("count customers")
        .iter()
        .sum();
    let persons = customers_of_person.len() as f64;
    let rate = |records: f64| 100.0 * (1.0 - persons / records.max(1.0));
    println!("people seen: {}", persons as u64);
    println!(
        "records keyed on the raw identifier: {} (duplicate rate {:.1}%)",
        raw.len(),
        rate(raw.len() as f64)
    );
    println!(
        "records keyed on the normalised identifier, unlinked: {} (duplicate rate {:.1}%)",
        normal.len(),
        rate(normal.len() as f64)
    );
    println!(
        "tagstream customers: {customers} (duplicate rate {:.1}%)",
        rate(customers as f64)
    );
    let split = customers_of_person.values().filter(|c| c.len() > 1).count();
    let glued = people.values().filter(|p| p.len() > 1).count();
    let glued_people: usize = people.values().filter(|p| p.len() > 1).map(BTreeSet::len).sum();
    println!("people on more than one customer: {split}");
    println!(
        "customers some identifier of more than one person leads to: {glued} ({glued_people} people; shared devices)"
    );
    println!(
        "identity stats: {}",
        serde_json::to_string(&engine.reader().identity_stats()).unwrap()
    );
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let command = argv.next().unwrap_or_else(|| usage("a command is required"));
    let mut args = HashMap::new();
    while let Some(flag) = argv.next() {
        let key = flag
            .strip_prefix("--")
            .unwrap_or_else(|| usage(&format!("unexpected {flag}")));
        let value = argv
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        args.insert(key.to_owned(), value);
    }
    match command.as_str() {
        "generate" => generate(&args),
        "measure" => measure(&args),
        other => usage(&format!("unknown command {other}")),
    }
}
