/*
 * webapi.fastpath._cheads: the two heads the fast path builds per request, in C.
 *
 * upstream_head(method, target, headers, connection, service, host, body,
 *               client_ip, scheme, request_id) -> bytes | None
 *     The request head sent upstream. Reference: `webapi.fastpath.head.upstream_head`
 *     (the arguments are the `Parsed` fields it reads; `host` is
 *     `first.get(b"host", "")`).
 * client_head(status, raw_headers, framing, length, upstream_seconds, received, now,
 *             instance_id, request_id, keep_alive) -> bytes | None
 *     The response head written to the client. Reference:
 *     `webapi.fastpath.response.client_head`, with `now` the `time.perf_counter()`
 *     that `webapi.proxy.forward.latencies_ms` reads (passed in, so the C reads no
 *     clock and the tests can compare it with the Python at a fixed time).
 *
 * The sets and constants the Python reads (the dropped names, the prefixes, the
 * status lines, the framing codes...) are passed once at import by the Python modules
 * that own them (`init_upstream`, `init_client`: `head.init_c`, `response.init_c`) and
 * kept in the module's state: the C has no copy of them of its own that could drift.
 *
 * Either function answers None (the caller runs the Python, which then answers or
 * raises as it always did) when it is not initialized yet or for anything it does
 * not do exactly as the Python does:
 * - an argument of another type than the fast path passes (a list that is not
 *   exactly a list of 2-tuples of bytes, a str subclass, an int where a float goes);
 * - a str the Python encodes strictly (method, service, client_ip, scheme,
 *   request_id, instance_id) that is not ASCII; the target and the Host value
 *   (encoded with surrogateescape) are taken in any case, encoded by CPython's codec;
 * - a status without a line in `_STATUS_LINES`, a framing or length beyond a C long;
 * - an upstream `Connection` field that names other fields (not keep-alive, close
 *   or empty): the Python's second pass (`strip_hop_by_hop_raw`) does that;
 * - more than 4096 header fields.
 * Where it answers, the bytes equal the Python's (tests/webapi/test_c_heads.py
 * compares them over a corpus and thousands of random field lists): the same field
 * order and case, `%.3f` by the very function Python's `bytes % float` calls
 * (`PyOS_double_to_string`), the latencies by the same double operations.
 *
 * Nothing here parses bytes from the network: the fields were framed by httptools
 * before they got here, so no framing decision is made in this file.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Past this many header fields, decline (the Python runs): a bound on the flags. */
#define MAX_FIELDS 4096
/* Flags per field, on the stack up to this many (ordinary heads have a dozen). */
#define STACK_FIELDS 64

enum { DROP = 0, KEEP = 1, PRIOR = 2 };

typedef struct {
    /* init_upstream: `head.py`'s `_DROPPED`, `_DROPPED_PREFIXES`, `_API_KEY`, `_VIA`,
     * and `BODY_METHODS`. */
    PyObject *dropped;      /* frozenset[bytes], looked up as the Python does */
    PyObject *prefixes;     /* tuple[bytes, ...] */
    PyObject *api_key;      /* bytes */
    PyObject *via;          /* bytes: the whole `Via: ...` line */
    PyObject *body_methods; /* frozenset[str] */
    /* init_client: `response.py`'s sets as tuples (compared with the lower-cased name
     * without making it: `lower in S` is `some entry == lower(name)`). */
    PyObject *hop_by_hop;    /* HOP_BY_HOP_RAW */
    PyObject *replaced;      /* _REPLACED */
    PyObject *replaced_head; /* _REPLACED_HEAD */
    PyObject *proxy_prefix;  /* bytes */
    PyObject *plain;         /* _PLAIN_CONNECTION */
    PyObject *status_lines;  /* dict[int, bytes] */
    long whole, chunked, kept;
} State;

/* The module's state: NULL for a module object made but not executed yet (a state is
 * allocated at exec, `PyModule_ExecDef`). */
static State *
state_of(PyObject *module)
{
    return (State *)PyModule_GetState(module);
}

static State *
state_to_init(PyObject *module)
{
    State *st = state_of(module);
    if (st == NULL)
        PyErr_SetString(PyExc_RuntimeError, "the module is not executed yet");
    return st;
}

/* Helpers. */

static inline unsigned char
ascii_lower(unsigned char c)
{
    /* bytes.lower(): ASCII letters only. */
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* Whether lower(s[:n]) == t[:n]. */
static int
eq_lowered(const char *s, const char *t, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (ascii_lower((unsigned char)s[i]) != (unsigned char)t[i])
            return 0;
    }
    return 1;
}

/* Whether lower(s[:n]) is one of the bytes in tuple `names` (`lower in frozenset`). */
static int
in_lowered(PyObject *names, const char *s, Py_ssize_t n)
{
    Py_ssize_t count = PyTuple_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (PyBytes_GET_SIZE(name) == n && eq_lowered(s, PyBytes_AS_STRING(name), n))
            return 1;
    }
    return 0;
}

/* Whether s[:n] starts with one of the bytes in tuple `prefixes` (bytes.startswith). */
static int
has_prefix(PyObject *prefixes, const char *s, Py_ssize_t n)
{
    Py_ssize_t count = PyTuple_GET_SIZE(prefixes);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *prefix = PyTuple_GET_ITEM(prefixes, i);
        Py_ssize_t len = PyBytes_GET_SIZE(prefix);
        if (len <= n && memcmp(s, PyBytes_AS_STRING(prefix), (size_t)len) == 0)
            return 1;
    }
    return 0;
}

/* Whether `name` is one of the tokens of the `Connection` values in list `values`:
 * `name in {t for v in values for t in connection_tokens_raw(v)}`, a token being
 * a comma-separated part stripped of spaces and tabs, lower-cased. */
static int
named_by(PyObject *values, const char *name, Py_ssize_t n)
{
    Py_ssize_t count = PyList_GET_SIZE(values);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyList_GET_ITEM(values, i);
        const char *p = PyBytes_AS_STRING(value);
        const char *end = p + PyBytes_GET_SIZE(value);
        for (;;) {
            const char *comma = memchr(p, ',', (size_t)(end - p));
            const char *a = p, *b = comma ? comma : end;
            while (a < b && (*a == ' ' || *a == '\t'))
                a++;
            while (b > a && (b[-1] == ' ' || b[-1] == '\t'))
                b--;
            if (b - a == n && eq_lowered(a, name, n))
                return 1;
            if (comma == NULL)
                break;
            p = comma + 1;
        }
    }
    return 0;
}

/* The ASCII text of `s` (a str, exactly): 1 and its bytes, or 0 when it is not ASCII
 * (the Python's strict `.encode()` then answers, or raises, itself). */
static int
ascii_of(PyObject *s, const char **data, Py_ssize_t *len)
{
    if (!PyUnicode_CheckExact(s))
        return 0;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(s) < 0) {
        PyErr_Clear();
        return 0;
    }
#endif
    if (!PyUnicode_IS_ASCII(s))
        return 0;
    *data = (const char *)PyUnicode_DATA(s);
    *len = PyUnicode_GET_LENGTH(s);
    return 1;
}

/* `s.encode("utf-8", "surrogateescape")`: 1 and its bytes (in `*tmp` when not ASCII,
 * for the caller to release), 0 to decline (not a str, or not encodable: the Python
 * raises its own error), -1 on another error. */
static int
escaped_of(PyObject *s, PyObject **tmp, const char **data, Py_ssize_t *len)
{
    if (ascii_of(s, data, len))
        return 1;
    if (!PyUnicode_CheckExact(s))
        return 0;
    PyObject *encoded = PyUnicode_AsEncodedString(s, "utf-8", "surrogateescape");
    if (encoded == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    *tmp = encoded;
    *data = PyBytes_AS_STRING(encoded);
    *len = PyBytes_GET_SIZE(encoded);
    return 1;
}

/* Whether `list` is exactly a list of exactly bytes. */
static int
bytes_list(PyObject *list)
{
    if (!PyList_CheckExact(list))
        return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        if (!PyBytes_CheckExact(PyList_GET_ITEM(list, i)))
            return 0;
    }
    return 1;
}

/* Item `i` of `fields` as (name, value) when it is exactly a 2-tuple of exactly bytes. */
static int
field_at(PyObject *fields, Py_ssize_t i, PyObject **name, PyObject **value)
{
    PyObject *item = PyList_GET_ITEM(fields, i);
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
        return 0;
    *name = PyTuple_GET_ITEM(item, 0);
    *value = PyTuple_GET_ITEM(item, 1);
    return PyBytes_CheckExact(*name) && PyBytes_CheckExact(*value);
}

/* A writer into a bytes object whose size was counted first. */
typedef struct {
    char *at;
} Out;

static inline void
put(Out *out, const char *data, Py_ssize_t len)
{
    memcpy(out->at, data, (size_t)len);
    out->at += len;
}

#define PUT_LITERAL(out, text) put((out), (text), (Py_ssize_t)(sizeof(text) - 1))

static inline void
put_bytes(Out *out, PyObject *bytes)
{
    put(out, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
}

/* The fields of `list` (2-tuples of bytes) whose flag is KEEP, as `name: value` lines. */
static void
put_kept(Out *out, PyObject *list, const unsigned char *flags, Py_ssize_t count)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        if (flags[i] != KEEP)
            continue;
        PyObject *item = PyList_GET_ITEM(list, i);
        put_bytes(out, PyTuple_GET_ITEM(item, 0));
        PUT_LITERAL(out, ": ");
        put_bytes(out, PyTuple_GET_ITEM(item, 1));
        PUT_LITERAL(out, "\r\n");
    }
}

/* A flag per field: `stack` (STACK_FIELDS long) when `count` fits, else from the heap
 * (free it when it is not `stack`); NULL with MemoryError. */
static unsigned char *
field_flags(unsigned char *stack, Py_ssize_t count)
{
    if (count <= STACK_FIELDS)
        return stack;
    unsigned char *flags = PyMem_Malloc((size_t)count);
    if (flags == NULL)
        PyErr_NoMemory();
    return flags;
}

/* `b"%d" % value` into `buf` (at least 24 bytes); its length. */
static Py_ssize_t
decimal(char *buf, long long value)
{
    char digits[24];
    int n = 0;
    /* Negated digit by digit: LLONG_MIN has no positive counterpart. */
    long long v = value;
    do {
        int digit = (int)(v % 10);
        digits[n++] = (char)('0' + (digit < 0 ? -digit : digit));
        v /= 10;
    } while (v != 0);
    Py_ssize_t len = 0;
    if (value < 0)
        buf[len++] = '-';
    while (n > 0)
        buf[len++] = digits[--n];
    return len;
}

/* upstream_head. */

/* Whether an `Authorization` value is an API key: `value[7:].lstrip().startswith(key)`
 * (bytes.lstrip strips ASCII whitespace, `Py_ISSPACE`). */
static int
is_api_key(PyObject *value, PyObject *key)
{
    const char *p = PyBytes_AS_STRING(value);
    const char *end = p + PyBytes_GET_SIZE(value);
    p = PyBytes_GET_SIZE(value) > 7 ? p + 7 : end;
    while (p < end && Py_ISSPACE((unsigned char)*p))
        p++;
    Py_ssize_t len = PyBytes_GET_SIZE(key);
    return end - p >= len && memcmp(p, PyBytes_AS_STRING(key), (size_t)len) == 0;
}

static PyObject *
upstream_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "upstream_head takes 10 positional arguments");
        return NULL;
    }
    State *st = state_of(module);
    PyObject *method = args[0], *target = args[1], *headers = args[2];
    PyObject *connection = args[3], *service = args[4], *host = args[5], *body = args[6];
    PyObject *client_ip = args[7], *scheme = args[8], *request_id = args[9];
    if (st == NULL || st->dropped == NULL || !PyList_CheckExact(headers) || !bytes_list(connection)
        || (body != Py_None && !PyBytes_CheckExact(body)))
        Py_RETURN_NONE;
    Py_ssize_t count = PyList_GET_SIZE(headers);
    if (count > MAX_FIELDS)
        Py_RETURN_NONE;

    const char *method_s, *service_s, *ip_s, *scheme_s, *id_s, *target_s, *host_s;
    Py_ssize_t method_n, service_n, ip_n, scheme_n, id_n, target_n, host_n;
    if (!ascii_of(method, &method_s, &method_n) || !ascii_of(service, &service_s, &service_n)
        || !ascii_of(client_ip, &ip_s, &ip_n) || !ascii_of(scheme, &scheme_s, &scheme_n)
        || !ascii_of(request_id, &id_s, &id_n))
        Py_RETURN_NONE;

    PyObject *result = NULL, *target_tmp = NULL, *host_tmp = NULL;
    unsigned char stack_flags[STACK_FIELDS];
    unsigned char *flags = stack_flags;
    int done = escaped_of(target, &target_tmp, &target_s, &target_n);
    if (done == 1)
        done = escaped_of(host, &host_tmp, &host_s, &host_n);
    if (done != 1)
        goto decline_or_fail;
    flags = field_flags(stack_flags, count);
    if (flags == NULL)
        goto fail;

    /* Which fields pass, and the size of the head. */
    Py_ssize_t size = method_n + 1 + target_n + (Py_ssize_t)sizeof(" HTTP/1.1\r\n") - 1;
    Py_ssize_t prior_n = 0, priors = 0;
    int conn_named = PyList_GET_SIZE(connection) > 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name, *value;
        if (!field_at(headers, i, &name, &value)) {
            done = 0;
            goto decline_or_fail;
        }
        const char *n = PyBytes_AS_STRING(name);
        Py_ssize_t nn = PyBytes_GET_SIZE(name);
        int dropped = PySet_Contains(st->dropped, name);
        if (dropped < 0)
            goto fail;
        if (!dropped)
            dropped = has_prefix(st->prefixes, n, nn)
                      || (conn_named && named_by(connection, n, nn));
        if (dropped) {
            if (nn == 15 && memcmp(n, "x-forwarded-for", 15) == 0) {
                flags[i] = PRIOR;
                prior_n += PyBytes_GET_SIZE(value);
                priors++;
            }
            else {
                flags[i] = DROP;
            }
            continue;
        }
        if (nn == 13 && memcmp(n, "authorization", 13) == 0 && is_api_key(value, st->api_key)) {
            flags[i] = DROP;
            continue;
        }
        flags[i] = KEEP;
        size += nn + 2 + PyBytes_GET_SIZE(value) + 2;
    }
    char length_s[24];
    Py_ssize_t length_n = 0;
    Py_ssize_t body_n = body == Py_None ? 0 : PyBytes_GET_SIZE(body);
    if (body_n > 0) {
        length_n = decimal(length_s, body_n);
    }
    else {
        int has_body = PySet_Contains(st->body_methods, method);
        if (has_body < 0)
            goto fail;
        if (has_body) { /* an empty body still gets Content-Length: 0 */
            length_s[0] = '0';
            length_n = 1;
        }
    }
    size += (Py_ssize_t)sizeof("Host: \r\n") - 1 + service_n;
    size += (Py_ssize_t)sizeof("X-Forwarded-For: \r\n") - 1 + prior_n + 2 * priors + ip_n;
    size += (Py_ssize_t)sizeof("X-Forwarded-Proto: \r\n") - 1 + scheme_n;
    size += (Py_ssize_t)sizeof("X-Forwarded-Host: \r\n") - 1 + host_n;
    size += (Py_ssize_t)sizeof("X-Request-Id: \r\n") - 1 + id_n;
    size += PyBytes_GET_SIZE(st->via) + 2;
    if (length_n)
        size += (Py_ssize_t)sizeof("Content-Length: \r\n") - 1 + length_n;
    size += 2;

    result = PyBytes_FromStringAndSize(NULL, size);
    if (result == NULL)
        goto fail;
    Out out = {PyBytes_AS_STRING(result)};
    put(&out, method_s, method_n);
    PUT_LITERAL(&out, " ");
    put(&out, target_s, target_n);
    PUT_LITERAL(&out, " HTTP/1.1\r\n");
    put_kept(&out, headers, flags, count);
    PUT_LITERAL(&out, "Host: ");
    put(&out, service_s, service_n);
    PUT_LITERAL(&out, "\r\nX-Forwarded-For: ");
    for (Py_ssize_t i = 0; i < count; i++) { /* the client's, then the peer */
        if (flags[i] != PRIOR)
            continue;
        put_bytes(&out, PyTuple_GET_ITEM(PyList_GET_ITEM(headers, i), 1));
        PUT_LITERAL(&out, ", ");
    }
    put(&out, ip_s, ip_n);
    PUT_LITERAL(&out, "\r\nX-Forwarded-Proto: ");
    put(&out, scheme_s, scheme_n);
    PUT_LITERAL(&out, "\r\nX-Forwarded-Host: ");
    put(&out, host_s, host_n);
    PUT_LITERAL(&out, "\r\nX-Request-Id: ");
    put(&out, id_s, id_n);
    PUT_LITERAL(&out, "\r\n");
    put_bytes(&out, st->via);
    PUT_LITERAL(&out, "\r\n");
    if (length_n) {
        PUT_LITERAL(&out, "Content-Length: ");
        put(&out, length_s, length_n);
        PUT_LITERAL(&out, "\r\n");
    }
    PUT_LITERAL(&out, "\r\n");
    assert(out.at == PyBytes_AS_STRING(result) + size);
    goto finish;

decline_or_fail:
    if (done < 0)
        goto fail;
    result = Py_NewRef(Py_None);
    goto finish;
fail:
    result = NULL;
finish:
    if (flags != stack_flags)
        PyMem_Free(flags);
    Py_XDECREF(target_tmp);
    Py_XDECREF(host_tmp);
    return result;
}

/* client_head. */

static PyObject *
client_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "client_head takes 10 positional arguments");
        return NULL;
    }
    State *st = state_of(module);
    PyObject *status = args[0], *fields = args[1], *framing_o = args[2], *length_o = args[3];
    PyObject *upstream_o = args[4], *received_o = args[5], *now_o = args[6];
    PyObject *instance_id = args[7], *request_id = args[8], *keep_alive = args[9];
    if (st == NULL || st->status_lines == NULL || !PyLong_CheckExact(status) || !PyList_CheckExact(fields)
        || !PyLong_CheckExact(framing_o) || !PyFloat_CheckExact(upstream_o)
        || !PyFloat_CheckExact(received_o) || !PyFloat_CheckExact(now_o)
        || (keep_alive != Py_True && keep_alive != Py_False))
        Py_RETURN_NONE;
    Py_ssize_t count = PyList_GET_SIZE(fields);
    if (count > MAX_FIELDS)
        Py_RETURN_NONE;
    const char *instance_s, *id_s;
    Py_ssize_t instance_n, id_n;
    if (!ascii_of(instance_id, &instance_s, &instance_n) || !ascii_of(request_id, &id_s, &id_n))
        Py_RETURN_NONE;
    /* `_STATUS_LINES.get(status) or ...`: an unknown status is the Python's. */
    PyObject *status_line = PyDict_GetItemWithError(st->status_lines, status);
    if (status_line == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (!PyBytes_CheckExact(status_line) || PyBytes_GET_SIZE(status_line) == 0)
        Py_RETURN_NONE;
    int overflow;
    long framing = PyLong_AsLongAndOverflow(framing_o, &overflow);
    if (overflow)
        Py_RETURN_NONE;
    char length_s[24];
    Py_ssize_t length_n = 0;
    if (framing == st->whole) {
        if (!PyLong_CheckExact(length_o))
            Py_RETURN_NONE;
        long long length = PyLong_AsLongLongAndOverflow(length_o, &overflow);
        if (overflow)
            Py_RETURN_NONE;
        length_n = decimal(length_s, length);
    }
    PyObject *replaced = framing == st->kept ? st->replaced_head : st->replaced;

    PyObject *result = NULL;
    char *upstream_ms = NULL, *gateway_ms = NULL;
    unsigned char stack_flags[STACK_FIELDS];
    unsigned char *flags = field_flags(stack_flags, count);
    if (flags == NULL)
        goto finish;
    Py_ssize_t size = PyBytes_GET_SIZE(status_line) + 2;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name, *value;
        if (!field_at(fields, i, &name, &value))
            goto decline;
        const char *n = PyBytes_AS_STRING(name);
        Py_ssize_t nn = PyBytes_GET_SIZE(name);
        if (in_lowered(st->hop_by_hop, n, nn) || in_lowered(replaced, n, nn)
            || (nn >= PyBytes_GET_SIZE(st->proxy_prefix)
                && eq_lowered(n, PyBytes_AS_STRING(st->proxy_prefix),
                              PyBytes_GET_SIZE(st->proxy_prefix)))) {
            if (nn == 10 && eq_lowered(n, "connection", 10)
                && !in_lowered(st->plain, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value)))
                goto decline; /* it names fields to drop too: the Python's second pass */
            flags[i] = DROP;
            continue;
        }
        flags[i] = KEEP;
        size += nn + 2 + PyBytes_GET_SIZE(value) + 2;
    }

    /* `latencies_ms`: the same double operations as the Python's, in the same order
     * (max(x, 0.0) keeps x unless 0.0 > x: a NaN, a -0.0 stay). */
    double upstream_seconds = PyFloat_AS_DOUBLE(upstream_o);
    double total = PyFloat_AS_DOUBLE(now_o) - PyFloat_AS_DOUBLE(received_o);
    double gateway = total - upstream_seconds;
    if (0.0 > gateway)
        gateway = 0.0;
    /* `b"%.3f" % x` is exactly this call (bytesobject.c, formatfloat). */
    upstream_ms = PyOS_double_to_string(upstream_seconds * 1000, 'f', 3, 0, NULL);
    if (upstream_ms == NULL)
        goto finish;
    gateway_ms = PyOS_double_to_string(gateway * 1000, 'f', 3, 0, NULL);
    if (gateway_ms == NULL)
        goto finish;
    Py_ssize_t upstream_n = (Py_ssize_t)strlen(upstream_ms);
    Py_ssize_t gateway_n = (Py_ssize_t)strlen(gateway_ms);

    size += (Py_ssize_t)sizeof("X-Upstream-Latency: \r\n") - 1 + upstream_n;
    size += (Py_ssize_t)sizeof("X-Gateway-Latency: \r\n") - 1 + gateway_n;
    size += (Py_ssize_t)sizeof("X-Upstream-Instance: \r\n") - 1 + instance_n;
    size += (Py_ssize_t)sizeof("X-Request-Id: \r\n") - 1 + id_n;
    if (framing == st->whole)
        size += (Py_ssize_t)sizeof("content-length: \r\n") - 1 + length_n;
    else if (framing == st->chunked)
        size += (Py_ssize_t)sizeof("transfer-encoding: chunked\r\n") - 1;
    size += keep_alive == Py_True ? (Py_ssize_t)sizeof("connection: keep-alive\r\n") - 1
                                  : (Py_ssize_t)sizeof("connection: close\r\n") - 1;
    size += 2;

    result = PyBytes_FromStringAndSize(NULL, size);
    if (result == NULL)
        goto finish;
    Out out = {PyBytes_AS_STRING(result)};
    put_bytes(&out, status_line);
    PUT_LITERAL(&out, "\r\n");
    put_kept(&out, fields, flags, count);
    PUT_LITERAL(&out, "X-Upstream-Latency: ");
    put(&out, upstream_ms, upstream_n);
    PUT_LITERAL(&out, "\r\nX-Gateway-Latency: ");
    put(&out, gateway_ms, gateway_n);
    PUT_LITERAL(&out, "\r\nX-Upstream-Instance: ");
    put(&out, instance_s, instance_n);
    PUT_LITERAL(&out, "\r\nX-Request-Id: ");
    put(&out, id_s, id_n);
    PUT_LITERAL(&out, "\r\n");
    if (framing == st->whole) {
        PUT_LITERAL(&out, "content-length: ");
        put(&out, length_s, length_n);
        PUT_LITERAL(&out, "\r\n");
    }
    else if (framing == st->chunked) {
        PUT_LITERAL(&out, "transfer-encoding: chunked\r\n");
    }
    if (keep_alive == Py_True)
        PUT_LITERAL(&out, "connection: keep-alive\r\n");
    else
        PUT_LITERAL(&out, "connection: close\r\n");
    PUT_LITERAL(&out, "\r\n");
    assert(out.at == PyBytes_AS_STRING(result) + size);
    goto finish;

decline:
    result = Py_NewRef(Py_None);
finish:
    if (flags != stack_flags)
        PyMem_Free(flags);
    PyMem_Free(upstream_ms);
    PyMem_Free(gateway_ms);
    return result;
}

/* Initialization: the Python modules' sets and constants, checked once. */

/* `names` (a frozenset of bytes) as a new tuple, or NULL with TypeError. */
static PyObject *
bytes_tuple(PyObject *names, const char *what)
{
    if (!PyFrozenSet_CheckExact(names)) {
        PyErr_Format(PyExc_TypeError, "%s: a frozenset of bytes", what);
        return NULL;
    }
    PyObject *tuple = PySequence_Tuple(names);
    if (tuple == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(tuple, i))) {
            Py_DECREF(tuple);
            PyErr_Format(PyExc_TypeError, "%s: a frozenset of bytes", what);
            return NULL;
        }
    }
    return tuple;
}

/* Whether every item of frozenset `set` is exactly of `type`: 1, 0, or -1 on error. */
static int
all_of(PyObject *set, PyTypeObject *type)
{
    PyObject *items = PySequence_Tuple(set);
    if (items == NULL)
        return -1;
    int all = 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(items); i++) {
        if (Py_TYPE(PyTuple_GET_ITEM(items, i)) != type)
            all = 0;
    }
    Py_DECREF(items);
    return all;
}

static void
replace(PyObject **slot, PyObject *value)
{
    Py_XSETREF(*slot, Py_NewRef(value));
}

static PyObject *
init_upstream(PyObject *module, PyObject *args)
{
    PyObject *dropped, *prefixes, *api_key, *via, *body_methods;
    if (!PyArg_ParseTuple(args, "O!O!SSO!:init_upstream", &PyFrozenSet_Type, &dropped,
                          &PyTuple_Type, &prefixes, &api_key, &via, &PyFrozenSet_Type,
                          &body_methods))
        return NULL;
    int bytes_names = all_of(dropped, &PyBytes_Type);
    int str_methods = bytes_names < 0 ? -1 : all_of(body_methods, &PyUnicode_Type);
    if (str_methods < 0)
        return NULL;
    if (!PyFrozenSet_CheckExact(dropped) || !bytes_names || !PyFrozenSet_CheckExact(body_methods)
        || !str_methods || !PyBytes_CheckExact(api_key) || !PyBytes_CheckExact(via)) {
        PyErr_SetString(PyExc_TypeError, "init_upstream: frozenset[bytes], tuple[bytes, ...], "
                                         "bytes, bytes, frozenset[str]");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(prefixes); i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(prefixes, i))) {
            PyErr_SetString(PyExc_TypeError, "init_upstream: prefixes must be bytes");
            return NULL;
        }
    }
    State *st = state_to_init(module);
    if (st == NULL)
        return NULL;
    replace(&st->prefixes, prefixes);
    replace(&st->api_key, api_key);
    replace(&st->via, via);
    replace(&st->body_methods, body_methods);
    replace(&st->dropped, dropped); /* last: `upstream_head` runs once it is set */
    Py_RETURN_NONE;
}

static PyObject *
init_client(PyObject *module, PyObject *args)
{
    PyObject *hop_by_hop, *replaced, *replaced_head, *proxy_prefix, *plain, *status_lines;
    long whole, chunked, kept;
    if (!PyArg_ParseTuple(args, "OOOSOO!lll:init_client", &hop_by_hop, &replaced,
                          &replaced_head, &proxy_prefix, &plain, &PyDict_Type, &status_lines,
                          &whole, &chunked, &kept))
        return NULL;
    if (!PyBytes_CheckExact(proxy_prefix)) {
        PyErr_SetString(PyExc_TypeError, "init_client: proxy_prefix must be bytes");
        return NULL;
    }
    PyObject *tuples[4] = {
        bytes_tuple(hop_by_hop, "hop_by_hop"),
        bytes_tuple(replaced, "replaced"),
        bytes_tuple(replaced_head, "replaced_head"),
        bytes_tuple(plain, "plain_connection"),
    };
    if (tuples[0] == NULL || tuples[1] == NULL || tuples[2] == NULL || tuples[3] == NULL) {
        for (int i = 0; i < 4; i++)
            Py_XDECREF(tuples[i]);
        return NULL;
    }
    State *st = state_to_init(module);
    if (st == NULL) {
        for (int i = 0; i < 4; i++)
            Py_DECREF(tuples[i]);
        return NULL;
    }
    Py_XSETREF(st->hop_by_hop, tuples[0]);
    Py_XSETREF(st->replaced, tuples[1]);
    Py_XSETREF(st->replaced_head, tuples[2]);
    Py_XSETREF(st->plain, tuples[3]);
    replace(&st->proxy_prefix, proxy_prefix);
    st->whole = whole;
    st->chunked = chunked;
    st->kept = kept;
    replace(&st->status_lines, status_lines); /* last: `client_head` runs once it is set */
    Py_RETURN_NONE;
}

/* The module. */

static int
heads_traverse(PyObject *module, visitproc visit, void *arg)
{
    State *st = state_of(module);
    if (st == NULL)
        return 0;
    Py_VISIT(st->dropped);
    Py_VISIT(st->prefixes);
    Py_VISIT(st->api_key);
    Py_VISIT(st->via);
    Py_VISIT(st->body_methods);
    Py_VISIT(st->hop_by_hop);
    Py_VISIT(st->replaced);
    Py_VISIT(st->replaced_head);
    Py_VISIT(st->proxy_prefix);
    Py_VISIT(st->plain);
    Py_VISIT(st->status_lines);
    return 0;
}

static int
heads_clear(PyObject *module)
{
    State *st = state_of(module);
    if (st == NULL)
        return 0;
    Py_CLEAR(st->dropped);
    Py_CLEAR(st->prefixes);
    Py_CLEAR(st->api_key);
    Py_CLEAR(st->via);
    Py_CLEAR(st->body_methods);
    Py_CLEAR(st->hop_by_hop);
    Py_CLEAR(st->replaced);
    Py_CLEAR(st->replaced_head);
    Py_CLEAR(st->proxy_prefix);
    Py_CLEAR(st->plain);
    Py_CLEAR(st->status_lines);
    return 0;
}

static void
heads_free(void *module)
{
    heads_clear((PyObject *)module);
}

static PyMethodDef methods[] = {
    {"upstream_head", (PyCFunction)(void (*)(void))upstream_head, METH_FASTCALL,
     "The request head sent upstream (`webapi.fastpath.head.upstream_head`), or None."},
    {"client_head", (PyCFunction)(void (*)(void))client_head, METH_FASTCALL,
     "The response head written to the client (`webapi.fastpath.response.client_head`), "
     "or None."},
    {"init_upstream", init_upstream, METH_VARARGS,
     "init_upstream(dropped, prefixes, api_key, via, body_methods): `head.py`'s constants."},
    {"init_client", init_client, METH_VARARGS,
     "init_client(hop_by_hop, replaced, replaced_head, proxy_prefix, plain_connection, "
     "status_lines, whole, chunked, kept): `response.py`'s constants."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef heads_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_cheads",
    .m_doc = "The fast path's request and response heads in C (see _cheads.c).",
    .m_size = sizeof(State),
    .m_methods = methods,
    .m_traverse = heads_traverse,
    .m_clear = heads_clear,
    .m_free = heads_free,
};

PyMODINIT_FUNC
PyInit__cheads(void)
{
    return PyModuleDef_Init(&heads_module);
}
