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
