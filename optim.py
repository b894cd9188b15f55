"""The optimizers over a GPT's parameter groups (GPT.param_groups): AdamW, and Muon for the matrices
inside the blocks. Apart from model.py, which holds the network only: how weights are trained is not
what they are, and train.py, bench.py and the tests share it.
"""

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from model import GPT


def make_optimizers(
    model: GPT,
    weight_decay: float,
    learning_rate: float,
    betas: tuple[float, float],
    device_type: str,
    muon_lr: float | None = None,
    muon_momentum: float = 0.95,
    muon_ns_steps: int = 5,
) -> list[torch.optim.Optimizer]:
    """AdamW, and with muon_lr Muon (no weight decay, first in the list) for the 2-D matrices inside the
    blocks; GPT.param_groups says which parameters go where and which get weight_decay. Each param group
    carries lr_scale: its learning rate over learning_rate."""
    adamw_groups, muon_groups = model.param_groups(weight_decay, muon=bool(muon_lr))
    # The fused kernel updates every tensor in one pass instead of several ops per tensor: a few launches
    # on CUDA; on CPU a 3-5x faster step than the default loop (12.6M parameters: 40 -> 11 ms).
    fused = device_type in ("cuda", "cpu")
    adamw_groups = [{**group, "lr_scale": 1.0} for group in adamw_groups]
    adamw = torch.optim.AdamW(adamw_groups, lr=learning_rate, betas=betas, fused=fused)
    if not muon_groups:
        return [adamw]
    muon_groups = [{**group, "lr_scale": muon_lr / learning_rate} for group in muon_groups]
    muon = Muon(muon_groups, lr=muon_lr, weight_decay=0.0, momentum=muon_momentum, ns_steps=muon_ns_steps)
    return [muon, adamw]


class Muon(torch.optim.Muon):
    """torch.optim.Muon (Nesterov momentum, then Newton-Schulz orthogonalisation of each matrix's
    update, scaled by sqrt(max(1, rows / cols)) as in the speed runs), with two changes:
    - float32 Newton-Schulz off CUDA: torch's runs in bfloat16, and a CPU without native bf16
      multiplies bf16 matrices ~100x slower than float32 ones;
    - a group may give "parts", the row counts of the matrices fused into each of its parameters
      (q|k|v, gate|up): each part is orthogonalised on its own, as if the projections were apart.
    Matrices of one shape go through Newton-Schulz together, in one batched pass.

    Under FSDP (parameters sharded by rows, as DTensors) every process gathers each matrix's whole update
    (DTensor.full_tensor), orthogonalises all of them and keeps its own rows. What that adds per
    iteration: one all-gather of the Muon matrices' updates in float32 (each process receives (N-1)/N of
    4 bytes per Muon parameter, about one more gather of the blocks' weights than FSDP does anyway, once
    per iteration rather than per micro-step), and every process runs the whole Newton-Schulz, as under
    DDP; the re-sharding takes local rows and sends nothing."""

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # torch's optimizers take a closure; Muon needs none
        for group in self.param_groups:
            lr, momentum, part_rows = group["lr"], group["momentum"], group.get("parts")
            pairs = []  # (a weight, the index of its part, the whole part's update)
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                p.mul_(1 - lr * group["weight_decay"])
                # Sharded (fsdp): every process gathers the whole update, orthogonalises all of it and
                # keeps its own rows, since orthogonalising a shard alone is not orthogonalising the matrix.
                whole = update.full_tensor() if isinstance(update, DTensor) else update
                pairs += [(p, i, part) for i, part in enumerate(whole.split(part_rows or p.size(0)))]
            orthogonal = {}  # (weight, part index) -> (the part's orthogonal update, its scale)
            for shape in dict.fromkeys(update.shape for _, _, update in pairs):
                same = [(weight, i, update) for weight, i, update in pairs if update.shape == shape]
                stacked = torch.stack([update for _, _, update in same])
                batch = newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for (weight, i, _), update in zip(same, batch):
                    orthogonal[weight, i] = (update.to(weight.dtype), max(1, shape[0] / shape[1]) ** 0.5)
            for weight in dict.fromkeys(weight for weight, _, _ in pairs):
                parts = [orthogonal[weight, i] for i in range(len(part_rows or [0]))]
                if isinstance(weight, DTensor):  # this process's rows of the whole step: no communication
                    step = torch.cat([update * scale for update, scale in parts])
                    local = distribute_tensor(step, weight.device_mesh, weight.placements, src_data_rank=None)
                    weight.add_(local, alpha=-lr)
                else:  # each part's rows in place: the arithmetic the README's figures were measured with
                    for rows, (update, scale) in zip(weight.split(part_rows or weight.size(0)), parts):
                        rows.add_(update, alpha=-lr * scale)


def newton_schulz(
    G: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Matrices G (N, rows, cols) -> U S' V^T where G = U S V^T and S' has entries near 1 (roughly 0.5 to
    1.5 with the speed runs' quintic coefficients, which trade exactness for fewer steps)."""
    a, b, c = coefficients
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)  # the bf16 branch: GPU only (gpu_check.py)
    wide = X.size(-2) <= X.size(-1)
    X = X if wide else X.mT  # iterate on the smaller Gram matrix X X^T
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = X @ X.mT  # (N, small, small)
        X = a * X + (b * gram + c * gram @ gram) @ X
    return X if wide else X.mT
