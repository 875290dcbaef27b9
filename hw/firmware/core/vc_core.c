/* Valve-controller core: see vc_core.h for the contexts and the rules. */
#include "vc_core.h"

#include <string.h>

#define HORIZON_S 10u /* pulses further ahead than this are refused (a confused host) */

/* ---- board access --------------------------------------------------------- */

static void lock(struct vc_core *c)
{
    if (c->board->lock)
        c->board->lock(c->board->ctx);
}

static void unlock(struct vc_core *c)
{
    if (c->board->unlock)
        c->board->unlock(c->board->ctx);
}

static vc_clock_t now(const struct vc_core *c)
{
    return c->board->now(c->board->ctx);
}

static void trace(struct vc_core *c, uint8_t kind, uint8_t pin, uint8_t level, vc_clock_t actual,
                  vc_clock_t target)
{
    struct vc_trace t;
    if (!c->board->trace)
        return;
    t.kind = kind;
    t.pin = pin;
    t.level = level;
    t.actual = actual;
    t.target = target;
    c->board->trace(c->board->ctx, &t);
}

/* ---- outbox (lock held) --------------------------------------------------- */

static void push_msg(struct vc_core *c, uint8_t flags, const uint8_t *data, uint8_t len)
{
    struct vc_msg *m;
    if (c->ob_count == VC_OUTBOX) {
        c->stats.tx_dropped++;
        return;
    }
    m = &c->outbox[(c->ob_head + c->ob_count) % VC_OUTBOX];
    m->flags = flags;
    m->len = len;
    memcpy(m->data, data, len);
    c->ob_count++;
}

static void report_refused(struct vc_core *c, uint32_t id, uint8_t output, uint8_t reason, vc_clock_t t)
{
    uint8_t d[15];
    d[0] = VC_REP_REFUSED;
    vc_put_u32(d + 1, id);
    d[5] = output;
    d[6] = reason;
    vc_put_u64(d + 7, t);
    push_msg(c, 0, d, sizeof(d));
}

static void report_fired(struct vc_core *c, const struct vc_pulse *p, vc_clock_t off_at)
{
    uint8_t d[23];
    d[0] = VC_REP_FIRED;
    vc_put_u32(d + 1, p->id);
    d[5] = p->output;
    d[6] = p->flags;
    vc_put_u64(d + 7, p->on_at);
    vc_put_u64(d + 15, off_at);
    push_msg(c, 0, d, sizeof(d));
}

static void report_error(struct vc_core *c, uint8_t code, uint8_t cmd)
{
    uint8_t d[3];
    d[0] = VC_REP_ERROR;
    d[1] = code;
    d[2] = cmd;
    c->stats.bad_messages++;
    push_msg(c, 0, d, sizeof(d));
}

/* ---- outputs and the timer (lock held) ------------------------------------ */

/* Set an output's logical state; returns the clock read right after the pin
 * was written: the actual edge, never the scheduled one. */
static vc_clock_t drive(struct vc_core *c, uint8_t output, uint8_t on, vc_clock_t target)
{
    struct vc_output *o = &c->out[output];
    vc_clock_t stamp;
    c->board->pin_write(c->board->ctx, o->pin, (uint8_t)(on ^ o->active_low));
    stamp = now(c);
    if (o->on != on)
        trace(c, VC_TRACE_EDGE, o->pin, on, stamp, target);
    o->on = on;
    return stamp;
}

static vc_clock_t next_timer_locked(const struct vc_core *c)
{
    vc_clock_t next = VC_NEVER;
    unsigned i;
    for (i = 0; i < VC_MAX_PULSES; i++) {
        const struct vc_pulse *p = &c->pulse[i];
        if (p->state == VC_SLOT_QUEUED && p->start < next)
            next = p->start;
        if (p->state == VC_SLOT_ON && p->end < next)
            next = p->end;
    }
    if (c->armed && c->last_heard + c->window + 1u < next)
        next = c->last_heard + c->window + 1u;
    return next;
}

static void rearm_alarm(struct vc_core *c)
{
    vc_clock_t next = next_timer_locked(c);
    if (c->board->set_alarm && next != c->alarm_at)
        c->board->set_alarm(c->board->ctx, next);
    c->alarm_at = next;
}

static void fire_on(struct vc_core *c, struct vc_pulse *p)
{
    vc_clock_t cutoff;
    p->on_at = drive(c, p->output, 1, p->start);
    p->state = VC_SLOT_ON;
    cutoff = p->on_at + c->out[p->output].max_on;
    if (cutoff < p->end) {
        p->end = cutoff;
        p->flags |= VC_FIRED_CUT_MAX_ON;
    }
}

static void fire_off(struct vc_core *c, struct vc_pulse *p, uint8_t flags)
{
    vc_clock_t off_at = drive(c, p->output, 0, p->target_end);
    p->flags |= flags;
    report_fired(c, p, off_at);
    p->state = VC_SLOT_FREE;
}

/* Every output off, every pulse dropped.  With report set, each pulse gets
 * its final report (the host may still be listening: the watchdog). */
static void drop_everything(struct vc_core *c, int report)
{
    unsigned i;
    vc_clock_t t = now(c);
    for (i = 0; i < VC_MAX_PULSES; i++) {
        struct vc_pulse *p = &c->pulse[i];
        if (p->state == VC_SLOT_ON && report)
            fire_off(c, p, VC_FIRED_CUT_WATCHDOG);
        else if (p->state == VC_SLOT_QUEUED && report)
            report_refused(c, p->id, p->output, VC_REFUSE_DISARMED, t);
        p->state = VC_SLOT_FREE;
    }
    for (i = 0; i < VC_MAX_OUTPUTS; i++)
        if (c->out[i].configured)
            drive(c, (uint8_t)i, 0, t);
    c->armed = 0;
}

static void trip_watchdog(struct vc_core *c, vc_clock_t t)
{
    uint8_t d[18];
    uint8_t mask = 0;
    unsigned i;
    for (i = 0; i < VC_MAX_OUTPUTS; i++)
        if (c->out[i].on)
            mask |= (uint8_t)(1u << i);
    drop_everything(c, 1);
    c->stats.watchdog_trips++;
    trace(c, VC_TRACE_WATCHDOG, 0, 0, now(c), c->last_heard + c->window);
    d[0] = VC_REP_WATCHDOG;
    vc_put_u64(d + 1, t);
    vc_put_u64(d + 9, c->last_heard);
    d[17] = mask;
    push_msg(c, 0, d, sizeof(d));
}

/* The earliest due edge (an on edge of a queued pulse or an off edge of an
 * active one) at clock t, or NULL.  Edges run strictly in time order: a timer
 * that runs late with several edges due must still end one pulse before the
 * next on the same output starts. */
static struct vc_pulse *earliest_due(struct vc_core *c, vc_clock_t t)
{
    struct vc_pulse *best = NULL;
    vc_clock_t best_at = 0;
    unsigned i;
    for (i = 0; i < VC_MAX_PULSES; i++) {
        struct vc_pulse *p = &c->pulse[i];
        vc_clock_t at;
        if (p->state == VC_SLOT_QUEUED)
            at = p->start;
        else if (p->state == VC_SLOT_ON)
            at = p->end;
        else
            continue;
        /* at equal clocks an off edge goes first (pulses never overlap) */
        if (at <= t && (!best || at < best_at || (at == best_at && p->state == VC_SLOT_ON))) {
            best = p;
            best_at = at;
        }
    }
    return best;
}

static void start_or_refuse(struct vc_core *c, struct vc_pulse *p, vc_clock_t t)
{
    if (t - p->start > c->late_limit || p->end <= t) {
        /* Never fire late: a late jet hits the wrong stone (or none, if its
         * whole window has gone by). */
        trace(c, VC_TRACE_LATE, c->out[p->output].pin, 1, t, p->start);
        report_refused(c, p->id, p->output, VC_REFUSE_LATE_AT_FIRE, t);
        p->state = VC_SLOT_FREE;
    } else {
        fire_on(c, p);
    }
}

static int watchdog_due(const struct vc_core *c, vc_clock_t t)
{
    return c->armed && t - c->last_heard > c->window;
}

void vc_timer(struct vc_core *c)
{
    struct vc_pulse *p;
    vc_clock_t t;
    lock(c);
    t = now(c);
    /* The watchdog before any edge: a timer that wakes late, past the host's
     * silence window, must not start a pulse first (the trip drops them all). */
    while (!watchdog_due(c, t) && (p = earliest_due(c, t)) != NULL) {
        if (p->state == VC_SLOT_ON)
            fire_off(c, p, 0);
        else
            start_or_refuse(c, p, t);
        t = now(c);
    }
    if (watchdog_due(c, t))
        trip_watchdog(c, t);
    rearm_alarm(c);
    unlock(c);
}

vc_clock_t vc_next_timer(struct vc_core *c)
{
    vc_clock_t next;
    lock(c);
    next = next_timer_locked(c);
    unlock(c);
    return next;
}

void vc_all_off(struct vc_core *c)
{
    lock(c);
    drop_everything(c, 0);
    rearm_alarm(c);
    unlock(c);
}

/* ---- commands (lock held) ------------------------------------------------- */

static struct vc_pulse *find_pulse(struct vc_core *c, uint32_t id)
{
    unsigned i;
    for (i = 0; i < VC_MAX_PULSES; i++)
        if (c->pulse[i].state != VC_SLOT_FREE && c->pulse[i].id == id)
            return &c->pulse[i];
    return NULL;
}

static int overlaps(const struct vc_core *c, uint8_t output, vc_clock_t start, vc_clock_t end)
{
    unsigned i;
    for (i = 0; i < VC_MAX_PULSES; i++) {
        const struct vc_pulse *p = &c->pulse[i];
        if (p->state != VC_SLOT_FREE && p->output == output && start < p->end && p->start < end)
            return 1;
    }
    return 0;
}

static struct vc_pulse *free_slot(struct vc_core *c)
{
    unsigned i;
    for (i = 0; i < VC_MAX_PULSES; i++)
        if (c->pulse[i].state == VC_SLOT_FREE)
            return &c->pulse[i];
    return NULL;
}

static uint8_t check_schedule(struct vc_core *c, uint32_t id, uint8_t output, vc_clock_t start, uint32_t dur,
                              vc_clock_t t)
{
    if (!c->armed)
        return VC_REFUSE_DISARMED;
    if (output >= VC_MAX_OUTPUTS || !c->out[output].configured)
        return VC_REFUSE_BAD_OUTPUT;
    if (dur == 0 || dur > c->out[output].max_on || start > VC_NEVER - dur)
        return VC_REFUSE_BAD_DURATION;
    if (start <= t)
        return VC_REFUSE_LATE;
    if (start - t > (vc_clock_t)c->board->freq_hz * HORIZON_S)
        return VC_REFUSE_TOO_FAR;
    if (find_pulse(c, id))
        return VC_REFUSE_DUPLICATE;
    if (overlaps(c, output, start, start + dur))
        return VC_REFUSE_OVERLAP;
    if (!free_slot(c))
        return VC_REFUSE_QUEUE_FULL;
    return 0;
}

static void cmd_schedule(struct vc_core *c, const uint8_t *d)
{
    uint32_t id = vc_get_u32(d + 1);
    uint8_t output = d[5];
    vc_clock_t start = vc_get_u64(d + 6);
    uint32_t dur = vc_get_u32(d + 14);
    vc_clock_t t = now(c);
    uint8_t reason = check_schedule(c, id, output, start, dur, t);
    struct vc_pulse *p;
    if (reason) {
        report_refused(c, id, output, reason, t);
        return;
    }
    p = free_slot(c);
    p->state = VC_SLOT_QUEUED;
    p->output = output;
    p->flags = 0;
    p->id = id;
    p->start = start;
    p->end = p->target_end = start + dur;
    p->on_at = 0;
    rearm_alarm(c);
}

static void cmd_cancel(struct vc_core *c, const uint8_t *d)
{
    uint8_t r[6];
    uint32_t id = vc_get_u32(d + 1);
    struct vc_pulse *p = find_pulse(c, id);
    r[0] = VC_REP_CANCELLED;
    vc_put_u32(r + 1, id);
    if (!p) {
        r[5] = VC_CANCEL_UNKNOWN;
    } else if (p->state == VC_SLOT_ON) {
        r[5] = VC_CANCEL_ALREADY_ON;
    } else {
        p->state = VC_SLOT_FREE;
        r[5] = VC_CANCEL_OK;
        rearm_alarm(c);
    }
    push_msg(c, 0, r, sizeof(r));
}

static vc_clock_t clamp(vc_clock_t v, vc_clock_t lo, vc_clock_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

static void cmd_arm(struct vc_core *c, const uint8_t *d)
{
    uint8_t r[17];
    vc_clock_t f = c->board->freq_hz;
    c->window = clamp(vc_get_u32(d + 1), f / 1000u, f * 60u);
    c->late_limit = clamp(vc_get_u32(d + 5), 0, c->window);
    c->armed = 1;
    c->last_heard = now(c);
    rearm_alarm(c);
    r[0] = VC_REP_ARMED;
    vc_put_u32(r + 1, (uint32_t)c->window);
    vc_put_u32(r + 5, (uint32_t)c->late_limit);
    vc_put_u64(r + 9, c->last_heard);
    push_msg(c, 0, r, sizeof(r));
}

static uint8_t check_config(const struct vc_core *c, uint8_t output, uint8_t pin, uint32_t max_on)
{
    unsigned i;
    if (c->armed)
        return VC_CFG_BUSY; /* never re-wire a live output */
    if (output >= VC_MAX_OUTPUTS)
        return VC_CFG_BAD_OUTPUT;
    if (max_on == 0)
        return VC_CFG_BAD_VALUE;
    for (i = 0; i < VC_MAX_OUTPUTS; i++)
        if (i != output && c->out[i].configured && c->out[i].pin == pin)
            return VC_CFG_BAD_PIN;
    return VC_CFG_OK;
}

static void cmd_config_output(struct vc_core *c, const uint8_t *d)
{
    uint8_t r[3];
    uint8_t output = d[1], pin = d[2], active_low = (uint8_t)(d[3] & VC_OUT_ACTIVE_LOW);
    uint32_t max_on = vc_get_u32(d + 4);
    uint8_t status = check_config(c, output, pin, max_on);
    if (status == VC_CFG_OK && c->board->pin_config(c->board->ctx, pin, active_low) != 0)
        status = VC_CFG_BAD_PIN;
    if (status == VC_CFG_OK) {
        c->out[output].configured = 1;
        c->out[output].pin = pin;
        c->out[output].active_low = active_low;
        c->out[output].on = 0;
        c->out[output].max_on = max_on;
    }
    r[0] = VC_REP_CONFIGURED;
    r[1] = output;
    r[2] = status;
    push_msg(c, 0, r, sizeof(r));
}

static void cmd_identify(struct vc_core *c, uint8_t flags)
{
    uint8_t r[17];
    const char *name = c->board->name ? c->board->name : "";
    unsigned i;
    r[0] = VC_REP_IDENTITY;
    r[1] = VC_PROTO_VERSION;
    r[2] = VC_MAX_OUTPUTS;
    r[3] = VC_MAX_PULSES;
    r[4] = VC_TX_WINDOW;
    vc_put_u32(r + 5, c->board->freq_hz);
    for (i = 0; i < 8u; i++) {
        r[9 + i] = (uint8_t)*name;
        if (*name)
            name++;
    }
    push_msg(c, flags, r, sizeof(r));
}

static void cmd_get_clock(struct vc_core *c, const uint8_t *d)
{
    uint8_t r[13];
    r[0] = VC_REP_CLOCK;
    memcpy(r + 1, d + 1, 4); /* the host's token */
    vc_put_u64(r + 5, now(c));
    push_msg(c, 0, r, sizeof(r));
}

static void cmd_reset(struct vc_core *c)
{
    uint8_t r[9];
    drop_everything(c, 0);
    rearm_alarm(c);
    r[0] = VC_REP_RESET_DONE;
    vc_put_u64(r + 1, now(c));
    push_msg(c, 0, r, sizeof(r));
}

static void cmd_get_stats(struct vc_core *c)
{
    uint8_t r[41];
    uint32_t v[10];
    unsigned i;
    v[0] = c->parser.frames;
    v[1] = c->parser.crc_errors;
    v[2] = c->stats.seq_errors;
    v[3] = c->parser.garbage;
    v[4] = c->parser.oversize;
    v[5] = c->stats.bad_messages;
    v[6] = c->stats.retransmits;
    v[7] = c->stats.tx_dropped;
    v[8] = c->stats.sessions;
    v[9] = c->stats.watchdog_trips;
    r[0] = VC_REP_STATS;
    for (i = 0; i < 10u; i++)
        vc_put_u32(r + 1 + 4 * i, v[i]);
    push_msg(c, 0, r, sizeof(r));
}

/* Exact payload length of each command (0 = unknown command). */
static uint8_t command_length(uint8_t type)
{
    switch (type) {
    case VC_CMD_IDENTIFY: return 1;
    case VC_CMD_GET_CLOCK: return 5;
    case VC_CMD_CONFIG_OUTPUT: return 8;
    case VC_CMD_ARM: return 9;
    case VC_CMD_HEARTBEAT: return 1;
    case VC_CMD_SCHEDULE: return 18;
    case VC_CMD_CANCEL: return 5;
    case VC_CMD_RESET: return 1;
    case VC_CMD_GET_STATS: return 1;
    default: return 0;
    }
}

static void dispatch(struct vc_core *c, const uint8_t *d, uint8_t len)
{
    uint8_t want = command_length(d[0]);
    if (want == 0) {
        report_error(c, VC_ERR_UNKNOWN_COMMAND, d[0]);
        return;
    }
    if (len != want) {
        report_error(c, VC_ERR_BAD_LENGTH, d[0]); /* never act on a malformed command */
        return;
    }
    switch (d[0]) {
    case VC_CMD_IDENTIFY: cmd_identify(c, 0); break;
    case VC_CMD_GET_CLOCK: cmd_get_clock(c, d); break;
    case VC_CMD_CONFIG_OUTPUT: cmd_config_output(c, d); break;
    case VC_CMD_ARM: cmd_arm(c, d); break;
    case VC_CMD_HEARTBEAT: break; /* the frame itself fed the watchdog */
    case VC_CMD_SCHEDULE: cmd_schedule(c, d); break;
    case VC_CMD_CANCEL: cmd_cancel(c, d); break;
    case VC_CMD_RESET: cmd_reset(c); break;
    case VC_CMD_GET_STATS: cmd_get_stats(c); break;
    default: break;
    }
}

/* ---- link layer (lock held) ----------------------------------------------- */

static void heard(struct vc_core *c)
{
    c->last_heard = now(c);
    if (c->armed)
        rearm_alarm(c);
}

/* A cumulative ack from the host: frees our frames it has received. */
static void take_ack(struct vc_core *c, uint8_t ack)
{
    uint8_t in_flight = (uint8_t)(c->tx_next - c->tx_acked);
    uint8_t acked = (uint8_t)(ack - c->tx_acked);
    if (acked == 0 || acked > in_flight)
        return; /* nothing new, or not an ack of anything we sent */
    c->tx_acked = ack;
    c->tx_sent_at = now(c);
}

/* SYN: the host (re)starts the link.  Everything from an earlier session is
 * void: outputs off, pulses dropped, disarmed, sequence numbers restart. */
static void start_session(struct vc_core *c, const struct vc_frame *f)
{
    if (f->len != 1 || f->payload[0] != VC_CMD_IDENTIFY) {
        c->stats.bad_messages++;
        return;
    }
    drop_everything(c, 0);
    rearm_alarm(c);
    c->ob_count = 0;
    c->ob_head = 0;
    c->tx_next = c->tx_acked = 0;
    c->session = 1;
    c->rx_expected = (uint8_t)(f->seq + 1u);
    c->need_ack = 1;
    c->stats.sessions++;
    heard(c);
    trace(c, VC_TRACE_SESSION, 0, 0, now(c), 0);
    cmd_identify(c, VC_FLAG_SYN);
}

static void on_frame(void *ctx, const struct vc_frame *f)
{
    struct vc_core *c = (struct vc_core *)ctx;
    lock(c);
    if (f->flags & VC_FLAG_SYN) {
        start_session(c, f);
    } else if (!c->session) {
        c->stats.seq_errors++; /* nothing counts before the host's SYN */
    } else {
        take_ack(c, f->ack);
        if (f->len == 0) {
            heard(c); /* a pure acknowledgement: the host is alive */
        } else if (f->seq != c->rx_expected) {
            /* Replayed, duplicated or out of order: never acted on; our ack
             * tells the host where we are. */
            c->stats.seq_errors++;
            c->need_ack = 1;
        } else {
            c->rx_expected++;
            c->need_ack = 1;
            heard(c);
            dispatch(c, f->payload, f->len);
        }
    }
    unlock(c);
}

void vc_rx(struct vc_core *c, const uint8_t *data, uint16_t n)
{
    /* The parser belongs to the main loop alone; frames are handled under the lock. */
    vc_parser_feed(&c->parser, data, n, on_frame, c);
}

/* ---- transmit (main loop) ------------------------------------------------- */

/* Frame the oldest queued report if the window allows; returns its length. */
static size_t next_data_frame(struct vc_core *c, uint8_t *buf, vc_clock_t t)
{
    const struct vc_msg *m;
    uint8_t slot;
    size_t n;
    if (c->ob_count == 0 || (uint8_t)(c->tx_next - c->tx_acked) >= VC_TX_WINDOW)
        return 0;
    m = &c->outbox[c->ob_head];
    slot = (uint8_t)(c->tx_next % VC_TX_WINDOW);
    n = vc_frame_encode(c->tx_frame[slot], c->tx_next, c->rx_expected, m->flags, m->data, m->len);
    c->tx_len[slot] = (uint8_t)n;
    if (c->tx_next == c->tx_acked)
        c->tx_sent_at = t;
    c->tx_next++;
    c->ob_head = (uint8_t)((c->ob_head + 1u) % VC_OUTBOX);
    c->ob_count--;
    c->need_ack = 0; /* the frame carries our ack */
    memcpy(buf, c->tx_frame[slot], n);
    return n;
}

static void retransmit(struct vc_core *c, vc_clock_t t)
{
    uint8_t buf[VC_MAX_FRAME];
    uint8_t seq, last;
    size_t n;
    lock(c);
    if (c->tx_next == c->tx_acked || t - c->tx_sent_at < c->rto) {
        unlock(c);
        return;
    }
    c->tx_sent_at = t;
    c->stats.retransmits++;
    seq = c->tx_acked;
    last = c->tx_next;
    unlock(c);
    for (; seq != last; seq++) {
        lock(c);
        n = 0;
        if ((uint8_t)(seq - c->tx_acked) < (uint8_t)(c->tx_next - c->tx_acked)) {
            n = c->tx_len[seq % VC_TX_WINDOW];
            memcpy(buf, c->tx_frame[seq % VC_TX_WINDOW], n);
        }
        unlock(c);
        if (n)
            c->board->write(c->board->ctx, buf, (uint16_t)n);
    }
}

void vc_service(struct vc_core *c)
{
    uint8_t buf[VC_MAX_FRAME];
    size_t n;
    vc_clock_t t = now(c);
    for (;;) {
        lock(c);
        n = next_data_frame(c, buf, t);
        unlock(c);
        if (!n)
            break;
        c->board->write(c->board->ctx, buf, (uint16_t)n);
    }
    lock(c);
    n = 0;
    if (c->need_ack) {
        n = vc_frame_encode(buf, c->tx_next, c->rx_expected, 0, NULL, 0);
        c->need_ack = 0;
    }
    unlock(c);
    if (n)
        c->board->write(c->board->ctx, buf, (uint16_t)n);
    retransmit(c, t);
}

vc_clock_t vc_next_service(const struct vc_core *c)
{
    /* Reports wait for room in the window: only a free slot makes them due now
     * (a gone host never acknowledges; the retransmit timer is what is next). */
    int window_open = (uint8_t)(c->tx_next - c->tx_acked) < VC_TX_WINDOW;
    if (c->need_ack || (c->ob_count && window_open))
        return 0;
    if (c->tx_next == c->tx_acked)
        return VC_NEVER;
    return c->tx_sent_at + c->rto;
}

void vc_init(struct vc_core *c, const struct vc_board *board)
{
    memset(c, 0, sizeof(*c));
    c->board = board;
    vc_parser_init(&c->parser);
    c->rto = board->freq_hz / 50u;        /* 20 ms */
    c->window = board->freq_hz / 5u;      /* 200 ms until the host arms with its own */
    c->late_limit = board->freq_hz / 4000u; /* 250 us */
    c->alarm_at = VC_NEVER;
}
