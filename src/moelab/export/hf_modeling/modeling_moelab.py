"""transformers model of an exported moelab model (written by `moelab export hf`).

The network is moelab's own `MoELM`, imported from the installed `moelab` package (every
architecture moelab builds from a config, without a copy of each here): loading this model needs
`pip install moelab` (the version recorded in config.json's `moelab_version`) besides
`trust_remote_code=True`.

The KV cache is moelab's `KVCache` behind transformers' `Cache` interface (`MoelabCache`): each
attention kind stores its own tensors (keys and values, or UMoE's shared key and hidden states),
which do not fit DynamicCache's one key/value pair per layer. The model builds it on the first
forward with use_cache, and `generate` hands it back on every step. moelab has no attention mask:
padded batches (a mask with zeros) are refused rather than computed wrongly.
"""
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from moelab.config import model_config_from_dict
    from moelab.model import MoELM
except ImportError as e:  # pragma: no cover - depends on the loading environment
    raise ImportError("this model runs on moelab's code: `pip install moelab` (see the "
                      "model card, README.md)") from e

from .configuration_moelab import MoelabConfig

# the output's cache field: `cache` in newer transformers, `past_key_values` before
_CACHE_FIELD = ("cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
                else "past_key_values")


class MoelabCache(Cache):
    """moelab's `KVCache` (one `LayerCache` of named tensors per layer position, each grown
    along dim -2) as a transformers `Cache`."""

    def __init__(self, kv):
        super().__init__(layers=[])
        self.kv = kv

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.seq_len

    def get_max_length(self, layer_idx=None) -> int:
        return -1  # grows without bound

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.kv.seq_len + query_length, 0

    @property
    def is_croppable(self) -> bool:
        return True

    def _map(self, fn) -> None:
        for layer in self.kv.layers:
            layer.tensors = {k: fn(t) for k, t in layer.tensors.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `tokens_to_remove` positions (a negative count, as transformers passes
        it from `crop(-n)` callers, means the same)."""
        n = abs(int(tokens_to_remove))
        if n == 0:
            return
        keep = max(0, self.kv.seq_len - n)
        self._map(lambda t: t[..., :keep, :])
        self.kv.seq_len = keep

    def reset(self) -> None:
        for layer in self.kv.layers:
            layer.tensors = {}
        self.kv.seq_len = 0


class MoelabForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoelabConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: MoelabConfig):
        super().__init__(config)
        self.model = MoELM(model_config_from_dict(config.moelab_config))
        self.post_init()

    # ---- what transformers asks of a causal LM ----------------------------------------------
    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.head

    def set_output_embeddings(self, value):
        self.model.head = value

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """{alias: stored name} for every parameter held under two names (a tied head, an
        expert bank shared by a layer's attention and FFN); the checkpoint stores each once."""
        first, tied = {}, {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in first:
                tied[name] = first[id(p)]
            else:
                first[id(p)] = name
        return tied

    def _init_weights(self, module) -> None:
        pass  # MoELM initialises itself; from_pretrained loads every weight

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own MoelabCache (module docstring)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None,
                use_cache=None, inputs_embeds=None, return_dict=None, cache=None, **kwargs):
        # transformers >= 5.2x passes the cache as `cache` (and still accepts the older
        # `past_key_values`); missing it would decode every step with an empty cache
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is not None:
            raise ValueError("moelab models take input_ids, not inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("moelab models have no attention mask: padded batches are not "
                             "supported; use batch size 1 or prompts of equal length")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, MoelabCache):
            if isinstance(cache, Cache) and cache.get_seq_length() == 0:
                cache = None  # an empty cache of another kind: replace it with ours
            else:
                raise ValueError(f"past_key_values: expected a MoelabCache (returned by this "
                                 f"model), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = MoelabCache(self.model.new_cache())
        out = self.model(input_ids, cache=cache.kv if cache is not None else None)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1),
                                   labels[:, 1:].flatten().to(out.logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, **{_CACHE_FIELD: cache})
