mod difftest;

use difftest::machine::*;
use difftest::native::NativeExecutor;

#[test]
fn native_add_completes() {
    let mut n = NativeExecutor::new().unwrap();
    let mut a = iced_x86::code_asm::CodeAssembler::new(64).unwrap();
    use iced_x86::code_asm::*;
    a.add(rax, rbx).unwrap();
    a.push(rax).unwrap();
    a.div(rcx).unwrap();
    let code = a.assemble(CODE_ADDR).unwrap();
    let mut init = MachineState { gpr: [0; 16], rflags: 0 };
    init.gpr[0] = 5; init.gpr[3] = 7; init.gpr[RSP] = STACK_TOP;
    let mut w = vec![0u8; WINDOW_SIZE];
    let out = n.run(&code, CODE_ADDR, &init, &mut w).unwrap();
    println!("{out:?}");
    init.gpr[1] = 3;
    let out = n.run(&code, CODE_ADDR, &init, &mut w).unwrap();
    println!("{out:?} {:x?}", &w[0x17f0..0x1800]);
}
