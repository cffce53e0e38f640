"""What every server rule is: a prior per client, the local settings it asks for, and an update of explicit state.

An algorithm here is two things only (DESIGN §2): which Gaussian prior πₖ = (η, s) to send to client k (and
where to start), and how to update the global state and the per-client sites/duals from the replies.  The
local problem is always :func:`fedbayes.local.train_local` under that prior; hyperparameters are mapped onto
(πₖ, local settings) by each module, whose docstring gives its equations and paper.

State is explicit and typed (:mod:`fedbayes.algorithms.state`): ``self.state``, the rule's ``GlobalState`` (the
global mean or posterior, FedDyn's h, …), and per client a ``ClientState`` (sites, duals, last means) read and
written with :meth:`Algorithm.client` / :meth:`Algorithm.set_client`; the flat ``prefix/param`` tensor names exist
only inside the client store (:class:`MemoryStore`, :class:`DiskStore`) and the checkpoint.
:meth:`Algorithm.state_tensors` flattens both, so a checkpoint is one safetensors file and a resumed run continues
bit for bit.  Replies are validated once, by :meth:`Algorithm.aggregate`, before the rule's :meth:`Algorithm.update`
sees them.

**Partial participation.** None of the reference implementations samples clients.  We choose the PVI /
FedDyn convention: an absent client keeps its last site, dual and local mean (stale), and every global
quantity sums or averages over **all K** clients — so a round with a subset S moves only the terms of S, and
full participation is the special case S = {1..K}.  A client that never replied contributes its initial
state (zero site/dual; for mean-based rules, the initial global mean).  K in α = 1/(1+ρK) is the total count.
"""

from __future__ import annotations

import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from fedbayes.algorithms.space import Dim
from fedbayes.algorithms.state import NoState, State
from fedbayes.algorithms.store import ClientStore, DiskStore, MemoryStore
from fedbayes.gaussian import DiagGaussian, Params
from fedbayes.keys import kebab

__all__ = [
    "Algorithm",
    "AlgorithmConfig",
    "ClientStore",
    "ClientTask",
    "ClientUpdate",
    "DiskStore",
    "KScaledRho",
    "MemoryStore",
    "PosteriorState",
    "split_clients",
]

G = TypeVar("G", bound=State)
C = TypeVar("C", bound=State)




class AlgorithmConfig(BaseModel):
    """Base of each algorithm's hyperparameters (kebab-case keys, unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid", alias_generator=kebab, populate_by_name=True, frozen=True)

    alternative_keys: ClassVar[tuple[tuple[str, ...], ...]] = ()
    """Groups of kebab-case keys that set one quantity in different ways and may not be given together (e.g.
    ``rho`` / ``rho-k``); a layered config (preset ← user) drops the lower layer's alternatives of a key the upper
    layer sets (:meth:`fedbayes.presets.Preset.config_for`)."""

    min_prec: float = 1e-8
    """Floor applied wherever a global precision is formed (it is inverted for the mean)."""


class KScaledRho(AlgorithmConfig):
    """ρ given either on the paper's scale (``rho``) or K-free as ``rho-k`` = nρ (ρ = rho-k / n).

    n is what makes the rule's behaviour depend on ρ only through nρ, so that ``rho-k`` transfers across
    federations; each rule's module says why.  Bayes-ADMM: n = K, the federation's size (its client problem and
    α = 1/(1 + ρK) depend on ρK, with Nₖ ≈ N/K).  FedLap and FedLap-Cov: n = |S|, the expected participants per
    round (``participates: ClassVar = True``): their global moves by ρ times the sum of the participants'
    displacements, so ρ|S| is the server step.  With full participation |S| = K; with 10 of 100 clients a round
    an n = K would shrink their step tenfold (on MNIST with 2 classes per client FedLap then stayed at 0.39 test
    accuracy after 50 rounds).  Setting both is an error; with neither, ``default_rho`` applies where the rule
    gives one (a ρ that does not move with n), else ``default_rho_k``.
    """

    default_rho_k: ClassVar[float] = 1.0
    default_rho: ClassVar[float | None] = None
    """The default ρ itself, at any n (Bayes-ADMM: measured to transfer better than a fixed nρ)."""
    participates: ClassVar[bool] = False
    """n = |S| (the expected participants per round) instead of K."""
    alternative_keys: ClassVar[tuple[tuple[str, ...], ...]] = (("rho", "rho-k"),)
    rho: float | None = Field(None, gt=0.0, description="ρ on the paper's scale (default: rho-k / K)")
    rho_k: float | None = Field(None, gt=0.0, description="nρ (ρ = rho-k / n; n = K or the participants "
                       "per round, as the rule says)")

    @model_validator(mode="after")
    def _one_rho(self) -> KScaledRho:
        if self.rho is not None and self.rho_k is not None:
            raise ValueError("set either 'rho' or 'rho-k' (= K·rho), not both")
        return self

    def effective_rho(self, num_clients: int, participants: int | None = None) -> float:
        """ρ = ``rho`` if given, else ``rho-k``/n (when neither is set: ``default_rho``, or ``default_rho_k``/n),
        n = ``participants`` (default all ``num_clients``) for a rule with ``participates``, else ``num_clients``."""
        if self.rho is not None:
            return float(self.rho)
        if self.rho_k is None and self.default_rho is not None:
            return float(self.default_rho)
        n = participants if self.participates and participants is not None else num_clients
        return (self.rho_k if self.rho_k is not None else self.default_rho_k) / n


@dataclass
class ClientTask:
    """What the server sends client k: its prior, an optional start point and local-setting overrides."""

    prior: DiagGaussian
    start_mean: Params | None = None
    start_prec: Params | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """A validated reply: the client's mean, its site (Bayesian rules and Laplace), Nₖ and metrics."""

    client: int
    num_examples: int
    mean: Params | None = None
    site: DiagGaussian | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PosteriorState(State):
    """The global state of the Bayesian rules: the posterior λ (stored as ``global``) and the round-1 start mean."""

    posterior: DiagGaussian = field(metadata={"key": "global"})
    start: Params | None = None


RECOMPUTE_EVERY = 32
"""Rules that keep running sums over their clients (so a round costs O(participants), not O(K)) recompute them
exactly from the client store every this many rounds, which bounds the float64 drift of the running updates
(measured: 1e-15 relative after 500 rounds of partial participation, tests/test_algorithms.py)."""


def recompute_due(server_round: int) -> bool:
    """Whether this round's aggregation recomputes the running sums from the client store."""
    return server_round % RECOMPUTE_EVERY == 0


# ---------------------------------------------------------------------------------------------- algorithm
class Algorithm(ABC, Generic[G, C]):
    """A federated server rule over natural parameters.

    Parameters
    ----------
    template
        The model's named parameters (names, shapes; values are the initial global mean).
    num_clients
        K, the total number of clients (global sums run over all K).
    config
        The algorithm's hyperparameters (an instance of ``Config``).
    store
        Per-client storage (in memory by default).
    active
        The clients that belong to the federation (default all K).  Clients outside it (``exclude-clients``,
        e.g. after ``fedbayes forget``) count nowhere: not in averages, not in K of α = 1/(1+ρK), not in sums.
    participants
        The expected number of clients per round, |S| (default: every active client).  Rules whose server
        step is ρ·|S| (FedLap, FedLap-Cov: ``rho-k`` is given per participant, :class:`KScaledRho`) read it.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    bayesian: ClassVar[bool] = False
    """Clients send sites; the global model is a posterior (BMA evaluation applies)."""
    signed_sites: ClassVar[bool] = False
    """Sites may have negative precisions; a reply is valid when the posterior it implies, sent prior + site,
    has precision > 0 (checked by :func:`fedbayes.protocol.decode_reply` given the prior)."""
    Config: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    GlobalState: ClassVar[type[State]]
    """The type of ``self.state``: the first type argument of ``Algorithm[GlobalState, ClientState]`` (set from the
    class statement by :meth:`__init_subclass__`, so a rule names its state types once)."""
    ClientState: ClassVar[type[State]] = NoState
    """The type of each client's state (:meth:`client`): the second type argument."""
    local_defaults: ClassVar[dict[str, Any]] = {"mode": "adam"}
    """Local settings this rule asks for (a user's explicit local settings override them)."""
    search_space: ClassVar[dict[str, Dim]] = {}
    """What ``fedbayes tune`` samples: flat kebab-case config keys -> ranges (:mod:`fedbayes.algorithms.space`);
    empty: the rule cannot be tuned.  Each module declares its own (a subclass does not inherit a meaningful one)."""

    removal_estimators: ClassVar[tuple[str, ...]] = ()
    """What-if (:mod:`fedbayes.whatif`): the names of this rule's estimators of a client's contribution to the
    global posterior, the default first; empty: the rule keeps no per-client contribution (point rules)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Read ``GlobalState`` and ``ClientState`` from the type arguments of ``class Rule(Algorithm[G, C])`` (a
        subclass of a rule inherits its parent's)."""
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is Algorithm:
                g, c = typing.get_args(base)
                if not (isinstance(g, type) and issubclass(g, State) and isinstance(c, type) and issubclass(c, State)):
                    raise TypeError(f"{cls.__name__}: Algorithm[GlobalState, ClientState] takes two State classes, "
                                    f"got {g!r}, {c!r}")
                cls.GlobalState, cls.ClientState = g, c

    def contributions(self, estimator: str) -> dict[int, DiagGaussian]:
        """Each client's contribution ĝₖ to the global posterior (by slot), so that λ₋S = λ − Σ_{k∈S} ĝₖ
        answers "without the clients S" (:func:`fedbayes.whatif.posterior_without`).  Rules that keep
        contributions override this and list their estimators in ``removal_estimators``."""
        raise NotImplementedError(f"'{self.name}' keeps no per-client contributions")

    def __init__(
        self,
        template: Mapping[str, Tensor],
        num_clients: int,
        config: AlgorithmConfig | None = None,
        store: ClientStore | None = None,
        active: Sequence[int] | None = None,
        participants: int | None = None,
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.active = sorted(set(active)) if active is not None else list(range(num_clients))
        if not self.active or not all(0 <= c < num_clients for c in self.active):
            raise ValueError(f"active clients must be a non-empty subset of [0, {num_clients}), got {active}")
        self._active_set = frozenset(self.active)  # membership in O(1) (a round checks each reply)
        self.names = list(template)
        self.shapes = {k: tuple(v.shape) for k, v in template.items()}
        self.K = num_clients
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name}: config must be {self.Config.__name__}")
        if participants is not None and participants < 1:
            raise ValueError(f"participants must be >= 1, got {participants}")
        self.participants = min(participants, len(self.active)) if participants is not None else len(self.active)
        """|S|, the expected clients per round (at most the active clients)."""
        self.check_config(self.config, len(self.active), self.participants)
        self.store = store if store is not None else MemoryStore()
        self._guards: dict[str, int] = {}
        self.state: G = self.init_state({k: v.detach().to(torch.float64).clone() for k, v in template.items()})

    # -- checks that need the federation's size ----------------------------------------------------------
    @classmethod
    def check_config(cls, config: AlgorithmConfig, num_clients: int, participants: int | None = None) -> None:
        """Raise ``ValueError`` naming the key when ``config`` is invalid for a federation of ``num_clients``
        with ``participants`` clients a round (default all; called by :func:`fedbayes.config.resolve`, so
        before any training, and by ``__init__``)."""
        return None

    # -- the rule -------------------------------------------------------------------------------------
    @abstractmethod
    def init_state(self, init_mean: Params) -> G:
        """The round-0 global state, from the model's initial weights."""

    @abstractmethod
    def configure(self, client: int, server_round: int) -> ClientTask:
        """The prior (and start point) for ``client`` in ``server_round``."""

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """Validate every reply (:meth:`check_updates`), then :meth:`update`: a bad reply changes nothing."""
        self.check_updates(updates)
        self.update(server_round, updates)

    @abstractmethod
    def update(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """Update the state from this round's validated replies (absent clients stay stale)."""

    @abstractmethod
    def global_mean(self) -> Params:
        """The global model's parameters (float64)."""

    def global_posterior(self) -> DiagGaussian | None:
        """The global diagonal posterior, for Bayesian rules."""
        return None

    # -- helpers ------------------------------------------------------------------------------------
    def zeros(self) -> Params:
        return {k: torch.zeros(s, dtype=torch.float64) for k, s in self.shapes.items()}

    def full(self, value: float) -> Params:
        return {k: torch.full(s, float(value), dtype=torch.float64) for k, s in self.shapes.items()}

    def flat_prior(self) -> DiagGaussian:
        return DiagGaussian(self.zeros(), self.zeros())

    def prior0(self, delta: float) -> DiagGaussian:
        """λ₀ = N(0, δ⁻¹I)."""
        return DiagGaussian(self.zeros(), self.full(delta))

    def floor(self, g: DiagGaussian) -> DiagGaussian:
        return g.clamp_prec(self.config.min_prec)

    # -- guards: safeguards that are not part of a paper's equations are counted, per round -------------
    def count_guard(self, name: str, coordinates: int) -> None:
        """Record that guard ``name`` changed ``coordinates`` numbers this round (reported in metrics.jsonl)."""
        self._guards[name] = self._guards.get(name, 0) + int(coordinates)

    def pop_guard_counts(self) -> dict[str, int]:
        """The guard counts since the last call (the engines call it once per round), then reset."""
        out, self._guards = self._guards, {}
        return out

    def client(self, client: int) -> C:
        """Client ``client``'s state (every field ``None`` for a client never heard from)."""
        return cast(C, self.ClientState.from_tensors(self.store.get_all(client), self.names))

    def heard_from(self) -> list[int]:
        """The active clients with stored state, sorted: what a recomputation of a running sum reads (O(clients
        heard from), not O(K); an excluded client's stored state, a run forgetting it, is left out)."""
        return [c for c in self.store.clients() if c in self._active_set]

    def set_client(self, client: int, state: C) -> C:
        """Store client ``client``'s state; returns it as stored (rounded when the store keeps float32), which is
        what running sums must add so that a recomputation from the store agrees with them."""
        stored = self.store.put_all(client, state.to_tensors())
        return cast(C, self.ClientState.from_tensors(stored, self.names))

    def check_update(self, u: ClientUpdate, need_site: bool) -> None:
        if not 0 <= u.client < self.K:
            raise ValueError(f"client id {u.client} out of range [0, {self.K})")
        if u.client not in self._active_set:
            raise ValueError(f"client {u.client} is not part of this federation (excluded)")
        if need_site and u.site is None:
            raise ValueError(f"{self.name}: client {u.client} sent no site")
        if not need_site and u.mean is None:
            raise ValueError(f"{self.name}: client {u.client} sent no mean")
        # FIX (tests/test_algorithms.py): also reject a non-positive Nₖ (FedAvg divided by ΣNₖ = 0) and
        # parameters whose names/shapes differ from the model's (point rules raised KeyError or broadcast).
        if u.num_examples < 1:
            raise ValueError(f"{self.name}: client {u.client} reports num_examples {u.num_examples} < 1")
        for what, params in (("mean", u.mean), ("site", None if u.site is None else u.site.eta)):
            if params is None:
                continue
            if list(params) != self.names or any(tuple(params[k].shape) != self.shapes[k] for k in self.names):
                raise ValueError(f"{self.name}: client {u.client} sent a {what} with the wrong names/shapes")

    def check_updates(self, updates: list[ClientUpdate]) -> None:
        """Validate every reply before any state changes (FIX: previously the point rules never checked the
        client id — FedLap summed a dual stored under an unknown id into m_g — and the site rules stored the
        sites of earlier replies before raising on a later bad one).  A client listed twice is rejected too
        (damping would be applied twice)."""
        seen: set[int] = set()
        for u in updates:
            self.check_update(u, need_site=self.needs_site())
            if u.client in seen:
                raise ValueError(f"{self.name}: client {u.client} appears twice in one round")
            seen.add(u.client)

    @staticmethod
    def mean_of(u: ClientUpdate) -> Params:
        if u.mean is None:
            raise ValueError(f"client {u.client} sent no mean")
        return {k: v.double() for k, v in u.mean.items()}

    def needs_site(self) -> bool:
        """Whether replies must carry a site (Bayesian rules) rather than a mean."""
        return self.bayesian

    # -- state ----------------------------------------------------------------------------------------
    def server_tensors(self) -> dict[str, Tensor]:
        """The global state as flat named tensors (``server/<field>/<param>``): what a checkpoint's state file holds;
        the clients' state is in the client store (:meth:`state_tensors` for both at once)."""
        return {f"server/{k}": v for k, v in self.state.to_tensors().items()}

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything the rule needs to continue, as flat named tensors (server + every client; O(K) memory: for
        small federations and tests; checkpoints write the client store incrementally)."""
        out = self.server_tensors()
        for c in self.store.clients():
            out.update({f"client/{c}/{k}": v for k, v in self.store.get_all(c).items()})
        return out

    def load_server_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Set the global state from ``server/…`` tensors (other keys ignored); the client store is untouched."""
        server = {k[len("server/"):]: v.clone() for k, v in tensors.items() if k.startswith("server/")}
        missing = set(self.state.to_tensors()) - set(server)
        if missing:
            raise ValueError(f"{self.name}: checkpoint lacks server tensors {sorted(missing)[:5]}")
        self.state = cast(G, self.GlobalState.from_tensors(server, self.names))

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`state_tensors`: the global state and every ``client/<k>/…`` entry into the store."""
        self.load_server_tensors(tensors)
        for client, d in split_clients(tensors).items():
            self.store.put_all(client, d)


def split_clients(tensors: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """``client/<k>/<name>`` entries of a flat state, grouped by client k."""
    per: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("client/"):
            _, cid, rest = k.split("/", 2)
            per.setdefault(int(cid), {})[rest] = v
    return per


def cosine_lr(base: float, server_round: int, num_rounds: int, final_fraction: float = 0.0) -> float:
    """Cosine decay over rounds, as torch's CosineAnnealingLR(T_max=num_rounds) stepped once per round (the
    reference code): lr_r = base·½(1 + cos(π(r − 1)/R)) for round r = 1..R, so the last round's lr stays > 0."""
    if num_rounds <= 1:
        return base
    t = (server_round - 1) / num_rounds
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))
