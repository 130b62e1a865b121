"""edgeprobe's bottom layer: probes, their registry, the outcome wrapper and the wire schema.

Nothing here knows about MQTT or InfluxDB; ``agent`` and ``collector`` both import from here.
"""
