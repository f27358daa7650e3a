# CPython internals the core reads that Cython's cpython/*.pxd do not declare.

from cpython.object cimport PyTypeObject


cdef extern from "Python.h":
    # The slot of a __slots__ attribute (Include/cpython/descrobject.h).
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    object PyType_GenericAlloc(PyTypeObject *type, Py_ssize_t nitems)
    enum:
        PY_SSIZE_T_MAX
