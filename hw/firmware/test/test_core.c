/*
 * Unit tests of the portable core on a fake board with a hand-driven clock.
 * Built and run by `make -C hw/firmware/host test` (and by tests/test_firmware.py).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vc_core.h"

static int failures;
#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);             \
            failures++;                                                        \
        }                                                                      \
    } while (0)

/* ---- fake board ----------------------------------------------------------- */

static vc_clock_t fake_clock;
static uint8_t pins[32];
static unsigned pin_highs[32];  /* how often each pin was driven high */
static uint8_t txbuf[65536];
static size_t txlen;

static vc_clock_t f_now(void *ctx) { (void)ctx; return fake_clock; }
static int f_pin_config(void *ctx, uint8_t pin, uint8_t level)
{
    (void)ctx;
    if (pin >= 30) return -1;
    pins[pin] = level;
    return 0;
}
static void f_pin_write(void *ctx, uint8_t pin, uint8_t level)
{
    (void)ctx;
    pins[pin] = level;
    if (level) pin_highs[pin]++;
}
static void f_write(void *ctx, const uint8_t *d, uint16_t n)
{
    (void)ctx;
    if (txlen + n <= sizeof(txbuf)) {
        memcpy(txbuf + txlen, d, n);
        txlen += n;
    }
}

static struct vc_board board = {NULL, 1000000u, "test", f_now, f_pin_config, f_pin_write, f_write,
                                NULL, NULL, NULL, NULL};
static struct vc_core core;

/* ---- host side helpers ---------------------------------------------------- */

static uint8_t host_seq, host_ack;
static struct vc_frame reports[256];
static unsigned n_reports;

static void collect(void *ctx, const struct vc_frame *f)
{
    (void)ctx;
    if (f->len && n_reports < 256) reports[n_reports++] = *f;
    if (f->len) host_ack = (uint8_t)(f->seq + 1u); /* in order here: nothing is lost */
}

/* Run the main loop once and parse what the controller sent. */
static void pump(void)
{
    struct vc_parser p;
    vc_service(&core);
    vc_parser_init(&p);
    n_reports = 0;
    vc_parser_feed(&p, txbuf, txlen, collect, NULL);
    txlen = 0;
}

static const struct vc_frame *find_report(uint8_t type)
{
    unsigned i;
    for (i = 0; i < n_reports; i++)
        if (reports[i].payload[0] == type) return &reports[i];
    return NULL;
}

static void send_raw(uint8_t seq, uint8_t flags, const uint8_t *payload, uint8_t len)
{
    uint8_t buf[VC_MAX_FRAME];
    size_t n = vc_frame_encode(buf, seq, host_ack, flags, payload, len);
    vc_rx(&core, buf, (uint16_t)n);
}

static void send(const uint8_t *payload, uint8_t len)
{
    send_raw(host_seq++, 0, payload, len);
}

static void start(void)
{
    uint8_t ident = VC_CMD_IDENTIFY;
    memset(pins, 0, sizeof(pins));
    memset(pin_highs, 0, sizeof(pin_highs));
    fake_clock = 1000000;
    txlen = 0;
    vc_init(&core, &board);
    host_seq = host_ack = 0;
    send_raw(host_seq++, VC_FLAG_SYN, &ident, 1);
    pump();
}

static void config(uint8_t output, uint8_t pin, uint32_t max_on)
{
    uint8_t d[8] = {VC_CMD_CONFIG_OUTPUT, 0, 0, 0, 0, 0, 0, 0};
    d[1] = output;
    d[2] = pin;
    vc_put_u32(d + 4, max_on);
    send(d, 8);
}

static void arm(uint32_t window, uint32_t late_limit)
{
    uint8_t d[9] = {VC_CMD_ARM, 0, 0, 0, 0, 0, 0, 0, 0};
    vc_put_u32(d + 1, window);
    vc_put_u32(d + 5, late_limit);
    send(d, 9);
}

static void schedule_frame(uint8_t *d, uint32_t id, uint8_t output, vc_clock_t start_at, uint32_t dur)
{
    d[0] = VC_CMD_SCHEDULE;
    vc_put_u32(d + 1, id);
    d[5] = output;
    vc_put_u64(d + 6, start_at);
    vc_put_u32(d + 14, dur);
}

static void schedule(uint32_t id, uint8_t output, vc_clock_t start_at, uint32_t dur)
{
    uint8_t d[18];
    schedule_frame(d, id, output, start_at, dur);
    send(d, 18);
}

static void ready(void)
{
    start();
    config(0, 2, 50000);
    config(1, 3, 50000);
    arm(200000, 250);
    pump();
}

static void advance(vc_clock_t to)
{
    fake_clock = to;
    vc_timer(&core);
}

static int refused_reason(void)
{
    const struct vc_frame *f = find_report(VC_REP_REFUSED);
    return f ? f->payload[6] : -1;
}

/* ---- tests ---------------------------------------------------------------- */

static void test_crc(void)
{
    const uint8_t s[] = "123456789";
    CHECK(vc_crc16(s, 9, 0xFFFF) == 0x29B1);
}

static void test_session(void)
{
    const struct vc_frame *f;
    uint8_t hb = VC_CMD_HEARTBEAT;
    vc_init(&core, &board);
    txlen = 0;
    send_raw(0, 0, &hb, 1); /* before SYN: ignored */
    pump();
    CHECK(n_reports == 0);
    start();
    f = find_report(VC_REP_IDENTITY);
    CHECK(f && (f->flags & VC_FLAG_SYN) && f->seq == 0 && f->payload[1] == VC_PROTO_VERSION);
    CHECK(f && vc_get_u32(f->payload + 5) == 1000000u);
}

static void test_pulse_fires_on_time(void)
{
    const struct vc_frame *f;
    ready();
    CHECK(find_report(VC_REP_ARMED) != NULL);
    schedule(7, 0, 1005000, 3000);
    pump();
    advance(1004999);
    CHECK(pins[2] == 0);
    advance(1005000);
    CHECK(pins[2] == 1);
    advance(1008000);
    CHECK(pins[2] == 0);
    pump();
    f = find_report(VC_REP_FIRED);
    CHECK(f && vc_get_u32(f->payload + 1) == 7);
    CHECK(f && vc_get_u64(f->payload + 7) == 1005000 && vc_get_u64(f->payload + 15) == 1008000);
}

static void test_back_to_back_pulses(void)
{
    /* The second starts exactly where the first ends; one timer run sees both. */
    ready();
    schedule(1, 0, 1010000, 1000);
    schedule(2, 0, 1011000, 1000);
    pump();
    advance(1010000);
    CHECK(pins[2] == 1);
    advance(1011000);
    CHECK(pins[2] == 1); /* off then on again: still open for pulse 2 */
    advance(1011500);
    CHECK(pins[2] == 1);
    advance(1012000);
    CHECK(pins[2] == 0);
    CHECK(pin_highs[2] == 2);
}

static void test_a_late_timer_keeps_edges_in_order(void)
{
    /* Late limit 5 ms here.  The timer runs late with pulse 1's off edge and
     * pulse 2's on edge (same output, back to back) both due: 1 must end
     * before 2 starts, or 2 would be "on" with its pin low. */
    start();
    config(0, 2, 50000);
    arm(200000, 5000);
    schedule(1, 0, 1010000, 2000);
    schedule(2, 0, 1012000, 2000);
    schedule(3, 0, 1016000, 500);
    pump();
    advance(1011500); /* pulse 1 on, 1.5 ms late: within the limit */
    CHECK(pins[2] == 1);
    advance(1012500); /* pulse 1 off, then pulse 2 on */
    CHECK(pins[2] == 1 && pin_highs[2] == 2);
    advance(1014000);
    CHECK(pins[2] == 0);
    advance(1016600); /* pulse 3's whole window has gone by: refused, not a blip */
    pump();
    CHECK(pin_highs[2] == 2 && refused_reason() == VC_REFUSE_LATE_AT_FIRE);
}

static void test_late_refused_never_fired(void)
{
    ready();
    schedule(1, 0, 1000000, 1000); /* start == now: passed */
    pump();
    CHECK(refused_reason() == VC_REFUSE_LATE);
    schedule(2, 0, 1001000, 1000);
    pump();
    advance(1001000 + 251); /* the timer runs later than late_limit */
    pump();
    CHECK(refused_reason() == VC_REFUSE_LATE_AT_FIRE);
    CHECK(pin_highs[2] == 0);
}

static void test_limits(void)
{
    int i;
    ready();
    schedule(1, 0, 1010000, 50001); /* above max_on */
    pump();
    CHECK(refused_reason() == VC_REFUSE_BAD_DURATION);
    schedule(2, 5, 1010000, 100); /* unconfigured output */
    pump();
    CHECK(refused_reason() == VC_REFUSE_BAD_OUTPUT);
    schedule(3, 0, 1010000, 1000);
    schedule(4, 0, 1010500, 1000); /* overlaps 3 */
    pump();
    CHECK(refused_reason() == VC_REFUSE_OVERLAP);
    schedule(3, 1, 1020000, 1000); /* id 3 still queued */
    pump();
    CHECK(refused_reason() == VC_REFUSE_DUPLICATE);
    schedule(5, 0, 1000000 + 11000000, 1000); /* 11 s ahead */
    pump();
    CHECK(refused_reason() == VC_REFUSE_TOO_FAR);
    for (i = 0; i < (int)VC_MAX_PULSES; i++)
        schedule((uint32_t)(100 + i), 1, (vc_clock_t)(1100000 + 2000 * i), 1000);
    pump();
    CHECK(refused_reason() == VC_REFUSE_QUEUE_FULL); /* 31 fit beside pulse 3 */
}

static void test_watchdog(void)
{
    const struct vc_frame *f;
    uint8_t hb = VC_CMD_HEARTBEAT;
    ready();
    schedule(1, 0, 1010000, 40000);
    pump();
    advance(1010000);
    CHECK(pins[2] == 1);
    advance(1000000 + 200000); /* exactly the window: still armed */
    CHECK(pins[2] == 0);        /* the pulse itself ended at 1050000 */
    schedule(2, 1, 1390000, 40000); /* on when the watchdog trips */
    pump();
    advance(1390000);
    CHECK(pins[3] == 1);
    advance(1200000 + 200001); /* silent for longer than the window since the schedule */
    CHECK(pins[3] == 0);
    pump();
    f = find_report(VC_REP_WATCHDOG);
    CHECK(f != NULL);
    f = find_report(VC_REP_FIRED);
    CHECK(f && (f->payload[6] & VC_FIRED_CUT_WATCHDOG));
    schedule(3, 0, 1500000, 1000);
    pump();
    CHECK(refused_reason() == VC_REFUSE_DISARMED); /* off until the host re-arms */
    send(&hb, 1);
    arm(200000, 250);
    schedule(4, 0, 1500000, 1000);
    pump();
    CHECK(refused_reason() == -1);
}

/* The timer wakes late, past the host's silence window, with a pulse due just
 * inside the late limit: the watchdog trips first, the valve never opens. */
static void test_a_late_timer_past_the_window_never_opens(void)
{
    unsigned highs;
    ready();
    schedule(1, 0, 1000000 + 200000 + 100, 40000); /* starts 100 ticks after the window closes */
    pump();
    highs = pin_highs[2];
    advance(1000000 + 200000 + 100 + 200); /* 200 ticks late: within the late limit of 250 */
    CHECK(pin_highs[2] == highs);
    CHECK(pins[2] == 0);
    pump();
    CHECK(find_report(VC_REP_WATCHDOG) != NULL);
    CHECK(refused_reason() == VC_REFUSE_DISARMED);
}

static void test_replay_and_bad_length(void)
{
    uint8_t d[18];
    uint8_t frame[VC_MAX_FRAME];
    size_t n;
    ready();
    schedule_frame(d, 9, 1, 1020000, 1000);
    n = vc_frame_encode(frame, host_seq, 0, 0, d, 18);
    host_seq++;
    vc_rx(&core, frame, (uint16_t)n);
    vc_rx(&core, frame, (uint16_t)n); /* replayed: same seq */
    pump();
    advance(1020000);
    advance(1021000);
    CHECK(pin_highs[3] == 1);
    schedule_frame(d, 10, 1, 1030000, 1000);
    send(d, 17); /* wrong length */
    pump();
    CHECK(find_report(VC_REP_ERROR) != NULL);
    send_raw((uint8_t)(host_seq + 5), 0, d, 18); /* out of order */
    pump();
    advance(1030000);
    advance(1031000);
    CHECK(pin_highs[3] == 1);
    CHECK(core.stats.seq_errors >= 2);
}

static void test_retransmit(void)
{
    uint8_t gc[5] = {VC_CMD_GET_CLOCK, 1, 2, 3, 4};
    ready();
    send(gc, 5);
    pump();
    CHECK(find_report(VC_REP_CLOCK) != NULL);
    fake_clock += core.rto; /* never acknowledged */
    pump();
    CHECK(find_report(VC_REP_CLOCK) != NULL); /* sent again */
    CHECK(core.stats.retransmits >= 1);
}

static void test_full_window_is_not_busy(void)
{
    /* The host went away: 8 reports unacknowledged, more queued.  Nothing is
     * sendable until the retransmit timer, so the board must not be told "now". */
    int i;
    uint8_t gc[5] = {VC_CMD_GET_CLOCK, 0, 0, 0, 0};
    ready(); /* from here on, nothing is parsed: host_ack stays where it is */
    for (i = 0; i < 12; i++) {
        send_raw(host_seq++, 0, gc, 5);
        vc_service(&core);
    }
    txlen = 0;
    CHECK(core.ob_count > 0);
    CHECK(vc_next_service(&core) == core.tx_sent_at + core.rto);
}

static void test_fuzz_never_actuates(void)
{
    unsigned i, j;
    uint8_t buf[256];
    uint8_t d[18];
    size_t n;
    ready();
    srand(12345);
    for (i = 0; i < 20000; i++) {
        size_t len = (size_t)(rand() % 200);
        for (j = 0; j < len; j++)
            buf[j] = (uint8_t)(rand() % 4 ? (unsigned)rand() : VC_SOF);
        vc_rx(&core, buf, (uint16_t)len);
        /* a schedule frame for output 1 with a flipped bit anywhere */
        schedule_frame(d, 1000 + i, 1, fake_clock + 2000, 1000);
        n = vc_frame_encode(buf, host_seq, 0, 0, d, 18);
        buf[(size_t)rand() % n] ^= (uint8_t)(1u << (rand() % 8));
        vc_rx(&core, buf, (uint16_t)n);
        advance(fake_clock + 50);
        if (i % 64 == 0) {
            uint8_t hb = VC_CMD_HEARTBEAT;
            send(&hb, 1); /* keep the watchdog fed, so outputs could fire */
            pump();
        }
    }
    CHECK(pin_highs[3] == 0);
    CHECK(core.parser.crc_errors > 1000);
}

int main(void)
{
    test_crc();
    test_session();
    test_pulse_fires_on_time();
    test_back_to_back_pulses();
    test_a_late_timer_keeps_edges_in_order();
    test_late_refused_never_fired();
    test_limits();
    test_watchdog();
    test_a_late_timer_past_the_window_never_opens();
    test_replay_and_bad_length();
    test_retransmit();
    test_full_window_is_not_busy();
    test_fuzz_never_actuates();
    if (failures) {
        printf("%d check(s) failed\n", failures);
        return 1;
    }
    printf("core tests passed\n");
    return 0;
}
