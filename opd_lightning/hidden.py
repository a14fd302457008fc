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

import torch
from torch import Tensor, nn

from opd_lightning.aligners import Aligner, TeacherHidden
from opd_lightning.losses import HIDDEN_STATES, LossInputs

__all__ = ["capture_layers", "check_bypassed", "fill_student_hidden", "layer_depth", "needs_hidden", "output_layer",
           "output_layer_bypassed", "output_layer_input", "reads_hidden", "reads_layers", "setup_sizes", "teacher_hidden",
           "vocab_size"]


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


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or getattr(decoder, "embed_tokens", None) is None:
        raise ValueError(f"{type(model).__name__} does not expose its decoder's embeddings and layers "
                         "(`get_decoder().embed_tokens` and `.layers`), which a loss reading its layers' hidden states "
                         "(hidden_match) hooks: use a decoder-only transformers model, or another loss")
    return decoder, layers


def layer_depth(model: nn.Module) -> int:
    """Number of decoder layers of `model`: its hidden states are numbered 0 (embeddings) to this."""
    return len(_decoder_layers(model)[1])


@contextmanager
def capture_layers(model: nn.Module, indices: Iterable[int], store: dict[int, Tensor]) -> Iterator[None]:
    """During the block, `store[i]` (`[B, T, H]`, with its graph) becomes the hidden state that transformers'
    `output_hidden_states=True` numbers `i`, at every position of the forward: 0 the embeddings' output, `i` in
    1..L-1 the output of decoder layer `i`, L the last layer's output after the final norm (what the output layer
    reads; the last layer's own output where the decoder has no `norm`). Read by forward hooks, so the forward keeps
    its own arguments (`logits_to_keep` cuts the logits, not these) and only the layers asked for are kept."""
    indices = sorted(set(indices))
    if not indices:
        yield
        return
    decoder, layers = _decoder_layers(model)
    depth = len(layers)
    handles = []
    try:
        for i in indices:
            if not 0 <= i <= depth:
                raise ValueError(f"hidden state {i} asked of {type(model).__name__}, which numbers its hidden states "
                                 f"0 to {depth} (embeddings, then its {depth} layers)")
            module = (decoder.embed_tokens if i == 0 else layers[i - 1] if i < depth
                      else getattr(decoder, "norm", None) or layers[-1])
            handles.append(module.register_forward_hook(
                lambda mod, args, out, i=i: store.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def reads_layers(loss) -> bool:
    """Whether `loss` compares the two models' hidden states layer by layer along whole sequences (`hidden_match`)."""
    return getattr(loss, "reads_layers", False)


def needs_hidden(terms: Iterable, completions: str) -> bool:
    """Whether a loss term on `completions` ("rollout" or "gold") reads hidden states."""
    return any(reads_hidden(t.loss) for t in terms if t.completions == completions)


def reads_hidden(loss) -> bool:
    """Whether `loss` reads the student's hidden states (HIDDEN_STATES asks for the teacher's too)."""
    return HIDDEN_STATES in loss.requires or loss.reads_student_hidden


def _width(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return 0 if head is None else head.weight.shape[1]  # a served teacher: no hidden states here


def setup_sizes(terms: Iterable, aligner: Aligner, student: nn.Module, teacher: nn.Module) -> None:
    """Let every loss and the aligner create their size-dependent parameters (a no-op for most)."""
    sizes = (_width(student), _width(teacher))
    for term in terms:
        if reads_layers(term.loss):
            term.loss.setup_layers(layer_depth(student), layer_depth(teacher))
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


def output_layer(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight `[V, H]` and bias `[V]` (or None) that `model`'s output layer applies, with their graph: a tied layer
    gives the embedding matrix itself, a LoRA-adapted one its effective weight (base plus the active adapters' deltas),
    so that gradients reach whatever the weight is computed from.

    Refuses what a plain `hidden @ weightᵀ + bias` cannot reproduce: a final logit soft-cap or scale in the model, and
    dropout on an adapted output layer.
    """
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} applies {name} = {getattr(config, name)} after its output layer, "
                             "which the fused output layer does not reproduce: set model.logits_chunk_size to null")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output layer in this process")
    if hasattr(head, "base_layer") and hasattr(head, "lora_A"):  # a PEFT LoRA layer
        weight, bias = head.base_layer.weight, head.base_layer.bias
        if not head.merged and not head.disable_adapters:
            active = [a for a in head.active_adapters if a in head.lora_A]
            if any(not isinstance(head.lora_dropout[a], nn.Identity) for a in active):
                raise ValueError("the output layer carries a LoRA adapter with dropout, which the fused output layer "
                                 "does not reproduce: set lora.dropout to 0, or model.logits_chunk_size to null")
            weight = weight + sum(head.get_delta_weight(a) for a in active) if active else weight
        return weight, bias
    return head.weight, getattr(head, "bias", None)


@contextmanager
def output_layer_bypassed(model: nn.Module) -> Iterator[None]:
    """During the block, `model`'s output layer returns its input: the model's "logits" are the hidden states the
    output layer would read (cut to the kept positions by `logits_to_keep` as usual), and no `[B, T, V]` is formed.
    Module hooks on the layer still run (FSDP's gathers among them)."""
    head = model.get_output_embeddings()
    head.forward = _identity  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward


def _identity(x: Tensor, *args, **kwargs) -> Tensor:
    return x


def check_bypassed(hidden: Tensor, weight: Tensor, model: nn.Module) -> Tensor:
    """`hidden` from a forward under `output_layer_bypassed`, checked to be hidden states and not logits."""
    if hidden.shape[-1] != weight.shape[-1] or not torch.is_floating_point(hidden):
        raise ValueError(f"{type(model).__name__}'s forward did not pass its last hidden states through "
                         "get_output_embeddings(), so the fused output layer cannot read them: set "
                         "model.logits_chunk_size to null")
    return hidden


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's output layer: the width of its logits (a served teacher's: its configured size)."""
    head = model.get_output_embeddings()
    return model.config.vocab_size if head is None else head.weight.shape[0]
