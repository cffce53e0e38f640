"""A Flower strategy for any ServerApp: :class:`FedBayes`, every decision the fedbayes server rule's.

Used as Flower's own strategies are::

    strategy = FedBayes(rule="bayes-admm", local={"lr": 0.1, "epochs": 1}, fraction_evaluate=0.5)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()), num_rounds=3,
                            evaluate_fn=global_evaluate)

and the ClientApp answers its train messages with :func:`fedbayes.flower.train`.

**The rule** is a registered name (``"bayes-admm"``, ``"fedavg"``, … with its hyperparameters in ``config``, the
paper's names: ``config={"rho": 0.5}``), a rule's config object (``BayesADMM.Config(rho=0.5)``), a rule class, or
a built rule (:class:`fedbayes.algorithms.Algorithm`; its parameter names and shapes must be the initial arrays').
A name or config is built in :meth:`FedBayes.start`, from the initial arrays (the model's parameters, in the order
of ``named_parameters()``: an ``ArrayRecord`` of a ``state_dict`` of a model without buffers) and the number of
clients (``num_clients``, default: the nodes online when the run starts, at least ``min_nodes``).

**The round** is :class:`fedbayes.rounds.Round`, the policy the in-process engine runs too; this class only moves
its messages through Flower:

1. ``configure_train``: for every participant k of the round (``fraction_train`` of the clients, seeded by
   (seed, round)), ``Round.job(k)`` (the rule's prior for k, encoded, and k's ConfigRecord: the local settings,
   the round's seed, ``reply`` = site or mean) becomes one Message to k's node (ArrayRecords ``prior.eta``,
   ``prior.prec``, optional ``start.mean``/``start.prec``; the ``config`` ConfigRecord; and ``arrays``, the
   global model, as Flower's strategies send it: a ClientApp written for FedAvg that loads
   ``msg.content["arrays"]`` into its model before training keeps working, and Flower's mods that read it do
   too; fedbayes' client ignores it, so it costs one copy of the parameters down and changes nothing else,
   ``bytes_down`` counts the wire format only).  ``train_config``
   entries that are local settings (``lr``, ``epochs``, ``batch-size``, ``mode``, …: Flower apps pass the
   learning rate there) set the local settings as ``local=`` does; the others travel in every train message.
2. ``aggregate_train``: the replies within ``timeout`` go to ``Round.receive`` (validated before they touch state;
   a ClientApp error or an invalid reply makes a failed client, with its reason), then ``Round.aggregate``.  The
   arrays it returns are the rule's global mean (in the initial arrays' dtypes), what ``evaluate_fn``, the
   federated evaluation and ``Result.arrays`` get.
3. ``configure_evaluate``/``aggregate_evaluate``: as Flower's FedAvg (``fraction_evaluate`` of the nodes get an
   ``arrays`` ArrayRecord and ``config``; numeric metrics averaged weighted by ``num-examples``).
4. The ``evaluate_fn`` given to :meth:`FedBayes.start` (the app's own, called as Flower calls it) gives the
   round's metrics row its evaluation; the row (the in-process engine's keys: ``train_loss``, ``bytes_up``,
   ``participants``, ``failed``, …) is kept in :attr:`FedBayes.rows` and, with a results folder ``out``, written
   as the engine writes it (``config.json``, ``metrics.jsonl``, ``posterior.safetensors``, ``checkpoint/``).

**Client identity.** Client k is the k-th node id online at the start (sorted), fixed for the run: a stateful rule
(bayes-admm's duals, PVI's sites) needs each node to stay the same client.  This project's own ServerApp binds
nodes by their node config's ``partition-id`` instead (:class:`server.strategy.FedBayesStrategy` overrides
:meth:`FedBayes.bind_nodes`), which survives a restarted SuperNode.

**Resume.** ``out=...`` with ``resume=True`` continues the run whose checkpoint is in ``out`` (:mod:`fedbayes.resume`:
the strategy's settings must equal the checkpoint's but for ``num_rounds``, which may extend it); the rule's state
is restored and Flower's rounds 1, 2, … are the rounds after the checkpoint's (``start_round``), so seeds and
participants are those of the uninterrupted run.  Without ``resume`` a folder that holds a run is refused unless
``overwrite=True``.  Flower's ``Strategy.start`` always counts from 1: every method maps Flower's round ``i`` to the
absolute round ``start_round + i - 1`` first.

**Replies that never come.** ``timeout`` goes to ``grid.send_and_receive``: missing clients are recorded in
``failed`` and keep their stale site/dual, exactly like a failure in the engine; the run goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedbayes.flower.records import ARRAYS_RECORD, CONFIG_RECORD, METRIC_RECORD, arrays_of, content_of, records_of

if TYPE_CHECKING:
    from fedbayes.algorithms import Algorithm, AlgorithmConfig
    from fedbayes.config import Experiment
    from fedbayes.local import LocalSettings
    from fedbayes.results import ResultsWriter
    from fedbayes.rounds import Round, RoundHost

__all__ = ["FedBayes", "Flight", "addressee", "rule_class"]

log = logging.getLogger("flwr")

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class Flight:
    """The Flower side of one round: which node got which client's message (the policy is :class:`Round`)."""

    round: Round
    sent: dict[int, int] = field(default_factory=dict)  # node id -> client
    messages: list[Message] = field(default_factory=list)  # the train messages (ids set by the grid on push)


def addressee(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply answers for: the destination of the message it replies to (a reply the SuperLink makes
    for an unavailable node comes from the SuperLink's own node id), else its sender."""
    by_id = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id}
    return by_id.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))


def _ordered(rec: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Parameter order as the model's (names missing or extra stay, for decode_reply to report)."""
    out = {k: rec[k] for k in names if k in rec}
    out.update({k: v for k, v in rec.items() if k not in out})
    return out


def _error_reason(reply: Message, node: int) -> str:
    if int(reply.metadata.src_node_id) == node:
        return f"the ClientApp failed: {reply.error.reason}"
    return f"no reply, the SuperLink says: {reply.error.reason} (code {reply.error.code})"


def rule_class(rule: Any, config: Mapping[str, Any] | None = None) -> tuple[type[Algorithm], AlgorithmConfig]:
    """The rule class and its validated hyperparameters from a name (+ ``config``), a config object or a class.

    Raises
    ------
    ValueError
        An unknown name (listing the valid ones), hyperparameters that do not validate (naming the key), a
        config given twice, or an object that is no rule.
    """
    from pydantic import ValidationError

    from fedbayes.algorithms import REGISTRY, Algorithm, AlgorithmConfig, get_algorithm

    if isinstance(rule, AlgorithmConfig):
        if config:
            raise ValueError("give the rule's hyperparameters either in its config object or in config=, not both")
        for cls in REGISTRY.values():
            if type(rule) is cls.Config:
                return cls, rule
        raise ValueError(f"{type(rule).__name__} is not the config of a registered rule ({list(REGISTRY)})")
    if isinstance(rule, str):
        cls = get_algorithm(rule)
    elif isinstance(rule, type) and issubclass(rule, Algorithm):
        cls = rule
    else:
        raise ValueError(f"rule must be a rule name ({list(REGISTRY)}), a rule's Config, a rule class or a built "
                         f"rule, got {type(rule).__name__}")
    try:
        return cls, cls.Config(**dict(config or {}))
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(str(p) for p in x['loc'])}: {x['msg']}" for x in e.errors())
        raise ValueError(f"invalid {cls.name} hyperparameters: {bad}") from None


def _local_keys(local: LocalSettings | Mapping[str, Any] | None) -> dict[str, Any]:
    """The user's local settings as run keys (kebab-case); fields the rule or the engine sets are refused."""
    from fedbayes.keys import kebab
    from fedbayes.local import RULE_KEYS, USER_KEYS, LocalSettings

    if local is None:
        return {}
    if isinstance(local, LocalSettings):
        given = local.model_dump(exclude_unset=True)
    else:
        given = {k.replace("-", "_"): v for k, v in dict(local).items()}
    ruled = sorted(k for k in given if k in RULE_KEYS)
    if ruled:
        raise ValueError(f"local settings {ruled} are set by the rule or the engine, not by the user")
    unknown = sorted(k for k in given if k not in USER_KEYS)
    if unknown:
        raise ValueError(f"unknown local settings {unknown}; valid: {list(USER_KEYS)}")
    return {kebab(k): v for k, v in given.items()}


def _preset_settings(preset: str, rule: Any, config: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rule's table of ``preset`` (its tuned settings) split into rule hyperparameters, under ``config``, and
    local settings (beneath ``local=`` and ``train_config``); the preset's base (dataset, rounds, …) is not used."""
    from fedbayes.keys import kebab
    from fedbayes.local import USER_KEYS
    from fedbayes.presets import load_preset

    if isinstance(rule, str):
        from fedbayes.algorithms import get_algorithm

        cls = get_algorithm(rule)
    elif isinstance(rule, type):
        cls = rule
    else:
        raise ValueError("preset= needs the rule as a name or a class (a config object carries its own settings)")
    table = dict(load_preset(preset).algorithms.get(cls.name, {}))
    user = {k.replace("_", "-"): v for k, v in dict(config or {}).items()}
    for keys in cls.Config.alternative_keys:  # the user's rho replaces the preset's rho-k, as in presets
        if any(k in user for k in keys):
            for k in keys:
                table.pop(k, None)
    local_keys = {kebab(k) for k in USER_KEYS}
    rule_cfg = {k: v for k, v in table.items() if k not in local_keys}
    return {**rule_cfg, **user}, {k: v for k, v in table.items() if k in local_keys}


class FedBayes(Strategy):
    """A Flower strategy whose every decision is a fedbayes server rule's (module docstring).

    Parameters
    ----------
    rule
        A rule name (``"bayes-admm"``, ``"fedavg"``, ``"fedprox"``, …), its config object, its class, or a built
        rule.
    config
        The rule's hyperparameters, with a rule name or class (kebab- or snake-case keys, the paper's names).
    local
        The clients' local settings (:class:`fedbayes.local.LocalSettings` or a mapping: ``lr``, ``epochs``,
        ``batch-size``, ``mode``, …); unset ones are the rule's defaults.
    num_clients
        K, the number of clients (each a node); None: the nodes online at the start.
    fraction_train
        The fraction of clients asked to train each round (or, > 1, their number); seeded by (seed, round).
    fraction_evaluate
        The fraction of nodes asked to evaluate the global mean each round (0: no federated evaluation).
    min_nodes
        With ``num_clients`` None: wait for at least this many nodes.
    seed
        Seeds the participants and each client's local training.
    lr_schedule
        ``"constant"`` or ``"cosine"`` (over the run's rounds).
    out
        A results folder (None: keep the rows in memory only).
    resume
        Continue the run whose checkpoint is in ``out``.
    overwrite
        Replace a run already in ``out`` (otherwise refused, with nothing touched).
    node_wait_s
        How long :meth:`start` waits for the nodes.
    preset
        Take the rule's tuned settings from this preset's table for the rule (``"fmnist-10-het"``: tuned on
        Fashion-MNIST; ``fedbayes presets`` lists them): its hyperparameters under ``config`` and its local
        settings beneath ``local`` and ``train_config``; the preset's base (dataset, rounds, epochs) is not used.
        None: the rule's code defaults.
    """

    def __init__(
        self,
        rule: Any = "bayes-admm",
        *,
        config: Mapping[str, Any] | None = None,
        local: LocalSettings | Mapping[str, Any] | None = None,
        num_clients: int | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_nodes: int = 2,
        seed: int = 0,
        lr_schedule: str = "constant",
        out: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        node_wait_s: float = 60.0,
        preset: str | None = None,
    ) -> None:
        from fedbayes.algorithms import Algorithm

        if num_clients is not None and num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate}")
        if resume and out is None:
            raise ValueError("resume=True needs the results folder out= of the run to continue")
        self._built: Algorithm | None = rule if isinstance(rule, Algorithm) else None
        if self._built is not None:
            if config:
                raise ValueError("a built rule carries its hyperparameters: config= is not used with it")
            self._rule_cls, self._rule_cfg = type(self._built), self._built.config
            if preset is not None:
                raise ValueError("a built rule carries its hyperparameters: preset= is not used with it")
        self._preset_local: dict[str, Any] = {}
        if self._built is None:
            if preset is not None:
                config, self._preset_local = _preset_settings(preset, rule, config)
            self._rule_cls, self._rule_cfg = rule_class(rule, config)
        self._local = _local_keys(local)
        self._run_keys: dict[str, Any] = {"clients-per-round": fraction_train, "seed": seed,
                                          "lr-schedule": lr_schedule}
        self.num_clients = num_clients
        self.fraction_evaluate = fraction_evaluate
        self.min_nodes = min_nodes
        self.out = Path(out).resolve() if out is not None else None
        self.resume = resume
        self.overwrite = overwrite
        self.node_wait_s = node_wait_s
        self._exp: Experiment | None = None
        self._rule: Algorithm | None = None
        self.writer: ResultsWriter | None = None
        self.start_round = 1
        self.rows: list[dict[str, Any]] = []
        self._node_of: dict[int, int] = {}  # client -> Flower node id
        self._round: Flight | None = None
        self._dtypes: dict[str, Any] = {}
        self._train_extra: dict[str, Any] = {}
        self._user_evaluate: EvaluateFn | None = None
        self.t_start = time.perf_counter()
        self.wall_before = 0.0

    # -- what the round policy needs (RoundHost) ----------------------------------------------------
    @property
    def exp(self) -> Experiment:
        """The run's keys (built by :meth:`start`)."""
        if self._exp is None:
            raise RuntimeError("the run is built by start(): call strategy.start(grid=..., initial_arrays=...)")
        return self._exp

    @exp.setter
    def exp(self, value: Experiment) -> None:
        self._exp = value

    @property
    def rule(self) -> Algorithm:
        """The server rule (built by :meth:`start` unless a built rule was given)."""
        if self._rule is None:
            raise RuntimeError("the rule is built by start(): call strategy.start(grid=..., initial_arrays=...)")
        return self._rule

    @rule.setter
    def rule(self, value: Algorithm) -> None:
        self._rule = value

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.rule.shapes)

    def client_examples(self, client: int) -> int | None:
        """A reply's ``num-examples`` is not checked here (the app's data is the app's)."""
        return None

    def round_host(self) -> RoundHost:
        """What :class:`fedbayes.rounds.Round` runs on."""
        return self

    def absolute(self, server_round: int) -> int:
        """Flower's round counter (1, 2, … in this run; 0 before the first round) -> the run's round."""
        return server_round + self.start_round - 1 if server_round > 0 else 0

    @property
    def num_rounds(self) -> int:
        """How many rounds ``Strategy.start`` must still run: ``start_round..rounds``."""
        return 0 if self._exp is None else max(0, self.exp.run.rounds - self.start_round + 1)

    # -- setup ----------------------------------------------------------------------------------------
    @property
    def node_of(self) -> dict[int, int]:
        """Client -> Flower node id of the nodes bound so far."""
        return self._node_of

    def bind_nodes(self, grid: Grid, wait_s: float | None = None) -> None:
        """Clients 0..K−1 are the K smallest node ids online (waiting up to ``wait_s``, default ``node_wait_s``,
        for K nodes, or for ``min_nodes`` when ``num_clients`` is None); sets :attr:`num_clients`.

        Raises
        ------
        RuntimeError
            Too few nodes after ``node_wait_s``.
        """
        want = self.num_clients or self.min_nodes
        wait_s = self.node_wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        nodes = sorted(int(n) for n in grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) < want:
            raise RuntimeError(f"{len(nodes)} node(s) online after {wait_s:.0f} s, {want} needed "
                               f"(num_clients={self.num_clients}, min_nodes={self.min_nodes})")
        k = self.num_clients or len(nodes)
        self.num_clients = k
        self._node_of = dict(enumerate(nodes[:k]))
        log.info("fedbayes: clients 0..%d are nodes %s", k - 1, [self.node_of[c] for c in range(k)])

    def experiment(self, num_rounds: int) -> Experiment:
        """The run's keys as an :class:`~fedbayes.config.Experiment` (what the round policy and the results folder
        use); ``ConfigError`` naming a bad key."""
        from fedbayes.config import resolve

        assert self.num_clients is not None
        flat = {"algorithm": self._rule_cls.name, "num-clients": self.num_clients, "rounds": num_rounds,
                **self._run_keys, **self._preset_local, **self._local,
                **self._rule_cfg.model_dump(by_alias=True, mode="json")}
        return resolve(flat)

    def _build(self, initial_arrays: ArrayRecord, num_rounds: int) -> ArrayRecord:
        """Build (or check) the rule from the initial arrays, restore a checkpoint, open the results folder;
        return the arrays round 1 starts from."""
        import torch

        from fedbayes.algorithms.store import MemoryStore
        from fedbayes.results import CheckpointError, ResultsWriter, check_new_run
        from fedbayes.resume import load_resume, prepare_folder

        template = {k: v.detach() for k, v in initial_arrays.to_torch_state_dict().items()}
        bad = [k for k, v in template.items() if not torch.is_floating_point(v)]
        if bad:
            raise ValueError(f"initial_arrays {bad} are not floating point: pass the model's parameters only "
                             "(a model with buffers: ArrayRecord(dict(net.named_parameters())))")
        self._dtypes = {k: v.dtype for k, v in template.items()}
        exp = self.experiment(num_rounds)
        resume = None
        if self.resume and self.out is not None:
            resume = load_resume(self.out, exp)  # CheckpointError / ConfigError: nothing touched
            exp = resume.exp
        elif self.out is not None:
            check_new_run(self.out, self.overwrite)
        if self._built is not None:
            rule = self._built
            shapes = {k: tuple(v.shape) for k, v in template.items()}
            if dict(rule.shapes) != shapes or rule.K != self.num_clients:
                raise ValueError(f"the built rule has {rule.K} clients and parameters {dict(rule.shapes)}, the run "
                                 f"{self.num_clients} clients and initial arrays {shapes}")
        else:
            rule = self._rule_cls(template, exp.run.num_clients, exp.algo, store=MemoryStore(),
                                  participants=exp.run.participants_per_round())
        if resume is not None:
            try:
                resume.load_into(rule)
            except CheckpointError:
                raise
            except (KeyError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"cannot resume from {self.out}: the checkpoint's state does not fit the "
                                      f"model or rule: {e}") from None
            self.start_round, self.rows = resume.start_round, list(resume.rows)
            self.wall_before = float(self.rows[-1].get("wall_s", 0.0)) if self.rows else 0.0
        self.exp, self.rule = exp, rule
        if self.out is not None and self.num_rounds > 0:
            from fedbayes.provenance import provenance

            shapes_txt = {k: list(v.shape) for k, v in template.items()}
            self.writer = (prepare_folder(resume) if resume is not None
                           else ResultsWriter(self.out, exp.to_flat(), provenance=provenance(**{"model": shapes_txt})))
        return self.global_arrays() if resume is not None else initial_arrays

    def global_arrays(self) -> ArrayRecord:
        """The rule's global mean as an ``ArrayRecord``, in the initial arrays' dtypes."""
        mean = self.rule.global_mean()
        return arrays_of({k: v.to(self._dtypes.get(k, v.dtype)) for k, v in mean.items()})

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Run ``num_rounds`` rounds (with ``resume``: up to round ``num_rounds`` in all), as Flower's strategies.

        ``evaluate_fn(round, arrays)`` is the app's central evaluation (called before round 1 and after every
        round, as by Flower); its metrics go into the round's row.  ``timeout`` None waits for every reply.

        Raises
        ------
        ValueError
            Initial arrays that do not fit the rule, a ``train_config`` key that fedbayes sets itself (``seed``,
        ``reply``, …) or a local setting given twice.
        ConfigError, CheckpointError, RunExistsError
            Bad settings, a checkpoint that cannot be resumed, a used results folder; nothing is written.
        """
        from fedbayes.keys import kebab
        from fedbayes.local import USER_KEYS

        extra = dict(train_config or {})
        local = {k: v for k, v in extra.items() if k.replace("-", "_") in USER_KEYS}
        reserved = sorted(k for k in extra if k in ("reply", "round", "partition-id") or k.replace("-", "_")
                          in ("ess_scale", "prior_per_example", "signed_site", "seed", "device"))
        if reserved:
            raise ValueError(f"train_config keys {reserved} are set by fedbayes (the rule or the engine)")
        if local:
            if self._exp is not None:
                raise ValueError(f"train_config keys {sorted(local)} are local settings, but this strategy's run is "
                                 "already built: set them where it was built")
            both = sorted(k for k in local if kebab(k.replace("-", "_")) in self._local)
            if both:
                raise ValueError(f"local settings {both} given both in local= and in train_config")
            self._local.update(_local_keys(local))
        self._train_extra = {k: v for k, v in extra.items() if k not in local}
        self._user_evaluate = None if evaluate_fn == self.evaluate else evaluate_fn  # rows are always recorded
        start_arrays = initial_arrays
        if self._exp is None:  # built here (this project's app builds its federation before)
            if not self.node_of:
                self.bind_nodes(grid)
            start_arrays = self._build(initial_arrays, num_rounds)
            self.t_start = time.perf_counter()
        if self.num_rounds == 0:
            log.info("fedbayes: the checkpoint already holds all %d rounds: nothing to do", num_rounds)
            return Result(arrays=start_arrays)
        return self.run(grid, start_arrays, timeout, evaluate_config)

    def run(self, grid: Grid, start_arrays: ArrayRecord, timeout: float | None,
            evaluate_config: ConfigRecord | None = None) -> Result:
        """Flower's ``Strategy.start`` over the remaining rounds (the rule is built)."""
        return super().start(grid=grid, initial_arrays=start_arrays, num_rounds=self.num_rounds,
                             timeout=timeout,  # type: ignore[arg-type]  # send_and_receive takes None: no deadline
                             evaluate_config=evaluate_config, evaluate_fn=self.evaluate)

    # -- the Strategy interface ---------------------------------------------------------------------
    def summary(self) -> None:
        run = self._exp.run if self._exp is not None else None
        log.info("\t├── fedbayes rule: %s (%s)", self._rule_cls.name, self._rule_cls.summary)
        if run is not None:
            log.info("\t├── %d clients, nodes bound: %d", run.num_clients, len(self.node_of))
            if self.start_round > 1:
                log.info("\t└── resumed: rounds %d..%d (Flower's rounds 1..%d)", self.start_round, run.rounds,
                         self.num_rounds)
            else:
                log.info("\t└── rounds 1..%d", run.rounds)

    def train_message_config(self) -> dict[str, Any]:
        """What every train message's ConfigRecord carries besides the client's local settings."""
        return dict(self._train_extra)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per chosen client, to its node, with the client's own prior (and ``arrays``, the global
        model, as Flower's strategies send it)."""
        from fedbayes.rounds import Round

        server_round = self.absolute(server_round)
        if self.start_round > 1:
            log.info("round %d of %d", server_round, self.exp.run.rounds)
        self.refresh_nodes(grid)
        flight = Flight(Round(self.round_host(), server_round))
        extra = self.train_message_config()
        for c in flight.round.chosen:
            node = self.node_of.get(c)
            job = flight.round.job(c, reachable=node is not None)  # no node for this client: absent
            if job is None or node is None:
                continue
            content = content_of(job.records, config={**extra, **job.config})
            content[ARRAYS_RECORD] = arrays  # the global model, as Flower's strategies send it (the client ignores it)
            msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
            flight.messages.append(msg)
            flight.sent[node] = c
        self._round = flight
        return flight.messages

    def refresh_nodes(self, grid: Grid) -> None:
        """Before each round: nothing here (the nodes bound at the start stay); this project's app re-queries."""

    def expected_examples(self, client: int) -> int | None:
        """What client k's reply must say for ``num-examples`` (None: not checked)."""
        return None

    def _receive(self, flight: Flight, reply: Message, node: int) -> None:
        """Hand one reply to the round: a ClientApp error or a wrong partition-id fails the client, an error the
        SuperLink makes for an unreachable node leaves it absent (like a timeout), anything else is decoded."""
        from fedbayes.protocol import InvalidReply, nbytes

        rnd, c = flight.round, flight.sent[node]
        if reply.has_error():
            reason = _error_reason(reply, node)
            if int(reply.metadata.src_node_id) == node:
                rnd.fail(c, reason)  # the ClientApp failed (e.g. diverged)
            else:
                log.warning("round %d: dropped reply of client %d: %s", rnd.server_round, c, reason)
            return
        records = records_of(reply.content)
        rnd.up += nbytes(records)
        metrics: dict[str, Any] = dict(reply.content.metric_records.get(METRIC_RECORD, {}))
        said = metrics.get("partition-id")
        if said != c:
            rnd.fail(c, f"invalid reply: {InvalidReply(f'reply says partition-id {said!r}, expected {c}')}")
            return
        names = list(self.rule.names)
        rnd.receive(c, {name: _ordered(rec, names) for name, rec in records.items()}, metrics,
                    expected_examples=self.expected_examples(c), counted=False)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand every reply to the round (validated once there), then ``rule.aggregate`` in the order of S."""
        server_round = self.absolute(server_round)
        flight = self._round
        if flight is None or flight.round.server_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train")
        replied: set[int] = set()
        for reply in replies:
            node = addressee(reply, flight.messages)
            if node not in flight.sent:
                log.warning("round %d: reply from unexpected node %d ignored", server_round, node)
                continue
            c = flight.sent[node]
            if c in replied:
                log.warning("round %d: second reply for client %d ignored", server_round, c)
                continue
            replied.add(c)
            self._receive(flight, reply, node)
        for c in flight.sent.values():
            if c not in replied:
                log.warning("round %d: no reply from client %d within round-timeout", server_round, c)
        updates = flight.round.aggregate()
        losses = [u.metrics.get("train-loss", float("nan")) for u in updates]
        metrics: dict[str, Any] = {"num-updates": len(updates), "num-failed": len(flight.round.failed)}
        if losses:
            metrics["train-loss"] = float(np.mean(losses))
        return self.global_arrays(), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """``fraction_evaluate`` of the bound nodes (seeded by (seed, round)) evaluate the global mean."""
        if self.fraction_evaluate <= 0 or not self.node_of or self._exp is None:
            return []
        r = self.absolute(server_round)
        nodes = [self.node_of[c] for c in sorted(self.node_of)]
        m = max(1, math.ceil(self.fraction_evaluate * len(nodes)))
        rng = np.random.default_rng([self.exp.run.seed, r, 0xE7A1])
        chosen = sorted(nodes[i] for i in rng.choice(len(nodes), size=min(m, len(nodes)), replace=False))
        cfg = ConfigRecord({**dict(config), "server-round": r})
        return [Message(RecordDict({"arrays": arrays, CONFIG_RECORD: cfg}), dst_node_id=n,
                        message_type=MessageType.EVALUATE, group_id=str(r)) for n in chosen]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Numeric metrics of the replies, averaged weighted by ``num-examples`` (as Flower's FedAvg)."""
        sums: dict[str, float] = {}
        total = 0.0
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: an evaluate reply failed: %s", self.absolute(server_round), reply.error.reason)
                continue
            for rec in reply.content.metric_records.values():
                n = rec.get("num-examples")
                if not isinstance(n, int | float) or n <= 0:
                    continue
                total += float(n)
                for k, v in rec.items():
                    if k != "num-examples" and isinstance(v, int | float) and not isinstance(v, bool):
                        sums[k] = sums.get(k, 0.0) + float(n) * float(v)
        if total == 0:
            return None
        return MetricRecord({k: v / total for k, v in sums.items()})

    def round_row(self, flight: Flight) -> dict[str, Any]:
        """The round's metrics row before the app's evaluation (no evaluation of its own: the data is the app's)."""
        return flight.round.row(lambda: self.wall_before + time.perf_counter() - self.t_start, evaluate=False)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """The ``evaluate_fn`` Flower calls: the app's own evaluation, then the round's row recorded (metrics,
        posterior and checkpoint with a results folder)."""
        from fedbayes.rounds import record_round

        absolute = self.absolute(server_round)
        user = self._user_evaluate(absolute, arrays) if self._user_evaluate is not None else None
        if absolute == 0:
            return user  # the engine has no round-0 row
        flight = self._round
        if flight is None or flight.round.server_round != absolute:
            raise RuntimeError(f"evaluate({absolute}) without a trained round")
        row = self.round_row(flight)
        if user is not None:
            row.update({k: v for k, v in dict(user).items() if k not in row})
        record_round(self.writer, self.rule, row, self.rows)
        shown = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        log.info("fedbayes: round %d: %s", absolute,
                 ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "round"))
        return MetricRecord({k: float(v) for k, v in shown.items() if math.isfinite(float(v))})
