"""PEFT's module-matching rules, ported from peft 0.21 so the store needs no peft at run time.

Sources: `peft.tuners.tuners_utils.check_target_module_exists` (target_modules, exclude_modules,
layers_to_transform, layers_pattern, modules_to_save) and `peft.utils.other.get_pattern_key`
(rank_pattern, alpha_pattern). Module names are paths inside the CausalLM, e.g.
"model.layers.0.self_attn.q_proj". Patterns are user regexes: callers turn re.error into a config error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# PEFT expands this target_modules value to every linear except the output head.
ALL_LINEAR = "all-linear"


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first rank_pattern/alpha_pattern key that names `module` (as a regex on its last dotted parts)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class Targeting:
    """Which modules an adapter config targets, with PEFT's semantics."""

    target_modules: str | Sequence[str]
    exclude_modules: str | Sequence[str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    def targets(self, module: str) -> bool:
        if self.excludes(module):
            return False
        targets = self.target_modules
        if isinstance(targets, str):
            # A string is a regex over the whole name; layers_to_transform does not apply (PEFT forbids both).
            return targets.lower() == ALL_LINEAR or re.fullmatch(targets, module) is not None
        if module in targets:
            # An exact name is taken as is, without the layer filter (as PEFT does).
            return True
        if not any(module.endswith(f".{t}") for t in targets):
            return False
        return self._in_layers(module)

    def excludes(self, module: str) -> bool:
        exclude = self.exclude_modules
        if not exclude:
            return False
        if isinstance(exclude, str):
            return re.fullmatch(exclude, module) is not None
        return module in exclude or any(module.endswith(f".{e}") for e in exclude)

    def _in_layers(self, module: str) -> bool:
        indexes = self.layers_to_transform
        if indexes is None or (not isinstance(indexes, int) and len(indexes) == 0):
            return True
        layer = layer_index(module, self.layers_pattern)
        if layer is None:
            return False
        return layer == indexes if isinstance(indexes, int) else layer in indexes


def layer_index(module: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The first numbered path segment after a layers-container name (any name when no pattern is given)."""
    if not layers_pattern:
        # Lazy: the first numbered segment is the layer index (not e.g. an expert index deeper down).
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    return int(match.group("idx")) if match else None
