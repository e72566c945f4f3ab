/*
 * multiboot_info - prints what the multiboot loader passed: the magic in
 * EAX, MBI flags, memory sizes, boot device, command line, modules (count,
 * command line, size, first bytes), the memory map and the loader name.
 * The memory sizes depend on the VM's RAM size; everything else on the
 * command line and the modules.
 */
#include "kernel.h"

struct mmap_entry {
    uint32_t size;
    uint64_t addr, len;
    uint32_t type;
} __attribute__((packed));

void kmain(void) {
    printf("multiboot_info: magic=%x\n", mb_magic);
    check(mb_magic == 0x2badb002, "magic");
    const struct mb_info *mbi = (const struct mb_info *)(uintptr_t)mb_info_addr;
    printf("multiboot_info: flags=%x\n", mbi->flags);
    if (mbi->flags & 1)
        printf("multiboot_info: mem_lower=%u mem_upper=%u\n", mbi->mem_lower, mbi->mem_upper);
    if (mbi->flags & 2)
        printf("multiboot_info: boot_device=%x\n", mbi->boot_device);
    if (mbi->flags & 4)
        printf("multiboot_info: cmdline=\"%s\"\n", (const char *)(uintptr_t)mbi->cmdline);
    if (mbi->flags & 8) {
        printf("multiboot_info: mods_count=%u\n", mbi->mods_count);
        const struct mb_module *m = (const struct mb_module *)(uintptr_t)mbi->mods_addr;
        for (uint32_t i = 0; i < mbi->mods_count; i++) {
            uint32_t size = m[i].mod_end - m[i].mod_start;
            printf("multiboot_info: mod%u cmdline=\"%s\" size=%u page_aligned=%u bytes=", i,
                   (const char *)(uintptr_t)m[i].cmdline, size, (m[i].mod_start & 0xfff) == 0);
            const uint8_t *b = (const uint8_t *)(uintptr_t)m[i].mod_start;
            for (uint32_t j = 0; j < size && j < 8; j++)
                printf("%02x", b[j]);
            printf("\n");
            check(m[i].mod_start >= 0x100000, "module above 1 MiB");
        }
    }
    if (mbi->flags & 0x40) {
        uint32_t off = 0;
        while (off < mbi->mmap_length) {
            const struct mmap_entry *e = (const void *)(uintptr_t)(mbi->mmap_addr + off);
            printf("multiboot_info: mmap %llx-%llx type %u\n", e->addr, e->addr + e->len, e->type);
            off += e->size + 4;
        }
    }
    if (mbi->flags & 0x200)
        printf("multiboot_info: loader=\"%s\"\n", (const char *)(uintptr_t)mbi->boot_loader_name);
}
