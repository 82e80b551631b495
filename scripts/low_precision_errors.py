"""Errors of the fused engine in bf16/fp16 against the float64 oracle, beside the eager engine's and
the plain PyTorch loop's in the same dtype (median and worst over seeds), on one case of the op.

    TRITON_INTERPRET=1 python scripts/low_precision_errors.py            # the case of issue 11 point 4
    python scripts/low_precision_errors.py --case 2,2,77,64,0-1-2-3-4-5-6,causal --seeds 10   # on a GPU

Case: B,H,N,D,lengths(dash-separated)[,causal]. Errors are max|x - ref| / max|ref| per tensor.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import NAMES, TRITON_DEVICE, Case, float64_oracle, make_inputs, normalised_error, run_with_grads  # noqa


def parse_case(text: str) -> Case:
    parts = text.split(",")
    b, h, n, d = map(int, parts[:4])
    lengths = tuple(int(x) for x in parts[4].split("-"))
    return Case(b, h, n, d, lengths, len(parts) > 5 and parts[5] == "causal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="2,2,1,16,0-0-6-2,causal")
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    case = parse_case(args.case)
    for dtype in (torch.bfloat16, torch.float16):
        errors = {name: {impl: [] for impl in ("triton", "eager", "reference")} for name in NAMES}
        for seed in range(args.seeds):
            tensors, grad_out = make_inputs(case, dtype, TRITON_DEVICE, seed)
            expected = float64_oracle(tensors, grad_out, case)
            for impl in ("triton", "eager", "reference"):
                for name, a, e in zip(NAMES, run_with_grads(tensors, grad_out, case, impl), expected):
                    errors[name][impl].append(normalised_error(a, e))
        print(f"{str(dtype).replace('torch.', '')} {case}, {args.seeds} seeds: median (worst)")
        print(f"  {'':10s} {'fused':>20s} {'eager':>20s} {'plain PyTorch loop':>20s}")
        for name, by_impl in errors.items():
            cells = [f"{statistics.median(v):.2e} ({max(v):.2e})" for v in by_impl.values()]
            print(f"  {name:10s} " + " ".join(f"{c:>20s}" for c in cells))


if __name__ == "__main__":
    main()
