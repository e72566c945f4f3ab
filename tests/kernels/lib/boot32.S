/* boot32.S - multiboot v1 header and entry for 32-bit kernels. The loader
 * enters in flat 32-bit protected mode, paging off, EAX=magic, EBX=MBI. */
#define MB_MAGIC 0x1badb002
#define MB_FLAGS 0x00000003 /* page-align modules, memory info */

.section .multiboot, "a"
.align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

.text
.globl _start
_start:
    movl $stack_top, %esp
    movl %eax, mb_magic
    movl %ebx, mb_info_addr
    call kentry
1:  cli
    hlt
    jmp 1b

.bss
.align 16
.globl stack_bottom
stack_bottom:
    .space 65536
.globl stack_top
stack_top:
