import os

os.environ.setdefault("HOGC_VERIFY", "1")  # the IR verifier runs after every pass in the tests

import torch  # noqa: E402

if not torch.cuda.is_available():  # hogc's Triton kernels run in Triton's interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
