/*
 * The allowlist of _fasttrim.c as a lookup table over UTF-8 bytes, so that
 * matching a feature's key (bytes in the body) against it creates no Python
 * object.
 *
 * Single-translation-unit header: included by _fasttrim.c only (after Python.h).
 */
#ifndef TRIMMER_NAMESET_H
#define TRIMMER_NAMESET_H

#include <stdint.h>
#include <string.h>

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

#endif
