/*
 * msgspec ext hook for wire tensors (docs/protocol.md: ext type 1, u8 dtype
 * code, u8 ndim, ndim little-endian u32 dims, raw data), in C.
 *
 * Why C: msgspec calls the hook once per tensor; the Python hook (struct
 * unpack, slicing, object set-up) cost about 1.4 us per tensor, more than
 * msgspec's whole decode of a request. This one builds the same Tensor (its
 * data a zero-copy memoryview slice of the body) in a fraction of that.
 *
 * configure(tensor_cls, dtypes: dict[int, tuple[str, int]], max_ndim, ext_code, fallback)
 * hook(code, data) -> Tensor; anything it does not accept as well-formed
 *     (another ext code, unknown dtype, bad header or length) goes to
 *     `fallback(code, data)`, the library's own hook, so errors read the same.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *tensor_cls = NULL, *fallback = NULL;
static PyObject *dtype_names[256];
static Py_ssize_t dtype_sizes[256];
static int max_ndim = 0;
static long ext_code = -1;
static PyObject *s_dtype = NULL, *s_shape = NULL, *s_data = NULL;

static PyObject *configure(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *cls, *table, *fb;
    int nd;
    long code;
    if (!PyArg_ParseTuple(args, "OO!ilO", &cls, &PyDict_Type, &table, &nd, &code, &fb)) return NULL;
    if (!PyType_Check(cls) || !PyCallable_Check(fb) || nd < 0 || nd > 255) {
        PyErr_SetString(PyExc_TypeError, "configure(tensor_cls, dtypes, max_ndim, ext_code, fallback)");
        return NULL;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    PyObject *names[256] = {NULL};
    Py_ssize_t sizes[256] = {0};
    while (PyDict_Next(table, &pos, &key, &value)) {
        long c = PyLong_AsLong(key);
        PyObject *name;
        Py_ssize_t size;
        if ((c == -1 && PyErr_Occurred()) || c < 0 || c > 255 || !PyArg_ParseTuple(value, "Un", &name, &size) || size <= 0) {
            PyErr_Clear();
            for (int i = 0; i < 256; i++) Py_XDECREF(names[i]);
            PyErr_SetString(PyExc_ValueError, "dtypes must map a code 0..255 to (name, itemsize > 0)");
            return NULL;
        }
        Py_XSETREF(names[c], Py_NewRef(name));
        sizes[c] = size;
    }
    for (int i = 0; i < 256; i++) {
        Py_XSETREF(dtype_names[i], names[i]);
        dtype_sizes[i] = sizes[i];
    }
    Py_XSETREF(tensor_cls, Py_NewRef(cls));
    Py_XSETREF(fallback, Py_NewRef(fb));
    max_ndim = nd;
    ext_code = code;
    Py_RETURN_NONE;
}

/* 1: *out is the Tensor; 0: the payload is not plainly well formed (no error set); -1: error set. */
static int build(PyObject *data, PyObject **out) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return 0;
    }
    const uint8_t *p = (const uint8_t *)view.buf;
    Py_ssize_t n = view.len;
    int status = 0;
    PyObject *shape = NULL, *slice = NULL, *sub = NULL;
    if (n < 2) goto done;
    int code = p[0], nd = p[1];
    PyObject *name = dtype_names[code];
    if (!name || nd > max_ndim) goto done;
    Py_ssize_t head = 2 + 4 * (Py_ssize_t)nd;
    if (n < head) goto done;
    uint64_t count = 1;
    shape = PyTuple_New(nd);
    if (!shape) goto error;
    for (int i = 0; i < nd; i++) {
        const uint8_t *d = p + 2 + 4 * i;
        uint32_t dim = (uint32_t)d[0] | ((uint32_t)d[1] << 8) | ((uint32_t)d[2] << 16) | ((uint32_t)d[3] << 24);
        if (dim && count > UINT64_MAX / dim) goto done;  /* cannot match any real length */
        count *= dim;
        PyObject *v = PyLong_FromUnsignedLong(dim);
        if (!v) goto error;
        PyTuple_SET_ITEM(shape, i, v);
    }
    if (count > (uint64_t)PY_SSIZE_T_MAX / (uint64_t)dtype_sizes[code] ||
        (uint64_t)(n - head) != count * (uint64_t)dtype_sizes[code]) goto done;
    PyObject *start = PyLong_FromSsize_t(head);
    if (!start) goto error;
    slice = PySlice_New(start, NULL, NULL);
    Py_DECREF(start);
    if (!slice) goto error;
    sub = PyObject_GetItem(data, slice);
    if (!sub) goto error;
    PyObject *obj = ((PyTypeObject *)tensor_cls)->tp_alloc((PyTypeObject *)tensor_cls, 0);
    if (!obj) goto error;
    if (PyObject_GenericSetAttr(obj, s_dtype, name) < 0 || PyObject_GenericSetAttr(obj, s_shape, shape) < 0 ||
        PyObject_GenericSetAttr(obj, s_data, sub) < 0) {
        Py_DECREF(obj);
        goto error;
    }
    *out = obj;
    status = 1;
    goto done;
error:
    if (!PyErr_Occurred()) PyErr_NoMemory();
    status = -1;
done:
    PyBuffer_Release(&view);
    Py_XDECREF(shape);
    Py_XDECREF(slice);
    Py_XDECREF(sub);
    return status;
}

static PyObject *hook(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "hook(code, data)");
        return NULL;
    }
    if (!tensor_cls) {
        PyErr_SetString(PyExc_RuntimeError, "_tensorext.configure() was not called");
        return NULL;
    }
    long code = PyLong_AsLong(args[0]);
    if (code == -1 && PyErr_Occurred()) return NULL;
    if (code == ext_code) {
        PyObject *t = NULL;
        int status = build(args[1], &t);
        if (status < 0) return NULL;
        if (status > 0) return t;
    }
    return PyObject_Vectorcall(fallback, args, nargs, NULL);  /* the library's hook: its tensor, or its error */
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "configure(tensor_cls, dtypes, max_ndim, ext_code, fallback)"},
    {"hook", (PyCFunction)(void (*)(void))hook, METH_FASTCALL, "hook(code, data) -> Tensor (msgspec ext_hook)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_tensorext", .m_doc = NULL, .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__tensorext(void) {
    s_dtype = PyUnicode_InternFromString("dtype");
    s_shape = PyUnicode_InternFromString("shape");
    s_data = PyUnicode_InternFromString("data");
    if (!s_dtype || !s_shape || !s_data) return NULL;
    return PyModule_Create(&module);
}
