"""The userspace link emulator moved into the product: :mod:`edgeprobe.lab.linkemu`.

This name stays for the tests and benchmarks that import it from here.
"""

from edgeprobe.lab.linkemu import Direction, Shaper, summarize_frame

__all__ = ["Direction", "Shaper", "summarize_frame"]
