#!/usr/bin/env python
"""Convert a Hugging Face or official Gemma checkpoint; same as `jaxpage convert ARGS`."""

import sys

from jaxpage.convert import main

if __name__ == "__main__":
    sys.exit(main())
