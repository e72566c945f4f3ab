//! btvmm: a binary-translation virtual machine monitor for x86 guests.

use std::process::ExitCode;

use btvmm::cli::{Cli, Command};
use btvmm::machine;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            if let Err(e) = init_tracing(args.trace.as_deref()) {
                eprintln!("btvmm: {e:#}");
                return ExitCode::from(2);
            }
            match machine::Machine::build(&args).and_then(|mut m| m.run()) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("btvmm: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Maps `--trace` names to `tracing` targets and installs the subscriber;
/// `BTVMM_LOG` takes full `EnvFilter` directives.
fn init_tracing(trace: Option<&str>) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let mut directives = std::env::var("BTVMM_LOG").unwrap_or_else(|_| "warn".into());
    for name in trace.unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let targets: &[&str] = match name {
            "exec" | "interp" => &["interp"],
            "int" | "exception" => &["exception"],
            "mmu" => &["mmu"],
            "io" | "device" => &["device"],
            "translate" | "translator" => &["translator"],
            "cache" => &["cache"],
            "callout" => &["callout"],
            "all" => &["interp", "exception", "mmu", "device", "translator", "cache", "callout"],
            other => anyhow::bail!("unknown trace target '{other}' (try exec, int, mmu, device, all)"),
        };
        for t in targets {
            directives.push_str(&format!(",{t}=trace"));
        }
    }
    let filter = EnvFilter::try_new(&directives).map_err(|e| anyhow::anyhow!("bad BTVMM_LOG filter: {e}"))?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(true).init();
    Ok(())
}
