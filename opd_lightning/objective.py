"""The training objective: weighted loss terms, each against a reference model on a set of completions.

OPD recipes mix terms: the distillation loss against the teacher on the student's rollouts, plus, e.g.,
λ·SFT on gold completions and β·KL to the initial student (Stable-OPD). A `LossTerm` names one such term; the
module computes each reference's target once per micro-batch however many terms read it. Losses and aligners are
given by registry name, by name with arguments (`{name: sampled_token, credit: discounted}`), by `class_path` /
`init_args` (LightningCLI), or as instances.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from torch import nn

from opd_lightning.aligners import ALIGNERS, Aligner, IdentityAligner
from opd_lightning.hparams import build_class
from opd_lightning.losses import (
    HIDDEN_STATES,
    LOSSES,
    TEACHER_LOGITS,
    TEACHER_TOKEN_LOGPROBS,
    TEACHER_TOPK,
    DistillationLoss,
)
from opd_lightning.registry import Registry

log = logging.getLogger(__name__)

__all__ = ["LossTerm", "check_pairing", "fused_batches", "resolve_aligner", "resolve_loss"]

Reference = Literal["teacher", "initial_student"]
Completions = Literal["rollout", "gold"]


def _resolve(spec: Any, registry: Registry, base: type) -> Any:
    if isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        return registry.build(spec)
    if isinstance(spec, dict) and "name" in spec:
        args = {k: v for k, v in spec.items() if k != "name"}
        cls = registry[spec["name"]]
        try:
            return cls(**args)
        except TypeError as error:
            raise TypeError(f"{registry.kind} {spec['name']!r} does not take {sorted(args)}: {error}. Its arguments "
                            f"are listed by `opd fit --help` under {cls.__module__}.{cls.__qualname__}") from None
    if isinstance(spec, dict) and "class_path" in spec:
        return build_class(spec)
    raise TypeError(f"a {registry.kind} is a registry name ({', '.join(sorted(registry))}), a mapping "
                    f"{{name: ..., <arguments>}}, a class_path/init_args mapping or an instance; got {spec!r}")


def resolve_loss(loss: DistillationLoss | str | dict) -> DistillationLoss:
    """A loss instance from a registry name (default arguments), `{name: ..., **arguments}` or an instance."""
    return _resolve(loss, LOSSES, DistillationLoss)


def resolve_aligner(aligner: Aligner | str | dict) -> Aligner:
    """An aligner instance from a registry name (default arguments), `{name: ..., **arguments}` or an instance."""
    return _resolve(aligner, ALIGNERS, Aligner)


class LossTerm(nn.Module):
    """One weighted term of the objective."""

    def __init__(self, loss: DistillationLoss | str | dict, weight: float = 1.0, reference: Reference = "teacher",
                 completions: Completions = "rollout") -> None:
        """
        Args:
            loss: a registered loss name (built with defaults), a mapping `{name: ..., <arguments>}`, or a loss
                instance (`class_path`/`init_args`).
            weight: multiplier of this term in the total loss.
            reference: whose distribution the loss compares the student with: the teacher, or a frozen copy of
                the student as it was before training (with LoRA: the base model with the adapter disabled).
            completions: the student's rollouts, or the dataset's gold completions (for SFT-style terms).
        """
        super().__init__()
        self.loss = resolve_loss(loss)
        self.weight = weight
        self.reference = reference
        self.completions = completions

    @classmethod
    def of(cls, term: LossTerm | dict) -> LossTerm:
        """A term from its plain form (`{loss, weight, reference, completions}`), or the term itself."""
        return cls(**term) if isinstance(term, dict) else term

    @property
    def name(self) -> str:
        suffix = "" if self.reference == "teacher" else f"@{self.reference}"
        suffix += "" if self.completions == "rollout" else f"@{self.completions}"
        return f"{self.loss.registry_name}{suffix}"

    @property
    def needs_reference(self) -> bool:
        return bool(self.loss.requires)


def check_pairing(terms: list[LossTerm], aligner: Aligner,
                  teacher_topk: int | None = None) -> dict[tuple[str, str], frozenset[str]]:
    """What each (reference, completions) pair must provide, checked against what can provide it.

    The teacher's outputs come through `aligner`; the initial student shares the student's tokenizer, so its
    outputs come as the identity aligner's would, hidden states excepted (the teacher's output layer is what a
    hidden-state loss projects into). With `teacher_topk`, the references' distributions come in their top-k form,
    taken from a dense one, and every loss that reads a distribution must accept it. Raises, naming the aligners that
    would serve, when a loss needs an input its reference cannot give.
    """
    needs: dict[tuple[str, str], frozenset[str]] = {}
    for term in terms:
        if not term.needs_reference:
            continue
        requires = term.loss.requires
        if teacher_topk is not None:
            dense = requires - {TEACHER_TOKEN_LOGPROBS} - ({TEACHER_LOGITS} if term.loss.accepts_topk else set())
            if dense:
                accepting = sorted(name for name, cls in LOSSES.items() if cls.accepts_topk)
                raise ValueError(f"model.teacher_topk is set, but loss {term.loss.registry_name!r} needs the teacher's "
                                 f"dense outputs ({', '.join(sorted(dense))}): set model.teacher_topk to null "
                                 f"(--model.teacher_topk null) for it; losses that take the top-k form: "
                                 f"{', '.join(accepting)}")
            requires = requires - {TEACHER_LOGITS} | ({TEACHER_TOPK} if TEACHER_LOGITS in requires else set())
        key = (term.reference, term.completions)
        needs[key] = needs.get(key, frozenset()) | requires
        provides = aligner.provides if term.reference == "teacher" else IdentityAligner.provides - {HIDDEN_STATES}
        provides = provides | ({TEACHER_TOPK} if TEACHER_LOGITS in provides else set())
        missing = requires - provides
        if missing:
            serving = sorted(name for name, cls in ALIGNERS.items() if term.loss.requires <= cls.provides)
            where = (f"aligner {aligner.registry_name!r}" if term.reference == "teacher"
                     else "the initial student (same tokenizer)")
            raise ValueError(f"loss {term.loss.registry_name!r} needs {sorted(missing)}, which {where} does not "
                             f"provide. Aligners that provide everything it needs: {serving or 'none'}.")
    return needs


def fused_batches(terms, chunk_size: int | str | None, aligner: Aligner) -> frozenset[str]:
    """The completions ("rollout", "gold") whose every term can read the student as hidden states and the output
    layer (`DistillationLoss.fuses`: the dense divergences, `uld`, `gold`; `model.logits_chunk_size`); none without a
    chunk size. A term against the
    teacher through an aligner that projects the student (`char_level`) needs the logits themselves. Batches with
    any other term keep their logits, and the log says which terms and why."""
    if chunk_size is None:
        return frozenset()
    fits = lambda t: t.loss.fuses and not (t.reference == "teacher" and aligner.projects_student)
    groups: dict[str, list] = {}
    for term in terms:
        groups.setdefault(term.completions, []).append(term)
    fused = {c for c, group in groups.items() if all(fits(t) for t in group)}
    for completions in sorted(set(groups) - fused):
        names = ", ".join(t.name for t in groups[completions] if not fits(t))
        log.info("logits_chunk_size: the %s batches keep their [B, N, V] logits, which %s read%s", completions, names,
                 f" (aligner {aligner.registry_name} projects the student)" if aligner.projects_student else "")
    return frozenset(fused)
