/*
 * Valve-controller wire format: CRC16 framing and little-endian helpers.
 *
 * Portable C99, no board code.  The byte layout of every frame, command and
 * report is in hw/PROTOCOL.md; keep the two in step.
 *
 *   SOF  LEN  SEQ  ACK  FLAGS  PAYLOAD[LEN]  CRC16(hi) CRC16(lo)
 *   0x7E 0-48
 *
 * CRC16-CCITT (poly 0x1021, init 0xFFFF, no reflection, no final xor) over
 * LEN..PAYLOAD, sent big-endian.  The parser resynchronises after any bad
 * frame by dropping one byte and scanning for the next SOF, so garbage costs
 * at most the frames it overlaps; it never delivers a frame whose CRC fails.
 */
#ifndef VC_PROTO_H
#define VC_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define VC_SOF 0x7Eu
#define VC_MAX_PAYLOAD 48u
#define VC_HEADER 5u  /* SOF LEN SEQ ACK FLAGS */
#define VC_TRAILER 2u /* CRC16 */
#define VC_MAX_FRAME (VC_HEADER + VC_MAX_PAYLOAD + VC_TRAILER)

#define VC_FLAG_SYN 0x01u /* link (re)start: sequence numbers begin again */

struct vc_frame {
    uint8_t len;
    uint8_t seq;
    uint8_t ack;
    uint8_t flags;
    uint8_t payload[VC_MAX_PAYLOAD];
};

/* Byte-wise frame parser; one per receive direction. */
struct vc_parser {
    uint8_t buf[VC_MAX_FRAME];
    uint8_t n;
    uint32_t frames;      /* frames with a good CRC */
    uint32_t crc_errors;  /* complete frames whose CRC failed */
    uint32_t oversize;    /* LEN above VC_MAX_PAYLOAD */
    uint32_t garbage;     /* bytes dropped outside any frame */
};

typedef void (*vc_frame_cb)(void *ctx, const struct vc_frame *frame);

uint16_t vc_crc16(const uint8_t *data, size_t n, uint16_t crc);

void vc_parser_init(struct vc_parser *p);

/* Feed received bytes; cb is called once per good frame, in order. */
void vc_parser_feed(struct vc_parser *p, const uint8_t *data, size_t n, vc_frame_cb cb, void *ctx);

/* Encode one frame into out (at least VC_MAX_FRAME bytes); returns its length,
 * 0 if len is above VC_MAX_PAYLOAD. */
size_t vc_frame_encode(uint8_t *out, uint8_t seq, uint8_t ack, uint8_t flags, const uint8_t *payload,
                       uint8_t len);

/* Little-endian field access (the MCU and the host may differ in byte order). */
void vc_put_u16(uint8_t *p, uint16_t v);
void vc_put_u32(uint8_t *p, uint32_t v);
void vc_put_u64(uint8_t *p, uint64_t v);
uint16_t vc_get_u16(const uint8_t *p);
uint32_t vc_get_u32(const uint8_t *p);
uint64_t vc_get_u64(const uint8_t *p);

#endif
