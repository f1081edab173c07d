"""pmet: Precise Model Editing in a Transformer (Li et al., AAAI 2024).

    from pmet import load_model, load_requests, load_config, edit
    lm = load_model("smollm2-135m")
    result = edit(lm.model, lm.tok, load_requests("examples/counterfacts.jsonl"), load_config("smollm2-135m"))
"""

from .config import PMETConfig, load_config
from .editor import edit
from .errors import PmetError
from .models import fingerprint, load_model
from .patch import EditResult
from .requests import EditRequest, load_requests, make_request

__version__ = "0.1.0"
__all__ = [
    "EditRequest", "EditResult", "PMETConfig", "PmetError", "edit", "fingerprint", "load_config", "load_model",
    "load_requests", "make_request",
]
