"""Print the figures of docs/RELIABILITY.md from a run's JSON lines.

    ASYNCCKPT_RELIABILITY_LOG=rel.jsonl python -m pytest tests/reliability -m "slow or not slow"
    python tests/reliability/summarize.py rel.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict


def _kind(killed_at: str) -> str:
    if not killed_at:
        return "ran to the end"
    parts = killed_at.split()
    return parts[2] if parts[0] == "AT" else parts[0]


def main(path: str) -> None:
    crash: dict[tuple[str, str], list[dict]] = defaultdict(list)
    soak = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["test"] == "crash":
                crash[(rec["phase"], rec["backend"])].append(rec)
            elif rec["test"] == "soak":
                soak.append(rec)
    print("| phase | backend | trials | killed | events (N) | killed at | failed | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for (phase, backend), recs in sorted(crash.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        kinds = Counter(_kind(r["killed_at"]) for r in recs)
        killed = sum(1 for r in recs if r["killed_at"])
        failed = sum(1 for r in recs if r["failed"])
        seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in recs}))
        sizes = sorted({r["of"] for r in recs})
        shown = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
        print(f"| {phase} | {backend} | {len(recs)} | {killed} | {'/'.join(map(str, sizes))} | {shown} "
              f"| {failed} | {seeds} |")
    for rec in soak:
        print(f"\nsoak {rec['saves']} saves, {rec['backup']} backup: first {rec['first']}, last {rec['last']}")


if __name__ == "__main__":
    main(sys.argv[1])
