"""Semantic proxies of VPTSP / VPTSP-G (METHOD.md §1).

Each training image x_i of class c also runs through the ViT with its class's prompts
Q[c] (instead of the shared prompts P) and a separate proxy head, giving s_i. The batch's
s_i are folded into a per-class memory H, either by a GRU-style cell in batch order
("gru", "gru_relu": VPTSP-G) or by a moving average ("mix": VPTSP). The loss uses
P_all = normalize(r * B + (1 - r) * H) with a learnable bias B.

in_batch_proxies (for loss.proxy_range=in_batch, as the reference builds it): the rows of
the batch's classes are normalize(r * B[c] + (1 - r) * h_c) with h_c the fold's output
*before* H's row normalisation; every other row, and H itself, as above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vpt_dml import distributed
from vpt_dml.errors import UserError
from vpt_dml.models.class_prompt_store import STEP_COUNTS, ClassPromptStore, class_prompt_dtype
from vpt_dml.models.heads import EmbeddingHead
from vpt_dml.models.prompted_vit import xavier_normal_tokens


class ClassPrompts(nn.Module):
    """Class prompts Q_l[c]: per prompted layer a (C, M_l, D) table.

    store="device": dense parameters, trained by the main optimizer (small C).
    store="host": a ClassPromptStore (host memory, row-wise optimizer; SOP/In-Shop/iNat).
    Both start from the same draws, so a seeded run starts from the same prompts.
    """

    def __init__(
        self,
        num_classes: int,
        counts: Sequence[int],
        dim: int,
        store: str = "device",
        storage_dtype: str = "float32",
        step_count: str = "per_row",
    ) -> None:
        """step_count: the host store's Adam step count, "per_row" or "global"
        (class_prompt_store.py). The device store's tables are ordinary parameters of the
        main optimizer, which keeps one step count per parameter tensor; it ignores this."""
        super().__init__()
        if step_count not in STEP_COUNTS:
            raise UserError(f"model.proxy.class_prompt_step={step_count!r}; use global or per_row")
        self.counts = list(counts)
        full = max(self.counts, default=0)  # M: every layer is initialised at M, then sliced
        initial = [
            xavier_normal_tokens(num_classes, full, dim, keep=m) for m in self.counts if m > 0
        ]
        self.store = None
        if store == "host":
            self.store = ClassPromptStore(
                initial, self.counts, class_prompt_dtype(storage_dtype), step_count
            )
        self.tokens = nn.ParameterList(
            [] if self.store is not None else [nn.Parameter(t) for t in initial]
        )

    def gather(self, labels: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer, the (B, M_l, D) prompts of each sample's class (None: no prompts)."""
        if self.store is not None:
            return self.store.gather(labels)
        out: list[torch.Tensor | None] = []
        it = iter(self.tokens)
        for m in self.counts:
            out.append(next(it)[labels] if m > 0 else None)
        return out


class GatedUpdate(nn.Module):
    """GRU-style cell on E-dim vectors, in torch.nn.GRUCell's parametrisation.

    z = sigmoid(W_iz s + b_iz + W_hz h + b_hz), r = sigmoid(W_ir s + b_ir + W_hr h + b_hr),
    n = act(W_in s + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.
    With act = tanh this is exactly nn.GRUCell; "gru_relu" uses ReLU.

    The reference cell has one bias per gate and none inside r * (W_hn h), so by default
    the hidden Linear has no bias (b_h* = 0; hidden_bias=True gives nn.GRUCell's full set).
    Init as the reference: xavier-uniform per (E, E) weight block, zero biases.
    """

    def __init__(self, dim: int, activation: str = "relu", hidden_bias: bool = False) -> None:
        super().__init__()
        if activation not in ("relu", "tanh"):
            raise ValueError(f"GRU activation must be 'relu' or 'tanh', got {activation!r}")
        self.input = nn.Linear(dim, 3 * dim)
        self.hidden = nn.Linear(dim, 3 * dim, bias=hidden_bias)
        with torch.no_grad():
            for linear in (self.input, self.hidden):
                for block in linear.weight.view(3, dim, dim):
                    nn.init.xavier_uniform_(block)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        self.act = torch.relu if activation == "relu" else torch.tanh

    def forward(self, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        i_r, i_z, i_n = self.input(s).chunk(3, dim=-1)
        h_r, h_z, h_n = self.hidden(h).chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = self.act(i_n + r * h_n)
        return (1 - z) * n + z * h


def initial_memory(num_classes: int, dim: int) -> torch.Tensor:
    h = torch.empty(num_classes, dim)
    nn.init.xavier_uniform_(h)
    return F.normalize(h, dim=-1)


def class_groups(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(classes, counts, order): order lists sample indices grouped by class, batch order kept."""
    classes, counts = torch.unique(labels, return_counts=True)
    order = torch.argsort(labels, stable=True)
    return classes, counts, order


def fold_gru_rows(
    memory: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, cell: nn.Module, dropout: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch classes, their h_k): h_j = dropout(cell(s_{c,j}, h_{j-1})) in batch order,
    h_0 = H[c]; not normalised."""
    classes, counts, order = class_groups(labels)
    starts = torch.cumsum(counts, 0) - counts
    h = memory[classes]
    for j in range(int(counts.max())):
        active = counts > j
        idx = order[(starts + j).clamp(max=len(order) - 1)]
        step = dropout(cell(s[idx], h))
        h = torch.where(active[:, None], step, h)
    return classes, h


def fold_mix_rows(
    memory: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch classes, lam * H[c] + (1 - lam) * mean of the batch's s of class c)."""
    classes, counts, _ = class_groups(labels)
    index = torch.searchsorted(classes, labels)
    sums = torch.zeros(len(classes), s.shape[1], dtype=s.dtype, device=s.device).index_add(
        0, index, s
    )
    mean = sums / counts[:, None].to(s.dtype)
    return classes, lam * memory[classes] + (1 - lam) * mean


def write_rows(memory: torch.Tensor, classes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The new H: the batch classes' rows replaced, then every row re-normalised."""
    return F.normalize(memory.index_copy(0, classes, h.to(memory.dtype)), dim=-1)


def fold_gru(
    memory: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, cell: nn.Module, dropout: nn.Module
) -> torch.Tensor:
    """New memory after folding the batch with the GRU cell."""
    return write_rows(memory, *fold_gru_rows(memory, s, labels, cell, dropout))


def fold_mix(
    memory: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, lam: float
) -> torch.Tensor:
    """New memory after the moving-average fold."""
    return write_rows(memory, *fold_mix_rows(memory, s, labels, lam))


class SemanticProxies(nn.Module):
    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        embed_dim: int,
        class_prompt_counts: Sequence[int],
        update: str = "gru_relu",
        bias_ratio: float = 0.5,
        dropout: float = 0.0,
        mix_lambda: float = 0.8,
        class_prompt_store: str = "device",
        class_prompt_dtype: str = "float32",
        class_prompt_step: str = "per_row",
        in_batch_proxies: bool = False,
    ) -> None:
        """class_prompt_step: the host class-prompt bank's Adam step count, per_row or
        global (class_prompt_store.py); the device store ignores it.
        in_batch_proxies: batch classes' proxy rows from the un-normalised fold output, the
        reference's in_batch construction; set it exactly when loss.proxy_range=in_batch."""
        super().__init__()
        if update not in ("gru", "gru_relu", "mix"):
            raise ValueError(f"model.proxy.update must be gru, gru_relu or mix, got {update!r}")
        self.update = update
        self.bias_ratio = bias_ratio
        self.mix_lambda = mix_lambda
        self.in_batch_proxies = bool(in_batch_proxies)
        self.class_prompts = ClassPrompts(
            num_classes,
            class_prompt_counts,
            feature_dim,
            class_prompt_store,
            class_prompt_dtype,
            class_prompt_step,
        )
        self.head = EmbeddingHead(feature_dim, embed_dim)
        self.cell = (
            GatedUpdate(embed_dim, "tanh" if update == "gru" else "relu")
            if update != "mix"
            else None
        )
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_uniform_(self.bias)
        with torch.no_grad():
            self.bias.div_(8)
        # H: not a parameter, but part of the state a resumed run must continue from.
        self.register_buffer("memory", initial_memory(num_classes, embed_dim), persistent=True)
        # training folds so far: seeds the dropout shared by all DDP ranks; a buffer so that
        # a resumed run continues the sequence instead of repeating its masks
        self.register_buffer("fold_count", torch.zeros((), dtype=torch.long), persistent=True)

    def external_parameter_counts(self) -> dict[str, tuple[int, int]]:
        """Trainable numbers kept outside the module's parameters (the host class-prompt store)."""
        store = self.class_prompts.store
        return {"class_prompts": (store.numel(), store.numel())} if store is not None else {}

    def semantic_embeddings(
        self, images: torch.Tensor, labels: torch.Tensor, backbone: nn.Module
    ) -> torch.Tensor:
        return self.head(backbone(images, self.class_prompts.gather(labels)))

    def fold(self, s: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch classes, their new rows before H's normalisation)."""
        memory = self.memory.detach()
        s = s.to(torch.promote_types(s.dtype, torch.float32))  # half under AMP; float64 kept
        if self.update == "mix":
            return fold_mix_rows(memory, s, labels, self.mix_lambda)
        return fold_gru_rows(memory, s, labels, self.cell, self.dropout)

    def combine(self, memory: torch.Tensor) -> torch.Tensor:
        r = self.bias_ratio
        return F.normalize(r * self.bias + (1 - r) * memory, dim=-1)

    def proxies_from(self, s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fold the semantic embeddings s into H (kept when training) and return the C
        proxies: P_all, or with in_batch_proxies the batch classes' rows built from the
        un-normalised fold output (the loss's in_batch range then picks exactly those).

        Under DDP every rank folds the same global batch (all ranks' s in rank order, with
        the same dropout draws), so H and P_all are identical on every rank; see
        vpt_dml/distributed.py for why the gradients then equal a single process's.
        """
        rng = contextlib.nullcontext()
        if self.training:
            s, labels = distributed.gather_batch(s, labels)
            self.fold_count += 1
            if self.dropout.p > 0 and distributed.world_size() > 1:  # int() syncs: DDP only
                rng = distributed.shared_rng(int(self.fold_count))
        with rng:
            classes, rows = self.fold(s, labels)
        new_memory = write_rows(self.memory.detach(), classes, rows)
        if self.training:
            self.memory.copy_(new_memory.detach())
        if self.in_batch_proxies:
            new_memory = new_memory.index_copy(0, classes, rows.to(new_memory.dtype))
        return self.combine(new_memory)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, backbone: nn.Module
    ) -> torch.Tensor:
        # PromptedViT.forward_branches (chosen in models/build.py) fuses this pass with the image branch
        return self.proxies_from(self.semantic_embeddings(images, labels, backbone), labels)
