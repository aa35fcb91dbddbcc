"""The ablation recipe: the summary arithmetic, the report, and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import ablate  # noqa: E402


def fake_results() -> dict[str, list[dict]]:
    return {
        "no mixing": [{"params": 10, 5: 4.0, 10: 3.0}, {"params": 10, 5: 4.2, 10: 3.2}],
        "softmax attention": [{"params": 12, 5: 3.0, 10: 2.0}, {"params": 12, 5: 3.2, 10: 2.2}],
        "paper": [{"params": 11, 5: 3.5, 10: 2.5}, {"params": 11, 5: 3.9, 10: 2.9}],
    }


def test_summary_means_spreads_ranks_and_gap():
    rows = {r["variant"]: r for r in ablate.summarise(fake_results(), [5, 10])}
    assert rows["paper"]["bpb@10"] == pytest.approx(2.7)
    assert rows["paper"]["spread@10"] == pytest.approx(0.2)
    assert rows["paper"]["gap@10"] == pytest.approx((3.1 - 2.7) / (3.1 - 2.1))
    assert rows["softmax attention"]["gap@5"] == pytest.approx(1.0) and rows["no mixing"]["gap@5"] == 0
    assert [rows[v]["rank@10"] for v in ("softmax attention", "paper", "no mixing")] == [1, 2, 3]


def test_report_keeps_hand_written_notes(tmp_path):
    doc = tmp_path / "ablation.md"
    doc.write_text(f"old table\n{ablate.GENERATED_END}\n\n## Notes\nkept text\n")
    args = argparse.Namespace(steps=[5, 10], seeds=[0, 1], seq_len=8, batch_size=2)
    ablate.write_report(ablate.summarise(fake_results(), [5, 10]), [5, 10], args, doc)
    text = doc.read_text()
    assert "old table" not in text and "kept text" in text and "| paper | 11 |" in text
    assert "Best O(N) variant at 10 steps: **paper**" in text
    assert json.loads(doc.with_suffix(".json").read_text())["rows"][0]["variant"] == "softmax attention"
    assert doc.with_suffix(".png").stat().st_size > 1000


def test_tiny_ablation_end_to_end(tmp_path):
    argv = ["--steps", "1", "2", "--seeds", "0", "--variants", "no mixing", "softmax attention", "paper"]
    argv += ["--data", str(ROOT / "tests" / "fixtures" / "books"), "--seq_len", "32", "--batch_size", "2"]
    argv += [
        "--val_documents",
        "hamlet",
        "--eval_batches",
        "1",
        "--output_dir",
        str(tmp_path / "runs"),
        "--doc",
        str(tmp_path / "a.md"),
    ]
    assert ablate.main(argv) == 0
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"no mixing", "softmax attention", "paper"}
    assert all(r["bpb@2"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        ablate.main(["--variants", "paper"])  # the two reference rows are required
