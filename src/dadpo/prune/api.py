"""`prune` (in memory) and `prune_to_dir` (load → validate → prune → evaluate → save atomically)."""

from __future__ import annotations

import importlib.metadata
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dadpo.errors import ConfigError, DadpoError
from dadpo.io import check_removable, read_json_object
from dadpo.prune.config import PruneConfig

log = logging.getLogger(__name__)


def prune(model, tokenizer, config: PruneConfig, data_dir: str | None = None) -> dict:
    """Remove `config.ratio` of all parameters from `model` in place; return what was done. `data_dir`: the
    local data folder a calibration alias resolves under (default $DADPO_DATA_DIR, else the hub)."""
    from dadpo.prune.importance import calibration_batches, score_units
    from dadpo.prune.plan import make_plan
    from dadpo.prune.pruner import (
        apply_plan,
        build_units,
        consumer_linears,
        count_params,
        dropped_inputs,
        layer_widths,
    )
    from dadpo.prune.reconstruct import InputGrams, forward_passes

    t0 = time.time()
    check_reachable(model, config)
    layers = config.layer_range(len(model.model.layers))
    before = count_params(model)
    target = round(config.ratio * before["total"])
    units, graphs = build_units(model, layers)
    batches = calibration_batches(tokenizer, config, data_dir) if needs_calibration(config) else []
    was_training = model.training
    model.eval()
    log.info("scoring %d layers by %s on %d calibration batches", len(units), config.importance, len(batches))
    consumers = [lin for u in units for lin in consumer_linears(u)] if config.reconstruct else []
    with InputGrams(model, consumers) as stats:  # the scoring passes feed the refit's statistics too
        score_units(model, units, batches, config.importance, seed=config.seed)
        if consumers and config.importance not in ("taylor", "activation"):
            forward_passes(model, batches)
    plans = make_plan(units, target, before["total"], config.targets, config.allocation, config.mlp_round_to)
    refits = [(lin, lin.weight.detach().clone(), stats.grams[id(lin)],
               sorted(set(range(lin.in_features)) - set(dropped)))
              for u in units for lin, dropped in dropped_inputs(u, plans[u.index])] if consumers else []
    apply_plan(model, units, graphs, plans)
    _refit(refits, config.reconstruct_damping)
    model.train(was_training)
    after = count_params(model)
    removed = before["total"] - after["total"]
    widths = layer_widths(model)
    return {
        "ratio_asked": config.ratio,
        "ratio_achieved": removed / before["total"],
        "ratio_achieved_non_embedding": removed / before["non_embedding"],
        "params_before": before, "params_after": after,
        "uniform": all(w == widths[0] for w in widths),
        "model_class": type(model).__name__,
        "layers_pruned": [layers.start, layers.stop],
        "reconstructed": bool(refits),
        "layer_widths": widths,
        "calibration": {"source": config.calib, "samples": sum(len(b["input_ids"]) for b in batches),
                        "tokens": int(sum(b["attention_mask"].sum() for b in batches))} if batches else None,
        "prune_seconds": round(time.time() - t0, 2),
    }


@torch.no_grad()
def _refit(refits: list[tuple], damping: float) -> None:
    """After cutting: least-squares refit of the kept input columns of each (Linear, dense weight, Gram,
    kept columns); see dadpo.prune.reconstruct."""
    from dadpo.prune.reconstruct import refit_kept_columns

    for lin, dense, gram, kept in refits:
        assert lin.in_features == len(kept), "refit columns do not match the pruned layer"
        lin.weight.copy_(refit_kept_columns(dense, gram, kept, damping))


def check_reachable(model, config: PruneConfig) -> None:
    """Fail unless the family is supported, the layer range fits and the ratio is within reach."""
    from dadpo.prune.plan import max_removable
    from dadpo.prune.pruner import build_units, check_supported, count_params

    check_supported(model.config)
    units, _ = build_units(model, config.layer_range(len(model.model.layers)))
    total = count_params(model)["total"]
    reachable = max_removable(units, config.targets)
    if config.ratio * total > reachable + 0.005 * total:
        raise ConfigError("prune.ratio", f"{config.ratio} cannot be reached with targets={config.targets} in "
                          f"layers {config.layers or 'all'} (at most {reachable / total:.3f} removable)")


def _library_versions() -> dict[str, str]:
    out = {}
    for dist in ("dadpo", "torch", "transformers", "torch-pruning"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def needs_calibration(config: PruneConfig) -> bool:
    """Whether pruning reads the calibration set: Taylor/activation scores, or the least-squares refit."""
    return config.importance in ("taylor", "activation") or config.reconstruct


def is_pruned_dir(path: Path) -> bool:
    """Whether `path` holds a model dadpo pruned: the pruning.json that `_write_reports` writes into it."""
    return {"source_model", "ratio_achieved"} <= (read_json_object(path / "pruning.json") or {}).keys()


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """`--out` is replaced as a whole, so it must be new, empty, or (with --overwrite) a model dadpo pruned;
    and never a link, the current directory or a parent of it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DadpoError(f"--out {out_dir} exists and is not a directory")
    if not out_dir.exists():
        return
    if any(out_dir.iterdir()):
        if not is_pruned_dir(out_dir):
            raise DadpoError(f"--out {out_dir} is not empty and holds no pruning.json of a dadpo prune; --overwrite "
                             "replaces only dadpo's own prunes, so choose another --out")
        if not overwrite:
            raise DadpoError(f"--out {out_dir} holds an earlier prune; pass --overwrite to replace it")
    check_removable(out_dir, "--out")


def _evaluate(model, tok, config: PruneConfig, text: str | None) -> dict:
    """Perplexity (unless skipped) and a greedy answer to the sample prompt."""
    from dadpo.generation import GenerationConfig, generate_batch
    from dadpo.perplexity import perplexity

    out: dict = {}
    if text is not None:
        t0 = time.time()
        out["perplexity"] = perplexity(model, tok, text, seq_len=config.ppl_seq_len,
                                       max_windows=config.ppl_max_windows, window_stride=config.ppl_window_stride)
        out["perplexity"]["seconds"] = round(time.time() - t0, 1)
    if config.sample_max_new_tokens:
        cfg = GenerationConfig(max_new_tokens=config.sample_max_new_tokens, batch_size=1, seed=config.seed)
        out["sample"] = generate_batch(model, tok, [[{"role": "user", "content": config.sample_prompt}]], cfg)[0][0]
    return out


@torch.no_grad()
def _reload_diff(model, path: Path) -> float:
    """Max |logit| difference between `model` and the copy saved at `path`, loaded by plain from_pretrained."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype).to(model.device).eval()
    ids = torch.arange(1, 33, device=model.device)[None] % model.config.vocab_size
    diff = (model(input_ids=ids).logits.float() - reloaded(input_ids=ids).logits.float()).abs().max().item()
    del reloaded
    return diff


def prune_to_dir(model_spec: str, out_dir, config: PruneConfig, overwrite: bool = False, *,
                 dtype: str = "float32", trust_remote_code: bool = False, data_dir: str | None = None) -> dict:
    """Prune a model spec into `out_dir` (safetensors, tokenizer, pruning.json, report.json/md); returns report.
    Calibration and perplexity data resolve under `data_dir` (default $DADPO_DATA_DIR, else the hub)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dadpo.models import load_model, resolve_model
    from dadpo.perplexity import load_corpus
    from dadpo.prune.pruner import check_supported

    t_start = time.time()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    path = resolve_model(model_spec)
    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DadpoError(f"--model {model_spec}: cannot read its config ({str(e).splitlines()[0]})") from None
    check_supported(model_config)
    with torch.device("meta"):  # shapes only: check the range and the ratio before loading weights
        check_reachable(AutoModelForCausalLM.from_config(model_config), config)
    if needs_calibration(config):
        from dadpo.prune.importance import calibration_records

        calibration_records(config, data_dir)  # fail on a bad --calib or --calib-skip before loading the model
    text = load_corpus(config.ppl_corpus, data_dir) if config.ppl_max_windows != 0 else None

    model, tok = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
    before = _evaluate(model, tok, config, text)
    report = prune(model, tok, config, data_dir)
    after = _evaluate(model, tok, config, text)
    report.update({"source_model": model_spec, "importance": config.importance, "targets": config.targets,
                   "allocation": config.allocation, "config": config.model_dump(), "before": before,
                   "after": after, "libraries": _library_versions(),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        report["reload_max_abs_logit_diff"] = _reload_diff(model, tmp)
        if report["reload_max_abs_logit_diff"] > 1e-4:
            raise RuntimeError(f"reloaded model differs by {report['reload_max_abs_logit_diff']:.2e} in logits")
        report["seconds_total"] = round(time.time() - t_start, 1)
        report["peak_memory_mb"] = _peak_memory_mb()
        _write_reports(tmp, report)
        tmp.chmod(0o755)  # mkdtemp/mkstemp make private files; a saved model is meant to be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        _check_out_dir(out_dir, overwrite)  # again: pruning took minutes, and --out is about to be replaced
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pruned %s: %.1f%% of parameters removed, saved to %s", model_spec,
             100 * report["ratio_achieved"], out_dir)
    return report


def _peak_memory_mb() -> dict[str, float]:
    out = {"cpu_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return {k: round(v, 1) for k, v in out.items()}


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` to `out_dir`, replacing an old one (checked by `_check_out_dir`) only once the
    new one is complete; the old one is deleted from inside a temporary folder dadpo made for it."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old."))
        out_dir.rename(old / "x")
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_reports(d: Path, report: dict) -> None:
    from dadpo.io import atomic_write_json, atomic_write_text
    from dadpo.prune.report import pruning_record, render_markdown

    atomic_write_json(d / "pruning.json", pruning_record(report))
    atomic_write_json(d / "report.json", report)
    atomic_write_text(d / "report.md", render_markdown(report))
