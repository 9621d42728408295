/*
 * The msgpack format (https://github.com/msgpack/msgpack/blob/master/spec.md),
 * written once: the type bytes by name, and one table giving how each one's
 * encoding is laid out. Every parser in _fasttrim.c reads the grammar from
 * this table, instead of restating it in compares (trimmer/_trim_py.py
 * restates it for the Python engine; the tests compare the two engines).
 *
 * Single-translation-unit header: included by _fasttrim.c only (static data).
 */
#ifndef TRIMMER_MSGPACK_FORMAT_H
#define TRIMMER_MSGPACK_FORMAT_H

#include <stdint.h>

/* Type bytes (the first byte of every encoded object). *_LAST: the end of a
 * range whose low bits carry a value (an integer, a length or a count). */
enum mp_opcode {
    MP_POSFIXINT = 0x00, MP_POSFIXINT_LAST = 0x7f,
    MP_FIXMAP = 0x80, MP_FIXMAP_LAST = 0x8f,
    MP_FIXARRAY = 0x90, MP_FIXARRAY_LAST = 0x9f,
    MP_FIXSTR = 0xa0, MP_FIXSTR_LAST = 0xbf,
    MP_NIL = 0xc0,
    MP_NEVER_USED = 0xc1,
    MP_FALSE = 0xc2, MP_TRUE = 0xc3,
    MP_BIN8 = 0xc4, MP_BIN16 = 0xc5, MP_BIN32 = 0xc6,
    MP_EXT8 = 0xc7, MP_EXT16 = 0xc8, MP_EXT32 = 0xc9,
    MP_FLOAT32 = 0xca, MP_FLOAT64 = 0xcb,
    MP_UINT8 = 0xcc, MP_UINT16 = 0xcd, MP_UINT32 = 0xce, MP_UINT64 = 0xcf,
    MP_INT8 = 0xd0, MP_INT16 = 0xd1, MP_INT32 = 0xd2, MP_INT64 = 0xd3,
    MP_FIXEXT1 = 0xd4, MP_FIXEXT2 = 0xd5, MP_FIXEXT4 = 0xd6, MP_FIXEXT8 = 0xd7, MP_FIXEXT16 = 0xd8,
    MP_STR8 = 0xd9, MP_STR16 = 0xda, MP_STR32 = 0xdb,
    MP_ARRAY16 = 0xdc, MP_ARRAY32 = 0xdd,
    MP_MAP16 = 0xde, MP_MAP32 = 0xdf,
    MP_NEGFIXINT = 0xe0, MP_NEGFIXINT_LAST = 0xff,
};

/* The longest header (ext32: type byte, 4-byte length, ext type). */
#define MP_HEAD_MAX 6

/* The largest count a fixmap, and a map16, can carry. */
#define MP_FIXMAP_MAX ((uint64_t)(MP_FIXMAP_LAST - MP_FIXMAP))
#define MP_MAP16_MAX ((uint64_t)0xffff)

/* How an object of a type family is laid out after its type byte. */
enum mp_kind {
    MP_KIND_INVALID = 0,  /* 0xc1: never used */
    MP_KIND_SCALAR,       /* a fixed number of bytes: nil, bools, ints, floats, fixext */
    MP_KIND_STR,          /* a length, then that many UTF-8 bytes */
    MP_KIND_BIN,          /* a length, then that many bytes */
    MP_KIND_EXT,          /* a length, an ext type byte, then that many bytes */
    MP_KIND_ARRAY,        /* a count, then that many objects */
    MP_KIND_MAP,          /* a count, then that many key/value pairs of objects */
};

/* One type byte, decoded. */
typedef struct {
    uint8_t kind;  /* enum mp_kind */
    uint8_t head;  /* bytes before the payload: the type byte, the length or count field, an ext's type byte;
                      for a scalar, its whole size */
    uint8_t lenw;  /* width of the big-endian length or count after the type byte; 0: the type byte carries it */
    uint8_t mask;  /* when lenw is 0: the type byte's bits that carry the length or count */
} mp_type;

/* The grammar: every type byte's layout. A constant table (range designators, a GNU C extension that gcc and
 * clang accept), so that a lookup with a constant type byte folds into the constant at compile time. */
static const mp_type MP_TYPES[256] = {
    [MP_POSFIXINT ... MP_POSFIXINT_LAST] = {MP_KIND_SCALAR, 1, 0, 0},
    [MP_FIXMAP ... MP_FIXMAP_LAST]       = {MP_KIND_MAP, 1, 0, 0x0f},
    [MP_FIXARRAY ... MP_FIXARRAY_LAST]   = {MP_KIND_ARRAY, 1, 0, 0x0f},
    [MP_FIXSTR ... MP_FIXSTR_LAST]       = {MP_KIND_STR, 1, 0, 0x1f},
    [MP_NIL]        = {MP_KIND_SCALAR, 1, 0, 0},
    [MP_NEVER_USED] = {MP_KIND_INVALID, 1, 0, 0},
    [MP_FALSE]      = {MP_KIND_SCALAR, 1, 0, 0},
    [MP_TRUE]       = {MP_KIND_SCALAR, 1, 0, 0},
    [MP_BIN8]       = {MP_KIND_BIN, 1 + 1, 1, 0},
    [MP_BIN16]      = {MP_KIND_BIN, 1 + 2, 2, 0},
    [MP_BIN32]      = {MP_KIND_BIN, 1 + 4, 4, 0},
    [MP_EXT8]       = {MP_KIND_EXT, 1 + 1 + 1, 1, 0},
    [MP_EXT16]      = {MP_KIND_EXT, 1 + 2 + 1, 2, 0},
    [MP_EXT32]      = {MP_KIND_EXT, 1 + 4 + 1, 4, 0},
    [MP_FLOAT32]    = {MP_KIND_SCALAR, 1 + 4, 0, 0},
    [MP_FLOAT64]    = {MP_KIND_SCALAR, 1 + 8, 0, 0},
    [MP_UINT8]      = {MP_KIND_SCALAR, 1 + 1, 0, 0},
    [MP_UINT16]     = {MP_KIND_SCALAR, 1 + 2, 0, 0},
    [MP_UINT32]     = {MP_KIND_SCALAR, 1 + 4, 0, 0},
    [MP_UINT64]     = {MP_KIND_SCALAR, 1 + 8, 0, 0},
    [MP_INT8]       = {MP_KIND_SCALAR, 1 + 1, 0, 0},
    [MP_INT16]      = {MP_KIND_SCALAR, 1 + 2, 0, 0},
    [MP_INT32]      = {MP_KIND_SCALAR, 1 + 4, 0, 0},
    [MP_INT64]      = {MP_KIND_SCALAR, 1 + 8, 0, 0},
    [MP_FIXEXT1]    = {MP_KIND_SCALAR, 1 + 1 + 1, 0, 0},
    [MP_FIXEXT2]    = {MP_KIND_SCALAR, 1 + 1 + 2, 0, 0},
    [MP_FIXEXT4]    = {MP_KIND_SCALAR, 1 + 1 + 4, 0, 0},
    [MP_FIXEXT8]    = {MP_KIND_SCALAR, 1 + 1 + 8, 0, 0},
    [MP_FIXEXT16]   = {MP_KIND_SCALAR, 1 + 1 + 16, 0, 0},
    [MP_STR8]       = {MP_KIND_STR, 1 + 1, 1, 0},
    [MP_STR16]      = {MP_KIND_STR, 1 + 2, 2, 0},
    [MP_STR32]      = {MP_KIND_STR, 1 + 4, 4, 0},
    [MP_ARRAY16]    = {MP_KIND_ARRAY, 1 + 2, 2, 0},
    [MP_ARRAY32]    = {MP_KIND_ARRAY, 1 + 4, 4, 0},
    [MP_MAP16]      = {MP_KIND_MAP, 1 + 2, 2, 0},
    [MP_MAP32]      = {MP_KIND_MAP, 1 + 4, 4, 0},
    [MP_NEGFIXINT ... MP_NEGFIXINT_LAST] = {MP_KIND_SCALAR, 1, 0, 0},
};

/* The total encoded size of an object fully known from its type byte (scalars
 * and fixstr), else 0 (a length or count follows, or 0xc1). Derived from
 * MP_TYPES at import (mp_tables_init), as a dense 256-byte array: one load on
 * the hot path of skipping the scalars that fill list features. */
static uint8_t MP_FIXED_SIZE[256];

static void mp_tables_init(void) {
    for (int t = 0; t < 256; t++) {
        const mp_type *g = &MP_TYPES[t];
        if (g->kind == MP_KIND_SCALAR) MP_FIXED_SIZE[t] = g->head;
        else if (g->kind == MP_KIND_STR && !g->lenw) MP_FIXED_SIZE[t] = (uint8_t)(g->head + (t & g->mask));
        else MP_FIXED_SIZE[t] = 0;
    }
}

/* A big-endian unsigned integer of width w (1, 2, 4 or 8 bytes). */
static inline uint64_t mp_be(const uint8_t *p, int w) {
    switch (w) {
    case 1: return p[0];
    case 2: return ((uint64_t)p[0] << 8) | p[1];
    case 4: return ((uint64_t)p[0] << 24) | ((uint64_t)p[1] << 16) | ((uint64_t)p[2] << 8) | p[3];
    default: {
        uint64_t v = 0;
        for (int i = 0; i < w; i++) v = (v << 8) | p[i];
        return v;
    }
    }
}

/* The length or count of an object whose header (MP_TYPES[*p].head bytes) is at p. */
static inline uint64_t mp_header_value(const uint8_t *p) {
    const mp_type *g = &MP_TYPES[p[0]];
    return g->lenw ? mp_be(p + 1, g->lenw) : (uint64_t)(p[0] & g->mask);
}

/* The bytes of the shortest map header for c entries (what msgpack encoders write). */
static inline Py_ssize_t mp_map_header_width(uint64_t c) {
    return c <= MP_FIXMAP_MAX ? 1 : c <= MP_MAP16_MAX ? 3 : 5;
}

static uint8_t *mp_write_map_header(uint8_t *o, uint64_t c) {
    if (c <= MP_FIXMAP_MAX) {
        *o++ = (uint8_t)(MP_FIXMAP | c);
    } else if (c <= MP_MAP16_MAX) {
        *o++ = MP_MAP16;
        *o++ = (uint8_t)(c >> 8);
        *o++ = (uint8_t)c;
    } else {
        *o++ = MP_MAP32;
        *o++ = (uint8_t)(c >> 24);
        *o++ = (uint8_t)(c >> 16);
        *o++ = (uint8_t)(c >> 8);
        *o++ = (uint8_t)c;
    }
    return o;
}

#endif
