/*
 * desc.c - GDT, IDT and TSS for 32-bit and 64-bit kernels, and the C side of
 * early boot (arch_init). The GDT layout is fixed (see kernel.h) so that
 * SYSCALL/SYSRET and SYSENTER/SYSEXIT selector arithmetic works:
 * STAR[47:32]=0x08 (kernel CS, SS=0x10), STAR[63:48]=0x18 (user CS32 0x1b,
 * SS 0x23, CS64 0x2b); SYSENTER_CS=0x08 (SYSEXIT: CS 0x1b, SS 0x23).
 */
#include "kernel.h"

uint64_t gdt[GDT_ENTRIES] __attribute__((aligned(16)));

struct idt_entry {
    uint16_t off0, sel;
    uint8_t ist, type_attr;
    uint16_t off1;
#ifdef __x86_64__
    uint32_t off2, zero;
#endif
} __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(16)));

#ifdef __x86_64__
struct tss {
    uint32_t rsvd0;
    uint64_t rsp[3];
    uint64_t rsvd1;
    uint64_t ist[7];
    uint64_t rsvd2;
    uint16_t rsvd3, iomap_base;
} __attribute__((packed));
#else
struct tss {
    uint32_t link, esp0, ss0, esp1, ss1, esp2, ss2, cr3, eip, eflags;
    uint32_t eax, ecx, edx, ebx, esp, ebp, esi, edi;
    uint32_t es, cs, ss, ds, fs, gs, ldt;
    uint16_t trap, iomap_base;
} __attribute__((packed));
#endif
static struct tss tss __attribute__((aligned(16)));
static uint8_t kstack0[8192] __attribute__((aligned(16)));
uint8_t user_stack[8192] __attribute__((aligned(16)));

struct desc_ptr {
    uint16_t limit;
    ureg base;
} __attribute__((packed));

void gdt_set(int index, uint32_t base, uint32_t limit, uint8_t access, uint8_t flags) {
    gdt[index] = (uint64_t)(limit & 0xffff) | ((uint64_t)(base & 0xffffff) << 16) |
                 ((uint64_t)access << 40) | ((uint64_t)((limit >> 16) & 0xf) << 48) |
                 ((uint64_t)(flags & 0xf) << 52) | ((uint64_t)(base >> 24) << 56);
}

void idt_set(int vec, ureg handler, uint16_t sel, uint8_t type_attr) {
    struct idt_entry *e = &idt[vec];
    e->off0 = (uint16_t)handler;
    e->sel = sel;
    e->ist = 0;
    e->type_attr = type_attr;
    e->off1 = (uint16_t)(handler >> 16);
#ifdef __x86_64__
    e->off2 = (uint32_t)(handler >> 32);
    e->zero = 0;
#endif
}

void idt_set_present(int vec, int present) {
    if (present) idt[vec].type_attr |= 0x80;
    else idt[vec].type_attr &= 0x7f;
}

void idt_set_dpl(int vec, int dpl) {
    idt[vec].type_attr = (uint8_t)((idt[vec].type_attr & ~0x60) | (dpl << 5));
}

void tss_set_kernel_stack(ureg sp) {
#ifdef __x86_64__
    tss.rsp[0] = sp;
#else
    tss.esp0 = sp;
    tss.ss0 = SEL_KDATA;
#endif
}

static void gdt_load(void) {
    struct desc_ptr p = { sizeof(gdt) - 1, (ureg)(uintptr_t)gdt };
    asm volatile("lgdt %0" :: "m"(p));
#ifdef __x86_64__
    asm volatile("pushq $0x08\n\t"
                 "leaq 1f(%%rip), %%rax\n\t"
                 "pushq %%rax\n\t"
                 "lretq\n"
                 "1:\n\t"
                 "movl $0x10, %%eax\n\t"
                 "movl %%eax, %%ds\n\tmovl %%eax, %%es\n\tmovl %%eax, %%ss\n\t"
                 "xorl %%eax, %%eax\n\tmovl %%eax, %%fs\n\tmovl %%eax, %%gs\n\t"
                 ::: "rax", "memory");
#else
    asm volatile("ljmp $0x08, $1f\n"
                 "1:\n\t"
                 "movl $0x10, %%eax\n\t"
                 "movl %%eax, %%ds\n\tmovl %%eax, %%es\n\tmovl %%eax, %%ss\n\t"
                 "movl %%eax, %%fs\n\tmovl %%eax, %%gs\n\t"
                 ::: "eax", "memory");
#endif
}

void arch_init(void) {
    serial_init();
    /* access: P|DPL|S|type; flags: G|D/B|L|AVL */
    gdt[0] = 0;
#ifdef __x86_64__
    gdt_set(1, 0, 0xfffff, 0x9a, 0xa); /* 64-bit kernel code */
#else
    gdt_set(1, 0, 0xfffff, 0x9a, 0xc);
#endif
    gdt_set(2, 0, 0xfffff, 0x92, 0xc);
    gdt_set(3, 0, 0xfffff, 0xfa, 0xc); /* user code 32 */
    gdt_set(4, 0, 0xfffff, 0xf2, 0xc); /* user data */
    gdt_set(5, 0, 0xfffff, 0xfa, 0xa); /* user code 64 */
    uintptr_t tb = (uintptr_t)&tss;
    gdt_set(6, (uint32_t)tb, sizeof(tss) - 1, 0x89, 0x0);
    gdt[7] = (uint64_t)tb >> 32;       /* upper half of the 64-bit TSS descriptor */
    gdt_set(8, 0, 0xfffff, 0x9a, 0xc); /* 32-bit kernel code */
    gdt_set(9, 0, 0xffff, 0x9a, 0x0);  /* 16-bit kernel code */
    gdt_load();

    tss.iomap_base = sizeof(tss); /* no I/O bitmap: ring 3 I/O depends on IOPL only */
    tss_set_kernel_stack((ureg)(uintptr_t)(kstack0 + sizeof(kstack0)));
    asm volatile("ltr %w0" :: "r"((uint16_t)SEL_TSS));

    for (int v = 0; v < 256; v++)
        idt_set(v, isr_table[v], SEL_KCODE, 0x8e); /* present, DPL0, interrupt gate */
    idt_set_dpl(0x80, 3); /* user_exit */
    struct desc_ptr p = { sizeof(idt) - 1, (ureg)(uintptr_t)idt };
    asm volatile("lidt %0" :: "m"(p));
}

/* C entry from boot32.S / boot64.S. */
void kentry(void) {
    arch_init();
    kmain();
    finish();
}

#ifdef __x86_64__
extern uint64_t boot_pd[4 * 512];
/* Lets ring 3 reach the boot identity map (PDEs are supervisor-only by default). */
void boot_map_user(void) {
    for (int i = 0; i < 4 * 512; i++)
        boot_pd[i] |= 4;
    write_cr3(read_cr3());
}
#else
void boot_map_user(void) {} /* paging is off in 32-bit kernels until they enable it */
#endif
