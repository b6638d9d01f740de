"""streamd: open-set speaker and spoken-digit recognition daemon."""

import os

__version__ = "0.1.0"

# numpy's OpenBLAS keeps a thread per core that spins after every matrix product. The daemon's
# products are small and frequent (features, AS-norm scores), so those threads spun on the
# core the models need: 10 streams cost 0.074 CPU s per audio s with two of them, 0.021 with
# one (BENCHMARKS.md). Set before numpy is first imported; the environment can still override it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
