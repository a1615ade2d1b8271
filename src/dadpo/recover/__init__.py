"""The recover stage: distil a pruned student from its teacher with daDPO, dDPO, dSFT or token KD."""

from dadpo.recover.config import RecoverConfig

__all__ = ["RecoverConfig", "run_recover"]


def __getattr__(name: str):
    if name == "run_recover":  # imported lazily: it pulls in torch/transformers, `dadpo --help` should not
        from dadpo.recover.pipeline import run_recover

        return run_recover
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
