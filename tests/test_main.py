"""The main job (``recipes/main.py``) and the evaluation pieces it adds: perplexity at several lengths,
the decode benchmark, attention shares, readable heatmaps, the report, the card and publishing."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

from tests.helpers import tiny_base, tiny_hybrid
from tests.test_recipes import save_tiny_llama
from vkt_hf import evaluation as ev
from vkt_hf.explain import attention_shares, render_shares_png

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


def test_perplexity_at_is_the_mean_over_segments_read_from_their_start():
    model, ids = tiny_hybrid("llama", layers=(0, 1, 2, 3)), torch.randint(3, 60, (1, 250))
    rows: dict[int, torch.Tensor] = {}
    got = ev.perplexity_at(model, ids, [50, 100], rows)
    for length in (50, 100):
        nll = [ev.sequence_nll(model, ids[:, s : s + length])[0] for s in range(0, 250 // length * length, length)]
        assert got[length] == pytest.approx(math.exp(float(torch.cat(nll).double().mean())), rel=1e-5)
    assert sorted(rows) == [0, 50, 100, 150, 200] and len(rows[0]) == 99  # the 50-token ones at 0, 100: prefixes
    fake = {0: torch.zeros(99), 100: torch.zeros(99)}  # rows given are used, not recomputed
    assert ev.perplexity_at(model, ids, [100], fake)[100] == 1.0
    with pytest.raises(ValueError, match="fewer than"):
        ev.perplexity_at(model, ids, [300])


def test_chunked_nll_of_a_model_whose_every_layer_is_vkt():
    model, ids = tiny_hybrid("llama", layers=(0, 1, 2, 3)), torch.randint(3, 60, (1, 90))
    torch.testing.assert_close(ev.sequence_nll(model, ids, chunk_size=25), ev.sequence_nll(model, ids))


@pytest.mark.parametrize("kind", ["vkt", "softmax"])
def test_decode_benchmark_state_is_flat_for_vkt_and_grows_for_softmax(kind):
    model = tiny_hybrid("llama", layers=(0, 1, 2, 3)) if kind == "vkt" else tiny_base("llama")
    ids = torch.randint(3, 60, (1, 200))
    res = ev.decode_benchmark(model, ids, [200, 40, 100], steps=3)
    assert [r["context"] for r in res["rows"]] == [40, 100, 200]
    sizes = [r["cache_bytes"] for r in res["rows"]]
    if kind == "vkt":
        assert len(set(sizes)) == 1 and res["rows"][0]["cache_bytes_after_decode"] == sizes[0]
    else:
        assert sizes[1] == pytest.approx(2.5 * sizes[0]) and sizes[2] == 2 * sizes[1]
    assert all(r["ms_per_token"] > 0 for r in res["rows"])
    torch.testing.assert_close(res["nll"], ev.sequence_nll(model, ids)[0])  # reading in chunks = one pass


def test_attention_shares_split_the_window_softmax(tmp_path):
    model, ids = tiny_hybrid("llama", layers=(1, 3)), torch.randint(3, 60, (1, 160))
    shares = attention_shares(model, ids)
    assert shares["layers"] == [1, 3] and shares["shares"].shape == (2, 4, 3)
    torch.testing.assert_close(shares["shares"].sum(-1), torch.ones(2, 4))
    assert (shares["shares"] >= -1e-6).all() and float(shares["shares"][..., 2].max()) < 0.05  # slot starts shut
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("summary_bias"):
                p.fill_(6.0)
    opened = attention_shares(model, ids)
    assert float(opened["shares"][..., 2].min()) > 0.5  # the slot's bias decides its share
    path = render_shares_png(opened, tmp_path / "shares.png")
    assert path.stat().st_size > 0


def test_heatmaps_write_their_values_only_when_the_cells_are_few():
    plt = ev._pyplot()
    fig, (small, big) = plt.subplots(1, 2)
    ev.heatmap(small, [[0.0, 0.5], [1.0, 0.25]], 0.0, 1.0)
    ev.heatmap(big, [[0.1] * 30] * 30, 0.0, 1.0)
    assert sorted(t.get_text() for t in small.texts) == ["0.00", "0.25", "0.50", "1.00"] and not big.texts
    plt.close(fig)


def recipe() -> dict:
    return runpy.run_path(str(ROOT / "recipes" / "main.py"), run_name="recipe_main")


def test_main_job_quick_run_report_card_and_publish(tmp_path):
    src, out = save_tiny_llama(tmp_path / "llama"), tmp_path / "main"
    cmd = [sys.executable, str(ROOT / "recipes" / "main.py"), "--quick", "--src", str(src), "--out", str(out)]
    cmd += ["--name", "tiny", "--eval_tokens", "192", "--lengths", "64", "128", "--contexts", "32", "128"]
    cmd += ["--decode_steps", "2", "--new_tokens", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    original, vkt = report["models"]["original"], report["models"]["vkt"]
    for model in (original, vkt):
        assert set(model["perplexity"]) == {"genesis", "sonnets"}
        assert all(1 < p < 1000 for by_len in model["perplexity"].values() for p in by_len.values())
        assert model["positions"]["genesis"]["context_length"] == 128 and model["continuation"]["completion"]
    assert len({r["cache_bytes"] for r in vkt["decode"]["rows"]}) == 1  # the VKT state stays flat
    assert original["decode"]["rows"][1]["cache_bytes"] == 4 * original["decode"]["rows"][0]["cache_bytes"]
    stages = report["distillation"]
    assert stages["stage1"]["steps"] == stages["stage2"]["steps"] == 2 and stages["stage2"]["mode"] == "finetune"
    assert report["converted"]["importance_max_abs_a"] == 0.0  # V starts at 0 and stays frozen
    text = (out / "report.md").read_text()
    main = recipe()
    assert "\n".join(main["comparison_table"](report)) in text and "| tiny (original) |" in text
    card = (out / "model_card.md").read_text()
    assert "model-index" in card and "perplexity at 128 tokens (genesis)" in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "## Compared with the original" in card
    for png in ("positions.png", "decode.png", "attention_shares.png", "importance.png"):
        assert (out / png).stat().st_size > 0

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- main-table -->\nstale\n<!-- /main-table -->\noutro\n")
    docs, cards = tmp_path / "docs", tmp_path / "cards"
    publish = ["--publish", "--out", str(out), "--docs_dir", str(docs), "--cards_dir", str(cards)]
    assert main["main"]([*publish, "--readme", str(readme)]) == 0
    published = json.loads((docs / "report.json").read_text())
    assert published["models"] == report["models"]
    assert readme.read_text() == "intro\n" + main["readme_block"](published) + "\noutro\n"
    assert (cards / "vkt-hf-smollm2-135m-vkt-distilled.md").is_file() and (docs / "decode.png").is_file()
    assert (docs / "importance.png").is_file() and (docs / "importance.html").is_file()  # the report names them
    assert "(../cards/vkt-hf-smollm2-135m-vkt-distilled.md)" in (docs / "report.md").read_text()
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="main-table"):
        main["main"]([*publish, "--readme", str(readme)])


def test_record_curve_keeps_one_point_per_budget_and_longer_run_quotes_the_longest(tmp_path):
    main = recipe()
    curve = tmp_path / "quality" / "curve.json"
    assert main["longer_run"](curve) is None

    def report(budget: float, tokens: int, ppl: float) -> dict:
        texts = {"persuasion": {"tokens": 4096}, "kjv": {"tokens": 4096}}
        perplexity = {t: {"512": ppl + 1, "2048": ppl} for t in texts}
        return {
            "budget_minutes": budget,
            "distillation": {"stage1": {"tokens": tokens}, "stage2": {"tokens": 2 * tokens}},
            "eval": {"texts": texts, "lengths": [512, 2048]},
            "models": {"vkt": {"perplexity": perplexity}, "original": {"perplexity": perplexity}},
        }

    for budget, tokens, ppl in ((45, 300, 30.0), (15, 100, 35.0), (45, 200, 31.0)):
        out = tmp_path / f"run{budget}"
        out.mkdir(exist_ok=True)
        (out / "report.json").write_text(json.dumps(report(budget, tokens, ppl)))
        assert main["main"](["--record_curve", "--out", str(out), "--curve", str(curve)]) == 0
    points = json.loads(curve.read_text())["points"]
    assert [(p["budget_minutes"], p["tokens"]) for p in points] == [(15, 300), (45, 600)]  # the rerun replaced
    longest = main["longer_run"](curve)
    assert longest["tokens"] == 600 and longest["ppl"] == {"persuasion": 31.0, "kjv": 31.0}
    assert longest["length"] == 2048 and longest["source"] == str(curve)
    with pytest.raises(SystemExit, match="not found"):
        main["main"](["--record_curve", "--out", str(tmp_path / "none"), "--curve", str(curve)])
