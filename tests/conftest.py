"""Suite-wide set-up, done before any test imports torch or triton.

- Triton reads TRITON_INTERPRET when first imported: the kernel tests run Triton on CPU tensors
  through its interpreter.
- One intra-op thread per process: the suite runs test processes, servers and workers side by
  side on a 2-core machine, and oversubscribed torch threads slow small tensor work down by an
  order of magnitude (measured: the DLG test takes 9.5 s on one thread, over 200 s on two threads
  while a second process computes). Subprocesses inherit the setting.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
