"""Cross-initialisation (Pang et al., CVPR 2024, arXiv 2312.15905): start a word from what the
text encoder makes of its initializer, not from the initializer's input row.

Their code (lyuPang/CrossInitialization, `token_cross_init`) encodes the initializer words and
takes the text encoder's output at the words' positions, the very per-token conditioning the
UNet reads (SD 1.x/2.x: the last hidden state after the final layer norm; engine.sd.family's
`token_states`: SDXL's penultimate states of each encoder), and writes those output vectors
into the input embedding rows of the new tokens.  Training then adds a small L2 pull toward
that start (engine.inversion.regularize, column "cross").

Here the initializer is the run's own (--init): a word of N tokens gives the outputs at its N
positions; one word repeated for N vectors gives its one output N times.  Their default
averages ~700 celebrity names instead, which is their face-specific choice, not the method.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def cross_init_blocks(family, encoders, init: str, n: int) -> list[torch.Tensor]:
    """Per text encoder, the [n, width] fp32 start of a cross-initialised word."""
    ids, positions = zip(*(_prompt_ids(tokenizer, init, n) for _, tokenizer in encoders))
    device = encoders[0][0].get_input_embeddings().weight.device
    states = family.token_states(encoders, [x.to(device) for x in ids])
    return [s[0, list(p)].detach().float().cpu().clone() for s, p in zip(states, positions)]


def _prompt_ids(tokenizer, init: str, n: int) -> tuple[torch.Tensor, list[int]]:
    """[1, 77] ids of "BOS <initializer> EOS pad…" and the positions whose outputs start the n vectors."""
    from engine.store.library import initializer_ids

    wanted = initializer_ids(tokenizer, init, n)  # the same checks and tokens as a token start
    words = tokenizer(" ".join(init.split()), add_special_tokens=False).input_ids
    words = words if len(words) == n else wanted[:1]  # one word repeated: its one output, n times
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]
    ids += [pad] * (length - len(ids))
    positions = list(range(1, n + 1)) if len(words) == n else [1] * n
    return torch.tensor([ids]), positions
