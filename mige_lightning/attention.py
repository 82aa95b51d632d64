"""Which attention kernel each module runs: fused ``scaled_dot_product_attention`` or a softmax.

``attention_calls(model)`` watches the ATen operators a forward pass dispatches (a
``TorchDispatchMode``, the mechanism ``torch.utils.flop_counter`` uses) and attributes each to the
innermost module running: a fused SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``,
``…_efficient_attention``, ``…_cudnn_attention``, ``_flash_attention_forward``); SDPA's unfused
"math" fallback, recognised by its ``_safe_softmax`` (the dispatcher takes it when no fused kernel
supports the call: on a CPU, attention dropout in training or a float mask that needs a gradient,
as T5's position bias does); or a hand-written attention, matmul → ``_softmax`` → matmul. Used by ``bench/attention_profile.py`` and the tests: every attention in the
step must be fused.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = {"_safe_softmax": "math", "_softmax": "softmax"}  # SDPA's math fallback; hand-written
FUSED = re.compile(
    r"^_(scaled_dot_product_\w*attention\w*|flash_attention_forward|efficient_attention_forward)"
)


class AttentionCalls(TorchDispatchMode):
    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.stack: list[torch.nn.Module] = []
        self.counts: dict[str, dict] = defaultdict(
            lambda: {"sdpa": 0, "math": 0, "softmax": 0, "class": "", "ops": set()}
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        fused = FUSED.match(op) and not op.endswith("backward")
        kind = "sdpa" if fused else KINDS.get(op)
        if kind is not None:
            module = next((m for m in reversed(self.stack) if id(m) in self.names), None)
            name = self.names[id(module)] if module is not None else "(outside the model)"
            self.counts[name][kind] += 1
            self.counts[name]["ops"].add(op)
            self.counts[name]["class"] = type(module).__name__ if module is not None else ""
        return func(*args, **(kwargs or {}))

    def table(self) -> list[dict]:
        """One row per module class and position (block indices collapsed to ``*``)."""
        rows: dict[tuple[str, str], dict] = {}
        for name, c in self.counts.items():
            group = re.sub(r"\.\d+(?=\.|$)", ".*", name)
            row = rows.setdefault(
                (group, c["class"]),
                {"group": group, "class": c["class"], "sdpa": 0, "math": 0, "softmax": 0, "ops": set()},
            )
            row["sdpa"] += c["sdpa"]
            row["math"] += c["math"]
            row["softmax"] += c["softmax"]
            row["ops"] |= c["ops"]
        return sorted(rows.values(), key=lambda r: r["group"])


@contextmanager
def attention_calls(model: torch.nn.Module) -> Iterator[AttentionCalls]:
    """Count fused-attention and softmax calls per module of ``model`` while the block runs."""
    calls = AttentionCalls({id(m): n or "(root)" for n, m in model.named_modules()})

    def enter(module, args) -> None:
        calls.stack.append(module)

    def leave(module, args, output) -> None:  # returns None: the output is left as it is
        calls.stack.pop()

    pre = register_module_forward_pre_hook(enter)
    post = register_module_forward_hook(leave)
    try:
        with calls:
            yield calls
    finally:
        pre.remove()
        post.remove()
