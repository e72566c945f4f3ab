//! Quick interpreter throughput check on a synthetic loop (not a benchmark of record).
use std::sync::Arc;
use btvmm_runtime::{EventSignal, GuestMemory, NullPlatform, Vcpu};
use iced_x86::code_asm::*;

fn main() {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut top = a.create_label();
    let mut inner = a.create_label();
    a.mov(esi, 0x10000).unwrap();
    a.mov(edx, 2000).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(ecx, 1000).unwrap();
    a.set_label(&mut inner).unwrap();
    a.mov(eax, dword_ptr(esi + ecx * 4)).unwrap();
    a.add(eax, ecx).unwrap();
    a.xor(eax, 0x5555).unwrap();
    a.mov(dword_ptr(esi + ecx * 4), eax).unwrap();
    a.shl(eax, 3).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(inner).unwrap();
    a.dec(edx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x1000).unwrap();
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    mem.write(0x1000, &code);
    let mut v = Vcpu::new(mem, Box::new(NullPlatform));
    v.cpu.set_flat_protected32(0x1000);
    let t = std::time::Instant::now();
    let exit = v.run(&EventSignal::new(), None);
    let dt = t.elapsed().as_secs_f64();
    println!("{exit:?}: {} instructions in {dt:.3} s = {:.1} M/s", v.stats.instructions, v.stats.instructions as f64 / dt / 1e6);
}
