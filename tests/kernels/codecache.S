/*
 * codecache.S - CC_FUNCS (2048) distinct small functions for the codecache
 * kernel, each with its own constants and a conditional branch. Every
 * fourth one has a short loop, every sixteenth mixes its value into cc_data
 * with a run of 16 memory operations (large translations) and every 256th
 * with a run of 6 (another size of translation). A function takes and
 * returns its value in EAX and clobbers ECX only; codecache.c computes the
 * same arithmetic (cc_model). Also: a table of them, cc_call (calls one by
 * index) and cc_call_all (calls them all in order with direct calls).
 */
#define CC_FUNCS 2048
#ifdef __x86_64__
#define PTR .quad
#else
#define PTR .long
#endif

.altmacro

/* The constants of function i, computed outside the macro (in .altmacro
 * mode `&` inside a macro body is a concatenation operator). */
.macro ccfn n
cc_fn_\n:
.if cc_loop
    movl $cc_iters, %ecx
2:  addl $cc_add, %eax
    roll $3, %eax
    decl %ecx
    jnz 2b
.else
    addl $cc_add, %eax
.endif
.if cc_mem
    .irp k, 0, 4, 8, 12, 0, 4, 8, 12
    xorl %eax, cc_data+\k
    addl cc_data+\k, %eax
    .endr
.endif
.if cc_mem2
    .irp k, 0, 4, 8
    xorl %eax, cc_data+\k
    addl cc_data+\k, %eax
    .endr
.endif
    testl $cc_bit, %eax
    jz 1f
    xorl $cc_xor, %eax
    roll $cc_rot, %eax
    ret
1:  subl $cc_sub, %eax
    ret
.endm

.macro ccentry n
    PTR cc_fn_\n
.endm

.macro cccall n
    call cc_fn_\n
.endm

.text
.set i, 0
.rept CC_FUNCS
    .set cc_loop, (i & 3) == 3
    .set cc_mem, (i & 15) == 5
    .set cc_mem2, (i & 255) == 0x99
    .set cc_iters, (i & 7) + 1
    .set cc_add, (i * 0x9e3779b1) & 0xffffffff
    .set cc_bit, 1 << (i & 31)
    .set cc_xor, (i * 0x85ebca6b + 0x1234567) & 0xffffffff
    .set cc_rot, (i % 31) + 1
    .set cc_sub, (i * 0xc2b2ae35) & 0xffffffff
    ccfn %i
    .set i, i + 1
.endr

/* uint32_t cc_call_all(uint32_t v): v through every function in order. */
.globl cc_call_all
cc_call_all:
#ifdef __x86_64__
    movl %edi, %eax
#else
    movl 4(%esp), %eax
#endif
.set i, 0
.rept CC_FUNCS
    cccall %i
    .set i, i + 1
.endr
    ret

/* uint32_t cc_call(uint32_t index, uint32_t v): v through function index
 * (an indirect tail jump; the function returns to the caller). */
.globl cc_call
cc_call:
#ifdef __x86_64__
    movl %edi, %edi
    movl %esi, %eax
    jmp *cc_table(, %rdi, 8)
#else
    movl 4(%esp), %ecx
    movl 8(%esp), %eax
    jmp *cc_table(, %ecx, 4)
#endif

.data
.globl cc_data
cc_data: .long 0, 0, 0, 0

.section .rodata
.align 8
.globl cc_table
cc_table:
.set i, 0
.rept CC_FUNCS
    ccentry %i
    .set i, i + 1
.endr
