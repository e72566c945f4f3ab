/*
 * common.c - serial console, printf, exit, string routines, multiboot
 * command line and the trap dispatcher, shared by all test kernels.
 * Output is polled (no interrupts) so it works before the IDT exists.
 */
#include <stdarg.h>
#include "kernel.h"

#define COM1 0x3f8

const char *kernel_name = KERNEL_NAME;
uint32_t mb_magic, mb_info_addr;
int failures;
volatile struct trap_info last_trap;
volatile ureg recover_ip;
volatile ureg probe_start;
trap_handler handlers[256];

void serial_init(void) {
    outb(COM1 + 1, 0x00);    /* no interrupts */
    outb(COM1 + 3, 0x80);    /* DLAB */
    outb(COM1 + 0, 0x01);    /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);    /* 8N1 */
    outb(COM1 + 2, 0xc7);    /* FIFO on, cleared */
    outb(COM1 + 4, 0x03);    /* DTR, RTS */
}

void putc(char c) {
    if (c == '\n')
        putc('\r');
    while (!(inb(COM1 + 5) & 0x20)) /* THRE */
        ;
    outb(COM1, (uint8_t)c);
}

void puts(const char *s) {
    while (*s)
        putc(*s++);
}

/* Divides *n by 10 with 32-bit operations only (no libgcc in 32-bit builds). */
static uint32_t divmod10(uint64_t *n) {
    uint32_t hi = (uint32_t)(*n >> 32), lo = (uint32_t)*n;
    uint32_t qhi = hi / 10, r = hi % 10;
    uint32_t qlo = 0;
    for (int i = 31; i >= 0; i--) {
        r = (r << 1) | ((lo >> i) & 1);
        qlo <<= 1;
        if (r >= 10) { r -= 10; qlo |= 1; }
    }
    *n = ((uint64_t)qhi << 32) | qlo;
    return r;
}

static void print_num(uint64_t v, int base, int width, char pad, int neg) {
    char buf[24];
    int n = 0;
    do {
        uint32_t d = base == 16 ? (uint32_t)(v & 15) : divmod10(&v);
        if (base == 16) v >>= 4;
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    } while (v);
    if (neg) buf[n++] = '-';
    while (n < width) { putc(pad); width--; }
    while (n) putc(buf[--n]);
}

static void vprintf(const char *fmt, va_list ap) {
    for (; *fmt; fmt++) {
        if (*fmt != '%') { putc(*fmt); continue; }
        fmt++;
        char pad = ' ';
        int width = 0, longs = 0;
        if (*fmt == '0') { pad = '0'; fmt++; }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') { longs++; fmt++; }
        uint64_t v = 0;
        int is_signed = *fmt == 'd';
        if (*fmt == 'd' || *fmt == 'u' || *fmt == 'x') {
            if (longs >= 2) v = va_arg(ap, uint64_t);
            else if (longs == 1) v = va_arg(ap, ureg);
            else v = va_arg(ap, uint32_t);
            if (is_signed) {
                int64_t s = longs >= 2 ? (int64_t)v : longs == 1 ? (int64_t)(long)v : (int64_t)(int32_t)v;
                print_num(s < 0 ? (uint64_t)-s : (uint64_t)s, 10, width, pad, s < 0);
            } else {
                print_num(v, *fmt == 'x' ? 16 : 10, width, pad, 0);
            }
        } else if (*fmt == 's') {
            const char *s = va_arg(ap, const char *);
            puts(s ? s : "(null)");
        } else if (*fmt == 'c') {
            putc((char)va_arg(ap, int));
        } else if (*fmt == '%') {
            putc('%');
        } else {
            putc('?');
        }
    }
}

void printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
}

void exit_code(uint32_t code) {
    outl(0xf4, code);
    for (;;)
        asm volatile("cli; hlt");
}

void fail(const char *fmt, ...) {
    va_list ap;
    printf("%s: FAIL: ", kernel_name);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putc('\n');
    exit_code(EXIT_FAIL);
}

void check(int cond, const char *what) {
    if (cond) {
        printf("%s: %s ok\n", kernel_name, what);
    } else {
        printf("%s: %s FAILED\n", kernel_name, what);
        failures++;
    }
}

void finish(void) {
    if (failures) {
        printf("%s: FAIL (%d failures)\n", kernel_name, failures);
        exit_code(EXIT_FAIL);
    }
    printf("%s: PASS\n", kernel_name);
    exit_code(EXIT_PASS);
}

void trap_reset(void) {
    last_trap.count = 0;
    last_trap.vec = last_trap.err = last_trap.ip = last_trap.cr2 = 0;
    recover_ip = 0;
}

int expect_fault(const char *what, int vec) {
    return expect_fault_at(what, vec, 0);
}

int expect_fault_at(const char *what, int vec, long offset) {
    long at = (long)(last_trap.ip - probe_start);
    int ok = last_trap.count == 1 && last_trap.vec == (ureg)vec && (offset < 0 || at == offset);
    if (last_trap.count == 0)
        printf("%s: %s: no fault FAILED\n", kernel_name, what);
    else if (offset < 0)
        printf("%s: %s: vec=%u err=%lx%s\n", kernel_name, what, (uint32_t)last_trap.vec,
               last_trap.err, ok ? "" : " FAILED");
    else
        printf("%s: %s: vec=%u err=%lx at=+%ld%s\n", kernel_name, what, (uint32_t)last_trap.vec,
               last_trap.err, at, ok ? "" : " FAILED");
    if (!ok) failures++;
    trap_reset();
    return ok;
}

int expect_no_fault(const char *what) {
    int ok = last_trap.count == 0;
    if (ok)
        printf("%s: %s ok\n", kernel_name, what);
    else
        printf("%s: %s: unexpected fault vec=%u err=%lx FAILED\n", kernel_name, what,
               (uint32_t)last_trap.vec, last_trap.err);
    if (!ok) failures++;
    trap_reset();
    return ok;
}

/* Called by the ISR stubs for every vector. */
void trap(struct frame *f) {
    if (handlers[f->vec]) {
        handlers[f->vec](f);
        return;
    }
    if ((f->cs & 3) == 3 && user_active) {
        if (f->vec == 0x80)
            user_return(
#ifdef __x86_64__
                        f->rax
#else
                        f->eax
#endif
            );
        last_trap.vec = f->vec;
        last_trap.err = f->err;
        last_trap.ip = f->ip;
        last_trap.cs = f->cs;
        last_trap.cr2 = read_cr2();
        last_trap.count++;
        user_return(USER_FAULTED);
    }
    if (recover_ip) {
        last_trap.vec = f->vec;
        last_trap.err = f->err;
        last_trap.ip = f->ip;
        last_trap.cs = f->cs;
        last_trap.cr2 = read_cr2();
        last_trap.count++;
        f->ip = recover_ip;
        recover_ip = 0;
        return;
    }
    printf("%s: unexpected trap vec=%u err=%lx ip=%lx cs=%lx cr2=%lx\n", kernel_name,
           (uint32_t)f->vec, f->err, f->ip, f->cs, read_cr2());
    exit_code(EXIT_FAIL);
}

void *memcpy(void *d, const void *s, size_t n) {
    void *r = d;
    asm volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
    return r;
}
void *memset(void *d, int c, size_t n) {
    void *r = d;
    asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}
int memcmp(const void *a, const void *b, size_t n) {
    const uint8_t *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return x[i] - y[i];
    return 0;
}
size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}
int strncmp(const char *a, const char *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i]) return (uint8_t)a[i] - (uint8_t)b[i];
        if (!a[i]) return 0;
    }
    return 0;
}
const char *strstr(const char *h, const char *n) {
    size_t l = strlen(n);
    for (; *h; h++)
        if (!strncmp(h, n, l)) return h;
    return 0;
}

uint32_t cmdline_uint(const char *key, uint32_t dflt) {
    if (mb_magic != 0x2badb002) return dflt;
    const struct mb_info *mbi = (const struct mb_info *)(uintptr_t)mb_info_addr;
    if (!(mbi->flags & 4)) return dflt;
    const char *c = (const char *)(uintptr_t)mbi->cmdline;
    size_t kl = strlen(key);
    for (const char *p = c; *p; p++) {
        if ((p == c || p[-1] == ' ') && !strncmp(p, key, kl) && p[kl] == '=') {
            p += kl + 1;
            uint32_t v = 0, base = 10;
            if (p[0] == '0' && p[1] == 'x') { base = 16; p += 2; }
            for (;; p++) {
                uint32_t d;
                if (*p >= '0' && *p <= '9') d = *p - '0';
                else if (base == 16 && *p >= 'a' && *p <= 'f') d = *p - 'a' + 10;
                else break;
                v = v * base + d;
            }
            return v;
        }
    }
    return dflt;
}

/* 8259A pair: ICW1-4 remap IRQ 0-7 to vectors 0x20-0x27 and 8-15 to 0x28-0x2f. */
void pic_remap(uint8_t master_mask, uint8_t slave_mask) {
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04); /* slave on IRQ2 */
    outb(0xa1, 0x02);
    outb(0x21, 0x01); /* 8086 mode */
    outb(0xa1, 0x01);
    outb(0x21, master_mask);
    outb(0xa1, slave_mask);
}

void pic_eoi(int irq) {
    if (irq >= 8)
        outb(0xa0, 0x20);
    outb(0x20, 0x20);
}
