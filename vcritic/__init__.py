"""vcritic: train generative critics for singing voice synthesis."""

import os
import tempfile

__version__ = "0.1.0"

# librosa's numba kernels are cached on disk beside librosa's source by default, shared by every
# process on the machine. After a demo job's Ray workers had written that cache, later processes
# segfaulted loading it, so each vcritic process keeps its own cache unless one is configured.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "vcritic-numba", str(os.getpid())))
