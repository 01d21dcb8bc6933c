//! The `tagstream` binary: command-line parsing and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tagstream",
    version,
    about = "Real-time customer tagging and segmentation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check rule files and print every diagnostic; exits 1 when any file has errors.
    CheckRules {
        /// Also print the compiled plan: evaluation order, shared aggregates, and which
        /// definitions each event type and profile attribute can change.
        #[arg(long)]
        plan: bool,
        /// Rule files (`.trl`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckRules { plan, files } => check_rules(&files, plan),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn check_rules(files: &[PathBuf], plan: bool) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for path in files {
        let source = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let origin = path.display().to_string();
        match rules::CompiledRules::compile(&source) {
            Ok(compiled) => {
                println!("{origin}: ok, {} definitions", compiled.defs().len());
                if plan {
                    print!("{}", compiled.describe_plan());
                }
            }
            Err(diagnostics) => {
                failed = true;
                eprint!("{}", rules::render_all(&diagnostics, &source, &origin));
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
