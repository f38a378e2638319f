"""`jaxpage convert`: a Hugging Face or official Gemma checkpoint -> a jaxpage checkpoint.

A source directory with config.json is read as Hugging Face (config.json + *.safetensors);
anything else as an official Gemma Flax/Orbax checkpoint. The output is written to a temporary
directory next to --dst and renamed into place at the end, so a failed conversion leaves nothing
at --dst (and never touches an existing --dst unless --overwrite, and then only on success).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from jaxpage.checkpoint import TOKENIZER_FILE, CheckpointError, save_checkpoint
from jaxpage.convert_common import TARGET_DTYPES, ConversionError, ParamBuilder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, type=Path,
                        help="Hugging Face directory (config.json + *.safetensors) or official "
                             "Gemma Orbax checkpoint directory")
    parser.add_argument("--dst", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(TARGET_DTYPES),
                        help="dtype the params are stored in (default: bfloat16)")
    parser.add_argument("--model", default=None,
                        help="registry config (e.g. gemma3-4b): required for official checkpoints "
                             "whose shapes match no unique model; for Hugging Face sources it "
                             "names the converted config")
    parser.add_argument("--tokenizer", default=None, type=Path,
                        help=f"tokenizer.model to copy (default: SRC/{TOKENIZER_FILE} if present)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    parser.add_argument("--check-finite", action="store_true",
                        help="fail on NaN or infinite weights")


def convert(src: str | Path, dst: str | Path, *, dtype: str = "bfloat16", model: str | None = None,
            tokenizer: str | Path | None = None, overwrite: bool = False,
            check_finite: bool = False) -> Path:
    """Convert `src` into a jaxpage checkpoint at `dst`; raises ConversionError on bad input."""
    src, dst = Path(src), Path(dst).absolute()
    if not src.is_dir():
        raise ConversionError(f"--src {src} is not a directory")
    if dst.exists() and not overwrite:
        raise ConversionError(f"--dst {dst} already exists (pass --overwrite to replace it)")
    if dtype not in TARGET_DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(TARGET_DTYPES)}, got {dtype!r}")
    if tokenizer is None and (src / TOKENIZER_FILE).is_file():
        tokenizer = src / TOKENIZER_FILE
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConversionError(f"--tokenizer {tokenizer} does not exist")

    def builder_for(config):
        return ParamBuilder(config, dtype, check_finite=check_finite)

    if (src / "config.json").is_file():
        from jaxpage.convert_hf import convert_hf  # noqa: PLC0415 - pulls in safetensors

        config, params = convert_hf(src, builder_for, name=model)
    else:
        from jaxpage.convert_official import convert_official  # noqa: PLC0415

        config, params = convert_official(src, builder_for, model=model)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        save_checkpoint(params, config, tmp, tokenizer_path=tokenizer)
        del params
        _replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst`; an old `dst` is removed only after the move succeeded."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / dst.name)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    try:
        dst = convert(args.src, args.dst, dtype=args.dtype, model=args.model,
                      tokenizer=args.tokenizer, overwrite=args.overwrite,
                      check_finite=args.check_finite)
    except (ConversionError, CheckpointError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the library's message looked like
        print(f"jaxpage convert: error: {message}", file=sys.stderr)
        return 1
    print(f"wrote {dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/convert.py and `python -m jaxpage.convert`."""
    parser = argparse.ArgumentParser(prog="jaxpage convert", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
