# cython: language_level=3
"""The compiled fast path.  Each section has a pure-Python twin in
``pimcore._pure`` with the same API and the same exceptions; the test suite
runs against both and a differential hypothesis test compares them."""

include "_fastpath_codec.pxi"
include "_fastpath_order.pxi"
include "_fastpath_fanout.pxi"
include "_fastpath_records.pxi"
include "_fastpath_send.pxi"
include "_fastpath_log.pxi"
include "_fastpath_sync.pxi"
