"""The batches a run trains and evaluates on, behind one interface: the loop asks for a micro-step's
loss, an evaluation batch's and the whole val split's, never which kind of data set it has:

- TokenStream: a text set's windows of block_size drawn at random (nanoGPT's); the mean over tokens.
- ConversationRows: a chat set's rows of whole conversations (dataset.ChatRows), each attending only to
  itself, the loss on the learned tokens (the assistant's replies) only.

A new objective (preference pairs, rollouts) is a new subclass of Batches and a case in open_batches,
its settings new keys in train_config.py: train.py does not change for it. Every random draw is keyed
by (seed, stream, ...): a resumed run and any split into micro-steps and processes draw the same.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch

from dataset import SPLITS, ChatRows, Row, get_batch, read_checked_tokens
from loss_eval import all_reduce_sum, full_val_loss
from runtime import print0, world
from train_config import TrainConfig

TRAIN_STREAM, EVAL_STREAM = 0, 1  # random streams for training micro-steps and for evaluation batches
# A chat set's training rows, each drawn by its index in the global batch (any split of the batch sees the
# same rows). Not TRAIN_STREAM: row r's stream would be micro-step r's, which seeds its dropout.
CHAT_ROW_STREAM = 2


class Batches(ABC):
    """A data set's batches for training and evaluation. Losses are left on the device."""

    full_val_what: str  # what full_val_loss averages over, for its log line

    def __init__(self, cfg: TrainConfig, data_dir: Path, meta: dict, device: torch.device):
        self.cfg, self.data_dir, self.meta, self.device = cfg, data_dir, meta, device

    @property
    def tokens_per_iter(self) -> int:
        """The positions an iteration trains on, all processes together."""
        return self.cfg.gradient_accumulation_steps * self.cfg.batch_size * self.cfg.block_size

    @abstractmethod
    def micro_step_loss(
        self, model: torch.nn.Module, iter_num: int, step: int, rng: np.random.Generator
    ) -> torch.Tensor:
        """The loss of global micro-step `step` of iteration iter_num, whose backward is averaged over the
        iteration's micro-steps (rng: the micro-step's own random stream, which also seeded its dropout)."""

    @abstractmethod
    def eval_batch_loss(self, model: torch.nn.Module, split: str, k: int) -> torch.Tensor:
        """Evaluation batch k of split, the same batch at every evaluation (past eval_iters: a repeat that
        only keeps the processes in step). Summed over eval_iters batches, it is divided by eval_count."""

    @abstractmethod
    def eval_count(self, split: str) -> int:
        """What the sum of split's eval_iters batch losses is divided by for the split's loss."""

    @abstractmethod
    def full_val_loss(
        self, model: torch.nn.Module, autocast: AbstractContextManager, should_stop: Callable[[], bool]
    ) -> float:
        """The loss over the whole val split, each target once: the number to compare runs by. Every
        process runs as many batches; should_stop, agreed by all, ends them at the same one."""


class TokenStream(Batches):
    full_val_what = "every val token once"

    def micro_step_loss(self, model, iter_num, step, rng):
        x, y = self._batch("train", rng)
        return model(x, y)[1]  # not holding the logits frees them before backward

    def eval_batch_loss(self, model, split, k):
        rng = np.random.default_rng([self.cfg.seed, EVAL_STREAM, SPLITS.index(split), k])
        return model(*self._batch(split, rng))[1]

    def eval_count(self, split):
        return self.cfg.eval_iters  # the mean of the batches' means

    def full_val_loss(self, model, autocast, should_stop):
        tokens = read_checked_tokens(self.data_dir, self.meta, "val")
        cfg = self.cfg
        return full_val_loss(
            model, tokens, cfg.block_size, cfg.batch_size, self.device, autocast, should_stop
        )

    def _batch(self, split: str, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        return get_batch(self.data_dir, self.meta, split, rng, cfg.batch_size, cfg.block_size, self.device)


class ConversationRows(Batches):
    """A chat set's losses are sums over learned tokens, divided by the global batch's count of them, so
    that every learned token weighs the same however a batch is split into micro-steps and processes
    (a mean per micro-step would weigh a short reply's tokens more)."""

    full_val_what = "every learned val token once"

    def __init__(self, cfg: TrainConfig, data_dir: Path, meta: dict, device: torch.device):
        super().__init__(cfg, data_dir, meta, device)
        self.rows = {
            split: ChatRows(data_dir, meta, split, cfg.block_size, cfg.chat_packing) for split in SPLITS
        }
        self._train_rows: tuple[int, list[Row], int] | None = None  # (iteration, its rows, their learned)
        self._eval_rows: dict[str, list[Row]] = {}
        self._check_and_describe()

    def micro_step_loss(self, model, iter_num, step, rng):
        """The micro-step's sum over its rows' learned tokens times G / N, N the learned tokens of all the
        iteration's rows: the mean over the G micro-steps, which the backward and DDP's gradient averaging
        take, is then the global batch's sum over N."""
        if self._train_rows is None or self._train_rows[0] != iter_num:
            # Every process draws every global row: the learned-token count needs no collective.
            rows = self._draw("train", CHAT_ROW_STREAM, iter_num, self.cfg.gradient_accumulation_steps)
            self._train_rows = (iter_num, rows, self.rows["train"].learned(rows))
        _, rows, n_learned = self._train_rows
        size = self.cfg.batch_size
        loss_sum = self._loss_sum(model, "train", rows[step * size : (step + 1) * size])
        # No learned token: 0, not NaN.
        return loss_sum * (self.cfg.gradient_accumulation_steps / max(n_learned, 1))

    def eval_batch_loss(self, model, split, k):
        first = (k % self.cfg.eval_iters) * self.cfg.batch_size
        return self._loss_sum(model, split, self._eval(split)[first : first + self.cfg.batch_size])

    def eval_count(self, split):
        return max(self.rows[split].learned(self._eval(split)), 1)  # the mean over all learned tokens

    @torch.no_grad()
    def full_val_loss(self, model, autocast, should_stop):
        """Every val conversation that fits, in rows packed in order and shared out among the processes
        as loss_eval.full_val_loss shares windows; the last ones are filled with empty rows, all padding,
        so one shape serves."""
        rows, batch_size, (rank, world_size) = self.rows["val"].in_order(), self.cfg.batch_size, world()
        step = world_size * batch_size
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for first in range(rank * batch_size, math.ceil(len(rows) / step) * step, step):
            if should_stop():
                break
            batch = (rows[first : first + batch_size] + [[]] * batch_size)[:batch_size]
            with autocast:
                total += self._loss_sum(model, "val", batch).double()
        model.train()
        return all_reduce_sum(total).item() / max(self.rows["val"].learned(rows), 1)

    def _loss_sum(self, model: torch.nn.Module, split: str, rows: list[Row]) -> torch.Tensor:
        """The loss summed over the learned tokens of rows, each attending only to its own conversation."""
        x, y, segments = self.rows[split].batch(rows, self.device)
        return model(x, y, segments=segments, reduction="sum")[1]

    def _draw(self, split: str, stream: int, key: int, n_batches: int) -> list[Row]:
        """The conversations of n_batches batches' rows, row r drawn from stream (seed, stream, key, r)."""
        chat, n_rows = self.rows[split], n_batches * self.cfg.batch_size
        return [chat.draw(np.random.default_rng([self.cfg.seed, stream, key, r])) for r in range(n_rows)]

    def _eval(self, split: str) -> list[Row]:
        """split's evaluation rows, the same at every evaluation."""
        if split not in self._eval_rows:
            self._eval_rows[split] = self._draw(split, EVAL_STREAM, SPLITS.index(split), self.cfg.eval_iters)
        return self._eval_rows[split]

    def _check_and_describe(self) -> None:
        """Says how many conversations fit a row and how many, longer than block_size + 1 tokens, are left
        out (ChatRows refuses a split where none fits)."""
        block_size = self.cfg.block_size
        counts = ", ".join(
            f"{split} {len(rows.fitting):,} ({rows.left_out:,} left out)" for split, rows in self.rows.items()
        )
        layout = "packed" if self.cfg.chat_packing else "one per row"
        print0(
            f"chat set: conversations {counts}, left out as longer than block_size + 1 = {block_size + 1} "
            f"tokens; rows of whole conversations, {layout}, the loss on learned tokens only"
        )


def open_batches(cfg: TrainConfig, data_dir: Path, meta: dict, device: torch.device) -> Batches:
    """The batches of the data set in data_dir, of the kind its meta.json says."""
    if meta.get("chat"):
        return ConversationRows(cfg, data_dir, meta, device)
    return TokenStream(cfg, data_dir, meta, device)
