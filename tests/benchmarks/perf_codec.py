"""Benchmark 2: decode-and-encode cost per observation, in isolation, in µs.

    .venv/bin/python -m tests.benchmarks.perf_codec [--quick]

Payloads: envelopes of 1, 50 and 500 observations of the realistic mix (golden samples, fresh ids).
Paths, per observation:

* ``json.loads`` / ``orjson.loads`` / ``msgspec.json.decode`` (untyped): parse only, the yardsticks.
* ``msgspec typed``: ``msgspec.json.decode`` into the v1 structs (parse + shape validation).
* ``orjson + convert`` / ``json + convert``: parse with that library, then ``msgspec.convert`` into the
  same structs: the alternative way to get the same validation.
* ``collector decode``: :func:`edgeprobe.collector.decode.decode_message` (the collector's path: whole-message
  checks, each observation decoded alone, fields validated against the kind's result struct,
  bounds), then ``+ line protocol``: plus :func:`edgeprobe.collector.lineproto.encode_batch`.

orjson is optional (``pip install orjson``); its rows are left out when it is missing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from edgeprobe.collector.decode import decode_message
from edgeprobe.collector.lineproto import encode_batch
from edgeprobe.probes.registry import KINDS
from edgeprobe.schema import Envelope
from tests.benchmarks.perf_common import PREFIX, EnvelopeFactory, Row, median, table, write_result

orjson: Any
try:
    import orjson
except ImportError:  # optional
    orjson = None


def per_obs_us(fn: Callable[[], Any], n_obs: int, min_time_s: float, repeats: int) -> float:
    """Median over ``repeats`` of the µs per observation of ``fn`` (looped for ``min_time_s``)."""
    results = []
    for _ in range(repeats):
        loops = 0
        t0 = time.perf_counter()
        while True:
            fn()
            loops += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s:
                break
        results.append(elapsed / loops / n_obs * 1e6)
    m = median(results)
    assert m is not None
    return m


def paths(topic: str, payload: bytes) -> dict[str, Callable[[], Any]]:
    typed = msgspec.json.Decoder(Envelope)

    def collector_decode() -> Any:
        return decode_message(topic, payload, prefix=PREFIX, max_bytes=1 << 24, kinds=KINDS)

    def collector_full() -> Any:
        d = decode_message(topic, payload, prefix=PREFIX, max_bytes=1 << 24, kinds=KINDS)
        assert d.meta is not None
        meta = d.meta
        return encode_batch(d.observations, agent=meta.agent, site=meta.site, kinds=KINDS, agent_labels=meta.labels)

    out: dict[str, Callable[[], Any]] = {
        "json.loads": lambda: json.loads(payload),
        "msgspec untyped": lambda: msgspec.json.decode(payload),
        "msgspec typed": lambda: typed.decode(payload),
        "json + convert": lambda: msgspec.convert(json.loads(payload), Envelope),
        "collector decode": collector_decode,
        "collector decode + line protocol": collector_full,
    }
    if orjson is not None:
        out["orjson.loads"] = lambda: orjson.loads(payload)
        out["orjson + convert"] = lambda: msgspec.convert(orjson.loads(payload), Envelope)
    return out


ORDER = ("json.loads", "orjson.loads", "msgspec untyped", "msgspec typed", "json + convert", "orjson + convert",
         "collector decode", "collector decode + line protocol")  # fmt: skip


def run(
    quick: bool, sizes: Sequence[int] = (1, 50, 500), min_time_s: float | None = None, repeats: int | None = None
) -> dict[str, Any]:
    min_time_s = min_time_s if min_time_s is not None else (0.05 if quick else 0.3)
    repeats = repeats if repeats is not None else (3 if quick else 7)
    rows: list[Row] = []
    for size in sizes:
        f = EnvelopeFactory()
        payload, _ = f.payload(size)
        fns = paths(f.topic, payload)
        base = per_obs_us(fns["json.loads"], size, min_time_s, repeats)
        for name in ORDER:
            if name not in fns:
                continue
            us = base if name == "json.loads" else per_obs_us(fns[name], size, min_time_s, repeats)
            rows.append({"observations_per_message": size, "bytes_per_observation": len(payload) / size,
                         "path": name, "us_per_obs": us, "vs_json_loads": us / base})  # fmt: skip
    return {"min_time_s": min_time_s, "repeats": repeats, "orjson": orjson is not None, "rows": rows}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.quick)
    print(table("2. decode + encode per observation (median of repeats; µs, and × json.loads of the same payload)",
                [("observations_per_message", "obs/msg"), ("bytes_per_observation", "B/obs"), ("path", "path"),
                 ("us_per_obs", "µs/obs"), ("vs_json_loads", "× json.loads")], res["rows"]))  # fmt: skip
    print("   →", write_result("perf_codec", {"quick": args.quick, **res}))


if __name__ == "__main__":
    main()
