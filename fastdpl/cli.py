"""The `fastdpl` command line.

    fastdpl demo                      offline demo: zero-shot, uniform baseline, DPL search + train (tiny CLIP, digits)
    fastdpl demo vit                  offline demo: linear probe, VPT-deep, DPL on a timm ViT classifier (digits)
    fastdpl search|train|eval --model timm:NAME [--method dpl|linear|uniform:L:D] [--preset vpt]   timm ViT classifiers
    fastdpl zeroshot|search|train|eval|tpt [--config run.yaml] [--dataset NAME --root DIR ...]
    fastdpl train --method coop|cocoop|dpl|zero_shot|uniform:L:D ...
    fastdpl report RUN_DIRS... --out results/summary
    fastdpl linear-probe --dataset NAME ...  the linear-probe CLIP baseline (CoOp's lpclip)
    fastdpl interpret PROMPTS [--topk 3]  the vocabulary tokens nearest to learned contexts / first-block text prompts
    fastdpl check-data --dataset NAME --root DIR
    fastdpl import-alpha AUTHORS_OUTPUT [--epoch E] --out prompt_config.json   the authors' searched alpha
    fastdpl datasets                  the datasets and the folders they need
    fastdpl bench [op|block|step|tpt|cocoop|lm|vit] [options]  benchmarks
    fastdpl lm search|train|eval --model DIR --train F --val F --test F   language models (prefix lengths)
    fastdpl lm report RUN_DIRS... --out results/lm

Every setting of the stages is a flag (``fastdpl search --help``); defaults are
the paper's. Under ``torchrun --nproc_per_node N`` the stages run data parallel.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

STAGES = ("zeroshot", "search", "train", "eval", "tpt")


def _stage_parsers(sub) -> None:
    from .pipeline.config import add_config_arguments

    helps = {"zeroshot": "evaluate zero-shot CLIP", "search": "DPL search stage (supernet): alpha and prompts",
             "train": "train the --method (DPL's configuration, deep-prompt baselines, CoOp, CoCoOp) and evaluate it",
             "eval": "evaluate saved prompts (cross-dataset, domain shift, base/new)",
             "tpt": "test-time prompt tuning on the test sets (zero-shot context, or --prompts of a trained run: "
                    "DPL text prompts, a CoOp or CoCoOp context)"}
    for stage in STAGES:
        parser = sub.add_parser(stage, help=helps[stage], description=helps[stage])
        add_config_arguments(parser, stage)
        if stage in ("eval", "tpt"):
            default = ("<output>/train/prompts.pt" if stage == "eval"
                       else "none: zero-shot CLIP with a learnable context")
            parser.add_argument("--prompts", help=f"prompts file (default: {default})")
    demo = sub.add_parser("demo", help="offline demo: the built-in tiny CLIP and digits; `demo lm`: the tiny LM; "
                          "`demo vit`: a timm ViT classifier")
    demo.add_argument("family", nargs="?", default="clip", choices=["clip", "lm", "vit"],
                      help="clip (default): DPL, CoOp, CoCoOp, TPT on digits; lm: prefix lengths on the tiny LM; "
                      "vit: VPT-deep lengths on a timm ViT (the tiny CLIP's image tower) on digits")
    demo.add_argument("--output", help="run folder (default: runs/demo, runs/demo-lm or runs/demo-vit)")
    demo.add_argument("--no-progress", action="store_true")
    report = sub.add_parser("report", help="mean ± 95%% CI tables over many runs (markdown and CSV)")
    report.add_argument("runs", nargs="+", help="run folders or results.json files")
    report.add_argument("--out", default="report", help="output path without suffix (writes .md and .csv)")
    sub.add_parser("datasets", help="list the datasets and the folders they need under --root")
    alpha = sub.add_parser("import-alpha", help="the configuration searched by the authors' code (their alpha .npy)",
                           description="Read the alpha_e<E>_img.npy / alpha_e<E>_txt.npy files of a search run of "
                           "the authors' Differentiable-Prompt-Learn code (their _txt file holds the image alpha and "
                           "their _img file the text alpha) and write a PromptConfig for `fastdpl train "
                           "--prompt-config`.")
    alpha.add_argument("path", help="their output folder, or one of the two .npy files")
    alpha.add_argument("--epoch", type=int, help="which epoch's files (default: the highest)")
    alpha.add_argument("--not-swapped", action="store_true",
                       help="the files are named for what they hold (a corrected copy of their code)")
    alpha.add_argument("--out", default="prompt_config.json", help="where to write the configuration")
    probe = sub.add_parser("linear-probe", help="the linear-probe CLIP baseline (CoOp's lpclip): logistic regression "
                           "on frozen image features, C chosen on the validation split",
                           description="Logistic regression on the frozen CLIP's image features of the few-shot "
                           "training images, its regularisation chosen on the validation split as CoOp's lpclip "
                           "chooses it; features cached under <output>/linear_probe/features.")
    add_config_arguments(probe, "linear_probe")
    interpret = sub.add_parser("interpret", help="the vocabulary tokens nearest to learned prompts (CoOp's "
                               "interpret_prompt.py)", description="For each learned vector in the token-embedding "
                               "space (CoOp/CoCoOp contexts, DPL's text prompts at the first text block): the nearest "
                               "vocabulary tokens by Euclidean distance. Other prompts are listed as not interpretable.")
    interpret.add_argument("prompts", help="a prompts.pt written by search, train or fastdpl's modules")
    interpret.add_argument("--topk", type=int, default=3, help="tokens per vector (default 3)")
    interpret.add_argument("--model", help="the CLIP it was trained on (default: the file's own settings)")
    interpret.add_argument("--pretrained", help="its weights (default: the file's own settings)")
    interpret.add_argument("--out", help="JSON result (default: interpretation.json beside the prompts file)")
    _lm_parsers(sub)
    check = sub.add_parser("check-data", help="validate a dataset root")
    check.add_argument("--dataset", required=True)
    check.add_argument("--root")
    check.add_argument("--shots", type=int, default=16)
    check.add_argument("--no-images", action="store_true", help="skip opening every image")


LM_HELPS = {"search": "DPL search of per-layer prefix lengths (supernet): alpha on --val, prefixes on --train",
            "train": "train fresh prefixes of a configuration (default: the search's) and evaluate them on --test",
            "eval": "evaluate saved prefixes (default: <output>/train; none: the base model) on --test"}


def _lm_parsers(sub) -> None:
    from .pipeline.config import add_config_arguments
    from .pipeline.lm_config import LM_STAGES, LMConfig

    lm = sub.add_parser("lm", help="language models: DPL's prefix-length search on a local Hugging Face causal LM",
                        description="The language-model protocol: search, train, eval, report (docs/language-models.md)")
    stages = lm.add_subparsers(dest="lm_command", required=True)
    for stage in LM_STAGES:
        parser = stages.add_parser(stage, help=LM_HELPS[stage], description=LM_HELPS[stage])
        # every stage takes every setting: one set of flags runs the whole protocol (a stage
        # ignores the others' own settings, as it does when they come from --config)
        add_config_arguments(parser, None, LMConfig.SCHEMA)
        if stage == "eval":
            parser.add_argument("--prefixes", help="a folder FastDPLPrefix.save wrote (default: <output>/train), "
                                "or none (the base model)")
    report = stages.add_parser("report", help="mean ± 95%% CI tables over many runs (markdown and CSV)")
    report.add_argument("runs", nargs="+", help="run folders or results.json files")
    report.add_argument("--out", default="report", help="output path without suffix (writes .md and .csv)")


def _run_lm(args) -> int:
    if args.lm_command == "report":
        from .pipeline.report import report

        md, csv_path = report(args.runs, args.out)
        print(f"wrote {md} and {csv_path}")
        return 0
    from .pipeline import lm
    from .pipeline.lm_config import resolve_lm_config

    cfg = resolve_lm_config(args)
    if args.dry_run:
        import yaml

        print(f"# fastdpl lm {args.lm_command}: resolved settings (defaults, then --config, then flags)")
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.lm_command == "eval":
        lm.run_eval(cfg, prefixes=args.prefixes)
    else:
        getattr(lm, f"run_{args.lm_command}")(cfg)
    return 0


def _interpret(args) -> int:
    import json

    from .atomic import write_text_atomic
    from .interpret import format_interpretation, interpret_file

    out = Path(args.out) if args.out else Path(args.prompts).parent / "interpretation.json"
    if out.exists():
        raise FileExistsError(f"--out {out} exists: choose another path (nothing is overwritten)")
    result = interpret_file(args.prompts, args.model, args.pretrained, args.topk)
    print(format_interpretation(result))
    write_text_atomic(out, json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastdpl", description="Fast Differentiable Prompt Learning for CLIP, "
                                     "language models and ViT classifiers")
    parser.add_argument("--version", action="version", version=f"fastdpl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks: op, block, step, tpt, cocoop, lm, vit (fastdpl bench op --help)",
                           add_help=False)
    bench.add_argument("suite", nargs="?", default="op", choices=["op", "block", "step", "tpt", "cocoop", "lm", "vit"])
    _stage_parsers(sub)
    if argv[:1] == ["bench"]:
        args, rest = parser.parse_known_args(argv)
        import importlib

        return importlib.import_module(f"fastdpl.bench.{args.suite}").main(rest)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, NotImplementedError) as exc:
        command = f"lm {args.lm_command}" if args.command == "lm" else args.command
        print(f"fastdpl {command}: error: {plain_message(exc)}", file=sys.stderr)
        return 2


def plain_message(exc: BaseException) -> str:
    """The error's own message: an exception raised in a DataLoader worker comes back with the
    worker's whole traceback in its text ("Caught X in DataLoader worker process 0 ... Original
    Traceback ..."); its last line holds the original message, which is what the user needs."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    name = type(exc).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def needs(what: str, modules: tuple, extra: str) -> None:
    """A RuntimeError (one clear line, no traceback) naming what ``what`` needs and the extra that
    installs it, when one of ``modules`` does not import."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"{what} needs {' and '.join(missing)}, not installed here: pip install "
                           f"'fastdpl[{extra}]' (from a clone: pip install -e '.[{extra}]')")


def _run(args) -> int:
    if args.command == "lm":
        if args.lm_command != "report":
            needs("a language model", ("transformers",), "lm")
        return _run_lm(args)
    if args.command in STAGES:
        from .pipeline import stages
        from .pipeline.config import resolve_config

        cfg = resolve_config(args)
        if args.dry_run:
            import yaml

            print(f"# fastdpl {args.command}: resolved settings (defaults, then --config, then flags)")
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if args.command in ("eval", "tpt"):
            getattr(stages, f"run_{args.command}")(cfg, prompts=args.prompts)
        else:
            getattr(stages, f"run_{args.command}")(cfg)
        return 0
    if args.command == "demo" and args.family == "lm":
        from .pipeline.demo_lm import demo_lm_config, run_demo_lm

        needs("the language-model demo", ("transformers",), "lm")
        run_demo_lm(demo_lm_config(output=args.output or "runs/demo-lm", progress=not args.no_progress))
        return 0
    if args.command == "demo" and args.family == "vit":
        from .pipeline.demo_vit import demo_vit_config, run_demo_vit

        run_demo_vit(demo_vit_config(output=args.output or "runs/demo-vit", progress=not args.no_progress))
        return 0
    if args.command == "demo":
        from .pipeline.demo import demo_config, run_demo

        run_demo(demo_config(output=args.output or "runs/demo", progress=not args.no_progress))
        return 0
    if args.command == "interpret":
        return _interpret(args)
    if args.command == "linear-probe":
        from .pipeline.config import resolve_config
        from .pipeline.linear_probe import run_linear_probe

        cfg = resolve_config(args)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        run_linear_probe(cfg)
        return 0
    if args.command == "datasets":
        from .data.datasets import dataset_table

        print(dataset_table())
        return 0
    if args.command == "import-alpha":
        from .config import PromptConfig

        config = PromptConfig.from_authors_alpha(args.path, args.epoch, swapped=not args.not_swapped)
        if Path(args.out).exists():
            raise FileExistsError(f"--out {args.out} exists: choose another path (nothing is overwritten)")
        config.save(args.out)
        print(f"{config}\nwrote {args.out}: fastdpl train --prompt-config {args.out}")
        return 0
    if args.command == "report":
        from .pipeline.report import report

        md, csv_path = report(args.runs, args.out)
        print(f"wrote {md} and {csv_path}")
        return 0
    from .data.check import check_dataset

    lines, problems = check_dataset(args.dataset, args.root, args.shots, open_images=not args.no_images, progress=True)
    print("\n".join(lines))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("OK" if not problems else f"{len(problems)} problem(s): fix them and run check-data again")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
