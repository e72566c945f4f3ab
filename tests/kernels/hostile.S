/*
 * hostile.S - the assembly side of the hostile kernel (32-bit only).
 *
 * The sandbox is a little machine of its own at fixed addresses (physical =
 * linear, the same in the kernel's and the sandbox's page tables), so that
 * nothing it can see or print depends on how the kernel is linked:
 *
 *   SB_CODE  0x600000  the generated code (read-only in the sandbox)
 *   SB_SYS   0x601000  a GDT copy, an IDT of 32 gates to the stubs below,
 *                      the sandbox's registers, flags and CR3 (read-only)
 *   SB_TEXT  0x602000  a copy of sb_blob below: sb_run and the exception
 *                      stubs (read-only)
 *   SB_STACK 0x603000  two stack pages (ESP starts at 0x605000)
 *   SB_SCRATCH 0x605000 two scratch pages (EBP = 0x605800)
 *   SB_PRIV  0x607000  the kernel's side (not mapped in the sandbox): its
 *                      ESP, GDTR, IDTR and where sb_trap is
 *
 * sb_run (called at its copy in SB_TEXT) saves the kernel's registers,
 * GDTR and IDTR, loads the sandbox's GDT, IDT, page tables, stack, flags
 * and registers and jumps to SB_CODE. The generated code always ends in an
 * exception; the stub switches back to the kernel's page tables and calls
 * sb_trap (hostile.c), which records the state and resumes at sb_recover,
 * which returns from sb_run. The blob uses absolute addresses only for
 * these fixed pages and relative jumps only within itself.
 */
#define SB_SYS 0x601000
#define SYS_GDT (SB_SYS + 0x000)
#define SYS_IDT (SB_SYS + 0x080)
#define SYS_GDTR (SB_SYS + 0x180)
#define SYS_IDTR (SB_SYS + 0x188)
#define SYS_REGS (SB_SYS + 0x190) /* eax ecx edx ebx esi edi ebp */
#define SYS_FLAGS (SB_SYS + 0x1ac)
#define SYS_CR3 (SB_SYS + 0x1b0)
#define SYS_KERNEL_CR3 (SB_SYS + 0x1b4)
#define SYS_CODE (SB_SYS + 0x1b8)
#define SB_STACK_TOP 0x605000
#define SB_PRIV 0x607000
#define PRIV_ESP (SB_PRIV + 0x00)
#define PRIV_GDTR (SB_PRIV + 0x08)
#define PRIV_IDTR (SB_PRIV + 0x10)
#define PRIV_TRAP (SB_PRIV + 0x18)

.section .rodata
.align 16
.globl sb_blob, sb_blob_end, sb_blob_isr, sb_blob_run, sb_blob_recover
sb_blob:
sb_run:
    pushfl
    pushal
    movl %esp, PRIV_ESP
    sgdt PRIV_GDTR
    sidt PRIV_IDTR
    lgdt SYS_GDTR
    lidt SYS_IDTR
    movl SYS_CR3, %eax
    movl %eax, %cr3
    movl $SB_STACK_TOP, %esp
    pushl SYS_FLAGS
    popfl
    movl SYS_REGS + 0, %eax
    movl SYS_REGS + 4, %ecx
    movl SYS_REGS + 8, %edx
    movl SYS_REGS + 12, %ebx
    movl SYS_REGS + 16, %esi
    movl SYS_REGS + 20, %edi
    movl SYS_REGS + 24, %ebp
    jmp *SYS_CODE

/* Exception stubs: the same frame as lib/isr32.S builds (struct frame). */
.macro sbstub n
sb_isr_\n:
.if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
.else
    pushl $0
.endif
    pushl $\n
    jmp sb_isr_common
.endm
.altmacro
.set i, 0
.rept 32
    sbstub %i
    .set i, i + 1
.endr
.noaltmacro

sb_isr_common:
    pushal
    movl SYS_KERNEL_CR3, %eax
    movl %eax, %cr3
    cld
    pushl %esp
    call *PRIV_TRAP
    addl $4, %esp
    popal
    addl $8, %esp
    iret

/* In the kernel's address space again (sb_trap switched). */
sb_recover:
    lgdt PRIV_GDTR
    lidt PRIV_IDTR
    movl PRIV_ESP, %esp
    popal
    popfl
    ret
sb_blob_end:

/* Offsets into the blob: sb_run, sb_recover and the 32 stubs. */
.macro sbentry n
    .long sb_isr_\n - sb_blob
.endm
.align 4
sb_blob_run: .long sb_run - sb_blob
sb_blob_recover: .long sb_recover - sb_blob
sb_blob_isr:
.altmacro
.set i, 0
.rept 32
    sbentry %i
    .set i, i + 1
.endr
.noaltmacro

/* The rest is ordinary kernel code. */
.text
/* Returns 1; hostile.c overwrites it after it has run. */
.globl hostile_victim
.align 16
hostile_victim:
    movl $1, %eax
    ret
    .fill 26, 1, 0x90

/* Writes ud2 over an instruction ahead of it, then reaches it (#UD at
 * hostile_self_destruct_ud). hostile.c restores the bytes. */
.globl hostile_self_destruct, hostile_self_destruct_ud
.align 16
hostile_self_destruct:
    movw $0x0b0f, hostile_self_destruct_ud
    nop
hostile_self_destruct_ud:
    movl $3, %eax
    ret
