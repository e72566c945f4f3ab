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
