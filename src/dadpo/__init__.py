"""dadpo: prune chat LLMs, recover them with distribution-aware DPO, evaluate them against the teacher."""

from dadpo.errors import DadpoError

__version__ = "0.1.0"
__all__ = ["DadpoError", "__version__"]
