/* boot64.S - multiboot v1 header and entry for 64-bit kernels. The kernel is
 * a 32-bit ELF whose entry code is 32-bit: it identity-maps the first 4 GiB
 * with 2 MiB pages (PML4 and PDPT entries allow user access, the PDEs do
 * not), enables PAE, EFER.LME and paging, and far-jumps to 64-bit code. A
 * kernel may define modes_pm32_hook (32-bit code) to run before the switch. */
#define MB_MAGIC 0x1badb002
#define MB_FLAGS 0x00000003

.section .multiboot, "a"
.align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

.weak modes_pm32_hook

.text
.code32
.globl _start
_start:
    movl $stack_top, %esp
    movl %eax, mb_magic
    movl %ebx, mb_info_addr
    movl $modes_pm32_hook, %eax
    testl %eax, %eax
    jz 1f
    call *%eax
1:
    /* PD entries: 2048 x 2 MiB, present, writable, large. */
    movl $boot_pd, %edi
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, (%edi,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, 4(%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b
    /* PDPT entries 0-3 -> the four PDs. */
    xorl %ecx, %ecx
3:  movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $0x7, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb 3b
    movl $boot_pdpt, %eax
    orl $0x7, %eax
    movl %eax, boot_pml4

    movl %cr4, %eax
    orl $0x20, %eax             /* PAE */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax            /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax       /* PG | PE */
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $long64

.code64
long64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movq $stack_top, %rsp
    call kentry
4:  cli
    hlt
    jmp 4b

.section .rodata
.align 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 64-bit code */
    .quad 0x00cf92000000ffff    /* data */
boot_gdt_ptr:
    .word boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt

.bss
.align 4096
.globl boot_pml4, boot_pdpt, boot_pd
boot_pml4:
    .space 4096
boot_pdpt:
    .space 4096
boot_pd:
    .space 4 * 4096
.align 16
.globl stack_bottom
stack_bottom:
    .space 65536
.globl stack_top
stack_top:
