"""Logprobs in OpenAI's two shapes, from what a Sequence recorded.

A Sequence records, per completion token, `(token, logprob, [(id, logprob), ...], offset)`
(offset: where its text starts in the decoded completion) and, for echo, per prompt token
`(token, logprob, top)` (the first token: None, None). Completions report them as parallel
lists (`tokens`, `token_logprobs`, `top_logprobs` as {token: logprob} maps that also hold the
chosen token, `text_offset` counted from the start of the prompt); chat as a list of
{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]} under `content`.
"""

from __future__ import annotations


def token_text(tokenizer, token: int) -> str:
    """A token's text; a token that is part of a UTF-8 character is written `bytes:\\xe2\\x80`."""
    piece = tokenizer.token_bytes(token)
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def prompt_offsets(tokenizer, ids: list[int]) -> list[int]:
    """Where each prompt token's text starts in the prompt (special tokens take no room)."""
    decoder, offsets, at = tokenizer.stream_decoder(skip_special=True), [], 0
    for t in ids:
        offsets.append(at)
        at += len(decoder.push(t))
    return offsets


def completion_logprobs(tokenizer, entries, base: int = 0, prompt=None, prompt_at=None) -> dict:
    """`logprobs` of a text_completion choice (or chunk): the prompt's entries first when echoed
    (`prompt`, with their offsets `prompt_at`), then the completion's, offsets from `base`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    rows = [(t, lp, top, at) for (t, lp, top), at in zip(prompt or (), prompt_at or ())]
    rows += [(t, lp, top, base + at) for t, lp, top, at in entries]
    for token, lp, top, at in rows:
        out["tokens"].append(token_text(tokenizer, token))
        out["token_logprobs"].append(lp)
        if top is None:
            out["top_logprobs"].append(None)
        else:
            best = {token_text(tokenizer, i): v for i, v in top}
            best.setdefault(token_text(tokenizer, token), lp)  # the chosen token, always
            out["top_logprobs"].append(best)
        out["text_offset"].append(at)
    return out


def merge_completion_logprobs(parts: list[dict | None]) -> dict | None:
    """One choice's logprobs from its chunks' (None if none had any)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    return {k: [v for p in parts for v in p[k]] for k in parts[0]}


def chat_logprobs(tokenizer, entries) -> list[dict]:
    """`logprobs.content` of a chat choice (or chunk)."""
    def item(token, lp):
        return {"token": token_text(tokenizer, token), "logprob": lp,
                "bytes": list(tokenizer.token_bytes(token))}
    return [dict(item(token, lp), top_logprobs=[item(i, v) for i, v in top])
            for token, lp, top, _ in entries]
