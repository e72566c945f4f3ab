/*
 * smc.S - the code that smc.c patches. Written to assemble as both 32-bit
 * and 64-bit code: every routine is called without arguments (inputs come
 * through smc_arg/smc_arg2), returns in EAX and clobbers only EAX, ECX and
 * EDX (caller-saved in both ABIs) unless it saves what it uses. Absolute
 * addresses are 32-bit (the kernel lies below 2 GiB).
 */
#ifdef __x86_64__
#define R(x) %r##x
#define PTR .quad
#else
#define R(x) %e##x
#define PTR .long
#endif

.data
.align 8
.globl smc_arg, smc_arg2, smc_arg64
smc_arg:   .long 0
smc_arg2:  .long 0
smc_arg64: .quad 0
saved_sp:  PTR 0

/*
 * (a) Patches inside one straight-line block: the store and the patched
 * instruction are a few instructions apart, so a translator puts them in
 * the same translation unit.
 */
.section .text.smc_a, "ax"
.align 4096
.globl smc_same_block, smc_next_insn, smc_branch, smc_rep_movs, smc_self_inc
.globl smc_self_inc_imm, smc_loop_patch, smc_loop_imm, smc_push_patch, smc_rmw_patch
/* Writes smc_arg into the imm32 of a mov three instructions ahead. */
smc_same_block:
    movl smc_arg, %ecx
    movl %ecx, 1f+1
    nop
    nop
1:  movl $0x11111111, %eax
    ret

/* Writes smc_arg into the imm32 of the very next instruction. */
smc_next_insn:
    movl smc_arg, %ecx
    movl %ecx, 1f+1
1:  movl $0x22222222, %eax
    ret

/* Writes the low 16 bits of smc_arg over a 2-byte `jmp 2f`: eb 05 keeps the
 * jump (returns 1), 90 90 turns it into nops (returns 0xb0b0b0b1). */
smc_branch:
    movw smc_arg, %cx
    movw %cx, 1f
    xorl %eax, %eax
1:  .byte 0xeb, 0x05
    movl $0xb0b0b0b0, %eax
2:  addl $1, %eax
    ret

/* rep movsb copies smc_arg into the imm32 of the next instruction. */
smc_rep_movs:
    push R(si)
    push R(di)
    mov $smc_arg, R(si)
    mov $1f+1, R(di)
    movl $4, %ecx
    cld
    rep movsb
1:  movl $0x33333333, %eax
    pop R(di)
    pop R(si)
    ret

/* An instruction that adds its own immediate to itself: each call doubles
 * the byte it executes with; returns the byte it found. */
smc_self_inc:
    movzbl smc_self_inc_imm, %eax
    addb $1, smc_self_inc_imm
smc_self_inc_imm = . - 1
    ret

/* A loop whose body rewrites the immediate of its own first instruction:
 * imm = h each iteration, h = rol(h ^ imm, 5) + ecx. Count in smc_arg,
 * initial h in smc_arg2; returns h. */
smc_loop_patch:
    movl smc_arg, %ecx
    movl smc_arg2, %edx
1:  movl $0, %eax
smc_loop_imm = . - 4
    xorl %eax, %edx
    roll $5, %edx
    addl %ecx, %edx
    movl %edx, smc_loop_imm
    decl %ecx
    jnz 1b
    movl %edx, %eax
    ret

/* Writes the immediate of smc_push_target with a push (the stack pointer
 * moved into the code), then calls it. */
smc_push_patch:
    mov R(sp), saved_sp
#ifdef __x86_64__
    movq $smc_push_target+9, %rsp
    pushq smc_arg64             /* imm32, then c3 and filler */
#else
    movl $smc_push_target+5, %esp
    pushl smc_arg
#endif
    mov saved_sp, R(sp)
    call smc_push_target
    ret
smc_push_target:
    movl $0x44444444, %eax
    ret
    .byte 0xcc, 0xcc, 0xcc, 0xcc

/* Read-modify-write instructions on the next instruction's immediate:
 * add, xor, not, inc, bts, xchg and cmpxchg, each followed by the mov it
 * patched; returns the sum of the seven values loaded. */
smc_rmw_patch:
    push R(bx)
    xorl %edx, %edx
    movl $0x01000000, %ecx
    addl %ecx, 1f+1
1:  movl $0x10, %eax
    addl %eax, %edx
    xorl $0xff, 1f+1
1:  movl $0x20, %eax
    addl %eax, %edx
    notl 1f+1
1:  movl $0x30, %eax
    addl %eax, %edx
    incl 1f+1
1:  movl $0x40, %eax
    addl %eax, %edx
    btsl $20, 1f+1
1:  movl $0x50, %eax
    addl %eax, %edx
    movl $0x66, %ecx
    xchgl %ecx, 1f+1
1:  movl $0x60, %eax
    addl %eax, %edx
    movl $0x70, %eax
    movl $0x77, %ebx
    lock cmpxchgl %ebx, 1f+1
1:  movl $0x70, %eax
    addl %eax, %edx
    movl %edx, %eax
    pop R(bx)
    ret

/*
 * (b) A page of functions patched from C code in another page: one alone,
 * and one called from its neighbour (a direct call a translator chains).
 */
.section .text.smc_b, "ax"
.align 4096
.globl smc_b_fn, smc_b_caller, smc_b_callee, smc_b_loop
smc_b_fn:
    movl $0x55555555, %eax
    ret
    .fill 16, 1, 0xcc
smc_b_caller:
    call smc_b_callee
    addl $1, %eax
    ret
smc_b_callee:
    movl $0x66666666, %eax
    ret
    .fill 16, 1, 0xcc
/* Calls smc_b_callee smc_arg times, summing what it returns. */
smc_b_loop:
    movl smc_arg, %ecx
    xorl %edx, %edx
1:  push R(cx)
    push R(dx)
    call smc_b_callee
    pop R(dx)
    pop R(cx)
    addl %eax, %edx
    decl %ecx
    jnz 1b
    movl %edx, %eax
    ret

/*
 * (d) A loop that patches a function in its own page and calls it, once
 * per iteration: count in smc_arg, LCG state in smc_arg2; returns
 * h = rol(h, 3) ^ value over the values the function returned.
 */
.section .text.smc_d, "ax"
.align 4096
.globl smc_d_fn, smc_d_samepage
smc_d_fn:
    movl $0, %eax
    ret
    .fill 16, 1, 0xcc
smc_d_samepage:
    push R(bx)
    push R(si)
    movl smc_arg, %ecx
    movl smc_arg2, %esi
    xorl %ebx, %ebx
1:  imull $1103515245, %esi, %esi
    addl $12345, %esi
    movl %esi, 2f+1
    call 2f
    roll $3, %ebx
    xorl %eax, %ebx
    decl %ecx
    jnz 1b
    movl %ebx, %eax
    pop R(si)
    pop R(bx)
    ret
2:  movl $0, %eax
    ret

/*
 * (c) The page that smc.c maps a second time at a different linear
 * address (paging on); its functions are position-independent.
 */
.section .text.smc_c, "ax"
.align 4096
.globl smc_c_page, smc_c_fn, smc_c_caller
smc_c_page:
smc_c_fn:
    movl $0x77777777, %eax
    ret
    .fill 16, 1, 0xcc
/* Calls smc_c_fn (relative: through whichever mapping it runs in). */
smc_c_caller:
    call smc_c_fn
    addl $1, %eax
    ret
.align 4096
