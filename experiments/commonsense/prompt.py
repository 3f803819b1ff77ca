"""The LLM-Adapters Alpaca-style prompt, and where the response starts.

Training text is ``build_prompt(instruction, input, output)``; evaluation feeds
``build_prompt(instruction, input)`` (empty output) and reads what the model writes
after :data:`RESPONSE_MARKER`. With ``--mask-prompt`` the loss skips the tokens of
that prefix (``data.tokenize_example``).

>>> p = build_prompt("Say hi.", output="hi")
>>> p.endswith("### Response:\\nhi")
True
>>> "### Input:" in build_prompt("Add.", "1 and 2")
True
"""

from __future__ import annotations

RESPONSE_MARKER = "### Response:"

_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def build_prompt(instruction: str, input: str | None = "", output: str = "") -> str:
    """The prompt text; ``output`` empty gives the generation prefix."""
    if instruction is None:
        raise ValueError("instruction must be a string, got None")
    if input:
        head = f"{_HEADER_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    else:
        head = f"{_HEADER}\n\n### Instruction:\n{instruction}\n\n"
    return f"{head}{RESPONSE_MARKER}\n{output}"


def response_of(text: str) -> str:
    """What follows the last response marker (the whole text if there is none)."""
    return text.split(RESPONSE_MARKER)[-1].strip()
