"""Pure dm-thin metadata code: bytes in, bytes out, no I/O of its own.

Everything here works over a ``BlockSource`` (see ``blocks``); opening files or devices is
the job of the layers above.
"""
