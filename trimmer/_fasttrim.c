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
 *
 * The msgpack grammar: msgpack_format.h; the chunked reader: msgpack_reader.h;
 * the allowlist table: nameset.h; the Python API: _fasttrim.pyi. The same
 * trim in Python (byte for byte, error for error): trimmer/_trim_py.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "msgpack_reader.h"
#include "nameset.h"

/* Where the scan of the request map is: the steps of its grammar. */
enum scan_phase {
    PHASE_TOP_HEADER,       /* the request map's header */
    PHASE_TOP_ENTRIES,      /* its entries (key, then a skipped value or the "features" map) */
    PHASE_FEATURE_ENTRIES,  /* the entries of "features", each kept or dropped */
    PHASE_DONE,             /* the request map is over: only trailing bytes could follow */
};

/* One trim in progress: the chunks seen so far and how far the scan got.
 * The scan resumes at feature granularity: an entry whose bytes are not all
 * in yet is rewound and rescanned when more arrive. */
typedef struct {
    reader r;
    Py_buffer *views;          /* one per chunk, released at the end */
    Py_ssize_t cap_chunks;
    nameset names;
    int names_borrowed;        /* the table belongs to a Names object, not to this state */
    enum scan_phase phase;
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
        if (s->phase == PHASE_TOP_HEADER) {
            why = "request must be a map at the top level";
            if (!read_map_header(r, &s->n_top)) goto failed;
            s->top_hdr_end = r->pos;
            if (!out_reserve(s, 5)) goto failed;
            s->out_len = mp_write_map_header(out_at(s, 0), s->n_top) - out_at(s, 0);
            s->phase = PHASE_TOP_ENTRIES;
        } else if (s->phase == PHASE_TOP_ENTRIES) {
            if (s->top_i == s->n_top) { s->phase = PHASE_DONE; continue; }
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
            s->hdr_w = mp_map_header_width(s->n_feat);
            s->out_len += s->hdr_w;
            s->feat_val_start = fvs;
            s->feat_j = 0;
            s->phase = PHASE_FEATURE_ENTRIES;
        } else if (s->phase == PHASE_FEATURE_ENTRIES) {
            if (s->feat_j == s->n_feat) {
                s->feat_val_end = r->pos;
                s->top_i++;
                s->phase = PHASE_TOP_ENTRIES;
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
        } else {  /* PHASE_DONE */
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
    Py_ssize_t w = mp_map_header_width((uint64_t)s->kept_count);
    if (w < s->hdr_w) {
        Py_ssize_t from = s->hdr_at + s->hdr_w;
        memmove(out_at(s, s->hdr_at + w), out_at(s, from), s->out_len - from);
        s->out_len -= s->hdr_w - w;
    }
    mp_write_map_header(out_at(s, s->hdr_at), (uint64_t)s->kept_count);
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

static PyObject *Names_get_allow(Names *self, void *Py_UNUSED(closure)) {
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

static PyObject *trim(PyObject *Py_UNUSED(self), PyObject *args) {
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

static PyObject *Trimmer_finish(Trimmer *self, PyObject *Py_UNUSED(unused)) {
    if (self->done) { PyErr_SetString(PyExc_RuntimeError, "Trimmer.finish called twice"); return NULL; }
    if (!self->allow) { PyErr_SetString(PyExc_RuntimeError, "Trimmer not initialised"); return NULL; }
    self->done = 1;
    state_scan(&self->s, 1);
    PyObject *result = state_result(&self->s);
    state_free(&self->s);  /* release the chunks now, not at garbage collection */
    return result;
}

static PyObject *Trimmer_get_rescanned(Trimmer *self, void *Py_UNUSED(closure)) {
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

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_fasttrim", .m_doc = NULL, .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fasttrim(void) {
    mp_tables_init();
    if (PyType_Ready(&TrimmerType) < 0 || PyType_Ready(&NamesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Trimmer", (PyObject *)&TrimmerType) < 0 ||
        PyModule_AddObjectRef(m, "Names", (PyObject *)&NamesType) < 0) { Py_DECREF(m); return NULL; }
    return m;
}
