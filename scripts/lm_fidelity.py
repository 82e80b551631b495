"""FastDPLPrefix's fidelity figures per model family (tiny random configs, fp32, CPU), as a markdown table:
the largest differences that tests/test_lm.py bounds, measured.

    python scripts/lm_fidelity.py --out fidelity.md

Columns: search vs the literal supernet on each model's own eager attention (logits; prefix and alpha
gradients, relative to their largest entry), alpha on length 0 vs the base model, the real rows of a
left-padded batch vs each sequence alone, and PEFT's own logits and prompt-gradient norm vs
``from_peft`` (rotary families; peft installed).
"""
import argparse
import copy
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fastdpl.lm import FastDPLPrefix  # noqa: E402
from test_lm import FAMILIES, LENGTHS, batch, logits_of, randomise, tiny  # noqa: E402


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def literal_gap(family):
    import test_lm
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("fastdpl_literal", test_lm.literal_attention)
    AttentionMaskInterface.register("fastdpl_literal", eager_mask)
    model = tiny(family)
    ids, mask = batch()
    dpl = FastDPLPrefix(model, candidate_lengths=LENGTHS)
    randomise(dpl)

    def run():
        out = logits_of(model, ids, mask)
        out = out[mask.bool()] if out.dim() == 3 else out
        grads = torch.autograd.grad(out.square().mean(), dpl.prompt_parameters() + dpl.arch_parameters())
        return out.detach(), torch.cat([g.flatten() for g in grads])

    fused, fused_grads = run()
    model.set_attn_implementation("fastdpl_literal")
    literal, literal_grads = run()
    return (fused - literal).abs().max().item(), _rel(fused_grads, literal_grads)


def base_gap(family):
    model = tiny(family)
    ids, mask = batch(left=family not in ("bert", "roberta"))
    with torch.no_grad():
        base = logits_of(model, ids, mask)
        dpl = FastDPLPrefix(model, candidate_lengths=LENGTHS)
        randomise(dpl)
        for a in dpl.arch_parameters():
            a.copy_(torch.tensor([[1e4, 0.0, 0.0]]).expand_as(a))
        ours = logits_of(model, ids, mask)
    rows = mask.bool() if base.dim() == 3 else slice(None)
    return (ours[rows] - base[rows]).abs().max().item()


def padding_gap(family):
    if family in ("bert", "roberta"):
        return None
    model = tiny(family)
    dpl = FastDPLPrefix(model, candidate_lengths=LENGTHS)
    randomise(dpl)
    ids, mask = batch(lengths=(9, 5), left=True)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        return max((padded[b][mask[b].bool()] - model(input_ids=ids[b][mask[b].bool()][None]).logits[0]).abs().max()
                   .item() for b in range(2))


def peft_gap(family):
    try:
        import peft
    except ImportError:
        return None
    if family in ("gpt2", "bert", "roberta"):
        return None
    base = tiny(family)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                  num_virtual_tokens=5))
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(4)))
    ids, mask = batch(lengths=(9, 6), left=False)
    expected = peft_model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    (grad,) = torch.autograd.grad(expected.square().mean(), embedding)
    with TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        dpl = FastDPLPrefix.from_peft(base, folder)
    actual = logits_of(base, ids, mask)[mask.bool()]
    grads = torch.autograd.grad(actual.square().mean(), dpl.prompt_parameters())
    norm = torch.stack([g.norm() for g in grads]).norm()
    return (actual - expected).abs().max().item(), abs(norm / grad.norm() - 1).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    lines = ["| family | vs literal: logits (abs) | vs literal: grads (rel) | alpha on 0 vs base (abs) | "
             "left padding vs alone (abs) | vs PEFT: logits (abs) | vs PEFT: grad norm (rel) |",
             "|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        logits, grads = literal_gap(family)
        padding, peft_result = padding_gap(family), peft_gap(family)
        cells = [f"{logits:.1e}", f"{grads:.1e}", f"{base_gap(family):.1e}",
                 "-" if padding is None else f"{padding:.1e}",
                 *(("-", "-") if peft_result is None else (f"{peft_result[0]:.1e}", f"{peft_result[1]:.1e}"))]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
