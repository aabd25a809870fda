"""Pure attention functions, one module per family.

Every op has a float32 token-loop oracle (``mode="recurrent"`` or a plain reference) and
fast paths behind ``mode=``; see ``shared/DESIGN.md`` for the conventions.
"""
from .delta_rule import gated_delta_rule, gated_delta_rule_step, kda, kda_step  # noqa: E402,F401
from .lightning import lightning_attention, lightning_attention_step  # noqa: E402,F401
from .softmax import softmax_attention, softmax_decode  # noqa: E402,F401
from .sparse import dsa_index_scores, dsa_topk, sparse_attention  # noqa: E402,F401
