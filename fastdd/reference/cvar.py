"""Reference CVaR: the Rockafellar-Uryasev minimum over t, scanned over the K loss values (brute force)."""
import torch


def cvar_bruteforce(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """min_t t + mean((L - t)+) / alpha over the uniform empirical distribution; the optimum is at some L_i."""
    t = losses.unsqueeze(-1)  # [..., K(t), 1] against [..., 1, K]
    objective = t.squeeze(-1) + (losses.unsqueeze(-2) - t).clamp_min(0).mean(-1) / alpha
    return objective.min(-1).values
