"""The physical floor of a path: great-circle distance and the fibre round trip it cannot beat.

Constants and sources (also in the README):

* Light in vacuum: ``C_KM_PER_S = 299_792.458`` (SI definition).
* Refractive index of standard single-mode fibre ≈ 1.468 (group index near 1550 nm), so light in
  fibre covers ≈ 204,218 km/s, about 0.68 c: every 100 km of path costs ≥ 0.979 ms of round trip.
* Earth mean radius 6371.0088 km (IUGG), haversine great-circle distance.

``floor_rtt_ms`` assumes a straight fibre along the great circle, which no real route achieves
(studies put typical routes near 2× the straight line), so ``inflation_ratio`` = measured minimum
RTT / floor is ≥ 1 for every honest measurement and tells how far a path is from physics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from edgeprobe.probes.kind import AnyKind

C_KM_PER_S: Final = 299_792.458
FIBRE_REFRACTIVE_INDEX: Final = 1.468
FIBRE_KM_PER_MS: Final = C_KM_PER_S / FIBRE_REFRACTIVE_INDEX / 1000.0  # ≈ 204.218 km per ms
EARTH_RADIUS_KM: Final = 6371.0088

# Round trips a fresh connection needs before the first response byte can arrive, per protocol:
# TCP handshake (1) + TLS handshake (TLS 1.3: 1, TLS 1.2: 2) + request/response (1).
ROUND_TRIPS_TO_FIRST_BYTE: Final = {"http": 2, "tls1.3": 3, "tls1.2": 4, "reused": 1}


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in km between two points given in degrees."""
    for lat in (lat1, lat2):
        if not -90.0 <= lat <= 90.0:
            raise ValueError(f"latitude must be within -90..90, got {lat}")
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def floor_rtt_ms(distance_km: float) -> float:
    """Round trip of light in a straight fibre over ``distance_km`` each way."""
    if distance_km < 0:
        raise ValueError("distance must be >= 0")
    return 2.0 * distance_km / FIBRE_KM_PER_MS


def inflation_ratio(measured_rtt_ms: float | None, floor_ms: float) -> float | None:
    """Measured / floor; None when nothing was measured or the floor is too small to divide by
    (co-located endpoints: under 1 km a ratio says more about the host than the path)."""
    if measured_rtt_ms is None or floor_ms < floor_rtt_ms(1.0):
        return None
    return measured_rtt_ms / floor_ms


def first_byte_round_trips(scheme: str, tls_version: str | None, reused: bool) -> int:
    """Round trips before a first response byte is possible (see ROUND_TRIPS_TO_FIRST_BYTE)."""
    if reused:
        return ROUND_TRIPS_TO_FIRST_BYTE["reused"]
    if scheme != "https":
        return ROUND_TRIPS_TO_FIRST_BYTE["http"]
    return ROUND_TRIPS_TO_FIRST_BYTE["tls1.2" if tls_version in ("TLSv1.2", "TLSv1.1", "TLSv1") else "tls1.3"]


def physics(
    kind: AnyKind, target: str, fields: Mapping[str, Any], agent_at: tuple[float, float], target_at: tuple[float, float]
) -> dict[str, float | None]:
    """distance_km, floor_rtt_ms, inflation_ratio and floor_ttft_ms of one run (pure).

    The kind says which measured round trip faces the floor (``floor_field``: the smallest one it
    saw) and, if it has a first byte worth a floor, how many round trips that takes
    (``first_byte_round_trips``); otherwise inflation_ratio or floor_ttft_ms is None.
    """
    distance = great_circle_km(*agent_at, *target_at)
    floor = floor_rtt_ms(distance)
    measured = fields.get(kind.floor_field) if kind.floor_field is not None else None
    out: dict[str, float | None] = {
        "distance_km": round(distance, 3),
        "floor_rtt_ms": round(floor, 6),
        "inflation_ratio": inflation_ratio(float(measured), floor) if isinstance(measured, int | float) else None,
        "floor_ttft_ms": None,
    }
    if kind.first_byte_round_trips is not None:
        out["floor_ttft_ms"] = round(kind.first_byte_round_trips(target, fields) * floor, 6)
    return out
