"""Run-config checks shared by the SFT and preference datasets (``sft_build.py``,
``preference_build.py``): concatenated ``data.sources`` entries, and a source's manifest against
the run's chat template and tokenizer, so a set made with another one is refused in one line."""
from __future__ import annotations

from ..config.errors import ConfigError
from .indexed import strip_suffix


def concatenated_source_paths(sources, key: str, not_supported: str) -> list[str]:
    """Prefixes of ``sources`` (``key`` in the config): each a PREFIX or ``{path: PREFIX}``. A
    weight other than 1 or any other field is refused: the sources are concatenated, each seen
    once per epoch; ``not_supported`` ends that message (where and why, what to do)."""
    if not isinstance(sources, list):
        sources = [sources]
    paths = []
    for i, item in enumerate(sources):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item:
            raise ConfigError(f"{key}[{i}]: expected {{path: PREFIX}}, got {item!r}")
        extra = set(item) - {"path"} - ({"weight"} if item.get("weight", 1) == 1 else set())
        if extra:
            raise ConfigError(f"{key}[{i}]: {', '.join(sorted(extra))} is not supported {not_supported}")
        paths.append(strip_suffix(str(item["path"])))
    return paths


def check_made_with(manifest: dict, prefix: str, where: str, template_name: str, tok,
                    template_fix: str) -> None:
    """Refuse source ``prefix`` whose manifest names another chat template (the message ends in
    ``template_fix``) or another tokenizer (by checksum) than the run's ``tok``."""
    if manifest.get("chat_template") != template_name:
        raise ConfigError(f"{where}: {prefix} was preprocessed with chat template {manifest.get('chat_template')!r} "
                          f"but data.chat_template={template_name!r}: {template_fix}")
    if manifest.get("tokenizer_sha256") != tok.checksum:
        raise ConfigError(f"{where}: {prefix} was preprocessed with another tokenizer (sha256 "
                          f"{str(manifest.get('tokenizer_sha256'))[:12]}, data.tokenizer has {tok.checksum[:12]}): "
                          "set data.tokenizer to that one or preprocess again")
