"""The built-in demo model: a tiny randomly initialised Gemma 3 plus its own small tokenizer.

`jaxpage serve` with no checkpoint serves this, so a fresh clone runs end to end. The checkpoint
is made on first use in the cache ($JAXPAGE_CACHE, default ~/.cache/jaxpage) and reused after.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

import jaxpage
from jaxpage import compat
from jaxpage.models.config import get_config

DEMO_MODEL = "gemma3-demo"
DEMO_SEED = 0
CORPUS_ASSET = "demo_corpus.txt"
EMBEDDING_GAIN, FINAL_NORM_OFFSET = 0.1, 2.0  # see temper_random_weights
STALE_BUILD_S = 3600.0  # a temporary build directory this old belongs to a process that died

# SentencePiece training options, Gemma-like: BPE, byte fallback, digits split, no text
# normalisation and no dummy-prefix space, Gemma's special ids and turn markers.
TOKENIZER_OPTIONS = dict(
    model_type="bpe", vocab_size=1024, byte_fallback=True, split_digits=True,
    normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True, character_coverage=1.0,
    pad_id=0, eos_id=1, bos_id=2, unk_id=3,
    pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
    user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    num_threads=1, minloglevel=2,
)


def cache_root() -> Path:
    """$JAXPAGE_CACHE, or ~/.cache/jaxpage."""
    return Path(compat.default_cache_dir())


def demo_version() -> str:
    """Names one exact demo recipe: changes whenever corpus, tokenizer options, seed, config
    or checkpoint format change, so a stale cached demo is never reused."""
    from jaxpage.checkpoint import FORMAT_VERSION  # noqa: PLC0415

    recipe = repr((sorted(TOKENIZER_OPTIONS.items()), DEMO_SEED, get_config(DEMO_MODEL).to_json(),
                   FORMAT_VERSION, EMBEDDING_GAIN, FINAL_NORM_OFFSET)).encode() + _corpus_bytes()
    return f"{jaxpage.__version__}-{hashlib.sha256(recipe).hexdigest()[:10]}"


def demo_checkpoint_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the demo checkpoint (made by `save_checkpoint`, with tokenizer.model),
    created on first call. Safe when several processes call it at once: each builds in a
    private temporary directory and renames it into place; the first rename wins."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"demo-{demo_version()}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        built = _build_demo_checkpoint(work / "checkpoint")
        try:
            os.rename(built, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def build_demo_tokenizer(dst: str | os.PathLike, **overrides) -> Path:
    """Train the demo SentencePiece model (vocab 1024, Gemma's special ids) from the corpus;
    `overrides` change TOKENIZER_OPTIONS (e.g. to make tokenizers of other kinds for tests)."""
    import sentencepiece as spm  # noqa: PLC0415

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus_bytes().decode().splitlines()),
                                   model_writer=model, **{**TOKENIZER_OPTIONS, **overrides})
    dst = Path(dst)
    dst.write_bytes(model.getvalue())
    return dst


def _build_demo_checkpoint(dst: Path) -> Path:
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from jaxpage.checkpoint import save_checkpoint  # noqa: PLC0415
    from jaxpage.models.gemma import Gemma  # noqa: PLC0415
    from jaxpage.tokenizer import Tokenizer  # noqa: PLC0415

    config = get_config(DEMO_MODEL)
    tokenizer_path = build_demo_tokenizer(dst.parent / "tokenizer.model")
    vocab = Tokenizer(tokenizer_path).vocab_size
    if vocab != config.vocab_size:
        raise RuntimeError(f"demo tokenizer has {vocab} pieces but {DEMO_MODEL} expects "
                           f"{config.vocab_size}")
    model = temper_random_weights(Gemma(config, dtype=jnp.float32, rngs=nnx.Rngs(DEMO_SEED)))
    return save_checkpoint(model, config, dst, tokenizer_path=tokenizer_path)


def temper_random_weights(model):
    """Make a randomly initialised Gemma produce varied tokens (in place; returns the model).

    With tied random embeddings the residual stream is dominated by the input token's own
    embedding, so the model copies its input. Small embeddings let the layers speak; a larger
    final-norm gain puts the logits in a realistic range (next-token entropy of a few nats).
    """
    model.embedder.embedding[...] = model.embedder.embedding[...] * EMBEDDING_GAIN
    model.final_norm.scale[...] = model.final_norm.scale[...] + FINAL_NORM_OFFSET
    return model


def _remove_stale_builds(root: Path) -> None:
    """Delete what builds that died long ago left behind (a live build takes seconds)."""
    for stale in root.glob(".demo-*.tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process just removed it


def _corpus_bytes() -> bytes:
    return resources.files("jaxpage").joinpath("assets", CORPUS_ASSET).read_bytes()
