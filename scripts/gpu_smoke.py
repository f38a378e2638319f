"""On a GPU: the engine through the Pallas kernels gives what the XLA backend gives (tiny models)."""
import sys

sys.path.insert(0, "tests")
from engine_utils import make_engine, random_requests, run_all  # noqa: E402

requests = random_requests(0, 24)
for family in ("gemma2", "gemma3"):
    outs = {b: run_all(make_engine(family, attention_backend=b, page_size=16, num_pages=64), requests)
            for b in ("xla", "pallas_gpu")}
    same = sum(outs["xla"][k] == outs["pallas_gpu"][k] for k in outs["xla"])
    print(f"{family}: pallas_gpu == xla for {same}/{len(requests)} requests", flush=True)
