"""edgeprobe's Grafana dashboards (``dashboards/*.json``), their provisioning files and ``build.py``."""
