#include "kernel.h"
void kmain(void) {}
