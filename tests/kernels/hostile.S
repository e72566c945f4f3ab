/*
 * hostile.S - the assembly side of the hostile kernel (32-bit only).
 *
 * The sandbox is its own little machine: its page tables map only the page
 * of code below (.text.sandbox: sb_run and the exception stubs), the page
 * sb_sys (a copy of the GDT, an IDT of 32 interrupt gates to the stubs, the
 * sandbox's registers and page-table roots), two stack and two scratch
 * pages (sb_area) and the generated code (sb_code). Nothing the kernel
 * keeps between runs is visible from inside, so a run's outcome depends
 * only on its own code and registers.
 *
 * sb_run saves the kernel's registers, GDTR and IDTR, loads the sandbox's
 * GDT, IDT and page tables, its stack, flags and registers, and jumps to
 * sb_code. The generated code always ends in an exception; the stub switches
 * back to the kernel's page tables and calls sb_trap (hostile.c), which
 * records the state and resumes at sb_recover, which returns from sb_run.
 */
.section .text.sandbox, "ax"
.align 4096
.globl sb_text, sb_run, sb_recover
sb_text:
sb_run:
    pushfl
    pushal
    movl %esp, sb_saved_esp
    sgdt sb_kernel_gdtr
    sidt sb_kernel_idtr
    lgdt sb_gdtr
    lidt sb_idtr
    movl sb_cr3, %eax
    movl %eax, %cr3
    movl $sb_area + 8192, %esp  /* top of the two stack pages */
    pushl sb_flags
    popfl
    movl sb_regs + 0, %eax
    movl sb_regs + 4, %ecx
    movl sb_regs + 8, %edx
    movl sb_regs + 12, %ebx
    movl sb_regs + 16, %esi
    movl sb_regs + 20, %edi
    movl sb_regs + 24, %ebp
    jmp sb_code

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
    movl sb_kernel_cr3, %eax
    movl %eax, %cr3
    cld
    pushl %esp
    call sb_trap
    addl $4, %esp
    popal
    addl $8, %esp
    iret

/* In the kernel's address space again (sb_trap switched). */
sb_recover:
    lgdt sb_kernel_gdtr
    lidt sb_kernel_idtr
    movl sb_saved_esp, %esp
    popal
    popfl
    ret
.align 4096

.macro sbentry n
    .long sb_isr_\n
.endm
.section .rodata
.align 4
.globl sb_isr_table
sb_isr_table:
.altmacro
.set i, 0
.rept 32
    sbentry %i
    .set i, i + 1
.endr
.noaltmacro

/* The sandbox's system page (read-only inside the sandbox). */
.section .bss.sandbox, "aw", @nobits
.align 4096
.globl sb_sys, sb_gdt, sb_idt, sb_gdtr, sb_idtr, sb_kernel_cr3, sb_cr3, sb_flags, sb_regs
sb_sys:
sb_gdt: .space 16 * 8
sb_idt: .space 32 * 8
sb_gdtr: .space 8
sb_idtr: .space 8
sb_kernel_cr3: .space 4
sb_cr3: .space 4
sb_flags: .space 4
sb_regs: .space 7 * 4
.align 4096

.bss
.align 4
sb_saved_esp: .long 0
sb_kernel_gdtr: .space 8
sb_kernel_idtr: .space 8

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
