"""Prometheus metrics for the router, rendered in the text exposition format 0.0.4.

Hand-written and small so the router needs no client library: counters, gauges and
histograms with optional labels, plus callback metrics whose values are computed at scrape
time (worker stats the router already holds). Each metric guards its values with a lock, so
the event loop can update them while another thread renders.

Label values are passed as a tuple in the order of the metric's label names::

    requests = registry.register(Counter("pdserve_requests_total", "Requests.", ("status",)))
    requests.inc(labels=("200",))
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]
Collect = Callable[[], Mapping[Sequence[str], float]]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def format_value(value: float) -> str:
    """A sample value as Prometheus parses it: ``+Inf``, ``NaN``, ``3``, ``0.25``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class Metric:
    """A named metric family; subclasses supply the samples."""

    type_name: ClassVar[str]
    reserved_labels: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()):
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"metric name {name!r} is invalid: "
                             "must match [a-zA-Z_:][a-zA-Z0-9_:]*")
        for label in label_names:
            if (not _LABEL_NAME.fullmatch(label) or label.startswith("__")
                    or label in self.reserved_labels):
                raise ValueError(f"label name {label!r} of {name} is invalid: must match "
                                 "[a-zA-Z_][a-zA-Z0-9_]*, not start with '__', and not be "
                                 f"one of {self.reserved_labels}")
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"label names of {name} repeat: {tuple(label_names)}")
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help_text)}",
                 f"# TYPE {self.name} {self.type_name}", *self._sample_lines()]
        return "\n".join(lines) + "\n"

    def _sample_lines(self) -> Iterable[str]:
        raise NotImplementedError

    def _key(self, labels: Sequence[str]) -> LabelValues:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes label values for {self.label_names}, "
                             f"got {tuple(labels)!r}")
        return tuple(str(value) for value in labels)

    def _line(self, suffix: str, key: LabelValues, value: float,
              extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = [*zip(self.label_names, key, strict=True), *extra]
        label_text = ",".join(f'{label}="{escape_label_value(value)}"' for label, value in pairs)
        braces = f"{{{label_text}}}" if pairs else ""
        return f"{self.name}{suffix}{braces} {format_value(value)}"


class _ValueMetric(Metric):
    """One number per label set; an unlabelled one shows 0 before its first update."""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()):
        super().__init__(name, help_text, label_names)
        self._values: dict[LabelValues, float] = {} if self.label_names else {(): 0.0}

    def value(self, labels: Sequence[str] = ()) -> float:
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def _add(self, amount: float, labels: Sequence[str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def _sample_lines(self) -> Iterable[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [self._line("", key, value) for key, value in items]


class Counter(_ValueMetric):
    """A count that only goes up."""

    type_name = "counter"

    def inc(self, amount: float = 1.0, labels: Sequence[str] = ()) -> None:
        if not amount >= 0:
            raise ValueError(f"{self.name} is a counter: inc({amount}) is invalid, must be >= 0")
        self._add(amount, labels)


class Gauge(_ValueMetric):
    """A value that goes up and down."""

    type_name = "gauge"

    def set(self, value: float, labels: Sequence[str] = ()) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def inc(self, amount: float = 1.0, labels: Sequence[str] = ()) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, labels: Sequence[str] = ()) -> None:
        self._add(-amount, labels)


@dataclass(slots=True)
class _Series:
    bucket_counts: list[int]  # per bucket, not cumulative; the last is +Inf
    total: float = 0.0
    count: int = 0


class Histogram(Metric):
    """Observations counted into fixed buckets; a value equal to a bound falls into it."""

    type_name = "histogram"
    reserved_labels = ("le",)

    def __init__(self, name: str, help_text: str, buckets: Sequence[float],
                 label_names: Sequence[str] = ()):
        super().__init__(name, help_text, label_names)
        bounds = tuple(float(bound) for bound in buckets)
        if not bounds or not all(math.isfinite(bound) for bound in bounds):
            raise ValueError(f"buckets of {name} are invalid: {tuple(buckets)}; give one or "
                             "more finite bounds (+Inf is added)")
        if any(low >= high for low, high in itertools.pairwise(bounds)):
            raise ValueError(f"buckets of {name} are invalid: {tuple(buckets)}; bounds must "
                             "increase strictly")
        self.bounds = bounds
        self._series: dict[LabelValues, _Series] = {} if self.label_names else {
            (): self._new_series()}

    def observe(self, value: float, labels: Sequence[str] = ()) -> None:
        if math.isnan(value):
            raise ValueError(f"{self.name} cannot observe NaN")
        key = self._key(labels)
        index = bisect.bisect_left(self.bounds, value)  # first bound >= value
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = self._new_series()
            series.bucket_counts[index] += 1
            series.total += value
            series.count += 1

    def _new_series(self) -> _Series:
        return _Series(bucket_counts=[0] * (len(self.bounds) + 1))

    def _sample_lines(self) -> Iterable[str]:
        with self._lock:
            items = [(key, _Series(list(series.bucket_counts), series.total, series.count))
                     for key, series in sorted(self._series.items())]
        lines = []
        for key, series in items:
            cumulative = itertools.accumulate(series.bucket_counts)
            for bound, count in zip((*self.bounds, math.inf), cumulative, strict=True):
                lines.append(self._line("_bucket", key, count, (("le", format_value(bound)),)))
            lines.append(self._line("_sum", key, series.total))
            lines.append(self._line("_count", key, series.count))
        return lines


class _CallbackMetric(Metric):
    def __init__(self, name: str, help_text: str, collect: Collect,
                 label_names: Sequence[str] = ()):
        super().__init__(name, help_text, label_names)
        self._collect = collect

    def _sample_lines(self) -> Iterable[str]:
        values = {self._key(labels): value for labels, value in self._collect().items()}
        return [self._line("", key, value) for key, value in sorted(values.items())]


class CallbackGauge(_CallbackMetric):
    """A gauge computed at render time: ``collect()`` returns ``{label values: value}``."""

    type_name = "gauge"


class CallbackCounter(_CallbackMetric):
    """A counter kept elsewhere (e.g. a worker's stats), read at render time like
    ``CallbackGauge``."""

    type_name = "counter"


M = TypeVar("M", bound=Metric)


class Registry:
    """The metrics one ``/metrics`` endpoint renders, in the order registered."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: M) -> M:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"a metric named {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(metric.render() for metric in metrics)
