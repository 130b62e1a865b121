"""The edgeprobe collector: MQTT in, InfluxDB out."""
