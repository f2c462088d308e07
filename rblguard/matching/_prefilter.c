/* The scanner's prefilter: one pass over a window of log lines, in C.
 *
 * It counts the lines and copies out the messages of those that start with a
 * stamp of the file's format (one of fixed width, given as a template) followed by
 * one of the rules' fixed texts.  Every hit of a rule's anchored pattern stands on such a line,
 * so the rules' searches then run over the copy, a tenth of the window on a typical
 * front end's log, instead of over all of it.  rblguard/matching/prefilter.py says
 * why and how it is used; without this module the scanner searches whole windows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_LITERALS 64

typedef struct {
    const char *text;
    Py_ssize_t len;
} literal_t;

/* Grows ``*buf`` (capacity ``*cap``) to hold ``need`` bytes; 0 on failure. */
static int
reserve(char **buf, Py_ssize_t *cap, Py_ssize_t need)
{
    if (need <= *cap)
        return 1;
    Py_ssize_t grown = *cap * 2 > need ? *cap * 2 : need;
    char *more = PyMem_Realloc(*buf, (size_t)grown);
    if (more == NULL)
        return 0;
    *buf = more;
    *cap = grown;
    return 1;
}

/* Whether ``line`` starts with a stamp that ``template`` describes, byte by byte:
 * 'x' a lower-case hex digit, 'd' a decimal digit, any other byte itself. */
static int
stamped(const unsigned char *line, const unsigned char *template, Py_ssize_t width)
{
    for (Py_ssize_t i = 0; i < width; i++) {
        unsigned char c = line[i], t = template[i];
        if (t == 'x') {
            if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
                return 0;
        } else if (t == 'd') {
            if (!(c >= '0' && c <= '9'))
                return 0;
        } else if (c != t) {
            return 0;
        }
    }
    return 1;
}

/* The literals of ``lits`` that ``message`` starts with, as bits (bit i: lits[i]); one
 * may be a prefix of another, so a message may start with several. */
static uint64_t
starts_with(const char *message, Py_ssize_t room, const literal_t *lits, int n)
{
    uint64_t which = 0;
    for (int i = 0; i < n; i++) {
        if (lits[i].len <= room && memcmp(message, lits[i].text, (size_t)lits[i].len) == 0)
            which |= (uint64_t)1 << i;
    }
    return which;
}

/* Adds one to found[i] for each bit i of ``which``. */
static void
count_each(uint64_t which, int64_t *found)
{
    for (int i = 0; which != 0; i++, which >>= 1)
        found[i] += (int64_t)(which & 1);
}

/* select(window, start, stop, template, literals) -> (lines, selected, origins, found)
 *
 * lines: the newlines in window[start:stop], whose lines it looks at; bytes after
 * the last newline are no line yet and are left out.
 * selected: b"\n" followed by the message of each chosen line (what follows its
 * stamp) with its newline.  A line is chosen when it starts with a stamp ``template``
 * describes (see stamped) and its message with one of ``literals``.
 * origins: for each chosen line, two native 8-byte integers: where its message starts
 * in ``selected``, and where in ``window``.
 * found: for each literal, a native 8-byte integer: how many chosen lines start with
 * it (a rule none starts with can have no hit, and its search can be skipped).
 */
static PyObject *
prefilter_select(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    Py_ssize_t start, stop, width;
    const char *template;
    PyObject *literals;
    if (!PyArg_ParseTuple(args, "y*nny#O!", &view, &start, &stop, &template, &width,
                          &PyTuple_Type, &literals))
        return NULL;
    PyObject *result = NULL;
    char *out = NULL, *org = NULL;
    Py_ssize_t out_len = 0, out_cap = 0, org_len = 0, org_cap = 0, lines = 0;
    literal_t lits[MAX_LITERALS];
    int64_t found[MAX_LITERALS] = {0};
    int n = (int)PyTuple_GET_SIZE(literals);
    if (n > MAX_LITERALS) {
        PyErr_SetString(PyExc_ValueError, "too many fixed texts");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(literals, i);
        if (!PyBytes_Check(item) || PyBytes_GET_SIZE(item) == 0) {
            PyErr_SetString(PyExc_TypeError, "fixed texts must be non-empty bytes");
            goto done;
        }
        lits[i].text = PyBytes_AS_STRING(item);
        lits[i].len = PyBytes_GET_SIZE(item);
    }
    if (start < 0 || stop > view.len || start > stop) {
        PyErr_SetString(PyExc_ValueError, "start or stop out of range");
        goto done;
    }
    out_cap = (stop - start) / 8 + 64;
    org_cap = 4096;
    out = PyMem_Malloc((size_t)out_cap);
    org = PyMem_Malloc((size_t)org_cap);
    if (out == NULL || org == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    out[out_len++] = '\n';
    const char *base = (const char *)view.buf;
    const char *p = base + start, *end = base + stop;
    Py_BEGIN_ALLOW_THREADS
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == NULL)  /* a partial last line: not a line yet */
            break;
        Py_ssize_t len = nl - p;
        uint64_t which = len > width ? starts_with(p + width, len - width, lits, n) : 0;
        if (which != 0 && stamped((const unsigned char *)p, (const unsigned char *)template,
                                  width)) {
            count_each(which, found);
            Py_ssize_t message = len - width;
            int64_t pair[2] = {(int64_t)out_len, (int64_t)(p + width - base)};
            if (!reserve(&out, &out_cap, out_len + message + 1)
                    || !reserve(&org, &org_cap, org_len + (Py_ssize_t)sizeof pair)) {
                out_len = -1;
                break;
            }
            memcpy(out + out_len, p + width, (size_t)message);
            out_len += message;
            out[out_len++] = '\n';
            memcpy(org + org_len, pair, sizeof pair);
            org_len += sizeof pair;
        }
        lines++;
        p = nl + 1;
    }
    Py_END_ALLOW_THREADS
    if (out_len < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_BuildValue("ny#y#y#", lines, out, out_len, org, org_len, (const char *)found,
                           (Py_ssize_t)(n * (Py_ssize_t)sizeof found[0]));
done:
    PyMem_Free(out);
    PyMem_Free(org);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"select", prefilter_select, METH_VARARGS,
     "select(window, start, stop, template, literals) -> (lines, selected, origins, found)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_prefilter",
    .m_doc = "The scanner's prefilter: count lines and copy out those a rule may match.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__prefilter(void)
{
    return PyModule_Create(&module);
}
