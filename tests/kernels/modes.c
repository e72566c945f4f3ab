/*
 * modes - protected mode to long mode. boot64.S prints from 32-bit protected
 * mode (modes_pm32_hook), then enables PAE, EFER.LME, CR0.PG and far-jumps to
 * a 64-bit code segment. Here, in 64-bit code, we check the state that switch
 * must leave behind and call into a 32-bit code segment (compatibility mode).
 */
#include "kernel.h"

extern uint32_t pm32_cr0;
extern char compat_entry[];

void kmain(void) {
    check((pm32_cr0 & (CR0_PE | CR0_PG)) == CR0_PE, "pm32 cr0.pe=1 pg=0");
    uint64_t efer = rdmsr(MSR_EFER);
    check((efer & (EFER_LME | EFER_LMA)) == (EFER_LME | EFER_LMA), "efer lme+lma");
    check((read_cr0() & (CR0_PG | CR0_PE)) == (CR0_PG | CR0_PE), "cr0 pg+pe");
    check((read_cr4() & CR4_PAE) != 0, "cr4 pae");

    uint16_t cs;
    asm volatile("mov %%cs, %0" : "=r"(cs));
    check(cs == SEL_KCODE, "cs=0x08");

    /* 64-bit operand size: a push moves RSP by 8 and a 64-bit constant survives. */
    uint64_t pushed;
    asm volatile("mov %%rsp, %0; pushq $0; sub %%rsp, %0; popq %%rax" : "=r"(pushed) :: "rax");
    check(pushed == 8, "64-bit push size");
    volatile uint64_t big = 0x123456789abcdef0ull;
    big += 0x1111111111111111ull;
    check(big == 0x23456789abcdf001ull, "64-bit arithmetic");
    printf("modes: hello from 64-bit code, rip=%lx\n", (ureg)(uintptr_t)kmain);

    /* Far call through a memory operand: m16:32 with a 32-bit code segment. */
    struct { uint32_t off; uint16_t sel; } __attribute__((packed)) target = {
        (uint32_t)(uintptr_t)compat_entry, SEL_KCODE32 };
    uint32_t r;
    asm volatile("lcall *%1" : "=a"(r) : "m"(target) : "rcx", "memory");
    printf("modes: compat call returned %x\n", r);
    check(r == 0x432, "compatibility-mode far call");
    asm volatile("mov %%cs, %0" : "=r"(cs));
    check(cs == SEL_KCODE, "back in 64-bit cs");
}
