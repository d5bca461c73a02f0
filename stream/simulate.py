"""Realistic, seeded marketing traffic with injectable incidents.

Campaigns across channels have their own CTR, lead and conversion rates, costs
and order values; traffic follows a diurnal curve; a funnel turns impressions
into clicks and, minutes later, into leads and orders (most orders carry only
the click id, so they must be attributed). A small share of events is sent
twice, arrives a few minutes late, out of order by up to 50 minutes (an SDK
flushing offline events), or beyond its type's dedup horizon (too late to count).
Spend comes as ad platforms report it: the cost of each impression and click,
plus per-campaign spend reports (fees, flat placements) that sum the traffic
served over a reporting period and arrive in lumps a few minutes after it ends,
so window sums of spend are lumpy the way real ones are.
Incidents (``ctr_drop``, ``conversion_drop``, ``spend_spike``,
``tracking_outage``, ``budget_overrun``) change those rates for a segment over a
time range.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from stream.aggregate import DEDUP_MINUTES
from stream.durations import parse_duration

CHANNELS = ("search", "social", "display", "email", "video")
INCIDENT_KINDS = (
    "ctr_drop", "conversion_drop", "spend_spike", "tracking_outage", "budget_overrun",
)  # fmt: skip
# Kinds whose ``by`` is a rise (any positive size), not a drop (at most 100%).
RISES = frozenset({"spend_spike", "budget_overrun"})


class IncidentError(ValueError):
    """An incident spec that cannot be understood; the message says why."""


def _duration(spec: str, text: str) -> float:
    """A duration of an incident spec, its errors said as the spec's."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise IncidentError(f"{spec!r}: {exc}") from None


@dataclass(frozen=True)
class Incident:
    """A change to the traffic of a segment from ``at`` for ``duration`` seconds.

    ``spend_spike`` raises the segment's prices (CPM, CPC, fees): CPC and the other
    cost KPIs rise. ``budget_overrun`` buys ``1 + by`` times the segment's usual
    traffic at its usual prices (a raised cap, a broken pacing rule at the ad
    platform): spend rises as fast but every ratio KPI stays put, so only budget
    pacing can see it. It lasts until the simulation stops unless ``for`` is given.
    """

    kind: str
    at: float  # seconds after the simulation start
    duration: float = 1800.0
    by: float = 0.4  # relative change: 0.4 = a 40% drop (or a 40% spike)
    campaign: str | None = None
    channel: str | None = None
    event_type: str | None = None  # tracking_outage: which stream goes silent

    def active(self, offset: float, campaign: str, channel: str) -> bool:
        return (
            self.at <= offset < self.at + self.duration
            and (self.campaign is None or self.campaign == campaign)
            and (self.channel is None or self.channel == channel)
        )

    @classmethod
    def parse(cls, spec: str) -> Incident:
        """``ctr_drop:campaign=c7:at=+10m:by=40%[:for=20m]``."""
        kind, *parts = spec.strip().split(":")
        if kind not in INCIDENT_KINDS:
            raise IncidentError(
                f"unknown incident {kind!r}; use one of {', '.join(INCIDENT_KINDS)}"
            )
        fields: dict[str, Any] = {"kind": kind, "at": 0.0}
        if kind == "budget_overrun":
            fields["duration"] = math.inf  # from the onset on, unless for= says otherwise
        for part in parts:
            name, sep, value = part.partition("=")
            if not sep:
                raise IncidentError(f"{spec!r}: expected name=value, got {part!r}")
            if name == "at":
                fields["at"] = _duration(spec, value)
            elif name == "for":
                fields["duration"] = _duration(spec, value)
            elif name == "by":
                number = value.rstrip("%")
                try:
                    fields["by"] = float(number) / (100 if value.endswith("%") else 1)
                except ValueError:
                    raise IncidentError(f"{spec!r}: by={value} is not a number") from None
            elif name in ("campaign", "channel"):
                fields[name] = value
            elif name == "type":
                fields["event_type"] = value
            else:
                raise IncidentError(f"{spec!r}: unknown field {name!r}")
        by = fields.get("by", 0.4)
        if kind not in RISES and not 0 < by <= 1:
            raise IncidentError(f"{spec!r}: a drop must be between 0% and 100%")
        if kind in RISES and not by > 0:
            raise IncidentError(f"{spec!r}: a rise must be above 0%")
        return cls(**fields)


def load_scenario(path: Path) -> list[Incident]:
    """A YAML list of incident specs (strings) or mappings with the same fields."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, list):
        raise IncidentError(f"{path}: expected a list of incidents")
    incidents = []
    for item in data:
        if isinstance(item, str):
            incidents.append(Incident.parse(item))
        elif isinstance(item, dict):
            spec = ":".join([str(item.pop("kind", ""))] + [f"{k}={v}" for k, v in item.items()])
            incidents.append(Incident.parse(spec))
        else:
            raise IncidentError(f"{path}: each incident is a string or a mapping")
    return incidents


@dataclass
class Campaign:
    id: str
    channel: str
    weight: float
    ctr: float
    lead_rate: float
    conversion_rate: float
    cpm: float
    cpc: float
    aov: float
    fee_cpm: float  # reported in bulk by spend events, per 1000 impressions served
    accrued: float = 0.0  # fees since the last spend report


@dataclass
class SimConfig:
    """What to simulate. ``rate`` is the mean total events/s at the daily mean."""

    seed: int = 1
    campaigns: int = 20
    rate: float = 200.0
    duplicate_rate: float = 0.01
    slightly_late_rate: float = 0.01
    out_of_order_rate: float = 0.005
    late_rate: float = 0.002
    orders_by_click_only: float = 0.7
    currency_mix: bool = True
    incidents: list[Incident] = field(default_factory=list)
    diurnal: bool = True
    spend_report_s: int = 600  # spend reports cover clock-aligned periods of this length
    spend_report_delay_s: float = 180.0  # ... and arrive up to this long after the period


def diurnal_factor(ts_s: float) -> float:
    """Traffic relative to the daily mean: low at night, peaking mid-afternoon (UTC)."""
    hour = (ts_s % 86400) / 3600
    return 1 + 0.6 * math.sin((hour - 8) / 24 * 2 * math.pi)


class Simulator:
    """Yields ``(type, event)`` in emission order, one tick per second of event time."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        rng = self.rng
        self.campaigns = [
            Campaign(
                id=f"c{i}",
                channel=CHANNELS[i % len(CHANNELS)],
                weight=1 / (i + 1) ** 0.8,
                ctr=rng.uniform(0.01, 0.05),
                lead_rate=rng.uniform(0.05, 0.15),
                conversion_rate=rng.uniform(0.02, 0.06),
                cpm=rng.uniform(1, 8),
                cpc=rng.uniform(0.2, 2.0),
                aov=rng.uniform(30, 120),
                fee_cpm=rng.uniform(5, 20),
            )
            for i in range(config.campaigns)
        ]
        total = sum(c.weight for c in self.campaigns)
        for c in self.campaigns:
            c.weight /= total
        self._pending: list[tuple[float, int, str, dict[str, Any]]] = []
        self._seq = 0
        self.origin: float | None = None  # incidents' "at" counts from here

    def _factor(self, kind: str, offset: float, c: Campaign) -> float:
        factor = 1.0
        for inc in self.config.incidents:
            if inc.kind == kind and inc.active(offset, c.id, c.channel):
                factor *= (1 + inc.by) if kind in RISES else (1 - inc.by)
        return factor

    def _silenced(self, kind: str, offset: float, c: Campaign) -> bool:
        return any(
            inc.kind == "tracking_outage"
            and (inc.event_type is None or inc.event_type == kind)
            and inc.active(offset, c.id, c.channel)
            for inc in self.config.incidents
        )

    def _event(self, kind: str, ts_ms: int, c: Campaign, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        body: dict[str, Any] = {"event_id": f"{kind[0]}{self.config.seed}-{self._seq}", "ts": ts_ms}
        body["channel"] = c.channel
        return {**body, **fields}

    def _push(self, due_s: float, kind: str, event: dict[str, Any]) -> None:
        self._seq += 1
        heapq.heappush(self._pending, (due_s, self._seq, kind, event))

    def events(self, start_s: float, seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """Events emitted during ``seconds`` ticks from ``start_s`` (epoch seconds).

        Successive calls continue one stream; incidents count from the first call.
        """
        rng, cfg = self.rng, self.config
        if self.origin is None:
            self.origin = start_s
        # Impressions dominate; clicks, leads, orders and spend add about 6%.
        impressions_per_s = cfg.rate / 1.06
        for tick in range(seconds):
            now_s = start_s + tick
            offset = now_s - self.origin
            base = impressions_per_s * (diurnal_factor(now_s) if cfg.diurnal else 1)
            for c in self.campaigns:
                n = _poisson(rng, base * c.weight * self._factor("budget_overrun", offset, c))
                spend_factor = self._factor("spend_spike", offset, c)
                ctr = c.ctr * self._factor("ctr_drop", offset, c)
                for _ in range(n):
                    ts = int((now_s + rng.random()) * 1000)
                    self._push(now_s, "impression", self._event(
                        "impression", ts, c, campaign_id=c.id,
                        cost=round(c.cpm / 1000 * spend_factor, 6)))  # fmt: skip
                    if rng.random() < ctr:
                        self._click(c, ts, offset, spend_factor)
                c.accrued += n * c.fee_cpm / 1000 * spend_factor
                if int(now_s) % cfg.spend_report_s == 0:
                    self._report_spend(c, now_s)
            while self._pending and self._pending[0][0] <= now_s + 1:
                _, _, kind, event = heapq.heappop(self._pending)
                owner = self._campaign_of(event)
                if owner is not None and self._silenced(kind, offset, owner):
                    continue
                yield from self._deliver(kind, event)

    def _report_spend(self, c: Campaign, period_end_s: float) -> None:
        """The period's fees as one lump, stamped when the (delayed) report arrives.

        Periods are aligned to the clock, not to the calls of ``events``: a stream
        produced second by second or minute by minute gets the same reports.
        """
        amount, c.accrued = round(c.accrued, 2), 0.0
        if amount <= 0:
            return
        due = period_end_s + self.rng.uniform(0, self.config.spend_report_delay_s)
        event = self._event("spend", int(due * 1000), c, campaign_id=c.id, amount=amount)
        self._push(due, "spend", event)

    def _click(self, c: Campaign, ts: int, offset: float, spend_factor: float) -> None:
        rng = self.rng
        click_id = f"k{self.config.seed}-{self._seq + 1}"
        cost = round(c.cpc * spend_factor * rng.uniform(0.8, 1.2), 4)
        self._push(ts / 1000, "click", self._event(
            "click", ts, c, campaign_id=c.id, click_id=click_id, cost=cost))  # fmt: skip
        if rng.random() < c.lead_rate:
            delay = rng.uniform(20, 300)
            lead = self._event("lead", ts + int(delay * 1000), c, click_id=click_id,
                               user_id=f"u{rng.randrange(10**6)}")  # fmt: skip
            self._attribute(lead, c)
            self._push(ts / 1000 + delay, "lead", lead)
        if rng.random() < c.conversion_rate * self._factor("conversion_drop", offset, c):
            delay = rng.uniform(30, 600)
            order_id = f"A{self.config.seed}-{self._seq + 1}"
            revenue = round(rng.lognormvariate(math.log(c.aov), 0.6), 2)
            order = self._event(
                "order", ts + int(delay * 1000), c, click_id=click_id, order_id=order_id,
                revenue=revenue, customer_id=f"u{rng.randrange(10**6)}",
                new_customer=rng.random() < 0.3,
            )  # fmt: skip
            if self.config.currency_mix and rng.random() < 0.2:
                order["currency"] = "EUR"
                order["revenue"] = round(revenue / 1.1, 2)
            self._attribute(order, c)
            self._push(ts / 1000 + delay, "order", order)

    def _attribute(self, event: dict[str, Any], c: Campaign) -> None:
        if self.rng.random() >= self.config.orders_by_click_only:
            event["campaign_id"] = c.id
        else:
            del event["channel"]  # only the click id ties it to its campaign
            event["_campaign"] = c.id  # for incident matching only, stripped on delivery

    def _campaign_of(self, event: dict[str, Any]) -> Campaign | None:
        cid = event.get("campaign_id") or event.get("_campaign")
        index = int(str(cid)[1:]) if cid else -1
        return self.campaigns[index] if 0 <= index < len(self.campaigns) else None

    def _deliver(self, kind: str, event: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        rng, cfg = self.rng, self.config
        event.pop("_campaign", None)
        roll = rng.random()
        if roll < cfg.late_rate:  # beyond the default dedup horizon of its type
            horizon = DEDUP_MINUTES[kind]
            event["ts"] = int(event["ts"]) - rng.randint(horizon + 2, horizon + 30) * 60_000
        elif roll < cfg.late_rate + cfg.slightly_late_rate:
            event["ts"] = int(event["ts"]) - rng.randint(60, 300) * 1000
        elif roll < cfg.late_rate + cfg.slightly_late_rate + cfg.out_of_order_rate:
            event["ts"] = int(event["ts"]) - rng.randint(5, 50) * 60_000
        if rng.random() < 0.5:
            event["ts"] = iso(int(event["ts"]))
        yield kind, event
        if rng.random() < cfg.duplicate_rate:
            yield kind, dict(event)


def iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds")


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    threshold, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= threshold:
            return k
        k += 1


def encode(kind: str, event: dict[str, Any], *, with_type: bool) -> bytes:
    import orjson

    return orjson.dumps({"type": kind, **event} if with_type else event)


async def produce_to_kafka(
    sim: Simulator,
    *,
    bootstrap: str,
    topics: dict[str, str],
    start_s: float,
    seconds: int | None,
    realtime: bool,
    shared_topic: str | None = None,
    progress: bool = True,
) -> int:
    """Send the simulated stream to Kafka; paced by the wall clock when ``realtime``.

    ``progress``: a progress bar on a terminal (off where another process prints to the
    same terminal, as the demo's worker does: its lines would be glued to the bar's).
    """
    import asyncio
    import time

    from aiokafka import AIOKafkaProducer
    from tqdm import tqdm

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20,
        enable_idempotence=True,
    )  # fmt: skip
    await producer.start()
    sent = 0
    bar = tqdm(total=seconds, unit="s", desc="simulated", disable=None if progress else True,
               mininterval=1)  # fmt: skip
    try:
        chunk = 1 if realtime else 60
        tick = 0
        while seconds is None or tick < seconds:
            span = chunk if seconds is None else min(chunk, seconds - tick)
            pending = []
            for kind, event in sim.events(start_s + tick, span):
                topic = shared_topic or topics[kind]
                key = event.get("campaign_id")
                value = encode(kind, event, with_type=shared_topic is not None)
                pending.append(await producer.send(
                    topic, value, key=key.encode() if isinstance(key, str) else None))  # fmt: skip
                sent += 1
            await asyncio.gather(*pending)
            tick += span
            bar.update(span)
            bar.set_postfix(events=sent, refresh=False)
            if realtime:
                await asyncio.sleep(max(0.0, start_s + tick - time.time()))
    finally:
        bar.close()
        await producer.stop()
    return sent


def write_jsonl(sim: Simulator, path: Path, *, start_s: float, seconds: int) -> int:
    from tqdm import tqdm

    n = 0
    with (
        path.open("wb") as out,
        tqdm(total=seconds, unit="s", desc="simulated", disable=None) as bar,
    ):
        for tick in range(0, seconds, 60):
            span = min(60, seconds - tick)
            for kind, event in sim.events(start_s + tick, span):
                out.write(encode(kind, event, with_type=True) + b"\n")
                n += 1
            bar.update(span)
    return n
