/*
 * Byte-level msgpack trim: keep allowlisted entries of the top-level
 * "features" map without decoding any value.
 *
 * Why C: the trim must cost about a memcpy of the payload. A Python loop over
 * 2,000 features (or msgspec building 2,000 Raw objects) costs 5-8x a copy;
 * skipping values here costs a few nanoseconds each. Values are only skipped
 * (bounds-checked, depth-limited); kept bytes are memcpy'd verbatim.
 *
 * The body may come as several chunks (as the HTTP server received it), so
 * the root never joins a megabyte body just to trim it: the reader walks the
 * chunk list, and only a header or key that straddles two chunks is gathered
 * into a small scratch buffer.
 *
 * trim(body: buffer, allow: set|frozenset[str]) ->
 *     None                             if the top-level map has no "features"
 *     (bytes, features_in, features_kept)
 * Names(allow: frozenset): the allowlist compiled once; pass it as `allow`.
 * Trimmer(allow): .feed(chunk) scans what has arrived (a feature whose bytes
 *     are not all in yet is rescanned on the next feed); .finish() returns
 *     what trim() returns for the concatenated chunks.
 * Both raise ValueError("...") with a one-line message on malformed input.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

static inline uint64_t be(const uint8_t *p, int k) {
    uint64_t v = 0;
    for (int i = 0; i < k; i++) v = (v << 8) | p[i];
    return v;
}

/* Read a w-byte big-endian length at pos and step over it. */
static inline int read_be(reader *r, int w, uint64_t *out) {
    if (!need(r, w)) return 0;
    const uint8_t *q = peek(r, w);
    if (!q) return 0;
    *out = be(q, w);
    advance(r, w);
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

/* Total encoded size of every fixed-size msgpack object by its type byte
 * (0: variable size or container). One table load replaces a chain of
 * compares for the scalars that dominate list features. Filled at import. */
static uint8_t FIXED_SIZE[256];

static void fixed_size_init(void) {
    for (int t = 0; t <= 0x7f; t++) FIXED_SIZE[t] = 1;        /* positive fixint */
    for (int t = 0xe0; t <= 0xff; t++) FIXED_SIZE[t] = 1;     /* negative fixint */
    for (int t = 0xa0; t <= 0xbf; t++) FIXED_SIZE[t] = (uint8_t)(1 + (t & 0x1f));  /* fixstr */
    FIXED_SIZE[0xc0] = FIXED_SIZE[0xc2] = FIXED_SIZE[0xc3] = 1;  /* nil, false, true */
    FIXED_SIZE[0xcc] = FIXED_SIZE[0xd0] = 2;
    FIXED_SIZE[0xcd] = FIXED_SIZE[0xd1] = 3;
    FIXED_SIZE[0xca] = FIXED_SIZE[0xce] = FIXED_SIZE[0xd2] = 5;
    FIXED_SIZE[0xcb] = FIXED_SIZE[0xcf] = FIXED_SIZE[0xd3] = 9;
    FIXED_SIZE[0xd4] = 3; FIXED_SIZE[0xd5] = 4; FIXED_SIZE[0xd6] = 6; FIXED_SIZE[0xd7] = 10; FIXED_SIZE[0xd8] = 18;  /* fixext */
}

/* Skip `count` objects; returns 0 on error (r->err set). */
static int skip_n(reader *r, uint64_t count, int depth);

static int skip_one(reader *r, int depth) {
    if (depth > MAX_DEPTH) {
        r->err = "msgpack body nested too deeply";
        return 0;
    }
    if (!need(r, 1)) return 0;
    uint8_t t = byte_at_pos(r);
    Py_ssize_t k = FIXED_SIZE[t];
    if (k) {
        if (!need(r, k)) return 0;
        advance(r, k);
        return 1;
    }
    advance(r, 1);
    if (t >= 0x80 && t <= 0x8f) return skip_n(r, 2ull * (t & 0x0f), depth + 1);
    if (t >= 0x90 && t <= 0x9f) return skip_n(r, t & 0x0f, depth + 1);
    uint64_t len;
    switch (t) {
    case 0xc4: case 0xc5: case 0xc6:  /* bin 8/16/32 */
    case 0xd9: case 0xda: case 0xdb: {/* str 8/16/32 */
        int w = (t == 0xc4 || t == 0xd9) ? 1 : (t == 0xc5 || t == 0xda) ? 2 : 4;
        if (!read_be(r, w, &len)) return 0;
        return skip_bytes(r, len);
    }
    case 0xc7: case 0xc8: case 0xc9: { /* ext 8/16/32: length, type byte, data */
        int w = t == 0xc7 ? 1 : t == 0xc8 ? 2 : 4;
        if (!need(r, w + 1)) return 0;
        if (!read_be(r, w, &len)) return 0;
        advance(r, 1);
        return skip_bytes(r, len);
    }
    case 0xdc: case 0xdd: {     /* array 16/32 */
        if (!read_be(r, t == 0xdc ? 2 : 4, &len)) return 0;
        return skip_n(r, len, depth + 1);
    }
    case 0xde: case 0xdf: {     /* map 16/32 */
        if (!read_be(r, t == 0xde ? 2 : 4, &len)) return 0;
        return skip_n(r, 2 * len, depth + 1);
    }
    default: /* 0xc1: never used */
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
        Py_ssize_t k = FIXED_SIZE[byte_at_pos(r)];
        if (k) {  /* scalars inline; containers and variable-size values recurse */
            if (!need(r, k)) return 0;
            advance(r, k);
            continue;
        }
        if (!skip_one(r, depth)) return 0;
    }
    return 1;
}

/* 0 with r->err NULL when the object there is not a map. */
static int read_map_header(reader *r, uint64_t *count) {
    if (!need(r, 1)) return 0;
    uint8_t t = byte_at_pos(r);
    if (t >= 0x80 && t <= 0x8f) {
        advance(r, 1);
        *count = t & 0x0f;
        return 1;
    }
    if (t == 0xde || t == 0xdf) {
        int w = t == 0xde ? 2 : 4;
        if (!need(r, 1 + w)) return 0;
        advance(r, 1);
        return read_be(r, w, count);
    }
    return 0;
}

/* Strict UTF-8 check (as Python's decoder: no overlongs, surrogates or > U+10FFFF),
 * so the C trim rejects exactly the keys the msgspec fallback rejects. */
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
    uint8_t t = byte_at_pos(r);
    uint64_t k;
    if (t >= 0xa0 && t <= 0xbf) {
        k = t & 0x1f;
        advance(r, 1);
    } else if (t == 0xd9 || t == 0xda || t == 0xdb) {
        int w = t == 0xd9 ? 1 : t == 0xda ? 2 : 4;
        if (!need(r, 1 + w)) return 0;
        advance(r, 1);
        if (!read_be(r, w, &k)) return 0;
    } else {
        return 0;
    }
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

static uint8_t *write_map_header(uint8_t *o, uint64_t c) {
    if (c < 16) {
        *o++ = 0x80 | (uint8_t)c;
    } else if (c < 65536) {
        *o++ = 0xde;
        *o++ = (uint8_t)(c >> 8);
        *o++ = (uint8_t)c;
    } else {
        *o++ = 0xdf;
        *o++ = (uint8_t)(c >> 24);
        *o++ = (uint8_t)(c >> 16);
        *o++ = (uint8_t)(c >> 8);
        *o++ = (uint8_t)c;
    }
    return o;
}

/* Open-addressing set of allowlisted names as UTF-8 bytes (about 20 ns per
 * name to build) so the per-feature lookup creates no Python object. Laid
 * out for a body that has just evicted the caches: the probe reads only a
 * dense array of 8-byte hash tags (most features are not allowlisted, so most
 * lookups end there), and the names themselves are copied into one arena
 * instead of being read from str objects strewn over the heap. */
typedef struct { uint32_t off, n; } name_ref;
typedef struct { uint64_t *tags; name_ref *refs; const uint8_t *arena; uint64_t mask; } nameset;  /* tag 0: empty */

/* Word-at-a-time hash (a splitmix64-style mix per 8 bytes): a byte-wise FNV
 * was a fifth of the trim's time on 12-byte names. */
static inline uint64_t name_hash(const uint8_t *p, Py_ssize_t n) {
    uint64_t h = 0x9e3779b97f4a7c15ull ^ (uint64_t)n, w;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
    }
    if (i < n) {
        if (n >= 8) {
            memcpy(&w, p + n - 8, 8);  /* overlapping tail: one load, no byte loop through the stack */
        } else {
            w = 0;
            for (Py_ssize_t k = 0; k < n; k++) w |= (uint64_t)p[k] << (8 * k);
        }
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
    }
    /* murmur3 fmix64: a multiply only carries upwards, so fold the high bits
     * (where the last characters of a name land) into the low bits the table uses */
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 33);
}

/* UTF-8 of a str name, or NULL with no error for a non-str (it can never match a str key). */
static const char *name_utf8(PyObject *key, Py_ssize_t *len) {
    if (!PyUnicode_Check(key)) return NULL;
    return PyUnicode_AsUTF8AndSize(key, len);
}

static inline uint64_t name_tag(const uint8_t *p, Py_ssize_t n) {
    uint64_t h = name_hash(p, n);
    return h ? h : 1;
}

static int nameset_build(nameset *ns, PyObject *allow) {
    Py_ssize_t n = PySet_GET_SIZE(allow), total = 0, len;
    uint64_t cap = 16;
    while (cap < (uint64_t)n * 2 + 1) cap <<= 1;
    PyObject *it = PyObject_GetIter(allow), *key;
    if (!it) return 0;
    while ((key = PyIter_Next(it)) != NULL) {  /* first pass: the arena's size */
        Py_DECREF(key);
        if (name_utf8(key, &len)) total += len;
        else if (PyErr_Occurred()) break;
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return 0;
    if (total >= (Py_ssize_t)UINT32_MAX) { PyErr_SetString(PyExc_ValueError, "allowlist names too long in total"); return 0; }
    /* one block: tags, then refs, then the arena (freed through ns->tags) */
    ns->tags = (uint64_t *)PyMem_Calloc(1, cap * (sizeof(uint64_t) + sizeof(name_ref)) + (size_t)total + 1);
    if (!ns->tags) { PyErr_NoMemory(); return 0; }
    ns->refs = (name_ref *)(ns->tags + cap);
    uint8_t *arena = (uint8_t *)(ns->refs + cap);
    ns->arena = arena;
    ns->mask = cap - 1;
    uint64_t used = 0;
    it = PyObject_GetIter(allow);
    if (!it) return 0;
    while ((key = PyIter_Next(it)) != NULL) {
        Py_DECREF(key);  /* the set keeps it (and its UTF-8 cache) alive for this call */
        const char *u = name_utf8(key, &len);
        if (!u) { if (PyErr_Occurred()) break; continue; }
        if (used + (uint64_t)len > (uint64_t)total) continue;  /* the set changed meanwhile: never overrun the arena */
        uint64_t t = name_tag((const uint8_t *)u, len), i = t & ns->mask;
        while (ns->tags[i]) {
            if (ns->tags[i] == t && ns->refs[i].n == (uint64_t)len && memcmp(arena + ns->refs[i].off, u, len) == 0) break;
            i = (i + 1) & ns->mask;
        }
        if (!ns->tags[i]) {
            memcpy(arena + used, u, len);
            ns->tags[i] = t;
            ns->refs[i].off = (uint32_t)used;
            ns->refs[i].n = (uint32_t)len;
            used += (uint64_t)len;
        }
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? 0 : 1;
}

static inline int nameset_has(const nameset *ns, const uint8_t *p, Py_ssize_t n) {
    uint64_t t = name_tag(p, n), i = t & ns->mask, x;
    while ((x = ns->tags[i]) != 0) {
        if (x == t && ns->refs[i].n == (uint64_t)n && memcmp(ns->arena + ns->refs[i].off, p, n) == 0) return 1;
        i = (i + 1) & ns->mask;
    }
    return 0;
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
    if (t < 0xa0 || t > 0xbf) return 0;
    Py_ssize_t k = t & 0x1f, h = 1 + k;  /* h: offset of the value */
    if (h + 6 > avail) return 0;          /* the value's longest header (ext 32) must be here */
    if (!valid_utf8(p + 1, k)) return 0;
    uint8_t v = p[h];
    Py_ssize_t n = FIXED_SIZE[v];
    if (!n) {
        switch (v) {
        case 0xc4: case 0xd9: n = 2 + (Py_ssize_t)p[h + 1]; break;
        case 0xc5: case 0xda: n = 3 + (Py_ssize_t)be(p + h + 1, 2); break;
        case 0xc6: case 0xdb: n = 5 + (Py_ssize_t)be(p + h + 1, 4); break;
        case 0xc7: n = 3 + (Py_ssize_t)p[h + 1]; break;
        case 0xc8: n = 4 + (Py_ssize_t)be(p + h + 1, 2); break;
        case 0xc9: n = 6 + (Py_ssize_t)be(p + h + 1, 4); break;
        default: {
            /* a list of scalars (history ids and the like), all in this chunk */
            Py_ssize_t count, q;
            if (v >= 0x90 && v <= 0x9f) { count = v & 0x0f; q = h + 1; }
            else if (v == 0xdc) { count = (Py_ssize_t)be(p + h + 1, 2); q = h + 3; }
            else return 0;  /* maps, big arrays (and 0xc1) */
            Py_ssize_t i = 0;
            if (count > 0 && q < avail) {
                /* Homogeneous lists (the common case: one encoding for every element) are
                 * checked at a fixed stride: independent loads instead of a dependent chain. */
                uint8_t t0 = p[q];
                Py_ssize_t e0 = FIXED_SIZE[t0];
                if (e0 && q + count * e0 <= avail) {
                    Py_ssize_t same = 0;
                    for (Py_ssize_t j = 0; j < count; j++) same += p[q + j * e0] == t0;
                    if (same == count) { i = count; q += count * e0; }
                }
            }
            for (; i < count; i++) {
                if (q >= avail) return 0;
                Py_ssize_t e = FIXED_SIZE[p[q]];
                if (!e) return 0;
                q += e;
            }
            if (q > avail) return 0;
            n = q - h;
        }
        }
    }
    if (n > r->total - r->pos - h) return 0;  /* not all in yet (or truncated) */
    if (h + n < avail) __builtin_prefetch(p + h + n);  /* the next entry's header: fetched while this key is looked up */
    *key = p + 1;
    *kl = k;
    return h + n;
}

/* One trim in progress: the chunks seen so far and how far the scan got.
 * The scan resumes at feature granularity: an entry whose bytes are not all
 * in yet is rewound and rescanned when more arrive. */
typedef struct {
    reader r;
    Py_buffer *views;          /* one per chunk, released at the end */
    Py_ssize_t cap_chunks;
    nameset names;
    int names_borrowed;        /* the table belongs to a Names object, not to this state */
    int phase;                 /* 0 top header, 1 top entries, 2 feature entries, 3 top map done */
    uint64_t n_top, top_i, n_feat, feat_j;
    Py_ssize_t top_hdr_end, feat_val_start, feat_val_end;
    PyObject *out;             /* the trimmed body, written as the scan accepts each part (bytes, over-allocated) */
    Py_ssize_t out_len, out_cap, size_hint;
    double *out_ratio;         /* the Names' output/input ratio of its last trim (NULL: a plain set) */
    Py_ssize_t hdr_at, hdr_w;  /* where the "features" map header goes, and the width reserved for it */
    Py_ssize_t kept_count;
    Py_ssize_t retry_at;       /* after a short entry: rescan once this many bytes are in */
    Py_ssize_t rescanned;      /* bytes scanned and then rewound to wait for more (a diagnostic) */
    const char *error;         /* sticky: the body is malformed */
    int nomem;
} trim_state;

static void state_init(trim_state *s) {
    memset(s, 0, sizeof(*s));
    s->feat_val_start = s->feat_val_end = -1;
}

static void state_free(trim_state *s) {
    for (Py_ssize_t i = 0; i < s->r.n_chunks; i++) PyBuffer_Release(&s->views[i]);
    PyMem_Free(s->views);
    PyMem_Free(s->r.chunks);
    PyMem_Free(s->r.scratch);
    Py_CLEAR(s->out);
    if (!s->names_borrowed) PyMem_Free(s->names.tags);
    memset(s, 0, sizeof(*s));
}

/* Takes a buffer view of obj (kept until state_free). 0 with a Python error set on failure. */
static int state_add_chunk(trim_state *s, PyObject *obj) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return 0;
    if (view.len == 0) { PyBuffer_Release(&view); return 1; }
    if (s->r.n_chunks == s->cap_chunks) {
        Py_ssize_t cap = s->cap_chunks ? s->cap_chunks * 2 : 16;
        Py_buffer *v = (Py_buffer *)PyMem_Realloc(s->views, cap * sizeof(Py_buffer));
        if (v) s->views = v;
        chunk_t *c = v ? (chunk_t *)PyMem_Realloc(s->r.chunks, cap * sizeof(chunk_t)) : NULL;
        if (!v || !c) { PyBuffer_Release(&view); PyErr_NoMemory(); return 0; }
        s->r.chunks = c;
        s->cap_chunks = cap;
    }
    Py_ssize_t i = s->r.n_chunks++;
    s->views[i] = view;
    s->r.chunks[i].p = (const uint8_t *)view.buf;
    s->r.chunks[i].start = s->r.total;
    s->r.chunks[i].len = view.len;
    s->r.total += view.len;
    if (i == 0) set_chunk(&s->r, 0);
    else seek(&s->r);  /* pos may have been waiting at the old end */
    return 1;
}

/* Copy body bytes [start, end) into o, across chunks; *hint is a chunk index at or before start. */
static uint8_t *copy_range(const reader *r, uint8_t *o, Py_ssize_t start, Py_ssize_t end, Py_ssize_t *hint) {
    Py_ssize_t ci = *hint;
    while (start < end) {
        while (start >= r->chunks[ci].start + r->chunks[ci].len) ci++;
        const chunk_t *c = &r->chunks[ci];
        Py_ssize_t off = start - c->start, take = c->len - off;
        if (take > end - start) take = end - start;
        memcpy(o, c->p + off, take);
        o += take;
        start += take;
    }
    *hint = ci;
    return o;
}

/* Room for k more output bytes. The output is sized from the size hint (the
 * body's length) times what the same allowlist kept last time, and doubles if
 * that was short; it is shrunk to its length when the trim is done. A first
 * trim takes the whole hint: a trim never outgrows its body by over 8 bytes. */
static int out_reserve(trim_state *s, Py_ssize_t k) {
    if (s->out && s->out_len + k <= s->out_cap) return 1;
    Py_ssize_t cap = s->out_cap * 2;
    if (!cap) {
        cap = 64 * 1024;
        if (s->size_hint > 0)  /* the allowlist's last output/input ratio, with slack; the body's length at first */
            cap = s->out_ratio && *s->out_ratio > 0 ? (Py_ssize_t)((double)s->size_hint * *s->out_ratio * 1.05) + 1024 : s->size_hint + 16;
    }
    while (cap < s->out_len + k) cap *= 2;
    if (!s->out) s->out = PyBytes_FromStringAndSize(NULL, cap);
    else if (_PyBytes_Resize(&s->out, cap) < 0) s->out = NULL;  /* (Resize freed it) */
    if (!s->out) { PyErr_Clear(); s->r.err = OUT_OF_MEMORY; return 0; }  /* reported by the result */
    s->out_cap = cap;
    return 1;
}

static inline uint8_t *out_at(trim_state *s, Py_ssize_t i) { return (uint8_t *)PyBytes_AS_STRING(s->out) + i; }

/* Append body bytes [start, end), which lie at or before the scan position: copied
 * as soon as the scan has accepted them, while they are still in the caches. */
static int out_copy(trim_state *s, Py_ssize_t start, Py_ssize_t end) {
    if (!out_reserve(s, end - start)) return 0;
    const reader *r = &s->r;
    Py_ssize_t ci = r->ci;
    while (ci > 0 && start < r->chunks[ci].start) ci--;
    copy_range(r, out_at(s, s->out_len), start, end, &ci);
    s->out_len += end - start;
    return 1;
}

static inline Py_ssize_t map_header_width(uint64_t c) { return c < 16 ? 1 : c < 65536 ? 3 : 5; }

/* Scan as far as the bytes allow. `final`: no more bytes will come, so a
 * short read is an error. Returns 0 once the body is known malformed (s->error). */
static int state_scan(trim_state *s, int final) {
    reader *r = &s->r;
    if (s->error) return 0;
    if (!final && r->total < s->retry_at) return 1;
    for (;;) {
        Py_ssize_t mark = r->pos;
        const char *why = NULL;  /* message when the step fails without r->err */
        r->err = NULL;
        r->short_data = 0;
        if (s->phase == 0) {
            why = "request must be a map at the top level";
            if (!read_map_header(r, &s->n_top)) goto failed;
            s->top_hdr_end = r->pos;
            if (!out_reserve(s, 5)) goto failed;
            s->out_len = write_map_header(out_at(s, 0), s->n_top) - out_at(s, 0);
            s->phase = 1;
        } else if (s->phase == 1) {
            if (s->top_i == s->n_top) { s->phase = 3; continue; }
            const uint8_t *key;
            Py_ssize_t kl;
            why = "request keys must be strings";
            if (!read_str(r, &key, &kl)) goto failed;
            if (!(kl == 8 && memcmp(key, "features", 8) == 0)) {
                if (!skip_one(r, 1)) goto failed;
                s->top_i++;
                continue;
            }
            if (s->feat_val_start >= 0) { r->err = "duplicate \"features\" key in request"; goto failed; }
            Py_ssize_t fvs = r->pos;
            why = "\"features\" must be a map of feature name to value";
            if (!read_map_header(r, &s->n_feat)) goto failed;
            if (s->n_feat > (uint64_t)(r->total - r->pos)) {
                r->err = "truncated msgpack body";
                r->short_data = 1;
                goto failed;
            }
            /* the top-level entries before "features", then room for its header (the count is known at the end) */
            if (!out_copy(s, s->top_hdr_end, fvs) || !out_reserve(s, 5)) goto failed;
            s->hdr_at = s->out_len;
            s->hdr_w = map_header_width(s->n_feat);
            s->out_len += s->hdr_w;
            s->feat_val_start = fvs;
            s->feat_j = 0;
            s->phase = 2;
        } else if (s->phase == 2) {
            if (s->feat_j == s->n_feat) {
                s->feat_val_end = r->pos;
                s->top_i++;
                s->phase = 1;
                continue;
            }
            const uint8_t *key;
            Py_ssize_t kl, len = fast_entry(r, &key, &kl);
            int keep;
            if (len) {
                keep = nameset_has(&s->names, key, kl);
                advance(r, len);
            } else {
                why = "\"features\" keys must be strings";
                if (!read_str(r, &key, &kl)) goto failed;
                keep = nameset_has(&s->names, key, kl);  /* before the skip: key may live in scratch */
                if (!skip_one(r, 2)) goto failed;
            }
            if (keep) {
                if (!out_copy(s, mark, r->pos)) goto failed;
                s->kept_count++;
            }
            s->feat_j++;
        } else {
            if (final && r->pos != r->total) { r->err = "trailing bytes after the msgpack request map"; goto failed; }
            return 1;
        }
        continue;
    failed:
        if (r->short_data && !final) {  /* wait for more bytes: rescan this entry then */
            /* Not before the bytes past its start have doubled: an entry (or a non-feature value)
             * spanning many chunks is rescanned O(log) times, not once per chunk (quadratic). */
            s->retry_at = mark + 2 * (r->total - mark);
            s->rescanned += r->pos - mark;
            r->pos = mark;
            seek(r);
            return 1;
        }
        if (r->err == OUT_OF_MEMORY) s->nomem = 1;
        s->error = r->err ? r->err : why;
        return 0;
    }
}

/* The result of a finished scan: None, or (bytes, features_in, features_kept). */
static PyObject *state_result(trim_state *s) {
    if (s->nomem) return PyErr_NoMemory();
    if (s->error) { PyErr_SetString(PyExc_ValueError, s->error); return NULL; }
    if (s->feat_val_start < 0) Py_RETURN_NONE;
    /* the "features" header in the room reserved for it; a narrower one (fewer kept) closes the gap */
    Py_ssize_t w = map_header_width((uint64_t)s->kept_count);
    if (w < s->hdr_w) {
        Py_ssize_t from = s->hdr_at + s->hdr_w;
        memmove(out_at(s, s->hdr_at + w), out_at(s, from), s->out_len - from);
        s->out_len -= s->hdr_w - w;
    }
    write_map_header(out_at(s, s->hdr_at), (uint64_t)s->kept_count);
    if (!out_copy(s, s->feat_val_end, s->r.total)) return PyErr_NoMemory();  /* the top-level entries after it */
    if (s->out_ratio && s->r.total > 0) *s->out_ratio = (double)s->out_len / (double)s->r.total;
    PyObject *out = s->out;
    s->out = NULL;
    if (_PyBytes_Resize(&out, s->out_len) < 0) return NULL;
    return Py_BuildValue("(NKn)", out, (unsigned long long)s->n_feat, s->kept_count);
}

/* ------------------------------------------------------------------ Names */

/* An allowlist compiled once into the lookup table, so a trim per request
 * does not rebuild it (about 25 us for 400 names). Holds the frozenset it was
 * built from (the `allow` attribute: a cache keyed by its id stays valid). */
typedef struct {
    PyObject_HEAD
    PyObject *allow;
    nameset names;
    double out_ratio;  /* trimmed/untrimmed bytes of the last trim with this table: sizes the next output */
} Names;

static PyTypeObject NamesType;

static int check_allow(PyObject *allow);

static int Names_init(Names *self, PyObject *args, PyObject *kwds) {
    PyObject *allow;
    static char *kwlist[] = {"allow", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &allow)) return -1;
    if (!PyFrozenSet_Check(allow)) {
        PyErr_SetString(PyExc_TypeError, "Names(allow): allow must be a frozenset of str (a set could change under the table)");
        return -1;
    }
    if (self->allow) {  /* trimmers may be borrowing the table */
        PyErr_SetString(PyExc_RuntimeError, "Names is already initialised");
        return -1;
    }
    self->allow = Py_NewRef(allow);
    return nameset_build(&self->names, allow) ? 0 : -1;
}

static void Names_dealloc(Names *self) {
    PyMem_Free(self->names.tags);
    Py_XDECREF(self->allow);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Names_get_allow(Names *self, void *closure) {
    if (!self->allow) Py_RETURN_NONE;
    return Py_NewRef(self->allow);
}

static PyGetSetDef Names_getset[] = {
    {"allow", (getter)Names_get_allow, NULL, "the frozenset this table was built from", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject NamesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trimmer._fasttrim.Names",
    .tp_basicsize = sizeof(Names),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Names(allow: frozenset[str]): an allowlist compiled for trim() and Trimmer",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Names_init,
    .tp_dealloc = (destructor)Names_dealloc,
    .tp_getset = Names_getset,
};

/* Point the state at `allow`'s table: borrowed from a Names (caller keeps it alive), or built. */
static int state_use_names(trim_state *s, PyObject *allow) {
    if (PyObject_TypeCheck(allow, &NamesType)) {
        Names *n = (Names *)allow;
        if (!n->allow) { PyErr_SetString(PyExc_RuntimeError, "Names not initialised"); return 0; }
        s->names = n->names;
        s->names_borrowed = 1;
        s->out_ratio = &n->out_ratio;
        return 1;
    }
    if (!check_allow(allow)) return 0;
    return nameset_build(&s->names, allow);
}

static int check_allow(PyObject *allow) {
    if (!PyAnySet_Check(allow)) {
        PyErr_SetString(PyExc_TypeError, "allow must be a set or frozenset of str, or Names");
        return 0;
    }
    return 1;
}

static PyObject *trim(PyObject *self, PyObject *args) {
    PyObject *body, *allow, *result = NULL;
    if (!PyArg_ParseTuple(args, "OO", &body, &allow)) return NULL;
    trim_state s;
    state_init(&s);
    if (state_use_names(&s, allow) && state_add_chunk(&s, body)) {
        s.size_hint = s.r.total;
        state_scan(&s, 1);
        result = state_result(&s);
    }
    state_free(&s);
    return result;
}

/* ------------------------------------------------------------------ Trimmer */

typedef struct {
    PyObject_HEAD
    PyObject *allow;  /* the set or Names the table came from (a Names owns the table this state borrows) */
    trim_state s;
    Py_ssize_t rescanned;  /* kept past finish(), which frees the state */
    int done;
} Trimmer;

static int Trimmer_init(Trimmer *self, PyObject *args, PyObject *kwds) {
    PyObject *allow;
    Py_ssize_t size_hint = 0;
    static char *kwlist[] = {"allow", "size_hint", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|n", kwlist, &allow, &size_hint)) return -1;
    state_free(&self->s);
    state_init(&self->s);
    self->s.size_hint = size_hint > 0 ? size_hint : 0;
    Py_XSETREF(self->allow, Py_NewRef(allow));
    self->done = 0;
    return state_use_names(&self->s, allow) ? 0 : -1;
}

static void Trimmer_dealloc(Trimmer *self) {
    state_free(&self->s);
    Py_XDECREF(self->allow);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Trimmer_feed(Trimmer *self, PyObject *chunk) {
    if (self->done) { PyErr_SetString(PyExc_RuntimeError, "Trimmer.feed after finish"); return NULL; }
    if (!self->allow) { PyErr_SetString(PyExc_RuntimeError, "Trimmer not initialised"); return NULL; }
    if (!state_add_chunk(&self->s, chunk)) return NULL;
    state_scan(&self->s, 0);  /* a malformed body is reported by finish() */
    self->rescanned = self->s.rescanned;
    Py_RETURN_NONE;
}

static PyObject *Trimmer_finish(Trimmer *self, PyObject *unused) {
    if (self->done) { PyErr_SetString(PyExc_RuntimeError, "Trimmer.finish called twice"); return NULL; }
    if (!self->allow) { PyErr_SetString(PyExc_RuntimeError, "Trimmer not initialised"); return NULL; }
    self->done = 1;
    state_scan(&self->s, 1);
    PyObject *result = state_result(&self->s);
    state_free(&self->s);  /* release the chunks now, not at garbage collection */
    return result;
}

static PyObject *Trimmer_get_rescanned(Trimmer *self, void *closure) {
    return PyLong_FromSsize_t(self->rescanned);
}

static PyGetSetDef Trimmer_getset[] = {
    {"rescanned", (getter)Trimmer_get_rescanned, NULL, "bytes scanned, then rewound to wait for the rest of an entry", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Trimmer_methods[] = {
    {"feed", (PyCFunction)Trimmer_feed, METH_O, "feed(chunk): add the next bytes of the body and scan what can be scanned"},
    {"finish", (PyCFunction)Trimmer_finish, METH_NOARGS, "finish() -> None | (bytes, features_in, features_kept)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TrimmerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trimmer._fasttrim.Trimmer",
    .tp_basicsize = sizeof(Trimmer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Trimmer(allow, size_hint=0): trim a msgpack body fed chunk by chunk (size_hint: its expected length)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Trimmer_init,
    .tp_dealloc = (destructor)Trimmer_dealloc,
    .tp_methods = Trimmer_methods,
    .tp_getset = Trimmer_getset,
};

static PyMethodDef methods[] = {
    {"trim", trim, METH_VARARGS, "trim(body, allow) -> None | (bytes, features_in, features_kept)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fasttrim", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fasttrim(void) {
    fixed_size_init();
    if (PyType_Ready(&TrimmerType) < 0 || PyType_Ready(&NamesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Trimmer", (PyObject *)&TrimmerType) < 0 ||
        PyModule_AddObjectRef(m, "Names", (PyObject *)&NamesType) < 0) { Py_DECREF(m); return NULL; }
    return m;
}
