"""Model cards from a fixture run's JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from vkt_hf import cli
from vkt_hf.cards import load_run, write_model_card
from vkt_hf.evaluation import plot_position_buckets

FIXTURE = Path(__file__).parent / "fixtures" / "run"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "vkt-tiny-books"
    shutil.copytree(FIXTURE, run)
    plot_position_buckets(
        {"m": json.loads((run / "eval" / "results.json").read_text())["position_buckets"]},
        run / "eval" / "positions.png",
    )
    (run / "model").mkdir()
    return run


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_card_metadata_and_metrics_come_from_the_run(run_dir):
    path = write_model_card(run_dir)
    assert path == run_dir / "README.md" and (run_dir / "model" / "README.md").exists()
    meta, body = front_matter(path.read_text())
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["datasets"] == ["emozilla/pg19"]
    assert {"vkt", "distill"} <= set(meta["tags"])
    (entry,) = meta["model-index"]
    assert entry["name"] == "vkt-tiny-books"
    metrics = {m["name"]: m["value"] for r in entry["results"] for m in r["metrics"]}
    run = load_run(run_dir)
    assert metrics["validation perplexity"] == pytest.approx(run["final"]["val_ppl"], abs=1e-4)
    assert metrics["passkey retrieval exact match"] == 0.75
    assert metrics["streaming perplexity (90000 tokens, chunks of 1024)"] == pytest.approx(24.5325, abs=1e-4)
    assert "![positions](eval/positions.png)" in body
    assert "| 256 | 1.0 | 0.50 |" in body and "134,515,008" in body


def test_card_into_model_cards_folder_copies_plots(run_dir, tmp_path):
    out = tmp_path / "model_cards"
    path = write_model_card(run_dir, out=out, name="my-model")
    assert path == out / "my-model.md"
    assert (out / "my-model_assets" / "positions.png").exists()
    meta, body = front_matter(path.read_text())
    assert meta["model-index"][0]["name"] == "my-model" and "(my-model_assets/positions.png)" in body


def test_card_cli_and_missing_run(run_dir, tmp_path, capsys):
    assert cli.main(["card", str(run_dir), "--out", str(tmp_path / "cards")]) == 0
    assert (tmp_path / "cards" / "vkt-tiny-books.md").exists()
    assert cli.main(["card", str(tmp_path)]) == 2
    assert "run.json" in capsys.readouterr().err


def test_card_without_eval_or_base_model(tmp_path):
    run = json.loads((FIXTURE / "run.json").read_text())
    run["model"]["base_model"], run["data"]["source"], run["data"]["name"] = None, str(tmp_path), "books"
    (tmp_path / "run.json").write_text(json.dumps(run))
    meta, body = front_matter(write_model_card(tmp_path).read_text())
    assert "base_model" not in meta and "datasets" not in meta
    assert [m["type"] for m in meta["model-index"][0]["results"][0]["metrics"]][:2] == ["loss", "perplexity"]
    assert "## Plots" not in body


def test_card_carries_the_ablation_table_and_plot(run_dir, tmp_path):
    ablation = {
        "args": {"steps": [10, 30], "seeds": [0, 1]},
        "rows": [
            {"variant": "softmax attention", "bpb@30": 2.5, "spread@30": 0.1, "gap@30": 1.0},
            {"variant": "default", "bpb@30": 2.625, "spread@30": 0.05, "gap@30": 0.75},
            {"variant": "no mixing", "bpb@30": 3.0, "spread@30": 0.1, "gap@30": 0.0},
        ],
    }
    path = tmp_path / "docs" / "ablation.json"
    path.parent.mkdir()
    path.write_text(json.dumps(ablation))
    shutil.copy(next(run_dir.glob("**/*.png")), path.with_suffix(".png"))
    written = write_model_card(run_dir, out=tmp_path / "cards", ablation=path)
    card = written.read_text()
    assert "| default | 2.625 ± 0.050 | 0.75 |" in card
    assert "![ablation](../docs/ablation.png)" in card  # linked where it is, not copied
    assert not (written.parent / f"{written.stem}_assets" / "ablation.png").exists()
    with pytest.raises(FileNotFoundError, match="ablate"):
        write_model_card(run_dir, ablation=tmp_path / "missing.json")


def test_baseline_card_does_not_claim_vkt(run_dir):
    run = json.loads((run_dir / "run.json").read_text())
    run["model"]["mixer_types"] = ["softmax", "softmax"]
    (run_dir / "run.json").write_text(json.dumps(run))
    meta, body = front_matter(write_model_card(run_dir).read_text())
    assert "linear-attention" not in meta["tags"] and "vkt-attention" not in meta["tags"]
    assert "A baseline without VKT layers (softmax x2)" in body


def test_same_budget_table_orders_columns_and_gives_ratios():
    from vkt_hf.cards import same_budget_table

    record = {
        "results": {
            "original": {"b@2048": 10.0, "b@512": 12.0, "a@512": 20.0, "passkey@256": 1.0},
            "vkt": {"b@2048": 15.0, "b@512": 12.0, "a@512": 30.0, "passkey@256": 0.0},
        }
    }
    lines = same_budget_table(record).splitlines()
    assert lines[0] == "| model | b @512 | b @2048 | a @512 | passkey @256 |"
    assert lines[2] == "| original | 12.00 | 10.00 | 20.00 | 100% |"
    assert lines[3] == "| vkt | 12.00 (1.00x) | 15.00 (1.50x) | 30.00 (1.50x) | 0% |"
