"""Token perplexity with the GPTQ / LLM-Pruner protocol: the joined test text, tokenized once, cut into
non-overlapping windows of `seq_len` tokens (the ragged tail dropped); PPL = exp(mean token NLL) over
every next-token prediction inside the windows."""

from __future__ import annotations

import math
import os
from pathlib import Path

from dadpo.data import data_folder
from dadpo.errors import DadpoError

#: name -> (local file under a data dir, hub dataset, hub config, split, text field)
CORPORA = {
    "wikitext2": ("wikitext2_raw/test.joined.txt", "wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb/ptb.test.txt", "ptb_text_only", "penn_treebank", "test", "sentence"),
}


def load_corpus(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The joined test text of a corpus: from `data_folder(data_dir)` if it holds it, else the hub."""
    if name not in CORPORA:
        path = Path(name)
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DadpoError(f"perplexity corpus {name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        raise DadpoError(f"unknown perplexity corpus {name!r}: choose {', '.join(CORPORA)} "
                         "or give a text file")
    local, hub, config, split, field = CORPORA[name]
    folder = data_folder(data_dir)
    if folder and (folder / local).is_file():
        text = (folder / local).read_text(encoding="utf-8")
        # PTB ships one sentence per line, each padded with spaces; the hub's rows are the stripped lines,
        # which GPTQ joins with " " (WikiText's file is already joined)
        return " ".join(line.strip() for line in text.splitlines()) if name == "ptb" else text
    try:
        import datasets

        rows = datasets.load_dataset(hub, config, split=split)[field]
    except Exception as e:
        raise DadpoError(f"cannot load corpus {name!r} from the hub ({str(e).splitlines()[0]}); "
                         f"set DADPO_DATA_DIR to a folder holding {local}") from None
    return ("\n\n" if name == "wikitext2" else " ").join(rows)


def perplexity(model, tokenizer, text: str, seq_len: int = 128, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True, window_stride: int = 1) -> dict:
    """Token perplexity of `text` under `model` in non-overlapping `seq_len` windows.

    `window_stride` k > 1 scores every k-th window of the whole text (a cheap proxy that, unlike a prefix,
    samples all of it); `max_windows` then caps the count of those."""
    import torch  # here, not at the top: the recipe schema reads CORPORA and `dadpo --help` needs no torch
    from tqdm.auto import tqdm

    if seq_len < 2:
        raise DadpoError(f"seq_len must be ≥ 2, got {seq_len}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise DadpoError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)[::window_stride][:max_windows or None]
    n_windows = len(windows)
    per_window = []  # mean token NLL of each window (all windows predict seq_len - 1 tokens)
    for start in tqdm(range(0, n_windows, batch_size), desc=f"perplexity@{seq_len}", disable=not progress):
        batch = windows[start:start + batch_size].to(model.device)
        with torch.inference_mode():
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
        per_window += nll.mean(1).tolist()
    mean = sum(per_window) / n_windows
    return {"ppl": math.exp(mean), "ppl_ci95": window_ci(per_window), "seq_len": seq_len, "windows": n_windows,
            "window_stride": window_stride, "tokens": n_windows * (seq_len - 1)}


def window_ci(per_window: list[float], samples: int = 1000, seed: int = 0) -> list[float] | None:
    """95% percentile-bootstrap CI of the perplexity, windows resampled with replacement (adjacent windows
    of one text are not independent, so this is a lower bound on the uncertainty)."""
    if len(per_window) < 2:
        return None
    import numpy as np

    x = np.asarray(per_window)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))].mean(1)
    return [math.exp(v) for v in np.percentile(means, [2.5, 97.5])]
