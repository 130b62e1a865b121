"""``python -m edgeprobe``: the edgeprobe CLI."""

from edgeprobe.cli import main

main()
