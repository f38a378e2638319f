"""LLM: offline batch generation over the engine (vLLM's `LLM` interface)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from jaxpage.config import EngineConfig
from jaxpage.engine import LLMEngine, OutputKind
from jaxpage.models.gemma import Gemma
from jaxpage.outputs import RequestOutput
from jaxpage.sampling_params import SamplingParams
from jaxpage.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.model"


class LLM:
    """Load a converted checkpoint and generate for many prompts at once.

    llm = LLM(checkpoint="out/gemma3-1b")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=12))

    With checkpoint=None the small built-in demo model is used. `model=` takes an already built
    Gemma module instead of a checkpoint (tests, benchmarks with random weights).
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None,
                 tokenizer: str | os.PathLike | None = None, dtype: str = "bfloat16",
                 page_size: int = 16, num_pages: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, attention_backend: str = "auto",
                 enable_prefix_caching: bool = True, *, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, seed: int = 0,
                 compile_workers: int | None = None, num_decode_steps: int = 4,
                 model: Gemma | None = None):
        engine_config = EngineConfig(
            page_size=page_size, num_pages=num_pages, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, attention_backend=attention_backend,
            enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, seed=seed,
            num_decode_steps=num_decode_steps, **({} if compile_workers is None else {"compile_workers": compile_workers}))
        if model is None:
            from jaxpage.checkpoint import load_checkpoint  # noqa: PLC0415 - orbax is slow to import

            if checkpoint is None:
                from jaxpage.demo import demo_checkpoint_dir  # noqa: PLC0415

                checkpoint = demo_checkpoint_dir()
            _, model = load_checkpoint(checkpoint, dtype=dtype)
        if tokenizer is None and checkpoint is not None:
            candidate = Path(checkpoint) / TOKENIZER_FILE
            tokenizer = candidate if candidate.is_file() else None
        self.tokenizer = Tokenizer(tokenizer) if tokenizer is not None else None
        self.engine = LLMEngine(model, tokenizer=self.tokenizer, config=engine_config)

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        requests = _as_requests(prompts, prompt_token_ids)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(requests)
        elif len(params) != len(requests):
            raise ValueError(f"got {len(params)} sampling_params for {len(requests)} prompts")

        ids = [f"gen-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(requests))]
        try:
            for rid, (text, token_ids), p in zip(ids, requests, params):
                self.engine.add_request(rid, prompt=text, prompt_token_ids=token_ids, params=p,
                                        output_kind=OutputKind.FINAL_ONLY)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        start, prompt_tokens, output_tokens = time.perf_counter(), 0, 0
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if not out.finished:
                    continue
                done[out.request_id] = out
                prompt_tokens += len(out.prompt_token_ids)
                output_tokens += sum(len(c.token_ids) for c in out.outputs)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"input: {prompt_tokens / elapsed:.1f} toks/s, "
                                    f"output: {output_tokens / elapsed:.1f} toks/s", refresh=False)
                bar.update(1)
        bar.close()
        self.engine.save_executables()  # the first run after a cold start fills the cache
        return [done[rid] for rid in ids]


def _as_requests(prompts, prompt_token_ids) -> list[tuple[str | None, list[int] | None]]:
    if prompts is None and prompt_token_ids is None:
        raise ValueError("give prompts or prompt_token_ids")
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompt_token_ids is not None and prompt_token_ids and isinstance(prompt_token_ids[0], int):
        prompt_token_ids = [prompt_token_ids]
    if prompts is not None and prompt_token_ids is not None and len(prompts) != len(prompt_token_ids):
        raise ValueError(f"got {len(prompts)} prompts but {len(prompt_token_ids)} prompt_token_ids")
    n = len(prompts) if prompts is not None else len(prompt_token_ids)
    return [(prompts[i] if prompts is not None else None,
             list(prompt_token_ids[i]) if prompt_token_ids is not None else None) for i in range(n)]
