/* isr32.S - 256 interrupt stubs for 32-bit kernels and the common entry
 * that builds a struct frame and calls trap(). Vectors that push an error
 * code (8, 10-14, 17, 21, 29, 30) skip the dummy push. */
.altmacro
.macro stub n
isr_\n:
.if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
.else
    pushl $0
.endif
    pushl $\n
    jmp isr_common
.endm
.macro entry n
    .long isr_\n
.endm

.text
.set i, 0
.rept 256
    stub %i
    .set i, i + 1
.endr

isr_common:
    pusha
    cld
    pushl %esp
    call trap
    addl $4, %esp
    popa
    addl $8, %esp
    iret

.data
.globl isr_table
.align 4
isr_table:
.set i, 0
.rept 256
    entry %i
    .set i, i + 1
.endr

/* ureg user_call(void (*fn)(ureg), ureg arg, ureg user_sp): runs fn(arg) in
 * ring 3 (CS 0x1b, SS/DS/ES 0x23, the caller's EFLAGS) via iret; returns
 * when the trap dispatcher calls user_return() (int 0x80 or a ring-3 fault). */
.text
.globl user_call, user_return
user_call:
    pushl %ebp
    pushl %ebx
    pushl %esi
    pushl %edi
    movl %esp, user_ctx_sp
    movl 20(%esp), %ecx       /* fn */
    movl 24(%esp), %eax       /* arg */
    movl 28(%esp), %edx       /* user stack top */
    subl $8, %edx
    movl %eax, 4(%edx)        /* fn's argument */
    movl $0, (%edx)           /* no return address: fn must int 0x80 */
    movl $1, user_active
    pushl $0x23
    pushl %edx
    pushfl
    pushl $0x1b
    pushl %ecx
    movl $0x23, %eax
    movl %eax, %ds
    movl %eax, %es
    iret

/* void user_return(ureg value): abandons the trap frame, back to user_call's caller. */
user_return:
    movl 4(%esp), %eax
    movl user_ctx_sp, %esp
    movl $0x10, %ecx
    movl %ecx, %ds
    movl %ecx, %es
    movl $0, user_active
    popl %edi
    popl %esi
    popl %ebx
    popl %ebp
    ret

.bss
.globl user_active
user_active: .long 0
user_ctx_sp: .long 0
