use std::sync::Arc;

use iced_x86::code_asm::*;

use super::*;
use crate::platform::NullPlatform;

fn vcpu_with(code: &[u8], at: u64) -> Vcpu {
    let mem = Arc::new(GuestMemory::new(4 << 20).unwrap());
    mem.write(at, code);
    let mut v = Vcpu::new(mem, Box::new(NullPlatform));
    v.cpu.set_flat_protected32(at as u32);
    v.cpu.regs.gpr[4] = 0x8000;
    v
}

fn assemble32(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>, at: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    f(&mut a).unwrap();
    a.assemble(at).unwrap()
}

fn run(v: &mut Vcpu) -> VmExit {
    v.run(&EventSignal::new(), Some(10_000_000))
}

#[test]
fn interp_loop_sums_to_expected_value() {
    let code = assemble32(|a| {
        let mut top = a.create_label();
        a.xor(eax, eax)?;
        a.mov(ecx, 100)?;
        a.set_label(&mut top)?;
        a.add(eax, ecx)?;
        a.loop_(top)?;
        a.hlt()
    }, 0x1000);
    let mut v = vcpu_with(&code, 0x1000);
    assert_eq!(run(&mut v), VmExit::HaltedForever);
    assert_eq!(v.cpu.regs.gpr[0], 5050);
    assert_eq!(v.stats.instructions, 2 + 200 + 1);
}

#[test]
fn interp_divide_by_zero_without_idt_triple_faults() {
    let code = assemble32(|a| {
        a.xor(ecx, ecx)?;
        a.div(ecx)?;
        a.hlt()
    }, 0x1000);
    let mut v = vcpu_with(&code, 0x1000);
    v.cpu.idtr.limit = 0;
    assert_eq!(run(&mut v), VmExit::TripleFault);
    assert_eq!(v.cpu.regs.rip, 0x1002, "RIP stays on the faulting div");
}

#[test]
fn interp_divide_by_zero_goes_through_idt_gate() {
    // GDT: null, code 0x08, data 0x10. IDT entry 0 -> handler at 0x2000.
    let mem_code = assemble32(|a| {
        a.xor(ecx, ecx)?;
        a.div(ecx)?;
        a.hlt()
    }, 0x1000);
    let handler = assemble32(|a| {
        a.mov(ebx, dword_ptr(esp))?; // faulting EIP
        a.hlt()
    }, 0x2000);
    let mut v = vcpu_with(&mem_code, 0x1000);
    v.mem.write(0x2000, &handler);
    v.mem.write_u64(0x3000, 0);
    v.mem.write_u64(0x3008, 0x00cf_9a00_0000_ffff);
    v.mem.write_u64(0x3010, 0x00cf_9200_0000_ffff);
    v.cpu.gdtr = crate::cpu::DescriptorTable { base: 0x3000, limit: 0x17 };
    v.mem.write_u64(0x4000, 0x0000_8e00_0008_2000);
    v.cpu.idtr = crate::cpu::DescriptorTable { base: 0x4000, limit: 0x7ff };
    assert_eq!(run(&mut v), VmExit::HaltedForever);
    assert_eq!(v.cpu.regs.gpr[3], 0x1002);
    assert_eq!(v.stats.exceptions.get(&0), Some(&1));
}

#[test]
fn interp_self_modifying_store_invalidates_decoded_block() {
    // Overwrite the immediate of a later `mov eax, imm` and run it twice.
    let code = assemble32(|a| {
        let mut target = a.create_label();
        a.mov(ecx, 2)?;
        a.set_label(&mut target)?;
        a.mov(eax, 1)?;
        a.mov(dword_ptr(0x1006), 7)?; // patch the immediate above
        a.dec(ecx)?;
        a.jnz(target)?;
        a.hlt()
    }, 0x1000);
    let mut v = vcpu_with(&code, 0x1000);
    assert_eq!(run(&mut v), VmExit::HaltedForever);
    assert_eq!(v.cpu.regs.gpr[0], 7);
}

#[test]
fn interp_rep_movsb_copies_and_updates_registers() {
    let code = assemble32(|a| {
        a.mov(esi, 0x5000)?;
        a.mov(edi, 0x6000)?;
        a.mov(ecx, 0x1800)?;
        a.cld()?;
        a.rep().movsb()?;
        a.hlt()
    }, 0x1000);
    let mut v = vcpu_with(&code, 0x1000);
    let data: Vec<u8> = (0..0x1800u32).map(|x| (x * 7) as u8).collect();
    v.mem.write(0x5000, &data);
    assert_eq!(run(&mut v), VmExit::HaltedForever);
    let mut out = vec![0u8; 0x1800];
    v.mem.read(0x6000, &mut out);
    assert_eq!(out, data);
    assert_eq!(v.cpu.regs.gpr[1], 0);
    assert_eq!(v.cpu.regs.gpr[6], 0x6800);
    assert_eq!(v.cpu.regs.gpr[7], 0x7800);
}

/// GDT at 0x3000 matching `set_flat_protected32`: code 0x08, data 0x10, 64-bit code 0x20.
fn install_gdt(v: &mut Vcpu) {
    v.mem.write_u64(0x3000, 0);
    v.mem.write_u64(0x3008, 0x00cf_9a00_0000_ffff);
    v.mem.write_u64(0x3010, 0x00cf_9200_0000_ffff);
    v.mem.write_u64(0x3020, 0x00af_9a00_0000_ffff);
    v.cpu.gdtr = crate::cpu::DescriptorTable { base: 0x3000, limit: 0x27 };
}

#[test]
fn interp_switches_to_long_mode_and_takes_interrupt_through_64bit_gate() {
    // Identity map the first 2 MiB with one 2M page: PML4 0x10000, PDPT 0x11000, PD 0x12000.
    let setup = assemble32(|a| {
        a.mov(eax, 0x10000)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr4)?;
        a.or(eax, 1 << 5)?;
        a.mov(cr4, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 1 << 8)?;
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0001u32)?;
        a.mov(cr0, eax)?;
        a.db(&[0xea, 0x00, 0x20, 0x00, 0x00, 0x20, 0x00]) // jmp far 0x20:0x2000
    }, 0x1000);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, 0x1234_5678_9abc_def0u64).unwrap();
    a.mov(rsp, 0x9000u64).unwrap();
    a.int(0x80).unwrap();
    a.hlt().unwrap();
    let long = a.assemble(0x2000).unwrap();
    let mut b = CodeAssembler::new(64).unwrap();
    b.mov(rbx, qword_ptr(rsp)).unwrap(); // return RIP
    b.mov(rdx, qword_ptr(rsp + 8)).unwrap(); // CS
    b.iretq().unwrap();
    let handler = b.assemble(0x2800).unwrap();

    let mut v = vcpu_with(&setup, 0x1000);
    v.mem.write(0x2000, &long);
    v.mem.write(0x2800, &handler);
    install_gdt(&mut v);
    v.mem.write_u64(0x10000, 0x11000 | 3);
    v.mem.write_u64(0x11000, 0x12000 | 3);
    v.mem.write_u64(0x12000, 0x83);
    // IDT gate 0x80: 64-bit interrupt gate, DPL 0, target 0x20:0x2800.
    v.mem.write_u64(0x5000 + 0x80 * 16, 0x0000_8e00_0020_2800);
    v.mem.write_u64(0x5000 + 0x80 * 16 + 8, 0);
    v.cpu.idtr = crate::cpu::DescriptorTable { base: 0x5000, limit: 0xfff };

    let exit = run(&mut v);
    assert_eq!(exit, VmExit::HaltedForever, "{}\n{:?}", v.cpu.dump(), v.stats.exceptions);
    assert_eq!(v.cpu.mode, crate::cpu::CpuMode::Long);
    assert_eq!(v.cpu.regs.gpr[0], 0x1234_5678_9abc_def0);
    assert_eq!(v.cpu.regs.gpr[3], long.len() as u64 + 0x2000 - 1, "pushed RIP follows int 0x80");
    assert_eq!(v.cpu.regs.gpr[2], 0x20);
    assert_eq!(v.cpu.regs.gpr[4], 0x9000, "iretq restores RSP");
    // The walk set the accessed bits.
    assert_ne!(v.mem.read_u64(0x12000) & 0x20, 0);
}

#[test]
fn interp_user_mode_round_trip_via_iret_and_int() {
    // Ring 3 code at 0x2000 runs `int 0x30`; the kernel's handler halts.
    let kernel = assemble32(|a| {
        a.push(0x23)?; // user SS
        a.push(0x7000)?; // user ESP
        a.push(0x202)?; // EFLAGS with IF
        a.push(0x1b)?; // user CS
        a.push(0x2000)?;
        a.iretd()
    }, 0x1000);
    let user = assemble32(|a| {
        a.mov(eax, 42)?;
        a.int(0x30)?;
        a.jmp(0x2000)
    }, 0x2000);
    let handler = assemble32(|a| {
        a.mov(ebx, dword_ptr(esp + 4))?; // CS pushed by the gate
        a.mov(ecx, esp)?;
        a.cli()?;
        a.hlt()
    }, 0x2800);
    let mut v = vcpu_with(&kernel, 0x1000);
    v.mem.write(0x2000, &user);
    v.mem.write(0x2800, &handler);
    // GDT: null, kcode 0x08, kdata 0x10, ucode 0x18, udata 0x20, TSS 0x28.
    v.mem.write_u64(0x3000, 0);
    v.mem.write_u64(0x3008, 0x00cf_9a00_0000_ffff);
    v.mem.write_u64(0x3010, 0x00cf_9200_0000_ffff);
    v.mem.write_u64(0x3018, 0x00cf_fa00_0000_ffff);
    v.mem.write_u64(0x3020, 0x00cf_f200_0000_ffff);
    v.mem.write_u64(0x3028, 0x0000_8900_6000_0067); // 32-bit TSS at 0x6000
    v.cpu.gdtr = crate::cpu::DescriptorTable { base: 0x3000, limit: 0x2f };
    v.mem.write_u32(0x6004, 0x9000); // esp0
    v.mem.write_u32(0x6008, 0x10); // ss0
    v.cpu.tr = crate::cpu::Segment { base: 0x6000, limit: 0x67, selector: 0x28, attr: 0x8b };
    // IDT gate 0x30: 32-bit interrupt gate, DPL 3.
    v.mem.write_u64(0x5000 + 0x30 * 8, 0x0000_ee00_0008_2800);
    v.cpu.idtr = crate::cpu::DescriptorTable { base: 0x5000, limit: 0x7ff };

    assert_eq!(run(&mut v), VmExit::HaltedForever);
    assert_eq!(v.cpu.regs.gpr[0], 42);
    assert_eq!(v.cpu.regs.gpr[3], 0x1b);
    assert_eq!(v.cpu.regs.gpr[1], 0x9000 - 20, "five dwords on the TSS stack");
    assert_eq!(v.cpu.cpl, 0);
}

#[test]
fn interp_rep_movsd_across_page_boundary_completes() {
    // Source 3 bytes past the destination, both crossing 4 KiB pages at odd
    // offsets: the bulk path must hand the straddling element to the generic loop.
    let code = assemble32(|a| {
        a.mov(edi, 0x5ffe)?;
        a.mov(esi, 0x6001)?;
        a.mov(ecx, 0x800)?;
        a.cld()?;
        a.rep().movsd()?;
        a.hlt()
    }, 0x1000);
    let mut v = vcpu_with(&code, 0x1000);
    let data: Vec<u8> = (0..0x2010u32).map(|x| (x * 13 + 1) as u8).collect();
    v.mem.write(0x5ffe, &data);
    let mut want = data.clone();
    for k in 0..0x800usize {
        let (d, s) = (4 * k, 3 + 4 * k);
        let e: [u8; 4] = want[s..s + 4].try_into().unwrap();
        want[d..d + 4].copy_from_slice(&e);
    }
    assert_eq!(run(&mut v), VmExit::HaltedForever);
    assert_eq!(v.cpu.regs.gpr[1], 0, "ecx counted down to zero");
    let mut out = vec![0u8; data.len()];
    v.mem.read(0x5ffe, &mut out);
    assert_eq!(out, want);
}

#[test]
fn interp_rep_stos_fills_across_pages_in_every_size() {
    // Odd starts, so elements straddle page boundaries; uniform and mixed
    // patterns (the bulk path fills each differently); both directions.
    let cases = [(1u32, 0x5au64, false), (2, 0xbeef, false), (4, 0, false), (4, 0x1122_3344, false), (8, 0x0102_0304_0506_0708, false), (4, 0x1122_3344, true)];
    for (size, pattern, std) in cases {
        let count = 0x2345 / size as u64;
        let first = 0x5ffd;
        let start = if std { first + (count - 1) * size as u64 } else { first };
        let bits = if size == 8 { 64 } else { 32 };
        let mut a = CodeAssembler::new(bits).unwrap();
        if bits == 64 {
            a.mov(rdi, start).unwrap();
            a.mov(rcx, count).unwrap();
            a.mov(rax, pattern).unwrap();
        } else {
            a.mov(edi, start as u32).unwrap();
            a.mov(ecx, count as u32).unwrap();
            a.mov(eax, pattern as u32).unwrap();
        }
        if std { a.std().unwrap() } else { a.cld().unwrap() }
        match size {
            1 => a.rep().stosb().unwrap(),
            2 => a.rep().stosw().unwrap(),
            4 => a.rep().stosd().unwrap(),
            _ => a.rep().stosq().unwrap(),
        }
        a.hlt().unwrap();
        let code = a.assemble(0x1000).unwrap();
        let mut v = if bits == 64 { vcpu64_with(&code, 0x1000) } else { vcpu_with(&code, 0x1000) };
        v.mem.write(0x5000, &[0xee; 0x4000]);
        assert_eq!(run(&mut v), VmExit::HaltedForever);
        let mut want = vec![0xeeu8; 0x4000];
        for k in 0..(count * size as u64) as usize {
            want[(first - 0x5000) as usize + k] = pattern.to_le_bytes()[k % size as usize];
        }
        let mut out = vec![0u8; 0x4000];
        v.mem.read(0x5000, &mut out);
        assert!(out == want, "rep stos of {size}-byte elements (std {std})");
        assert_eq!(v.cpu.regs.gpr[1], 0, "rcx counted down");
        let end = if std { first - size as u64 } else { first + count * size as u64 };
        assert_eq!(v.cpu.regs.gpr[7], end, "rdi past the last element");
    }
}

#[test]
fn interp_bound_raises_br_only_out_of_range() {
    let code = assemble32(|a| {
        a.mov(eax, 5)?;
        a.bound(eax, qword_ptr(0x5000))?; // [0, 5]: in range
        a.mov(ebx, 1)?;
        a.mov(eax, 6)?;
        a.bound(eax, qword_ptr(0x5000))?; // out of range: #BR
        a.mov(ebx, 2)?;
        a.hlt()
    }, 0x1000);
    let mut v = vcpu_with(&code, 0x1000);
    v.trap_exceptions = true;
    v.mem.write_u32(0x5000, 0);
    v.mem.write_u32(0x5004, 5);
    let exit = run(&mut v);
    assert_eq!(exit, VmExit::Exception(Exception::new(5)));
    assert_eq!(v.cpu.regs.gpr[3], 1);
}

#[test]
fn interp_arpl_and_salc_behave_as_hardware() {
    let code = assemble32(|a| {
        a.mov(eax, 0x10)?;
        a.mov(ecx, 3)?;
        a.arpl(ax, cx)?; // RPL 0 -> 3, ZF=1
        a.setz(dl)?;
        a.stc()?;
        a.db(&[0xd6])?; // salc
        a.mov(ebx, eax)?;
        a.hlt()
    }, 0x1000);
    let mut v = vcpu_with(&code, 0x1000);
    assert_eq!(run(&mut v), VmExit::HaltedForever);
    assert_eq!(v.cpu.regs.gpr[2] & 0xff, 1);
    assert_eq!(v.cpu.regs.gpr[3], 0xff, "salc with CF=1 sets AL=0xff over AX=0x13's low byte");
}

#[test]
fn interp_alignment_check_raises_ac_in_ring3_only_when_enabled() {
    // mov eax, [0x5001]; hlt (a #GP at CPL 3 that ends the run).
    let code = [0x8b, 0x05, 0x01, 0x50, 0x00, 0x00, 0xf4];
    let ring3 = |ac: bool| {
        let mut v = vcpu_with(&code, 0x1000);
        v.trap_exceptions = true;
        for s in v.cpu.seg.iter_mut() {
            s.attr |= 3 << 5;
            s.selector |= 3;
        }
        v.cpu.cpl = 3;
        v.cpu.cr0 |= crate::cpu::cr0::AM;
        if ac {
            v.cpu.regs.rflags |= crate::cpu::rflags::AC;
        }
        let exit = run(&mut v);
        (exit, v.cpu.regs.rip)
    };
    assert_eq!(ring3(true), (VmExit::Exception(Exception::with_code(17, 0)), 0x1000));
    assert_eq!(ring3(false), (VmExit::Exception(Exception::gp0()), 0x1006));
}

/// Long mode with paging (2 MiB identity map), for tests of 64-bit code.
fn vcpu64_with(code: &[u8], at: u64) -> Vcpu {
    let mut v = vcpu_with(code, at);
    v.mem.write_u64(0x10000, 0x11000 | 7);
    v.mem.write_u64(0x11000, 0x12000 | 7);
    v.mem.write_u64(0x12000, 0x87);
    v.cpu.set_flat_long64(at, 0x10000, 0x08, 0x10);
    v.cpu.cr4 |= crate::cpu::cr4::OSFXSR;
    v
}

#[test]
fn interp_sse_scalar_load_and_store_through_stack() {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rsp, 0x9000u64).unwrap();
    a.mov(rax, 0x4045_0000_0000_0000u64).unwrap(); // 42.0
    a.mov(qword_ptr(rsp + 8), rax).unwrap();
    a.movsd_2(xmm0, qword_ptr(rsp + 8)).unwrap();
    a.addsd(xmm0, xmm0).unwrap();
    a.movsd_2(qword_ptr(rsp + 16), xmm0).unwrap();
    a.mov(rbx, qword_ptr(rsp + 16)).unwrap();
    a.cvttsd2si(rcx, xmm0).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x1000).unwrap();
    let mut v = vcpu64_with(&code, 0x1000);
    let exit = run(&mut v);
    assert_eq!(exit, VmExit::HaltedForever, "{}\n{:?}", v.cpu.dump(), v.stats.exceptions);
    assert_eq!(v.cpu.regs.gpr[3], 0x4055_0000_0000_0000, "84.0 stored");
    assert_eq!(v.cpu.regs.gpr[1], 84);
    assert_eq!(v.stats.simd_native, 4);
}

/// Asks for one pause, as the console's Ctrl-A s does.
struct PauseOnce(bool);

impl Platform for PauseOnce {
    fn io_in(&mut self, _port: u16, _size: u8) -> u32 {
        u32::MAX
    }
    fn io_out(&mut self, _port: u16, _size: u8, _value: u32) {}
    fn intr_pending(&mut self) -> bool {
        false
    }
    fn intr_ack(&mut self) -> Option<u8> {
        None
    }
    fn service(&mut self) {}
    fn stop_requested(&self) -> bool {
        false
    }
    fn pause_requested(&mut self) -> bool {
        std::mem::take(&mut self.0)
    }
}

#[test]
fn interp_pause_request_returns_paused_then_run_resumes() {
    let code = assemble32(|a| {
        a.mov(eax, 7)?;
        a.hlt()
    }, 0x1000);
    let mut v = vcpu_with(&code, 0x1000);
    v.platform = Box::new(PauseOnce(true));
    let events = EventSignal::new();
    events.raise();

    let first = v.run(&events, Some(1000));
    let second = v.run(&events, Some(1000));

    assert_eq!(first, VmExit::Paused);
    assert_eq!(v.stats.instructions, 2);
    assert_eq!(second, VmExit::HaltedForever);
    assert_eq!(v.cpu.regs.gpr[0], 7);
}
