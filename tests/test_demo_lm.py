"""`fastdpl demo lm` end to end on the built-in tiny LM (a shortened schedule, for CI time): every
prompted row learns the task the base model cannot do, the table and the alpha heatmap are
written, a second run picks up the finished stages; and the PEFT row's greedy decoding equals an
unpadded per-prompt loop over PEFT's own forward."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from fastdpl import text_synthetic as ts  # noqa: E402
from fastdpl.cli import main  # noqa: E402
from fastdpl.pipeline import demo_lm  # noqa: E402

pytestmark = pytest.mark.skipif(not (ts.TINY_LM / "config.json").is_file(), reason="the tiny LM asset is not built")
SHORT = dict(search_steps=150, train_steps=200, checkpoint_every=100, progress=False)


def test_demo_lm_prompts_learn_what_the_base_model_cannot(tmp_path, capsys):
    table = demo_lm.run_demo_lm(demo_lm.demo_lm_config(output=str(tmp_path / "demo"), **SHORT))
    printed = capsys.readouterr().out
    base = table.pop("base model")
    names = list(table)
    assert names[0] == "DPL (searched)" and names[1].startswith("uniform prefix ")
    assert base["exact_match"] == 0.0
    for name, result in table.items():
        assert result["exact_match"] > 0.05 and result["loss"] < base["loss"] / 4, (name, result)
        assert f"| {name} |" in printed
    lengths = table["DPL (searched)"]["config"]["lengths"]["decoder"]
    assert len(lengths) == ts.MODEL_CONFIG["num_hidden_layers"] and set(lengths) <= {0, 2, 8, 32}
    uniform = table[names[1]]["config"]["lengths"]["decoder"]
    assert len(set(uniform)) == 1 and abs(sum(uniform) - sum(lengths)) <= len(lengths) / 2
    if len(names) == 3:  # peft installed: the same budget
        assert names[2] == f"PEFT prefix tuning {uniform[0]}"
    out = tmp_path / "demo"
    assert (out / "dpl" / "search" / "alpha_heatmap.png").stat().st_size > 1000
    assert "| base model | 0 0 0 0 | 0 | 0.0 |" in (out / "table.md").read_text()
    assert json.loads((out / "dpl" / "train" / "results.json").read_text())["exact_match"] == table["DPL (searched)"]["exact_match"]
    # a second run picks up its finished stages: the same table, no retraining
    again = demo_lm.run_demo_lm(demo_lm.demo_lm_config(output=str(out), **SHORT))
    assert again == {"base model": base, **table}


def test_the_cli_runs_the_lm_demo_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_lm, "DEMO_LM_SETTINGS", {**demo_lm.DEMO_LM_SETTINGS, "search_steps": 4,
                                                      "train_steps": 4, "checkpoint_every": 2})
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "lm", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "demo-lm" / "table.md").is_file() and not (tmp_path / "runs" / "demo").exists()


def test_peft_rows_decode_as_an_unpadded_greedy_loop():
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(ts.tiny_lm_folder(), local_files_only=True).eval()
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    for p in wrapped.parameters():
        if p.requires_grad:
            p.data.normal_(0, 1)  # a prefix that changes the answers
    tokenizer = ts.build_tokenizer()
    prompts = [r["prompt"] for r in ts.downstream_task(seed=3, sizes={"test": 5})["test"]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    got = demo_lm._Generating(wrapped).generate(**batch, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        expected = []
        with torch.no_grad():
            for _ in range(4):
                token = wrapped(input_ids=ids).logits[0, -1].argmax().item()
                expected.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
                if token == tokenizer.eos_token_id:
                    break
        assert got[row, width:width + len(expected)].tolist() == expected
        assert set(got[row, width + len(expected):].tolist()) <= {tokenizer.pad_token_id}
