"""Random initialisation that does not depend on how (or where) the model was built.

Each module's weights are drawn from a generator seeded by the run's seed and the module's name,
with the rule of the library that defines the module: a transformers model's own
``_init_weights`` for everything inside it (T5, BLIP-2 vision tower and Q-Former), otherwise the
module's ``reset_parameters`` (``nn.Linear``, ``nn.Conv2d``, norms, and the modules MIGE adds,
whose ``reset_parameters`` keep their zero-init rules). The same weights therefore come out of an
eager build on one process and of a meta-device build that is materialised one FSDP unit at a time
on each of N ranks (``mige_lightning/sharding.py::build_sharded_mige``): the module, not the order
of construction, decides its values. Modules are visited children first, so a parent's rule (a
zero-initialised output projection, T5's embedding scale) has the last word, as in transformers.

A module with parameters of its own and no rule is an error, never left as it was allocated.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel


def module_seed(seed: int, name: str) -> int:
    """The seed of one module's draws: the run's seed and the module's name, nothing else."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _scale_shift_table(module: nn.Module) -> None:
    # diffusers' PixArt / BasicTransformerBlock: randn(k, dim) / sqrt(dim)
    table = module.scale_shift_table
    table.normal_(0.0, table.shape[-1] ** -0.5)


def _rule(module: nn.Module, owner: PreTrainedModel | None):
    """The function that initialises ``module``'s own parameters, or None if it has none."""
    if owner is not None:
        return owner._init_weights
    if isinstance(module, nn.MultiheadAttention):
        return lambda m: m._reset_parameters()
    if hasattr(module, "reset_parameters"):
        return lambda m: m.reset_parameters()
    if "scale_shift_table" in module._parameters:
        return _scale_shift_table
    return None


def owners(model: nn.Module) -> dict[str, PreTrainedModel]:
    """Module name → the innermost transformers model containing it (itself included)."""
    found: dict[str, PreTrainedModel] = {}

    def visit(module: nn.Module, prefix: str, owner: PreTrainedModel | None) -> None:
        if isinstance(module, PreTrainedModel):
            owner = module
        if owner is not None:
            found[prefix] = owner
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name, owner)

    visit(model, "", None)
    return found


def post_order(model: nn.Module, prefix: str = "") -> Iterable[tuple[str, nn.Module]]:
    """``named_modules`` with children before their parent."""
    for name, child in model.named_children():
        yield from post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, model


@torch.no_grad()
def initialize(
    modules: Iterable[tuple[str, nn.Module]], seed: int, owner_of: dict[str, PreTrainedModel]
) -> None:
    """Initialise each ``(name, module)`` (full names in the model; children before parents)
    from its own seed; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        for name, module in modules:
            owner = owner_of.get(name)
            rule = _rule(module, owner)
            if rule is None:
                own = [n for n, p in module.named_parameters(recurse=False)]
                if own:
                    raise TypeError(
                        f"no initialisation rule for {type(module).__name__} at '{name}' "
                        f"(parameters {own}): give it a reset_parameters()"
                    )
                continue
            torch.manual_seed(module_seed(seed, name))
            rule(module)


def skip_prefixes(config) -> tuple[str, ...]:
    """Module names whose weights come from a pretrained source (never randomly initialised)."""
    src = config.pretrained
    skip = []
    if src.t5 is not None:
        skip.append("encoder.t5")
    if src.blip2 is not None:
        skip += ["encoder.vision", "encoder.qformer"]
    if src.dit is not None:
        skip.append("dit")
    skip.append("autoencoder")  # frozen: built (and seeded) whole, see build_mige
    return tuple(skip)


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def initialize_model(model: nn.Module, seed: int, *, skip: tuple[str, ...] = ()) -> None:
    """Initialise every module of ``model`` not under one of ``skip``."""
    owner_of = owners(model)
    initialize(((n, m) for n, m in post_order(model) if not under(n, skip)), seed, owner_of)
