"""What the parts of one worker share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sink.config import Config
from sink.operations.metrics import Metrics
from sink.operations.vitals import Vitals
from sink.pipeline.topics import TopicKeys
from sink.stores.dedup import DedupStore
from sink.stores.keys import DedupKeys


@dataclass(frozen=True)
class Context:
    """One worker's configuration, its topics' storage keys, its dedup store (None when dedup
    is off) and the keys it writes there, and where it reports: metrics, vitals, log."""

    config: Config
    topics: TopicKeys
    store: DedupStore | None
    keys: DedupKeys
    metrics: Metrics
    vitals: Vitals
    log: Any
