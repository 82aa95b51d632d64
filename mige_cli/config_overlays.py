"""Dict-valued options across config files and the command line: what a later dict does to the
one before it, decided per option (each option's docstring says which).

jsonargparse treats a ``dict`` option as a single value: a later config file's dict replaced the
earlier one whole (``--config demo.yaml --config overlay.yaml`` with ``model: {overrides:
{resolution: 16}}`` dropped every other key of the demo's overrides and built another model), and
a dotted key two levels deep (``--model.overrides.dit.num_layers=2``) replaced its sub-dict. Here,
after each config file and each command-line value of these options:

- ``merge``: a config file's dict is merged into the value before it, key by key and nested dicts
  too, and the log names each key it changed. A dotted key changes that key only, however deep.
  A dict typed whole on the command line (``--model.overrides={…}``) is the value meant: it
  replaces the earlier one, with a warning naming the keys it dropped. ``null`` first replaces
  without a word (``--model.overrides=null --config overlay.yaml``).
- keyed (``model.timestep_sampling`` by ``scheme``, ``data.benchmark`` by ``name``): merged as above
  while the key stays what it was; a dict naming another scheme / benchmark replaces the whole
  spec (its arguments belong to it), and the log names what was dropped.
- ``replace`` (``data.task_weights``: a distribution, given whole): a later dict replaces the
  earlier one, with a warning naming the keys it dropped.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, Namespace
from jsonargparse._typehints import ActionTypeHint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

MERGE, REPLACE = "merge", "replace"
# option → MERGE, REPLACE, or the key whose change makes a dict replace instead of merge
DICT_OPTIONS: dict[str, str] = {
    "model.overrides": MERGE,
    "model.pretrained": MERGE,
    "model.task_defaults": MERGE,
    "model.eval_metrics": MERGE,
    "model.timestep_sampling": "scheme",
    "data.synthetic": MERGE,
    "data.streaming": MERGE,
    "data.benchmark": "name",
    "data.task_weights": REPLACE,
}


def fmt(value: Any) -> str:
    return json.dumps(value, default=str)


def deep_merge(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s keys set, nested dicts merged alike."""
    out = dict(old)
    for key, value in new.items():
        mine = old.get(key)
        out[key] = deep_merge(mine, value) if isinstance(value, dict) and isinstance(mine, dict) else value
    return out


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"dit.num_layers": 4, …}``: a nested dict's non-dict values by dotted key."""
    if not isinstance(value, dict) or (not value and prefix):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, sub in value.items():
        out.update(leaves(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def leaf_changes(old: dict, new: dict) -> list[str]:
    """``["resolution: 32 → 16", "dit.num_layers: 4 → 2", "vae.kind: (unset) → \"kl\""]``."""
    before, after = leaves(old), leaves(new)
    return [
        f"{key}: {fmt(before[key]) if key in before else '(unset)'} → {fmt(value)}"
        for key, value in after.items()
        if key not in before or before[key] != value
    ]


def _path(cfg: Namespace, option: str) -> str:
    """Where an option lives in the namespace: ``data.init_args.synthetic`` under a class_path."""
    section, name = option.split(".", 1)
    value = cfg.get(section)
    return f"{section}.init_args.{name}" if isinstance(value, Namespace) and "init_args" in value else option


def _class_path(cfg: Namespace, option: str) -> Any:
    value = cfg.get(option.split(".", 1)[0])
    return value.get("class_path") if isinstance(value, Namespace) else None


def apply_dict_policies(before: Namespace, cfg: Namespace, source: str, *, given: str | None = None) -> None:
    """After ``source`` (a config file, or the command-line option ``given``) set ``cfg``: each
    dict option it changed, merged or replaced as ``DICT_OPTIONS`` says, the decision logged."""
    for option, policy in DICT_OPTIONS.items():
        path = _path(cfg, option)
        old, new = before.get(_path(before, option)), cfg.get(path)
        if not (isinstance(old, dict) and isinstance(new, dict)) or old == new:
            continue
        if _class_path(before, option) != _class_path(cfg, option):
            continue  # another class (e.g. data module): its arguments start afresh
        if given is not None:
            opt = given.replace(".init_args.", ".").lstrip("-")
            if opt.startswith(option + "."):  # a dotted key: that key only, however deep
                cfg[path] = set_dotted(old, opt[len(option) + 1 :], new, given)
            elif opt == option:  # a dict typed whole: the value meant
                _warn_dropped(old, new, f"{given}={fmt(new)} replaces {option} whole", option)
            continue
        if policy == REPLACE:
            dropped = sorted(set(old) - set(new))
            if dropped:
                rank_zero_warn(
                    f"{source}: {option} replaces the earlier value whole (it is given whole, not merged): "
                    f"dropped {dropped}; name them in {source} to keep them"
                    + (" (weight 0 leaves a pool out)" if option == "data.task_weights" else "")
                )
            continue
        if policy != MERGE and new.get(policy, old.get(policy)) != old.get(policy):
            dropped = sorted(set(old) - set(new))
            rank_zero_info(
                f"{source}: {option}: {policy} {fmt(old.get(policy))} → {fmt(new.get(policy))}: replaced "
                f"whole (another {policy}'s arguments do not carry over){f'; dropped {dropped}' if dropped else ''}"
            )
            continue
        merged = deep_merge(old, new)
        cfg[path] = merged
        kept = len(set(leaves(old)) - set(leaves(new)))
        rank_zero_info(
            f"{source}: {option}: {', '.join(leaf_changes(old, merged)) or 'no change'} (merged into the "
            f"earlier value, its {kept} other value(s) kept; null before it replaces it whole)"
        )


def set_dotted(old: dict, key: str, new: dict, given: str) -> dict:
    """``old`` with the dotted ``key`` set to the value jsonargparse put there in ``new`` (which
    kept only the first level of ``old``): ``--model.overrides.dit.num_layers=2`` keeps the rest
    of ``dit``."""
    parts = key.split(".")
    value: Any = new
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return new  # not a path jsonargparse set: leave its value
        value = value[part]
    if len(parts) > 1 and isinstance(value, str):  # jsonargparse leaves a deeper value unparsed
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    out = dict(old)
    node = out
    for part in parts[:-1]:
        node[part] = dict(node[part]) if isinstance(node.get(part), dict) else {}
        node = node[part]
    if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
        _warn_dropped(node[parts[-1]], value, f"{given}={fmt(value)} replaces it whole", given.lstrip("-"))
    node[parts[-1]] = value
    return out


def _warn_dropped(old: dict, new: dict, what: str, option: str) -> None:
    dropped = sorted(set(old) - set(new))
    if dropped:
        rank_zero_warn(
            f"{what}: dropped {dropped} of the earlier value "
            f"(give --{option}.<key>=… to change single keys and keep the rest)"
        )


class MergingConfigFile(ActionConfigFile):
    """``--config``: after each file, its dict options merged / replaced per ``DICT_OPTIONS``."""

    def __call__(self, parser, cfg, values, option_string=None):
        before = cfg.clone()
        super().__call__(parser, cfg, values, option_string)
        apply_dict_policies(before, cfg, str(values))


class DictPolicyTypeHint(ActionTypeHint):
    """A command-line value of a dict option (or of ``--data…``), then ``DICT_OPTIONS``."""

    def __call__(self, *args, **kwargs):
        if len(args) < 4:  # jsonargparse's constructor form
            return super().__call__(*args, **kwargs)
        cfg, opt_str = args[1], args[3]
        before = cfg.clone() if isinstance(cfg, Namespace) else None
        result = super().__call__(*args, **kwargs)
        if before is not None and isinstance(opt_str, str):
            apply_dict_policies(before, cfg, opt_str, given=opt_str)
        return result


def install(parser) -> None:
    """The parser's ``--config`` and the dict options' actions follow ``DICT_OPTIONS``."""
    sections = {option.split(".", 1)[0] for option in DICT_OPTIONS}
    for action in parser._actions:
        if type(action) is ActionConfigFile:
            action.__class__ = MergingConfigFile
        elif type(action) is ActionTypeHint and (action.dest in DICT_OPTIONS or action.dest in sections):
            action.__class__ = DictPolicyTypeHint
