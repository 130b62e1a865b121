"""The edgeprobe agent daemon and the edgeprobe CLI."""
