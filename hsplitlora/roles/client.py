"""The client role: private data, the client segment, its adapters and optimizer."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from hsplitlora.models.lora import (
    LoraSettings,
    load_lora_state,
    lora_parameters,
    lora_state,
    merge_base_update,
    restart_lora,
    tail_penalty,
    trained_lora_keys,
)
from hsplitlora.models.shared import MergeState, adopt_merges
from hsplitlora.models.split import ClientSegment, ServerSegment
from hsplitlora.privacy.config import PrivacyConfig
from hsplitlora.privacy.mechanism import Gaussian
from hsplitlora.roles.loss import segment_loss
from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.roles.party_state import load_party_state, party_state
from hsplitlora.runtime.compile import compiled_blocks
from hsplitlora.runtime.optim import Optimizer, OptimSettings, autocast

if TYPE_CHECKING:
    from hsplitlora.hetero.importance import ProbeServer

__all__ = ["Client", "Update"]

Update = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # dense [d_out, n_in] or (U, V)


class Client:
    """Runs embeddings + blocks ``[0, k)`` on its own shard and trains their adapters.

    The raw tokens never leave this object: :meth:`forward` returns only activations,
    mask and labels; :meth:`backward` takes only the activation gradient.

    With a ``tail`` (a U-shaped split) it also holds blocks ``[L - t, L)``, the final norm
    and the head: :meth:`forward` sends no labels, :meth:`finish` takes the server's
    activations at ``L - t`` and computes the loss here. The tail's adapters are the
    client's own: one optimizer, one adapter state, aggregated with the client side.

    With ``privacy`` enabled, the activations it returns and the adapters it
    :meth:`upload` s are clipped and noised right here, whatever carries them on
    (docs/privacy.md).
    """

    def __init__(
        self,
        client_id: int,
        segment: ClientSegment,
        batches: Iterator[dict[str, torch.Tensor]],
        num_samples: int,
        optim: OptimSettings,
        *,
        precision: str = "bf16",
        device: torch.device | str = "cpu",
        probes: Iterator[dict[str, torch.Tensor]] | None = None,
        compile: bool = False,
        tail: ServerSegment | None = None,
        label_smoothing: float = 0.0,
        privacy: PrivacyConfig | None = None,
        noise_seed: int = 0,
    ) -> None:
        self.client_id = client_id
        self.device = torch.device(device)
        self.segment = segment.to(self.device)
        self.tail = tail.to(self.device) if tail is not None else None
        self.label_smoothing = label_smoothing
        self.batches = batches
        self.probes = probes  # importance-probe batches (heterogeneous runs), apart from training's
        self.num_samples = num_samples
        self.precision = precision
        self.compile = compile  # torch.compile the blocks in training (train.compile)
        self.optimizer = Optimizer(self._parameters(), optim)
        self._pending: torch.Tensor | None = None
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None  # mask, labels (tail)
        self._smashed: Gaussian | None = None  # the activations' channel
        self._update: Gaussian | None = None  # the adapter update's
        if privacy is not None and privacy.enabled:
            if privacy.activation_clip is not None:
                self._smashed = Gaussian(privacy.activation_clip, privacy.activation_noise,
                                         noise_seed)
            if privacy.adapter_clip is not None:
                self._update = Gaussian(privacy.adapter_clip, privacy.adapter_noise,
                                        noise_seed + 1)
        # the adapters the update is measured from: the last aggregate this client took
        self._reference = self.adapter_state() if self._update is not None else None

    @property
    def cut(self) -> int:
        return len(self.segment.blocks)

    @property
    def holds_tail(self) -> bool:
        """A U-shaped split: this client runs the last blocks, the head and the loss."""
        return self.tail is not None

    @property
    def pending(self) -> torch.Tensor | None:
        """The activations of a forward pass that awaits its gradient, if any."""
        return self._pending

    def forward(self) -> Activations:
        """Draw the next local batch and run it through the client segment."""
        if self._pending is not None:
            raise RuntimeError(f"client {self.client_id}: forward called twice without backward")
        batch = {k: v.to(self.device) for k, v in next(self.batches).items()}
        self.segment.train()
        with autocast(self.precision, self.device), \
                compiled_blocks(self.segment.blocks, self.compile):
            hidden = self.segment(batch["input_ids"], batch["attention_mask"])
        if self._smashed is not None:
            # what is sent is what is back-propagated from: the server's gradient is
            # w.r.t. the noised tensor, the only one it saw (docs/privacy.md)
            hidden = self._smashed.activations(hidden)
        self._pending = hidden
        if self.tail is None:
            return Activations(hidden.detach(), batch["attention_mask"], batch["labels"])
        self._kept = (batch["attention_mask"], batch["labels"])
        return Activations(hidden.detach(), batch["attention_mask"], None)

    def finish(self, returned: torch.Tensor) -> ServerReply:
        """U-shaped split: run the tail on the server's activations at ``L - t``, take the
        loss on the labels kept here and back-propagate it into the tail; the reply's
        gradient (at ``L - t``) goes back to the server. :meth:`backward` then steps."""
        if self.tail is None or self._kept is None:
            raise RuntimeError(f"client {self.client_id}: finish needs a tail and a forward "
                               "awaiting it")
        (mask, labels), self._kept = self._kept, None
        loss, tokens, grad = segment_loss(
            self.tail, returned, mask, labels, precision=self.precision, device=self.device,
            label_smoothing=self.label_smoothing, compile=self.compile)
        return ServerReply(loss, tokens, grad)

    def backward(self, grad: torch.Tensor) -> None:
        """Finish back-propagation with the server's activation gradient, then step."""
        hidden, self._pending = self._pending, None
        if hidden is None:
            raise RuntimeError(f"client {self.client_id}: backward called before forward")
        if grad.shape != hidden.shape:
            raise ValueError(f"client {self.client_id}: gradient shape {tuple(grad.shape)} does "
                             f"not match activations {tuple(hidden.shape)}")
        if hidden.requires_grad:  # a cut of 0 leaves nothing trainable on the client
            hidden.backward(grad.to(device=hidden.device, dtype=hidden.dtype))
        s = self.optimizer.settings
        for segment in self._segments():
            tail_penalty(segment, s.tail_gamma, s.tail_lambda)
        self.optimizer.step()

    def _segments(self) -> list[ClientSegment | ServerSegment]:
        return [self.segment] if self.tail is None else [self.segment, self.tail]

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for segment in self._segments() for p in lora_parameters(segment)]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v for segment in self._segments() for k, v in lora_state(segment).items()}

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        load_lora_state(self._segments(), state)
        if self._update is not None:
            self._reference = self.adapter_state()

    def upload(self) -> dict[str, torch.Tensor]:
        """The adapters this client sends to aggregation: its own, or with privacy's
        adapter bound the last aggregate plus its clipped and noised update (trained
        factors only: a frozen one stays the common initialisation every client holds)."""
        state = self.adapter_state()
        if self._update is None or self._reference is None:
            return state
        trained = set().union(*(trained_lora_keys(s) for s in self._segments()))
        ref = self._reference
        # in the state's order, not the set's: noise is drawn tensor by tensor, and a set
        # of strings iterates in a per-process order (hash randomisation)
        noised = self._update.update({k: v - ref[k] for k, v in state.items() if k in trained})
        return {k: ref[k] + noised[k] if k in trained else v for k, v in state.items()}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on exactly as this client would: adapters,
        optimizer, the positions of its batch streams and its process's RNG (dropout).
        The segment's base weights and ranks come from the run's plan, not from here."""
        state = party_state(self, self._streams())
        if self._smashed is not None or self._update is not None:
            state["privacy"] = self.privacy_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`, into a segment built for the same plan."""
        load_party_state(self, state, self._streams())
        self._pending = self._kept = None
        if "privacy" in state:
            self.load_privacy_state(state["privacy"])

    def privacy_state(self) -> dict[str, Any]:
        """Where each noise stream stands and the update's reference: a restored client
        must never draw the same noise twice (two releases with one noise vector would
        give away the difference of their activations exactly)."""
        return {"noise": [g.generator.get_state() if g else None for g in self._channels()],
                "reference": self._reference}

    def load_privacy_state(self, state: Mapping[str, Any]) -> None:
        for g, rng in zip(self._channels(), state["noise"], strict=True):
            if g is not None and rng is not None:
                g.generator.set_state(rng)
        self._reference = state["reference"]

    def _channels(self) -> tuple[Gaussian | None, Gaussian | None]:
        return self._smashed, self._update

    def _streams(self) -> dict[str, Iterator[dict[str, torch.Tensor]] | None]:
        return {"batches": self.batches, "probes": self.probes}

    def apply_update(self, updates: Mapping[str, Update], settings: LoraSettings,
                     version: int) -> None:
        """Merge aggregation ``version``'s update (noise-free aggregation) into the base
        weights of this client's blocks (once per process: parties share them), then
        restart its adapters at the ranks ``settings`` plans for it."""
        for segment in self._segments():  # a U-shaped client's tail holds merged blocks too
            merge_base_update(segment, updates, version,
                              fan_in_fan_out=segment.spec.fan_in_fan_out)
        self.reset_adapters(settings)

    def replace_segment(self, segment: ClientSegment,
                        merges: Mapping[str, MergeState] | None = None) -> None:
        """Run a new segment from now on (the client's cut changed at a re-plan); the
        caller restarts its adapters with :meth:`reset_adapters`. ``merges``: what was
        merged into its weights, when it arrives from another process."""
        self.segment = segment.to(self.device)
        if merges:
            adopt_merges(self.segment, merges)
        self._pending = None

    def reset_adapters(self, settings: LoraSettings) -> None:
        """Fresh adapters (A random, B zero) at the planned ranks, and a fresh AdamW."""
        for segment in self._segments():
            restart_lora(segment, settings)
        self.optimizer.reset(self._parameters())

    def probe_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The next ``n`` importance-probe batches of this client's shard."""
        if self.probes is None:
            raise RuntimeError(f"client {self.client_id} was built without probe batches")
        return [next(self.probes) for _ in range(n)]

    def score(self, n: int, server: ProbeServer) -> dict[str, float]:
        """Importance of this client's matrices (its tail's too) on ``n`` probe batches of
        its own, with the main server's gradients from ``server`` (a local scorer or a
        network round trip); nothing is updated. The raw batches and, with a tail, the
        labels stay here, as in training."""
        from hsplitlora.hetero.importance import segment_importance

        return segment_importance(self.segment, self.probe_batches(n), server, self.precision,
                                  tail=self.tail, label_smoothing=self.label_smoothing)
