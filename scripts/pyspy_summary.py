"""Summarize a `py-spy record --format raw --threads` profile: samples per thread, then for the
busiest threads the functions with the most inclusive samples.

    python3 scripts/pyspy_summary.py profile.raw [--threads 3] [--top 40]
"""

from __future__ import annotations

import argparse
import collections
import re


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("raw")
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in open(args.raw):
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        # the thread's role: the outermost jaxpage/gunicorn/flask frame names it best
        role = next((re.sub(r" \(.*", "", f) for f in frames[1:]
                     if "jaxpage/" in f or "gunicorn/" in f), frames[0])
        totals[role] += int(count)
        seen = set()
        for f in frames[1:]:
            key = re.sub(r":\d+\)$", ")", f)
            if key not in seen:
                per_thread[role][key] += int(count)
                seen.add(key)
    print("samples by thread role:")
    for role, n in totals.most_common():
        print(f"{n:8d}  {role}")
    for role, _ in totals.most_common(args.threads):
        print(f"\n== {role}: inclusive samples")
        for key, n in per_thread[role].most_common(args.top):
            print(f"{n:8d}  {key[:160]}")


if __name__ == "__main__":
    main()
