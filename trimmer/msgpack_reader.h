/*
 * The msgpack reader of _fasttrim.c: a body held as a list of chunks (as the
 * HTTP server received it) read in place. Only a header or key that straddles
 * two chunks is gathered into a small scratch buffer. Values are skipped
 * (bounds-checked, depth-limited) by the grammar in msgpack_format.h, never
 * decoded.
 *
 * Every reader function returns 0 on failure with r->err set (r->short_data
 * too when the failure is only that the bytes are not all in yet), except
 * where it says "0 with r->err NULL": the object there is of another type.
 *
 * Single-translation-unit header: included by _fasttrim.c only (after Python.h).
 */
#ifndef TRIMMER_MSGPACK_READER_H
#define TRIMMER_MSGPACK_READER_H

#include <stdint.h>
#include <string.h>

#include "msgpack_format.h"

/* Containers nested deeper than this are refused (skipping recurses). */
#define MAX_DEPTH 256

typedef struct {
    const uint8_t *p;
    Py_ssize_t start;  /* absolute offset of p[0] in the body */
    Py_ssize_t len;    /* > 0: empty chunks are never stored */
} chunk_t;

/* The one error that is not about the body: reported as MemoryError, matched by address. */
static const char OUT_OF_MEMORY[] = "out of memory";

/* Invariant: when pos < total, chunk ci holds pos and (cp, cbeg, cend) cache it. */
typedef struct {
    chunk_t *chunks;
    Py_ssize_t n_chunks;
    Py_ssize_t total;
    Py_ssize_t pos;
    Py_ssize_t ci;
    const uint8_t *cp;
    Py_ssize_t cbeg, cend;
    uint8_t *scratch;
    Py_ssize_t scratch_cap;
    const char *err;
    int short_data;  /* err means "not enough bytes yet": a streaming feed waits for more */
} reader;

static void set_chunk(reader *r, Py_ssize_t ci) {
    r->ci = ci;
    r->cp = r->chunks[ci].p;
    r->cbeg = r->chunks[ci].start;
    r->cend = r->cbeg + r->chunks[ci].len;
}

/* Re-establish the invariant after pos moved (forward, or back on a rewind). */
static void seek(reader *r) {
    if (r->n_chunks == 0) return;
    while (r->pos >= r->cend && r->ci + 1 < r->n_chunks) set_chunk(r, r->ci + 1);
    while (r->pos < r->cbeg && r->ci > 0) set_chunk(r, r->ci - 1);
}

static inline void advance(reader *r, Py_ssize_t k) {
    r->pos += k;
    if (r->pos >= r->cend) seek(r);
}

static inline int need(reader *r, Py_ssize_t k) {
    if (k < 0 || r->total - r->pos < k) {
        r->err = "truncated msgpack body";
        r->short_data = 1;
        return 0;
    }
    return 1;
}

/* Copy k bytes at pos that straddle chunks into scratch. NULL (err set) on no memory. */
static const uint8_t *gather(reader *r, Py_ssize_t k) {
    if (k > r->scratch_cap) {
        Py_ssize_t cap = r->scratch_cap ? r->scratch_cap : 64;
        while (cap < k) cap *= 2;
        uint8_t *s = (uint8_t *)PyMem_Realloc(r->scratch, cap);
        if (!s) { r->err = OUT_OF_MEMORY; return NULL; }
        r->scratch = s;
        r->scratch_cap = cap;
    }
    Py_ssize_t copied = 0, ci = r->ci, off = r->pos - r->cbeg;
    while (copied < k) {
        Py_ssize_t take = r->chunks[ci].len - off;
        if (take > k - copied) take = k - copied;
        memcpy(r->scratch + copied, r->chunks[ci].p + off, take);
        copied += take;
        ci++;
        off = 0;
    }
    return r->scratch;
}

/* Pointer to k contiguous bytes at pos; call need(r, k) first. */
static inline const uint8_t *peek(reader *r, Py_ssize_t k) {
    if (r->pos + k <= r->cend) return r->cp + (r->pos - r->cbeg);
    return gather(r, k);
}

static inline uint8_t byte_at_pos(const reader *r) { return r->cp[r->pos - r->cbeg]; }

/* Step over the header of the object at pos (its type byte is there: need(r, 1) was checked), setting *n to the
 * length or count it declares. */
static inline int read_header(reader *r, const mp_type *g, uint64_t *n) {
    if (!g->lenw) {
        *n = byte_at_pos(r) & g->mask;
        advance(r, 1);
        return 1;
    }
    if (!need(r, g->head)) return 0;
    const uint8_t *q = peek(r, g->head);
    if (!q) return 0;
    *n = mp_be(q + 1, g->lenw);
    advance(r, g->head);
    return 1;
}

static inline int skip_bytes(reader *r, uint64_t len) {
    if (len > (uint64_t)PY_SSIZE_T_MAX || !need(r, (Py_ssize_t)len)) {
        r->err = "truncated msgpack body";
        r->short_data = 1;
        return 0;
    }
    advance(r, (Py_ssize_t)len);
    return 1;
}

/* Skip `count` objects. */
static int skip_n(reader *r, uint64_t count, int depth);

/* Skip one object. */
static int skip_one(reader *r, int depth) {
    if (depth > MAX_DEPTH) {
        r->err = "msgpack body nested too deeply";
        return 0;
    }
    if (!need(r, 1)) return 0;
    uint8_t t = byte_at_pos(r);
    Py_ssize_t k = MP_FIXED_SIZE[t];
    if (k) {
        if (!need(r, k)) return 0;
        advance(r, k);
        return 1;
    }
    const mp_type *g = &MP_TYPES[t];
    uint64_t n;
    switch (g->kind) {
    case MP_KIND_STR: case MP_KIND_BIN: case MP_KIND_EXT:
        if (!read_header(r, g, &n)) return 0;
        return skip_bytes(r, n);
    case MP_KIND_ARRAY:
        if (!read_header(r, g, &n)) return 0;
        return skip_n(r, n, depth + 1);
    case MP_KIND_MAP:
        if (!read_header(r, g, &n)) return 0;
        return skip_n(r, 2 * n, depth + 1);
    default:
        r->err = "invalid msgpack type byte 0xc1";
        return 0;
    }
}

static int skip_n(reader *r, uint64_t count, int depth) {
    /* Every object takes at least one byte, so a huge declared count fails fast on truncation. */
    if (count > (uint64_t)(r->total - r->pos)) {
        r->err = "truncated msgpack body (container declares more items than bytes remain)";
        r->short_data = 1;
        return 0;
    }
    for (uint64_t i = 0; i < count; i++) {
        if (!need(r, 1)) return 0;
        Py_ssize_t k = MP_FIXED_SIZE[byte_at_pos(r)];
        if (k) {  /* scalars inline; containers and variable-size values recurse */
            if (!need(r, k)) return 0;
            advance(r, k);
            continue;
        }
        if (!skip_one(r, depth)) return 0;
    }
    return 1;
}

/* Read a map header. 0 with r->err NULL when the object there is not a map. */
static int read_map_header(reader *r, uint64_t *count) {
    if (!need(r, 1)) return 0;
    const mp_type *g = &MP_TYPES[byte_at_pos(r)];
    if (g->kind != MP_KIND_MAP) return 0;
    return read_header(r, g, count);
}

/* Strict UTF-8 check (as Python's decoder: no overlongs, surrogates or > U+10FFFF),
 * so the C trim rejects exactly the keys the Python fallback (bytes.decode) rejects. */
static int valid_utf8_slow(const uint8_t *p, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        if (c < 0x80) { i++; continue; }
        int len;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) { len = 2; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { len = 3; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { len = 4; cp = c & 0x07; }
        else return 0;
        if (i + len > n) return 0;
        for (int k = 1; k < len; k++) {
            if ((p[i + k] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += len;
    }
    return 1;
}

static inline int valid_utf8(const uint8_t *p, Py_ssize_t n) {
    /* ASCII fast path (feature names are almost always ASCII): OR the bytes a word at a time */
    if (n >= 8) {
        uint64_t acc = 0, w;
        for (Py_ssize_t i = 0; i + 8 <= n; i += 8) { memcpy(&w, p + i, 8); acc |= w; }
        memcpy(&w, p + n - 8, 8);  /* overlapping tail */
        acc |= w;
        if (!(acc & 0x8080808080808080ull)) return 1;
    } else {
        uint8_t acc = 0;
        for (Py_ssize_t i = 0; i < n; i++) acc |= p[i];
        if (!(acc & 0x80)) return 1;
    }
    return valid_utf8_slow(p, n);
}

/* Read a str; *key points at its UTF-8 bytes (valid until the next peek).
 * 0 with r->err NULL when the object there is not a str. */
static int read_str(reader *r, const uint8_t **key, Py_ssize_t *len) {
    if (!need(r, 1)) return 0;
    const mp_type *g = &MP_TYPES[byte_at_pos(r)];
    if (g->kind != MP_KIND_STR) return 0;
    uint64_t k;
    if (!read_header(r, g, &k)) return 0;
    if (k > (uint64_t)PY_SSIZE_T_MAX || !need(r, (Py_ssize_t)k)) {
        r->err = "truncated msgpack body";
        r->short_data = 1;
        return 0;
    }
    const uint8_t *q = peek(r, (Py_ssize_t)k);
    if (!q) return 0;
    if (!valid_utf8(q, (Py_ssize_t)k)) {
        r->err = "map key is not valid UTF-8";
        return 0;
    }
    *key = q;
    *len = (Py_ssize_t)k;
    advance(r, (Py_ssize_t)k);
    return 1;
}
/* One feature entry (fixstr ASCII-or-UTF-8 key, then a scalar, str, bin or ext
 * value, or a list of scalars) whose key and value header lie in the current chunk: parsed straight
 * from the chunk, without a bounds check per field. Returns the entry's length
 * (the value may run into later chunks), or 0 to leave it to the general path,
 * which also reports any error. */
static inline Py_ssize_t fast_entry(const reader *r, const uint8_t **key, Py_ssize_t *kl) {
    Py_ssize_t avail = r->cend - r->pos;
    if (avail < 8) return 0;
    const uint8_t *p = r->cp + (r->pos - r->cbeg);
    uint8_t t = p[0];
    if (t < MP_FIXSTR || t > MP_FIXSTR_LAST) return 0;
    Py_ssize_t k = t - MP_FIXSTR, h = 1 + k;  /* h: offset of the value */
    if (h + MP_HEAD_MAX > avail) return 0;   /* the value's longest header must be here */
    if (!valid_utf8(p + 1, k)) return 0;
    uint8_t v = p[h];
    Py_ssize_t n = MP_FIXED_SIZE[v];
    if (!n) {
        /* A switch on the type byte, not on its kind: each case's table lookups fold into constants
         * (a switch on the kind, then on the width, made the whole trim a quarter slower). */
#define SIZED(op) case op: n = MP_TYPES[op].head + (Py_ssize_t)mp_be(p + h + 1, MP_TYPES[op].lenw); break;
        switch (v) {
        SIZED(MP_BIN8) SIZED(MP_BIN16) SIZED(MP_BIN32)
        SIZED(MP_STR8) SIZED(MP_STR16) SIZED(MP_STR32)
        SIZED(MP_EXT8) SIZED(MP_EXT16) SIZED(MP_EXT32)
#undef SIZED
        case MP_FIXARRAY ... MP_FIXARRAY_LAST: case MP_ARRAY16: {  /* (array32: left to the general path) */
            /* a list of scalars (history ids and the like), all in this chunk */
            Py_ssize_t count = (Py_ssize_t)mp_header_value(p + h), q = h + MP_TYPES[v].head;
            Py_ssize_t i = 0;
            if (count > 0 && q < avail) {
                /* Homogeneous lists (the common case: one encoding for every element) are
                 * checked at a fixed stride: independent loads instead of a dependent chain. */
                uint8_t t0 = p[q];
                Py_ssize_t e0 = MP_FIXED_SIZE[t0];
                if (e0 && q + count * e0 <= avail) {
                    Py_ssize_t same = 0;
                    for (Py_ssize_t j = 0; j < count; j++) same += p[q + j * e0] == t0;
                    if (same == count) { i = count; q += count * e0; }
                }
            }
            for (; i < count; i++) {
                if (q >= avail) return 0;
                Py_ssize_t e = MP_FIXED_SIZE[p[q]];
                if (!e) return 0;
                q += e;
            }
            if (q > avail) return 0;
            n = q - h;
            break;
        }
        default:
            return 0;  /* maps (and 0xc1) */
        }
    }
    if (n > r->total - r->pos - h) return 0;  /* not all in yet (or truncated) */
    if (h + n < avail) __builtin_prefetch(p + h + n);  /* the next entry's header: fetched while this key is looked up */
    *key = p + 1;
    *kl = k;
    return h + n;
}

#endif
