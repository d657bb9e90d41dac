/* webapi.fastpath._creq: the fast path's request parse in C (issue 4's prototype).

What it does: `parse(buf)` reads the request at the start of `buf` (bytes or
bytearray) in one pass, as `webapi.fastpath.request.parse_request` would (that
Python function is the reference, the fallback and the tests' oracle), and returns

    (needed, whole, method, url, service, target, headers, first, connection,
     length, keep_alive, body)

`needed` the bytes the whole request takes (head and body); `whole` whether `buf`
holds them (else `parse_request` answers `Incomplete(needed, head)`); `method`,
`service`, `target` str; `url` bytes; `headers` a list of (lower-case name, value)
bytes tuples; `first` the dict `Parsed.on_header` builds (the first value of the
headers the fast path reads, decoded UTF-8 with surrogateescape); `connection` the
list of the `Connection` values or None; `length` the Content-Length; `keep_alive`
False when a `Connection` token is `close`; `body` bytes, or None when there is none
or it has not arrived whole.

Or None: it declines, and the Python runs. It declines everything but the plain
case, so that where it answers, httptools (what Sanic and the Python use) frames the
same bytes the same way and the Python answers the same:
- a request line other than `METHOD SP /svc/... SP HTTP/1.1 CRLF`, exactly one space
  each (httptools takes two), METHOD one of the fast path's seven; a URL byte outside
  0x21-0x7e (httptools refuses those too), a `#` anywhere, a `%`, `\` or `/.` in its
  path (the Python checks those in `upstream_target`), a path that is no
  `/svc/<service>/<not / or ?>` (`_SVC_PATH`);
- a header line other than `token ":" OWS value CRLF` with a value of HTAB, 0x20-0x7e
  and 0x80-0xff only: so no obs-fold, no bare CR or LF, no CTL, no space before the
  colon; more than MAX_FIELDS of them;
- Transfer-Encoding, Upgrade, Expect (the Python refuses them), Via (the Python counts
  its hops), a second Host or one `valid_host` refuses, no Host, a second
  Content-Length (httptools refuses it) or one not all ASCII digits or over
  MAX_BODY, a second Authorization or X-Api-Key, both of them with a non-ASCII value
  (`str.strip` there strips more than HTTP's whitespace) or that
  `credential_fault` finds different;
- a head that does not end within MAX_HEAD bytes, or not within `buf` yet.

Bounds: every read is of an index checked against the buffer's length (the head's
against min(len, MAX_HEAD)). The buffer is held (PyObject_GetBuffer) while it is
read, so a bytearray cannot be resized meanwhile. No mutable static state: the
statics are constants made once at import.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_HEAD (16 * 1024)  /* request.MAX_FAST_HEAD (a test checks they agree) */
#define MAX_BODY (64 * 1024)  /* request.MAX_FAST_BODY */
#define MAX_FIELDS 100        /* more is unusual: declined */
#define MAX_SERVICE 63        /* webapi.heartbeats.SERVICE_NAME: [a-z][a-z0-9_-]{0,62} */

/* Header kinds, by lower-case name. */
enum kind {
    K_OTHER, K_HOST, K_AUTHORIZATION, K_X_API_KEY, K_X_REQUEST_ID, K_X_SERVICE_VERSION,
    K_X_BALANCE_KEY, K_CONTENT_LENGTH, K_CONNECTION, K_DECLINED, K_COUNT
};
/* The names of the kinds read into `first` (and cached as bytes), in kind order. */
static const char *const NAMES[K_COUNT] = {
    NULL, "host", "authorization", "x-api-key", "x-request-id", "x-service-version",
    "x-balance-key", "content-length", "connection", NULL,
};

/* Constants made at import (never mutated). */
static PyObject *name_bytes[K_COUNT];  /* the lower-case names above, as bytes */
static PyObject *method_str[7];

static const char *const METHODS[7] = {
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
};

/* RFC 9110 tchar: !#$%&'*+-.^_`|~ digits letters. */
static int is_tchar(unsigned char c) {
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* A field value byte httptools takes: HTAB, visible ASCII, space, obs-text. */
static int is_value_byte(unsigned char c) {
    return c == '\t' || (c >= 0x20 && c != 0x7f);
}

static unsigned char lower(unsigned char c) {
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* Whether `p[0:n]` lower-cased equals the lower-case `name`. */
static int name_is(const unsigned char *p, Py_ssize_t n, const char *name) {
    if ((size_t)n != strlen(name))
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (lower(p[i]) != (unsigned char)name[i])
            return 0;
    return 1;
}

static enum kind kind_of(const unsigned char *p, Py_ssize_t n) {
    switch (n) {  /* by length first: most names are none of these */
    case 3: return name_is(p, n, "via") ? K_DECLINED : K_OTHER;
    case 4: return name_is(p, n, "host") ? K_HOST : K_OTHER;
    case 6: return name_is(p, n, "expect") ? K_DECLINED : K_OTHER;
    case 7: return name_is(p, n, "upgrade") ? K_DECLINED : K_OTHER;
    case 9: return name_is(p, n, "x-api-key") ? K_X_API_KEY : K_OTHER;
    case 10: return name_is(p, n, "connection") ? K_CONNECTION : K_OTHER;
    case 12: return name_is(p, n, "x-request-id") ? K_X_REQUEST_ID : K_OTHER;
    case 13:
        if (name_is(p, n, "authorization")) return K_AUTHORIZATION;
        return name_is(p, n, "x-balance-key") ? K_X_BALANCE_KEY : K_OTHER;
    case 14: return name_is(p, n, "content-length") ? K_CONTENT_LENGTH : K_OTHER;
    case 17:
        if (name_is(p, n, "x-service-version")) return K_X_SERVICE_VERSION;
        return name_is(p, n, "transfer-encoding") ? K_DECLINED : K_OTHER;
    default: return K_OTHER;
    }
}

/* `common.http_head.valid_host`: the regex
   (?:\[[0-9A-Za-z:.\-_~!$&'()*+,;=]+\]|[0-9A-Za-z.\-_~%!$&'()*+;=]*)(?::[0-9]*)?[ \t]*
   fully matched. Neither class holds `:` or `]`, so no backtracking changes the
   answer: the first alternative when it starts with `[`, else the second. */
static int valid_host(const unsigned char *p, Py_ssize_t n) {
    Py_ssize_t i = 0;
    int alnum;
    if (n > 0 && p[0] == '[') {
        for (i = 1; i < n; i++) {
            unsigned char c = p[i];
            alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
            if (!(alnum || (c != 0 && strchr(":.-_~!$&'()*+,;=", c))))
                break;
        }
        if (i == 1 || i >= n || p[i] != ']')
            return 0;
        i++;
    } else {
        for (; i < n; i++) {
            unsigned char c = p[i];
            alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
            if (!(alnum || (c != 0 && strchr(".-_~%!$&'()*+;=", c))))
                break;
        }
    }
    if (i < n && p[i] == ':')
        for (i++; i < n && p[i] >= '0' && p[i] <= '9'; i++) {
        }
    for (; i < n && (p[i] == ' ' || p[i] == '\t'); i++) {
    }
    return i == n;
}

/* Whether a `Connection` value holds a `close` token (`connection_tokens_raw`:
   split on commas, stripped of spaces and tabs, ASCII lower-cased). */
static int has_close(const unsigned char *p, Py_ssize_t n) {
    Py_ssize_t start = 0;
    while (start <= n) {
        Py_ssize_t end = start;
        while (end < n && p[end] != ',')
            end++;
        Py_ssize_t a = start, b = end;
        while (a < b && (p[a] == ' ' || p[a] == '\t'))
            a++;
        while (b > a && (p[b - 1] == ' ' || p[b - 1] == '\t'))
            b--;
        if (name_is(p + a, b - a, "close"))
            return 1;
        start = end + 1;
    }
    return 0;
}

static int is_ascii(const unsigned char *p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (p[i] >= 0x80)
            return 0;
    return 1;
}

/* `s.strip()` of an ASCII value with no CTL but HTAB: spaces and tabs. */
static void strip(const unsigned char **p, Py_ssize_t *n) {
    while (*n > 0 && ((*p)[0] == ' ' || (*p)[0] == '\t')) {
        (*p)++;
        (*n)--;
    }
    while (*n > 0 && ((*p)[*n - 1] == ' ' || (*p)[*n - 1] == '\t'))
        (*n)--;
}

/* `credential_fault([authorization], [api_key])` for one of each, both ASCII. */
static int credentials_differ(const unsigned char *auth, Py_ssize_t auth_n,
                              const unsigned char *key, Py_ssize_t key_n) {
    strip(&key, &key_n);
    if (key_n == 0)
        return 0;  /* an empty X-Api-Key is no credential */
    Py_ssize_t space = 0;
    while (space < auth_n && auth[space] != ' ')
        space++;
    if (!name_is(auth, space, "bearer"))
        return 0;
    const unsigned char *token = auth + space + 1;
    Py_ssize_t token_n = space < auth_n ? auth_n - space - 1 : 0;
    strip(&token, &token_n);
    return token_n != key_n || memcmp(token, key, (size_t)key_n) != 0;
}

typedef struct {
    Py_ssize_t name, name_n, value, value_n;  /* offsets into the buffer */
    enum kind kind;
} field;

/* The request at the start of `p[0:n]`, or Py_None when declined. */
static PyObject *parse_buffer(const unsigned char *p, Py_ssize_t n) {
    Py_ssize_t lim = n < MAX_HEAD ? n : MAX_HEAD, i, m = -1;
    field fields[MAX_FIELDS];
    int count = 0;
    /* The request line: METHOD SP. */
    for (int k = 0; k < 7; k++) {
        Py_ssize_t len = (Py_ssize_t)strlen(METHODS[k]);
        if (lim > len && memcmp(p, METHODS[k], (size_t)len) == 0 && p[len] == ' ') {
            m = k;
            i = len + 1;
            break;
        }
    }
    if (m < 0)
        Py_RETURN_NONE;
    /* The URL: /svc/<service>/<not / or ?>..., bytes 0x21-0x7e. */
    Py_ssize_t url = i;
    if (lim - url < 5 || memcmp(p + url, "/svc/", 5) != 0)
        Py_RETURN_NONE;
    Py_ssize_t service = url + 5, path_end = -1;
    int dotted = 0;
    for (i = url; i < lim && p[i] != ' '; i++) {
        unsigned char c = p[i];
        if (c < 0x21 || c > 0x7e || c == '#')
            Py_RETURN_NONE;
        if (path_end < 0) {
            if (c == '?')
                path_end = i;
            else if (c == '%' || c == '\\' || (c == '.' && p[i - 1] == '/'))
                dotted = 1;  /* (p[i - 1] is in the URL: it starts with "/svc/") */
        }
    }
    Py_ssize_t url_end = i;
    if (path_end < 0)
        path_end = url_end;
    if (dotted || lim - url_end < 11 || memcmp(p + url_end, " HTTP/1.1\r\n", 11) != 0)
        Py_RETURN_NONE;
    Py_ssize_t service_end = service;
    while (service_end < url_end && service_end - service <= MAX_SERVICE) {
        unsigned char c = p[service_end];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
            break;
        service_end++;
    }
    if (service_end == service || service_end - service > MAX_SERVICE
        || !(p[service] >= 'a' && p[service] <= 'z') || service_end + 1 >= url_end
        || p[service_end] != '/' || p[service_end + 1] == '/' || p[service_end + 1] == '?')
        Py_RETURN_NONE;
    /* The field lines, up to the empty line. */
    i = url_end + 11;
    Py_ssize_t length = 0;
    int seen[K_COUNT] = {0}, keep_alive = 1, first_of[K_COUNT] = {0};
    for (;;) {
        if (i + 1 >= lim)
            Py_RETURN_NONE;  /* not whole yet, or longer than MAX_HEAD */
        if (p[i] == '\r') {
            if (p[i + 1] != '\n')
                Py_RETURN_NONE;
            i += 2;
            break;
        }
        if (count == MAX_FIELDS)
            Py_RETURN_NONE;
        field *f = &fields[count];
        f->name = i;
        while (i < lim && is_tchar(p[i]))
            i++;
        if (i == f->name || i >= lim || p[i] != ':')
            Py_RETURN_NONE;
        f->name_n = i - f->name;
        for (i++; i < lim && (p[i] == ' ' || p[i] == '\t'); i++) {
        }
        f->value = i;
        while (i < lim && is_value_byte(p[i]))
            i++;
        if (i + 1 >= lim || p[i] != '\r' || p[i + 1] != '\n')
            Py_RETURN_NONE;
        f->value_n = i - f->value;
        i += 2;
        enum kind kind = f->kind = kind_of(p + f->name, f->name_n);
        const unsigned char *v = p + f->value;
        switch (kind) {
        case K_DECLINED:
            Py_RETURN_NONE;
        case K_HOST:
            if (seen[K_HOST] || !valid_host(v, f->value_n))
                Py_RETURN_NONE;
            break;
        case K_AUTHORIZATION:
        case K_X_API_KEY:
            if (seen[kind])
                Py_RETURN_NONE;
            break;
        case K_CONTENT_LENGTH:
            if (seen[kind] || f->value_n == 0)
                Py_RETURN_NONE;
            for (Py_ssize_t j = 0; j < f->value_n; j++) {
                if (v[j] < '0' || v[j] > '9')
                    Py_RETURN_NONE;
                length = length * 10 + (v[j] - '0');
                if (length > MAX_BODY)
                    Py_RETURN_NONE;
            }
            break;
        case K_CONNECTION:
            if (keep_alive && has_close(v, f->value_n))
                keep_alive = 0;
            break;
        default:
            break;
        }
        if (!seen[kind])
            first_of[kind] = count;
        seen[kind]++;
        count++;
    }
    Py_ssize_t size = i;
    if (!seen[K_HOST])
        Py_RETURN_NONE;
    if (seen[K_AUTHORIZATION] && seen[K_X_API_KEY]) {
        field *a = &fields[first_of[K_AUTHORIZATION]], *k = &fields[first_of[K_X_API_KEY]];
        if (!is_ascii(p + a->value, a->value_n) || !is_ascii(p + k->value, k->value_n)
            || credentials_differ(p + a->value, a->value_n, p + k->value, k->value_n))
            Py_RETURN_NONE;
    }

    /* Accepted: build the answer. */
    Py_ssize_t needed = size + length;
    int whole = n >= needed;
    PyObject *headers = NULL, *first = NULL, *connection = NULL, *item = NULL;
    PyObject *url_b = NULL, *service_s = NULL, *target = NULL, *body = NULL;
    headers = PyList_New(count);
    first = PyDict_New();
    url_b = PyBytes_FromStringAndSize((const char *)p + url, url_end - url);
    service_s = PyUnicode_DecodeASCII((const char *)p + service, service_end - service, NULL);
    target = PyUnicode_DecodeASCII((const char *)p + service_end, url_end - service_end, NULL);
    if (!headers || !first || !url_b || !service_s || !target)
        goto fail;
    if (seen[K_CONNECTION] && !(connection = PyList_New(seen[K_CONNECTION])))
        goto fail;
    Py_ssize_t connections = 0;
    for (int h = 0; h < count; h++) {
        field *f = &fields[h];
        PyObject *name, *value;
        if (f->kind != K_OTHER) {  /* (K_DECLINED never gets here) */
            name = name_bytes[f->kind];
            Py_INCREF(name);
        } else {
            if (!(name = PyBytes_FromStringAndSize(NULL, f->name_n)))
                goto fail;
            char *out = PyBytes_AS_STRING(name);
            for (Py_ssize_t j = 0; j < f->name_n; j++)
                out[j] = (char)lower(p[f->name + j]);
        }
        value = PyBytes_FromStringAndSize((const char *)p + f->value, f->value_n);
        if (!value) {
            Py_DECREF(name);
            goto fail;
        }
        if (!(item = PyTuple_Pack(2, name, value))) {
            Py_DECREF(name);
            Py_DECREF(value);
            goto fail;
        }
        PyList_SET_ITEM(headers, h, item);  /* (steals the tuple) */
        item = NULL;
        if (f->kind == K_CONNECTION) {
            Py_INCREF(value);
            PyList_SET_ITEM(connection, connections++, value);
        }
        if (f->kind >= K_HOST && f->kind <= K_X_BALANCE_KEY && first_of[f->kind] == h) {
            const char *v = (const char *)p + f->value;
            PyObject *text = is_ascii(p + f->value, f->value_n)
                ? PyUnicode_DecodeASCII(v, f->value_n, NULL)
                : PyUnicode_DecodeUTF8(v, f->value_n, "surrogateescape");
            int failed = !text || PyDict_SetItem(first, name, text) < 0;
            Py_XDECREF(text);
            if (failed) {
                Py_DECREF(name);
                Py_DECREF(value);
                goto fail;
            }
        }
        Py_DECREF(name);  /* (the tuple holds them) */
        Py_DECREF(value);
    }
    if (whole && length) {
        if (!(body = PyBytes_FromStringAndSize((const char *)p + size, length)))
            goto fail;
    } else {
        body = Py_None;
        Py_INCREF(body);
    }
    if (!connection) {
        connection = Py_None;
        Py_INCREF(connection);
    }
    /* "N" steals the references made above; "O" borrows. */
    return Py_BuildValue("(nOONNNNNNnON)", needed, whole ? Py_True : Py_False,
                         method_str[m], url_b, service_s, target, headers, first,
                         connection, length, keep_alive ? Py_True : Py_False, body);
fail:
    Py_XDECREF(headers);
    Py_XDECREF(first);
    Py_XDECREF(connection);
    Py_XDECREF(url_b);
    Py_XDECREF(service_s);
    Py_XDECREF(target);
    Py_XDECREF(body);
    return NULL;
}

static PyObject *parse(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (!PyBytes_Check(arg) && !PyByteArray_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "parse() takes bytes or a bytearray");
        return NULL;
    }
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = parse_buffer((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_O,
     "parse(buf) -> tuple | None: the request at the start of buf as "
     "webapi.fastpath.request.parse_request reads it, or None (declined: the Python "
     "runs). The module docstring of _creq.c says what the tuple holds."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_creq",
    "The fast path's request parse in C; webapi.fastpath.request.parse_request is "
    "its reference.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__creq(void) {
    for (int k = 0; k < K_COUNT; k++)
        if (NAMES[k] && !name_bytes[k] && !(name_bytes[k] = PyBytes_FromString(NAMES[k])))
            return NULL;
    for (int k = 0; k < 7; k++)
        if (!method_str[k] && !(method_str[k] = PyUnicode_InternFromString(METHODS[k])))
            return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (!mod)
        return NULL;
    if (PyModule_AddIntConstant(mod, "MAX_HEAD", MAX_HEAD) < 0
        || PyModule_AddIntConstant(mod, "MAX_BODY", MAX_BODY) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
