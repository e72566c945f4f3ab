/*
 * smc / smc64 - self-modifying code, which a binary translator must notice
 * whichever way the bytes change:
 *  (a) a store into an instruction a few instructions ahead in the same
 *      straight-line block (mov, rep movsb, push, read-modify-write ops,
 *      an instruction patching its own immediate, a loop patching its body);
 *  (b) functions in another page patched from C, including one reached by
 *      a direct call from its neighbour, and opcode (not just immediate)
 *      changes;
 *  (c) paging on: a second linear mapping of a code page (write through
 *      one, run through the other), a linear page remapped to other
 *      physical code, and a block spanning two pages whose second page is
 *      remapped or patched;
 *  (d) a function patched thousands of times, each time with a different
 *      immediate, called after every patch (from C in another page and from
 *      a loop in the function's own page), with checksums.
 * The routines being patched are in smc.S.
 */
#include "kernel.h"

typedef uint32_t (*fn_t)(void);

extern volatile uint32_t smc_arg, smc_arg2;
extern volatile uint64_t smc_arg64;
extern uint8_t smc_self_inc_imm[], smc_loop_imm[];
uint32_t smc_same_block(void), smc_next_insn(void), smc_branch(void), smc_rep_movs(void);
uint32_t smc_self_inc(void), smc_loop_patch(void), smc_push_patch(void), smc_rmw_patch(void);
uint32_t smc_b_fn(void), smc_b_caller(void), smc_b_callee(void), smc_b_loop(void);
uint32_t smc_d_fn(void), smc_d_samepage(void);
uint32_t smc_c_fn(void), smc_c_caller(void);
extern uint8_t smc_c_page[];

#define LCG(x) ((x) * 1103515245u + 12345u)

static uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

/* Pages for code built at run time; also the remap targets under paging. */
static uint8_t code_pages[6][4096] __attribute__((aligned(4096)));

static void poke32(void *p, uint32_t v) { *(volatile uint32_t *)p = v; }
static void poke8(void *p, uint8_t v) { *(volatile uint8_t *)p = v; }

/* `mov $v, %eax; ret` at p. */
static void emit_mov_ret(uint8_t *p, uint32_t v) {
    poke8(p, 0xb8);
    poke32(p + 1, v);
    poke8(p + 5, 0xc3);
}

static void checkf(int cond, const char *what, uint32_t got, uint32_t want) {
    if (cond)
        printf("%s: %s ok\n", kernel_name, what);
    else {
        printf("%s: %s FAILED (got %x, want %x)\n", kernel_name, what, got, want);
        failures++;
    }
}
#define CHECK_EQ(what, got, want) do { uint32_t g_ = (got), w_ = (want); checkf(g_ == w_, what, g_, w_); } while (0)

static void test_same_block(void) {
    static const uint32_t vals[] = { 0x12345678, 0x9abcdef0, 0x0badf00d };
    int bad = 0;
    for (int i = 0; i < 3; i++) {
        smc_arg = vals[i];
        smc_arg64 = vals[i] | (0xc3ull << 32) | (0xccccccull << 40);
        bad += smc_same_block() != vals[i];
        bad += smc_next_insn() != vals[i];
        bad += smc_rep_movs() != vals[i];
        bad += smc_push_patch() != vals[i];
    }
    CHECK_EQ("(a) mov imm32 patched 3 insns ahead, 3 values", bad, 0);

    smc_arg = 0x05eb;
    uint32_t r1 = smc_branch();
    smc_arg = 0x9090;
    uint32_t r2 = smc_branch();
    smc_arg = 0x05eb;
    uint32_t r3 = smc_branch();
    checkf(r1 == 1 && r2 == 0xb0b0b0b1 && r3 == 1, "(a) jmp patched to nops and back", r2, 0xb0b0b0b1);

    uint32_t got = 0, want = 0;
    for (int i = 0; i < 6; i++) {
        uint32_t r = smc_self_inc();
        got = got * 16 + r;
        want = want * 16 + ((1u << i) & 0xff);
    }
    CHECK_EQ("(a) insn adding its own immediate to itself, 6 runs", got, want);

    uint32_t s[7] = { 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70 };
    got = want = 0;
    for (int i = 0; i < 3; i++) {
        s[0] += 0x01000000;
        s[1] ^= 0xff;
        s[2] = ~s[2];
        s[3]++;
        s[4] |= 1u << 20;
        s[5] = 0x66;
        if (s[6] == 0x70) s[6] = 0x77;
        uint32_t sum = 0;
        for (int j = 0; j < 7; j++) sum += s[j];
        got = got * 31 + smc_rmw_patch();
        want = want * 31 + sum;
    }
    CHECK_EQ("(a) add/xor/not/inc/bts/xchg/cmpxchg on the next insn, 3 runs", got, want);

    *(volatile uint32_t *)smc_loop_imm = 0;
    smc_arg = 1000;
    smc_arg2 = 0x1234567;
    uint32_t h = 0x1234567, imm = 0;
    for (uint32_t c = 1000; c; c--) {
        h = rol32(h ^ imm, 5) + c;
        imm = h;
    }
    CHECK_EQ("(a) loop rewriting its own first insn, 1000 iterations", smc_loop_patch(), h);
}

static void test_other_page(void) {
    uint8_t *f = (uint8_t *)smc_b_fn;
    CHECK_EQ("(b) unpatched", smc_b_fn(), 0x55555555);
    int bad = 0;
    for (uint32_t i = 0; i < 8; i++) {
        uint32_t v = 0x01010101 * (i + 1) ^ 0x80000000;
        poke32(f + 1, v);
        bad += smc_b_fn() != v;
    }
    CHECK_EQ("(b) imm32 patched, 8 values", bad, 0);
    poke8(f + 4, 0x5a); /* one byte of the immediate */
    CHECK_EQ("(b) one byte of the imm32 patched", smc_b_fn(), 0x5a080808);
    static const uint8_t xor_not[] = { 0x31, 0xc0, 0xf7, 0xd0, 0xc3 }; /* xor eax,eax; not eax; ret */
    for (int i = 0; i < 5; i++) poke8(f + i, xor_not[i]);
    CHECK_EQ("(b) opcodes replaced (xor; not; ret)", smc_b_fn(), 0xffffffff);
    emit_mov_ret(f, 0x13572468);
    CHECK_EQ("(b) mov; ret written back", smc_b_fn(), 0x13572468);

    uint8_t *callee = (uint8_t *)smc_b_callee;
    uint32_t sum = 0;
    for (int i = 0; i < 50; i++) sum += smc_b_caller();
    CHECK_EQ("(b) caller of a neighbour, 50 calls", sum, 50 * 0x66666667u);
    poke32(callee + 1, 0x7000);
    CHECK_EQ("(b) neighbour patched, caller sees it", smc_b_caller(), 0x7001);
    smc_arg = 100;
    CHECK_EQ("(b) hot loop over the neighbour, 100 calls", smc_b_loop(), 100 * 0x7000);
    poke32(callee + 1, 0x9);
    CHECK_EQ("(b) patched again, loop sees it", smc_b_loop(), 100 * 0x9);

    /* An instruction split across two pages: b8 aa bb | cc dd c3. */
    uint8_t *p = code_pages[0];
    for (int i = 0xff0; i < 0xffd; i++) poke8(p + i, 0x90);
    static const uint8_t split[] = { 0xb8, 0xaa, 0xbb, 0xcc, 0xdd, 0xc3 };
    for (int i = 0; i < 6; i++) poke8(p + 0xffd + i, split[i]);
    fn_t fs = (fn_t)(uintptr_t)(p + 0xff0);
    CHECK_EQ("(b) mov imm32 split across pages", fs(), 0xddccbbaa);
    poke8(p + 0x1000, 0x11);
    CHECK_EQ("(b) split mov, second page's byte patched", fs(), 0xdd11bbaa);
    poke8(p + 0xffe, 0x22);
    CHECK_EQ("(b) split mov, first page's byte patched", fs(), 0xdd11bb22);

    /* A 4-byte store straddling from a data page into the first bytes of a
     * code page: `mov $imm, %eax; ret` at the start of code_pages[3]. */
    uint8_t *q = code_pages[3];
    emit_mov_ret(q, 0x01020304);
    fn_t fq = (fn_t)(uintptr_t)q;
    CHECK_EQ("(b) function at a page start", fq(), 0x01020304);
    poke32(q - 2, 0x77b80000); /* q[0] = b8 again, q[1] = 77 */
    CHECK_EQ("(b) store straddling into its page", fq(), 0x01020377);
    poke32(q - 3, 0xb8000000); /* only q[0] (b8 again): same code */
    CHECK_EQ("(b) store straddling into its page, bytes unchanged", fq(), 0x01020377);
}

/* (d) */
static void test_many_patches(void) {
    uint8_t *f = (uint8_t *)smc_d_fn;
    uint32_t x = 1, h = 0, want = 0;
    int bad = 0;
    for (int i = 0; i < 4000; i++) {
        x = LCG(x);
        poke32(f + 1, x);
        uint32_t r = smc_d_fn();
        bad += r != x;
        h = rol32(h, 3) ^ r;
        want = rol32(want, 3) ^ x;
    }
    printf("%s: (d) 4000 patches from another page: checksum=%x\n", kernel_name, h);
    checkf(bad == 0 && h == want, "(d) 4000 patches from another page", h, want);

    smc_arg = 4000;
    smc_arg2 = 7;
    x = 7;
    want = 0;
    for (int i = 0; i < 4000; i++) {
        x = LCG(x);
        want = rol32(want, 3) ^ x;
    }
    h = smc_d_samepage();
    printf("%s: (d) 4000 patches from the same page: checksum=%x\n", kernel_name, h);
    checkf(h == want, "(d) 4000 patches from the same page", h, want);

    /* The function rewritten in other shapes, alternately. */
    uint8_t *g = code_pages[1];
    h = want = 0;
    x = 99;
    for (int i = 0; i < 2000; i++) {
        x = LCG(x);
        uint32_t v;
        switch (i % 3) {
        case 0: /* mov $x, %eax; ret */
            emit_mov_ret(g, x);
            v = x;
            break;
        case 1: /* mov $x, %eax; not %eax; ret */
            poke8(g, 0xb8); poke32(g + 1, x); poke8(g + 5, 0xf7); poke8(g + 6, 0xd0); poke8(g + 7, 0xc3);
            v = ~x;
            break;
        default: /* xor %eax, %eax; add $x8, %al (imm8 sign-ext to 8 bits: al only); ret */
            poke8(g, 0x31); poke8(g + 1, 0xc0); poke8(g + 2, 0x04); poke8(g + 3, (uint8_t)x); poke8(g + 4, 0xc3);
            v = x & 0xff;
            break;
        }
        uint32_t r = ((fn_t)(uintptr_t)g)();
        h = rol32(h, 5) + r;
        want = rol32(want, 5) + v;
    }
    printf("%s: (d) 2000 rewrites in 3 shapes: checksum=%x\n", kernel_name, h);
    checkf(h == want, "(d) 2000 rewrites in 3 shapes", h, want);
}

/* (c) Paging: the kernel stays identity-mapped; VA_ALIAS..VA_SPAN+8K map
 * single 4 KiB pages. */
#define VA_ALIAS 0x40000000u
#define VA_REMAP 0x40001000u
#define VA_SPAN 0x40002000u

#ifdef __x86_64__
typedef uint64_t pte_t;
extern uint64_t boot_pd[];
static pte_t alias_pt[512] __attribute__((aligned(4096)));
static void paging_setup(void) {
    boot_pd[VA_ALIAS >> 21] = (uintptr_t)alias_pt | 3;
    write_cr3(read_cr3());
}
#define PT_INDEX(va) (((va) >> 12) & 511)
#else
typedef uint32_t pte_t;
static uint32_t page_dir[1024] __attribute__((aligned(4096)));
static pte_t alias_pt[1024] __attribute__((aligned(4096)));
static void paging_setup(void) {
    for (uint32_t i = 0; i < 32; i++)
        page_dir[i] = (i << 22) | 0x83; /* 4 MiB, present, writable */
    page_dir[VA_ALIAS >> 22] = (uintptr_t)alias_pt | 3;
    write_cr3((uintptr_t)page_dir);
    write_cr4(read_cr4() | CR4_PSE);
    write_cr0(read_cr0() | CR0_PG);
}
#define PT_INDEX(va) (((va) >> 12) & 1023)
#endif

static void map4k(uint32_t va, const void *pa) {
    alias_pt[PT_INDEX(va)] = (uintptr_t)pa | 3;
    invlpg((void *)(uintptr_t)va);
}

static void test_paging(void) {
    paging_setup();
    printf("%s: paging on\n", kernel_name);
    map4k(VA_ALIAS, smc_c_page);
    uint32_t off = (uint32_t)((uintptr_t)smc_c_fn - (uintptr_t)smc_c_page);
    uint8_t *alias = (uint8_t *)(uintptr_t)(VA_ALIAS + off);
    fn_t via_alias = (fn_t)(uintptr_t)alias;
    fn_t caller_alias = (fn_t)(uintptr_t)(VA_ALIAS + ((uintptr_t)smc_c_caller - (uintptr_t)smc_c_page));

    CHECK_EQ("(c) call through the alias", via_alias(), 0x77777777);
    poke32(alias + 1, 0xa1a1a1a1);
    CHECK_EQ("(c) written through the alias, called through the original", smc_c_fn(), 0xa1a1a1a1);
    poke32((uint8_t *)smc_c_fn + 1, 0xb2b2b2b2);
    CHECK_EQ("(c) written through the original, called through the alias", via_alias(), 0xb2b2b2b2);
    CHECK_EQ("(c) caller through the alias", caller_alias(), 0xb2b2b2b3);
    CHECK_EQ("(c) caller through the original", smc_c_caller(), 0xb2b2b2b3);

    int bad = 0;
    uint32_t x = 5;
    for (int i = 0; i < 200; i++) {
        x = LCG(x);
        if (i & 1) {
            poke32(alias + 1, x);
            bad += smc_c_caller() != x + 1;
            bad += smc_c_fn() != x;
        } else {
            poke32((uint8_t *)smc_c_fn + 1, x);
            bad += caller_alias() != x + 1;
            bad += via_alias() != x;
        }
    }
    CHECK_EQ("(c) 200 patches alternating between the mappings", bad, 0);

    /* One linear page, remapped to other physical code. */
    uint8_t *p1 = code_pages[2], *p2 = code_pages[3];
    emit_mov_ret(p1, 1);
    emit_mov_ret(p2, 2);
    fn_t remap = (fn_t)(uintptr_t)VA_REMAP;
    map4k(VA_REMAP, p1);
    uint32_t r1 = remap();
    map4k(VA_REMAP, p2);
    uint32_t r2 = remap();
    emit_mov_ret(p1, 3); /* through the identity map while unmapped here */
    map4k(VA_REMAP, p1);
    uint32_t r3 = remap();
    checkf(r1 == 1 && r2 == 2 && r3 == 3, "(c) linear page remapped: 1, 2, patched 3", r1 * 256 + r2 * 16 + r3, 0x123);

    /* A block that starts in one page and ends in the next: nops at the end
     * of the first page, then mov $imm, %eax; ret at the start of the second. */
    uint8_t *a = code_pages[4], *b1 = code_pages[5], *b2 = code_pages[0];
    for (int i = 0xff0; i < 0x1000; i++) poke8(a + i, 0x90);
    emit_mov_ret(b1, 0xb1);
    emit_mov_ret(b2, 0xb2);
    map4k(VA_SPAN, a);
    map4k(VA_SPAN + 0x1000, b1);
    fn_t span = (fn_t)(uintptr_t)(VA_SPAN + 0xff0);
    CHECK_EQ("(c) block across two pages", span(), 0xb1);
    map4k(VA_SPAN + 0x1000, b2);
    CHECK_EQ("(c) block across two pages, second remapped", span(), 0xb2);
    poke32(b2 + 1, 0xb3);
    CHECK_EQ("(c) block across two pages, second patched", span(), 0xb3);
    poke32((uint8_t *)(uintptr_t)(VA_SPAN + 0x1001), 0xb4);
    CHECK_EQ("(c) block across two pages, second patched through the alias", span(), 0xb4);
    map4k(VA_SPAN + 0x1000, b1);
    CHECK_EQ("(c) block across two pages, first mapping back", span(), 0xb1);
}

void kmain(void) {
    test_same_block();
    test_other_page();
    test_many_patches();
    test_paging();
}
