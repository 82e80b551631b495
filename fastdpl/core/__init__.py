"""The prompted-transformer core: prompts, architecture logits, configurations and state for any
stack of transformer blocks (docs/architecture.md). Imports only torch and fastdpl's op and
configuration modules; family adapters and applications build on it."""
from .bank import (
    MODES, BankHolder, PromptBank, PromptShape, Stack, check_saved_tensors, check_state_header, normal_init, prompt_key,
)

__all__ = ["MODES", "BankHolder", "PromptBank", "PromptShape", "Stack", "check_saved_tensors", "check_state_header",
           "normal_init", "prompt_key"]
