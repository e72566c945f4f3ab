/* isr64.S - 256 interrupt stubs for 64-bit kernels and the common entry
 * that builds a struct frame and calls trap(). Vectors that push an error
 * code (8, 10-14, 17, 21, 29, 30) skip the dummy push. */
.altmacro
.macro stub n
isr_\n:
.if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
.else
    pushq $0
.endif
    pushq $\n
    jmp isr_common
.endm
.macro entry n
    .quad isr_\n
.endm

.text
.set i, 0
.rept 256
    stub %i
    .set i, i + 1
.endr


isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rbx
    pushq %rbp
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cld
    movq %rsp, %rdi
    call trap
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rbp
    popq %rbx
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq

.data
.globl isr_table
.align 8
isr_table:
.set i, 0
.rept 256
    entry %i
    .set i, i + 1
.endr

/* ureg user_call(void (*fn)(ureg), ureg arg, ureg user_sp): runs fn(arg) in
 * 64-bit ring 3 (CS 0x2b, SS 0x23, the caller's RFLAGS) via iretq; returns
 * when the trap dispatcher calls user_return() (int 0x80 or a ring-3 fault). */
.text
.globl user_call, user_return
user_call:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, user_ctx_sp(%rip)
    andq $-16, %rdx
    subq $8, %rdx             /* as if fn had been called */
    movq $0, (%rdx)
    movl $1, user_active(%rip)
    pushq $0x23
    pushq %rdx
    pushfq
    pushq $0x2b
    pushq %rdi
    movq %rsi, %rdi
    iretq

/* ureg user_call_sysret(fn, arg, user_sp): like user_call, but enters ring 3
 * with SYSRETQ (RCX = fn, R11 = RFLAGS); needs EFER.SCE and STAR. */
.globl user_call_sysret
user_call_sysret:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, user_ctx_sp(%rip)
    andq $-16, %rdx
    subq $8, %rdx
    movq $0, (%rdx)
    movl $1, user_active(%rip)
    movq %rdi, %rcx
    movq %rsi, %rdi
    pushfq
    popq %r11
    movq %rdx, %rsp
    sysretq

user_return:
    movq %rdi, %rax
    movq user_ctx_sp(%rip), %rsp
    movl $0, user_active(%rip)
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

.bss
.globl user_active
user_active: .long 0
.align 8
user_ctx_sp: .quad 0
