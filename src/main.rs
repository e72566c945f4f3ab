//! btvmm: a binary-translation virtual machine monitor for x86 guests.

use std::process::ExitCode;

use anyhow::Context as _;
use btvmm::cli::{Cli, Command, RunArgs};
use btvmm::{console, machine};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            if let Err(e) = init_tracing(args.trace.as_deref()) {
                eprintln!("btvmm: {e:#}");
                return ExitCode::from(2);
            }
            let result = run(&args);
            // The console session is over (terminal restored) before any message.
            match result {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("btvmm: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Translate(args) => match btvmm::translate_cmd::run(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("btvmm: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

/// Runs a machine on the terminal; the console session's guard restores
/// the terminal when this returns, by value or by an unwinding panic.
fn run(args: &RunArgs) -> anyhow::Result<u8> {
    let session = console::Session::start().context("cannot set up the console")?;
    let mut machine = machine::Machine::build(args)?;
    session.attach(machine.stop_handle(), machine.events());
    machine.run()
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
