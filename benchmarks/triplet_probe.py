"""
How the triplet term's gradient relates to the DPO term's, measured during training (issue 21 §1; SPEC §4).

`probed(cls)` returns a subclass of a `TIDPOTrainer` class that, at chosen optimizer steps, takes the gradients of the two
terms of the loss separately with respect to the trainable parameters,

    g_dpo  = ∇ mean_b L_DPO          g_trip = ∇ γ · mean_b L_trip

and records `‖g_trip‖ / ‖g_dpo‖` and `cos(g_dpo, g_trip)`. It uses the step's own forwards and `retain_graph`, so the
update itself is unchanged (`torch.autograd.grad` accumulates into no `.grad`). A negative cosine means the triplet
pushes against DPO's update; a ratio above 1 means it dominates it.
"""

import torch

from trl_tidpo import TIDPOTrainer


def gradient_conflict(model: torch.nn.Module, dpo_term: torch.Tensor, triplet_term: torch.Tensor) -> dict[str, float]:
    """`{"norm_ratio": ‖g_trip‖/‖g_dpo‖, "cosine": cos(g_dpo, g_trip)}` of two scalar terms' parameter gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    g_dpo = torch.autograd.grad(dpo_term, params, retain_graph=True, allow_unused=True)
    g_trip = torch.autograd.grad(triplet_term, params, retain_graph=True, allow_unused=True)
    flat = [
        torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])
        for grads in (g_dpo, g_trip)
    ]
    dpo_norm, trip_norm = flat[0].norm(), flat[1].norm()
    cosine = (flat[0] @ flat[1]) / (dpo_norm * trip_norm).clamp(min=1e-30)
    return {"norm_ratio": (trip_norm / dpo_norm.clamp(min=1e-30)).item(), "cosine": cosine.item()}


def probed(cls: type[TIDPOTrainer], every: int = 10) -> type[TIDPOTrainer]:
    """A subclass of `cls` that records `gradient_conflict` at steps 0, `every`, 2·`every`, … in `self.conflicts`."""

    class Probed(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.conflicts: list[dict] = []

        def _loss_parts(self, model, batch):
            policy, parts = super()._loss_parts(model, batch)
            step = self.state.global_step
            probe_now = model.training and parts.triplet is not None and step % every == 0
            if probe_now and not any(c["step"] == step for c in self.conflicts):  # once per step (grad accumulation)
                # the benchmarks' pairs carry no `pair_weight` column, so the triplet term is γ · mean_b L_trip
                conflict = gradient_conflict(
                    model, parts.dpo_losses.mean(), self.args.triplet_gamma * parts.triplet.loss.mean()
                )
                self.conflicts.append({"step": step, **conflict})
            return policy, parts

    Probed.__name__ = Probed.__qualname__ = f"Probed{cls.__name__}"
    return Probed
