/*
 * kernel.h - the mini-library shared by btvmm's multiboot test kernels.
 *
 * Every kernel is freestanding C plus a little GNU assembly. The library gives
 * serial output (COM1, polled), a small printf, the debug-exit port, port and
 * control-register accessors, GDT/IDT/TSS setup and a trap dispatcher that can
 * either call a per-vector handler or resume after an expected fault (see
 * TRY_* below). The same sources build as 32-bit (-m32) and 64-bit (-m64)
 * code; 64-bit kernels enter in 32-bit mode (boot64.S) and switch themselves.
 */
#ifndef KERNEL_H
#define KERNEL_H

#include <stdint.h>
#include <stddef.h>

#ifdef __x86_64__
typedef uint64_t ureg;
#define BITS 64
#else
typedef uint32_t ureg;
#define BITS 32
#endif

/* Debug-exit codes: the VM's exit status is (code << 1) | 1. */
#define EXIT_PASS 0x10 /* status 33 */
#define EXIT_FAIL 0x11 /* status 35 */

/* GDT layout shared by all kernels (selectors). */
#define SEL_KCODE   0x08 /* 32-bit code in 32-bit kernels, 64-bit code in 64-bit kernels */
#define SEL_KDATA   0x10
#define SEL_UCODE32 0x1b
#define SEL_UDATA   0x23
#define SEL_UCODE64 0x2b
#define SEL_TSS     0x30 /* 16 bytes in 64-bit kernels */
#define SEL_KCODE32 0x40 /* 32-bit ring-0 code (compatibility mode in 64-bit kernels) */
#define SEL_KCODE16 0x48 /* 16-bit ring-0 code */
#define GDT_FREE    10   /* first GDT index kernels may fill for their own tests */
#define GDT_ENTRIES 32

/* Trap frame built by the ISR stubs (isr32.S / isr64.S). */
struct frame {
#ifdef __x86_64__
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rdi, rsi, rbp, rbx, rdx, rcx, rax;
    uint64_t vec, err;
    uint64_t ip, cs, flags, sp, ss;
#else
    uint32_t edi, esi, ebp, esp_unused, ebx, edx, ecx, eax;
    uint32_t vec, err;
    uint32_t ip, cs, flags;
    uint32_t sp, ss; /* valid only when the trap came from ring 3 */
#endif
};

/* What the last recovered fault was (see TRY_*). */
struct trap_info {
    ureg vec, err, ip, cr2, cs;
    int count;
};
extern volatile struct trap_info last_trap;
extern volatile ureg recover_ip;   /* resume here after any fault when nonzero */
extern volatile ureg probe_start;  /* address of the probed instruction */

typedef void (*trap_handler)(struct frame *f);
extern trap_handler handlers[256];

/*
 * Run one asm snippet with fault recovery: label 2 marks the probed
 * instruction, label 1 is where execution resumes after a fault. Returns
 * nothing; check last_trap.count before/after (use trap_reset()).
 */
#ifdef __x86_64__
#define RECOVER_PROLOGUE \
    "leaq 2f(%%rip), %%r11\n\tmovq %%r11, probe_start(%%rip)\n\t" \
    "leaq 1f(%%rip), %%r11\n\tmovq %%r11, recover_ip(%%rip)\n\t"
#define RECOVER_CLOBBER "r11", "memory"
#else
#define RECOVER_PROLOGUE \
    "movl $2f, probe_start\n\tmovl $1f, recover_ip\n\t"
#define RECOVER_CLOBBER "memory"
#endif
#ifdef __x86_64__
#define SP "rsp"
#define SI "rsi"
#else
#define SP "esp"
#define SI "esi"
#endif
#define RECOVER_EPILOGUE "\n1:\n\t"

/* Like TRY, but `code` places label 2 itself. */
#define TRY_RAW(code, ...) asm volatile(RECOVER_PROLOGUE code RECOVER_EPILOGUE __VA_ARGS__)
/* Probe an instruction sequence; the first instruction is at label 2. */
#define TRY(code, ...) \
    asm volatile(RECOVER_PROLOGUE "2: " code RECOVER_EPILOGUE __VA_ARGS__)

/*
 * Ring 3: user_call runs fn(arg) at CPL 3 on user_sp (flat segments; the
 * pages must be user-accessible) and returns the value fn passes to
 * user_exit (int 0x80), or USER_FAULTED with last_trap describing the
 * fault. user_return is the dispatcher's way back; user_active says a
 * user_call is in progress.
 */
#define USER_FAULTED ((ureg)-1)
ureg user_call(void (*fn)(ureg), ureg arg, ureg user_sp);
void user_return(ureg value) __attribute__((noreturn));
#ifdef __x86_64__
ureg user_call_sysret(void (*fn)(ureg), ureg arg, ureg user_sp);
#endif
extern volatile int user_active;
static inline __attribute__((noreturn)) void user_exit(ureg v) {
    asm volatile("int $0x80" :: "a"(v));
    __builtin_unreachable();
}
extern uint8_t user_stack[8192];
#define USER_STACK_TOP ((ureg)(uintptr_t)(user_stack + sizeof(user_stack)))

void trap_reset(void);
/* True when the last TRY faulted with `vec`; prints a line describing it. */
int expect_fault(const char *what, int vec);
/* Same, with the trap's IP expected at probe_start + offset (-1: any IP). */
int expect_fault_at(const char *what, int vec, long offset);
int expect_no_fault(const char *what);

/* Serial console and printing. */
void serial_init(void);
void putc(char c);
void puts(const char *s);
void printf(const char *fmt, ...);
void fail(const char *fmt, ...) __attribute__((noreturn));
void check(int cond, const char *what);
extern int failures;
void finish(void) __attribute__((noreturn));
void exit_code(uint32_t code) __attribute__((noreturn));
extern const char *kernel_name;

/* Library routines gcc may emit calls to. */
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);
const char *strstr(const char *h, const char *n);

/* Multiboot. */
struct mb_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
    uint32_t mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
    uint32_t drives_length, drives_addr, config_table, boot_loader_name;
};
struct mb_module { uint32_t mod_start, mod_end, cmdline, pad; };
extern uint32_t mb_magic, mb_info_addr;
/* Reads `key=N` (decimal or 0x hex) from the multiboot command line. */
uint32_t cmdline_uint(const char *key, uint32_t dflt);

/* Descriptor tables. */
void gdt_set(int index, uint32_t base, uint32_t limit, uint8_t access, uint8_t flags);
void idt_set(int vec, ureg handler, uint16_t sel, uint8_t type_attr);
void idt_set_present(int vec, int present);
void idt_set_dpl(int vec, int dpl);
void tss_set_kernel_stack(ureg sp);
extern uint64_t gdt[GDT_ENTRIES];
extern ureg isr_table[256];
void boot_map_user(void); /* 64-bit: make the boot identity map user-accessible */
void arch_init(void); /* GDT, IDT, TSS, serial: called before kmain */
void kmain(void);

/* 8259A PIC: remap to vectors 0x20-0x2f with the given masks; end of interrupt. */
void pic_remap(uint8_t master_mask, uint8_t slave_mask);
void pic_eoi(int irq);
#define IRQ_VEC(n) (0x20 + (n))

/* Port I/O. */
static inline void outb(uint16_t p, uint8_t v) { asm volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outw(uint16_t p, uint16_t v) { asm volatile("outw %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outl(uint16_t p, uint32_t v) { asm volatile("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline uint8_t inb(uint16_t p) { uint8_t v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline uint16_t inw(uint16_t p) { uint16_t v; asm volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline uint32_t inl(uint16_t p) { uint32_t v; asm volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }

#define DEF_CR(n) \
    static inline ureg read_cr##n(void) { ureg v; asm volatile("mov %%cr" #n ", %0" : "=r"(v)); return v; } \
    static inline void write_cr##n(ureg v) { asm volatile("mov %0, %%cr" #n :: "r"(v) : "memory"); }
DEF_CR(0) DEF_CR(2) DEF_CR(3) DEF_CR(4)

static inline uint64_t rdmsr(uint32_t msr) {
    uint32_t lo, hi;
    asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v) {
    asm volatile("wrmsr" :: "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}
static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    asm volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}
static inline void invlpg(const volatile void *p) { asm volatile("invlpg (%0)" :: "r"(p) : "memory"); }
static inline ureg read_flags(void) { ureg f; asm volatile("pushf; pop %0" : "=r"(f)); return f; }
static inline void cli(void) { asm volatile("cli" ::: "memory"); }
static inline void sti(void) { asm volatile("sti" ::: "memory"); }

#define MSR_EFER 0xc0000080
#define EFER_SCE (1u << 0)
#define EFER_LME (1u << 8)
#define EFER_LMA (1u << 10)
#define EFER_NXE (1u << 11)
#define CR0_PE (1u << 0)
#define CR0_TS (1u << 3)
#define CR0_WP (1u << 16)
#define CR0_PG (1u << 31)
#define CR4_PSE (1u << 4)
#define CR4_PAE (1u << 5)
#define CR4_PGE (1u << 7)
#define CR4_OSFXSR (1u << 9)
#define CR4_OSXSAVE (1u << 18)
#define FLAGS_IF (1u << 9)
#define FLAGS_TF (1u << 8)

/* Exception vectors. */
enum { DE = 0, DB = 1, BP = 3, OF = 4, UD = 6, NM = 7, DF = 8, TS = 10, NP = 11,
       SS = 12, GP = 13, PF = 14 };

#endif
