"""docs/distill-results.md is read off the benchmark files: ratios, shares and target verdicts come from them."""

from __future__ import annotations

import json
from pathlib import Path

from distill.results import write
from eval.report import Row, RunReport


def _report(docs: Path, model: str, values: list[float]) -> None:
    rows = [Row(task=f"t{i}", metric="acc", value=v, stderr=0.0, n=100, higher_is_better=True, filter="none")
            for i, v in enumerate(values)]
    report = RunReport(model=model, suite="abilities", mode="endpoint", params=1, date="d", limit=100, seconds=1.0,
                       rows=rows)
    (docs / "eval" / "abilities" / model).mkdir(parents=True)
    (docs / "eval" / "abilities" / model / "report.json").write_text(report.to_json())


def test_the_results_doc_compares_students_with_their_targets(tmp_path: Path) -> None:
    (tmp_path / "distill" / "smollm2-general").mkdir(parents=True)
    (tmp_path / "distill" / "smollm2-general" / "heldout.json").write_text(json.dumps([
        {"model": "smollm2-135m-instruct", "val_ppl": 10.0, "val_kl": 0.0, "val_top1_agree": 1.0},
        {"model": "smollm2-general-100m", "val_ppl": 12.0, "val_kl": 0.3, "val_top1_agree": 0.7},
        {"model": "smollm2-general-70m", "val_ppl": 25.0, "val_kl": 0.9, "val_top1_agree": 0.5},
    ]))
    _report(tmp_path, "smollm2-135m-instruct", [0.4, 0.2])
    _report(tmp_path, "smollm2-general-100m", [0.3, 0.2])  # 0.25 / 0.3 = 83%: short of 85%
    _report(tmp_path, "smollm2-general-70m", [0.3, 0.15])  # 75%, but 2.5x the perplexity
    text = write(tmp_path).read_text()
    assert ("| smollm2-general-100m | `smollm2-general` | 12.00 | 1.20x | 0.300 | 0.700 | 0.250 | 83% | "
            "≤ 1.3x, ≥ 85% | ppl only |") in text
    assert ("| smollm2-general-70m | `smollm2-general` | 25.00 | 2.50x | 0.900 | 0.500 | 0.225 | 75% | "
            "≤ 2.0x, ≥ 70% | abilities only |") in text
    assert "| smollm2-cascade-100m | `smollm2-cascade` | not run |" in text
    assert "Not measured yet: `make bench-distill-trl`." in text


def test_iterative_vs_one_shot_gets_a_verdict(tmp_path: Path) -> None:
    (tmp_path / "distill" / "smollm2-general").mkdir(parents=True)
    rows = [{"variant": v, "tokens": 1000, "val_ppl": 20.0, "val_kl": kl, "val_top1_agree": 0.6}
            for v, kl in (("one-shot pruned", 3.0), ("one-shot + distill", 0.80), ("cascade pruned", 2.0),
                          ("cascade", 0.72))]
    (tmp_path / "distill" / "smollm2-general" / "results.json").write_text(json.dumps(
        {"stages": [{"stage": "iterative vs one-shot", "rows": rows}]}))
    text = write(tmp_path).read_text()
    assert "| cascade | 1,000 | 20.0 | 0.720 | 0.600 |" in text
    assert "Iterative pruning wins at this budget: KL 0.720 for the cascade against 0.800 for one-shot pruning (-10%)" \
        in text
