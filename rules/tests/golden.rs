//! Golden files for the rule language's textual contracts.
//!
//! - `diagnostics/NAME.trl` must fail to compile; every diagnostic, rendered, is compared
//!   with `diagnostics/NAME.stderr`.
//! - `constructs/NAME.trl` must compile; the canonical print of the file and the compiled
//!   plan are compared with `constructs/NAME.out`, and the print must parse back to the
//!   same tree.
//!
//! Run with `BLESS=1` to write the expected files after reviewing a change.

use std::fs;
use std::path::{Path, PathBuf};

use rules::ast::WithoutSpans;
use rules::{parse, render_all, CompiledRules};

fn cases(dir: &str) -> Vec<PathBuf> {
    // At run time: a shared target dir may hold a build made from another clone.
    let root = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
        std::path::PathBuf::from,
    );
    let dir = root.join("tests").join(dir);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "trl"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no cases in {}", dir.display());
    files
}

/// Compares `actual` with the golden file, or writes it under `BLESS=1`. Returns a
/// description of the mismatch.
fn check_golden(path: &Path, actual: &str) -> Option<String> {
    if std::env::var_os("BLESS").is_some() {
        fs::write(path, actual).expect("write golden file");
        return None;
    }
    let expected = fs::read_to_string(path).unwrap_or_default();
    (expected != actual).then(|| {
        format!(
            "{}:\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        )
    })
}

#[test]
fn every_diagnostic_case_renders_as_its_golden_file() {
    let mut failures = Vec::new();
    for case in cases("diagnostics") {
        let source = fs::read_to_string(&case).expect("read case");
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let diags = match CompiledRules::compile(&source) {
            Ok(_) => {
                failures.push(format!("{name}: compiled, but it is a diagnostics case"));
                continue;
            }
            Err(d) => d,
        };
        // The case is named after the code it must raise.
        let stem = case.file_stem().unwrap().to_string_lossy();
        if stem.starts_with('E') {
            let code = &stem[..5];
            if !diags.iter().any(|d| d.code.as_str() == code) {
                failures.push(format!("{name}: expected a diagnostic {code}, got {diags:?}"));
            }
        }
        let rendered = render_all(&diags, &source, &name);
        failures.extend(check_golden(&case.with_extension("stderr"), &rendered));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_construct_compiles_prints_and_reparses() {
    let mut failures = Vec::new();
    for case in cases("constructs") {
        let source = fs::read_to_string(&case).expect("read case");
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let compiled = match CompiledRules::compile(&source) {
            Ok(c) => c,
            Err(d) => {
                failures.push(render_all(&d, &source, &name));
                continue;
            }
        };
        let (tree, _) = parse(&source);
        let printed = tree.to_string();
        let (reparsed, diags) = parse(&printed);
        if !diags.is_empty() || reparsed.without_spans() != tree.without_spans() {
            failures.push(format!(
                "{name}: the print does not parse back to the same tree:\n{printed}"
            ));
        }
        let actual = format!("{printed}\n{}", compiled.describe_plan());
        failures.extend(check_golden(&case.with_extension("out"), &actual));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
