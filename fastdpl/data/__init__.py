"""Datasets for the DPL pipeline: CoOp-layout benchmarks, few-shot sampling, built-in data."""
from .datasets import DATASETS, DatasetError, DatasetSplits, Sample, canonical_name, load_dataset
from .fewshot import fewshot_splits, subsample_classes
from .images import clip_transform, open_image

__all__ = ["DATASETS", "DatasetError", "DatasetSplits", "Sample", "canonical_name",
           "clip_transform", "fewshot_splits", "load_dataset", "open_image", "subsample_classes"]
