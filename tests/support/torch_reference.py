"""PyTorch references shared by the torch-backend tests: random samples and a hand-computed update."""

import copy

import torch
import torch.nn.functional as F


def random_samples(n: int, vocab: int, seed: int = 0, lo: int = 4, hi: int = 20) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    return [torch.randint(3, vocab, (int(t),), generator=g) for t in lengths]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts that name the same tensors. No exclusions: the tiny
    models of these tests have untied heads, so every side lists lm_head.weight (a tied one would be listed once)."""
    assert a and set(a) == set(b), f"tensors on one side only: {sorted(set(a) ^ set(b))}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def reference_update(model, samples, labels=None, *, lr=5e-5, max_grad_norm=1.0, optim="adamw"):
    """One forward of all samples in one right-padded batch, sum of shifted token CE / label-token count,
    backward, clip, one torch AdamW step (weight decay 0, HF's default betas/eps; ``optim="sgd"``: plain SGD,
    whose step is lr x the clipped gradient, magnitudes and all) on a copy. Returns (copy, loss, grad norm
    before clipping)."""
    ref = copy.deepcopy(model).train()
    labels = labels if labels is not None else samples
    length = max(len(x) for x in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask, lab = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (x, y) in enumerate(zip(samples, labels)):
        ids[i, :len(x)], mask[i, :len(x)], lab[i, :len(y)] = x, 1, torch.as_tensor(y)
    logits = ref(input_ids=ids, attention_mask=mask).logits
    targets = lab[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                         reduction="sum")
    loss = ce / (targets != -100).sum()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm or float("inf"))
    optimizer = {"adamw": lambda: torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.0),
                 "sgd": lambda: torch.optim.SGD(ref.parameters(), lr=lr)}[optim]()
    optimizer.step()
    return ref, loss.item(), norm.item()
