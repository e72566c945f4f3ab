/*
 * paging32 / paging_pae / paging64 - one paging format each (selected by
 * PAGING_32, PAGING_PAE or a 64-bit build): 4 KiB and large pages (4 MiB
 * with PSE, 2 MiB in PAE and 4-level, 1 GiB when CPUID has pdpe1gb),
 * accessed/dirty bits set by the CPU, U/S and R/W with CR0.WP on and off,
 * NX with EFER.NXE, #PF CR2 and error codes, invlpg and CR3 reload.
 *
 * The kernel builds its own tables in a pool at 8 MiB, identity-maps the
 * first 32 MiB with 4 KiB user-accessible pages (so ring-3 probes can run
 * kernel code; SMEP/SMAP stay off) and puts its test pages at 1 GiB.
 */
#include "kernel.h"

#if defined(PAGING_32)
typedef uint32_t pte_t;
#define LEVELS 2
#define IDX_BITS 10
#define LARGE_SIZE 0x400000u
#elif defined(PAGING_PAE)
typedef uint64_t pte_t;
#define LEVELS 3
#define IDX_BITS 9
#define LARGE_SIZE 0x200000u
#else
typedef uint64_t pte_t;
#define LEVELS 4
#define IDX_BITS 9
#define LARGE_SIZE 0x200000u
#endif

#define P 0x1u
#define RW 0x2u
#define US 0x4u
#define PA 0x20u  /* accessed */
#define PD 0x40u  /* dirty */
#define PS 0x80u
#define NX (1ull << 63)
#define ADDR_MASK 0x000ffffffffff000ull

#define POOL 0x800000u
#define PHYS_A 0x1000000u     /* 16 MiB: data page A */
#define PHYS_B 0x1001000u     /* data page B */
#define PHYS_LARGE 0x1400000u /* 20 MiB: large-page frame (4 MiB aligned) */
#define VA_BASE 0x40000000u   /* 1 GiB: test pages */
#define VA_4K (VA_BASE + 0x0000)
#define VA_RO (VA_BASE + 0x1000)
#define VA_SUP (VA_BASE + 0x2000)
#define VA_NP (VA_BASE + 0x3000)
#define VA_CODE (VA_BASE + 0x4000)
#define VA_LARGE (VA_BASE + 0x400000u)
#define VA_1G 0x80000000u

static uint32_t pool_next = POOL;
static pte_t *root;

static void *alloc_page(void) {
    void *p = (void *)(uintptr_t)pool_next;
    pool_next += 4096;
    memset(p, 0, 4096);
    return p;
}

static unsigned index_at(ureg va, int level) {
#if defined(PAGING_PAE)
    if (level == 3) return (va >> 30) & 3;
#endif
    return (va >> (12 + IDX_BITS * (level - 1))) & ((1u << IDX_BITS) - 1);
}

static pte_t table_flags(int level) {
#if defined(PAGING_PAE)
    if (level == 3) return P; /* PDPTEs have no R/W or U/S bits */
#endif
    return P | RW | US;
}

/* The entry for `va` at `level` (1 = PTE), creating tables above it. */
static pte_t *entry(ureg va, int level) {
    pte_t *t = root;
    for (int l = LEVELS; l > level; l--) {
        pte_t *e = &t[index_at(va, l)];
        if (!(*e & P))
            *e = (pte_t)(uintptr_t)alloc_page() | table_flags(l);
        t = (pte_t *)(uintptr_t)(*e & ADDR_MASK);
    }
    return &t[index_at(va, level)];
}

static void map(ureg va, uint32_t pa, pte_t flags, int level) {
    *entry(va, level) = pa | flags | (level > 1 ? PS : 0);
    invlpg((void *)va);
}

static volatile uint32_t *at(ureg va) { return (volatile uint32_t *)va; }

static void user_read(ureg va) { (void)*at(va); user_exit(0); }
static void user_write(ureg va) { *at(va) = 0x55; user_exit(0); }

/* Runs a user-mode access; prints and checks the #PF error code. */
static void check_user_pf(const char *what, void (*fn)(ureg), ureg va, ureg want_err) {
    trap_reset();
    ureg r = user_call(fn, va, USER_STACK_TOP);
    int ok = r == USER_FAULTED && last_trap.vec == PF && last_trap.err == want_err &&
             last_trap.cr2 == va;
    printf("%s: %s: vec=%u err=%lx cr2 %s%s\n", kernel_name, what, r == USER_FAULTED ? (uint32_t)last_trap.vec : 0,
           last_trap.err, last_trap.cr2 == va ? "ok" : "wrong", ok ? "" : " FAILED");
    if (!ok) failures++;
    trap_reset();
}

/* A kernel-mode access expected to #PF with err and CR2 = va. */
static void check_pf(const char *what, ureg want_err, ureg va) {
    int ok = last_trap.count == 1 && last_trap.vec == PF && last_trap.err == want_err &&
             last_trap.cr2 == va;
    printf("%s: %s: vec=%u err=%lx cr2 %s%s\n", kernel_name, what, (uint32_t)last_trap.vec,
           last_trap.err, last_trap.cr2 == va ? "ok" : "wrong", ok ? "" : " FAILED");
    if (!ok) failures++;
    trap_reset();
}

static void kread(ureg va) { TRY("movl (%0), %%eax", :: "r"(va) : "eax", RECOVER_CLOBBER); }
static void kwrite(ureg va) { TRY("movl $1, (%0)", :: "r"(va) : RECOVER_CLOBBER); }
/* A faulting fetch happens after the call pushed its return address: keep
 * the stack pointer in a register the trap frame preserves. */
static void kcall(ureg va) {
    asm volatile(RECOVER_PROLOGUE "mov %%" SP ", %%" SI "\n2: call *%0\n1: mov %%" SI ", %%" SP
                 :: "r"(va) : "esi", RECOVER_CLOBBER);
}

static void setup(void) {
    root = alloc_page();
    for (uint32_t pa = 0; pa < 0x2000000; pa += 4096)
        *entry(pa, 1) = pa | P | RW | US;
    write_cr3((ureg)(uintptr_t)root);
#if defined(PAGING_32)
    write_cr4(read_cr4() | CR4_PSE);
    write_cr0(read_cr0() | CR0_PG | CR0_WP);
#elif defined(PAGING_PAE)
    write_cr4(read_cr4() | CR4_PAE);
    write_cr0(read_cr0() | CR0_PG | CR0_WP);
#else
    write_cr0(read_cr0() | CR0_WP); /* already in long mode; CR3 switched above */
#endif
    printf("%s: paging on, %u-level tables\n", kernel_name, LEVELS);
}

static void test_4k_and_ad(void) {
    map(VA_4K, PHYS_A, P | RW, 1);
    *at(PHYS_A) = 0x11111111;
    pte_t *pte = entry(VA_4K, 1), *pde = entry(VA_4K, 2);
    *pde &= ~(pte_t)PA;
    *pte &= ~(pte_t)(PA | PD);
    write_cr3(read_cr3());
    uint32_t v = *at(VA_4K);
    check(v == 0x11111111, "4k read through mapping");
    check((*pte & (PA | PD)) == PA, "read sets A, not D");
    check((*pde & PA) == PA, "pde A set");
    *at(VA_4K + 4) = 0x22222222;
    check(*at(PHYS_A + 4) == 0x22222222, "4k write through mapping");
    check((*pte & (PA | PD)) == (PA | PD), "write sets D");
}

static void test_large(void) {
    *at(PHYS_LARGE + LARGE_SIZE - 8) = 0x33333333;
    map(VA_LARGE, PHYS_LARGE, P | RW, 2);
    check(*at(VA_LARGE + LARGE_SIZE - 8) == 0x33333333, "large page read");
    *at(VA_LARGE + 0x1234) = 0x44444444;
    check(*at(PHYS_LARGE + 0x1234) == 0x44444444, "large page write");
    check((*entry(VA_LARGE, 2) & (PA | PD)) == (PA | PD), "large page A+D");
#if LEVELS == 4
    uint32_t r[4];
    cpuid(0x80000001, 0, r);
    if (r[3] & (1u << 26)) {
        map(VA_1G, 0, P | RW, 3);
        check(*at(VA_1G + PHYS_LARGE + 0x1234) == 0x44444444, "1g page read");
        check((*entry(VA_1G, 3) & PA) == PA, "1g page A");
    } else {
        printf("%s: 1g page skipped (no pdpe1gb)\n", kernel_name);
    }
#endif
}

static void test_faults(void) {
    map(VA_RO, PHYS_B, P | US, 1);
    map(VA_SUP, PHYS_B, P | RW, 1);
    *entry(VA_NP, 1) = 0;
    invlpg((void *)VA_NP);

    kread(VA_NP + 8);
    check_pf("not-present read", 0x0, VA_NP + 8);
    kwrite(VA_NP + 12);
    check_pf("not-present write", 0x2, VA_NP + 12);

    kwrite(VA_RO);
    check_pf("wp=1 supervisor write to read-only", 0x3, VA_RO);
    write_cr0(read_cr0() & ~CR0_WP);
    kwrite(VA_RO);
    expect_no_fault("wp=0 supervisor write to read-only");
    write_cr0(read_cr0() | CR0_WP);
    kread(VA_RO);
    expect_no_fault("supervisor read of user page");

    check_user_pf("user read of supervisor page", user_read, VA_SUP, 0x5);
    check_user_pf("user write of supervisor page", user_write, VA_SUP + 4, 0x7);
    check_user_pf("user write to read-only page", user_write, VA_RO + 8, 0x7);
    check_user_pf("user read of not-present page", user_read, VA_NP, 0x4);
    trap_reset();
    check(user_call(user_read, VA_RO, USER_STACK_TOP) == 0, "user read of user page");

    /* Instruction fetch from a not-present page: I/D is reported only with
     * PAE/4-level paging and EFER.NXE (or SMEP). */
    kcall(VA_NP);
#if LEVELS == 2
    check_pf("fetch not-present", 0x0, VA_NP);
#else
    uint32_t r[4];
    cpuid(0x80000001, 0, r);
    if (!(r[3] & (1u << 20))) {
        printf("%s: nx skipped (no cpuid nx)\n", kernel_name);
        trap_reset();
        return;
    }
    check_pf("fetch not-present, nxe=0", 0x0, VA_NP);
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_NXE);
    kcall(VA_NP);
    check_pf("fetch not-present, nxe=1", 0x10, VA_NP);
    map(VA_CODE, PHYS_B, P | RW, 1);
    *(volatile uint8_t *)(uintptr_t)(PHYS_B + 0x800) = 0xc3; /* ret */
    kcall(VA_CODE + 0x800);
    expect_no_fault("fetch from executable page");
    map(VA_CODE, PHYS_B, P | RW | NX, 1);
    kcall(VA_CODE + 0x800);
    check_pf("fetch from nx page", 0x11, VA_CODE + 0x800);
    kread(VA_CODE + 0x800);
    expect_no_fault("read from nx page");
#endif
}

static void test_flush(void) {
    *at(PHYS_A) = 0xaaaaaaaa;
    *at(PHYS_B) = 0xbbbbbbbb;
    map(VA_4K, PHYS_A, P | RW, 1);
    check(*at(VA_4K) == 0xaaaaaaaa, "mapped to A");
    *entry(VA_4K, 1) = PHYS_B | P | RW;
    invlpg((void *)VA_4K);
    check(*at(VA_4K) == 0xbbbbbbbb, "invlpg: remapped to B");
    *entry(VA_4K, 1) = PHYS_A | P | RW;
    write_cr3(read_cr3());
    check(*at(VA_4K) == 0xaaaaaaaa, "cr3 reload: remapped to A");
    *entry(VA_4K, 1) = 0;
    write_cr3(read_cr3());
    kread(VA_4K);
    check_pf("cr3 reload: unmapped", 0x0, VA_4K);
}

void kmain(void) {
    setup();
    test_4k_and_ad();
    test_large();
    test_faults();
    test_flush();
}
