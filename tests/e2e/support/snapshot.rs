//! Everything observable about a stopped store, for comparing two runs exactly.

use std::path::Path;

use processor::{ClockMode, Engine, EngineConfig};

/// The change log (as the API prints it), every customer, and the dead letters
/// (reason, original bytes) of a store no process has open.
pub type Snapshot = (Vec<serde_json::Value>, Vec<String>, Vec<(String, Vec<u8>)>);

pub fn snapshot(data: &Path) -> Snapshot {
    let config = EngineConfig {
        clock: ClockMode::Event,
        sync_writes: false,
        ..Default::default()
    };
    let engine = Engine::open(data, None, config).expect("open a finished store");
    let changes = engine
        .changes(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect();
    let customers = engine
        .customer_ids()
        .unwrap()
        .into_iter()
        .map(|id| {
            let view = engine.customer(&id).unwrap().unwrap();
            format!("{view:?} {:?}", engine.identifiers(&id).unwrap())
        })
        .collect();
    let dead = engine
        .dead_letters(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|d| (d.reason, d.raw))
        .collect();
    (changes, customers, dead)
}
