"""The sweep flags a GPU's kernel checks call for: a fused path that failed where its fallback passed.

Reads the JSON lines ``streaming_cross_attention_check.py`` and ``t5_attention_check.py`` wrote
(``checks.jsonl``) and prints, space-separated:
- ``--plain_cross_attention`` when the fused block kernels failed for either family
  (``bart-bf16``, ``t5-bf16``) while its plain blocks passed (``…-bf16-plain-blocks``);
- ``--blocked_t5_attention`` when flex attention failed (``longt5-tglobal-flex``) while the
  blocked code passed (``longt5-tglobal-blocked``).
A missing case counts as neither, so nothing is switched on a guess.

    python bench/gpu_checks/fallbacks.py $OUT/checks.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported as gpu_checks.fallbacks
from case_lines import merged  # noqa: E402  (bench/gpu_checks/case_lines.py)

FALLBACKS = {  # flag: the (fused path's case, its fallback's case) pairs, any of which calls for it
    "--plain_cross_attention": [("bart-bf16", "bart-bf16-plain-blocks"), ("t5-bf16", "t5-bf16-plain-blocks")],
    "--blocked_t5_attention": [("longt5-tglobal-flex", "longt5-tglobal-blocked")],
}


def case_results(path: Path) -> dict[str, bool]:
    """Every case's ``ok`` across the file's JSON lines (lines that are not JSON are skipped)."""
    report = merged(path.read_text().splitlines() if path.is_file() else [])
    return {name: bool(case["ok"]) for name, case in report.items() if isinstance(case, dict) and "ok" in case}


def needed_flags(path: Path) -> list[str]:
    results = case_results(path)
    return [flag for flag, pairs in FALLBACKS.items()
            if any(results.get(fused) is False and results.get(fallback) is True for fused, fallback in pairs)]


if __name__ == "__main__":
    print(" ".join(needed_flags(Path(sys.argv[1]))))
