/*
 * Board glue for a Raspberry Pi RP2040 (Pico, or any RP2040 board), pico-sdk.
 *
 *   clock   the RP2040's 64-bit microsecond timer (time_us_64): 1 MHz, never wraps
 *   timer   one hardware alarm; its interrupt runs vc_timer(), which fires the
 *           due edges and sets the alarm for the next one (a target already in
 *           the past forces the interrupt at once)
 *   pins    GPIO 0..29 as push-pull outputs, driven to the inactive level
 *           before they become outputs (no glitch)
 *   link    USB CDC through the SDK's stdio_usb (CR/LF translation off: binary)
 *   lock    interrupts off (the alarm interrupt is the only other context)
 *   safety  the chip's own watchdog (100 ms) resets it if the main loop hangs;
 *           after reset every GPIO is an input with its pull-down, so the
 *           valve drivers' pull-downs (hw/WIRING.md) keep every valve closed
 *
 * Not built or run in this repository's CI (no pico-sdk, no board): see
 * hw/README.md for the build; the portable core it runs is the one the host
 * build and the tests exercise.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "hardware/gpio.h"
#include "hardware/sync.h"
#include "hardware/timer.h"
#include "hardware/watchdog.h"
#include "pico/stdio_usb.h"
#include "pico/stdlib.h"

#include "vc_core.h"

#define NUM_PINS 30u

static struct vc_core core;
static uint alarm_num;
static uint32_t saved_irq; /* one level: the core never nests its lock */

static vc_clock_t rp_now(void *ctx)
{
    (void)ctx;
    return time_us_64();
}

static int rp_pin_config(void *ctx, uint8_t pin, uint8_t level)
{
    (void)ctx;
    if (pin >= NUM_PINS)
        return -1;
    gpio_init(pin);
    gpio_put(pin, level != 0); /* the inactive level first, then output: no glitch */
    gpio_set_dir(pin, GPIO_OUT);
    return 0;
}

static void rp_pin_write(void *ctx, uint8_t pin, uint8_t level)
{
    (void)ctx;
    gpio_put(pin, level != 0);
}

static void rp_write(void *ctx, const uint8_t *data, uint16_t n)
{
    uint16_t i;
    (void)ctx;
    if (!stdio_usb_connected())
        return; /* no host: the bytes go nowhere (and must not block the loop) */
    for (i = 0; i < n; i++)
        putchar_raw(data[i]);
}

static void rp_set_alarm(void *ctx, vc_clock_t at)
{
    (void)ctx;
    if (at == VC_NEVER) {
        hardware_alarm_cancel(alarm_num);
        return;
    }
    /* true = the target has already passed: run the handler now, not never. */
    if (hardware_alarm_set_target(alarm_num, from_us_since_boot(at)))
        hardware_alarm_force_irq(alarm_num);
}

static void rp_lock(void *ctx)
{
    (void)ctx;
    saved_irq = save_and_disable_interrupts();
}

static void rp_unlock(void *ctx)
{
    (void)ctx;
    restore_interrupts(saved_irq);
}

static const struct vc_board board = {
    .ctx = NULL,
    .freq_hz = 1000000u,
    .name = "rp2040",
    .now = rp_now,
    .pin_config = rp_pin_config,
    .pin_write = rp_pin_write,
    .write = rp_write,
    .set_alarm = rp_set_alarm,
    .lock = rp_lock,
    .unlock = rp_unlock,
    .trace = NULL,
};

static void on_alarm(uint num)
{
    (void)num;
    vc_timer(&core); /* fires due edges, enforces max on-time and the host watchdog */
}

static void read_usb(void)
{
    uint8_t buf[64];
    uint16_t n = 0;
    int ch;
    while (n < sizeof(buf) && (ch = getchar_timeout_us(0)) >= 0)
        buf[n++] = (uint8_t)ch;
    if (n)
        vc_rx(&core, buf, n);
}

int main(void)
{
    stdio_init_all();
    stdio_set_translate_crlf(&stdio_usb, false);
    alarm_num = (uint)hardware_alarm_claim_unused(true);
    hardware_alarm_set_callback(alarm_num, on_alarm);
    vc_init(&core, &board);
    watchdog_enable(100, true);
    for (;;) {
        read_usb();
        vc_service(&core);
        stdio_flush();
        watchdog_update();
    }
}
