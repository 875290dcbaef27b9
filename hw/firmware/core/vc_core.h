/*
 * Valve-controller core: link layer, commands, the pulse queue, the watchdog.
 *
 * Portable C99 with no board code: the board glue (rp2040/, host/) supplies a
 * struct vc_board with the clock, the pins, the byte sink and a lock.
 *
 * Contexts.  vc_rx() and vc_service() run in the main loop; vc_timer() runs
 * where the board's timer fires (an alarm interrupt on a microcontroller, a
 * real-time thread in the host build).  Everything the two share (pulse
 * table, output state, outbox, watchdog) is only touched between board->lock
 * and board->unlock, which on a microcontroller masks the timer interrupt.
 * vc_timer() never calls board->write: reports wait in the outbox for the
 * main loop, so no I/O ever sits between two edges.
 *
 * Rules the core enforces whatever the host sends:
 *   - an edge fires from the timer at its clock; a pulse whose start has
 *     passed is refused and reported, never fired late (a timer that runs
 *     later than late_limit ticks refuses it too);
 *   - an output is never on longer than its configured max_on;
 *   - host silence longer than the armed window turns every output off and
 *     keeps them off until the host arms again;
 *   - the pulse queue is bounded (VC_MAX_PULSES); a full queue refuses.
 */
#ifndef VC_CORE_H
#define VC_CORE_H

#include <stdint.h>

#include "vc_proto.h"

#define VC_PROTO_VERSION 1u
#define VC_MAX_OUTPUTS 8u
#define VC_MAX_PULSES 32u
#define VC_TX_WINDOW 8u  /* unacknowledged frames in flight, each way */
#define VC_OUTBOX 48u    /* reports waiting for the window */
#define VC_NEVER UINT64_MAX

/* Commands (host -> controller). */
enum {
    VC_CMD_IDENTIFY = 0x01,
    VC_CMD_GET_CLOCK = 0x02,
    VC_CMD_CONFIG_OUTPUT = 0x03,
    VC_CMD_ARM = 0x04,
    VC_CMD_HEARTBEAT = 0x05,
    VC_CMD_SCHEDULE = 0x06,
    VC_CMD_CANCEL = 0x07,
    VC_CMD_RESET = 0x08,
    VC_CMD_GET_STATS = 0x09
};

/* Reports (controller -> host). */
enum {
    VC_REP_IDENTITY = 0x81,
    VC_REP_CLOCK = 0x82,
    VC_REP_CONFIGURED = 0x83,
    VC_REP_ARMED = 0x84,
    VC_REP_FIRED = 0x85,
    VC_REP_REFUSED = 0x86,
    VC_REP_WATCHDOG = 0x87,
    VC_REP_CANCELLED = 0x88,
    VC_REP_RESET_DONE = 0x89,
    VC_REP_STATS = 0x8A,
    VC_REP_ERROR = 0x8B
};

/* REFUSED reasons. */
enum {
    VC_REFUSE_LATE = 1,         /* start clock already passed when the command arrived */
    VC_REFUSE_QUEUE_FULL = 2,
    VC_REFUSE_BAD_OUTPUT = 3,   /* no such output, or not configured */
    VC_REFUSE_BAD_DURATION = 4, /* zero, or above the output's max_on */
    VC_REFUSE_OVERLAP = 5,      /* overlaps a pulse already queued on that output */
    VC_REFUSE_DISARMED = 6,     /* not armed (never, watchdog, reset) */
    VC_REFUSE_LATE_AT_FIRE = 7, /* the timer ran more than late_limit after the start */
    VC_REFUSE_DUPLICATE = 8,    /* a pulse with this id is still queued */
    VC_REFUSE_TOO_FAR = 9       /* start more than 10 s ahead (a confused host) */
};

/* FIRED flags. */
#define VC_FIRED_CUT_MAX_ON 0x01u   /* ended early by the output's max_on */
#define VC_FIRED_CUT_WATCHDOG 0x02u /* ended early by the watchdog */

/* CONFIGURED status. */
enum { VC_CFG_OK = 0, VC_CFG_BAD_OUTPUT = 1, VC_CFG_BAD_PIN = 2, VC_CFG_BUSY = 3, VC_CFG_BAD_VALUE = 4 };

/* CANCELLED result. */
enum { VC_CANCEL_OK = 0, VC_CANCEL_UNKNOWN = 1, VC_CANCEL_ALREADY_ON = 2 };

/* ERROR codes. */
enum { VC_ERR_UNKNOWN_COMMAND = 1, VC_ERR_BAD_LENGTH = 2, VC_ERR_NO_SESSION = 3 };

/* Output config flags. */
#define VC_OUT_ACTIVE_LOW 0x01u

typedef uint64_t vc_clock_t;

/* What happened at a pin or to the controller, for boards that record it. */
enum { VC_TRACE_EDGE = 1, VC_TRACE_WATCHDOG = 2, VC_TRACE_SESSION = 3, VC_TRACE_LATE = 4 };

struct vc_trace {
    uint8_t kind;
    uint8_t pin;
    uint8_t level;          /* logical: 1 = valve open */
    vc_clock_t actual;      /* clock read right after the pin was written */
    vc_clock_t target;      /* the clock the edge was scheduled for */
};

struct vc_board {
    void *ctx;
    uint32_t freq_hz; /* nominal clock frequency, reported in IDENTITY */
    const char *name; /* up to 8 characters, reported in IDENTITY */
    vc_clock_t (*now)(void *ctx);
    /* Make pin an output at the given physical level; 0 = ok, -1 = no such pin. */
    int (*pin_config)(void *ctx, uint8_t pin, uint8_t level);
    void (*pin_write)(void *ctx, uint8_t pin, uint8_t level);
    void (*write)(void *ctx, const uint8_t *data, uint16_t n);
    void (*set_alarm)(void *ctx, vc_clock_t at); /* may be NULL: the board polls vc_next_timer() */
    void (*lock)(void *ctx);                     /* may be NULL on single-context boards */
    void (*unlock)(void *ctx);
    void (*trace)(void *ctx, const struct vc_trace *t); /* may be NULL */
};

struct vc_output {
    uint8_t configured;
    uint8_t pin;
    uint8_t active_low;
    uint8_t on;
    uint32_t max_on; /* ticks */
};

enum { VC_SLOT_FREE = 0, VC_SLOT_QUEUED = 1, VC_SLOT_ON = 2 };

struct vc_pulse {
    uint8_t state;
    uint8_t output;
    uint8_t flags;
    uint32_t id;
    vc_clock_t start;  /* scheduled on edge */
    vc_clock_t end;    /* off edge: scheduled, or earlier if max_on cuts it */
    vc_clock_t target_end;
    vc_clock_t on_at;  /* actual on edge */
};

struct vc_msg {
    uint8_t len;
    uint8_t flags;
    uint8_t data[VC_MAX_PAYLOAD];
};

struct vc_stats {
    uint32_t rx_frames, crc_errors, seq_errors, garbage, oversize, bad_messages;
    uint32_t retransmits, tx_dropped, sessions, watchdog_trips;
};

struct vc_core {
    const struct vc_board *board;
    struct vc_parser parser;
    struct vc_output out[VC_MAX_OUTPUTS];
    struct vc_pulse pulse[VC_MAX_PULSES];
    /* link: host -> controller */
    uint8_t session;     /* a SYN has been received */
    uint8_t rx_expected; /* next data sequence number from the host */
    uint8_t need_ack;
    /* link: controller -> host (go-back-N) */
    uint8_t tx_next, tx_acked;
    uint8_t tx_frame[VC_TX_WINDOW][VC_MAX_FRAME];
    uint8_t tx_len[VC_TX_WINDOW];
    vc_clock_t tx_sent_at;
    struct vc_msg outbox[VC_OUTBOX];
    uint8_t ob_head, ob_count;
    /* safety */
    uint8_t armed;
    vc_clock_t window;     /* ticks of host silence allowed while armed */
    vc_clock_t late_limit; /* ticks a start may have passed when the timer runs */
    vc_clock_t last_heard;
    vc_clock_t rto;        /* retransmit timeout, ticks */
    vc_clock_t alarm_at;   /* what the board's alarm is set to */
    struct vc_stats stats;
};

void vc_init(struct vc_core *c, const struct vc_board *board);

/* Main loop: bytes from the host. */
void vc_rx(struct vc_core *c, const uint8_t *data, uint16_t n);

/* Main loop: transmit queued reports, acknowledgements and retransmissions. */
void vc_service(struct vc_core *c);

/* Timer context: fire due edges, enforce max_on and the watchdog. */
void vc_timer(struct vc_core *c);

/* The clock at which vc_timer() next has work (VC_NEVER if none). */
vc_clock_t vc_next_timer(struct vc_core *c);

/* The clock at which vc_service() next has work (a retransmission); call it
 * with the board's lock held where the timer runs in another context. */
vc_clock_t vc_next_service(const struct vc_core *c);

/* Every output off now, pulses dropped, disarmed (shutdown, fatal error). */
void vc_all_off(struct vc_core *c);

#endif
