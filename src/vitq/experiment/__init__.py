"""The experiment engine: runs described by typed specs, shared by the CLI, the benchmarks and the tests.

- :mod:`~vitq.experiment.grammar`: ``KEY=VALUE`` options, ``WxAy`` settings, method variants;
- :mod:`~vitq.experiment.runs`: :class:`RunSpec` (model, checkpoint, data, evaluation), :class:`ConfigRequest`
  (the user's settings → a validated :class:`~vitq.config.QuantConfig`), quantize/evaluate on a split, the
  saved-model folder and the JSON record of a run;
- :mod:`~vitq.experiment.compare`: methods x bits x seeds against float, journaled and resumable;
- :mod:`~vitq.experiment.executors`: where each (method, bits, seed) cell runs: in this process or as Ray tasks.
"""

from vitq.experiment.compare import CompareOutcome, CompareSpec, run_compare
from vitq.experiment.executors import ExecutorSpec
from vitq.experiment.grammar import Variant, parse_option, parse_variants
from vitq.experiment.runs import ConfigRequest, RunSpec

__all__ = ["CompareOutcome", "CompareSpec", "ConfigRequest", "ExecutorSpec", "RunSpec", "Variant", "parse_option",
           "parse_variants", "run_compare"]
