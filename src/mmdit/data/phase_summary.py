"""create_phase's run summary: what came out, and every row and file that did not, with its reason.

Written to ``<output_dir>/phase_summary.json`` (atomically) and told in one end-of-run log line with
the counts per reason, so a user sees at a glance whether a skip rate is normal web noise (a few
``undecodable`` / ``truncated`` per thousand) or a problem (every row ``null_image``: wrong column).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

log = logging.getLogger("mmdit.data.phase")


def _bucket_order(item: tuple[str, int]) -> tuple[int, ...]:
    return tuple(int(x) for x in item[0].split("x"))


def write_summary(
    path: Path,
    all_stats: dict[str, dict],
    params: dict,
    converted: int,
    rows_converted: int,
    seconds: float,
    unreadable: dict[str, str],
    failed: dict[str, str],
) -> dict:
    """Merge the finished shards' statistics (by relative path) into the run summary; write and log it."""
    buckets: Counter = Counter()
    skipped_rows: list[dict] = []
    for shard, stats in all_stats.items():
        buckets.update(stats["buckets"])
        skipped_rows.extend({**row, "shard": shard} for row in stats["skipped"])
    by_reason = Counter(row["reason"] for row in skipped_rows)
    summary = {
        "params": params,
        "shards": len(all_stats),
        "shards_converted_this_run": converted,
        "shards_resumed": len(all_stats) - converted,
        "rows_in": sum(s["rows_in"] for s in all_stats.values()),
        "rows_out": sum(s["rows_out"] for s in all_stats.values()),
        "skipped": len(skipped_rows),
        "skipped_by_reason": dict(by_reason.most_common()),
        "skipped_rows": skipped_rows,
        "unreadable_files": [{"path": rel, "reason": reason} for rel, reason in unreadable.items()],
        "failed_shards": [{"path": rel, "reason": reason} for rel, reason in failed.items()],
        "buckets": dict(sorted(buckets.items(), key=_bucket_order)),
        "seconds": round(seconds, 3),
        "images_per_s_this_run": round(rows_converted / seconds, 1) if seconds > 0 else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    log.info(end_of_run_line(summary, path))
    return summary


def end_of_run_line(summary: dict, path: Path | str) -> str:
    """``kept 57 of 60 rows; skipped 3 (undecodable 2, truncated 1); ...; details in <path>``."""
    parts = [f"kept {summary['rows_out']} of {summary['rows_in']} rows"]
    if summary["skipped"]:
        reasons = ", ".join(f"{reason} {count}" for reason, count in summary["skipped_by_reason"].items())
        parts.append(f"skipped {summary['skipped']} ({reasons})")
    if summary["unreadable_files"]:
        parts.append(f"{len(summary['unreadable_files'])} input file(s) not readable parquet")
    if summary["failed_shards"]:
        parts.append(f"{len(summary['failed_shards'])} shard(s) FAILED, re-run to retry")
    return "create_phase: " + "; ".join(parts) + f"; details in {path}"
