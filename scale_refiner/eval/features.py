"""Feature extraction: the CLS token after the final norm, in eval mode, batched."""
from __future__ import annotations

import torch


@torch.no_grad()
def extract_cls(encoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    was_training = encoder.training
    encoder.eval()
    feats = [encoder([images[i:i + batch_size]])[0]["final"].float() for i in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(feats)
