"""edgeprobe: edge latency measurement, from PoPs and IXPs, over MQTT into InfluxDB.

One import namespace. The top-level folders of the repository install here:

* ``edgeprobe.probes``    (``probes/``): the probe kinds, their registry and the outcome wrapper;
* ``edgeprobe.agent``     (``agent/``): the agent daemon (scheduler, spool, publisher, control);
* ``edgeprobe.collector`` (``collector/``): MQTT in, InfluxDB out;
* ``edgeprobe.grafana``   (``grafana/``): the dashboards and their provisioning files;

and the pieces shared by several of them live in this package (``src/edgeprobe/``): the wire
schema, config loading, the MQTT session, the SQLite queue, the CLI, the fleet controller, the
responder and the local stack launcher. The layers are written down in ``pyproject.toml``
(``[tool.importlinter]``) and checked by the test command.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("edgeprobe")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"
