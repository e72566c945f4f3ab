/*
 * hostile - a ring-0 kernel that misbehaves on purpose, with a handler for
 * every exception that records what happened and resumes at a recovery
 * point (the library's recover_ip, or the sandbox's sb_recover).
 *
 *  1. Paging off: #DE (div, idiv overflow, aam 0), #UD (ud2, lea with a
 *     register source, lock add to a register), #BP, #OF, #BR, #GP
 *     (selector beyond the GDT, far jump beyond a code segment's limit),
 *     #NP, #SS, #DF (#GP through a not-present gate); loads and stores
 *     beyond the end of RAM (no fault, nothing stored, RAM not aliased); a
 *     call into a page of 0xff bytes (what a PC executes from unassigned
 *     addresses: #UD); code overwritten after it ran (ud2, a new mov, int3)
 *     and code that writes ud2 over its own next instruction.
 *  2. Paging on: #PF on loads, stores and fetches at unmapped addresses
 *     (error code, CR2, saved EIP), the EFLAGS a #PF saves (those from
 *     before the faulting instruction, also where they are overwritten
 *     right after it), stores and lock xadd through a read-only mapping
 *     with CR0.WP, an instruction that straddles into an unmapped page, a
 *     run of instructions that falls into one (registers at the fault), #DF
 *     from a #PF through a not-present gate.
 *  3. The sandbox: 3000 blocks of pseudo-random instructions (a 64-bit LCG
 *     picks from a whitelist of ALU, mov, test, xchg, lea, setcc, cmov,
 *     movzx/movsx, bswap, cmpxchg, xadd, shift/rotate-by-1, flag, string
 *     (rep with a small count) and forward-branch forms, with random
 *     ModRM/SIB/displacements and lock, segment, rep and operand-size
 *     prefixes), each run in ring 0 in an address space of its own at fixed
 *     addresses (see hostile.S): nothing of the kernel is visible, only the
 *     sandbox's code, descriptor tables, stubs, stack and scratch pages, so
 *     no result depends on how the kernel is linked. Generated code never
 *     writes ESP or EBP (the scratch base), jumps backwards, halts, does I/O
 *     or touches system state; wild memory operands fault, and every block
 *     ends in int3 filler, so each run ends in an exception. Each run's
 *     vector, error code, CR2, fault offset, registers and scratch memory
 *     go into a state hash, the EFLAGS of its exception frame (not AF,
 *     undefined after logic operations and shifts) into a frame flags hash;
 *     both are printed every 500 runs, with the vector counts at the end.
 *
 * Command line: seed=N, runs=N; verbose=1 prints every run, verbose=2 also
 * its code and registers, dump=N (with verbose=3) run N's code and the
 * scratch words it changed, first=N skips running the blocks before run N;
 * noframeflags=1 leaves out the EFLAGS saved by exceptions (checks and
 * hash); strict=1 adds the corners below (in the sandbox too: CS overrides,
 * lock anywhere, cmps, setcc/rcl/rcr to memory, fault reports as they are),
 * for comparing btvmm's engines with each other.
 *
 * Left out (without strict=1) because QEMU, the reference, differs from a
 * PC there: the values read from unassigned physical addresses (QEMU: 0, a
 * PC: all-ones), executing them (QEMU runs its zeros and never faults), #AC
 * (QEMU TCG does not check alignment), segment rights on data accesses
 * (QEMU lets a store through CS pass), lock on mov, xchg, xadd, cmpxchg or
 * inc with a register operand (QEMU: no #UD), the W bit of the #PF from a
 * read-modify-write of a not-present page (a PC: a write, QEMU: a read),
 * which operand of cmps faults first (QEMU: ES:EDI), the EFLAGS saved by a
 * #PF from setcc, rcl or rcr with a memory operand (QEMU has half-updated
 * its lazy flags by then) and accesses that wrap past 4 GiB (beyond the
 * segment limit, #GP(0) on a PC; QEMU checks no limits and raises #PF). The
 * sandbox avoids the generated forms and normalizes the two fault reports.
 */
#include "kernel.h"

enum { BR = 5 };
#define POOL 0x800000u        /* page tables: 8 MiB, outside the image */
#define VA_TEST 0x40000000u   /* 4 KiB test mappings */
#define VA_RO 0x80000000u     /* a read-only 4 MiB mapping of physical 0 */

/* The sandbox's fixed pages (see hostile.S). */
#define SB_CODE 0x600000u
#define SB_SYS 0x601000u
#define SB_TEXT 0x602000u
#define SB_STACK 0x603000u   /* two pages */
#define SB_SCRATCH 0x605000u /* two pages */
#define SB_EBP (SB_SCRATCH + 0x800)
#define SB_PRIV 0x607000u
#define SYS(off) ((volatile uint32_t *)(uintptr_t)(SB_SYS + (off)))
#define SYS_GDT ((uint64_t *)(uintptr_t)SB_SYS)
#define SYS_IDT ((uint64_t *)(uintptr_t)(SB_SYS + 0x80))
#define SYS_GDTR 0x180
#define SYS_IDTR 0x188
#define SYS_REGS 0x190
#define SYS_FLAGS 0x1ac
#define SYS_CR3 0x1b0
#define SYS_KERNEL_CR3 0x1b4
#define SYS_CODE 0x1b8
#define PRIV_TRAP ((volatile uint32_t *)(uintptr_t)(SB_PRIV + 0x18))
extern const uint8_t sb_blob[], sb_blob_end[];
extern const uint32_t sb_blob_run, sb_blob_recover, sb_blob_isr[32];
static uint8_t *const sb_code = (uint8_t *)(uintptr_t)SB_CODE;
uint32_t hostile_victim(void), hostile_self_destruct(void);
extern uint8_t hostile_self_destruct_ud[];

static uint32_t *kernel_pd, *test_pt, *sandbox_pd, *sandbox_pt;

/* strict=1: also the corners where QEMU differs from a PC (see above), for
 * comparing btvmm's engines with each other. */
static uint32_t strict;
/* noframeflags=1: EFLAGS saved in exception frames are neither checked nor
 * printed (everything else is). */
static uint32_t noframeflags;

/* The registers of the last recovered fault. */
static struct frame last_frame;

/* The sandbox's last run. */
static volatile int sb_active;
static struct {
    uint32_t vec, err, cr2, at, regs[8], flags, cs;
} sb_result;

/* Called by the sandbox's exception stubs (hostile.S), back in the kernel's
 * address space, on the sandbox's stack. */
void sb_trap(struct frame *f) {
    if (!sb_active) {
        printf("%s: sandbox trap while not running the sandbox: vec=%u ip=%x\n", kernel_name, f->vec, f->ip);
        exit_code(EXIT_FAIL);
    }
    sb_active = 0;
    sb_result.vec = f->vec;
    sb_result.err = f->err;
    sb_result.cr2 = f->vec == PF ? read_cr2() : 0;
    sb_result.at = f->ip - SB_CODE;
    sb_result.regs[0] = f->eax;
    sb_result.regs[1] = f->ecx;
    sb_result.regs[2] = f->edx;
    sb_result.regs[3] = f->ebx;
    sb_result.regs[4] = f->esp_unused + 20; /* ESP before the trap frame */
    sb_result.regs[5] = f->ebp;
    sb_result.regs[6] = f->esi;
    sb_result.regs[7] = f->edi;
    sb_result.flags = f->flags;
    sb_result.cs = f->cs;
    f->flags &= ~FLAGS_TF;
    f->ip = SB_TEXT + sb_blob_recover;
}

static void trap_record(struct frame *f) {
    if ((f->cs & 3) == 3 && user_active) {
        last_trap.vec = f->vec;
        last_trap.err = f->err;
        last_trap.ip = f->ip;
        last_trap.count++;
        user_return(USER_FAULTED);
    }
    if (!recover_ip) {
        printf("%s: unexpected trap vec=%u err=%x ip=%x cr2=%x\n", kernel_name, f->vec, f->err, f->ip, read_cr2());
        exit_code(EXIT_FAIL);
    }
    last_trap.vec = f->vec;
    last_trap.err = f->err;
    last_trap.ip = f->ip;
    last_trap.cs = f->cs;
    last_trap.cr2 = read_cr2();
    last_trap.count++;
    last_frame = *f;
    f->ip = recover_ip;
    recover_ip = 0;
}

/* Calls va with fault recovery; ESP is kept in ESI across a faulting call. */
static void kcall(uint32_t va, uint32_t eax) {
    asm volatile(RECOVER_PROLOGUE "mov %%esp, %%esi\n2: call *%0\n1: mov %%esi, %%esp"
                 :: "r"(va), "a"(eax) : "esi", "ecx", "edx", RECOVER_CLOBBER);
}

static void checkf(int cond, const char *what, uint32_t got, uint32_t want) {
    if (cond)
        printf("%s: %s ok\n", kernel_name, what);
    else {
        printf("%s: %s FAILED (got %x, want %x)\n", kernel_name, what, got, want);
        failures++;
    }
}

/* Prints a #PF: vector, error code, CR2 and saved EIP against what they should be. */
static void expect_pf(const char *what, uint32_t err, uint32_t cr2, uint32_t ip) {
    int ok = last_trap.count == 1 && last_trap.vec == PF && last_trap.err == err && last_trap.cr2 == cr2 &&
             last_trap.ip == ip;
    printf("%s: %s: vec=%u err=%x cr2 %s eip %s%s\n", kernel_name, what, (uint32_t)last_trap.vec,
           (uint32_t)last_trap.err, last_trap.cr2 == cr2 ? "ok" : "wrong", last_trap.ip == ip ? "ok" : "wrong",
           ok ? "" : " FAILED");
    if (!ok) failures++;
    trap_reset();
}

/* 1. Paging off. */

static void test_exceptions(void) {
    static int32_t bounds[2] = { 10, 20 };
    static uint32_t scratch;
    TRY("divl %%ecx", :: "a"(1), "d"(0), "c"(0) : RECOVER_CLOBBER);
    expect_fault("div by zero", DE);
    TRY("idivl %%ecx", :: "a"(0x80000000), "d"(0xffffffff), "c"(0xffffffff) : RECOVER_CLOBBER);
    expect_fault("idiv INT_MIN / -1", DE);
    TRY(".byte 0xd4, 0x00", ::: "eax", RECOVER_CLOBBER);
    expect_fault("aam 0", DE);
    TRY("ud2", ::: RECOVER_CLOBBER);
    expect_fault("ud2", UD);
    TRY(".byte 0x8d, 0xc0", ::: "eax", RECOVER_CLOBBER);
    expect_fault("lea with a register source", UD);
    if (strict) {
        TRY(".byte 0xf0, 0x89, 0xc8", ::: "eax", RECOVER_CLOBBER);
        expect_fault("strict: lock mov", UD);
    }
    TRY(".byte 0xf0, 0x01, 0xc8", ::: "eax", RECOVER_CLOBBER);
    expect_fault("lock add to a register", UD);
    TRY("int3", ::: RECOVER_CLOBBER);
    expect_fault_at("int3", BP, 1);
    TRY_RAW("movl $0x7fffffff, %%eax\n\taddl $1, %%eax\n2: into", ::: "eax", RECOVER_CLOBBER);
    expect_fault_at("into with OF=1", OF, 1);
    TRY(".byte 0x62, 0x03", :: "a"(25), "b"(bounds) : RECOVER_CLOBBER); /* bound eax, [ebx] */
    expect_fault("bound above the upper limit", BR);
    TRY(".byte 0x62, 0x03", :: "a"(15), "b"(bounds) : RECOVER_CLOBBER);
    expect_no_fault("bound within limits");

    if (strict) {
        TRY("movl %%eax, %%cs:(%0)", :: "r"(&scratch), "a"(1) : RECOVER_CLOBBER);
        expect_fault("strict: store through CS", GP);
    }
    TRY("movw %w0, %%ds", :: "r"(0x1234) : RECOVER_CLOBBER);
    expect_fault("mov ds, selector beyond the GDT", GP);
    gdt_set(GDT_FREE + 2, 0, 0xfffff, 0x9a, 0x4); /* 32-bit code, byte granular: limit 1 MiB - 1 */
    TRY("ljmp %0, $0x200000", :: "i"((GDT_FREE + 2) * 8) : RECOVER_CLOBBER);
    expect_fault("far jump beyond the code segment limit", GP);
    gdt_set(GDT_FREE, 0, 0xfffff, 0x12, 0xc); /* data, not present */
    TRY("movw %w0, %%fs", :: "r"((GDT_FREE) * 8) : RECOVER_CLOBBER);
    expect_fault("mov fs, not-present segment", NP);
    TRY("movw %w0, %%ss", :: "r"((GDT_FREE) * 8) : RECOVER_CLOBBER);
    expect_fault("mov ss, not-present segment", SS);
    asm volatile("movw %w0, %%fs" :: "r"(SEL_KDATA));

    idt_set_present(GP, 0);
    TRY("movw %w0, %%ds", :: "r"(0x1234) : RECOVER_CLOBBER);
    idt_set_present(GP, 1);
    expect_fault_at("#GP with its gate not present (#DF)", DF, -1);
    asm volatile("movw %w0, %%ds" :: "r"(SEL_KDATA));
}

static void ac_user(ureg va) {
    (void)*(volatile uint32_t *)(uintptr_t)va;
    user_exit(0);
}

/* #AC: ring 3, CR0.AM and EFLAGS.AC, a misaligned load (strict only). */
static void test_alignment_check(void) {
    write_cr0(read_cr0() | (1u << 18));
    asm volatile("pushfl; orl $0x40000, (%%esp); popfl" ::: "memory", "cc");
    trap_reset();
    ureg r = user_call(ac_user, (ureg)(uintptr_t)(user_stack + 4097), USER_STACK_TOP);
    asm volatile("pushfl; andl $~0x40000, (%%esp); popfl" ::: "memory", "cc");
    write_cr0(read_cr0() & ~(1u << 18));
    printf("%s: strict: misaligned load in ring 3 with AC: %s vec=%u err=%x\n", kernel_name,
           r == USER_FAULTED ? "fault" : "no fault", (uint32_t)last_trap.vec, (uint32_t)last_trap.err);
    trap_reset();
}

static void test_beyond_ram(void) {
    static const uint32_t addrs[] = { 0x08000000, 0x08001234, 0x10000000, 0x40000000, 0x80000000, 0xc0000000 };
    for (unsigned i = 0; i < sizeof(addrs) / sizeof(addrs[0]); i++) {
        uint32_t a = addrs[i], v = 0, w = 0, pattern = 0x5a3c9600 + i;
        volatile uint32_t *alias = (volatile uint32_t *)(uintptr_t)(a & 0x07fffffc);
        uint32_t before = *alias;
        TRY("movl (%1), %0", : "=r"(v) : "r"(a) : RECOVER_CLOBBER);
        TRY("movl %0, (%1)", :: "r"(pattern), "r"(a) : RECOVER_CLOBBER);
        TRY("movl (%1), %0", : "=r"(w) : "r"(a) : RECOVER_CLOBBER);
        int faults = last_trap.count;
        trap_reset();
        int ok = faults == 0 && w != pattern && *alias == before;
        printf("%s: load/store/load at %x beyond RAM: %s, %s, %s%s\n", kernel_name, a,
               faults ? "faulted" : "no fault", w == pattern ? "stored" : "not stored",
               *alias == before ? "RAM not aliased" : "RAM aliased", ok ? " ok" : " FAILED");
        if (!ok) failures++;
        if (strict)
            printf("%s: strict: read %x, %x after the store\n", kernel_name, v, w);
    }
}

static uint8_t ff_page[4096] __attribute__((aligned(4096)));

static void test_code_overwrite(void) {
    memset(ff_page, 0xff, sizeof(ff_page));
    kcall((uintptr_t)ff_page, 0);
    check(last_trap.count == 1 && last_trap.vec == UD && last_trap.ip == (uintptr_t)ff_page,
          "call into a page of 0xff bytes: #UD at its first byte");
    trap_reset();

    uint8_t *v = (uint8_t *)(uintptr_t)hostile_victim;
    uint32_t r1 = hostile_victim();
    v[0] = 0x0f; /* ud2 over code that already ran */
    v[1] = 0x0b;
    kcall((uintptr_t)v, 0);
    int ud = last_trap.count == 1 && last_trap.vec == UD && last_trap.ip == (uintptr_t)v;
    trap_reset();
    static const uint8_t mov2[] = { 0xb8, 0x02, 0x00, 0x00, 0x00, 0xc3 };
    for (int i = 0; i < 6; i++) v[i] = mov2[i];
    uint32_t r2 = hostile_victim();
    v[0] = 0xcc; /* int3, then the rest of the old mov */
    kcall((uintptr_t)v, 0);
    int bp = last_trap.count == 1 && last_trap.vec == BP && last_trap.ip == (uintptr_t)v + 1;
    trap_reset();
    printf("%s: code overwritten after it ran: %u, ud2 %s, %u, int3 %s\n", kernel_name, r1, ud ? "#UD" : "no #UD",
           r2, bp ? "#BP" : "no #BP");
    check(r1 == 1 && ud && r2 == 2 && bp, "code overwritten after it ran");

    uint8_t saved[2] = { hostile_self_destruct_ud[0], hostile_self_destruct_ud[1] };
    kcall((uintptr_t)hostile_self_destruct, 0);
    check(last_trap.count == 1 && last_trap.vec == UD && last_trap.ip == (uintptr_t)hostile_self_destruct_ud,
          "code writing ud2 over its next instruction: #UD there");
    trap_reset();
    hostile_self_destruct_ud[0] = saved[0];
    hostile_self_destruct_ud[1] = saved[1];
    kcall((uintptr_t)hostile_self_destruct, 0);
    check(last_trap.count == 1 && last_trap.vec == UD && last_trap.ip == (uintptr_t)hostile_self_destruct_ud,
          "restored, runs again and destroys itself again");
    trap_reset();
    hostile_self_destruct_ud[0] = saved[0];
    hostile_self_destruct_ud[1] = saved[1];
}

/* 2. Paging on. */

static uint32_t pool_next = POOL;
static uint32_t *alloc_page(void) {
    uint32_t *p = (uint32_t *)(uintptr_t)pool_next;
    pool_next += 4096;
    memset(p, 0, 4096);
    return p;
}

static uint8_t test_code[4096] __attribute__((aligned(4096)));

static void test_paging(void) {
    kernel_pd = alloc_page();
    test_pt = alloc_page();
    for (uint32_t i = 0; i < 32; i++)
        kernel_pd[i] = (i << 22) | 0x83; /* 4 MiB, writable */
    kernel_pd[VA_TEST >> 22] = (uintptr_t)test_pt | 3;
    kernel_pd[VA_RO >> 22] = 0x81; /* 4 MiB, read-only */
    write_cr3((uintptr_t)kernel_pd);
    write_cr4(read_cr4() | CR4_PSE);
    write_cr0(read_cr0() | CR0_PG | CR0_WP);
    printf("%s: paging on\n", kernel_name);

    uint32_t a = VA_TEST + 0x5123;
    TRY("movl (%0), %%eax", :: "r"(a) : "eax", RECOVER_CLOBBER);
    expect_pf("load from an unmapped page", 0, a, probe_start);
    TRY("movl %%eax, (%0)", :: "r"(a + 4) : RECOVER_CLOBBER);
    expect_pf("store to an unmapped page", 2, a + 4, probe_start);
    if (strict) { /* a read-modify-write is a write (as on a PC); QEMU reports a read */
        TRY("addl %%eax, (%0)", :: "r"(a + 8) : RECOVER_CLOBBER);
        expect_pf("strict: add to an unmapped page", 2, a + 8, probe_start);
    }
    /* The EFLAGS a #PF saves are those from before the faulting
     * instruction, even where they would be overwritten right after it. */
    static const struct { const char *load, *xor; uint32_t flags; } fl[] = {
        { "frame flags at a #PF of a mov load, flags set", "frame flags at a #PF of an xor to memory, flags set", 0x8d7 },
        { "frame flags at a #PF of a mov load, flags clear", "frame flags at a #PF of an xor to memory, flags clear", 0x2 },
    };
    for (int i = 0; i < 2 && !noframeflags; i++) {
        uint32_t want = fl[i].flags & 0xcd5;
        TRY_RAW("pushl %1\n\tpopfl\n2: movl (%0), %%eax\n\txorl %%eax, %%eax", :: "r"(a), "r"(fl[i].flags)
                : "eax", "cc", RECOVER_CLOBBER);
        uint32_t got = last_frame.flags & 0xcd5;
        trap_reset();
        checkf(got == want, fl[i].load, got, want);
        TRY_RAW("pushl %1\n\tpopfl\n2: xorl %%eax, (%0)", :: "r"(a), "r"(fl[i].flags) : "cc", RECOVER_CLOBBER);
        got = last_frame.flags & 0xcd5;
        trap_reset();
        checkf(got == want, fl[i].xor, got, want);
    }
    kcall(VA_TEST + 0x6000, 0);
    expect_pf("call into an unmapped page", 0, VA_TEST + 0x6000, VA_TEST + 0x6000);
    uint32_t ro = VA_RO + (uint32_t)(uintptr_t)&pool_next;
    check(*(volatile uint32_t *)(uintptr_t)ro == pool_next, "load through a read-only mapping");
    TRY("movl %%eax, (%0)", :: "r"(ro) : RECOVER_CLOBBER);
    expect_pf("store through a read-only mapping, CR0.WP=1", 3, ro, probe_start);
    TRY("lock xaddl %%eax, (%0)", :: "r"(ro), "a"(0) : RECOVER_CLOBBER);
    expect_pf("lock xadd through a read-only mapping", 3, ro, probe_start);

    /* Code at the end of a mapped page; the next page is not mapped. */
    test_pt[0] = (uintptr_t)test_code | 3;
    test_pt[1] = 0;
    invlpg((void *)(uintptr_t)VA_TEST);
    invlpg((void *)(uintptr_t)(VA_TEST + 0x1000));
    test_code[0xffd] = 0xb8; /* mov $imm32, %eax: two bytes of it in the unmapped page */
    test_code[0xffe] = 0x11;
    test_code[0xfff] = 0x22;
    kcall(VA_TEST + 0xffd, 0x77);
    int eax_kept = last_frame.eax == 0x77;
    expect_pf("instruction straddling into an unmapped page", 0, VA_TEST + 0x1000, VA_TEST + 0xffd);
    check(eax_kept, "straddling instruction: EAX unchanged");
    memset(test_code + 0xff0, 0x40, 16); /* inc %eax x 16, then the unmapped page */
    kcall(VA_TEST + 0xff0, 100);
    uint32_t eax = last_frame.eax;
    expect_pf("16 instructions, then fetch from an unmapped page", 0, VA_TEST + 0x1000, VA_TEST + 0x1000);
    printf("%s: eax at the fault: %u\n", kernel_name, eax);
    check(eax == 116, "registers at a fetch fault after a run of instructions");
    test_pt[1] = (uintptr_t)test_code | 3; /* the next page mapped (to the same frame): a ret */
    invlpg((void *)(uintptr_t)(VA_TEST + 0x1000));
    test_code[0] = 0xc3;
    kcall(VA_TEST + 0xff0, 100);
    check(last_trap.count == 0, "page mapped: the run continues into it and returns");
    trap_reset();

    idt_set_present(PF, 0);
    TRY("movl (%0), %%eax", :: "r"(a) : "eax", RECOVER_CLOBBER);
    idt_set_present(PF, 1);
    expect_fault_at("#PF with its gate not present (#DF)", DF, -1);
}

/* 3. The sandbox. */

static uint64_t rng;
static uint32_t rnd32(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng >> 32);
}
static uint32_t rnd(uint32_t n) { return rnd32() % n; }

static uint8_t *cp;
static int op16; /* the instruction being emitted has an operand-size prefix */
static int locked; /* ... a lock prefix: its r/m operand is memory */
static void emit8(uint32_t b) { *cp++ = (uint8_t)b; }
static void emit32(uint32_t v) { for (int i = 0; i < 4; i++) emit8(v >> (8 * i)); }
static void emit_immz(void) { /* imm16 or imm32 by operand size */
    uint32_t v = rnd32();
    emit8(v);
    emit8(v >> 8);
    if (!op16) { emit8(v >> 16); emit8(v >> 24); }
}

/* A register that generated code may write: not ESP or EBP. */
static uint32_t dreg(void) {
    static const uint8_t r[6] = { 0, 1, 2, 3, 6, 7 };
    return r[rnd(6)];
}

/* An address for a [disp32] operand. */
static uint32_t wild_addr(void) {
    switch (rnd(6)) {
    case 0: case 1: case 4: return SB_SCRATCH + rnd(8192);
    case 2: return (rnd(2) ? SB_TEXT : SB_SYS) + rnd(4096); /* read-only */
    case 3: return SB_CODE + rnd(4096);                    /* the code, read-only */
    default: return rnd32();                               /* mostly unmapped */
    }
}

/*
 * ModRM (and SIB and displacement) with reg field `reg`. `rm_dest`: the r/m
 * operand is a destination of operand size > 8 bits, so a register there
 * must not be ESP or EBP; `mem`: memory forms only.
 */
static void modrm(uint32_t reg, int rm_dest, int mem) {
    reg <<= 3;
    if (!mem && !locked && rnd(100) < 35) {
        emit8(0xc0 | reg | (rm_dest ? dreg() : rnd(8)));
        return;
    }
    uint32_t r = rnd(100);
    if (r < 55) {                 /* [ebp + disp8]: the scratch area */
        emit8(0x45 | reg);
        emit8(rnd(256));
    } else if (r < 70) {          /* [ebp + disp32] */
        emit8(0x85 | reg);
        emit32(rnd(0x1000) - 0x800);
    } else if (r < 80) {          /* [reg] */
        emit8(reg | dreg());
    } else if (r < 92) {          /* [disp32] */
        emit8(0x05 | reg);
        emit32(wild_addr());
    } else {                      /* SIB */
        uint32_t mod = rnd(3), sib = rnd(256);
        emit8((mod << 6) | reg | 4);
        emit8(sib);
        if (mod == 1) emit8(rnd(256));
        else if (mod == 2 || (mod == 0 && (sib & 7) == 5)) emit32(mod == 2 ? rnd(0x1000) - 0x800 : wild_addr());
    }
}

/* `lock_ok`: the opcode is one that may be locked; a locked one gets a
 * memory operand (QEMU does not raise #UD for lock xchg/xadd/cmpxchg/inc
 * with a register operand). No CS override: QEMU does not check segment
 * rights on data accesses (a store through CS is #GP on a PC). */
static void prefixes(int lock_ok, int op16_ok) {
    static const uint8_t seg[6] = { 0x26, 0x36, 0x3e, 0x64, 0x65, 0x2e };
    locked = lock_ok && rnd(100) < 4;
    if (locked) emit8(0xf0);
    else if (strict && rnd(100) < 2) emit8(0xf0); /* lock anywhere: #UD (strict only) */
    if (rnd(100) < 6) emit8(seg[rnd(strict ? 6 : 5)]);
    if (lock_ok && rnd(100) < 3) emit8(rnd(2) ? 0xf2 : 0xf3); /* ignored (or xacquire/xrelease) */
    op16 = op16_ok && rnd(100) < 10;
    if (op16) emit8(0x66);
}

#define MAX_INSNS 48
static uint8_t *insn_at[MAX_INSNS + 1];
static struct { uint8_t *field; int size; int target; } fixups[MAX_INSNS];

/* Emits one instruction; a forward branch records a fixup. */
static void gen_insn(int i, int n, int *nfix) {
    uint32_t t = rnd(100), op, form;
    locked = 0;
    if (t < 22) {                              /* ALU: r/m,r and r,r/m */
        op = rnd(8);
        form = rnd(4);
        prefixes(form < 2 && op != 7, 1);
        emit8((op << 3) | form);
        switch (form) {
        case 0: modrm(rnd(8), 0, 0); break;                    /* r/m8, r8 */
        case 1: modrm(rnd(8), op != 7, 0); break;              /* r/m32, r32 */
        case 2: modrm(rnd(8), 0, 0); break;                    /* r8, r/m8 */
        default: modrm(op == 7 ? rnd(8) : dreg(), 0, 0); break; /* r32, r/m32 */
        }
    } else if (t < 27) {                       /* ALU: al/eax, imm */
        prefixes(0, 1);
        op = rnd(8);
        if (rnd(2)) { emit8((op << 3) | 4); emit8(rnd(256)); }
        else { emit8((op << 3) | 5); emit_immz(); }
    } else if (t < 36) {                       /* group 1: r/m, imm */
        op = rnd(8);
        prefixes(op != 7, 1);
        switch (rnd(3)) {
        case 0: emit8(0x80); modrm(op, 0, 0); emit8(rnd(256)); break;
        case 1: emit8(0x81); modrm(op, op != 7, 0); emit_immz(); break;
        default: emit8(0x83); modrm(op, op != 7, 0); emit8(rnd(256)); break;
        }
    } else if (t < 40) {                       /* inc/dec */
        form = rnd(3);
        prefixes(form != 0, 1);
        switch (form) {
        case 0: emit8(0x40 + rnd(2) * 8 + dreg()); break;
        case 1: emit8(0xfe); modrm(rnd(2), 0, 0); break;
        default: emit8(0xff); modrm(rnd(2), 1, 0); break;
        }
    } else if (t < 52) {                       /* mov */
        prefixes(0, 1);
        switch (rnd(7)) {
        case 0: emit8(0x88); modrm(rnd(8), 0, 0); break;
        case 1: emit8(0x89); modrm(rnd(8), 1, 0); break;
        case 2: emit8(0x8a); modrm(rnd(8), 0, 0); break;
        case 3: emit8(0x8b); modrm(dreg(), 0, 0); break;
        case 4: emit8(0xb0 + rnd(8)); emit8(rnd(256)); break;
        case 5: emit8(0xb8 + dreg()); emit_immz(); break;
        default:
            if (rnd(2)) { emit8(0xc6); modrm(0, 0, 0); emit8(rnd(256)); }
            else { emit8(0xc7); modrm(0, 1, 0); emit_immz(); }
            break;
        }
    } else if (t < 56) {                       /* test */
        prefixes(0, 1);
        switch (rnd(4)) {
        case 0: emit8(0x84 + rnd(2)); modrm(rnd(8), 0, 0); break;
        case 1: emit8(0xa8); emit8(rnd(256)); break;
        case 2: emit8(0xa9); emit_immz(); break;
        default:
            if (rnd(2)) { emit8(0xf6); modrm(0, 0, 0); emit8(rnd(256)); }
            else { emit8(0xf7); modrm(0, 0, 0); emit_immz(); }
            break;
        }
    } else if (t < 59) {                       /* xchg */
        form = rnd(3);
        prefixes(form != 2, 1);
        switch (form) {
        case 0: emit8(0x86); modrm(rnd(8), 0, 0); break;
        case 1: emit8(0x87); modrm(dreg(), 1, 0); break;
        default: emit8(0x90 + dreg()); break;
        }
    } else if (t < 62) {                       /* not/neg */
        prefixes(1, 1);
        if (rnd(2)) { emit8(0xf6); modrm(2 + rnd(2), 0, 0); }
        else { emit8(0xf7); modrm(2 + rnd(2), 1, 0); }
    } else if (t < 65) {                       /* lea (a register source: #UD) */
        prefixes(0, 1);
        emit8(0x8d);
        if (rnd(10) == 0) emit8(0xc0 | (dreg() << 3) | rnd(8));
        else modrm(dreg(), 0, 1);
    } else if (t < 68) {                       /* setcc (to a register: see the top), cmovcc */
        prefixes(0, 1);
        emit8(0x0f);
        if (rnd(2)) {
            emit8(0x90 + rnd(16));
            if (strict) modrm(0, 0, 0);
            else emit8(0xc0 | rnd(8));
        }
        else { emit8(0x40 + rnd(16)); modrm(dreg(), 0, 0); }
    } else if (t < 71) {                       /* movzx/movsx, bswap */
        prefixes(0, rnd(4) != 0);
        emit8(0x0f);
        if (op16 || rnd(5)) { emit8(0xb6 + (rnd(2) ? 8 : 0) + rnd(2)); modrm(dreg(), 0, 0); }
        else emit8(0xc8 + dreg());
    } else if (t < 74) {                       /* cmpxchg, xadd */
        prefixes(1, 1);
        emit8(0x0f);
        form = rnd(4);
        emit8((form < 2 ? 0xb0 : 0xc0) + (form & 1));
        if (form < 2) modrm(rnd(8), form & 1, 0);
        else modrm((form & 1) ? dreg() : rnd(8), form & 1, 0);
    } else if (t < 78) {                       /* rotate/shift by 1 (rcl/rcr to a register) */
        static const uint8_t ops[7] = { 0, 1, 2, 3, 4, 5, 7 };
        prefixes(0, 1);
        op = ops[rnd(7)];
        emit8(rnd(2) ? 0xd0 : 0xd1);
        if ((op == 2 || op == 3) && !strict) emit8(0xc0 | (op << 3) | dreg());
        else modrm(op, 1, 0);
    } else if (t < 82) {                       /* one-byte forms */
        static const uint8_t ops[13] = { 0xf5, 0xf8, 0xf9, 0xfc, 0xfd, 0xfa, 0x98, 0x99, 0x9e, 0x90, 0xd7, 0xce, 0x90 };
        prefixes(0, 1);
        emit8(ops[rnd(13)]);
    } else if (t < 86) {                       /* string instructions, rep with a small count; not
                                                * cmps: which operand faults first when both would
                                                * differs (QEMU reads ES:EDI first, a PC DS:ESI) */
        if (rnd(2)) { emit8(0xb9); emit32(rnd(8)); } /* mov $n, %ecx */
        prefixes(0, 1);
        static const uint8_t ops[10] = { 0xa4, 0xa5, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf, 0xa6, 0xa7 };
        if (rnd(2)) emit8(rnd(2) ? 0xf3 : 0xf2);
        emit8(ops[rnd(strict ? 10 : 8)]);
    } else if (t < 97) {                       /* forward branches */
        int target = i + 1 + (int)rnd(6);
        if (target > n) target = n;
        switch (rnd(5)) {
        case 0: emit8(0x70 + rnd(16)); break;
        case 1: emit8(0xeb); break;
        case 2: emit8(0xe3); break; /* jecxz */
        case 3: emit8(0xe2); break; /* loop */
        default:
            emit8(0x0f);
            emit8(0x80 + rnd(16));
            fixups[*nfix].field = cp;
            fixups[*nfix].size = 4;
            fixups[*nfix].target = target;
            (*nfix)++;
            emit32(0);
            return;
        }
        fixups[*nfix].field = cp;
        fixups[*nfix].size = 1;
        fixups[*nfix].target = target;
        (*nfix)++;
        emit8(0);
    } else {                                   /* faults */
        switch (rnd(6)) {
        case 0: emit8(0x0f); emit8(0x0b); break;                 /* ud2 */
        case 1: emit8(0xcc); break;                              /* int3 */
        case 2: emit8(0xd4); emit8(0x00); break;                 /* aam 0 */
        case 3: prefixes(0, 1); emit8(0x62); modrm(rnd(8), 0, 1); break; /* bound */
        case 4: emit8(0xf0); emit8(0x90); break;                 /* lock nop */
        default: emit8(0xf0); emit8(0x01); emit8(0xc0 | (rnd(8) << 3) | dreg()); break; /* lock add to a register */
        }
    }
}

static void gen_block(void) {
    memset(sb_code, 0xcc, 4096);
    cp = sb_code;
    int n = 4 + (int)rnd(MAX_INSNS - 3), nfix = 0;
    for (int i = 0; i < n; i++) {
        insn_at[i] = cp;
        gen_insn(i, n, &nfix);
    }
    insn_at[n] = cp;
    for (int k = 0; k < nfix; k++) {
        int32_t rel = (int32_t)(insn_at[fixups[k].target] - (fixups[k].field + fixups[k].size));
        if (fixups[k].size == 1) fixups[k].field[0] = (uint8_t)rel;
        else { uint8_t *f = fixups[k].field; for (int b = 0; b < 4; b++) f[b] = (uint8_t)(rel >> (8 * b)); }
    }
}

static uint32_t rnd_reg_value(void) {
    switch (rnd(5)) {
    case 0: return rnd(256);
    case 1: case 2: return SB_SCRATCH + rnd(8192);
    case 3: return (rnd(2) ? SB_TEXT : SB_SYS) + rnd(4096);
    default: return rnd32();
    }
}

static uint32_t hash, flags_hash;
static void mix(uint32_t v) { hash = (hash ^ v) * 0x01000193u; }

static void put_desc_ptr(uint32_t off, uint16_t limit, uint32_t base) {
    volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)(SB_SYS + off);
    p[0] = (uint8_t)limit;
    p[1] = (uint8_t)(limit >> 8);
    for (int i = 0; i < 4; i++) p[2 + i] = (uint8_t)(base >> (8 * i));
}

/* The sandbox's pages, address space and descriptor tables (hostile.S). */
static void sandbox_setup(void) {
    memset((void *)(uintptr_t)SB_CODE, 0, SB_PRIV + 0x1000 - SB_CODE);
    memcpy((void *)(uintptr_t)SB_TEXT, sb_blob, sb_blob_end - sb_blob);
    sandbox_pd = alloc_page();
    sandbox_pt = alloc_page();
    sandbox_pd[SB_CODE >> 22] = (uintptr_t)sandbox_pt | 3;
    for (uint32_t p = SB_CODE; p < SB_PRIV; p += 0x1000) /* code, sys and text read-only */
        sandbox_pt[(p >> 12) & 1023] = p | (p >= SB_STACK ? 3 : 1);
    for (int i = 0; i < 16; i++) /* accessed set: the CPU need not write the read-only copy */
        SYS_GDT[i] = gdt[i] | ((gdt[i] >> 44) & 1 ? 1ull << 40 : 0);
    SYS_GDT[SEL_TSS / 8] = SYS_GDT[SEL_TSS / 8 + 1] = 0; /* no kernel address in sight */
    for (int v = 0; v < 32; v++) {
        uint32_t h = SB_TEXT + sb_blob_isr[v];
        SYS_IDT[v] = (h & 0xffff) | ((uint64_t)SEL_KCODE << 16) | (0x8eull << 40) | ((uint64_t)(h >> 16) << 48);
    }
    put_desc_ptr(SYS_GDTR, sizeof(uint64_t) * 16 - 1, SB_SYS);
    put_desc_ptr(SYS_IDTR, sizeof(uint64_t) * 32 - 1, SB_SYS + 0x80);
    *SYS(SYS_KERNEL_CR3) = (uintptr_t)kernel_pd;
    *SYS(SYS_CR3) = (uintptr_t)sandbox_pd;
    *SYS(SYS_CODE) = SB_CODE;
    *PRIV_TRAP = (uintptr_t)sb_trap;
}

static void test_sandbox(void) {
    uint32_t runs = cmdline_uint("runs", 3000), verbose = cmdline_uint("verbose", 0);
    uint32_t dump = cmdline_uint("dump", 0xffffffff), first = cmdline_uint("first", 0);
    rng = cmdline_uint("seed", 1);
    static uint32_t counts[32];
    hash = flags_hash = 0x811c9dc5u;
    printf("%s: sandbox: %u runs\n", kernel_name, runs);
    for (uint32_t run = 0; run < runs; run++) {
        gen_block();
        /* The stack pages hold earlier runs' trap frames, which may differ
         * where QEMU legitimately does (a #PF error code): clear them. */
        memset((void *)(uintptr_t)SB_STACK, 0, 2 * 4096);
        uint32_t *scratch = (uint32_t *)(uintptr_t)SB_SCRATCH;
        uint32_t fill = rnd32();
        for (int i = 0; i < 2048; i++) scratch[i] = fill ^ (i * 0x9e3779b9u);
        for (int r = 0; r < 6; r++) *SYS(SYS_REGS + 4 * r) = rnd_reg_value();
        *SYS(SYS_REGS + 24) = SB_EBP;
        *SYS(SYS_FLAGS) = 0x2 | (rnd32() & 0xcd5);
        if (run == dump || verbose >= 2) {
            printf("%s: run %u: regs", kernel_name, run);
            for (int r = 0; r < 7; r++) printf(" %x", *SYS(SYS_REGS + 4 * r));
            printf(" flags %x code", *SYS(SYS_FLAGS));
            for (uint8_t *p = sb_code; p < cp; p++) printf(" %02x", *p);
            printf("\n");
        }
        memset(&sb_result, 0, sizeof(sb_result));
        if (run < first)
            continue;
        sb_active = 1;
        ((void (*)(void))(uintptr_t)(SB_TEXT + sb_blob_run))();
        if (sb_active || sb_result.cs != SEL_KCODE) {
            printf("%s: run %u did not end in an exception in the sandbox\n", kernel_name, run);
            failures++;
        }
        uint32_t mem = 0x811c9dc5u;
        for (int i = 0; i < 2048; i++) mem = (mem ^ scratch[i]) * 0x01000193u;
        if (run == dump && verbose >= 3)
            for (int i = 0; i < 2048; i++)
                if (scratch[i] != (fill ^ (i * 0x9e3779b9u)))
                    printf("%s: run %u: scratch %x = %x\n", kernel_name, run, SB_SCRATCH + 4 * i, scratch[i]);
        uint32_t vec = sb_result.vec, err = sb_result.err, cr2 = sb_result.cr2;
        if (!strict) {
            /* The W bit of a not-present #PF: a read-modify-write is a write
             * on a PC, a read under QEMU. */
            if (vec == PF && !(err & 1))
                err &= ~2u;
            /* An access that wraps past 4 GiB is beyond the 4 GiB segment
             * limit, #GP(0) on a PC; QEMU checks no limits: #PF. */
            if ((vec == GP && err == 0) || (vec == PF && cr2 >= 0xfffffff9u)) {
                vec = GP;
                err = cr2 = 0;
            }
        }
        mix(vec);
        mix(err);
        mix(cr2);
        mix(sb_result.at);
        for (int r = 0; r < 8; r++) mix(sb_result.regs[r]);
        mix(mem);
        /* CF PF ZF SF DF OF: not AF, undefined after logic operations and shifts. */
        flags_hash = (flags_hash ^ (sb_result.flags & 0xcc5)) * 0x01000193u;
        counts[vec & 31]++;
        if (verbose)
            printf("%s: run %u: vec=%u err=%x cr2=%x at=+%x eax=%x ecx=%x edx=%x ebx=%x esp=%x ebp=%x esi=%x edi=%x "
                   "fl=%x mem=%x\n", kernel_name, run, vec, err, cr2, sb_result.at,
                   sb_result.regs[0], sb_result.regs[1], sb_result.regs[2], sb_result.regs[3], sb_result.regs[4],
                   sb_result.regs[5], sb_result.regs[6], sb_result.regs[7], sb_result.flags, mem);
        if ((run + 1) % 500 == 0 || run + 1 == runs) {
            printf("%s: sandbox runs to %u: state hash=%x\n", kernel_name, run + 1, hash);
            if (!noframeflags)
                printf("%s: sandbox runs to %u: frame flags hash=%x\n", kernel_name, run + 1, flags_hash);
        }
    }
    printf("%s: sandbox vectors:", kernel_name);
    for (int v = 0; v < 32; v++)
        if (counts[v]) printf(" %u=%u", v, counts[v]);
    printf("\n");
}

void kmain(void) {
    strict = cmdline_uint("strict", 0);
    noframeflags = cmdline_uint("noframeflags", 0);
    for (int v = 0; v < 32; v++)
        handlers[v] = trap_record;
    pic_remap(0xff, 0xff);
    test_exceptions();
    if (strict)
        test_alignment_check();
    test_beyond_ram();
    test_code_overwrite();
    test_paging();
    sandbox_setup();
    test_sandbox();
}
