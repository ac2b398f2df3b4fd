# Argument checks shared by the Router methods.  Part of fastroute._core; no
# Python-visible names.  Specification: fastroute/_args.py (check_int; check_str
# for as_str) and fastroute/_model.py (_check_count for as_count, the address and
# device-name checks): they raise exactly what those raise for the same input,
# and the property tests compare the exception classes.

from collections.abc import Iterable as _Iterable


cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX


cdef inline int check_int(object value, str what) except -1:
    """WrongType unless ``value`` is an int (bool is refused: always a bug)."""
    if not PyLong_Check(value) or PyBool_Check(value):
        raise WrongType(f"{what} must be int, not {type(value).__name__}")
    return 0


cdef Py_ssize_t as_count(object value, str what) except -1:
    """A non-negative int argument as Py_ssize_t; huge values saturate.

    Saturating (rather than OverflowError) keeps "pop everything" and "ack
    everything" spelled with any big int meaning the same in both engines.
    """
    cdef int overflow = 0
    cdef long long x
    check_int(value, what)
    x = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        return PY_SSIZE_T_MAX
    if overflow < 0 or x < 0:
        raise InvalidArgument(f"{what} must be >= 0")
    if x > PY_SSIZE_T_MAX:
        return PY_SSIZE_T_MAX
    return <Py_ssize_t>x


cdef str as_str(object value, str what):
    """``value`` as a plain str; WrongType if it is not a str at all."""
    if PyUnicode_CheckExact(value):
        return <str>value
    if PyUnicode_Check(value):
        # a str subclass could override __hash__/__eq__ and run code inside
        # the engine's dict lookups; work on a plain copy
        return str.__str__(value)
    raise WrongType(f"{what} must be str, not {type(value).__name__}")


cdef int check_address_format(str address) except -1:
    """InvalidArgument unless ``address`` looks like user@provider."""
    user, at, provider = address.rpartition("@")
    if not at or not user or not provider:
        raise InvalidArgument("address must look like user@provider")
    return 0


cdef str check_address(object value):
    cdef str address = as_str(value, "address")
    check_address_format(address)
    return address


cdef str check_name(object value):
    cdef str name = as_str(value, "device_name")
    if not name:
        raise InvalidArgument("device_name must not be empty")
    return name


cdef int check_iterable(object value, str what) except -1:
    """WrongType for non-iterables, and for str/bytes (a classic slip)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, _Iterable):
        raise WrongType(f"{what} must be an iterable")
    return 0
