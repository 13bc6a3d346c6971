"""cdot's worker: the only process that runs the candidate's code, inside lab.sandbox.

    python -I -S worker.py LIBWORK.so SHM_FD N CALLS

It loads the candidate's shared object and answers the trusted runner over its pipes: on each
`g` byte on stdin it calls `work(x, N)` CALLS times on the N doubles at the start of the shared
memory (SHM_FD, a memfd the runner made and filled just before) and stores the CALLS results
after them, then writes `d`. It reports nothing else: the runner times each request from outside
and checks every result itself. The worker holds no secret and sees nothing but its library.

Once the library is loaded, the worker gives up the right to start processes or threads
(RLIMIT_NPROC 1, soft and hard): no work can leave the process whose CPU time the runner
reads. The runner checks the limit from outside before the first request.
"""

import ctypes
import mmap
import os
import resource
import struct
import sys

READY, GO, DONE = b"r", b"g", b"d"


def main() -> int:
    library, fd, n, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    shared = mmap.mmap(fd, (n + calls) * 8)
    base = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    work = ctypes.CDLL(library).work
    work.restype = ctypes.c_double
    work.argtypes = [ctypes.c_void_p, ctypes.c_long]
    results = n * 8
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    os.write(1, READY)
    while True:
        command = os.read(0, 1)
        if command != GO:
            return 0  # end of input (the runner closed the pipe) or anything else: stop
        for i in range(calls):
            struct.pack_into("d", shared, results + 8 * i, work(base, n))
        os.write(1, DONE)


if __name__ == "__main__":
    sys.exit(main())
