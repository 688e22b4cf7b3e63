"""radfusion: multimodal AI on the hospital DICOM network."""

import os

# torch's CPU allocator takes its large buffers (model windows, class probabilities) fresh
# from the kernel on every study; in 4 KiB pages that was 1.3 million page faults and 2-3 s
# of kernel time per chest CT here, and it slowed the NumPy stages after it too (measured:
# README, development). Transparent huge pages for its allocations of 2 MiB and more (the
# kernel's "madvise" mode, the usual default) cut the faults fifty-fold. It must be set before
# torch allocates anything, hence here; a site can still turn it off (=0).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
