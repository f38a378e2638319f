import os
from pathlib import Path

# Tests run on the CPU (JAX_PLATFORMS=cuda runs them on a GPU). Compiled programs and demo
# assets are cached under .cache/ in the checkout (git-ignored), shared by the xdist workers and
# reused by later runs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXPAGE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache"))
