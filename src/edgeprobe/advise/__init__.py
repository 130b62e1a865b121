"""``edgeprobe advise``: from the measurements in InfluxDB to a placement answer.

For the users behind each PoP: which inference endpoint serves them best, how much of their time
to first token is network (and how much of that no software can remove: the physical floor), and
what an endpoint at another location would give them.

Modules, top to bottom (import-linter contract ``advise``):

* :mod:`~edgeprobe.advise.run`: fetch, compute, report (the only place that does I/O besides the
  reader).
* :mod:`~edgeprobe.advise.table`, :mod:`~edgeprobe.advise.html`: renderers of a
  :class:`~edgeprobe.advise.report.Report` (pure); :mod:`~edgeprobe.advise.influxql`: the thin
  InfluxQL reader (queries and the parsing of answers are pure, the HTTP call is thin).
* :mod:`~edgeprobe.advise.report`: the whole answer as one documented structure (``--json``).
* :mod:`~edgeprobe.advise.whatif`: candidates file, predictions, best-k, backtest (pure).
* :mod:`~edgeprobe.advise.pairs`: per PoP × endpoint statistics, best endpoint, network share (pure).
* :mod:`~edgeprobe.advise.model`: the samples read from InfluxDB and the defaults.
"""
