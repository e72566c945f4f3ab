//! The oracle: runs a sequence on the host CPU in a forked child process.
//!
//! Why a child: a sequence may fault (#DE, #UD, int3...) and a harness bug may
//! make one scribble or jump anywhere; the test process must survive both. One
//! child serves many sequences (a pipe round trip each) and is respawned if it
//! ever dies or hangs.
//!
//! Layout in the child, all at fixed addresses below 2 GiB so the stubs can use
//! absolute `[disp32]` operands without a spare register:
//!
//!     CODE_ADDR   sequence bytes, then `jmp EXIT_ADDR`         (memfd, R-X)
//!     STUB_ADDR   entry / exit / fault-exit stubs               (memfd, R-X)
//!     CTL_ADDR    `Ctl`: registers in and out, fault report     (memfd, RW)
//!     WINDOW_ADDR the data window, guest stack inside           (memfd, RW)
//!
//! W^X: the code memfd is mapped read-write only in the parent and
//! read-execute only in the child (which drops its inherited writable view);
//! no mapping is ever writable and executable. The child executes `cpuid`
//! (serializing) before each run, as cross-modifying code requires.
//!
//! # Safety
//! The unsafe code here is raw mmap/fork/pipe/signal plumbing. The parent
//! touches the shared mappings only through raw pointers and only while the
//! child is parked in `read()` (the pipe orders the accesses). After `fork`
//! the child runs only async-signal-safe libc calls and never allocates, since
//! the test process is multi-threaded.

use std::ffi::c_void;
use std::mem::offset_of;
use std::ptr;

use iced_x86::code_asm::*;
use iced_x86::{Code, Encoder, Instruction};

use super::machine::*;

const CODE_REGION: usize = 0x4000;
const STUB_ADDR: u64 = CODE_ADDR + 0x10000;
const EXIT_ADDR: u64 = STUB_ADDR + 0x100;
const FAULT_EXIT_ADDR: u64 = STUB_ADDR + 0x200;
const STUB_SIZE: usize = 0x1000;
const CTL_ADDR: u64 = CODE_ADDR + 0x20000;
const CTL_SIZE: usize = 0x1000;
const ALT_STACK_SIZE: usize = 0x10000;
const NO_FAULT: u64 = u64::MAX;
const TIMEOUT_MS: u64 = 2000;
const FAULT_SIGNALS: [libc::c_int; 5] =
    [libc::SIGSEGV, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP, libc::SIGBUS];

/// The control block shared between parent, child and stubs.
#[repr(C)]
struct Ctl {
    gpr: [u64; 16],
    rflags: u64,
    host_rsp: u64,
    vector: u64,
    fault_rip: u64,
    running: u64,
}

const OFF_RFLAGS: u64 = offset_of!(Ctl, rflags) as u64;
const OFF_HOST_RSP: u64 = offset_of!(Ctl, host_rsp) as u64;

/// The host CPU as an `Executor`.
pub struct NativeExecutor {
    code_rw: *mut u8,
    ctl: *mut Ctl,
    window: *mut u8,
    fds: [libc::c_int; 3],
    child: Option<Child>,
    last_code_len: usize,
    /// How many times the child had to be (re)started.
    pub spawns: u32,
}

struct Child {
    pid: libc::pid_t,
    cmd_wr: libc::c_int,
    resp_rd: libc::c_int,
}

fn os_err(what: &str) -> ExecutorError {
    ExecutorError::Os(format!("{what}: {}", std::io::Error::last_os_error()))
}

fn memfd(name: &std::ffi::CStr, size: usize) -> Result<libc::c_int, ExecutorError> {
    // SAFETY: plain syscalls on a fresh fd we own; name is NUL-terminated.
    unsafe {
        let fd = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return Err(os_err("memfd_create"));
        }
        if libc::ftruncate(fd, size as libc::off_t) != 0 {
            libc::close(fd);
            return Err(os_err("ftruncate"));
        }
        Ok(fd)
    }
}

fn map_shared(fd: libc::c_int, size: usize) -> Result<*mut u8, ExecutorError> {
    // SAFETY: a new shared mapping at a kernel-chosen address aliases nothing
    // Rust owns.
    let p = unsafe {
        libc::mmap(ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap"));
    }
    Ok(p.cast())
}

impl NativeExecutor {
    pub fn new() -> Result<Self, ExecutorError> {
        let code_fd = memfd(c"difftest-code", CODE_REGION + STUB_SIZE)?;
        let ctl_fd = memfd(c"difftest-ctl", CTL_SIZE)?;
        let win_fd = memfd(c"difftest-window", WINDOW_SIZE)?;
        let mut exec = NativeExecutor {
            code_rw: map_shared(code_fd, CODE_REGION + STUB_SIZE)?,
            ctl: map_shared(ctl_fd, CTL_SIZE)?.cast(),
            window: map_shared(win_fd, WINDOW_SIZE)?,
            fds: [code_fd, ctl_fd, win_fd],
            child: None,
            last_code_len: CODE_REGION,
            spawns: 0,
        };
        let stubs = assemble_stubs();
        // SAFETY: code_rw maps CODE_REGION + STUB_SIZE bytes; stubs fit in
        // STUB_SIZE (asserted in assemble_stubs). No child exists yet.
        unsafe {
            ptr::write_bytes(exec.code_rw, 0xcc, CODE_REGION);
            ptr::copy_nonoverlapping(stubs.as_ptr(), exec.code_rw.add(CODE_REGION), stubs.len());
        }
        exec.spawn()?;
        Ok(exec)
    }

    fn spawn(&mut self) -> Result<(), ExecutorError> {
        let mut cmd = [0 as libc::c_int; 2];
        let mut resp = [0 as libc::c_int; 2];
        for fds in [&mut cmd, &mut resp] {
            // SAFETY: pipe2 writes two fds into the array we pass.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return Err(os_err("pipe2"));
            }
        }
        // SAFETY: the child only calls async-signal-safe functions (child_main).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(os_err("fork"));
        }
        if pid == 0 {
            // SAFETY: we are the freshly forked child; the fds are ours.
            unsafe {
                libc::close(cmd[1]);
                libc::close(resp[0]);
                child_main(cmd[0], resp[1], self.fds, self.code_rw)
            }
        }
        // SAFETY: closing the child's ends in the parent.
        unsafe {
            libc::close(cmd[0]);
            libc::close(resp[1]);
        }
        self.child = Some(Child { pid, cmd_wr: cmd[1], resp_rd: resp[0] });
        self.spawns += 1;
        match self.wait_child() {
            Ok(b'R') => Ok(()),
            Ok(other) => {
                self.kill_child();
                Err(ExecutorError::Os(format!("child setup failed at step {}", other as char)))
            }
            Err(e) => {
                self.kill_child();
                Err(e)
            }
        }
    }

    /// Waits for one status byte from the child.
    fn wait_child(&mut self) -> Result<u8, ExecutorError> {
        let child = self.child.as_ref().expect("child present");
        let mut pfd = libc::pollfd { fd: child.resp_rd, events: libc::POLLIN, revents: 0 };
        // SAFETY: pfd is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, TIMEOUT_MS as libc::c_int) };
        if n == 0 {
            return Err(ExecutorError::Timeout(TIMEOUT_MS));
        }
        let mut byte = 0u8;
        // SAFETY: reading one byte into a local.
        let got = unsafe { libc::read(child.resp_rd, (&mut byte as *mut u8).cast(), 1) };
        if got != 1 {
            return Err(ExecutorError::Os("native child died".into()));
        }
        Ok(byte)
    }

    fn kill_child(&mut self) {
        if let Some(child) = self.child.take() {
            // SAFETY: pid is our own child, not yet reaped; fds are ours.
            unsafe {
                libc::kill(child.pid, libc::SIGKILL);
                libc::waitpid(child.pid, ptr::null_mut(), 0);
                libc::close(child.cmd_wr);
                libc::close(child.resp_rd);
            }
        }
    }

    fn load(&mut self, code: &[u8], init: &MachineState, window: &[u8]) {
        let mut jmp = Instruction::with_branch(Code::Jmp_rel32_64, EXIT_ADDR).expect("jmp");
        jmp.set_ip(CODE_ADDR + code.len() as u64);
        let mut enc = Encoder::new(64);
        enc.encode(&jmp, CODE_ADDR + code.len() as u64).expect("encode jmp");
        let tail = enc.take_buffer();
        let used = code.len() + tail.len();
        // SAFETY: the child is parked in read(); all writes stay inside the
        // mappings (code.len() <= CODE_MAX = CODE_REGION - 16 checked by run, the
        // window slice is WINDOW_SIZE long).
        unsafe {
            ptr::copy_nonoverlapping(code.as_ptr(), self.code_rw, code.len());
            ptr::copy_nonoverlapping(tail.as_ptr(), self.code_rw.add(code.len()), tail.len());
            if self.last_code_len > used {
                ptr::write_bytes(self.code_rw.add(used), 0xcc, self.last_code_len - used);
            }
            let ctl = &mut *self.ctl;
            ctl.gpr = init.gpr;
            ctl.rflags = (init.rflags & rflags::COMPARED) | rflags::FIXED;
            ctl.vector = NO_FAULT;
            ctl.running = 0;
            ptr::copy_nonoverlapping(window.as_ptr(), self.window, WINDOW_SIZE);
        }
        self.last_code_len = used;
    }

    fn collect(&mut self, window: &mut [u8]) -> Outcome {
        // SAFETY: the child has answered and is parked in read() again.
        unsafe {
            ptr::copy_nonoverlapping(self.window, window.as_mut_ptr(), WINDOW_SIZE);
            let ctl = &*self.ctl;
            let state = MachineState { gpr: ctl.gpr, rflags: ctl.rflags };
            if ctl.vector == NO_FAULT {
                Outcome::Completed { state, retired: None }
            } else {
                let rip_offset = ctl.fault_rip.wrapping_sub(CODE_ADDR);
                Outcome::Fault { vector: ctl.vector as u8, rip_offset, state }
            }
        }
    }
}

impl Executor for NativeExecutor {
    fn name(&self) -> &str {
        "native"
    }

    fn run(
        &mut self,
        code: &[u8],
        code_addr: u64,
        init: &MachineState,
        window: &mut [u8],
    ) -> Result<Outcome, ExecutorError> {
        if code_addr != CODE_ADDR || code.len() > CODE_MAX || window.len() != WINDOW_SIZE {
            return Err(ExecutorError::Unsupported("code/window outside the fixed layout".into()));
        }
        if self.child.is_none() {
            self.spawn()?;
        }
        self.load(code, init, window);
        let child = self.child.as_ref().expect("spawned");
        // SAFETY: writing one byte from a local to our pipe.
        let sent = unsafe { libc::write(child.cmd_wr, b"G".as_ptr().cast(), 1) };
        let answer = if sent == 1 { self.wait_child() } else { Err(os_err("write to child")) };
        match answer {
            Ok(b'D') => Ok(self.collect(window)),
            Ok(other) => {
                self.kill_child();
                Err(ExecutorError::Os(format!("child said {other:#x}")))
            }
            Err(e) => {
                self.kill_child();
                Err(e)
            }
        }
    }
}

impl Drop for NativeExecutor {
    fn drop(&mut self) {
        self.kill_child();
        // SAFETY: unmapping our own mappings and closing our fds; nothing
        // borrows them past this point.
        unsafe {
            libc::munmap(self.code_rw.cast(), CODE_REGION + STUB_SIZE);
            libc::munmap(self.ctl.cast(), CTL_SIZE);
            libc::munmap(self.window.cast(), WINDOW_SIZE);
            for fd in self.fds {
                libc::close(fd);
            }
        }
    }
}

const GPRS: [AsmRegister64; 16] =
    [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15];
const CALLEE_SAVED: [AsmRegister64; 6] = [rbx, rbp, r12, r13, r14, r15];

/// The three stubs, laid out in one page at STUB_ADDR.
fn assemble_stubs() -> Vec<u8> {
    let mut page = vec![0xccu8; STUB_SIZE];
    for (addr, bytes) in [
        (STUB_ADDR, entry_stub()),
        (EXIT_ADDR, exit_stub()),
        (FAULT_EXIT_ADDR, fault_exit_stub()),
    ] {
        let off = (addr - STUB_ADDR) as usize;
        assert!(bytes.len() <= 0x100, "stub too long");
        page[off..off + bytes.len()].copy_from_slice(&bytes);
    }
    page
}

fn ctl(off: u64) -> AsmMemoryOperand {
    qword_ptr(CTL_ADDR + off)
}

/// Called as `extern "sysv64" fn()`: saves the host's callee-saved registers
/// and stack, loads the guest flags and registers, jumps to the sequence.
fn entry_stub() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("64-bit");
    let r: Result<(), IcedError> = (|| {
        for reg in CALLEE_SAVED {
            a.push(reg)?;
        }
        a.mov(ctl(OFF_HOST_RSP), rsp)?;
        a.push(ctl(OFF_RFLAGS))?;
        a.popfq()?;
        for (i, reg) in GPRS.iter().enumerate() {
            a.mov(*reg, ctl(8 * i as u64))?;
        }
        a.jmp(CODE_ADDR)
    })();
    r.expect("entry stub");
    a.assemble(STUB_ADDR).expect("assemble entry stub")
}

/// Reached by the `jmp` after the sequence: stores the guest registers and
/// flags (`mov` leaves flags alone), then returns to the host caller.
fn exit_stub() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("64-bit");
    let r: Result<(), IcedError> = (|| {
        for (i, reg) in GPRS.iter().enumerate() {
            a.mov(ctl(8 * i as u64), *reg)?;
        }
        a.mov(rsp, ctl(OFF_HOST_RSP))?;
        a.pushfq()?;
        a.pop(ctl(OFF_RFLAGS))?;
        host_return(&mut a)
    })();
    r.expect("exit stub");
    a.assemble(EXIT_ADDR).expect("assemble exit stub")
}

/// The signal handler resumes here after recording the fault.
fn fault_exit_stub() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("64-bit");
    let r: Result<(), IcedError> = (|| {
        a.mov(rsp, ctl(OFF_HOST_RSP))?;
        host_return(&mut a)
    })();
    r.expect("fault exit stub");
    a.assemble(FAULT_EXIT_ADDR).expect("assemble fault exit stub")
}

/// The Rust ABI needs DF clear on return.
fn host_return(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.cld()?;
    for reg in CALLEE_SAVED.iter().rev() {
        a.pop(*reg)?;
    }
    a.ret()
}

/// The child: map the fixed layout, install the fault handler, then serve
/// run requests until the parent closes the pipe.
///
/// # Safety
/// Must be called only in a freshly forked child; never returns.
unsafe fn child_main(cmd_rd: libc::c_int, resp_wr: libc::c_int, fds: [libc::c_int; 3], code_rw: *mut u8) -> ! {
    let fail = |step: u8| -> ! {
        // SAFETY: async-signal-safe write and _exit.
        unsafe {
            libc::write(resp_wr, (&step as *const u8).cast(), 1);
            libc::_exit(1)
        }
    };
    // SAFETY: prctl, mmap, munmap, sigaltstack, sigaction are async-signal-safe
    // syscalls; every fixed mapping uses MAP_FIXED_NOREPLACE so nothing of the
    // child's (inherited) address space is replaced.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::munmap(code_rw.cast(), CODE_REGION + STUB_SIZE);
        let fixed = libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE;
        let rx = libc::PROT_READ | libc::PROT_EXEC;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let maps = [
            (CODE_ADDR, CODE_REGION, rx, fds[0], 0),
            (STUB_ADDR, STUB_SIZE, rx, fds[0], CODE_REGION),
            (CTL_ADDR, CTL_SIZE, rw, fds[1], 0),
            (WINDOW_ADDR, WINDOW_SIZE, rw, fds[2], 0),
        ];
        for (i, (addr, len, prot, fd, off)) in maps.into_iter().enumerate() {
            let p = libc::mmap(addr as *mut c_void, len, prot, fixed, fd, off as libc::off_t);
            if p as u64 != addr {
                fail(b'0' + i as u8);
            }
        }
        let alt = libc::mmap(
            ptr::null_mut(),
            ALT_STACK_SIZE,
            rw,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if alt == libc::MAP_FAILED {
            fail(b'a');
        }
        let alt_stack = libc::stack_t { ss_sp: alt, ss_flags: 0, ss_size: ALT_STACK_SIZE };
        if libc::sigaltstack(&alt_stack, ptr::null_mut()) != 0 {
            fail(b's');
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_fault as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        let mut unblock: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut unblock);
        for sig in FAULT_SIGNALS {
            libc::sigaddset(&mut unblock, sig);
            if libc::sigaction(sig, &sa, ptr::null_mut()) != 0 {
                fail(b'h');
            }
        }
        libc::sigprocmask(libc::SIG_UNBLOCK, &unblock, ptr::null_mut());
        libc::write(resp_wr, b"R".as_ptr().cast(), 1);
        let entry: extern "sysv64" fn() = std::mem::transmute(STUB_ADDR as *const ());
        let ctl = CTL_ADDR as *mut Ctl;
        loop {
            let mut cmd = 0u8;
            if libc::read(cmd_rd, (&mut cmd as *mut u8).cast(), 1) != 1 {
                libc::_exit(0);
            }
            // Serialize: the parent just wrote the code through another mapping.
            core::arch::x86_64::__cpuid(0);
            ptr::write_volatile(&mut (*ctl).running, 1);
            entry();
            ptr::write_volatile(&mut (*ctl).running, 0);
            libc::write(resp_wr, b"D".as_ptr().cast(), 1);
        }
    }
}

/// Records the fault in `Ctl` and resumes at the fault-exit stub.
extern "C" fn on_fault(_sig: libc::c_int, _info: *mut libc::siginfo_t, uctx: *mut c_void) {
    use libc::*;
    let ctl = CTL_ADDR as *mut Ctl;
    // SAFETY: runs in the child, where CTL_ADDR is mapped; uctx is the
    // ucontext_t the kernel passes to an SA_SIGINFO handler.
    unsafe {
        if ptr::read_volatile(&(*ctl).running) == 0 {
            // A fault in the child's own code: a harness bug. Die; the parent
            // sees EOF and reports it.
            _exit(70);
        }
        let g = &mut (*(uctx as *mut ucontext_t)).uc_mcontext.gregs;
        let order = [
            REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI, REG_R8, REG_R9,
            REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15,
        ];
        for (i, reg) in order.into_iter().enumerate() {
            (*ctl).gpr[i] = g[reg as usize] as u64;
        }
        (*ctl).rflags = g[REG_EFL as usize] as u64;
        (*ctl).vector = g[REG_TRAPNO as usize] as u64;
        (*ctl).fault_rip = g[REG_RIP as usize] as u64;
        g[REG_RIP as usize] = FAULT_EXIT_ADDR as i64;
    }
}
