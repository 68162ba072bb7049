"""MTP speculative decoding, the engine's verify step: each sequence drafts one token per MTP layer (the layers
chained, as trained), then the main model checks the pending token and the drafts in one forward. Greedy output is
plain greedy's; sampled drafts are accepted with min(1, p / q), else a residual draw ends the step (sampling.
speculative_accept), so the output law is the model's. The verify of a few sequences (plan.MAX_TOKENS rows in all)
and a lone sequence's MTP layers run as straight-line code (plan.DecodePlan.verify / mtp) where the model qualifies,
else through the modules. The drafts' head scores the first draft_vocabulary() token ids only (FR-Spec)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from . import plan
from .host import int_rows
from .linear import Linear, linear
from .request import Event, Sequence
from .sampling import biased, greedy, penalized, probs, sample, speculative_accept

if TYPE_CHECKING:
    from .engine import Engine

PROBATION = 32  # verifies before a sequence's acceptance decides whether it keeps drafting
DRAFT_VOCAB_SHARE = 4  # the default draft vocabulary: the first V / DRAFT_VOCAB_SHARE token ids, ...
DRAFT_VOCAB_MIN = 1024  # ... at least this many (all, where V is smaller)


def draft_vocabulary(V: int, n: int | None = None) -> int:
    """How many token ids (the first ones) an MTP draft's head scores: n (None: the default share, at least
    DRAFT_VOCAB_MIN), at most V. FR-Spec's frequency-ranked drafting (Zhao et al., 2025): a draft is one row times
    the whole [V, D] head, a product bound by the weight's read (bench/mtp.py's model: a 4 MB head, ~0.45 ms a row
    from memory, read three times a speculative step), while the tokens a model emits are mostly the frequent
    ones, which a BPE vocabulary numbers first (merges in frequency order). The drafts' law is the model's over
    those ids, renormalised (sampled drafts: min(1, p / q) stays exact for any draft law q); a token past them is
    never drafted, so its position rejects the draft, and the output is the model's either way. (Llama-3: 32K of
    128K ids kept ~95% of the drafts' acceptance in FR-Spec; bench/mtp.py's model emits ids below 670 of 4096.)"""
    if n is not None and n < 1:
        raise ValueError(f"draft_vocab must be >= 1 (token ids the drafts' head scores), not {n}")
    return min(V, n if n is not None else max(DRAFT_VOCAB_MIN, V // DRAFT_VOCAB_SHARE))


def draft_head(eng: Engine, x: torch.Tensor) -> torch.Tensor:
    """The drafts' logits of the final hiddens x [B, D] -> [B, V]: the head's over the first eng.draft_vocab ids,
    -inf past them (all ids where the head is not a plain linear layer: a quantised or adapted one)."""
    head, n = eng.model.head, eng.draft_vocab
    if n >= head.weight.shape[0] or type(head) is not Linear:
        return head(x)
    out = x.new_full((x.shape[0], head.weight.shape[0]), float("-inf"))
    out[:, :n] = linear(x, head.weight[:n])
    return out


def speculate(eng: Engine, seqs: list[Sequence]) -> list[Event]:
    """eng.drafts MTP draft tokens per sequence, verified with [pending, d_1, ..] in one main-model forward.
    MTP layer k at position i reads layer k-1's hidden there (k = 0: the main model's) and token i + k + 1,
    as in training: each layer first catches up on the positions verified since it last ran (a prompt, or
    1 + the drafts accepted), its last one reading the previous layer's draft."""
    m, D = eng.model, eng.drafts
    # straight-line code (plan.py): the verify of a few sequences, a lone one's MTP drafts too
    planned = eng.plan if eng.plan and plan.ON and len(seqs) * (D + 1) <= plan.MAX_TOKENS else None
    with planned.held() if planned else contextlib.nullcontext():  # (the weights checked once for the step's calls)
        drafts, q_logits, inputs = draft(eng, seqs, planned if len(seqs) == 1 else None)
        rows = [[s.pending] + d for s, d in zip(seqs, drafts)]  # each sequence's tokens to verify
        h = planned.verify(seqs, rows) if planned else None
    if h is not None:
        state = h  # [B, D + 1, D]
    else:
        h, state = m.hidden_state(int_rows(rows, eng.device), eng._batch(seqs, D + 1))  # [B, D + 1, D], [B, D + 1, ...]
    logits = m.head(h)  # [B, D + 1, V]
    sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    q_rows = dict(zip(sampled, torch.stack([probs(q[sampled], [seqs[i].params for i in sampled])
                                            for q in q_logits], 1))) if sampled else {}  # i -> [D, V]
    # rows without penalties: every position's pick (greedy) or law (sampled) in one call; penalties move
    # with the tokens accepted before, so those rows go one position at a time
    plain = [s.params.temperature == 0 and s.seen is None for s in seqs]
    scored = biased(seqs, logits)  # (logit_bias moves every position alike)
    picks = greedy(scored).tolist() if any(plain) else None  # [B][D + 1]
    free = [i for i in sampled if seqs[i].seen is None]
    p_rows = dict(zip(free, probs(scored[free, :D].flatten(0, 1), [seqs[i].params for i in free for _ in range(D)])
                      .view(len(free), D, -1))) if free else {}  # i -> [D, V]
    events = []
    eng.spec_stats["verified"] += len(seqs)
    eng.spec_stats["drafted"] += D * len(seqs)
    for i, (s, d) in enumerate(zip(seqs, drafts)):
        L, a = s.length - D - 1, 0  # (the verify advanced the cache over every draft)
        for j in range(D + 1):
            if plain[i]:
                tok = picks[i][j]
            elif s.params.temperature == 0:
                tok = int(greedy(penalized([s], logits[i, j:j + 1]))[0])
            elif j == D:
                tok = int(eng._choose([s], logits[i, j:j + 1])[0])
            else:
                p = p_rows[i][j] if i in p_rows else probs(penalized([s], logits[i, j:j + 1]), [s.params])[0]
                tok = speculative_accept(p, q_rows[i][j], d[j], s.generator)[1]
            events.append(eng._emit(s, tok, logits[i, j]))
            if j == D:
                break
            ok = tok == d[j]  # (sampled: speculative_accept's verdict; a residual draw is never the draft)
            eng.spec_stats["accepted"] += ok
            s.accepted += ok
            if not ok or s.finish_reason is not None:
                break
            a += 1
        s.verifies += 1
        if s.finish_reason is not None:
            continue
        s.length = L + 1 + a  # the rejected drafts' entries are overwritten later
        # layer k's rows at positions past L + a - k read a rejected draft: it redoes them next step, from
        # layer k-1's rows of this step (kept) and that layer's new ones (from position 0 where L + a < k: a
        # prompt shorter than the drafts)
        s.mtp_length = [max(0, min(L, L + a - k)) for k in range(D)]
        s.mtp_in = [state[i, :a + 1]] + [keep(inputs[k][i], L, s.mtp_length[k], s.mtp_length[k - 1])
                                         for k in range(1, D)]
        if s.verifies >= PROBATION and s.accepted < eng.min_acceptance * D * s.verifies:
            s.drafting, s.mtp_in = False, []  # it never drafts again: its MTP layers need not catch up
            eng.spec_stats["stopped"] += 1
    return events


def draft(eng: Engine, seqs: list[Sequence], lone: plan.DecodePlan | None):
    """Each sequence's eng.drafts draft tokens, MTP layer by layer (speculate's docstring) -> (the drafts per
    sequence, each layer's draft logits [B, V], each layer's input rows per sequence)."""
    m, D = eng.model, eng.drafts
    drafts: list[list[int]] = [[] for _ in seqs]  # d_1 .. d_k so far, per sequence
    q_logits, inputs = [], []  # per layer: draft logits [B, V]; its input rows per sequence
    for k in range(D):
        ins = [s.mtp_in[k] for s in seqs]  # [T_i, ...]: positions mtp_length[k] .. length - 1
        inputs.append(ins)
        outs = [None] * len(seqs)
        by_len: dict[int, list[int]] = {}
        if lone:
            s = seqs[0]
            outs[0] = lone.mtp(s, k, ins[0], s.ahead(s.mtp_length[k] + k + 1, s.length + k + 1, drafts[0]),
                               last=k + 1 == D)
        for i, h in enumerate(ins):
            if outs[i] is None:
                by_len.setdefault(h.shape[0], []).append(i)
        for T, idx in by_len.items():
            group = [seqs[i] for i in idx]
            h = torch.stack([ins[i] for i in idx])  # [B, T, ...]
            tokens = int_rows([s.ahead(s.mtp_length[k] + k + 1, s.length + k + 1, drafts[i])
                               for s, i in zip(group, idx)], eng.device)
            step, g = eng._chunk(T), []
            for j in range(0, T, step):  # (a prompt: in chunks, as it was prefilled; V4: the MTP layer's ring
                batch = eng._batch(group, min(step, T - j), mtp=k, prefill=True)  # rows kept at block ends)
                g.append(m.mtp_hidden(h[:, j:j + step], tokens[:, j:j + step], batch, k, last=k + 1 == D))
            for i, row in zip(idx, torch.cat(g, 1)):
                outs[i] = row  # [T, D] (the last layer: [chunks, D], the last row its draft's)
        q_logits.append(penalized(seqs, draft_head(eng, torch.stack([o[-1] for o in outs]))))
        picked = sample(q_logits[-1], [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        for d, t in zip(drafts, picked):
            d.append(t)
        if k + 1 < D:
            for s, o in zip(seqs, outs):
                s.mtp_in[k + 1] = torch.cat([s.mtp_in[k + 1], o])
    for s in seqs:
        if s.rid in eng.unkeyed:  # the MTP layers' rows of the prompt are in: others may share it now
            eng.pool.remember(s, eng.unkeyed.pop(s.rid))
    return drafts, q_logits, inputs


def keep(rows: torch.Tensor, end: int, lo: int, hi: int) -> torch.Tensor:
    """Of hiddens [T, D] at positions end - T .. end - 1, those at lo .. hi - 1."""
    start = end - rows.shape[0]
    return rows[lo - start:hi - start]
