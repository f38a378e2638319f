"""jaxpage: a paged-KV-cache serving engine for Gemma 2 and Gemma 3 in JAX."""

from jaxpage.outputs import CompletionOutput, RequestOutput
from jaxpage.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "generate"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy parts load on first use so `import jaxpage` (and the CLI's --help) stays quick.
    if name == "LLM":
        from jaxpage.llm import LLM

        return LLM
    if name == "generate":
        from jaxpage.generation import generate

        return generate
    raise AttributeError(f"module 'jaxpage' has no attribute {name!r}")
