"""FedAvg over the exit parameters, with client sampling reproducible from a seed.

Flower's FedAvg samples nodes with an unseeded RNG; here each round's participants are drawn by
our own seeded generator from a fixed list of node ids. Aggregation is Flower's own.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..errors import DataError


class SeededFedAvg(FedAvg):
    """FedAvg whose training rounds sample `clients_per_round` of `node_ids` with `seed`.

    `node_ids` must be in a reproducible order (by partition id: node ids themselves are random
    in simulation). Replies are aggregated in the sampled order, so floating-point sums, and
    therefore the federated exits, are identical for the same seed.
    """

    def __init__(self, node_ids: Sequence[int], clients_per_round: int, seed: int, **kwargs):
        if not node_ids:
            raise DataError("federated exit training needs at least one client in the global population")
        super().__init__(fraction_evaluate=0.0, min_available_nodes=1, **kwargs)
        self.node_ids = list(node_ids)
        self.clients_per_round = min(clients_per_round, len(self.node_ids))
        self.rng = random.Random(seed)
        self.sampled: dict[int, list[int]] = {}  # round -> node ids, for the record
        self.errors: list[tuple[int, str]] = []  # (round, reason) of failed clients

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        chosen = self.rng.sample(self.node_ids, self.clients_per_round)
        self.sampled[server_round] = chosen
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Flower's FedAvg aggregation; failed clients are kept for the report, not only logged."""
        order = {node: i for i, node in enumerate(self.sampled[server_round])}
        replies = sorted(replies, key=lambda r: order.get(r.metadata.src_node_id, len(order)))
        self.errors += [(server_round, r.error.reason) for r in replies if r.has_error()]
        return super().aggregate_train(server_round, replies)
