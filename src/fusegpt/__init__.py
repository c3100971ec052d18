"""fusegpt: make Hugging Face causal LMs shallower with FuseGPT (prune-and-fuse)."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "evaluate_perplexity", "export_model", "drop_blocks", "merge_and_unload",
           "write_gguf", "get_adapter"]


def __getattr__(name):  # lazy: importing fusegpt stays cheap
    if name == "load_model":
        from .models import load_model

        return load_model
    if name == "evaluate_perplexity":
        from .evaluate import evaluate_perplexity

        return evaluate_perplexity
    if name == "write_gguf":
        from .gguf_export import write_gguf

        return write_gguf
    if name in ("export_model", "drop_blocks", "merge_and_unload"):
        from . import export

        return getattr(export, name)
    if name == "get_adapter":
        from .adapters import get_adapter

        return get_adapter
    raise AttributeError(f"module 'fusegpt' has no attribute {name!r}")
