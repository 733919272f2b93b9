"""What a config field may be: the tables of allowed values, and the one check of every field.

The cluster config (``pdserve/config.py``), the engine's ``EngineConfig`` and the
`pdserve serve` flags all take their choices from these tables and validate with
``check_fields``. A field is declared with ``setting``: its type comes from the annotation
(``int | None`` allows None), its bounds, choices and flag from the setting.

Part of the light base (no torch, no ray).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model dtype; fp8: float8_e4m3fn, per-token scales
KV_TRANSFER_DTYPES = ("fp8", "auto")  # the wire: fp8 with its scales, or the model dtype
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: float32 on CPU, bf16 on CUDA
DEVICES = ("cpu", "cuda", "cuda:N")  # cuda:N is one GPU by index, e.g. cuda:1
ATTENTION_BACKENDS = ("auto", "reference", "paged")  # auto: paged where a kernel runs
# auto: the checkpoint's quantization_config, else none (pdserve/quant_config.py)
QUANTIZATIONS = ("auto", "none", "int8", "fp8")
LOG_LEVELS = ("debug", "info", "warning", "error")


class DisaggMode(Enum):
    """Where a decode worker has its prompts prefilled."""

    CONDITIONAL = "conditional"  # here when the uncached part is short, else on a prefill worker
    ALWAYS = "always"  # on a prefill worker whenever one is healthy
    NEVER = "never"  # here


class KVChecksum(Enum):
    """Which blocks a prefill worker digests after writing them, for decode to verify."""

    OFF = "off"  # nothing computed or sent
    SAMPLE = "sample"  # a deterministic ~1/16 of each request's blocks, and its last one
    ALL = "all"  # every block of every layer


Choices = tuple[str, ...] | type[Enum]

FIELD_ERROR = "{name}: {value!r} is invalid, must be {expected}"
_SPEC = "pdserve.choices.spec"  # a field's FieldSpec in its dataclass metadata


def is_choice(value: object, choices: Choices) -> bool:
    """Whether ``value`` is one of ``choices``.

    An Enum takes its members and their values; an entry ``name:N`` stands for ``name:0``,
    ``name:1``, and so on.
    """
    if isinstance(choices, type):
        return value in list(choices) or value in choice_values(choices)
    if not isinstance(value, str):
        return False
    name, colon, index = value.partition(":")
    if colon and index.isascii() and index.isdigit():
        return f"{name}:N" in choices
    return value in choices and not value.endswith(":N")


def choice_values(choices: Choices) -> tuple[str, ...]:
    """``choices`` as written in YAML and on the command line."""
    if isinstance(choices, type):
        return tuple(member.value for member in choices)
    return choices


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """What one config field accepts, and the `pdserve serve` flag that sets it, if any.

    ``setting`` fills in the rule; ``field_specs`` adds what the class says: the name, the
    type and whether None is allowed (from the annotation), and the default.
    """

    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    choices: Choices | None = None  # an Enum-typed field takes its Enum
    accepts: Callable[[Any], bool] | None = None  # a rule bounds and choices cannot say
    expected: str | None = None  # what the field wants, where the generated words would not say
    flag: str | None = None  # several fields may share one: it sets them all
    help: str = ""
    name: str = ""
    kind: type = object  # bool, int, float, str, list (of ints), an Enum or a config class
    is_optional: bool = False
    default: Any = None  # the field's default, where it has one
    has_default: bool = False

    @property
    def is_section(self) -> bool:
        return dataclasses.is_dataclass(self.kind)

    def problem(self, value: Any) -> str | None:
        """What the field wants instead of ``value``; None when it takes it."""
        if value is None:
            return None if self.is_optional else self.describe()
        if not self._has_kind(value):
            return self.describe()
        return self._out_of_range(value) if self.kind in (int, float) else None

    def describe(self) -> str:
        """Everything the field takes, e.g. ``an integer >= 1 or None``."""
        if self.expected is not None:
            text = self.expected
        elif self.choices is not None:
            text = f"one of {choice_values(self.choices)}"
        elif self.kind in _KIND_WORDS:
            text = f"{_KIND_WORDS[self.kind]} {self._range()}".rstrip()
        else:
            text = f"a {self.kind.__name__}"
        return text + (" or None" if self.is_optional else "")

    def _has_kind(self, value: Any) -> bool:
        if self.accepts is not None:
            return self.accepts(value)
        if self.choices is not None:
            return is_choice(value, self.choices)
        if self.kind is int:
            return _is_int(value)
        if self.kind is float:
            return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
        if self.kind is str:
            return isinstance(value, str) and bool(value)
        if self.kind is list:
            return isinstance(value, (list, tuple)) and bool(value) and all(
                _is_int(item) and self._out_of_range(item) is None for item in value)
        return isinstance(value, self.kind)

    def _out_of_range(self, number: float) -> str | None:
        if self.minimum is not None and number < self.minimum:
            return f">= {self.minimum}"
        if self.exclusive_minimum is not None and number <= self.exclusive_minimum:
            return f"> {self.exclusive_minimum}"
        if self.maximum is not None and number > self.maximum:
            return f"<= {self.maximum}"
        return None

    def _range(self) -> str:
        if self.maximum is None:
            return (f">= {self.minimum}" if self.minimum is not None
                    else f"> {self.exclusive_minimum}" if self.exclusive_minimum is not None
                    else "")
        if self.minimum is not None:
            return f"in [{self.minimum}, {self.maximum}]"
        if self.exclusive_minimum is not None:
            return f"in ({self.exclusive_minimum}, {self.maximum}]"
        return f"<= {self.maximum}"


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a finite number",
               str: "a non-empty string", list: "a non-empty list of integers"}


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
            **rule: Any) -> Any:
    """A config field: ``rule`` takes ``FieldSpec``'s bounds, choices, accepts, expected,
    flag and help; the type is the field's annotation."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={_SPEC: FieldSpec(**rule)})


@functools.cache
def field_specs(cls: type) -> dict[str, FieldSpec]:
    """Each field's spec, by name; every field of ``cls`` must be a ``setting``."""
    hints = typing.get_type_hints(cls)
    specs = {}
    for item in dataclasses.fields(cls):
        if _SPEC not in item.metadata:
            raise RuntimeError(f"{cls.__name__}.{item.name} is not a setting(): say what it "
                               f"accepts, so that it is validated")
        kind, is_optional = _kind_of(hints[item.name])
        spec = item.metadata[_SPEC]
        default = (item.default_factory() if item.default_factory is not dataclasses.MISSING
                   else item.default)
        specs[item.name] = dataclasses.replace(
            spec, name=item.name, kind=kind, is_optional=is_optional,
            choices=kind if issubclass(kind, Enum) else spec.choices,
            default=None if default is dataclasses.MISSING else default,
            has_default=default is not dataclasses.MISSING)
    return specs


def check_fields(config: Any, prefix: str = "", message: str = FIELD_ERROR) -> None:
    """Refuse the first field of ``config`` its spec does not take, with ``message`` naming
    ``prefix + name``, the value and what was expected; store an Enum field as its member."""
    for name, spec in field_specs(type(config)).items():
        value = getattr(config, name)
        expected = spec.problem(value)
        if expected is not None:
            raise ValueError(message.format(name=prefix + name, value=value, expected=expected))
        if issubclass(spec.kind, Enum) and not isinstance(value, spec.kind):
            object.__setattr__(config, name, spec.kind(value))  # frozen: once, at construction


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `num_workers: true` in a YAML file is a mistake
    return isinstance(value, int) and not isinstance(value, bool)


def _kind_of(hint: Any) -> tuple[type, bool]:
    """The type an annotation names, and whether it allows None: ``int | None`` is (int, True),
    ``list[int]`` is (list, False)."""
    args = typing.get_args(hint)
    is_optional = type(None) in args
    if is_optional:
        (hint,) = (arg for arg in args if arg is not type(None))
    return typing.get_origin(hint) or hint, is_optional
