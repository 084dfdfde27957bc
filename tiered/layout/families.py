"""Model families: Hugging Face tensor names and config keys → tiered's roles and ModelConfig.

Owns: reading `layouts/*.toml`, choosing the family of a checkpoint, normalising its config.json
(transformers 4.x and 5.x spellings) into a `ModelConfig`, and mapping tensor names to canonical
dense names and expert roles. This is the only module that knows Hugging Face names.
Does not own: reading tensor data (repack.py) or the layout on disk (format.py).

Adding a family is a new `layouts/<name>.toml`; where the family's math differs, the model reads the
difference from `ModelConfig` (family-specific data goes into `ModelConfig.extra`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: the tomli backport, a dependency there (pyproject.toml)
    import tomli as tomllib

from tiered.layout.config import EXPERT_ROLES, FUSED_EXPERT_ROLES, ModelConfig
from tiered.layout.fused import SOURCE_ROLES


class FamilyError(ValueError):
    """A checkpoint whose family or config tiered cannot handle; the message says what to do."""


def layouts_dir() -> Path:
    """The folder of family files: `layouts/` in a source tree, `tiered/layouts` in a wheel."""
    here = Path(__file__).resolve().parent.parent  # the `tiered` package
    for cand in (here.parent / "layouts", here / "layouts"):
        if cand.is_dir() and any(cand.glob("*.toml")):
            return cand
    raise FamilyError(f"no layouts/*.toml found next to {here}: the installation is incomplete, reinstall tiered")


def default_model_path() -> Path:
    """The embedded default model (a Hugging Face checkpoint shipped as package data)."""
    return Path(__file__).resolve().parent.parent / "data" / "olmoe-code-17m"


# Normalised field -> Hugging Face keys, shared by every family; a family's [config] adds to or overrides these.
COMMON_KEYS: dict[str, list[str]] = {
    "vocab_size": ["vocab_size"],
    "hidden_size": ["hidden_size", "d_model"],
    "num_layers": ["num_hidden_layers", "n_layer"],
    "num_heads": ["num_attention_heads"],
    "num_kv_heads": ["num_key_value_heads"],
    "head_dim": ["head_dim"],
    "rms_norm_eps": ["rms_norm_eps"],
    "max_position_embeddings": ["max_position_embeddings"],
    "tie_word_embeddings": ["tie_word_embeddings"],
    "bos_token_id": ["bos_token_id"],
}
MOE_FIELDS = ("num_experts", "top_k", "expert_ffn")



@dataclass(frozen=True)
class Family:
    name: str  # e.g. "olmoe"
    path: Path  # the .toml file it was read from
    spec: dict[str, Any]  # the parsed TOML

    @property
    def architectures(self) -> list[str]:
        return list(self.spec["family"].get("architectures", []))

    @property
    def model_types(self) -> list[str]:
        return list(self.spec["family"].get("model_types", []))

    @cached_property
    def _dense_patterns(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_compile(hf), canon) for canon, pats in self.spec["tensors"].items() for hf in _as_list(pats)]

    @cached_property
    def _expert_patterns(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_compile(hf), role) for role, pats in self.spec["experts"].items() for hf in _as_list(pats)]

    def classify(self, hf_name: str) -> tuple[str, str, int | None, int | None]:
        """Map a HF tensor name to ("dense", canonical, layer, None), ("expert", role, layer, expert) or
        ("ignore", name, None, None) for the parts tiered does not run (vision tower, MTP head).

        `[rename] prefixes` rewrite a leading prefix first (multimodal checkpoints keep the text model under
        `model.language_model.`). Raises FamilyError for a name that the family file does not describe.
        """
        for old, new in self.spec.get("rename", {}).get("prefixes", {}).items():
            if hf_name.startswith(old):
                hf_name = new + hf_name[len(old):]
                break
        if hf_name.startswith(tuple(self.spec.get("ignore", {}).get("prefixes", []))):
            return "ignore", hf_name, None, None
        for pat, role in self._expert_patterns:
            m = pat.fullmatch(hf_name)
            if m:
                # a pattern without {e} is a fused [E, ...] tensor (gpt-oss style): expert None
                return "expert", role, int(m["l"]), int(m["e"]) if "e" in m.groupdict() else None
        for pat, canon in self._dense_patterns:
            m = pat.fullmatch(hf_name)
            if m:
                layer = int(m["l"]) if "l" in m.groupdict() else None
                return "dense", canon.replace("{l}", str(layer)) if layer is not None else canon, layer, None
        for ign in self.spec.get("ignore", {}).get("patterns", []):
            if _compile(ign).fullmatch(hf_name):
                return "ignore", hf_name, None, None
        raise FamilyError(
            f"tensor {hf_name!r} is not described by {self.path}: add its pattern to [tensors], [experts] "
            f"or [ignore] of that file"
        )

    def expected_dense(self, cfg: ModelConfig) -> list[str]:
        """Canonical dense names that a complete checkpoint of `cfg` must have."""
        optional = set(self.spec.get("optional", {}).get("names", []))
        names = []
        for canon in self.spec["tensors"]:
            if canon in optional:
                continue
            if canon.endswith(("q_bias", "k_bias", "v_bias")) and not cfg.attn_bias:
                continue
            if "{l}" in canon:
                kind = layer_kind_of(canon)
                names += [canon.replace("{l}", str(l)) for l in range(cfg.num_layers)
                          if kind is None or cfg.layer_kind(l) == kind]
            else:
                names.append(canon)
        if not cfg.tie_word_embeddings and "lm_head" in self.spec["tensors"]:
            names.append("lm_head")
        return names

    def _layer_kinds(self, hf: dict[str, Any], fields: dict[str, Any]) -> list[str]:
        """Per-layer kinds from config.json's layer_types through the family's [layer_kinds] table; a config
        without layer_types gets [layer_pattern]: every `every`-th layer (the key `interval_key`) is `kind`."""
        names = {k: v for k, v in self.spec["layer_kinds"].items()}
        types = hf.get("layer_types")
        if not types:
            pat = self.spec.get("layer_pattern", {})
            every = int(hf.get(pat.get("interval_key", ""), pat.get("every", 1)) or 1)
            types = [pat.get("kind") if (l + 1) % every == 0 else pat.get("other")
                     for l in range(int(fields["num_layers"]))]
        unknown = sorted({str(t) for t in types} - set(names))
        if unknown:
            raise FamilyError(f"config.json layer_types has {unknown}: {self.path.name} maps only {sorted(names)}")
        return [names[t] for t in types]

    def normalise(self, hf: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        """Turn a config.json dict (4.x or 5.x keys) into a ModelConfig; FamilyError names what is missing."""
        if isinstance(hf.get("text_config"), dict):  # multimodal checkpoint: tiered runs its text model
            hf = {**hf, **hf["text_config"]}
        keys = {**COMMON_KEYS, **self.spec.get("config", {})}
        fields: dict[str, Any] = dict(self.spec.get("defaults", {}))
        for field, hf_keys in keys.items():
            for k in hf_keys:
                v = _lookup(hf, k)
                if v is not None:
                    fields[field] = v
                    break
        missing = [f for f in MOE_FIELDS if f not in fields]
        if missing:
            raise FamilyError(
                f"config.json (model_type {hf.get('model_type')!r}) has no MoE fields for {missing} "
                f"(looked for {[keys[f] for f in missing]}): tiered runs Mixture-of-Experts models only"
            )
        for key, why in self.spec.get("unsupported", {}).items():
            if hf.get(key):
                raise FamilyError(f"config.json sets {key}={hf[key]!r}: {why} for family {self.name}")
        if hf.get("decoder_sparse_step", 1) not in (None, 1):
            raise FamilyError("config.json sets decoder_sparse_step != 1: dense (non-MoE) decoder layers are not implemented")
        fields.setdefault("num_kv_heads", fields.get("num_heads"))
        if fields.get("head_dim") is None:
            fields["head_dim"] = fields["hidden_size"] // fields["num_heads"]
        fields["rope_theta"], fields["rope_scaling"] = _rope(hf)
        fields["eos_token_ids"] = _eos_ids(hf, generation or {})
        fields["source_dtype"] = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16")
        fields.setdefault("tie_word_embeddings", False)
        fields.setdefault("max_position_embeddings", 4096)
        if "hook" in self.spec["family"]:
            raise FamilyError(f"layouts/{self.name}.toml names a hook ({self.spec['family']['hook']!r}), but family "
                              "hooks are not supported: express the difference in the TOML or in ModelConfig")
        if "layer_kinds" in self.spec:
            fields["layer_types"] = self._layer_kinds(hf, fields)
        fields["family"] = self.name
        extra = dict(self.spec.get("extra_defaults", {}))  # ModelConfig.extra: family data the model reads
        for field, hf_keys in self.spec.get("extra", {}).items():
            for k in hf_keys:
                if hf.get(k) is not None:
                    extra[field] = hf[k]
                    break
        if "mla" in fields.get("layer_types", ()):  # DeepSeek-V3: MLA dims in one place for the model
            extra["mla"] = {k: extra.pop(k) for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                                       "qk_rope_head_dim", "v_head_dim") if k in extra}
        if extra.get("n_shared_experts") and "shared_expert_ffn" not in fields:  # DeepSeek-V3: one fused shared MLP
            fields["shared_expert_ffn"] = int(extra["n_shared_experts"]) * int(fields["expert_ffn"])
        if extra:
            fields["extra"] = extra
        for k in ("num_experts", "top_k", "expert_ffn", "shared_expert_ffn", "num_layers", "hidden_size"):
            if k in fields:
                fields[k] = int(fields[k])
        try:
            return ModelConfig(**fields)
        except TypeError as e:
            raise FamilyError(f"{self.path}: bad field in [config]/[defaults]: {e}") from None


ATTENTION_ONLY = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "q_bias", "k_bias", "v_bias")


def layer_kind_of(canonical: str) -> str | None:
    """The layer kind a per-layer canonical dense name belongs to ("linear", "attention"), None for every layer."""
    leaf = canonical.rsplit(".", 1)[-1]
    if leaf.startswith("lin_"):
        return "linear"
    return "attention" if leaf in ATTENTION_ONLY else None




def _as_list(patterns: str | list[str]) -> list[str]:
    """A role's pattern or patterns (a family may list per-expert and fused spellings of one role)."""
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _lookup(hf: dict[str, Any], key: str) -> Any:
    """hf[key], where a dotted key reads a nested dict ("rope_parameters.partial_rotary_factor")."""
    v: Any = hf
    for part in key.split("."):
        if not isinstance(v, dict):
            return None
        v = v.get(part)
    return v


def _compile(pattern: str) -> re.Pattern[str]:
    esc = re.escape(pattern).replace(r"\{l\}", r"(?P<l>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(esc)


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE theta and scaling from 5.x `rope_parameters` or 4.x `rope_theta` / `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or None
    rtype = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rtype != "default":
        extra = {k: v for k, v in (scaling or params).items() if k != "rope_theta"}
        return float(theta), {"rope_type": rtype, **extra}
    return float(theta), None


def _eos_ids(hf: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for src in (gen.get("eos_token_id"), hf.get("eos_token_id")):
        for v in src if isinstance(src, list) else [src]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return tuple(ids)


def load_families() -> dict[str, Family]:
    fams = {}
    for p in sorted(layouts_dir().glob("*.toml")):
        spec = tomllib.loads(p.read_text())
        name = spec["family"]["name"]
        for role in spec["experts"]:
            if role not in EXPERT_ROLES + SOURCE_ROLES and role not in FUSED_EXPERT_ROLES:
                raise FamilyError(f"{p}: unknown expert role {role!r}; roles are {EXPERT_ROLES + SOURCE_ROLES} "
                                  f"(or fused {sorted(FUSED_EXPERT_ROLES)})")
        fams[name] = Family(name=name, path=p, spec=spec)
    return fams


def family_for(hf: dict[str, Any], *, where: str = "config.json") -> Family:
    """Pick the family from `architectures` / `model_type`; the error lists the supported ones."""
    fams = load_families()
    archs = hf.get("architectures") or []
    mtype = hf.get("model_type")
    for fam in fams.values():
        if any(a in fam.architectures for a in archs) or (mtype and mtype in fam.model_types):
            return fam
    supported = ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in fams.values())
    raise FamilyError(
        f"{where}: unknown architecture {archs or mtype!r}. Supported families: {supported}. "
        f"A new family is a new file in {layouts_dir()}."
    )


def read_checkpoint_config(src: Path) -> tuple[Family, ModelConfig, dict[str, Any]]:
    """Family, normalised config and raw config.json of a Hugging Face checkpoint directory."""
    cfg_path = Path(src) / "config.json"
    if not cfg_path.is_file():
        raise FamilyError(f"{src} has no config.json: pass a Hugging Face checkpoint directory or a tiered layout")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FamilyError(f"{cfg_path} is not valid JSON: {e}") from None
    gen_path = Path(src) / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    fam = family_for(hf, where=str(cfg_path))
    return fam, fam.normalise(hf, gen), hf
