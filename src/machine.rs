//! The machine: guest RAM, the board of devices, the loaded kernel and the
//! vCPU, put together from the command line, and the run until the guest stops.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use btvmm_runtime::cpu::DescriptorTable;
use btvmm_runtime::{EventSignal, GuestClock, GuestMemory, Vcpu, VmExit};

use crate::board::Board;
use crate::boot::linux::{self, EntryMode};
use crate::boot::multiboot;
use crate::cli::{Engine, RunArgs};
use crate::devices::serial::ConsoleOut;
use crate::devices::stop::{StopHandle, StopReason};

enum Boot {
    Multiboot(multiboot::MultibootEntry),
    Linux(linux::LinuxEntry),
}

pub struct Machine {
    vcpu: Vcpu,
    events: Arc<EventSignal>,
    stop: StopHandle,
    stats_at_exit: bool,
}

/// Where the guest's console goes and whether the host's stdin feeds it.
pub struct Console {
    pub output: ConsoleOut,
    pub stdin: bool,
}

impl Console {
    /// The terminal: COM1 to stdout, stdin to COM1.
    pub fn stdio() -> Self {
        Self { output: Box::new(std::io::stdout()), stdin: true }
    }
}

impl Machine {
    /// A machine as the command line describes it, on the terminal.
    pub fn build(args: &RunArgs) -> anyhow::Result<Self> {
        Self::build_with(args, Console::stdio())
    }

    /// A machine as the command line describes it, with its console elsewhere.
    pub fn build_with(args: &RunArgs, console: Console) -> anyhow::Result<Self> {
        let kernel_path = match (&args.multiboot, &args.kernel) {
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => bail!("no kernel given: use --kernel FILE or --multiboot FILE"),
        };
        let image = std::fs::read(kernel_path)
            .with_context(|| format!("cannot read kernel '{}'", kernel_path.display()))?;
        let mem = Arc::new(GuestMemory::new(args.memory).context("cannot allocate guest memory")?);
        let is_multiboot = args.multiboot.is_some() || !linux::is_bzimage(&image) && multiboot::has_header(&image);
        let boot = if is_multiboot {
            Boot::Multiboot(load_multiboot(&mem, &image, kernel_path, args)?)
        } else {
            Boot::Linux(load_linux(&mem, &image, kernel_path, args)?)
        };

        let events = Arc::new(EventSignal::new());
        let clock = Arc::new(GuestClock::new());
        let board = Board::new(args.memory, console.output, events.clone(), console.stdin, clock.clone())
            .context("cannot start the devices")?;
        let stop = board.stop_handle();
        let mut vcpu = Vcpu::new(mem, Box::new(board));
        vcpu.clock = clock;
        let cpu = &mut vcpu.cpu;
        match boot {
            Boot::Multiboot(entry) => {
                cpu.set_flat_protected32(entry.eip);
                cpu.gdtr = DescriptorTable { base: entry.gdt_base as u64, limit: entry.gdt_limit };
                cpu.regs.gpr[0] = entry.eax as u64;
                cpu.regs.gpr[3] = entry.ebx as u64;
            }
            Boot::Linux(entry) => {
                match entry.mode {
                    EntryMode::Long64 => cpu.set_flat_long64(entry.rip, entry.cr3, linux::BOOT_CS, linux::BOOT_DS),
                    EntryMode::Protected32 => {
                        cpu.set_flat_protected32(entry.rip as u32);
                        cpu.set_flat_selectors(linux::BOOT_CS, linux::BOOT_DS);
                    }
                }
                cpu.gdtr = DescriptorTable { base: entry.gdt_base, limit: entry.gdt_limit };
                cpu.regs.gpr[6] = entry.boot_params;
            }
        }
        if args.profile {
            vcpu.profile = Some(Default::default());
        }
        if args.engine == Engine::Bt {
            vcpu.enable_bt(args.code_cache as usize).context("cannot start the binary translator")?;
        }
        Ok(Self { vcpu, events, stop, stats_at_exit: args.stats })
    }

    /// The vCPU (for its counters after a run).
    pub fn vcpu(&self) -> &Vcpu {
        &self.vcpu
    }

    /// The handle that stops this machine from elsewhere (the signal thread).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The signal that wakes the vCPU (raise it after a stop request).
    pub fn events(&self) -> Arc<EventSignal> {
        self.events.clone()
    }

    /// Runs the guest to its end and returns the process exit status. A
    /// pause (the console's Ctrl-A s) prints the counters and goes on.
    pub fn run(&mut self) -> anyhow::Result<u8> {
        let started = std::time::Instant::now();
        let exit = loop {
            match self.vcpu.run(&self.events, None) {
                VmExit::Paused => {
                    self.flush_console();
                    self.print_stats(started.elapsed());
                }
                exit => break exit,
            }
        };
        let elapsed = started.elapsed();
        self.vcpu.stats.run_ns += elapsed.as_nanos() as u64;
        self.vcpu.stats.stolen_ns = self.vcpu.clock.stolen().as_nanos() as u64;
        self.vcpu.stats.tlb_flushes = self.vcpu.tlb.flushes;
        self.vcpu.stats.tlb_page_invalidations = self.vcpu.tlb.page_invalidations;
        self.flush_console();
        if let Some(text) = crate::vga_text::screen(&self.vcpu.mem) {
            eprint!("btvmm: the guest's VGA text screen (0xb8000) at its end:\n{text}");
        }
        let code = match exit {
            VmExit::Stopped => match self.stop.reason() {
                Some(StopReason::DebugExit(status)) => (status & 0xff) as u8,
                Some(StopReason::Signal(signo)) => crate::console::signals::exit_status(signo) as u8,
                Some(StopReason::Reset) | Some(StopReason::Quit) | None => 0,
            },
            VmExit::HaltedForever => {
                eprintln!("btvmm: the guest halted with interrupts disabled");
                0
            }
            VmExit::TripleFault => {
                eprintln!("btvmm: guest triple fault; guest state:\n{}", self.vcpu.cpu.dump());
                3
            }
            VmExit::InternalError(what) => {
                eprintln!("btvmm: internal error: {what}; guest state:\n{}", self.vcpu.cpu.dump());
                70
            }
            VmExit::BudgetExhausted | VmExit::Exception(_) | VmExit::Paused => 0,
        };
        if self.stats_at_exit {
            self.print_stats(elapsed);
        }
        Ok(code)
    }

    /// The `--stats` report, to stderr: the vCPU's counters, the hottest
    /// guest RIPs when profiling, I/O port accesses by device.
    fn print_stats(&mut self, elapsed: std::time::Duration) {
        eprintln!("--- btvmm stats ({:.3} s) ---", elapsed.as_secs_f64());
        eprint!("{}", self.vcpu.stats.report(self.vcpu.bt.as_ref().map(|b| &b.stats)));
        if let Some(p) = &self.vcpu.profile {
            let total: u64 = p.values().sum();
            let mut hot: Vec<_> = p.iter().collect();
            hot.sort_by(|a, b| b.1.cmp(a.1));
            eprintln!("hottest guest RIPs ({total} samples):");
            for (rip, n) in hot.iter().take(25) {
                eprintln!("  {rip:016x} {:5.1}%", **n as f64 * 100.0 / total.max(1) as f64);
            }
        }
        if let Some(board) = self.board() {
            let io: Vec<String> = board
                .port_stats()
                .iter()
                .filter(|s| s.reads + s.writes > 0)
                .map(|s| format!("{}:{}", s.name, s.reads + s.writes))
                .collect();
            eprintln!("I/O port accesses by device: {}", io.join(" "));
        }
    }

    fn board(&mut self) -> Option<&mut Board> {
        let any: &mut dyn std::any::Any = self.vcpu.platform.as_mut();
        any.downcast_mut::<Board>()
    }

    fn flush_console(&mut self) {
        if let Some(b) = self.board() {
            b.flush_console();
        }
    }
}

fn load_multiboot(mem: &GuestMemory, image: &[u8], path: &Path, args: &RunArgs) -> anyhow::Result<multiboot::MultibootEntry> {
    let modules = read_files(args.initrd.as_deref(), mem.size())?;
    let cmdline = multiboot::qemu_cmdline(&path.display().to_string(), &args.append);
    let refs: Vec<multiboot::Module> = modules.iter().map(|(cmdline, data)| multiboot::Module { cmdline, data }).collect();
    multiboot::load(mem, image, &cmdline, &refs).with_context(|| format!("cannot load '{}'", path.display()))
}

fn load_linux(mem: &GuestMemory, image: &[u8], path: &Path, args: &RunArgs) -> anyhow::Result<linux::LinuxEntry> {
    // Several initrd files are concatenated, which Linux unpacks in turn.
    let initrd: Vec<u8> = read_files(args.initrd.as_deref(), mem.size())?.into_iter().flat_map(|(_, d)| d).collect();
    let entry = match args.boot_entry.as_deref() {
        Some("32") => Some(EntryMode::Protected32),
        Some("64") => Some(EntryMode::Long64),
        _ => None,
    };
    let opts = linux::BootOptions { entry, fast_boot: args.fast_boot };
    let initrd = (!initrd.is_empty() || args.initrd.is_some()).then_some(initrd.as_slice());
    linux::load(mem, image, &args.append, initrd, opts).with_context(|| format!("cannot load '{}'", path.display()))
}

/// Reads `--initrd a,b,...`: each entry is a path, optionally followed by
/// arguments (a multiboot module's command line is the whole entry). Files
/// larger together than `ram` are refused before they are read.
fn read_files(initrd: Option<&str>, ram: u64) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let Some(list) = initrd else { return Ok(Vec::new()) };
    let specs: Vec<(&str, &str)> =
        list.split(',').filter(|s| !s.is_empty()).map(|s| (s, s.split_whitespace().next().unwrap_or(s))).collect();
    let total: u64 = specs.iter().filter_map(|(_, p)| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    if total > ram {
        bail!("the initrd ({total} bytes) is larger than guest memory ({ram} bytes)");
    }
    specs
        .into_iter()
        .map(|(spec, path)| {
            let data = std::fs::read(path).with_context(|| format!("cannot read initrd '{path}'"))?;
            Ok((spec.to_string(), data))
        })
        .collect()
}
