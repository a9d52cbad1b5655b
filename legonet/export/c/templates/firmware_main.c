/* Cortex-M7 driver for the MPS2-AN500 board as emulated by qemu-system-arm -M mps2-an500, talking to
 * the host over semihosting (newlib's rdimon): reads raw uint8 HWC images from input.bin, writes
 * the float32 outputs of each to logits.bin and, to ticks.txt, the ticks of the board's 25 MHz
 * CMSDK timer 0 that legonet_infer took. The first line of ticks.txt is the ticks of a calibration
 * loop of 2 x LG_CALIBRATION_LOOPS instructions: under qemu -icount the timer follows the
 * instruction count, so instructions = ticks x 2 x LG_CALIBRATION_LOOPS / calibration ticks. */
#include <stdio.h>
#include <stdint.h>
#include "model.h"

#define LG_TIMER0 ((volatile uint32_t *)0x40000000u) /* CTRL, VALUE (counts down), RELOAD */
#define LG_CALIBRATION_LOOPS 1000000u

static uint8_t image[LEGONET_IN_H * LEGONET_IN_W * LEGONET_IN_C];
static float logits[LEGONET_NUM_CLASSES];

int main(void)
{
    FILE *in = fopen("input.bin", "rb"), *out = fopen("logits.bin", "wb"), *ticks = fopen("ticks.txt", "w");
    uint32_t t0, t1, loops = LG_CALIBRATION_LOOPS;
    if (!in || !out || !ticks) return 1;
    LG_TIMER0[2] = 0xffffffffu;
    LG_TIMER0[1] = 0xffffffffu;
    LG_TIMER0[0] = 1u;
    t0 = LG_TIMER0[1];
    __asm__ __volatile__("1: subs %0, %0, #1\n\tbne 1b" : "+r"(loops) : : "cc");
    t1 = LG_TIMER0[1];
    fprintf(ticks, "%lu %lu\n", (unsigned long)(t0 - t1), (unsigned long)(2u * LG_CALIBRATION_LOOPS));
    while (fread(image, 1, sizeof image, in) == sizeof image) {
        t0 = LG_TIMER0[1];
        legonet_infer(image, logits);
        t1 = LG_TIMER0[1];
        fwrite(logits, sizeof(float), LEGONET_NUM_CLASSES, out);
        fprintf(ticks, "%lu\n", (unsigned long)(t0 - t1));
    }
    fclose(in);
    fclose(out);
    fclose(ticks);
    return 0;
}
