"""The EPO objective as pure tensor math (Xu et al., arXiv 2509.22576, v2).

Nothing here knows about trainers, models or processes: every function takes tensors and returns tensors, so each
equation can be tested on hand-made inputs. The trainer (``trainer.py``) feeds these functions the per-token entropies
of the forward pass the base GRPO loss already makes.

    L_EPO = L_base - lambda * L_H + lambda * beta_k * L_smooth                              (Eq. 6)

Shapes: ``(B, L)`` for per-token tensors (B sequences, L completion positions). ``mask`` is 1 on model-generated
(action) tokens and 0 on environment, template and padding tokens. ``turn_ids`` holds the turn index of each token
(0-based, in order; any value where ``mask`` is 0).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch


# --------------------------------------------------------------------------------------------------------------------
# Eq. 2: trajectory-level aggregation
# --------------------------------------------------------------------------------------------------------------------


def trajectory_weights(
    mask: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    traj_ids: torch.Tensor | None = None,
    num_trajectories: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token weights ``w`` such that ``(w * x).sum()`` is the trajectory-level mean of ``x`` (Eq. 2).

        L = 1/B sum_j 1/T_j sum_t 1/|tau_{j,t}| sum_i x_{j,t,i}

    i.e. a token mean inside each turn, a mean over the turns of each trajectory and a mean over trajectories. A
    trajectory with one long turn and one with five short turns weigh the same; so do a long and a short turn of the
    same trajectory.

    Args:
        mask: ``(B, L)``, 1 on the tokens that count.
        turn_ids: ``(B, L)`` integer turn index per token. ``None`` means every row is a single turn (single-turn
            data, T_j = 1).
        traj_ids: ``(B,)`` trajectory id per row, for data where one trajectory spans several rows (one row per turn).
            ``None`` means each row is its own trajectory.
        num_trajectories: the B of Eq. 2. Defaults to the number of trajectories in this batch that have at least one
            counted token. Pass the global count when a batch is split into micro-batches.

    Returns:
        ``(B, L)`` float weights, zero where ``mask`` is 0, detached (they are constants of the objective).
    """
    mask = mask.detach().to(torch.float32)
    if turn_ids is None:
        turn_ids = torch.zeros_like(mask, dtype=torch.long)
    turn_ids = torch.where(mask > 0, turn_ids.detach().long(), torch.zeros_like(turn_ids, dtype=torch.long))
    if bool((turn_ids < 0).any()):
        raise ValueError("turn_ids must be >= 0 on every counted (mask == 1) token.")
    B, L = mask.shape
    if traj_ids is None:
        traj_ids = torch.arange(B, device=mask.device)
    # Re-index trajectories to 0..J-1 and (trajectory, turn) pairs to dense ids, so rows of one trajectory share turns.
    _, traj_index = torch.unique(traj_ids.detach().to(mask.device), return_inverse=True)
    num_turn_slots = int(turn_ids.max().item()) + 1 if turn_ids.numel() else 1
    pair = traj_index.unsqueeze(1) * num_turn_slots + turn_ids  # (B, L)
    num_pairs = int(traj_index.max().item() + 1) * num_turn_slots if B else 0

    tokens_per_pair = torch.zeros(num_pairs, device=mask.device).scatter_add_(0, pair.flatten(), mask.flatten())
    turn_present = (tokens_per_pair > 0).float().view(-1, num_turn_slots)  # (J, slots)
    turns_per_traj = turn_present.sum(1)  # T_j
    if num_trajectories is None:
        num_trajectories = (turns_per_traj > 0).sum().clamp(min=1)
    per_token = 1.0 / (
        tokens_per_pair.clamp(min=1.0)[pair]
        * turns_per_traj.clamp(min=1.0)[traj_index].unsqueeze(1)
        * torch.as_tensor(num_trajectories, dtype=torch.float32, device=mask.device)
    )
    return per_token * mask


def token_weights(mask: torch.Tensor, num_tokens: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Per-token weights of a plain token mean: ``1 / (number of counted tokens)`` on every counted token."""
    mask = mask.detach().to(torch.float32)
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1.0)
    return mask / torch.as_tensor(num_tokens, dtype=torch.float32, device=mask.device)


def _trajectory_aggregation(mask, turn_ids=None, traj_ids=None, num_trajectories=None, num_tokens=None):
    return trajectory_weights(mask, turn_ids, traj_ids, num_trajectories)


def _token_aggregation(mask, turn_ids=None, traj_ids=None, num_trajectories=None, num_tokens=None):
    return token_weights(mask, num_tokens)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "trajectory": _trajectory_aggregation,  # Eq. 2: token mean per turn, mean over turns, mean over trajectories
    "token": _token_aggregation,  # a plain mean over all action tokens
}
"""Name -> per-token weight function of the entropy aggregation (`epo_entropy_aggregation`)."""


def aggregation_weights(
    name: str,
    mask: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    traj_ids: torch.Tensor | None = None,
    num_trajectories=None,
    num_tokens=None,
) -> torch.Tensor:
    """The per-token weights of aggregation `name` (a key of `AGGREGATIONS`), with the global normalisers when
    given (Eq. 2's B, the token mode's N)."""
    weights = _lookup(AGGREGATIONS, name, "entropy aggregation")
    return weights(
        mask, turn_ids=turn_ids, traj_ids=traj_ids, num_trajectories=num_trajectories, num_tokens=num_tokens
    )


def trajectory_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    turn_ids: torch.Tensor | None = None,
    traj_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The trajectory-level mean of ``values`` (Eq. 2); differentiable in ``values``."""
    return (trajectory_weights(mask, turn_ids, traj_ids).to(values.dtype) * values).sum()


# --------------------------------------------------------------------------------------------------------------------
# Eqs. 3-4: the smoothing corridor
# --------------------------------------------------------------------------------------------------------------------


def corridor_penalty(
    entropy: torch.Tensor, reference: torch.Tensor | float, kappa_low: float, kappa_high: float
) -> torch.Tensor:
    """Per-token hinge penalty around the historical entropy reference (Eqs. 3-4):

        P = relu(kappa_l * H_ref - H) + relu(H - kappa_r * H_ref)

    Its gradient with respect to ``H`` is -1 below the corridor, 0 inside and +1 above it (Lemma A.11), so
    ``alpha * P`` pushes entropy back into ``[kappa_l * H_ref, kappa_r * H_ref]`` with strength ``alpha``.
    ``reference`` is a scalar or a tensor broadcastable to ``entropy`` (a per-token reference, e.g. per turn).
    """
    reference = torch.as_tensor(reference, dtype=entropy.dtype, device=entropy.device)
    return torch.relu(kappa_low * reference - entropy) + torch.relu(entropy - kappa_high * reference)


def out_of_corridor(
    entropy: torch.Tensor, reference: torch.Tensor | float, kappa_low: float, kappa_high: float
) -> torch.Tensor:
    """Boolean per-token mask of the tokens whose entropy lies outside the corridor."""
    reference = torch.as_tensor(reference, dtype=entropy.dtype, device=entropy.device)
    return (entropy < kappa_low * reference) | (entropy > kappa_high * reference)


# --------------------------------------------------------------------------------------------------------------------
# Eq. 5: the phase weight
# --------------------------------------------------------------------------------------------------------------------


def exp_phase_weight(step: int, total_steps: int, gamma: float = 3.0) -> float:
    """beta_k = 1 + exp(-gamma * k / floor(K / 2)) (Eq. 5).

    ``step`` is the 0-based optimizer step k, ``total_steps`` the run's real number of optimizer steps K. beta_0 = 2,
    beta_{K//2} = 1 + e^{-gamma}, decreasing toward 1: the corridor weighs most early in training, when entropy swings
    most. ``floor(K / 2)`` is taken as at least 1 so that runs of one step are defined.
    """
    if step < 0 or total_steps < 1:
        raise ValueError(f"phase_weight needs step >= 0 and total_steps >= 1, got step={step}, total={total_steps}.")
    half = max(1, total_steps // 2)
    return 1.0 + math.exp(-gamma * step / half)


def constant_phase_weight(step: int, total_steps: int, gamma: float = 3.0) -> float:
    """beta = 1 at every step."""
    return 1.0


PHASE_SCHEDULES: dict[str, Callable[[int, int, float], float]] = {
    "exp": exp_phase_weight,
    "constant": constant_phase_weight,
}


def phase_weight(step: int, total_steps: int, gamma: float = 3.0, schedule: str = "exp") -> float:
    """The phase weight beta_k of `schedule` (a name of `PHASE_SCHEDULES`; Eq. 5 for "exp")."""
    return _lookup(PHASE_SCHEDULES, schedule, "phase schedule")(step, total_steps, gamma)


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"Unknown {what} {name!r}; supported: {sorted(table)}.")
    return table[name]


# --------------------------------------------------------------------------------------------------------------------
# The historical entropy reference H_ref
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StepEntropy:
    """One optimizer step's detached action-token entropy, reduced over all processes and micro-batches."""

    mean: float
    turn_means: dict[int, float]


class EntropyReference:
    """The entropy reference H_ref used by the corridor (Eqs. 3-4).

    Modes:
        ``"cumulative"`` (paper): mean of the batch entropies H_0..H_{k-1} of all previous optimizer steps.
        ``"per_turn"``: the same cumulative mean kept separately for every true turn index t, so turn t's tokens are
            compared with the history of turn t; a turn never seen before falls back to the cumulative reference.
        ``"ema"``: exponential moving average with ``ema_decay`` (H_ref <- d * H_ref + (1 - d) * H_k).
        ``"window"``: mean of the last ``window`` steps.

    Before the first update there is no history: :meth:`value` returns ``None`` and the corridor is off (k = 0).
    The state is plain Python numbers, identical on every process (it is only updated with globally reduced values),
    and round-trips through :meth:`state_dict` / :meth:`load_state_dict` (JSON-serialisable).
    """

    MODES = ("cumulative", "per_turn", "ema", "window")

    def __init__(self, mode: str = "cumulative", ema_decay: float = 0.9, window: int = 10):
        if mode not in self.MODES:
            raise ValueError(f"Unknown entropy reference mode {mode!r}; supported: {list(self.MODES)}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        self.mode = mode
        self.ema_decay = ema_decay
        self.window = window
        self.num_updates = 0
        self._sum = 0.0  # cumulative sum of step means
        self._ema: float | None = None
        self._recent: deque[float] = deque(maxlen=window)
        self._turn_sum: dict[int, float] = {}
        self._turn_count: dict[int, int] = {}
        self.history: list[float] = []  # every step mean, in order (for plots and the model card)

    # ---- reading
    def value(self) -> float | None:
        """The scalar reference (None before any update). For ``per_turn`` this is the cumulative fallback."""
        if self.num_updates == 0:
            return None
        if self.mode == "ema":
            return self._ema
        if self.mode == "window":
            return sum(self._recent) / len(self._recent)
        return self._sum / self.num_updates

    def turn_value(self, turn: int) -> float | None:
        """The reference for true turn index ``turn`` (``per_turn`` mode; other modes return :meth:`value`)."""
        if self.mode == "per_turn" and self._turn_count.get(turn, 0) > 0:
            return self._turn_sum[turn] / self._turn_count[turn]
        return self.value()

    def per_token(self, turn_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The reference for every token, as a tensor shaped like ``turn_ids`` (None before any update)."""
        if self.num_updates == 0:
            return None
        if self.mode != "per_turn":
            return torch.full(turn_ids.shape, float(self.value()), dtype=dtype, device=turn_ids.device)
        max_turn = int(turn_ids.max().item()) if turn_ids.numel() else 0
        table = torch.tensor(
            [self.turn_value(t) for t in range(max(0, max_turn) + 1)], dtype=dtype, device=turn_ids.device
        )
        return table[turn_ids.clamp(min=0)]

    # ---- writing
    def update(self, step: StepEntropy) -> None:
        """Append one optimizer step's entropy (call exactly once per optimizer step, after its loss is built)."""
        if not math.isfinite(step.mean):
            return  # a step with no action tokens (or a non-finite entropy) carries no information
        self.num_updates += 1
        self._sum += step.mean
        self._ema = step.mean if self._ema is None else self.ema_decay * self._ema + (1 - self.ema_decay) * step.mean
        self._recent.append(step.mean)
        self.history.append(step.mean)
        for turn, mean in step.turn_means.items():
            if math.isfinite(mean):
                self._turn_sum[turn] = self._turn_sum.get(turn, 0.0) + mean
                self._turn_count[turn] = self._turn_count.get(turn, 0) + 1

    # ---- checkpointing
    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "ema_decay": self.ema_decay,
            "window": self.window,
            "num_updates": self.num_updates,
            "sum": self._sum,
            "ema": self._ema,
            "recent": list(self._recent),
            "turn_sum": {str(k): v for k, v in self._turn_sum.items()},
            "turn_count": {str(k): v for k, v in self._turn_count.items()},
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(
                f"The checkpoint's entropy reference mode is {state['mode']!r} but this run uses {self.mode!r}; "
                "resume with the same `epo_reference` or start a new run."
            )
        self.ema_decay = state["ema_decay"]
        self.window = state["window"]
        self.num_updates = state["num_updates"]
        self._sum = state["sum"]
        self._ema = state["ema"]
        self._recent = deque(state["recent"], maxlen=self.window)
        self._turn_sum = {int(k): v for k, v in state["turn_sum"].items()}
        self._turn_count = {int(k): v for k, v in state["turn_count"].items()}
        self.history = list(state["history"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntropyReference) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return f"EntropyReference(mode={self.mode!r}, updates={self.num_updates}, value={self.value()})"


REFERENCE_MODES = EntropyReference.MODES


class EntropyWindow:
    """Per-turn sums of the detached action-token entropies of one optimizer step's micro-batches, closed into the
    step's `StepEntropy` (reduced over all processes) once per optimizer step.

    The reductions are passed in (`close(reduce_sum, reduce_max)`), so this stays pure: a single process passes the
    identity, a distributed trainer its collectives (every process must call `close` at the same step).
    """

    def __init__(self):
        self.turn_sum: torch.Tensor | None = None
        self.turn_count: torch.Tensor | None = None

    def add(self, entropies: torch.Tensor, mask: torch.Tensor, turn_ids: torch.Tensor) -> None:
        mask = mask.detach().float()
        slots = int(turn_ids.max().clamp(min=0).item()) + 1 if turn_ids.numel() else 1
        index = turn_ids.clamp(min=0).flatten()
        turn_sum = torch.zeros(slots, device=mask.device).scatter_add_(
            0, index, (entropies.detach().float() * mask).flatten()
        )
        turn_count = torch.zeros(slots, device=mask.device).scatter_add_(0, index, mask.flatten())
        self.turn_sum = _add_grown(self.turn_sum, turn_sum)
        self.turn_count = _add_grown(self.turn_count, turn_count)

    def close(
        self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], reduce_max: Callable[[int], int], device
    ) -> StepEntropy | None:
        """The step's global mean entropy and per-turn means (None when no process saw an action token); resets."""
        local = 0 if self.turn_sum is None else self.turn_sum.numel()
        slots = reduce_max(local)
        buffer = torch.zeros(2, max(1, slots), device=device)
        if self.turn_sum is not None:
            buffer[0, :local] = self.turn_sum
            buffer[1, :local] = self.turn_count
        self.turn_sum = self.turn_count = None
        if slots == 0:
            return None
        buffer = reduce_sum(buffer)
        total = buffer[1].sum().item()
        mean = buffer[0].sum().item() / total if total > 0 else math.nan
        turn_means = {t: (buffer[0, t] / buffer[1, t]).item() for t in range(slots) if buffer[1, t] > 0}
        return StepEntropy(mean=mean, turn_means=turn_means)


def _add_grown(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if total is None:
        return value
    size = max(total.numel(), value.numel())
    grown = torch.zeros(size, device=value.device)
    grown[: total.numel()] += total
    grown[: value.numel()] += value
    return grown


# --------------------------------------------------------------------------------------------------------------------
# Eq. 6: the EPO regulariser
# --------------------------------------------------------------------------------------------------------------------


SMOOTHING_MODES = ("hinge", "none")
"""'hinge': the differentiable corridor of Eqs. 3-4 (paper v2); 'none': EPO-Base (the entropy bonus only)."""


@dataclass
class EPOTerms:
    """The EPO additions to the base loss for one (micro-)batch, plus detached statistics for logging."""

    regularizer: torch.Tensor  # -lambda * L_H + lambda * beta_k * L_smooth  (add to the base loss)
    entropy: torch.Tensor  # L_H (detached)
    smooth_penalty: torch.Tensor  # L_smooth = alpha * aggregated P (detached; 0 when the corridor is off)
    out_of_corridor_frac: torch.Tensor  # fraction of counted tokens outside the corridor (detached)


def epo_regularizer(
    entropy: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    entropy_coef: float,
    beta: float,
    reference: torch.Tensor | float | None,
    alpha: float,
    kappa_low: float,
    kappa_high: float,
    smoothing: str = "hinge",
) -> EPOTerms:
    """``-lambda * L_H + lambda * beta_k * L_smooth`` (Eq. 6) from per-token entropies and aggregation weights.

    ``weights`` come from :func:`trajectory_weights` (Eq. 2) or :func:`token_weights`; ``reference`` is None at
    k = 0 (no history: L_smooth = 0), a scalar, or a per-token tensor. ``smoothing="none"`` is EPO-Base (bonus only).
    """
    weights = weights.to(entropy.dtype)
    entropy_term = (weights * entropy).sum()
    if smoothing == "hinge" and reference is not None:
        penalty = alpha * (weights * corridor_penalty(entropy, reference, kappa_low, kappa_high)).sum()
        outside = out_of_corridor(entropy.detach(), reference, kappa_low, kappa_high) & mask.bool()
        frac = outside.sum() / mask.sum().clamp(min=1)
    elif smoothing in SMOOTHING_MODES:
        penalty = entropy.new_zeros(())
        frac = entropy.new_zeros(())
    else:
        raise ValueError(f"Unknown smoothing {smoothing!r}; supported: {list(SMOOTHING_MODES)}.")
    regularizer = -entropy_coef * entropy_term + entropy_coef * beta * penalty
    return EPOTerms(regularizer, entropy_term.detach(), penalty.detach(), frac.detach().float())
