/* modes.S - the parts of the `modes` kernel that must be hand-written:
 * a print from 32-bit protected mode before the long-mode switch (run by
 * boot64.S through modes_pm32_hook) and a routine in a 32-bit code segment
 * called from 64-bit code through a far call (compatibility mode). */

.text
.code32
/* Prints pm32_msg on COM1 (polled), still in 32-bit protected mode with
 * paging off; also records CR0 for the C side to report. */
.globl modes_pm32_hook
modes_pm32_hook:
    movl %cr0, %eax
    movl %eax, pm32_cr0
    movl $pm32_msg, %esi
1:  movb (%esi), %cl
    testb %cl, %cl
    jz 3f
2:  movw $0x3fd, %dx
    inb %dx, %al
    testb $0x20, %al
    jz 2b
    movw $0x3f8, %dx
    movb %cl, %al
    outb %al, %dx
    incl %esi
    jmp 1b
3:  ret

/* Entered by `lcall *` from 64-bit code with CS = a 32-bit code segment:
 * runs in compatibility mode. Returns in EAX the operand size seen by a
 * push (4 in 32-bit code) times 0x100 plus 0x32, and ends with a 32-bit far
 * return (lret pops a 32-bit EIP and CS). */
.globl compat_entry
compat_entry:
    movl %esp, %ecx
    pushl $0
    subl %esp, %ecx       /* bytes pushed: 4 in a 32-bit segment */
    popl %eax
    movl %ecx, %eax
    shll $8, %eax
    orl $0x32, %eax
    lret

.section .rodata
pm32_msg:
    .asciz "modes: 32-bit protected mode, paging off\r\n"

.bss
.globl pm32_cr0
pm32_cr0:
    .long 0
