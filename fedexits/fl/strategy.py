"""Flower's strategies over the exit parameters, with reproducible client sampling and federated
evaluation on clients kept out of training.

Flower samples nodes with an unseeded RNG from every connected node; here each training round's
participants are drawn by our seeded generator from the training clients, and evaluation goes to
a fixed set of evaluation clients. Flower's own `configure_*` and `aggregate_*` run unchanged (the
update rules of FedAvg, FedProx, FedAdam, FedYogi and FedAdagrad are Flower's): they only see the
chosen nodes, and replies reach them in the sampled order, so the federated exits are identical
for the same seed. BatchNorm statistics in the exits are averaged (FedAvg) under every strategy:
a server optimiser's step on a running variance can make it negative.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from ..errors import DataError
from ..study.config import StrategyConfig
from .client_app import EVALUATE_EXITS


class _OnlyNodes:
    """A Grid that shows Flower's sampler only the nodes we chose."""

    def __init__(self, grid: Grid, nodes: Sequence[int]):
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name):
        return getattr(self._grid, name)


def mean_over_clients(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Evaluation metrics as the mean over clients (each user counts once, as in the report's
    per-user means), not weighted by their number of images."""
    metrics = [next(iter(record.metric_records.values())) for record in records]
    keys = [key for key in metrics[0] if key != weighted_by_key]
    mean = {key: float(np.mean([float(m[key]) for m in metrics])) for key in keys}
    return MetricRecord({**mean, "clients": len(metrics)})


class SeededSampling:
    """Mixin for a Flower strategy (put it first in the bases).

    `train_nodes` and `eval_nodes` must be in a reproducible order (by partition id: node ids are
    random in simulation). Training rounds sample `clients_per_round` of `train_nodes` with
    `seed`; evaluation runs on every one of `eval_nodes` after the rounds in `eval_rounds`.
    `buffer_keys` name the arrays that are running statistics (averaged, never stepped).
    """

    def __init__(
        self,
        train_nodes: Sequence[int],
        clients_per_round: int,
        seed: int,
        eval_nodes: Sequence[int] = (),
        eval_rounds: Iterable[int] = (),
        buffer_keys: Iterable[str] = (),
        **flower_settings,
    ):
        if not train_nodes:
            raise DataError("federated exit training needs at least one client in the global population")
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            evaluate_metrics_aggr_fn=mean_over_clients,
            **flower_settings,
        )
        self.train_nodes, self.eval_nodes = list(train_nodes), list(eval_nodes)
        self.clients_per_round = clients_per_round
        self.eval_rounds = set(eval_rounds)
        self.buffer_keys = set(buffer_keys)
        self.rng = random.Random(seed)
        self.sampled: dict[int, list[int]] = {}  # round -> node ids, for the record
        self.samples: dict[int, int] = {}  # round -> images of the clients that replied
        self.replied: dict[int, int] = {}  # round -> clients that trained
        self.cached: dict[int, int] = {}  # round -> clients whose features were kept from before
        self.errors: list[tuple[int, str]] = []  # (round, reason) of clients that failed to train
        self.eval_errors: list[tuple[int, str]] = []  # (round, reason) of failed evaluations
        self.on_round: Callable[[int], None] | None = None  # called after each aggregation (progress)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        chosen = self.rng.sample(self.train_nodes, self.clients_per_round)
        self.sampled[server_round] = chosen
        return super().configure_train(server_round, arrays, config, _OnlyNodes(grid, chosen))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Flower's aggregation over replies in the sampled order; failed clients are kept for
        the report; BatchNorm statistics averaged; every array keeps the dtype it was sent in."""
        replies = self._in_order(replies, self.sampled[server_round])
        self.errors += [(server_round, r.error.reason) for r in replies if r.has_error()]
        ok = [r.content for r in replies if not r.has_error()]
        self.replied[server_round] = len(ok)
        self.samples[server_round] = sum(int(c["metrics"]["num-examples"]) for c in ok)
        self.cached[server_round] = sum(int(c["metrics"]["features-cached"]) for c in ok)
        dtypes = {k: a.numpy().dtype for k, a in ok[0][self.arrayrecord_key].items()} if ok else {}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.on_round is not None:
            self.on_round(server_round)
        if arrays is None:
            return arrays, metrics
        values = {key: array.numpy() for key, array in arrays.items()}
        if self.buffer_keys & set(values):
            averaged = aggregate_arrayrecords(ok, self.weighted_by_key)
            values.update({key: averaged[key].numpy() for key in self.buffer_keys & set(values)})
        return ArrayRecord({key: Array(_as_dtype(v, dtypes[key])) for key, v in values.items()}), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if server_round not in self.eval_rounds:
            return []
        return self.evaluation_messages(server_round, arrays, config, grid)

    def evaluation_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's evaluate messages to every evaluation client, as the exits action."""
        if not self.eval_nodes:
            return []
        messages = super().configure_evaluate(server_round, arrays, config, _OnlyNodes(grid, self.eval_nodes))
        return [
            Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=EVALUATE_EXITS)
            for m in messages
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = self._in_order(replies, self.eval_nodes)
        self.eval_errors += [(server_round, r.error.reason) for r in replies if r.has_error()]
        return super().aggregate_evaluate(server_round, replies)

    @staticmethod
    def _in_order(replies: Iterable[Message], nodes: list[int]) -> list[Message]:
        order = {node: i for i, node in enumerate(nodes)}
        return sorted(replies, key=lambda r: order.get(r.metadata.src_node_id, len(order)))


def _as_dtype(value, dtype: np.dtype) -> np.ndarray:
    """An aggregated array back in the dtype it was sent in (Flower's arithmetic makes float64;
    integer counters are rounded)."""
    value = np.asarray(value)
    if np.issubdtype(dtype, np.integer):
        value = np.rint(value)
    return np.asarray(value, dtype=dtype)


class SeededFedAvg(SeededSampling, FedAvg):
    """Federated averaging (McMahan et al., 2017)."""


class SeededFedProx(SeededSampling, FedProx):
    """FedAvg on the server; clients add the proximal term (Li et al., 2020)."""


class SeededFedAdam(SeededSampling, FedAdam):
    """Server-side Adam on the clients' mean update (Reddi et al., 2021)."""


class SeededFedYogi(SeededSampling, FedYogi):
    """Server-side Yogi on the clients' mean update (Reddi et al., 2021)."""


class SeededFedAdagrad(SeededSampling, FedAdagrad):
    """Server-side Adagrad on the clients' mean update (Reddi et al., 2021)."""


SEEDED_STRATEGIES = {
    "fedavg": SeededFedAvg,
    "fedprox": SeededFedProx,
    "fedadam": SeededFedAdam,
    "fedyogi": SeededFedYogi,
    "fedadagrad": SeededFedAdagrad,
}


def make_strategy(config: StrategyConfig, client_lr: float, **seeded) -> SeededSampling:
    """The seeded Flower strategy named by `config`, with its own settings (`seeded`: see
    `SeededSampling`)."""
    settings: dict = {}
    if config.name == "fedprox":
        settings = dict(proximal_mu=config.proximal_mu)
    elif config.name == "fedadagrad":
        settings = dict(eta=config.server_lr, eta_l=client_lr, tau=config.tau)
    elif config.name in ("fedadam", "fedyogi"):
        settings = dict(
            eta=config.server_lr, eta_l=client_lr, beta_1=config.beta_1, beta_2=config.beta_2, tau=config.tau
        )
    return SEEDED_STRATEGIES[config.name](**seeded, **settings)
