/*
 * webapi.proxy._cresp: a whole simple upstream response read in one call, in C.
 *
 * Reference (the fallback and the tests' oracle): `webapi.proxy.connection.Connection`,
 * whose `data_received` feeds httptools' `HttpResponseParser` and records the response
 * from its callbacks (`on_status`, `on_header`, `on_headers_complete`, `on_body`,
 * `on_message_complete`). On the fast path the usual response is small and arrives
 * whole in the first read of its exchange; for exactly that case
 * `parse_response(data, head_request)` returns what those callbacks would have recorded,
 * without the parser's per-callback calls into Python:
 *
 *     (status, reason, raw_headers, content_length, keep_alive, body)
 *
 * status an int, reason the bytes `on_status` gives (b"" when there is none),
 * raw_headers a new list of (name, value) bytes tuples as `on_header` records them
 * (value without its leading spaces and tabs, with any trailing ones, as llhttp gives
 * it), content_length the Content-Length field's value (bytes, the object in
 * raw_headers) or None, keep_alive what httptools' `should_keep_alive()` says, body the
 * body's bytes (b"" when there is none).
 *
 * It answers only `data` that is exactly one final response: the status line
 * `HTTP/1.1 <200-599> [<reason>]`, header fields, the blank line and then a body of
 * exactly its Content-Length, or nothing for a HEAD request, a 204 or a 304. It
 * declines (returns None; httptools then reads the bytes, as without the C) anything
 * else, and anything httptools might read otherwise: another HTTP version, a 1xx or an
 * out-of-range status, a partial message, bytes after the message, a body-bearing
 * response (a HEAD's included) without Content-Length, any Transfer-Encoding, Upgrade
 * or Proxy-Connection field, more than one Content-Length or one that is not digits
 * alone, a Connection field other than `close` or `keep-alive`, bare LF or CR,
 * obs-fold, control bytes (other than tab) in the reason or a value, a field name
 * that is not a token, and a non-bytes `data`.
 *
 * Why these keep the answer equal to httptools' (tests/webapi/test_c_cresp.py checks
 * it against the reference, ordinary responses and fuzzed ones alike): with HTTP/1.1,
 * a Content-Length and no Transfer-Encoding, llhttp's framing is the Content-Length's,
 * or none after a HEAD (the connection's rule), a 204 or a 304; `should_keep_alive()`
 * is then false only for a `close` token in Connection. No static state but constants.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* RFC 9110 tchar: the bytes of a field name. */
static const unsigned char TCHAR[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1,
    ['+'] = 1, ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1,
    ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1,
    ['7'] = 1, ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1,
    ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1,
    ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1,
    ['V'] = 1, ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1,
    ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1,
    ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1,
    ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

/* A byte of a reason or a field value: tab, space, VCHAR, obs-text. No other control
 * byte: llhttp refuses some in values (and takes some in the reason); never guess. */
static int text_byte(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

/* Whether [s, s+n) is `lower` (all lower case) but for ASCII case. */
static int equals_ci(const unsigned char *s, Py_ssize_t n, const char *lower) {
    Py_ssize_t i;
    if ((size_t)n != strlen(lower)) return 0;
    for (i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c >= 'A' && c <= 'Z') c = (unsigned char)(c + 32);
        if (c != (unsigned char)lower[i]) return 0;
    }
    return 1;
}

/* Field names llhttp reads for framing or connection state. */
enum { OTHER, CONTENT_LENGTH, CONNECTION, REFUSED };

static int field_kind(const unsigned char *name, Py_ssize_t n) {
    switch (n) {
    case 14: return equals_ci(name, n, "content-length") ? CONTENT_LENGTH : OTHER;
    case 10: return equals_ci(name, n, "connection") ? CONNECTION : OTHER;
    case 17: return equals_ci(name, n, "transfer-encoding") ? REFUSED : OTHER;
    case 16: return equals_ci(name, n, "proxy-connection") ? REFUSED : OTHER;
    case 7: return equals_ci(name, n, "upgrade") ? REFUSED : OTHER;
    default: return OTHER;
    }
}

/* A new (name, value) tuple of bytes, or NULL with an exception set. */
static PyObject *field_tuple(const unsigned char *name, Py_ssize_t name_len,
                             const unsigned char *value, Py_ssize_t value_len) {
    PyObject *field = PyTuple_New(2);
    if (field == NULL) return NULL;
    PyObject *n = PyBytes_FromStringAndSize((const char *)name, name_len);
    PyTuple_SET_ITEM(field, 0, n);
    PyObject *v = n == NULL ? NULL : PyBytes_FromStringAndSize((const char *)value, value_len);
    PyTuple_SET_ITEM(field, 1, v);
    if (v == NULL) {
        Py_DECREF(field);  /* NULL items are skipped by the tuple's dealloc */
        return NULL;
    }
    return field;
}

/* The most digits a Content-Length may have here: the body must be in `data`. */
#define MAX_LENGTH_DIGITS 15

static PyObject *parse_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_response(data, head_request)");
        return NULL;
    }
    PyObject *data = args[0];
    int head_request = PyObject_IsTrue(args[1]);
    if (head_request < 0) return NULL;
    if (!PyBytes_CheckExact(data)) Py_RETURN_NONE;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    const unsigned char *end = p + PyBytes_GET_SIZE(data);

    /* The status line. */
    if (end - p < 14 || memcmp(p, "HTTP/1.1 ", 9) != 0) Py_RETURN_NONE;
    p += 9;
    if (p[0] < '2' || p[0] > '5' || p[1] < '0' || p[1] > '9' || p[2] < '0' || p[2] > '9')
        Py_RETURN_NONE;
    int status = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
    p += 3;
    const unsigned char *reason = p, *reason_end = p;
    if (*p == ' ') {  /* p < end: at least 14 bytes */
        reason = ++p;
        while (p < end && text_byte(*p)) p++;
        reason_end = p;
    }
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n') Py_RETURN_NONE;
    p += 2;

    /* The header fields. */
    PyObject *headers = PyList_New(0);
    if (headers == NULL) return NULL;
    PyObject *length = NULL;  /* borrowed from `headers` */
    long long declared = -1;
    int close = 0;
    for (;;) {
        if (end - p < 2) goto decline;
        if (p[0] == '\r') {
            if (p[1] != '\n') goto decline;
            p += 2;
            break;
        }
        const unsigned char *name = p;
        while (p < end && TCHAR[*p]) p++;
        if (p == name || p == end || *p != ':') goto decline;  /* also obs-fold, bare LF */
        Py_ssize_t name_len = p - name;
        p++;
        while (p < end && (*p == ' ' || *p == '\t')) p++;
        const unsigned char *value = p;
        while (p < end && text_byte(*p)) p++;
        Py_ssize_t value_len = p - value;
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n') goto decline;
        p += 2;
        int kind = field_kind(name, name_len);
        if (kind == REFUSED) goto decline;
        if (kind == CONTENT_LENGTH) {
            if (length != NULL || value_len == 0 || value_len > MAX_LENGTH_DIGITS) goto decline;
            declared = 0;
            for (Py_ssize_t i = 0; i < value_len; i++) {
                if (value[i] < '0' || value[i] > '9') goto decline;
                declared = declared * 10 + (value[i] - '0');
            }
        } else if (kind == CONNECTION) {
            if (equals_ci(value, value_len, "close"))
                close = 1;
            else if (!equals_ci(value, value_len, "keep-alive"))
                goto decline;
        }
        PyObject *field = field_tuple(name, name_len, value, value_len);
        if (field == NULL) goto error;
        int appended = PyList_Append(headers, field);
        Py_DECREF(field);
        if (appended < 0) goto error;
        if (kind == CONTENT_LENGTH) length = PyTuple_GET_ITEM(field, 1);
    }

    /* The body: none after a HEAD request, a 204 or a 304 (whatever Content-Length
     * says), else exactly Content-Length bytes, and nothing after the message. */
    Py_ssize_t body_len = 0;
    if (head_request || status == 204 || status == 304) {
        /* A HEAD answered 200 without Content-Length: httptools' keep-alive would
         * say no (a body delimited by the connection's end); left to it. */
        if (length == NULL && status != 204 && status != 304) goto decline;
    } else {
        if (length == NULL) goto decline;
        body_len = (Py_ssize_t)declared;
    }
    if (end - p != body_len) goto decline;

    PyObject *result = PyTuple_New(6);
    if (result == NULL) goto error;
    PyObject *items[6];
    items[0] = PyLong_FromLong(status);
    items[1] = PyBytes_FromStringAndSize((const char *)reason, reason_end - reason);
    items[2] = headers;  /* the reference moves to the tuple */
    headers = NULL;
    items[3] = length != NULL ? length : Py_None;
    Py_INCREF(items[3]);
    items[4] = close ? Py_False : Py_True;
    Py_INCREF(items[4]);
    items[5] = PyBytes_FromStringAndSize((const char *)p, body_len);
    for (int i = 0; i < 6; i++) PyTuple_SET_ITEM(result, i, items[i]);
    if (items[0] == NULL || items[1] == NULL || items[5] == NULL) {
        Py_DECREF(result);  /* NULL items are skipped by the tuple's dealloc */
        return NULL;
    }
    return result;

decline:
    Py_DECREF(headers);
    Py_RETURN_NONE;
error:
    Py_XDECREF(headers);
    return NULL;
}

static PyMethodDef methods[] = {
    {"parse_response", (PyCFunction)(void (*)(void))parse_response, METH_FASTCALL,
     "parse_response(data, head_request): the callbacks' record of a whole simple "
     "response, or None (module docstring)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cresp",
    "A whole simple upstream response read in C (see the C source's docstring).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cresp(void) { return PyModule_Create(&module); }
