"""Image-text contrastive learning (ITC): temperature, the symmetric loss, and the momentum feature queue.

One loss covers the in-batch CLIP/FLAVA/VLMo case and the ALBEF case (momentum keys, a queue of extra keys and
soft targets from the momentum model). Distributed behaviour is set by two flags, as in open_clip:

- ``gather_with_grad``: whether gradients flow through the all-gather of the online features
  (FLAVA: yes; VLMo: no). Momentum features and queue keys never carry gradients.
- ``local_loss``: each rank scores only its own queries against all keys (labels offset by ``rank * B``)
  instead of every rank computing the full ``(W*B) x (W*B)`` loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.distributed import gather_features, rank

__all__ = ["ContrastiveLoss", "ContrastiveOutput", "FeatureQueue", "Temperature", "soft_cross_entropy"]


class Temperature(nn.Module):
    """Softmax temperature of the contrastive logits (ALBEF parameterises the temperature itself).

    Call :meth:`clamp_` after every optimiser step; clamping in the forward would hide the true parameter
    value from the optimiser state and from checkpoints.

    Args:
        init: initial temperature (0.07 in CLIP, ALBEF, VLMo).
        min_value, max_value: clamp range (ALBEF: [0.001, 0.5]; FLAVA's "logit scale <= ln 100" is
            ``min_value=0.01``).
        learnable: ``False`` stores the temperature as a buffer (e.g. VLMixer's CMCL with a fixed 0.07).
    """

    def __init__(
        self, init: float = 0.07, min_value: float = 0.001, max_value: float = 0.5, learnable: bool = True
    ) -> None:
        super().__init__()
        if not 0 < min_value <= init <= max_value:
            raise ValueError(f"need 0 < min_value <= init <= max_value, got {min_value}, {init}, {max_value}")
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        value = torch.tensor(float(init))
        if learnable:
            self.value = nn.Parameter(value)
        else:
            self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        """The temperature, a 0-d tensor."""
        return self.value

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the value into ``[min_value, max_value]`` in place."""
        self.value.clamp_(self.min_value, self.max_value)

    def extra_repr(self) -> str:
        return f"value={self.value.item():.4g}, range=[{self.min_value}, {self.max_value}]"


class FeatureQueue(nn.Module):
    """Ring queue of L2-normalised momentum features (and their sample ids), as in ALBEF / MoCo.

    Everything lives in registered buffers, the write pointer included, so the queue is saved and restored
    with the model's ``state_dict`` and resume continues where it stopped.

    Buffers:
        feats: ``(dim, size)``; initialised to random unit vectors (ALBEF), which act as extra negatives until
            the queue has been filled once.
        ids: ``(size,)`` int64 sample ids of the queued features, -1 for the initial random entries.
        ptr: 0-d int64, next slot to write.
    """

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"dim and size must be positive, got {dim}, {size}")
        self.register_buffer("feats", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def dim(self) -> int:
        return self.feats.shape[0]

    @property
    def size(self) -> int:
        return self.feats.shape[1]

    def keys(self) -> torch.Tensor:
        """The queued features as keys, ``(size, dim)`` (a detached view)."""
        return self.feats.detach().t()

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Append this step's features from every rank, overwriting the oldest entries.

        Args:
            feats: ``(B, dim)`` local momentum features (normalised here; no gradient is kept).
            ids: optional ``(B,)`` int64 sample ids; -1 is stored when omitted.

        Raises:
            ValueError: if ``size`` is not a multiple of the global batch ``world_size * B`` (otherwise a
                batch would straddle the wrap-around and the queue would hold a partial, misaligned batch).
        """
        feats = gather_features(F.normalize(feats.detach(), dim=-1), with_grad=False)
        n = feats.shape[0]
        if self.size % n != 0:
            raise ValueError(f"queue size {self.size} is not a multiple of the global batch size {n}")
        if ids is None:
            ids = torch.full((n,), -1, dtype=torch.long, device=self.ids.device)
        else:
            ids = gather_features(ids.detach().to(self.ids.device, torch.long), with_grad=False)
        # Slot indices computed on the device from the pointer buffer: no host sync per step.
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.feats.index_copy_(1, slots, feats.t().to(self.feats.dtype))
        self.ids.index_copy_(0, slots, ids)
        self.ptr.copy_((self.ptr + n) % self.size)


@dataclass
class ContrastiveOutput:
    """Result of :class:`ContrastiveLoss`.

    ``Q`` is the number of queries (``B`` with ``local_loss``, else ``world_size * B``); ``K`` the number of
    candidates (``world_size * B`` batch keys followed by the queue entries).
    """

    loss: torch.Tensor  # scalar, (loss_i2t + loss_t2i) / 2
    loss_i2t: torch.Tensor  # scalar
    loss_t2i: torch.Tensor  # scalar
    logits_i2t: torch.Tensor  # (Q, K) image queries vs text candidates, already divided by the temperature
    logits_t2i: torch.Tensor  # (Q, K) text queries vs image candidates


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_k targets[k] * log_softmax(logits)[k]``.

    Args:
        logits: ``(N, K)``.
        targets: ``(N, K)`` probabilities (rows sum to 1).

    Returns:
        Scalar.
    """
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class ContrastiveLoss(nn.Module):
    """Symmetric image-text InfoNCE over L2-normalised features, with optional momentum distillation.

    Args:
        gather_with_grad: gather the online features with gradients (see :func:`gather_features`).
        local_loss: score only local queries against all keys; labels are offset by ``rank * B``.

    With momentum features (ALBEF) the candidates are the momentum keys of the batch followed by the queue
    keys, the online features are the queries, and the targets are
    ``alpha * softmax(momentum_query @ keys.T / T) + (1 - alpha) * hard``, where ``hard`` is one-hot on the
    positive, or uniform over all candidates that share the query's id when ``ids`` are given (ALBEF's
    retrieval fine-tuning, where one image has several captions).
    """

    def __init__(self, gather_with_grad: bool = False, local_loss: bool = False) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def forward(
        self,
        image_feats: torch.Tensor,
        text_feats: torch.Tensor,
        temperature: torch.Tensor | float,
        *,
        image_feats_m: torch.Tensor | None = None,
        text_feats_m: torch.Tensor | None = None,
        image_queue: torch.Tensor | None = None,
        text_queue: torch.Tensor | None = None,
        alpha: float = 0.0,
        ids: torch.Tensor | None = None,
        queue_ids: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        """Compute the loss.

        Args:
            image_feats, text_feats: ``(B, D)`` projected [CLS] features of the local batch (normalised here).
            temperature: scalar (0-d tensor, e.g. ``Temperature()()``, or float).
            image_feats_m, text_feats_m: ``(B, D)`` momentum-model features of the same batch; when given they
                replace the online features as batch keys (and are normalised here).
            image_queue, text_queue: ``(K_q, D)`` extra keys, unit-norm (``FeatureQueue.keys()``); appended
                after the batch keys. Both or neither.
            alpha: distillation weight in [0, 1]; > 0 needs the momentum features.
            ids: ``(B,)`` int64 sample ids; candidates with the query's id are all positives.
            queue_ids: ``(K_q,)`` ids of the queued pairs (``FeatureQueue.ids``); needed with ``ids`` and a
                queue.
            valid: optional ``(B,)`` bool row mask (as in torchmultimodal's contrastive loss): a row with
                ``False`` (e.g. a sample of a mixed batch without a caption) is neither a query nor a key.
                It is gathered from every rank with the features. Invalid keys get ``-inf`` logits, invalid
                queries are left out of the mean (which is over the valid queries), and with no valid query
                the loss is a graph-connected 0. Queue keys always count (enqueue only valid rows). ``None``
                is the unmasked loss; an all-True mask gives exactly the same values.

        Returns:
            :class:`ContrastiveOutput`. With ``valid``, the returned logits hold ``-inf`` in the columns of
            invalid batch keys (in the rows of valid queries); the rows of invalid queries are meaningless.
        """
        if (image_feats_m is None) != (text_feats_m is None):
            raise ValueError("pass both momentum features or neither")
        if (image_queue is None) != (text_queue is None):
            raise ValueError("pass both queues or neither")
        momentum = image_feats_m is not None
        if alpha > 0 and not momentum:
            raise ValueError("alpha > 0 needs momentum features for the soft targets")
        if ids is not None and image_queue is not None and queue_ids is None:
            raise ValueError("ids with a queue need queue_ids")
        if valid is not None and (valid.shape != image_feats.shape[:1] or valid.dtype != torch.bool):
            raise ValueError(
                f"valid must be a ({image_feats.shape[0]},) bool mask, got {valid.dtype} {valid.shape}"
            )

        batch = image_feats.shape[0]
        img = F.normalize(image_feats, dim=-1)
        txt = F.normalize(text_feats, dim=-1)
        img_all = gather_features(img, self.gather_with_grad)
        txt_all = gather_features(txt, self.gather_with_grad)

        if momentum:
            with torch.no_grad():
                img_m = F.normalize(image_feats_m.detach(), dim=-1)
                txt_m = F.normalize(text_feats_m.detach(), dim=-1)
                img_m_all = gather_features(img_m, with_grad=False)
                txt_m_all = gather_features(txt_m, with_grad=False)
            img_keys, txt_keys = img_m_all, txt_m_all
        else:
            img_keys, txt_keys = img_all, txt_all
        if image_queue is not None:
            img_keys = torch.cat([img_keys, image_queue.detach().to(img_keys.dtype)], dim=0)
            txt_keys = torch.cat([txt_keys, text_queue.detach().to(txt_keys.dtype)], dim=0)

        if self.local_loss:
            img_q, txt_q, offset = img, txt, rank() * batch
        else:
            img_q, txt_q, offset = img_all, txt_all, 0
        logits_i2t = img_q @ txt_keys.t() / temperature
        logits_t2i = txt_q @ img_keys.t() / temperature
        n_query = img_q.shape[0]
        if valid is not None:
            img_mq = txt_mq = None
            if momentum:
                img_mq = img_m if self.local_loss else img_m_all
                txt_mq = txt_m if self.local_loss else txt_m_all
            return self._masked_loss(
                valid,
                logits_i2t,
                logits_t2i,
                temperature,
                offset=offset,
                img_keys=img_keys,
                txt_keys=txt_keys,
                img_mq=img_mq,
                txt_mq=txt_mq,
                alpha=alpha,
                ids=ids,
                queue_ids=queue_ids,
            )

        hard: torch.Tensor | None = None
        if ids is not None:
            ids_all = gather_features(ids.detach(), with_grad=False)
            query_ids = ids if self.local_loss else ids_all
            key_ids = ids_all if image_queue is None else torch.cat([ids_all, queue_ids.to(ids_all)])
            pos = (query_ids[:, None] == key_ids[None, :]).to(logits_i2t.dtype)
            hard = pos / pos.sum(dim=1, keepdim=True)
        elif alpha > 0:
            labels = torch.arange(n_query, device=logits_i2t.device) + offset
            hard = F.one_hot(labels, logits_i2t.shape[1]).to(logits_i2t.dtype)

        if hard is None:
            labels = torch.arange(n_query, device=logits_i2t.device) + offset
            loss_i2t = F.cross_entropy(logits_i2t, labels)
            loss_t2i = F.cross_entropy(logits_t2i, labels)
        else:
            targets_i2t = targets_t2i = hard
            if alpha > 0:
                with torch.no_grad():
                    temp = temperature.detach() if isinstance(temperature, torch.Tensor) else temperature
                    img_mq = img_m if self.local_loss else img_m_all
                    txt_mq = txt_m if self.local_loss else txt_m_all
                    soft_i2t = F.softmax(img_mq @ txt_keys.t() / temp, dim=1)
                    soft_t2i = F.softmax(txt_mq @ img_keys.t() / temp, dim=1)
                    targets_i2t = alpha * soft_i2t + (1 - alpha) * hard
                    targets_t2i = alpha * soft_t2i + (1 - alpha) * hard
            loss_i2t = soft_cross_entropy(logits_i2t, targets_i2t)
            loss_t2i = soft_cross_entropy(logits_t2i, targets_t2i)

        return ContrastiveOutput(
            loss=(loss_i2t + loss_t2i) / 2,
            loss_i2t=loss_i2t,
            loss_t2i=loss_t2i,
            logits_i2t=logits_i2t,
            logits_t2i=logits_t2i,
        )

    def _masked_loss(
        self,
        valid: torch.Tensor,
        logits_i2t: torch.Tensor,
        logits_t2i: torch.Tensor,
        temperature: torch.Tensor | float,
        *,
        offset: int,
        img_keys: torch.Tensor,
        txt_keys: torch.Tensor,
        img_mq: torch.Tensor | None,
        txt_mq: torch.Tensor | None,
        alpha: float,
        ids: torch.Tensor | None,
        queue_ids: torch.Tensor | None,
    ) -> ContrastiveOutput:
        """The loss with a row mask (see ``valid`` in :meth:`forward`); no host sync.

        With an all-True mask every step below is the identity on the unmasked computation (a ``masked_fill``
        with nothing to fill, a ``where`` that picks the loss), so the values are bit-identical.
        """
        n_query, n_keys = logits_i2t.shape
        # Gathered as uint8 (every backend supports it); gather_features keeps the rank order of the features.
        local = valid.detach().to(device=logits_i2t.device, dtype=torch.uint8)
        valid_all = gather_features(local, with_grad=False).bool()
        local = local.bool()
        query_valid = local if self.local_loss else valid_all
        n_queue = n_keys - valid_all.shape[0]
        key_valid = torch.cat([valid_all, valid_all.new_ones(n_queue)]) if n_queue else valid_all
        # Keys are masked only in the rows of valid queries. A valid query's own positive is a valid key, so
        # no row is all -inf; an invalid query's row stays finite (its loss is dropped): nothing turns NaN.
        keep = key_valid[None, :] | ~query_valid[:, None]
        raw_i2t, raw_t2i = logits_i2t, logits_t2i
        logits_i2t = logits_i2t.masked_fill(~keep, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(~keep, float("-inf"))
        labels = torch.arange(n_query, device=logits_i2t.device) + offset

        hard: torch.Tensor | None = None
        if ids is not None:
            ids_all = gather_features(ids.detach(), with_grad=False)
            query_ids = ids if self.local_loss else ids_all
            key_ids = (
                ids_all if queue_ids is None or n_queue == 0 else torch.cat([ids_all, queue_ids.to(ids_all)])
            )
            pos = ((query_ids[:, None] == key_ids[None, :]) & keep).to(logits_i2t.dtype)
            hard = pos / pos.sum(dim=1, keepdim=True)
        elif alpha > 0:
            hard = F.one_hot(labels, n_keys).to(logits_i2t.dtype)

        if hard is None:
            # Ignored labels leave invalid queries out of the mean; with none valid the mean is 0/0, replaced
            # by a graph-connected zero from the unmasked logits (the where sends no gradient into the NaN).
            zero = (raw_i2t.sum() + raw_t2i.sum()) * 0
            any_valid = query_valid.any()
            labels = labels.masked_fill(~query_valid, -100)
            loss_i2t = torch.where(any_valid, F.cross_entropy(logits_i2t, labels, ignore_index=-100), zero)
            loss_t2i = torch.where(any_valid, F.cross_entropy(logits_t2i, labels, ignore_index=-100), zero)
        else:
            targets_i2t = targets_t2i = hard
            if alpha > 0:
                with torch.no_grad():
                    temp = temperature.detach() if isinstance(temperature, torch.Tensor) else temperature
                    soft_i2t = F.softmax(
                        (img_mq @ txt_keys.t() / temp).masked_fill(~keep, float("-inf")), dim=1
                    )
                    soft_t2i = F.softmax(
                        (txt_mq @ img_keys.t() / temp).masked_fill(~keep, float("-inf")), dim=1
                    )
                    targets_i2t = alpha * soft_i2t + (1 - alpha) * hard
                    targets_t2i = alpha * soft_t2i + (1 - alpha) * hard
            # Sum over the valid queries / their count (0 / 1 = 0 when none is valid, still graph-connected).
            count = query_valid.sum().clamp(min=1)
            loss_i2t = _masked_soft_ce(logits_i2t, targets_i2t, keep, query_valid) / count
            loss_t2i = _masked_soft_ce(logits_t2i, targets_t2i, keep, query_valid) / count

        return ContrastiveOutput(
            loss=(loss_i2t + loss_t2i) / 2,
            loss_i2t=loss_i2t,
            loss_t2i=loss_t2i,
            logits_i2t=logits_i2t,
            logits_t2i=logits_t2i,
        )


def _masked_soft_ce(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Sum over the ``rows`` of :func:`soft_cross_entropy`'s terms, with ``-inf`` logits outside ``keep``.

    The log-probabilities of dropped keys are -inf and their targets 0; they are zeroed before the product so
    that ``0 * -inf`` does not give NaN.
    """
    log_p = F.log_softmax(logits, dim=-1).masked_fill(~keep, 0.0)
    return -(targets * log_p).sum(dim=-1).masked_fill(~rows, 0.0).sum()
