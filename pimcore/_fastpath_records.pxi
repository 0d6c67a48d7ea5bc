# Fast constructors of frozen slotted dataclasses: the compiled twin of
# pimcore/_pure/records.py (read its docstring for the contract).
#
# Why: the hot path builds several records per message (NewMessage, Appended,
# SendAck, Message, SendData...), and a frozen dataclass's generated __init__
# pays one object.__setattr__ call per field -- 1-2 µs for a 12-field Message,
# most of the core's per-message Python work.  A maker allocates the instance
# with tp_alloc and stores the arguments straight into the slots, exactly as
# the codec's decoder does (same helpers, same import-time validation: a
# round trip through the real constructor must put every argument into the
# slot computed for it).  Any call that is not "every field, positionally"
# goes to the class itself, so defaults, keywords and errors are the class's.

cdef class _RecordMaker:
    cdef object cls
    cdef PyObject* ptype
    cdef Py_ssize_t n
    cdef Py_ssize_t offsets[32]

    def __call__(self, *args, **kw):
        cdef Py_ssize_t i
        if kw or len(args) != self.n:
            return self.cls(*args, **kw)
        obj = pimcore_cd_alloc(self.ptype)
        for i in range(self.n):
            pimcore_cd_set_slot(<PyObject*>obj, self.offsets[i], <PyObject*>args[i])
        return obj

    def __repr__(self):
        return f"record_maker({self.cls.__qualname__})"


def record_maker(cls):
    """A constructor of ``cls`` (a dataclass type): ``record_maker(cls)(*args)``
    equals ``cls(*args)``.  Faster when ``cls`` is a slotted dataclass with a
    generated ``__init__`` and no ``__post_init__``, and ``args`` holds every
    field in order; any other call is ``cls``'s own (defaults, keywords,
    TypeError).  TypeError if ``cls`` is not a dataclass type."""
    cdef _RecordMaker m
    cdef Py_ssize_t j
    if not isinstance(cls, type) or not _cd_dataclasses.is_dataclass(cls):
        raise TypeError(f"record_maker needs a dataclass type, not {cls!r}")
    fields = _cd_dataclasses.fields(cls)
    init = getattr(cls, "__init__", None)
    if (
        len(fields) == 0
        or len(fields) > 32
        or hasattr(cls, "__post_init__")
        or any(not f.init or f.kw_only for f in fields)
        # the dataclass-generated __init__ (it only assigns the fields)
        or "__create_fn__" not in getattr(getattr(init, "__code__", None), "co_qualname", "")
        or not pimcore_cd_generic_alloc(<PyObject*>cls)
        or cls.__new__ is not object.__new__
    ):
        return cls
    m = _RecordMaker.__new__(_RecordMaker)
    m.cls = cls
    m.ptype = <PyObject*>cls
    m.n = len(fields)
    for j, f in enumerate(fields):
        descr = cls.__dict__.get(f.name)
        m.offsets[j] = pimcore_cd_slot_offset(<PyObject*>cls, <PyObject*>descr if descr is not None else NULL)
        if m.offsets[j] < 0:
            return cls
    sentinels = [object() for _ in range(m.n)]
    try:
        inst = cls(*sentinels)
    except Exception:
        return cls
    for j in range(m.n):
        if pimcore_cd_get_slot(<PyObject*>inst, m.offsets[j]) != <PyObject*>sentinels[j]:
            return cls
    return m
