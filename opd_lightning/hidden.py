"""Hidden states for the losses that read them (HIDDEN_STATES, e.g. DSKD), gathered only when one asks.

The hidden state a loss wants is what each model's output layer reads: the last layer's output with the final norm
applied. A forward hook on the output layer records exactly that, already cut to the completion positions by
`logits_to_keep`, whatever a model family returns as `hidden_states[-1]` and without keeping every layer's states
as `output_hidden_states=True` would. Parameters that depend on hidden sizes (projectors, attention) are created
here once both models are loaded, before the optimizer exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from opd_lightning.aligners import Aligner, TeacherHidden
from opd_lightning.losses import HIDDEN_STATES, LossInputs

__all__ = ["fill_student_hidden", "needs_hidden", "output_layer_input", "setup_sizes", "teacher_hidden"]


@contextmanager
def output_layer_input(model: nn.Module, store: list | None) -> Iterator[None]:
    """Append the input of `model`'s output layer (`[B, T', H]`, with its graph) to `store` during the block."""
    if store is None:
        yield
        return
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, output: store.append(args[0]))
    try:
        yield
    finally:
        handle.remove()


def needs_hidden(terms: Iterable, completions: str) -> bool:
    """Whether a loss term on `completions` ("rollout" or "gold") reads hidden states."""
    return any(HIDDEN_STATES in t.loss.requires for t in terms if t.completions == completions)


def _width(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[1]


def setup_sizes(terms: Iterable, aligner: Aligner, student: nn.Module, teacher: nn.Module) -> None:
    """Let every loss and the aligner create their size-dependent parameters (a no-op for most)."""
    sizes = (_width(student), _width(teacher))
    for term in terms:
        term.loss.setup(*sizes)
    aligner.setup(*sizes)


def teacher_hidden(hidden: Tensor, logits: Tensor, student: nn.Module, teacher: nn.Module) -> TeacherHidden:
    """The teacher's outputs on its completion (`hidden` `[B, M + 1, H_T]` as recorded, `logits` `[B, M, V_T]`)."""
    return TeacherHidden(hidden[:, :-1], logits, student.get_input_embeddings().weight.detach(),
                         teacher.get_input_embeddings().weight.detach())


def fill_student_hidden(inputs: LossInputs, hidden: Tensor, student: nn.Module) -> None:
    """Give a loss the student's hidden states at the completion positions and its output layer's weight (the
    teacher's side comes in the target, `TeacherTarget.hidden` and `.head`)."""
    inputs.student_hidden = hidden  # [B, N, H_S], carries the gradient
    inputs.student_head = student.get_output_embeddings().weight  # [V_S, H_S]
