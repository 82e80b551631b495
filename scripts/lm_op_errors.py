"""Errors of every engine against the float64 reference loop on the op's language-model cases
(grouped-query heads, a scale, fewer queries than keys, left/right padding), per dtype:
max |x - ref| / max |ref| per tensor, worst over seeds, as a markdown table.

    TRITON_INTERPRET=1 python scripts/lm_op_errors.py --seeds 3 --out errors.md    # CPU
    python scripts/lm_op_errors.py --seeds 10                                      # on a GPU

The float64 oracle is fastdpl's reference loop in float64 (tests/test_op_language_models.py
checks it against an independent oracle, itself checked against SDPA). "plain" is that loop
run in the dtype itself: the yardstick of FlashAttention's rule for bf16/fp16. Case names:
B, H/H_kv, N/N_k, D, L(engths), c(ausal), s(cale), r(ight)/l(eft) padding.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import NAMES, TRITON_DEVICE, normalised_error  # noqa: E402
from test_op_language_models import LMCase, make_inputs, run  # noqa: E402

CASES = [
    LMCase(2, 6, 2, 33, 33, 40, (0, 3, 0, 9), scale=0.3),
    LMCase(2, 4, 1, 1, 37, 64, (0, 4, 8)),                        # one decoding step, multi-query
    LMCase(2, 6, 3, 13, 50, 24, (0, 4, 8, 16)),                   # 13 queries after 37 cached keys
    LMCase(3, 4, 2, 41, 41, 64, (0, 4, 8, 16), padding="right"),  # the last sequence has no real key
    LMCase(3, 4, 2, 41, 41, 64, (0,), padding="left"),            # no prompts: blind rows are zeros
    LMCase(2, 8, 2, 70, 70, 64, (0, 4, 8, 16, 32, 64), padding="left"),
]


def errors(case, dtype, impl, seeds):
    worst = [0.0] * len(NAMES)
    for seed in range(seeds):
        device = TRITON_DEVICE if impl == "triton" else torch.device("cpu")
        tensors, grad_out = make_inputs(case, dtype, device, seed)
        wide = [t.detach().cpu().double().requires_grad_() for t in tensors]
        expected = run(case, wide, grad_out.cpu().double(), "reference")
        actual = run(case, tensors, grad_out, "reference" if impl == "plain" else impl)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert torch.isfinite(a).all(), f"{case} {impl} {dtype}: non-finite {NAMES[i]}"
            worst[i] = max(worst[i], normalised_error(a, e))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    rows = ["| case | dtype | engine | " + " | ".join(NAMES) + " |", "|---|---|---|" + "---|" * len(NAMES)]
    engines = {torch.float64: ("eager",), torch.float32: ("eager", "triton", "plain"),
               torch.bfloat16: ("eager", "triton", "plain"), torch.float16: ("eager", "triton", "plain")}
    for case in CASES:
        for dtype, impls in engines.items():
            for impl in impls:
                if impl == "triton" and TRITON_DEVICE is None:
                    continue
                cells = " | ".join(f"{e:.1e}" for e in errors(case, dtype, impl, args.seeds))
                rows.append(f"| {case} | {str(dtype)[6:]} | {impl} | {cells} |")
                print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
