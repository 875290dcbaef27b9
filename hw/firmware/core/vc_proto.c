/* Valve-controller framing: CRC16-CCITT, encoder and a resynchronising parser. */
#include "vc_proto.h"

#include <string.h>

uint16_t vc_crc16(const uint8_t *data, size_t n, uint16_t crc)
{
    size_t i;
    int bit;
    for (i = 0; i < n; i++) {
        crc ^= (uint16_t)((uint16_t)data[i] << 8);
        for (bit = 0; bit < 8; bit++)
            crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u) : (uint16_t)(crc << 1);
    }
    return crc;
}

void vc_parser_init(struct vc_parser *p)
{
    memset(p, 0, sizeof(*p));
}

size_t vc_frame_encode(uint8_t *out, uint8_t seq, uint8_t ack, uint8_t flags, const uint8_t *payload,
                       uint8_t len)
{
    uint16_t crc;
    if (len > VC_MAX_PAYLOAD)
        return 0;
    out[0] = VC_SOF;
    out[1] = len;
    out[2] = seq;
    out[3] = ack;
    out[4] = flags;
    if (len)
        memcpy(out + VC_HEADER, payload, len);
    crc = vc_crc16(out + 1, (size_t)(VC_HEADER - 1u + len), 0xFFFFu);
    out[VC_HEADER + len] = (uint8_t)(crc >> 8);
    out[VC_HEADER + len + 1u] = (uint8_t)(crc & 0xFFu);
    return (size_t)(VC_HEADER + VC_TRAILER + len);
}

/* Drop the first k buffered bytes. */
static void drop(struct vc_parser *p, uint8_t k)
{
    if (k >= p->n) {
        p->n = 0;
        return;
    }
    memmove(p->buf, p->buf + k, (size_t)(p->n - k));
    p->n = (uint8_t)(p->n - k);
}

/* Skip to the next SOF after position 0 (the current start proved bad). */
static void resync(struct vc_parser *p)
{
    uint8_t i = 1;
    while (i < p->n && p->buf[i] != VC_SOF)
        i++;
    p->garbage += (uint32_t)(i - 1u);
    drop(p, i);
}

static int frame_ok(const struct vc_parser *p, uint8_t need)
{
    uint16_t crc = vc_crc16(p->buf + 1, (size_t)(need - 3u), 0xFFFFu);
    return p->buf[need - 2u] == (uint8_t)(crc >> 8) && p->buf[need - 1u] == (uint8_t)(crc & 0xFFu);
}

static void deliver(struct vc_parser *p, uint8_t need, vc_frame_cb cb, void *ctx)
{
    struct vc_frame f;
    f.len = p->buf[1];
    f.seq = p->buf[2];
    f.ack = p->buf[3];
    f.flags = p->buf[4];
    memcpy(f.payload, p->buf + VC_HEADER, f.len);
    p->frames++;
    drop(p, need);
    cb(ctx, &f);
}

/* Consume as many frames as the buffer holds; leave a partial frame waiting. */
static void process(struct vc_parser *p, vc_frame_cb cb, void *ctx)
{
    uint8_t need;
    for (;;) {
        if (p->n == 0)
            return;
        if (p->buf[0] != VC_SOF) {
            p->garbage++;
            resync(p);
            continue;
        }
        if (p->n < 2u)
            return;
        if (p->buf[1] > VC_MAX_PAYLOAD) {
            p->oversize++;
            resync(p);
            continue;
        }
        need = (uint8_t)(VC_HEADER + VC_TRAILER + p->buf[1]);
        if (p->n < need)
            return;
        if (!frame_ok(p, need)) {
            p->crc_errors++;
            resync(p);
            continue;
        }
        deliver(p, need, cb, ctx);
    }
}

void vc_parser_feed(struct vc_parser *p, const uint8_t *data, size_t n, vc_frame_cb cb, void *ctx)
{
    size_t i;
    for (i = 0; i < n; i++) {
        /* process() always leaves fewer than VC_MAX_FRAME bytes buffered. */
        p->buf[p->n++] = data[i];
        process(p, cb, ctx);
    }
}

void vc_put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

void vc_put_u32(uint8_t *p, uint32_t v)
{
    int i;
    for (i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

void vc_put_u64(uint8_t *p, uint64_t v)
{
    int i;
    for (i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

uint16_t vc_get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

uint32_t vc_get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    int i;
    for (i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

uint64_t vc_get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}
