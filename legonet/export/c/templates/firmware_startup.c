/* Minimal Cortex-M7 startup for the MPS2-AN500 memory map (see mps2_an500.ld): enable the FPU,
 * copy .data, zero .bss, open the semihosting streams, run main and exit through semihosting. */
#include <stdint.h>

extern uint32_t __StackTop, __data_load__, __data_start__, __data_end__, __bss_start__, __bss_end__,
    __arena_start__, __arena_end__;
extern int main(void);
extern void initialise_monitor_handles(void);
extern void exit(int status);

void Reset_Handler(void);
void Fault_Handler(void);

void Reset_Handler(void)
{
    uint32_t *src = &__data_load__, *dst;
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: full access to CP10/CP11, the FPU */
    __asm__ __volatile__("dsb\n\tisb");
    for (dst = &__data_start__; dst < &__data_end__;) *dst++ = *src++;
    for (dst = &__bss_start__; dst < &__bss_end__;) *dst++ = 0u;
    for (dst = &__arena_start__; dst < &__arena_end__;) *dst++ = 0u;
    initialise_monitor_handles();
    exit(main());
}

void Fault_Handler(void)
{
    exit(3); /* a fault ends the emulation with status 3 instead of hanging */
}

__attribute__((section(".isr_vector"), used)) static const void *const vectors[16] = {
    &__StackTop, (const void *)Reset_Handler, (const void *)Fault_Handler, (const void *)Fault_Handler,
    (const void *)Fault_Handler, (const void *)Fault_Handler, (const void *)Fault_Handler,
};
