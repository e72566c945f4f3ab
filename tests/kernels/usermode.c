/*
 * usermode / usermode64 - entering and leaving ring 3.
 * 32-bit: IRET to ring 3 and INT 0x80 back; SYSENTER/SYSEXIT.
 * 64-bit: IRETQ and SYSRETQ into ring 3; SYSCALL back (and a
 * SYSCALL/SYSRETQ round trip).
 * Both: CPL is 3 in user code (CS and SS RPL), privileged instructions and
 * port I/O with IOPL=0 raise #GP, IOPL=3 allows port I/O.
 */
#include "kernel.h"

static void user_cpl(ureg arg) {
    uint16_t cs, ss;
    asm volatile("mov %%cs, %0; mov %%ss, %1" : "=r"(cs), "=r"(ss));
    user_exit(((ureg)cs << 16) | ss);
}
static void user_cli(ureg arg) { asm volatile("cli"); user_exit(0); }
static void user_hlt(ureg arg) { asm volatile("hlt"); user_exit(0); }
static void user_read_cr0(ureg arg) { user_exit(read_cr0()); }
static void user_wrmsr(ureg arg) { wrmsr(0x175, 0); user_exit(0); }
static void user_lgdt(ureg arg) { asm volatile("lgdt (%0)" :: "r"(arg)); user_exit(0); }
static void user_inb(ureg arg) { user_exit(inb(0x3ff)); }
static void user_outb(ureg arg) { outb(0x3ff, (uint8_t)arg); user_exit(inb(0x3ff)); }

static ureg code_ip(void (*fn)(ureg)) { return (ureg)(uintptr_t)fn; }

static void expect_user_gp(const char *what, void (*fn)(ureg)) {
    trap_reset();
    ureg r = user_call(fn, 0, USER_STACK_TOP);
    int ok = r == USER_FAULTED && last_trap.vec == GP && last_trap.err == 0 &&
             (last_trap.cs & 3) == 3 && last_trap.ip >= code_ip(fn) && last_trap.ip < code_ip(fn) + 64;
    printf("%s: ring-3 %s: vec=%u err=%lx%s\n", kernel_name, what,
           r == USER_FAULTED ? (uint32_t)last_trap.vec : 0, last_trap.err, ok ? "" : " FAILED");
    if (!ok) failures++;
    trap_reset();
}

static void test_common(void) {
    ureg r = user_call(user_cpl, 0, USER_STACK_TOP);
    printf("%s: user cs=%lx ss=%lx\n", kernel_name, r >> 16, r & 0xffff);
    check((r >> 16) == (BITS == 64 ? SEL_UCODE64 : SEL_UCODE32) && (r & 0xffff) == SEL_UDATA,
          "iret to ring 3, int 0x80 back");
    expect_user_gp("cli, iopl=0", user_cli);
    expect_user_gp("hlt", user_hlt);
    expect_user_gp("mov from cr0", user_read_cr0);
    expect_user_gp("wrmsr", user_wrmsr);
    expect_user_gp("lgdt", user_lgdt);
    expect_user_gp("inb, iopl=0", user_inb);
    asm volatile("pushf; or" " $0x3000, (%%" SP "); popf" ::: "memory", "cc");
    trap_reset();
    r = user_call(user_outb, 0x5c, USER_STACK_TOP);
    check(r == 0x5c, "ring-3 outb/inb with iopl=3");
    asm volatile("pushf; and" " $~0x3000, (%%" SP "); popf" ::: "memory", "cc");
}

#ifdef __x86_64__
static volatile uint16_t syscall_cs, syscall_ss;
extern char syscall_echo[], syscall_return[];
/* LSTAR entry for the round trip: no stack use, records CS/SS, RAX+1, SYSRETQ. */
asm(".text\n"
    "syscall_echo:\n\t"
    "movw %cs, syscall_cs(%rip)\n\t"
    "movw %ss, syscall_ss(%rip)\n\t"
    "addq $1, %rax\n\t"
    "sysretq\n"
    "syscall_return:\n\t"
    "movw %cs, syscall_cs(%rip)\n\t"
    "movq %rax, %rdi\n\t"
    "jmp user_return\n");

static void user_syscall_twice(ureg arg) {
    uint16_t cs;
    ureg r = arg;
    asm volatile("syscall" : "+a"(r) :: "rcx", "r11", "memory");
    asm volatile("mov %%cs, %0" : "=r"(cs));
    wrmsr(0, 0); /* not reached if SYSRET left CPL 0 */
    user_exit(r + cs);
}

static void user_syscall_exit(ureg arg) {
    uint16_t cs;
    asm volatile("mov %%cs, %0" : "=r"(cs));
    asm volatile("syscall" :: "a"(arg + cs) : "rcx", "r11", "memory");
    __builtin_unreachable();
}

static void test_syscall(void) {
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
    wrmsr(0xc0000081, ((uint64_t)0x18 << 48) | ((uint64_t)SEL_KCODE << 32));
    wrmsr(0xc0000084, FLAGS_IF | FLAGS_TF); /* SFMASK */
    wrmsr(0xc0000082, (uintptr_t)syscall_echo);
    trap_reset();
    /* The round trip: user -> syscall_echo -> sysretq -> user, then #GP on wrmsr. */
    ureg r = user_call(user_syscall_twice, 0x100, USER_STACK_TOP);
    check(r == USER_FAULTED && last_trap.vec == GP, "syscall/sysretq round trip back in ring 3");
    check(syscall_cs == SEL_KCODE && syscall_ss == SEL_KDATA, "syscall entry cs=0x08 ss=0x10");
    trap_reset();
    wrmsr(0xc0000082, (uintptr_t)syscall_return);
    syscall_cs = 0;
    r = user_call_sysret(user_syscall_exit, 0x1000, USER_STACK_TOP);
    printf("%s: sysretq entry, syscall exit: %lx\n", kernel_name, r);
    check(r == 0x1000 + SEL_UCODE64 && syscall_cs == SEL_KCODE, "sysretq into ring 3, syscall back");
}
#else
static volatile uint16_t sysenter_cs;
extern char sysenter_entry[];
asm(".text\n"
    "sysenter_entry:\n\t"
    "movw %cs, sysenter_cs\n\t"
    "addl $1, %eax\n\t"
    "sysexit\n");

static void user_sysenter(ureg arg) {
    ureg r = arg;
    uint16_t cs;
    asm volatile("movl %%esp, %%ecx\n\t"
                 "movl $1f, %%edx\n\t"
                 "sysenter\n"
                 "1:" : "+a"(r) :: "ecx", "edx", "memory");
    asm volatile("mov %%cs, %0" : "=r"(cs));
    user_exit(r + cs);
}

static uint8_t sysenter_stack[1024] __attribute__((aligned(16)));

static void test_sysenter(void) {
    wrmsr(0x174, SEL_KCODE);
    wrmsr(0x175, (uintptr_t)(sysenter_stack + sizeof(sysenter_stack)));
    wrmsr(0x176, (uintptr_t)sysenter_entry);
    trap_reset();
    ureg r = user_call(user_sysenter, 0x100, USER_STACK_TOP);
    printf("%s: sysenter/sysexit: %lx\n", kernel_name, r);
    check(r == 0x101 + SEL_UCODE32 && sysenter_cs == SEL_KCODE, "sysenter to cs=0x08, sysexit to cs=0x1b");
}
#endif

void kmain(void) {
    boot_map_user();
    test_common();
#ifdef __x86_64__
    test_syscall();
#else
    test_sysenter();
#endif
}
