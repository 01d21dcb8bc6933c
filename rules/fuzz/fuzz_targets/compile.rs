//! Fuzzes the whole front end: lexing, parsing, checking, compiling, rendering diagnostics,
//! and printing what parsed. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else { return };
    match rules::CompiledRules::compile(source) {
        Ok(compiled) => {
            let _ = compiled.describe_plan();
        }
        Err(diags) => {
            let _ = rules::render_all(&diags, source, "fuzz");
        }
    }
    let (file, _) = rules::parse(source);
    let _ = file.to_string();
});
