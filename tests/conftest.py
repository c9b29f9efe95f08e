"""Suite-wide set-up. Triton reads TRITON_INTERPRET when it is first imported, so the kernel tests
(which run Triton on CPU tensors through its interpreter) need it before any test imports torch."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
