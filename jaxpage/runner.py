"""Model runner: packs a scheduled step into one host buffer and runs ahead-of-time compiled steps.

Shapes are bucketed: a step of N tokens runs in the smallest token bucket T >= N, with
S = min(T, max_num_seqs) sequence slots (a sequence has at least one token, so S always suffices).
Every bucket is compiled at start-up; serving never compiles. The model state is split once; the KV
cache is passed explicitly and donated, so XLA updates it in place.

A step is two executables fed by the same device buffer: `forward[T]` (model over the packed tokens,
returns the logits of each sampling row) and `sample[S, plan]` (on-device sampling of those logits;
it holds no weights). In steps where some request uses penalties or min_tokens bans, a third,
`penalise[S, L]`, applies them from token lists of bucketed length L that travel in a second
buffer; keeping it apart lets one sampling executable serve every L.

A decode burst (scheduler.py) is one executable, `burst[T, k, plan]`: k decode steps in a device
loop, each forward pass followed by sampling, the sampled tokens the next pass's input. Row r runs
its first num_steps[r] steps; in the rest it reads and writes only the null page.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpage import sampler
from jaxpage.attention import AttentionMetadata, max_cache_array_elements
from jaxpage.executable_cache import ExecutableCache
from jaxpage.executables import Executables
from jaxpage.kv_cache import copy_pages, init_kv_cache
from jaxpage.models.gemma import Gemma
from jaxpage.scheduler import SchedulerOutput
from jaxpage.step_layout import PackedLayout, step_fields, token_buckets

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepResult:
    """Host copy of what the sampler produced for each row (in row order) in each of the
    launch's steps (one, or a burst's k)."""

    token_ids: np.ndarray          # [steps, n]
    logprobs: np.ndarray           # [steps, n] log-prob of the chosen token
    top_ids: np.ndarray | None     # [steps, n, K]
    top_logprobs: np.ndarray | None

    @property
    def num_steps(self) -> int:
        return self.token_ids.shape[0]

    def step(self, j: int) -> "StepResult":
        """Step j alone: arrays without the steps axis ([n], [n, K])."""
        return StepResult(self.token_ids[j], self.logprobs[j],
                          None if self.top_ids is None else self.top_ids[j],
                          None if self.top_logprobs is None else self.top_logprobs[j])


class ModelRunner:
    """Owns the model state, the KV cache and the compiled step executables."""

    def __init__(self, model: Gemma, *, num_pages: dict[str, int], page_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 backend: str, kv_dtype=jnp.bfloat16, compile_workers: int = 8,
                 precompile: bool = True, max_copies: int = 16,
                 executable_cache_dir: str | None = None, num_decode_steps: int = 1):
        self.config = model.config
        self.act_dtype = model.embedder.embedding.get_value().dtype
        self.graphdef, state = nnx.split(model)
        # the executables take the state's leaves: one flat list is flattened fastest per call
        self._state_leaves, self._state_def = jax.tree.flatten(state)
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_pages = -(-max_model_len // page_size)
        self.backend = backend
        self.groups = self.config.layer_groups
        self.max_copies = max_copies
        self.num_decode_steps = num_decode_steps
        self.kv_caches = init_kv_cache(self.config, num_pages, page_size, kv_dtype,
                                       max_array_elements=max_cache_array_elements(backend))
        self.token_buckets = token_buckets(max_num_batched_tokens)
        self._variant_set = set(self._variants())
        self._prev_tokens = jnp.zeros((max_num_seqs,), jnp.int32)
        self._step_layouts: dict[int, PackedLayout] = {}
        self._row_layouts: dict[int, PackedLayout] = {}
        cache = None if executable_cache_dir is None else ExecutableCache(
            executable_cache_dir, self._static_context(),
            next(iter(self._state_leaves[0].devices())))
        self.executables = Executables(self._function, self._args, cache=cache,
                                       workers=compile_workers, precompile=precompile)

    def _static_context(self) -> dict[str, object]:
        """What the traced step functions close over besides their arguments (cache key)."""
        return {"model": repr(self.config), "graphdef": repr(self.graphdef),
                "state_def": str(self._state_def), "act_dtype": str(self.act_dtype),
                "backend": self.backend, "groups": tuple(self.groups),
                "layer_types": tuple(self.config.layer_types), "page_size": self.page_size,
                "max_pages": self.max_pages, "max_num_seqs": self.max_num_seqs,
                "max_model_len": self.max_model_len, "max_copies": self.max_copies,
                "num_decode_steps": self.num_decode_steps}

    # -- buckets and layouts ---------------------------------------------------------------------
    def seq_bucket(self, num_tokens_bucket: int) -> int:
        return min(num_tokens_bucket, self.max_num_seqs)

    def bucket_for(self, num_tokens: int) -> int:
        for t in self.token_buckets:
            if t >= num_tokens:
                return t
        raise ValueError(f"step of {num_tokens} tokens exceeds the largest bucket "
                         f"{self.token_buckets[-1]}")

    def row_layout(self, num_rows: int) -> PackedLayout:
        """Per-row sampler inputs whose size does not depend on the plan (all but the penalty
        token lists; fields a plan does not use stay zero)."""
        if num_rows in self._row_layouts:
            return self._row_layouts[num_rows]
        plan = sampler.SamplerPlan(num_rows=num_rows, filtering=True)
        layout = PackedLayout(tuple((n, tuple(shape), np.dtype(dt).name)
                                    for n, shape, dt in sampler.array_specs(plan)))
        return self._row_layouts.setdefault(num_rows, layout)

    def step_layout(self, num_tokens_bucket: int) -> PackedLayout:
        """The step buffer: model inputs, then the sampler's per-row inputs."""
        if num_tokens_bucket not in self._step_layouts:
            s = self.seq_bucket(num_tokens_bucket)
            model_fields = step_fields(num_tokens_bucket, s, self.max_pages, self.groups)
            self._step_layouts[num_tokens_bucket] = PackedLayout(
                model_fields + self.row_layout(s).fields)
        return self._step_layouts[num_tokens_bucket]

    def _penalty_specs(self, num_rows: int, penalty_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Sampler inputs of the penalty step (those not in the row layout: the token lists)."""
        base = {name for name, _, _ in self.row_layout(num_rows).fields}
        plan = sampler.SamplerPlan(num_rows, penalty_len=penalty_len)
        return {n: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dt))
                for n, shape, dt in sampler.array_specs(plan) if n not in base}

    @property
    def kv_cache_bytes(self) -> int:
        return sum(pages.nbytes for pages in jax.tree.leaves(self.kv_caches))

    def _variants(self) -> list[tuple[int, bool]]:
        variants = [(t, False) for t in self.token_buckets]
        if self.backend != "xla":  # kernels specialise on pure-decode steps (max_query_len = 1)
            variants += [(t, True) for t in self.token_buckets if t <= self.max_num_seqs]
        return variants

    def _burst_keys(self) -> list[tuple[int, sampler.SamplerPlan]]:
        """(token bucket, plan) of every burst: the buckets a decode of up to max_num_seqs
        sequences runs in, with and without top-k/top-p filtering."""
        if self.num_decode_steps == 1:
            return []
        largest = self.bucket_for(self.max_num_seqs)
        return [(t, sampler.SamplerPlan(self.seq_bucket(t), filtering=f))
                for t in self.token_buckets if t <= largest for f in (False, True)]

    # -- compilation -----------------------------------------------------------------------------
    def executable_keys(self) -> list[tuple[str, object]]:
        """(kind, key) of every executable serving may need: forward buckets, sampler plans,
        penalty steps and the page copy."""
        seq_buckets = sorted({self.seq_bucket(t) for t in self.token_buckets})
        plans = sampler.all_plans(seq_buckets, self.max_model_len)
        return [("forward", v) for v in self._variants()] + [
            ("burst", k) for k in self._burst_keys()] + [
            ("sample", k) for k in dict.fromkeys(map(_sample_key, plans))] + [
            ("penalise", k) for k in dict.fromkeys(map(_penalise_key, plans)) if k] + [
            ("copy", None)]

    def compile_all(self) -> float:
        """Build every executable serving may need (executables.py), the longest compiles
        first; returns seconds taken."""
        return self.executables.build_all(sorted(self.executable_keys(), key=_compile_order))

    def _args(self, kind: str, key) -> tuple[tuple[int, ...], tuple]:
        """(donated argument numbers, arguments to lower with) of one executable."""
        if kind == "copy":
            return (0,), (self.kv_caches, jax.ShapeDtypeStruct(
                (len(self.groups), 2, self.max_copies), jnp.int32))
        if kind in ("forward", "burst"):
            size = self.step_layout(key[0]).size
            return (1,), (self._state_leaves, self.kv_caches,
                          jax.ShapeDtypeStruct((size,), jnp.int32),
                          jax.ShapeDtypeStruct((self.max_num_seqs,), jnp.int32))
        num_rows = key[0] if kind == "penalise" else key[0].num_rows
        logits = jax.ShapeDtypeStruct((num_rows, self.config.vocab_size), jnp.float32)
        if kind == "penalise":
            return (), (logits, self._penalty_specs(*key))
        rows = jax.ShapeDtypeStruct((self.row_layout(num_rows).size,), jnp.int32)
        return (), (logits, rows, logits if key[1] else None)

    def _function(self, kind: str, key):
        """The function the executable of `kind`/`key` compiles."""
        if kind == "copy":
            groups, types = self.groups, self.config.layer_types
            return lambda kv, c: copy_pages(kv, c, types, groups)
        if kind == "penalise":
            return sampler.penalise
        if kind == "burst":
            return self._burst_fn(*key)
        return self._forward_fn(*key) if kind == "forward" else self._sample_fn(key[0])

    def _forward_fn(self, num_tokens_bucket: int, decode_only: bool):
        graphdef, state_def = self.graphdef, self._state_def
        backend, groups = self.backend, self.groups
        s = self.seq_bucket(num_tokens_bucket)
        model_layout = PackedLayout(step_fields(num_tokens_bucket, s, self.max_pages, groups))

        def forward(state_leaves, kv_caches, packed, prev_tokens):
            f = model_layout.unpack(packed)
            ids = _resolve_placeholders(f["token_ids"], prev_tokens)
            meta = AttentionMetadata(
                query_start_loc=f["query_start_loc"], kv_lens=f["kv_lens"],
                block_tables={g: f[f"block_table.{g}"] for g in groups},
                backend=backend, max_query_len=1 if decode_only else num_tokens_bucket)
            model = nnx.merge(graphdef, jax.tree.unflatten(state_def, state_leaves))
            hidden, kv_caches = model(ids, f["positions"], kv_caches, meta)
            rows = packed[model_layout.size:]  # the sampler's per-row inputs, passed through
            return model.logits(hidden[f["logits_indices"]]), rows, kv_caches

        forward.__name__ = f"forward_t{num_tokens_bucket}" + ("_decode" if decode_only else "")
        return forward  # named per bucket: profiles tell the executables apart

    def _burst_fn(self, num_tokens_bucket: int, plan: sampler.SamplerPlan):
        graphdef, state_def = self.graphdef, self._state_def
        backend, groups, num_steps = self.backend, self.groups, self.num_decode_steps
        t, s = num_tokens_bucket, plan.num_rows
        model_layout = PackedLayout(step_fields(t, s, self.max_pages, groups))
        rows_layout = self.row_layout(s)

        def burst(state_leaves, kv_caches, packed, prev_tokens):
            f = model_layout.unpack(packed)
            rows = rows_layout.unpack(packed[model_layout.size:])
            model = nnx.merge(graphdef, jax.tree.unflatten(state_def, state_leaves))
            row_steps = f["num_steps"]
            token_steps = jnp.pad(row_steps, (0, t - s))  # a decode: token i is row i's

            def decode_step(carry, j):
                kv_caches, ids = carry
                live = j < row_steps
                # rows past their last step attend to, and write, one slot of the null page
                meta = AttentionMetadata(
                    query_start_loc=f["query_start_loc"],
                    kv_lens=jnp.where(live, f["kv_lens"] + j, 1),
                    block_tables={g: jnp.where(live[:, None], f[f"block_table.{g}"], 0)
                                  for g in groups},
                    backend=backend, max_query_len=1)
                positions = jnp.where(j < token_steps, f["positions"] + j, 0)
                hidden, kv_caches = model(ids, positions, kv_caches, meta)
                step_rows = dict(rows, step_index=rows["step_index"] + j.astype(jnp.uint32))
                out = sampler.sample(model.logits(hidden[f["logits_indices"]]), step_rows, plan)
                return (kv_caches, jnp.pad(out.token_ids, (0, t - s))), out

            ids = _resolve_placeholders(f["token_ids"], prev_tokens)
            (kv_caches, _), outs = jax.lax.scan(decode_step, (kv_caches, ids),
                                                jnp.arange(num_steps, dtype=jnp.int32))
            prev = jnp.pad(outs.token_ids[-1], (0, self.max_num_seqs - s))
            return outs, prev, kv_caches

        burst.__name__ = f"burst_t{t}_k{num_steps}" + ("_filtering" if plan.filtering else "")
        return burst

    def _sample_fn(self, plan: sampler.SamplerPlan):
        rows_layout = self.row_layout(plan.num_rows)
        pad = self.max_num_seqs - plan.num_rows

        def sample(logits, rows, penalised):
            out = sampler.sample(logits, rows_layout.unpack(rows), plan, penalised)
            return out, jnp.pad(out.token_ids, (0, pad))  # the next step's prev_tokens

        return sample

    # -- one step --------------------------------------------------------------------------------
    def dispatch(self, sched: SchedulerOutput, rows: Seq[sampler.RowSpec], sources: Seq[int],
                 kv_manager) -> StepHandle:
        """Pack and launch one scheduled step without waiting for it.

        Row r samples from the logits of scheduled sequence sources[r] (forked samples share
        their parent's). A negative token id -(1 + r) in a sequence stands for the token row r
        of the previous dispatched step samples; it is read on the device. Page copies the
        allocator queued run before the step's writes.
        """
        return self.launch(self.pack(sched, rows, sources, kv_manager))

    def pack(self, sched: SchedulerOutput, rows: Seq[sampler.RowSpec], sources: Seq[int],
             kv_manager) -> "PackedStep":
        """The step's host buffer (one transfer) and the executables it runs with."""
        t = self.bucket_for(max(sched.num_tokens, len(rows)))
        decode_only = sched.is_decode_only and (t, True) in self._variant_set
        if sched.num_steps > 1 and sched.num_steps != self.num_decode_steps:
            raise ValueError(f"a burst of {sched.num_steps} steps; the executables run "
                             f"{self.num_decode_steps}")
        buf, v = self.step_layout(t).new_buffer()
        pos, last = 0, []
        for i, item in enumerate(sched.scheduled):
            seq, start, n = item.seq, item.start, item.num_new_tokens
            v["token_ids"][pos:pos + n] = seq.token_ids[start:start + n]
            v["positions"][pos:pos + n] = np.arange(start, start + n)
            v["query_start_loc"][i] = pos
            v["kv_lens"][i] = start + n
            v["num_steps"][i] = item.num_steps
            pos += n
            last.append(pos - 1)
            for g in self.groups:
                table = kv_manager.block_table_array(seq.seq_id, g)
                v[f"block_table.{g}"][i, :len(table)] = table
        v["query_start_loc"][len(sched.scheduled):] = pos
        v["logits_indices"][:len(rows)] = [last[src] for src in sources]
        copies = None
        pending = kv_manager.take_copies()
        if any(pending.values()):
            copies = np.zeros((len(self.groups), 2, self.max_copies), np.int32)
            for i, g in enumerate(self.groups):
                if pending[g]:
                    copies[i, :, :len(pending[g])] = np.asarray(pending[g], np.int32).T
        plan = sampler.plan_for(rows, self.seq_bucket(t), self.max_model_len)
        if sched.num_steps > 1 and (plan.num_logprobs or plan.penalty_len):
            raise ValueError("a burst's rows must sample without penalties, bans or top "
                             "logprobs (sampler.samples_ahead)")
        extra = {}
        for name, arr in sampler.host_arrays(plan, rows).items():
            if name in v:
                v[name][...] = arr
            else:
                extra[name] = arr

        return PackedStep((t, decode_only), plan, buf, extra, len(rows), copies,
                          burst=sched.num_steps > 1)

    def launch(self, step: "PackedStep") -> "StepHandle":
        """Send the packed step to the device and start it; returns without waiting."""
        if step.copies is not None:
            self.kv_caches = self.executables.get("copy", None)(self.kv_caches, step.copies)
        # host buffers go in as numpy arrays: the executable's own transfer is the cheapest
        if step.burst:
            out, self._prev_tokens, self.kv_caches = self.executables.get("burst", step.burst_key)(
                self._state_leaves, self.kv_caches, step.buffer, self._prev_tokens)
        else:
            logits, row_inputs, self.kv_caches = self.executables.get("forward", step.bucket)(
                self._state_leaves, self.kv_caches, step.buffer, self._prev_tokens)
            penalise = _penalise_key(step.plan)
            penalised = (self.executables.get("penalise", penalise)(logits, step.extra)
                         if penalise else None)
            out, self._prev_tokens = self.executables.get("sample", _sample_key(step.plan))(
                logits, row_inputs, penalised)
        for array in jax.tree.leaves(out):  # read back as soon as sampled, not when collected
            array.copy_to_host_async()
        return StepHandle(out, step.num_rows, step.plan.num_logprobs > 0, step.burst)

    def collect(self, handle: "StepHandle") -> StepResult:
        """Wait for a dispatched step's sampled tokens and copy them to the host."""
        host, n = jax.device_get(handle.output), handle.num_rows
        if not handle.burst:  # one step: give its arrays the steps axis
            host = jax.tree.map(lambda a: a[None], host)
        if handle.logprobs:
            return StepResult(host.token_ids[:, :n], host.logprobs[:, :n], host.top_ids[:, :n],
                              host.top_logprobs[:, :n])
        return StepResult(host.token_ids[:, :n], host.logprobs[:, :n], None, None)


def _resolve_placeholders(token_ids: jax.Array, prev_tokens: jax.Array) -> jax.Array:
    """Token ids with each -(1 + r) replaced by the token row r of the previous launch sampled
    (its last step's, for a burst)."""
    return jnp.where(token_ids < 0, prev_tokens[jnp.maximum(-1 - token_ids, 0)], token_ids)


def _sample_key(plan: sampler.SamplerPlan) -> tuple[sampler.SamplerPlan, bool]:
    """Key of the sampling executable of a plan: the plan without its token-list length, and
    whether its rows draw from penalised logits."""
    return dataclasses.replace(plan, penalty_len=0), plan.penalty_len > 0


def _penalise_key(plan: sampler.SamplerPlan) -> tuple[int, int] | None:
    """Key (rows, token-list length) of the penalty executable a plan needs, if any."""
    return (plan.num_rows, plan.penalty_len) if plan.penalty_len else None


def _compile_order(kind_key: tuple[str, object]) -> tuple:
    """Sort key that puts the longest compiles first: forward steps and bursts (largest bucket
    first), the page copy, sampler plans with the most features, then the penalty steps."""
    kind, key = kind_key
    if kind == "forward":
        return (0, -key[0], int(key[1]))
    if kind == "burst":
        return (0, -key[0], 2, int(key[1].filtering))
    if kind == "copy":
        return (1,)
    if kind == "penalise":
        return (3, -key[0], -key[1])
    plan, penalised = key
    return (2, -(bool(plan.filtering) + bool(plan.num_logprobs) + penalised), -plan.num_rows,
            plan.num_logprobs)


@dataclasses.dataclass
class PackedStep:
    """A step ready to launch: its bucket, sampler plan and host inputs."""

    bucket: tuple[int, bool]  # (token bucket, pure decode)
    plan: sampler.SamplerPlan
    buffer: np.ndarray
    extra: dict[str, np.ndarray]
    num_rows: int
    copies: np.ndarray | None = None  # [groups, (src, dst), max_copies] page copies, if any
    burst: bool = False       # runs the runner's num_decode_steps decode steps

    @property
    def burst_key(self) -> tuple[int, sampler.SamplerPlan]:
        return self.bucket[0], self.plan


@dataclasses.dataclass
class StepHandle:
    """A dispatched step whose sampler output is still on (or on its way from) the device."""

    output: sampler.SamplerOutput  # arrays [R, ...], or [k, R, ...] for a burst
    num_rows: int
    logprobs: bool
    burst: bool = False
