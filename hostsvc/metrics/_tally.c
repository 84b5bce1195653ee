/* hostsvc.metrics._tally: the request path of hostsvc's request metrics, in C.
 *
 * Why C: on granian, whose whole request path is short, the Python middleware cost 7-9 %
 * of the stack's CPU (issue #4's target is under 5 %), and pure Python was at its floor:
 * a Python frame around the app, two clock calls, a tuple per request and a loop per
 * record in the batch that wrote it (about 10k instructions per request). Here a
 * request costs a C call around the app and a few additions into plain arrays; what
 * the arrays hold is drained a few times a second by hostsvc/metrics/wsgi.py (take()),
 * which writes it to prometheus_client's files with the library's own value objects.
 *
 * Tally(app, status_key, wrap, start, buckets, clocks=None) is the WSGI middleware.
 * Per request it:
 *   - counts the request as begun (the in-flight gauge is begun - ended);
 *   - maps REQUEST_METHOD to one of GET HEAD POST PUT PATCH DELETE OPTIONS other;
 *   - observes the queue time from nginx's "X-Request-Start: t=<unix seconds>";
 *   - calls the app, with start_response wrapped to leave the status line in the environ
 *     under status_key if `wrap` (apps that leave it there themselves are not wrapped);
 *   - for a list body: counts the request under its method and status code, observes its
 *     duration and size; an exception from the app counts as a 500 and is re-raised;
 *   - any other body (a generator, Flask's and Django's responses) is returned wrapped
 *     in a CountingBody, which counts the bytes as the server iterates and records the
 *     request when the server closes it (a generator app calls start_response only
 *     when first iterated, so its status is known only then).
 * `start()` is called once before the first request (it binds the metrics and starts the
 * flusher); if it returns false the app is served without metrics.
 *
 * Thread safety, under the GIL: a request's additions run with no Python code in
 * between (record()), and take() moves everything out and zeroes it before it makes any
 * Python object (an allocation can run the collector, and with it Python code), so
 * gthread workers' request threads and the flusher's take() cannot interleave in them.
 * The module does not declare free-threading support, so a free-threaded Python runs it
 * with the GIL enabled.
 *
 * What is and is not raised: the metrics' own failures are never raised to the server
 * (an Exception from start() or on_batch is printed as unraisable, a failed environ
 * lookup reads as a missing key) and the request is served; SystemExit and
 * KeyboardInterrupt from start() or on_batch pass, ending the request as they would
 * have without the metrics.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define N_METHODS 8
#define METHOD_GET 0
#define METHOD_OTHER 7
static const char *const METHOD_NAMES[N_METHODS] = {
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"};
static const Py_ssize_t METHOD_LENGTHS[N_METHODS] = {3, 4, 4, 3, 5, 6, 7, 5};

/* Status codes 100-999 are counted as such; anything else is what the server answers
 * for a status line it cannot send: 500. */
#define MIN_CODE 100
#define N_CODES 900
#define SERVER_ERROR 500

#define MAX_BOUNDS 31              /* finite bucket bounds; +Inf is implied */
#define BATCH_MASK 255             /* on_batch runs every 256 requests */

/* A queue time of a day or more, or below -1 s, comes from a bad header or clock: not
 * observed. Between -1 s and 0 it is nginx's cached $msec behind the worker's clock: 0. */
#define MIN_QUEUE (-1.0)
#define MAX_QUEUE 86400.0
#define MAX_HEADER 40

typedef struct {
    Py_ssize_t n;                  /* finite bounds; buckets has n + 1 counts */
    double bounds[MAX_BOUNDS];
} Bounds;

typedef struct {
    double sum;
    uint64_t count;
    uint64_t buckets[MAX_BOUNDS + 1];
} Hist;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *app;
    PyObject *status_key;
    PyObject *start;
    PyObject *on_batch;            /* None, or called every 256 requests (no flusher) */
    PyObject *mono_clock;          /* NULL: CLOCK_MONOTONIC; tests pass callables */
    PyObject *wall_clock;          /* NULL: CLOCK_REALTIME */
    PyObject *method_names[N_METHODS];
    int wrap;
    int state;                     /* IDLE, RUNNING or OFF */
    uint64_t began;
    uint64_t ended;
    int64_t in_flight_reported;
    Bounds duration_bounds, queue_bounds, size_bounds;
    Hist duration[N_METHODS];
    Hist queue;
    Hist size;
    uint64_t codes[N_METHODS][N_CODES];
    uint16_t touched[N_METHODS * N_CODES];   /* codes entries that are not 0 */
    Py_ssize_t n_touched;
    char last_header[MAX_HEADER];  /* the last X-Request-Start parsed, and its value */
    Py_ssize_t last_header_len;
    double last_stamp;
} Tally;

enum { IDLE = 0, RUNNING = 1, OFF = 2 };

/* Keep an exception in flight across code that may set and clear its own. */
#if PY_VERSION_HEX >= 0x030C0000
typedef struct { PyObject *exc; } SavedError;
static inline SavedError save_error(void) { return (SavedError){PyErr_GetRaisedException()}; }
static inline void restore_error(SavedError e) { PyErr_SetRaisedException(e.exc); }
#else
typedef struct { PyObject *type, *value, *tb; } SavedError;
static inline SavedError
save_error(void)
{
    SavedError e;
    PyErr_Fetch(&e.type, &e.value, &e.tb);
    return e;
}
static inline void restore_error(SavedError e) { PyErr_Restore(e.type, e.value, e.tb); }
#endif

static PyTypeObject TallyType;
static PyTypeObject KeepStatusType;
static PyTypeObject CountingBodyType;

/* -- clocks ------------------------------------------------------------------------- */

static double
read_clock(PyObject *fn, clockid_t id)
{
    if (fn == NULL) {
        struct timespec ts;
        clock_gettime(id, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    /* A test's clock: never let it disturb the request (or an exception in flight). */
    SavedError saved = save_error();
    double t = 0.0;
    PyObject *r = PyObject_CallNoArgs(fn);
    if (r != NULL) {
        t = PyFloat_AsDouble(r);
        Py_DECREF(r);
    }
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(fn);
        t = 0.0;
    }
    restore_error(saved);
    return t;
}

/* -- accumulators ------------------------------------------------------------------- */

static inline void
observe(Hist *h, const Bounds *b, double v)
{
    Py_ssize_t i = 0;
    while (i < b->n && v > b->bounds[i])    /* prometheus_client: first v <= bound */
        i++;
    h->buckets[i]++;
    h->count++;
    h->sum += v;
}

static void
zero_histograms(Tally *self)
{
    memset(self->duration, 0, sizeof(self->duration));
    memset(&self->queue, 0, sizeof(self->queue));
    memset(&self->size, 0, sizeof(self->size));
}

static inline void
count_code(Tally *self, int method, int code)
{
    uint64_t *slot = &self->codes[method][code - MIN_CODE];
    if ((*slot)++ == 0)
        self->touched[self->n_touched++] = (uint16_t)(method * N_CODES + code - MIN_CODE);
}

/* Everything about an ended request: called with no Python code in between, so a
 * request's values and a take() never interleave. */
static inline void
record(Tally *self, int method, int code, double started, Py_ssize_t size)
{
    double ended = read_clock(self->mono_clock, CLOCK_MONOTONIC);
    count_code(self, method, code);
    observe(&self->duration[method], &self->duration_bounds, ended - started);
    observe(&self->size, &self->size_bounds, (double)size);
    self->ended++;
}

/* A failure of a call into Python on the request path: an Exception is the metrics'
 * own and is printed, never raised to the server; anything else (SystemExit from
 * gunicorn's signal handlers, KeyboardInterrupt) is left to end the request, as it
 * would have ended it without the metrics. Returns -1 for the latter. */
static int
unraisable(PyObject *where)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyErr_WriteUnraisable(where);
    return 0;
}

/* After a request was recorded: a process without a flusher writes every 256. */
static int
after_record(Tally *self)
{
    if (self->on_batch == Py_None || (self->ended & BATCH_MASK) != 0)
        return 0;
    PyObject *on_batch = Py_NewRef(self->on_batch);     /* the call may replace it */
    PyObject *r = PyObject_CallNoArgs(on_batch);
    int ok = r != NULL || unraisable(on_batch) == 0;
    Py_XDECREF(r);
    Py_DECREF(on_batch);
    return ok ? 0 : -1;
}

/* -- reading the environ ------------------------------------------------------------ */

/* environ[key] as a new reference, or NULL (no exception) when it is missing or the
 * lookup fails: PEP 3333 asks for a dict, anything else is read through the protocol. */
static PyObject *
environ_get(PyObject *environ, PyObject *key)
{
    PyObject *v;
    if (PyDict_Check(environ)) {
        v = PyDict_GetItemWithError(environ, key);
        Py_XINCREF(v);
    }
    else {
        v = PyObject_GetItem(environ, key);
    }
    if (v == NULL)
        PyErr_Clear();
    return v;
}

static PyObject *KEY_METHOD, *KEY_REQUEST_START, *STR_CLOSE;

static int
method_index(PyObject *method)
{
    if (method == NULL)
        return METHOD_GET;
    if (!PyUnicode_Check(method) || !PyUnicode_IS_ASCII(method))
        return METHOD_OTHER;
    const char *s = (const char *)PyUnicode_DATA(method);
    Py_ssize_t n = PyUnicode_GET_LENGTH(method);
    for (int i = 0; i < METHOD_OTHER; i++) {
        if (METHOD_LENGTHS[i] == n && memcmp(s, METHOD_NAMES[i], n) == 0)
            return i;
    }
    return METHOD_OTHER;
}

static int
status_code(PyObject *status)
{
    if (status == NULL || !PyUnicode_Check(status) || PyUnicode_GET_LENGTH(status) < 3)
        return SERVER_ERROR;
    int code = 0;
    for (Py_ssize_t i = 0; i < 3; i++) {
        Py_UCS4 c = PyUnicode_READ_CHAR(status, i);
        if (c < '0' || c > '9')
            return SERVER_ERROR;
        code = code * 10 + (int)(c - '0');
    }
    return code >= MIN_CODE ? code : SERVER_ERROR;
}

/* The status code the app left in the environ under `key` (500 if none). */
static int
environ_status_code(PyObject *environ, PyObject *key)
{
    PyObject *status = environ_get(environ, key);
    int code = status_code(status);
    Py_XDECREF(status);
    return code;
}

/* The bytes of one body chunk; 0 for one that is not bytes (the server refuses it). */
static Py_ssize_t
chunk_size(PyObject *chunk)
{
    Py_ssize_t n = PyBytes_Check(chunk) ? PyBytes_GET_SIZE(chunk) : PyObject_Length(chunk);
    if (n < 0) {
        PyErr_Clear();
        return 0;
    }
    return n;
}

/* The queue time from "t=<unix seconds>" (nginx's $msec): observed, clamped or dropped.
 * Under load many requests carry the same $msec (cached per event-loop turn), so the
 * last header parsed is kept with its value. */
static void
observe_queue(Tally *self, PyObject *environ)
{
    PyObject *header = environ_get(environ, KEY_REQUEST_START);
    if (header == NULL)
        return;
    if (!PyUnicode_Check(header) || !PyUnicode_IS_ASCII(header)) {
        Py_DECREF(header);
        return;
    }
    const char *s = (const char *)PyUnicode_DATA(header);
    Py_ssize_t n = PyUnicode_GET_LENGTH(header);
    double stamp;
    if (n == self->last_header_len && memcmp(s, self->last_header, n) == 0) {
        stamp = self->last_stamp;
    }
    else {
        if (n <= 2 || n >= MAX_HEADER) {
            Py_DECREF(header);
            return;
        }
        /* The prefix is not compared: anything else fails here or lands outside the
         * accepted range. Stricter than float(): no spaces or underscores, as nginx's
         * $msec never has. (Compact ASCII strings end in a NUL.) */
        char *end;
        stamp = PyOS_string_to_double(s + 2, &end, NULL);
        if (stamp == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            stamp = NAN;
        }
        else if (end != s + n) {    /* a NUL or anything else after the number */
            stamp = NAN;
        }
        memcpy(self->last_header, s, n);
        self->last_header_len = n;
        self->last_stamp = stamp;
    }
    Py_DECREF(header);
    double queued = read_clock(self->wall_clock, CLOCK_REALTIME) - stamp;
    if (!(queued >= MIN_QUEUE && queued < MAX_QUEUE))   /* NaN and Inf too */
        return;
    observe(&self->queue, &self->queue_bounds, queued > 0.0 ? queued : 0.0);
}

/* -- KeepStatus: a start_response that leaves the status line in the environ --------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *environ;
    PyObject *start_response;
    PyObject *key;
} KeepStatus;

static PyObject *
keep_status_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                 PyObject *kwnames)
{
    KeepStatus *self = (KeepStatus *)callable;
    PyObject *write = PyObject_Vectorcall(self->start_response, args, nargsf, kwnames);
    /* Only a status the server took: with exc_info after the headers went out, it
     * re-raises, and the client keeps the status it already got. */
    if (write != NULL && PyVectorcall_NARGS(nargsf) >= 1 &&
            PyObject_SetItem(self->environ, self->key, args[0]) < 0) {
        if (unraisable((PyObject *)self) < 0)
            Py_CLEAR(write);
        /* else: the status goes uncounted (500); the response still goes */
    }
    return write;
}

static PyObject *
keep_status_new(PyObject *environ, PyObject *start_response, PyObject *key)
{
    KeepStatus *self = PyObject_GC_New(KeepStatus, &KeepStatusType);
    if (self == NULL)
        return NULL;
    self->vectorcall = keep_status_call;
    self->environ = Py_NewRef(environ);
    self->start_response = Py_NewRef(start_response);
    self->key = Py_NewRef(key);
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
keep_status_traverse(KeepStatus *self, visitproc visit, void *arg)
{
    Py_VISIT(self->environ);
    Py_VISIT(self->start_response);
    Py_VISIT(self->key);
    return 0;
}

static int
keep_status_clear(KeepStatus *self)
{
    Py_CLEAR(self->environ);
    Py_CLEAR(self->start_response);
    Py_CLEAR(self->key);
    return 0;
}

static void
keep_status_dealloc(KeepStatus *self)
{
    PyObject_GC_UnTrack(self);
    keep_status_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject KeepStatusType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostsvc.metrics._tally.KeepStatus",
    .tp_doc = "start_response, leaving the status line in the environ for the metrics.",
    .tp_basicsize = sizeof(KeepStatus),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(KeepStatus, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)keep_status_traverse,
    .tp_clear = (inquiry)keep_status_clear,
    .tp_dealloc = (destructor)keep_status_dealloc,
};

/* -- CountingBody: a streamed body, counted as the server sends it -------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *body;                /* the app's iterable: close() is passed on to it */
    PyObject *iterator;            /* iter(body), NULL until the server first iterates */
    PyObject *tally;
    PyObject *environ;             /* where the status line is, once the app set it */
    int method;
    int done;
    double started;
    Py_ssize_t size;
} CountingBody;

static PyObject *
counting_body_new(PyObject *body, PyObject *tally, PyObject *environ, int method,
                  double started)
{
    CountingBody *self = PyObject_GC_New(CountingBody, &CountingBodyType);
    if (self == NULL)
        return NULL;
    self->body = Py_NewRef(body);
    self->iterator = NULL;
    self->tally = Py_NewRef(tally);
    self->environ = Py_NewRef(environ);
    self->method = method;
    self->done = 0;
    self->started = started;
    self->size = 0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
counting_body_next(CountingBody *self)
{
    if (self->iterator == NULL && (self->iterator = PyObject_GetIter(self->body)) == NULL)
        return NULL;
    PyObject *chunk = PyIter_Next(self->iterator);
    if (chunk != NULL)
        self->size += chunk_size(chunk);
    return chunk;
}

/* A streamed request ends: its status line from the environ, its duration, its bytes.
 * Once per body. */
static void
record_body(CountingBody *self)
{
    if (self->done || self->tally == NULL)
        return;
    self->done = 1;
    Tally *tally = (Tally *)self->tally;
    record(tally, self->method, environ_status_code(self->environ, tally->status_key),
           self->started, self->size);
}

PyDoc_STRVAR(counting_body_close_doc,
"close()\n--\n\n"
"PEP 3333: the server calls close(); pass it on to the app's body, then record the\n"
"request.");

static PyObject *
counting_body_close(CountingBody *self, PyObject *Py_UNUSED(ignored))
{
    int failed = 0;
    PyObject *close = PyObject_GetAttr(self->body, STR_CLOSE);
    if (close == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError))
            PyErr_Clear();      /* a body without close() */
        else
            failed = 1;
    }
    else {
        PyObject *r = close == Py_None ? Py_NewRef(Py_None) : PyObject_CallNoArgs(close);
        failed = r == NULL;
        Py_XDECREF(r);
        Py_DECREF(close);
    }
    /* Recorded whether the app's close() raised or not (as a finally would). */
    SavedError saved = save_error();
    int already = self->done;
    record_body(self);
    if (!already && self->tally != NULL && after_record((Tally *)self->tally) < 0) {
        if (failed)     /* the app's exception first, as Python chains them */
            PyErr_Clear();
        else
            return NULL;
    }
    restore_error(saved);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

/* A server that dropped the body without close() (PEP 3333 says it must not): the
 * request still ends, or it would stay in flight for good. A finalizer, not dealloc:
 * the collector runs every finalizer of a garbage cycle before it clears any member,
 * so the tally and the environ are still there. Records only; the write waits for the
 * flusher (running a flush from inside a collection could take prometheus_client's
 * lock in a thread that already holds it). */
static void
counting_body_finalize(CountingBody *self)
{
    if (self->done)
        return;
    SavedError saved = save_error();
    record_body(self);
    restore_error(saved);
}

static int
counting_body_traverse(CountingBody *self, visitproc visit, void *arg)
{
    Py_VISIT(self->body);
    Py_VISIT(self->iterator);
    Py_VISIT(self->tally);
    Py_VISIT(self->environ);
    return 0;
}

static int
counting_body_clear(CountingBody *self)
{
    Py_CLEAR(self->body);
    Py_CLEAR(self->iterator);
    Py_CLEAR(self->tally);
    Py_CLEAR(self->environ);
    return 0;
}

static void
counting_body_dealloc(CountingBody *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return;                 /* resurrected by the finalizer */
    PyObject_GC_UnTrack(self);
    counting_body_clear(self);
    PyObject_GC_Del(self);
}

static PyMethodDef counting_body_methods[] = {
    {"close", (PyCFunction)counting_body_close, METH_NOARGS, counting_body_close_doc},
    {NULL},
};

static PyTypeObject CountingBodyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostsvc.metrics._tally.CountingBody",
    .tp_doc = "A streamed response body, its bytes counted and its request recorded at close().",
    .tp_basicsize = sizeof(CountingBody),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)counting_body_next,
    .tp_methods = counting_body_methods,
    .tp_traverse = (traverseproc)counting_body_traverse,
    .tp_clear = (inquiry)counting_body_clear,
    .tp_dealloc = (destructor)counting_body_dealloc,
    .tp_finalize = (destructor)counting_body_finalize,
};

/* -- Tally: the middleware ------------------------------------------------------------ */

/* Bind the metrics before a process's first request. 1: count; 0: serve without
 * metrics (start() failed or said so); -1: an exception that must end the request. */
static int
start(Tally *self)
{
    PyObject *r = PyObject_CallNoArgs(self->start);
    if (r == NULL) {
        if (unraisable(self->start) < 0)
            return -1;              /* not started: the next request tries again */
        self->state = OFF;
        return 0;
    }
    int ok = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (ok < 0 && unraisable(self->start) < 0)
        return -1;
    /* start() may have been reached by another request thread meanwhile: same answer. */
    self->state = ok == 1 ? RUNNING : OFF;
    return ok == 1;
}

static Py_ssize_t
list_body_size(PyObject *body)
{
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(body); i++)
        total += chunk_size(PyList_GET_ITEM(body, i));   /* re-read: __len__ may shrink it */
    return total;
}

static PyObject *
tally_call(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Tally *self = (Tally *)callable;
    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a WSGI app takes (environ, start_response)");
        return NULL;
    }
    if (self->state != RUNNING) {
        int counting = self->state == OFF ? 0 : start(self);
        if (counting < 0)
            return NULL;
        if (counting == 0)
            return PyObject_Vectorcall(self->app, args, 2, NULL);
    }

    PyObject *environ = args[0];
    double started = read_clock(self->mono_clock, CLOCK_MONOTONIC);
    self->began++;
    PyObject *method_obj = environ_get(environ, KEY_METHOD);
    int method = method_index(method_obj);
    Py_XDECREF(method_obj);
    observe_queue(self, environ);

    PyObject *body;
    if (self->wrap) {
        PyObject *keeper = keep_status_new(environ, args[1], self->status_key);
        if (keeper == NULL) {
            body = NULL;
        }
        else {
            PyObject *call_args[2] = {environ, keeper};
            body = PyObject_Vectorcall(self->app, call_args, 2, NULL);
            Py_DECREF(keeper);
        }
    }
    else {
        body = PyObject_Vectorcall(self->app, args, 2, NULL);
    }
    if (body == NULL) {
        /* A worker aborted for a timeout raises SystemExit here too, and the server
         * still answers that request with a 500. */
        record(self, method, SERVER_ERROR, started, 0);
        return NULL;
    }
    if (PyList_CheckExact(body)) {
        Py_ssize_t size = list_body_size(body);
        record(self, method, environ_status_code(environ, self->status_key), started, size);
        if (after_record(self) < 0)
            Py_CLEAR(body);
        return body;
    }
    PyObject *wrapped = counting_body_new(body, callable, environ, method, started);
    if (wrapped == NULL) {
        record(self, method, SERVER_ERROR, started, 0);
        SavedError saved = save_error();
        PyObject *r = PyObject_CallMethodNoArgs(body, STR_CLOSE);
        Py_XDECREF(r);
        PyErr_Clear();
        restore_error(saved);
    }
    Py_DECREF(body);
    return wrapped;
}

/* The bucket counts of `h`, one per bucket, the last one for +Inf. */
static PyObject *
bucket_counts(const Hist *h, const Bounds *b)
{
    PyObject *counts = PyTuple_New(b->n + 1);
    if (counts == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i <= b->n; i++) {
        PyObject *c = PyLong_FromUnsignedLongLong(h->buckets[i]);
        if (c == NULL) {
            Py_DECREF(counts);
            return NULL;
        }
        PyTuple_SET_ITEM(counts, i, c);
    }
    return counts;
}

/* (sum, bucket counts), or None when nothing was observed. */
static PyObject *
hist_tuple(const Hist *h, const Bounds *b)
{
    if (h->count == 0)
        return Py_NewRef(Py_None);
    PyObject *counts = bucket_counts(h, b);
    return counts ? Py_BuildValue("(dN)", h->sum, counts) : NULL;
}

/* What take() moves out of a Tally before it builds any Python object. */
typedef struct {
    int64_t in_flight_delta;
    Py_ssize_t n_codes;
    struct { uint16_t entry; uint64_t n; } codes[N_METHODS * N_CODES];
    Hist duration[N_METHODS];
    Hist queue;
    Hist size;
} Taken;

PyDoc_STRVAR(take_doc,
"take() -> (in_flight, counts, durations, queue, sizes)\n--\n\n"
"What requests added since the last take(), and start again from zero:\n"
"in_flight: the change of requests in flight; counts: [(method, code, n)];\n"
"durations: [(method, sum, bucket counts)]; queue and sizes: (sum, bucket counts),\n"
"or None when nothing was observed. Bucket counts are per bucket (not cumulative),\n"
"the last one for +Inf. If building the result fails (MemoryError), what was taken\n"
"is lost, as a batch that fails to be written is; the in-flight figure is not.");

static PyObject *
tally_take(Tally *self, PyObject *Py_UNUSED(ignored))
{
    /* Moved out and zeroed first, with no Python object made in between: on 3.11 an
     * allocation can run the collector, whose finalizers run Python code that can
     * record requests or let a request thread run. Those land in the zeroed arrays,
     * for the next take(). */
    Taken *t = PyMem_RawMalloc(sizeof(Taken));
    if (t == NULL)
        return PyErr_NoMemory();
    int64_t in_flight = (int64_t)(self->began - self->ended);
    t->in_flight_delta = in_flight - self->in_flight_reported;
    t->n_codes = self->n_touched;
    for (Py_ssize_t i = 0; i < self->n_touched; i++) {
        uint16_t entry = self->touched[i];
        t->codes[i].entry = entry;
        t->codes[i].n = self->codes[entry / N_CODES][entry % N_CODES];
        self->codes[entry / N_CODES][entry % N_CODES] = 0;
    }
    self->n_touched = 0;
    memcpy(t->duration, self->duration, sizeof(self->duration));
    t->queue = self->queue;
    t->size = self->size;
    zero_histograms(self);

    PyObject *counts = PyList_New(0), *durations = PyList_New(0);
    PyObject *queue = NULL, *sizes = NULL, *result = NULL;
    if (counts == NULL || durations == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < t->n_codes; i++) {
        int method = t->codes[i].entry / N_CODES, index = t->codes[i].entry % N_CODES;
        PyObject *item = Py_BuildValue("(OiK)", self->method_names[method], index + MIN_CODE,
                                       (unsigned long long)t->codes[i].n);
        if (item == NULL || PyList_Append(counts, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    for (int m = 0; m < N_METHODS; m++) {
        if (t->duration[m].count == 0)
            continue;
        PyObject *c = bucket_counts(&t->duration[m], &self->duration_bounds);
        PyObject *item = c ? Py_BuildValue("(OdN)", self->method_names[m],
                                           t->duration[m].sum, c) : NULL;
        if (item == NULL || PyList_Append(durations, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    if ((queue = hist_tuple(&t->queue, &self->queue_bounds)) == NULL ||
            (sizes = hist_tuple(&t->size, &self->size_bounds)) == NULL)
        goto done;
    result = Py_BuildValue("(LOOOO)", (long long)t->in_flight_delta, counts, durations,
                           queue, sizes);
    if (result != NULL)
        self->in_flight_reported += t->in_flight_delta;
done:
    PyMem_RawFree(t);
    Py_XDECREF(counts);
    Py_XDECREF(durations);
    Py_XDECREF(queue);
    Py_XDECREF(sizes);
    return result;
}

static void
zero(Tally *self)
{
    self->began = self->ended = 0;
    self->in_flight_reported = 0;
    memset(self->codes, 0, sizeof(self->codes));
    self->n_touched = 0;
    zero_histograms(self);
    self->last_header_len = -1;
}

PyDoc_STRVAR(reset_doc,
"reset()\n--\n\n"
"In a child forked from a process with requests counted or in flight: they are the\n"
"parent's to write. Start from zero, and call start() again at the next request.");

static PyObject *
tally_reset(Tally *self, PyObject *Py_UNUSED(ignored))
{
    zero(self);
    self->state = IDLE;
    Py_RETURN_NONE;
}

/* Finite, increasing upper bounds from any sequence of numbers (read from a tuple of
 * its own, which nothing can change while it is read). */
static int
read_bounds(PyObject *seq, Bounds *b)
{
    PyObject *bounds = PySequence_Tuple(seq);
    if (bounds == NULL)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(bounds);
    int ok = n >= 1 && n <= MAX_BOUNDS;
    if (!ok)
        PyErr_Format(PyExc_ValueError, "1 to %d bucket bounds, not %zd", MAX_BOUNDS, n);
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        double v = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (v == -1.0 && PyErr_Occurred()) {
            ok = 0;
        }
        else if (!isfinite(v) || (i > 0 && v <= b->bounds[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "bucket bounds must be finite and increasing");
            ok = 0;
        }
        else {
            b->bounds[i] = v;
        }
    }
    Py_DECREF(bounds);
    if (!ok)
        return -1;
    b->n = n;
    return 0;
}

static PyObject *
tally_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"app", "status_key", "wrap", "start", "buckets", "clocks", NULL};
    PyObject *app, *status_key, *start_fn, *buckets;
    PyObject *clocks = Py_None;
    int wrap;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OUpOO|O:Tally", kwlist, &app,
                                     &status_key, &wrap, &start_fn, &buckets, &clocks))
        return NULL;
    if (!PyCallable_Check(app) || !PyCallable_Check(start_fn)) {
        PyErr_SetString(PyExc_TypeError, "app and start must be callable");
        return NULL;
    }
    if (!PyUnicode_CheckExact(status_key)) {
        PyErr_SetString(PyExc_TypeError, "status_key must be a str");
        return NULL;
    }
    PyObject *mono = NULL, *wall = NULL;
    if (clocks != Py_None &&
            !PyArg_ParseTuple(clocks, "OO;clocks: (monotonic, wall) callables", &mono, &wall))
        return NULL;
    Tally *self = (Tally *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    /* Set before anything can fail: dealloc releases them. */
    self->vectorcall = tally_call;
    self->app = Py_NewRef(app);
    self->status_key = Py_NewRef(status_key);
    self->start = Py_NewRef(start_fn);
    self->on_batch = Py_NewRef(Py_None);
    self->mono_clock = Py_XNewRef(mono);
    self->wall_clock = Py_XNewRef(wall);
    self->wrap = wrap;
    self->state = IDLE;
    zero(self);
    PyObject *three = PySequence_Tuple(buckets);
    if (three == NULL || PyTuple_GET_SIZE(three) != 3) {
        if (three != NULL)
            PyErr_SetString(PyExc_ValueError, "buckets: (duration, queue, size) bounds");
        Py_XDECREF(three);
        Py_DECREF(self);
        return NULL;
    }
    int failed = read_bounds(PyTuple_GET_ITEM(three, 0), &self->duration_bounds) < 0 ||
                 read_bounds(PyTuple_GET_ITEM(three, 1), &self->queue_bounds) < 0 ||
                 read_bounds(PyTuple_GET_ITEM(three, 2), &self->size_bounds) < 0;
    Py_DECREF(three);
    for (int i = 0; !failed && i < N_METHODS; i++)
        failed = (self->method_names[i] = PyUnicode_InternFromString(METHOD_NAMES[i])) == NULL;
    if (failed) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
tally_traverse(Tally *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->start);
    Py_VISIT(self->on_batch);
    Py_VISIT(self->mono_clock);
    Py_VISIT(self->wall_clock);
    return 0;
}

/* Breaks cycles (the recorder's start() holds the tally), and leaves what recording
 * reads: a streamed body of the same garbage may still record into it (its status key
 * and method names are strs, which hold nothing). */
static int
tally_clear(Tally *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->start);
    Py_CLEAR(self->mono_clock);
    Py_CLEAR(self->wall_clock);
    Py_XSETREF(self->on_batch, Py_NewRef(Py_None));
    return 0;
}

static void
tally_dealloc(Tally *self)
{
    PyObject_GC_UnTrack(self);
    tally_clear(self);
    Py_CLEAR(self->on_batch);
    Py_CLEAR(self->status_key);
    for (int i = 0; i < N_METHODS; i++)
        Py_CLEAR(self->method_names[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
tally_set_on_batch(Tally *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || (value != Py_None && !PyCallable_Check(value))) {
        PyErr_SetString(PyExc_TypeError, "on_batch must be a callable or None");
        return -1;
    }
    Py_SETREF(self->on_batch, Py_NewRef(value));
    return 0;
}

static PyObject *
tally_get_on_batch(Tally *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->on_batch);
}

static PyGetSetDef tally_getset[] = {
    {"on_batch", (getter)tally_get_on_batch, (setter)tally_set_on_batch,
     "None, or a callable run after every 256th request (a process without a flusher "
     "thread writes its metrics from there).", NULL},
    {NULL},
};

static PyMethodDef tally_methods[] = {
    {"take", (PyCFunction)tally_take, METH_NOARGS, take_doc},
    {"reset", (PyCFunction)tally_reset, METH_NOARGS, reset_doc},
    {NULL},
};

PyDoc_STRVAR(tally_doc,
"Tally(app, status_key, wrap, start, buckets, clocks=None)\n--\n\n"
"A WSGI app: `app` with its requests counted, timed and sized in memory until take().\n"
"buckets: (duration, queue, size) finite upper bounds. clocks: (monotonic, wall)\n"
"callables returning seconds, in place of the system's clocks (for tests).");

static PyTypeObject TallyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostsvc.metrics._tally.Tally",
    .tp_doc = tally_doc,
    .tp_basicsize = sizeof(Tally),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Tally, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = tally_new,
    .tp_traverse = (traverseproc)tally_traverse,
    .tp_clear = (inquiry)tally_clear,
    .tp_dealloc = (destructor)tally_dealloc,
    .tp_methods = tally_methods,
    .tp_getset = tally_getset,
};

static struct PyModuleDef tally_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "hostsvc.metrics._tally",
    .m_doc = "The request path of hostsvc's request metrics (see hostsvc/metrics/wsgi.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__tally(void)
{
    if (PyType_Ready(&TallyType) < 0 || PyType_Ready(&KeepStatusType) < 0 ||
            PyType_Ready(&CountingBodyType) < 0)
        return NULL;
    KEY_METHOD = PyUnicode_InternFromString("REQUEST_METHOD");
    KEY_REQUEST_START = PyUnicode_InternFromString("HTTP_X_REQUEST_START");
    STR_CLOSE = PyUnicode_InternFromString("close");
    if (KEY_METHOD == NULL || KEY_REQUEST_START == NULL || STR_CLOSE == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&tally_module);
    if (m == NULL)
        return NULL;
    PyObject *methods = PyTuple_New(METHOD_OTHER);
    if (methods == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    for (int i = 0; i < METHOD_OTHER; i++) {
        PyObject *name = PyUnicode_FromString(METHOD_NAMES[i]);
        if (name == NULL) {
            Py_DECREF(methods);
            Py_DECREF(m);
            return NULL;
        }
        PyTuple_SET_ITEM(methods, i, name);
    }
    if (PyModule_AddObject(m, "KNOWN_METHODS", methods) < 0) {
        Py_DECREF(methods);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Tally", (PyObject *)&TallyType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
