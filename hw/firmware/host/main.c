/*
 * Host build of the valve-controller firmware: the portable core on a Linux
 * process, talking over a pseudo-terminal, so the daemon drives the real
 * firmware logic through a real serial stack (pyserial).
 *
 * It is built like the board: two contexts sharing the core under its lock.
 *   timer thread  the board's alarm interrupt: sleeps until ~spin_us before the
 *                 next event (clock_nanosleep, absolute), spins, runs vc_timer().
 *                 It makes no I/O system call at all: a pty or pipe call can wait
 *                 on a kernel lock held by a preempted normal-priority task (the
 *                 daemon, a kworker) for milliseconds.
 *   main thread   the board's main loop: reads the pty, vc_rx(), vc_service(),
 *                 writes the pty and the trace.
 * The core's lock is a priority-inheritance mutex.  With --realtime both run
 * SCHED_FIFO (timer above main) with memory locked, when permitted.
 *
 * The simulated board:
 *   clock   its own: offset + (CLOCK_MONOTONIC - t0) * freq * (1 + drift_ppm/1e6),
 *           a distinct frequency, offset and drift, so the host's clock sync
 *           has real work to do; the true relation is printed at start so a
 *           simulator can convert the firmware's stamps exactly.
 *   pins    simulated; an edge is stamped with the clock read after the pin was
 *           written -- the actual time, which on this process includes the
 *           machine's wake-up jitter.  Every edge, watchdog trip and new session
 *           goes as a 24-byte record to --trace-fd (a pipe from the simulator):
 *             u64 actual_clock, u64 target_clock, u8 kind, u8 pin, u8 level, 5 pad
 *           (native byte order; kinds as VC_TRACE_* in vc_core.h).  A watchdog
 *           record's level is the number of outputs whose simulated pin is still
 *           at its active level right after the trip (read from the pins, not
 *           from the core's bookkeeping): 0, or the fail-safe failed.
 *
 * Usage: vc-host --link PATH [--trace-fd N] [--freq-hz F] [--drift-ppm D]
 *                [--offset TICKS] [--spin-us S] [--realtime] [--replug-ms MS]
 * Prints one line on stdout when ready:
 *   READY slave=/dev/pts/N link=PATH t0_ns=T offset=O freq_hz=F nominal_hz=N
 * SIGUSR1 simulates a USB unplug: the pty disappears for --replug-ms, then a
 * new one appears behind the same --link.  SIGTERM/SIGINT: all off, exit.
 * If the parent process dies, the firmware keeps running until its watchdog
 * has turned everything off, then exits (no orphans are left behind): status 0
 * and a line on stderr if every output's pin is inactive, status 3 if not.
 * Whoever inherits it reaps it (init, systemd, or a test that is a subreaper).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "vc_core.h"

#define MAX_PIN 29 /* like an RP2040: GPIO 0..29 */
#define TRACE_QUEUE 512
#define GUARD_NS 1000000LL /* the timer thread stops listening for new alarms this close to one */

struct options {
    const char *link;
    int trace_fd;
    double freq_hz;
    double drift_ppm;
    unsigned long long offset;
    long spin_ns;
    int realtime;
    long replug_ms;
};

struct host {
    struct options opt;
    long long t0_ns;
    double ticks_per_ns; /* true rate, drift included */
    int master, slave;   /* pty (main thread); the slave is kept open so the master never hangs up */
    int wake;            /* eventfd: the timer thread queued reports for the main thread */
    char slave_name[128];
    unsigned char pins[MAX_PIN + 1];
    unsigned long trace_dropped, tx_dropped;
    pid_t parent;
    /* Shared by the two threads, guarded by lock (the core's lock): */
    pthread_mutex_t lock;
    pthread_cond_t alarm_moved;
    vc_clock_t alarm;
    int stop_timer;
    unsigned char trace_buf[TRACE_QUEUE][24];
    unsigned n_trace;
    struct vc_core core;
    struct vc_board board;
};

static volatile sig_atomic_t g_stop, g_unplug;

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        g_unplug = 1;
    else
        g_stop = 1;
}

static long long mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec ts_of(long long t_ns)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(t_ns / 1000000000LL);
    ts.tv_nsec = (long)(t_ns % 1000000000LL);
    return ts;
}

static vc_clock_t clock_of(const struct host *h, long long t_ns)
{
    return h->opt.offset + (vc_clock_t)llround((double)(t_ns - h->t0_ns) * h->ticks_per_ns);
}

static long long ns_of(const struct host *h, vc_clock_t clk)
{
    if (clk == VC_NEVER)
        return LLONG_MAX;
    return h->t0_ns + (long long)ceil((double)(long long)(clk - h->opt.offset) / h->ticks_per_ns);
}

/* ---- board (called by the core, with its lock held where the core says so) ---- */

static vc_clock_t board_now(void *ctx)
{
    return clock_of((struct host *)ctx, mono_ns());
}

static int board_pin_config(void *ctx, uint8_t pin, uint8_t level)
{
    struct host *h = (struct host *)ctx;
    if (pin > MAX_PIN)
        return -1;
    h->pins[pin] = level;
    return 0;
}

static void board_pin_write(void *ctx, uint8_t pin, uint8_t level)
{
    struct host *h = (struct host *)ctx;
    if (pin <= MAX_PIN)
        h->pins[pin] = level;
}

static void board_write(void *ctx, const uint8_t *data, uint16_t n)
{
    struct host *h = (struct host *)ctx;
    ssize_t w;
    if (h->master < 0) {
        h->tx_dropped++; /* unplugged: the bytes go nowhere, like on a real cable */
        return;
    }
    w = write(h->master, data, n);
    if (w != (ssize_t)n)
        h->tx_dropped++; /* nobody reading and the pty buffer full */
}

/* Lock held: the timer thread learns the new earliest event (the alarm register). */
static void board_set_alarm(void *ctx, vc_clock_t at)
{
    struct host *h = (struct host *)ctx;
    h->alarm = at;
    pthread_cond_signal(&h->alarm_moved);
}

static void board_lock(void *ctx)
{
    pthread_mutex_lock(&((struct host *)ctx)->lock);
}

static void board_unlock(void *ctx)
{
    pthread_mutex_unlock(&((struct host *)ctx)->lock);
}

/* Lock held: configured outputs whose pin is at its active level, from the pins themselves. */
static unsigned outputs_on(const struct host *h)
{
    unsigned i, n = 0;
    for (i = 0; i < VC_MAX_OUTPUTS; i++) {
        const struct vc_output *o = &h->core.out[i];
        if (o->configured && o->pin <= MAX_PIN && h->pins[o->pin] != o->active_low)
            n++;
    }
    return n;
}

/* Lock held.  Queued here, written by the main thread: never a syscall between edges. */
static void board_trace(void *ctx, const struct vc_trace *t)
{
    struct host *h = (struct host *)ctx;
    unsigned char *rec;
    if (h->opt.trace_fd < 0)
        return;
    if (h->n_trace == TRACE_QUEUE) {
        h->trace_dropped++;
        return;
    }
    rec = h->trace_buf[h->n_trace++];
    memset(rec, 0, 24);
    memcpy(rec, &t->actual, 8);
    memcpy(rec + 8, &t->target, 8);
    rec[16] = t->kind;
    rec[17] = t->pin;
    rec[18] = t->kind == VC_TRACE_WATCHDOG ? (unsigned char)outputs_on(h) : t->level;
}

static void flush_trace(struct host *h)
{
    static unsigned char out[TRACE_QUEUE][24];
    unsigned n;
    pthread_mutex_lock(&h->lock);
    n = h->n_trace;
    memcpy(out, h->trace_buf, 24u * n);
    h->n_trace = 0;
    pthread_mutex_unlock(&h->lock);
    if (n && write(h->opt.trace_fd, out, 24u * n) != (ssize_t)(24u * n))
        h->trace_dropped += n;
}

/* ---- the timer thread: the board's alarm interrupt ---------------------------- */

static void set_fifo(int priority, const char *who)
{
    struct sched_param sp;
    memset(&sp, 0, sizeof(sp));
    sp.sched_priority = priority;
    if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp))
        fprintf(stderr, "vc-host: SCHED_FIFO not permitted for the %s thread: timing is best effort\n", who);
}

/* Lock held.  Wait until the alarm is near (or moved, or we stop); returns its host time. */
static long long wait_for_alarm(struct host *h)
{
    for (;;) {
        long long at = ns_of(h, h->alarm), now = mono_ns();
        struct timespec until;
        if (h->stop_timer || at - now <= h->opt.spin_ns + GUARD_NS)
            return at;
        until = ts_of(at == LLONG_MAX ? now + 100000000LL : at - h->opt.spin_ns - GUARD_NS);
        pthread_cond_timedwait(&h->alarm_moved, &h->lock, &until);
    }
}

static void wake_main(struct host *h)
{
    uint64_t one = 1;
    if (write(h->wake, &one, sizeof(one)) < 0) {
        /* cannot fail short of a full counter; the main thread wakes within 20 ms anyway */
    }
}

static void *timer_thread(void *arg)
{
    struct host *h = (struct host *)arg;
    if (h->opt.realtime)
        set_fifo(30, "timer");
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    for (;;) {
        long long at;
        struct timespec ts;
        pthread_mutex_lock(&h->lock);
        at = wait_for_alarm(h);
        if (h->stop_timer) {
            pthread_mutex_unlock(&h->lock);
            return NULL;
        }
        pthread_mutex_unlock(&h->lock);
        if (at - h->opt.spin_ns > mono_ns()) {
            ts = ts_of(at - h->opt.spin_ns);
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
                ;
        }
        while (mono_ns() < at)
            ; /* the last stretch: a sleeping thread wakes too late */
        vc_timer(&h->core);
        wake_main(h); /* after the edges: reports and trace are the main thread's to send */
    }
}

/* ---- pty (main thread) -------------------------------------------------------- */

static int open_pty(struct host *h)
{
    struct termios tio;
    char tmp[512];
    const char *name;
    h->master = posix_openpt(O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (h->master < 0 || grantpt(h->master) || unlockpt(h->master) || !(name = ptsname(h->master)))
        return -1;
    snprintf(h->slave_name, sizeof(h->slave_name), "%s", name);
    h->slave = open(h->slave_name, O_RDWR | O_NOCTTY | O_NONBLOCK);
    if (h->slave < 0 || tcgetattr(h->slave, &tio))
        return -1;
    cfmakeraw(&tio); /* a binary link: no echo, no CR/LF translation */
    if (tcsetattr(h->slave, TCSANOW, &tio))
        return -1;
    /* Point the link at the new slave atomically (like a udev by-id symlink). */
    snprintf(tmp, sizeof(tmp), "%s.tmp%ld", h->opt.link, (long)getpid());
    unlink(tmp);
    if (symlink(h->slave_name, tmp) || rename(tmp, h->opt.link))
        return -1;
    return 0;
}

/* Lock held (board_write reads master). */
static void close_pty(struct host *h)
{
    unlink(h->opt.link);
    if (h->slave >= 0)
        close(h->slave);
    if (h->master >= 0)
        close(h->master);
    h->slave = h->master = -1;
}

static void read_pty(struct host *h)
{
    uint8_t buf[512];
    ssize_t n;
    while (h->master >= 0 && (n = read(h->master, buf, sizeof(buf))) > 0)
        vc_rx(&h->core, buf, (uint16_t)n);
}

/* Block until bytes come, the timer thread has news, or a retransmission is due (max 20 ms). */
static int wait_input(struct host *h)
{
    struct pollfd pfd[2];
    struct timespec to;
    long long next, wait;
    pthread_mutex_lock(&h->lock);
    next = ns_of(h, vc_next_service(&h->core));
    pthread_mutex_unlock(&h->lock);
    wait = next - mono_ns();
    if (wait < 0)
        wait = 0;
    if (wait > 20000000LL)
        wait = 20000000LL; /* wake now and then: signals, parent check */
    to = ts_of(wait);
    pfd[0].fd = h->wake;
    pfd[0].events = POLLIN;
    pfd[1].fd = h->master; /* -1 while unplugged: ignored by ppoll */
    pfd[1].events = POLLIN;
    if (ppoll(pfd, 2, &to, NULL) <= 0)
        return 0;
    if (pfd[0].revents & POLLIN) {
        uint64_t n;
        if (read(h->wake, &n, sizeof(n)) < 0)
            n = 0;
    }
    return (pfd[1].revents & POLLIN) != 0;
}

/* ---- setup -------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr, "usage: vc-host --link PATH [--trace-fd N] [--freq-hz F] [--drift-ppm D] "
                    "[--offset TICKS] [--spin-us S] [--realtime] [--replug-ms MS]\n");
    exit(2);
}

static void parse_args(struct options *o, int argc, char **argv)
{
    int i;
    o->link = NULL;
    o->trace_fd = -1;
    o->freq_hz = 12000000.0;
    o->drift_ppm = 0.0;
    o->offset = 0;
    o->spin_ns = 200000;
    o->realtime = 0;
    o->replug_ms = 500;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--realtime")) {
            o->realtime = 1;
            continue;
        }
        if (!v)
            usage();
        i++;
        if (!strcmp(a, "--link")) o->link = v;
        else if (!strcmp(a, "--trace-fd")) o->trace_fd = atoi(v);
        else if (!strcmp(a, "--freq-hz")) o->freq_hz = atof(v);
        else if (!strcmp(a, "--drift-ppm")) o->drift_ppm = atof(v);
        else if (!strcmp(a, "--offset")) o->offset = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--spin-us")) o->spin_ns = atol(v) * 1000L;
        else if (!strcmp(a, "--replug-ms")) o->replug_ms = atol(v);
        else usage();
    }
    if (!o->link || o->freq_hz < 1000.0 || o->freq_hz > 4e9 || fabs(o->drift_ppm) > 10000.0)
        usage();
}

static void init_sync(struct host *h)
{
    pthread_mutexattr_t ma;
    pthread_condattr_t ca;
    pthread_mutexattr_init(&ma);
    /* The main thread holds the core's lock briefly; the timer thread must never
     * wait behind it at normal priority (no priority inversion). */
    pthread_mutexattr_setprotocol(&ma, PTHREAD_PRIO_INHERIT);
    pthread_mutex_init(&h->lock, &ma);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&h->alarm_moved, &ca);
}

static void init_host(struct host *h, int argc, char **argv)
{
    memset(h, 0, sizeof(*h));
    parse_args(&h->opt, argc, argv);
    h->master = h->slave = -1;
    h->parent = getppid();
    h->t0_ns = mono_ns();
    h->ticks_per_ns = h->opt.freq_hz * (1.0 + h->opt.drift_ppm * 1e-6) / 1e9;
    h->alarm = VC_NEVER;
    h->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    init_sync(h);
    h->board.ctx = h;
    h->board.freq_hz = (uint32_t)h->opt.freq_hz; /* nominal: the drift is for the host to find */
    h->board.name = "vc-host";
    h->board.now = board_now;
    h->board.pin_config = board_pin_config;
    h->board.pin_write = board_pin_write;
    h->board.write = board_write;
    h->board.set_alarm = board_set_alarm;
    h->board.lock = board_lock;
    h->board.unlock = board_unlock;
    h->board.trace = board_trace;
    vc_init(&h->core, &h->board);
    if (h->opt.trace_fd >= 0) {
        fcntl(h->opt.trace_fd, F_SETFL, fcntl(h->opt.trace_fd, F_GETFL) | O_NONBLOCK);
        fcntl(h->opt.trace_fd, F_SETPIPE_SZ, 1 << 20);
    }
}

static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGPIPE, SIG_IGN); /* a reader that went away must not kill the firmware */
}

static int start_timer(struct host *h, pthread_t *tid)
{
    sigset_t all, old;
    int rc;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* signals go to the main thread only */
    rc = pthread_create(tid, NULL, timer_thread, h);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

/* SIGUSR1: the cable is pulled.  The timer keeps running (the watchdog trips
 * if armed); after replug_ms a new pty appears. */
static void unplug(struct host *h)
{
    long long back = mono_ns() + h->opt.replug_ms * 1000000LL;
    pthread_mutex_lock(&h->lock);
    close_pty(h);
    pthread_mutex_unlock(&h->lock);
    fprintf(stderr, "vc-host: unplugged for %ld ms\n", h->opt.replug_ms);
    while (!g_stop && mono_ns() < back) {
        struct timespec ts = ts_of(10000000LL);
        nanosleep(&ts, NULL);
        flush_trace(h);
    }
    pthread_mutex_lock(&h->lock);
    if (open_pty(h))
        fprintf(stderr, "vc-host: cannot recreate the pty: %s\n", strerror(errno));
    pthread_mutex_unlock(&h->lock);
}

static int orphaned_and_safe(struct host *h)
{
    int armed;
    if (getppid() == h->parent)
        return 0;
    /* The parent is gone: stay until the watchdog has switched everything off. */
    pthread_mutex_lock(&h->lock);
    armed = h->core.armed;
    pthread_mutex_unlock(&h->lock);
    return !armed;
}

/* The parent died and the watchdog has done its work: say so, and whether every pin is off. */
static int orphan_exit_status(struct host *h)
{
    unsigned on;
    pthread_mutex_lock(&h->lock);
    on = outputs_on(h);
    pthread_mutex_unlock(&h->lock);
    if (on) {
        fprintf(stderr, "vc-host: host gone; %u output(s) still on after the watchdog\n", on);
        return 3;
    }
    fprintf(stderr, "vc-host: host gone; watchdog off, every output off; exiting\n");
    return 0;
}

int main(int argc, char **argv)
{
    static struct host h;
    pthread_t timer;
    int orphaned = 0, status;
    init_host(&h, argc, argv);
    install_signals();
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL); /* default 50 us slack would add to every wake-up */
    if (h.opt.realtime) {
        if (mlockall(MCL_CURRENT | MCL_FUTURE))
            fprintf(stderr, "vc-host: mlockall not permitted (%s)\n", strerror(errno));
        set_fifo(20, "main");
    }
    if (open_pty(&h)) {
        fprintf(stderr, "vc-host: cannot create the pty at %s: %s\n", h.opt.link, strerror(errno));
        return 1;
    }
    if (start_timer(&h, &timer)) {
        fprintf(stderr, "vc-host: cannot start the timer thread\n");
        return 1;
    }
    printf("READY slave=%s link=%s t0_ns=%lld offset=%llu freq_hz=%.6f nominal_hz=%u\n", h.slave_name, h.opt.link,
           h.t0_ns, h.opt.offset, h.ticks_per_ns * 1e9, h.board.freq_hz);
    fflush(stdout);
    while (!g_stop) {
        if (g_unplug) {
            g_unplug = 0;
            unplug(&h);
        }
        if (wait_input(&h))
            read_pty(&h);
        flush_trace(&h); /* first: the pins are seen before the host hears of them */
        vc_service(&h.core);
        if (orphaned_and_safe(&h)) {
            orphaned = 1;
            break;
        }
    }
    pthread_mutex_lock(&h.lock);
    h.stop_timer = 1;
    pthread_cond_signal(&h.alarm_moved);
    pthread_mutex_unlock(&h.lock);
    pthread_join(timer, NULL);
    status = orphaned ? orphan_exit_status(&h) : 0; /* before the exit path's own all-off */
    vc_all_off(&h.core);
    vc_service(&h.core);
    flush_trace(&h);
    pthread_mutex_lock(&h.lock);
    close_pty(&h);
    pthread_mutex_unlock(&h.lock);
    if (h.trace_dropped || h.tx_dropped)
        fprintf(stderr, "vc-host: dropped %lu trace records, %lu frames\n", h.trace_dropped, h.tx_dropped);
    return status;
}
